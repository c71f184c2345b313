"""Check ``coverage``: how much of the model is quantized (nodes, weights, bytes, file sizes)."""

from __future__ import annotations

from typing import Any

import onnx
import pandas as pd

from qdiff._diagnose.context import (
    _FLOAT_TYPES, _INT_TYPES, _REDUCED_FLOAT, _TYPE_NAMES, DiagnoseContext, _compute_nodes, _fmt_bytes,
    _model_size, _node_status, _pct, _producer,
)
from qdiff._diagnose.findings import THRESHOLDS, CheckOutput, Finding
from qdiff.graph import Graph
from qdiff.matching import QOP_SPECS
from qdiff.ops import INTEGER_OPS


COVERAGE_COLUMNS = ["layer", "node", "op_type", "status", "quantized_weight_bytes", "float_weight_bytes"]
WEIGHT_COLUMNS = ["tensor", "layer", "consumer", "storage", "role", "elements", "bytes"]


def check_coverage(ctx: DiagnoseContext) -> CheckOutput:
    """How much of the model is quantized: nodes, weights, bytes, file sizes.

    Compute nodes are ``quantized`` when they run an integer kernel (QLinear*, QGemm,
    ConvInteger, MatMulInteger, ...), read integer tensors (MaxPool on uint8), or in QDQ read
    only DequantizeLinear outputs and write only into QuantizeLinear (onnxruntime fuses such a
    group into an int8 kernel); everything else is ``float``. Weights are the constants compute
    nodes read: ``int8`` & co. behind a DequantizeLinear or read by an integer op, ``float`` when
    read as is (or quantized at run time). FP16 models: ``float16`` vs ``float32``.

    Findings: error when the quantized file is not smaller than FLOAT's (a quantizer run whose
    parameters were never applied looks exactly like this) or when nothing is quantized; warning
    when most weight bytes are still float; info with the figures.
    """
    g = ctx.qg
    t = THRESHOLDS
    weights = _weight_inventory(ctx)
    wdf = pd.DataFrame(weights, columns=WEIGHT_COLUMNS)
    fp16 = ctx.kind == "fp16"
    per_node: dict[tuple[str, str], int] = (
        {(str(c), str(r)): int(b) for (c, r), b in wdf.groupby(["consumer", "role"])["bytes"].sum().items()} if len(wdf) else {}
    )
    rows = []
    for idx in _compute_nodes(ctx):
        node = g.nodes[idx]
        if fp16:
            outs = [o for o in node.output if o]
            status = "float16" if outs and all(g.elem_type(o) in _REDUCED_FLOAT for o in outs) else "float32"
        else:
            status = _node_status(ctx, idx)
        label = g.node_label(idx)
        rows.append(
            {
                "layer": ctx.layers.node(idx),
                "node": label,
                "op_type": node.op_type,
                "status": status,
                "quantized_weight_bytes": per_node.get((label, "quantized"), 0),
                "float_weight_bytes": per_node.get((label, "float"), 0),
            }
        )
    cdf = pd.DataFrame(rows, columns=COVERAGE_COLUMNS)

    low, high = ("float16", "float32") if fp16 else ("quantized", "float")
    n_low = int((cdf["status"] == low).sum()) if len(cdf) else 0
    n_nodes = len(cdf)
    qw = wdf[wdf["role"] == "quantized"] if len(wdf) else wdf
    fw = wdf[wdf["role"] == "float"] if len(wdf) else wdf
    q_bytes, f_bytes = int(qw["bytes"].sum()) if len(qw) else 0, int(fw["bytes"].sum()) if len(fw) else 0
    big_float = fw[fw["elements"] >= t["coverage_min_weight_elements"]].sort_values("bytes", ascending=False, kind="stable") if len(fw) else fw
    q_size = _model_size(ctx.quant)
    f_size = _model_size(ctx.float) if ctx.float is not None else None
    stats = {
        "compute_nodes": n_nodes,
        f"{low}_nodes": n_low,
        f"{high}_nodes": n_nodes - n_low,
        "quantized_weights": int(len(qw)),
        "float_weights": int(len(fw)),
        "quantized_weight_bytes": q_bytes,
        "float_weight_bytes": f_bytes,
        "quant_model_bytes": q_size,
        "float_model_bytes": f_size,
    }

    def largest(k: int = 5) -> str:
        items = [f"{r['tensor']} ({_fmt_bytes(r['bytes'])}, {r['layer']})" for _, r in big_float.head(k).iterrows()]
        return ", ".join(items)

    findings: list[Finding] = []
    what = "float16" if fp16 else "quantized"
    wbytes = f"weights: {_fmt_bytes(q_bytes)} {'float16' if fp16 else 'integer'}, {_fmt_bytes(f_bytes)} {'float32' if fp16 else 'float'}"
    summary = f"{n_low} of {n_nodes} compute nodes {what}; {wbytes}; file {_fmt_bytes(q_size)}"
    if f_size:
        summary += f" vs float {_fmt_bytes(f_size)} ({100 * q_size / f_size:.0f}%)"
    findings.append(Finding("coverage", "info", "", summary, ""))
    fix = (
        "The quantizer's settings were not applied: check nodes_to_exclude / op_types_to_quantize, that weights "
        "are initializers (Constant-node weights are skipped), that the output file is the one the quantizer "
        "wrote, and re-run it."
    )
    if fp16:
        fix = (
            "The float16 conversion did not take: check op_block_list / node_block_list and keep_io_types of "
            "convert_float_to_float16, and that the file is the converted one."
        )
    if f_size is not None and q_size >= f_size and q_bytes > f_bytes:
        findings.append(
            Finding(
                "coverage",
                "info",
                "",
                f"the {what} model ({_fmt_bytes(q_size)}) is not smaller than the float model ({_fmt_bytes(f_size)}) "
                f"although its weights are {what} ({_fmt_bytes(q_bytes)} vs {_fmt_bytes(f_bytes)} left in float): in a "
                "model this small the quantization nodes outweigh the saving",
                "",
            )
        )
    elif f_size is not None and q_size >= f_size:
        msg = f"the {what} model ({_fmt_bytes(q_size)}) is not smaller than the float model ({_fmt_bytes(f_size)})"
        if len(big_float):
            msg += f"; largest weights still in float: {largest()}"
        findings.append(Finding("coverage", "error", "", msg, fix))
    elif n_low == 0 and q_bytes == 0:
        msg = f"no compute node is {what} and no weight is stored {'as float16' if fp16 else 'as integers'}: this is a float model"
        findings.append(Finding("coverage", "error", "", msg, fix))
    elif f_bytes and f_bytes > t["coverage_float_share_warning"] * (f_bytes + q_bytes) and len(big_float):
        findings.append(
            Finding(
                "coverage",
                "warning",
                "",
                f"{_pct(f_bytes / (f_bytes + q_bytes))} of the weight bytes are still {'float32' if fp16 else 'float'}; "
                f"largest: {largest()}",
                "Quantize those layers too (nodes_to_exclude, op_types_to_quantize), or confirm they were left in "
                "float on purpose.",
            )
        )
    return CheckOutput(findings, {"coverage": cdf, "weights": wdf}, stats)


