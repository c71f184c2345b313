"""Graph edits as passes: each takes a model and returns a new one plus what changed (onnx only).

Never mutates the model it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qdiff.graph import Graph
from qdiff.ops import KEEPS_SIGN, NON_NEGATIVE

__all__ = ["PassResult", "strip_activation_qdq"]


@dataclass(frozen=True)
class PassResult:
    """The edited model and a count of what the pass changed.

    Attributes:
        model: the new model.
        modified: how many edits the pass made.
        notes: what else the pass did that a reader of its result should know.
        warnings: where the pass could not do its job faithfully.
    """

    model: onnx.ModelProto
    modified: int
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()




def strip_activation_qdq(model: onnx.ModelProto) -> PassResult:
    """Remove the QuantizeLinear -> DequantizeLinear pairs on activations (weights keep theirs).

    What is left is the float model the quantized one simulates, with its weights already
    quantized: compared with the original QDQ model it shows the error of activation quantization
    alone. Each DequantizeLinear becomes an Identity of the QuantizeLinear's float input, so every
    tensor name (graph outputs included) is kept; QuantizeLinear nodes left without readers are
    dropped.

    ::

        x -> Q -> DQ -> Conv(W_dq)      becomes      x -> Identity -> Conv(W_dq)

    onnxruntime's QDQ quantizer removes a Relu or Clip that follows a quantized node and lets the
    quantization do the clamp (asymmetric activations: the range starts at 0, so the zero point
    sits at the start of the integer range, uint8 0 / int8 -128). Removing that Q/DQ would remove
    the model's activation too, so there the activation is put back, once per QuantizeLinear::

        Conv -> x -> Q(zp 0) -> DQ      becomes      Conv -> x -> Relu -> x_refolded_relu -> Identity

    A Clip(0, 6) (ReLU6) is put back instead when the quantized range ends at exactly 6. Nothing is
    put back where ``x`` cannot be negative anyway (written by a Relu, Clip, Sigmoid, ..., or by a
    pooling/layout op of such a tensor) or is a graph input. A Clip with other bounds cannot be
    recognised from the QDQ model (its lower bound reads as 0, its upper bound is lost when the
    calibration never reached it). Where the zero point is not a constant or is at the start of
    the range for some channels only, nothing is put back and ``warnings`` says so.
    """
    g = Graph(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    producer = {o: n for n in nodes for o in n.output if o}
    graph_inputs = {i.name for i in out.graph.input}
    taken = {o for n in nodes for o in n.output} | graph_inputs | {t.name for t in out.graph.initializer}
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 11)
    nonneg: set[str] = set()
    refolded: dict[str, str] = {}  # QuantizeLinear output -> the re-inserted activation's output
    relus, clips, warnings = 0, 0, []
    replaced = 0
    new_nodes = []

    def fresh(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    for n in nodes:
        if n.op_type == "DequantizeLinear" and n.input and n.input[0] in producer:
            q = producer[n.input[0]]
            if q.op_type == "QuantizeLinear" and q.input and not g.is_constant(q.input[0]):
                x = q.input[0]
                src = x
                if x not in nonneg and x not in graph_inputs:
                    clamp, warning = _folded_clamp(g, q)
                    if warning:
                        warnings.append(warning)
                    if clamp is not None and q.output[0] in refolded:
                        src = refolded[q.output[0]]
                    elif clamp is not None:
                        lo, hi = clamp
                        kind = "relu" if hi is None else "clip"
                        src = fresh(f"{x}_refolded_{kind}")
                        name = f"{x}/refolded_{kind}"
                        if hi is None:
                            new_nodes.append(onnx.helper.make_node("Relu", [x], [src], name=name))
                            relus += 1
                        elif opset >= 11:
                            dtype = _scale_dtype(g, q)
                            bounds = [fresh(f"{name}_min"), fresh(f"{name}_max")]
                            for bname, v in zip(bounds, (lo, hi)):
                                out.graph.initializer.append(numpy_helper.from_array(np.array(v, dtype=dtype), bname))
                            new_nodes.append(onnx.helper.make_node("Clip", [x, *bounds], [src], name=name))
                            clips += 1
                        else:
                            new_nodes.append(onnx.helper.make_node("Clip", [x], [src], name=name, min=lo, max=hi))
                            clips += 1
                        refolded[q.output[0]] = src
                        nonneg.add(src)
                new_nodes.append(onnx.helper.make_node("Identity", [src], [n.output[0]], name=(n.name or "dq") + "_stripped"))
                if src in nonneg:
                    nonneg.add(n.output[0])
                replaced += 1
                continue
        new_nodes.append(n)
        if n.op_type in NON_NEGATIVE or (
            n.op_type in KEEPS_SIGN
            and n.input
            and all(i in nonneg for i in (n.input if n.op_type == "Concat" else n.input[:1]) if i)
        ):
            nonneg.update(o for o in n.output if o)
    read = {i for n in new_nodes for i in n.input} | {o.name for o in out.graph.output}
    kept = [n for n in new_nodes if not (n.op_type == "QuantizeLinear" and all(o not in read for o in n.output))]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    notes = []
    if relus or clips:
        what = " and ".join(
            t for t in (f"{relus} Relu" if relus else "", f"{clips} Clip(0, 6)" if clips else "") if t
        )
        notes.append(
            f"{what} put back where the quantized range starts at 0 (the quantizer folded the activation into "
            "the quantization)"
        )
    return PassResult(out, replaced, tuple(notes), tuple(dict.fromkeys(warnings)))


def _folded_clamp(g: Graph, q: onnx.NodeProto) -> tuple[tuple[float, float | None] | None, str]:
    """The clamp a QuantizeLinear does in place of a removed Relu/Clip: ``((0, None), "")`` for a
    Relu, ``((0, 6), "")`` for a ReLU6, ``(None, "")`` for none, ``(None, warning)`` when unknown."""
    ins = list(q.input)
    scale = g.const_value(ins[1]) if len(ins) > 1 and ins[1] else None
    if len(ins) > 2 and ins[2]:
        zp = g.const_value(ins[2])
        if zp is None or scale is None:
            return None, (
                f"QuantizeLinear '{q.name or q.output[0]}' has a zero point or scale computed at run time: whether "
                "it replaces a folded Relu is unknown, none was put back in the --quant-only reference"
            )
    else:
        zp = np.zeros(1, np.uint8)  # the default zero point: uint8 0
    if scale is None or zp.dtype.kind not in "iu":
        return None, ""
    info = np.iinfo(zp.dtype)
    at_start = zp.reshape(-1) == info.min
    if not at_start.any():
        return None, ""
    if not at_start.all():
        return None, (
            f"QuantizeLinear '{q.name or q.output[0]}' clamps at 0 on {int(at_start.sum())} of {at_start.size} "
            "channels only: a folded Relu there cannot be put back in the --quant-only reference"
        )
    top = float(np.max(np.asarray(scale, np.float64).reshape(-1) * (float(info.max) - float(info.min))))
    if abs(top - 6.0) <= 6.0 * 1e-5:
        return (0.0, 6.0), ""
    return (0.0, None), ""


def _scale_dtype(g: Graph, q: onnx.NodeProto) -> np.dtype:
    scale = g.const_value(q.input[1])
    return scale.dtype if scale is not None else np.dtype(np.float32)
