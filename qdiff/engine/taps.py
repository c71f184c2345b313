"""What is tapped: integer taps of DequantizeLinear inputs, real values of a tap, tap sizes.

The quantized side reads a DequantizeLinear's integer input (:func:`integer_tap`, found by
:func:`integer_source`) where that is all the DequantizeLinear needs, and dequantizes it itself:
a quarter of the bytes to copy. :func:`tap_bytes` and :func:`group_by_memory` estimate what the
taps of one run take, statically.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from qdiff.graph import Graph, attr_value
from qdiff.structs import DequantParams, TensorPair

__all__ = ["group_by_memory", "integer_source", "integer_tap", "real_values", "tap_bytes"]


def integer_tap(pair: TensorPair, qg: Graph) -> TensorPair:
    """The pair with its quantized tensor replaced by the integer input of its DequantizeLinear.

    Only where :func:`integer_source` finds one; otherwise the pair is returned unchanged.
    """
    if pair.dequant is not None:
        return pair
    found = integer_source(qg, pair.quant_tensor)
    if found is None:
        return pair
    return dataclasses.replace(pair, quant_tensor=found[0], dequant=found[1])

def integer_source(g: Graph, tensor: str) -> tuple[str, DequantParams] | None:
    """``(integer tensor, its DequantParams)`` when ``tensor`` is a DequantizeLinear output computed
    from them alone: constant float32 scale/zero point, no block size, an 8/16-bit integer input
    computed at run time. Reading that input instead of ``tensor`` gives the same values."""
    if tensor not in g.producer:
        return None
    node = g.nodes[g.producer[tensor]]
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    x = node.input[0]
    if g.is_constant(x) or attr_value(node, "block_size", 0):
        return None
    int_types = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16)
    if g.elem_type(x) not in int_types:
        return None
    scale = g.const_value(node.input[1])
    zp_name = node.input[2] if len(node.input) > 2 else ""
    zp = g.const_value(zp_name) if zp_name else np.zeros((), onnx.helper.tensor_dtype_to_np_dtype(g.elem_type(x)))
    if scale is None or zp is None or scale.dtype != np.float32 or scale.size != zp.size:
        return None
    return x, DequantParams(scale, zp, int(attr_value(node, "axis", 1)))

def real_values(arr: np.ndarray, pair: TensorPair) -> np.ndarray:
    """The real values of a tapped tensor: integer taps dequantized, FP16 widened."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "iu" and pair.dequant is not None:
        return pair.dequant.dequantize(arr)
    return arr

def tap_bytes(keyed: list, fg: Graph, tap_pairs: dict, qg: Graph | None) -> int | None:
    """Static estimate of the bytes one run's taps take on both sides (None if a shape is unknown)."""
    total = 0
    for key, pair in keyed:
        elements = fg.elements(pair.float_tensor)
        if elements is None:
            return None
        q_type = qg.elem_type(tap_pairs[key].quant_tensor) if qg is not None else None
        q_bytes = onnx.helper.tensor_dtype_to_np_dtype(q_type).itemsize if q_type else 4
        total += elements * (4 + q_bytes)
    return total

def group_by_memory(keyed: list, fg: Graph, budget: int) -> list[list]:
    """Split pairs into groups whose float+quantized taps (statically estimated) fit ``budget`` bytes."""
    groups: list[list] = [[]]
    used = 0
    for key, pair in keyed:
        cost = 2 * 4 * fg.elements(pair.float_tensor, unknown_dim=1)  # float32 on both sides (a conservative estimate for int8/fp16 taps)
        if groups[-1] and used + cost > budget:
            groups.append([])
            used = 0
        groups[-1].append((key, pair))
        used += cost
    return groups
