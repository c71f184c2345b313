"""Check ``per_channel``: per-channel vs per-tensor Conv/MatMul/Gemm weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pandas as pd

from qdiff._diagnose.context import DiagnoseContext, _producer
from qdiff._diagnose.findings import CheckOutput, Finding
from qdiff.graph import Graph, attr_value
from qdiff.matching import _base_name
from qdiff.ops import COMPUTE_OPS, weight_channel_axis


PER_CHANNEL_COLUMNS = ["layer", "node", "op_type", "weight", "shape", "granularity", "axis", "channels", "after_graph_output"]


def check_per_channel(ctx: DiagnoseContext) -> CheckOutput:
    """Which Conv/MatMul/Gemm weights are per-channel and which per-tensor.

    Flags each per-tensor weight (with more than one output channel) in a model whose other
    weights are per-channel, downstream of an intermediate graph output included (a multi-output
    model's later layers are where quantizers have been seen to fall back). A model quantized
    per-tensor throughout gets an info finding.
    """
    g = ctx.qg
    rows = []
    after_output = _downstream_of_intermediate_outputs(g)
    for idx, node in enumerate(g.nodes):
        w = _weight_granularity(g, node)
        if w is None:
            continue
        name, shape, gran, axis, channels = w
        rows.append(
            {
                "layer": ctx.layers.node(idx),
                "node": g.node_label(idx),
                "op_type": node.op_type,
                "weight": name,
                "shape": "x".join(str(d) for d in shape),
                "granularity": gran,
                "axis": axis,
                "channels": channels,
                "after_graph_output": after_output.get(idx, ""),
            }
        )
    df = pd.DataFrame(rows, columns=PER_CHANNEL_COLUMNS)
    n_pc = int((df["granularity"] == "per-channel").sum()) if len(df) else 0
    per_tensor = df[(df["granularity"] == "per-tensor") & (df["channels"] > 1)] if len(df) else df
    stats = {"per_channel": n_pc, "per_tensor": int((df["granularity"] == "per-tensor").sum()) if len(df) else 0, "weights": len(df)}
    findings: list[Finding] = []
    if not len(df):
        return CheckOutput(findings, {"per_channel": df}, stats)
    if n_pc and len(per_tensor):
        for _, r in per_tensor.iterrows():
            where = f" (after the intermediate graph output '{r['after_graph_output']}')" if r["after_graph_output"] else ""
            findings.append(
                Finding(
                    "per_channel",
                    "warning",
                    r["layer"],
                    f"{r['op_type']} weight '{r['weight']}' [{r['shape']}] is per-tensor{where} while {n_pc} other "
                    f"Conv/MatMul/Gemm weight(s) are per-channel; one scale for all {r['channels']} output channels "
                    "loses the small channels",
                    "Re-quantize with per_channel=True and check this weight: it must be an initializer read by one "
                    "node only and not overridden to per-tensor (TensorQuantOverrides); some quantizers skip layers "
                    "after an intermediate graph output.",
                )
            )
    elif not n_pc and len(per_tensor):
        findings.append(
            Finding(
                "per_channel",
                "info",
                "",
                f"all {len(per_tensor)} Conv/MatMul/Gemm weights with several output channels are per-tensor",
                "Per-channel weights (quantize_static per_channel=True) usually cut weight error, most of all for Conv.",
            )
        )
    return CheckOutput(findings, {"per_channel": df}, stats)


def _weight_granularity(g: Graph, node: onnx.NodeProto) -> tuple[str, list[int], str, int | None, int] | None:
    """(weight, shape, granularity, axis, output channels) of a weighted node's quantized weight."""
    op = node.op_type
    ins = list(node.input)
    if op in COMPUTE_OPS:
        positions = [1] if op != "MatMul" else [1, 0]
        for pos in positions:
            if pos >= len(ins) or not ins[pos]:
                continue
            dq = _producer(g, ins[pos])
            if dq is None or dq.op_type != "DequantizeLinear" or not dq.input:
                continue
            src = dq.input[0]
            value = g.const_value(src)
            qsrc = _producer(g, src)
            if value is None and qsrc is not None and qsrc.op_type == "QuantizeLinear" and g.is_constant(qsrc.input[0]):
                value = g.const_value(qsrc.input[0])
                src = qsrc.input[0]
            if value is None or value.ndim < 2:
                continue
            scale = g.const_value(dq.input[1]) if len(dq.input) > 1 else None
            if scale is None:
                continue
            axis = weight_channel_axis(op, pos, value.ndim, attr_value(node, "transB", 0))
            return _gran(src, value.shape, np.asarray(scale), attr_value(dq, "axis", 1), axis)
        return None
    pos_scale = {"QLinearConv": (3, 4, 0), "QGemm": (3, 4, None), "QLinearMatMul": (3, 4, -1)}
    if op in pos_scale:
        wpos, spos, axis = pos_scale[op]
        if wpos >= len(ins) or not g.is_constant(ins[wpos]):
            return None
        value = g.const_value(ins[wpos])
        scale = g.const_value(ins[spos]) if spos < len(ins) else None
        if value is None or scale is None or value.ndim < 2:
            return None
        if axis is None:
            axis = 0 if attr_value(node, "transB", 0) else 1
        axis = axis % value.ndim
        return _gran(ins[wpos], value.shape, np.asarray(scale), axis, axis)
    if op in ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        if len(ins) < 2 or not g.is_constant(ins[1]):
            return None
        value = g.const_value(ins[1])
        if value is None or value.ndim < 2:
            return None
        axis = 0 if op == "ConvInteger" else value.ndim - 1
        scale = None
        if op == "DynamicQuantizeMatMul" and len(ins) > 2 and ins[2]:
            scale = g.const_value(ins[2])
        elif op == "MatMulIntegerToFloat" and len(ins) > 3 and ins[3]:
            scale = g.const_value(ins[3])
        if scale is None:
            scale = g.const_value(f"{_base_name(ins[1])}_scale")
        if scale is None:
            zp_pos = 3 if op in ("ConvInteger", "MatMulInteger") else None
            zp = g.const_value(ins[zp_pos]) if zp_pos is not None and zp_pos < len(ins) and ins[zp_pos] else None
            if zp is None:
                return None
            scale = np.ones(np.asarray(zp).shape)
        return _gran(ins[1], value.shape, np.asarray(scale), axis, axis)
    return None


def _gran(name: str, shape: Sequence[int], scale: np.ndarray, q_axis: int, out_axis: int) -> tuple[str, list[int], str, int | None, int]:
    channels = int(shape[out_axis % len(shape)])
    if scale.size > 1:
        return name, list(shape), "per-channel", int(q_axis), channels
    return name, list(shape), "per-tensor", None, channels


def _downstream_of_intermediate_outputs(g: Graph) -> dict[int, str]:
    """Node index -> the intermediate graph output (read by other nodes) it is downstream of."""
    out: dict[int, str] = {}
    for name in g.outputs:
        if not g.consumers.get(name):
            # a QDQ model's graph output may be a DequantizeLinear output read by nothing; look at its group
            continue
        stack = list(g.consumers[name])
        while stack:
            i = stack.pop()
            if i in out:
                continue
            out[i] = name
            for o in g.nodes[i].output:
                stack.extend(g.consumers.get(o, []) if o else [])
    return out