def _weight_inventory(ctx: DiagnoseContext) -> list[dict[str, Any]]:
    """Every constant a compute node reads, classified by how it is stored."""
    g = ctx.qg
    rows: dict[str, dict[str, Any]] = {}
    qparam_names: set[str] = set()
    for node in g.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            qparam_names.update(i for i in node.input[1:] if i)
        spec = QOP_SPECS.get(node.op_type)
        if spec is not None:
            for s, z in list(spec.in_params.values()) + ([spec.out_params] if spec.out_params else []):
                for pos in (s, z):
                    if pos < len(node.input) and node.input[pos]:
                        qparam_names.add(node.input[pos])
        if node.op_type == "QLinearConcat":
            qparam_names.update(node.input[k] for k in range(len(node.input)) if k in (0, 1) or (k >= 2 and (k - 2) % 3 != 0))

    def add(name: str, consumer_idx: int, role: str) -> None:
        if name in rows or name in qparam_names:
            return
        value = g.const_value(name)
        if value is None:
            return
        et = g.elem_type(name) or onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        rows[name] = {
            "tensor": name,
            "layer": ctx.layers.node(consumer_idx),
            "consumer": g.node_label(consumer_idx),
            "storage": _TYPE_NAMES.get(et, str(value.dtype)),
            "role": role,
            "elements": int(value.size),
            "bytes": int(value.nbytes),
        }

    fp16 = ctx.kind == "fp16"
    compute = set(_compute_nodes(ctx))
    for idx, node in enumerate(g.nodes):
        if node.op_type in ("DequantizeLinear", "QuantizeLinear") and node.input and g.is_constant(node.input[0]):
            consumer = _first_compute_consumer(g, idx, compute)
            if consumer is None:
                continue
            src = node.input[0]
            if node.op_type == "QuantizeLinear":
                add(src, consumer, "float")  # a float weight quantized at every run
            else:
                qsrc = _producer(g, src)
                if qsrc is not None and qsrc.op_type == "QuantizeLinear" and qsrc.input and g.is_constant(qsrc.input[0]):
                    add(qsrc.input[0], consumer, "float")
                else:
                    add(src, consumer, "quantized")
            continue
        if idx not in compute:
            continue
        for name in node.input:
            if not name or not g.is_constant(name) or name in qparam_names:
                continue
            p = _producer(g, name)
            if p is not None and p.op_type in ("DequantizeLinear", "QuantizeLinear"):
                continue
            et = g.elem_type(name)
            if et is None:
                v = g.const_value(name)
                et = onnx.helper.np_dtype_to_tensor_dtype(v.dtype) if v is not None else None
            if et in _FLOAT_TYPES:
                role = "quantized" if fp16 and et in _REDUCED_FLOAT else "float"
                add(name, idx, role)
            elif node.op_type in INTEGER_OPS and et in (_INT_TYPES | {onnx.TensorProto.INT32}):
                add(name, idx, "quantized")
    return list(rows.values())


def _first_compute_consumer(g: Graph, idx: int, compute: set[int]) -> int | None:
    frontier = [idx]
    seen = {idx}
    for _ in range(4):
        nxt = []
        for i in frontier:
            for o in g.nodes[i].output:
                for c in g.consumers.get(o, []) if o else []:
                    if c in compute:
                        return c
                    if c not in seen:
                        seen.add(c)
                        nxt.append(c)
        frontier = nxt
    return None
