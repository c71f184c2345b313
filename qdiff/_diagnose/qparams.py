"""Check ``qparams``: quantization parameters that must agree (pass-through ops, Q/DQ pairs, QLinear readers vs writers)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pandas as pd

from qdiff._diagnose.context import (
    DiagnoseContext, _all_qparams, _bad_scale, _is_int_activation, _producer, _q_node_params, _qparams, _QParams,
)
from qdiff._diagnose.findings import CheckOutput, Finding
from qdiff.graph import Graph
from qdiff.matching import QOP_SPECS, _base_name
from qdiff.ops import QDQ, SHARES_QPARAMS


def check_qparams(ctx: DiagnoseContext) -> CheckOutput:
    """Pass-through ops whose input and output scale/zero point differ; Q/DQ pairs that disagree.

    * QDQ: for Relu, Clip, MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Concat (every
      input) and the other :data:`SHARES_QPARAMS`, the DequantizeLinear feeding the op and the
      QuantizeLinear after it must carry the same scale and zero point; an int8 kernel passes the
      integer values through, so a runtime seeing a mismatch falls back to int8→float→int8 or
      computes wrongly (warning).
    * A DequantizeLinear reading a QuantizeLinear's output with other parameters reads every value
      back wrong (error).
    * QOperator: a QLinear op's declared input scale must be the scale its producer wrote the
      tensor with (through integer MaxPool/Reshape/...; error); QLinearConcat inputs vs output
      (warning).
    """
    g = ctx.qg
    findings: list[Finding] = []
    rows: list[dict[str, Any]] = []
    corrupt: dict[tuple[str, str], list[str]] = {}  # (tensor, scale tensor) -> readers
    for idx, node in enumerate(g.nodes):
        for tensor, scale_name, p in _all_qparams(g, idx):
            problem = _bad_scale(p.scale)
            if problem:
                readers = corrupt.setdefault((tensor, scale_name), [])
                if not readers:
                    where = ctx.layers.tensor(tensor)
                    findings.append(
                        Finding(
                            "qparams",
                            "error",
                            where,
                            f"'{tensor}' is quantized with {problem} (scale tensor '{scale_name}', read by "
                            f"{node.op_type} '{g.node_label(idx)}'): a scale must be a finite number above 0; "
                            "the other checks skip this tensor",
                            "Re-quantize: a calibration that saw a constant or empty tensor gives scale 0, non-finite "
                            "calibration data gives NaN/inf; or exclude this node from quantization.",
                        )
                    )
                readers.append(g.node_label(idx))
    for idx, node in enumerate(g.nodes):
        layer = ctx.layers.node(idx) if node.op_type not in QDQ else ""
        if node.op_type in SHARES_QPARAMS:
            data_inputs = [i for i in node.input if i] if node.op_type == "Concat" else list(node.input[:1])
            ins = []
            for name in data_inputs:
                p = _producer(g, name)
                if p is not None and p.op_type == "DequantizeLinear" and p.input and not g.is_constant(p.input[0]):
                    params = _q_node_params(g, p)
                    if params is not None:
                        ins.append((name, params))
            outs = []
            for o in node.output:
                for c in g.consumers.get(o, []) if o else []:
                    if g.nodes[c].op_type == "QuantizeLinear":
                        params = _q_node_params(g, g.nodes[c])
                        if params is not None:
                            outs.append((o, params))
            if not ins or not outs:
                continue
            bad = [(i, ip, o, op) for i, ip in ins for o, op in outs if not ip.same_as(op)]
            for i, ip, o, op in [(i, ip, o, op) for i, ip in ins for o, op in outs]:
                rows.append(_qparam_row(layer, g.node_label(idx), node.op_type, i, ip, o, op))
            if bad:
                findings.append(_pass_through_finding(g, layer, g.node_label(idx), node.op_type, bad))
        elif node.op_type == "QLinearConcat":
            n_in = (len(node.input) - 2) // 3
            out_p = _qparams(g, node, 0, 1)
            bad = []
            for k in range(n_in):
                ip = _qparams(g, node, 3 + 3 * k, 4 + 3 * k)
                if ip is None or out_p is None:
                    continue
                rows.append(_qparam_row(layer, g.node_label(idx), node.op_type, node.input[2 + 3 * k], ip, node.output[0], out_p))
                if not ip.same_as(out_p):
                    bad.append((node.input[2 + 3 * k], ip, node.output[0], out_p))
            if bad:
                findings.append(_pass_through_finding(g, layer, g.node_label(idx), "Concat", bad))
        # a reader's parameters against the writer's
        reads = _declared_reads(g, node)
        for name, declared in reads:
            writer = _writer_params(g, name)
            if writer is None:
                continue
            wnode, wparams = writer
            if not declared.same_as(wparams):
                reader_layer = ctx.layers.tensor(name) if node.op_type == "DequantizeLinear" else layer
                findings.append(
                    Finding(
                        "qparams",
                        "error",
                        reader_layer,
                        f"{node.op_type} '{g.node_label(idx)}' reads '{name}' with {declared.text()}, but "
                        f"{wnode.op_type} '{wnode.name or wnode.output[0]}' wrote it with {wparams.text()}: every value "
                        "is read back wrong",
                        "Give the reader the writer's scale and zero point (the two nodes must share one "
                        "scale/zero-point pair); re-export or re-quantize rather than editing one side.",
                    )
                )
    stats = {
        "pass_through_pairs_checked": len(rows),
        "mismatched": int(sum(1 for r in rows if not r["agree"])),
        "corrupt_scales": len(corrupt),
    }
    return CheckOutput(findings, {"qparams": pd.DataFrame(rows, columns=QPARAM_COLUMNS)}, stats)


QPARAM_COLUMNS = ["layer", "node", "op_type", "input", "input_scale", "input_zero_point", "output", "output_scale", "output_zero_point", "agree"]


def _qparam_row(layer: str, node: str, op: str, i: str, ip: _QParams, o: str, op_: _QParams) -> dict[str, Any]:
    def one(a: np.ndarray) -> Any:
        a = np.asarray(a).reshape(-1)
        return a.item() if a.size == 1 else str(a.tolist())

    return {
        "layer": layer, "node": node, "op_type": op, "input": i, "input_scale": one(ip.scale),
        "input_zero_point": one(ip.zero_point), "output": o, "output_scale": one(op_.scale),
        "output_zero_point": one(op_.zero_point), "agree": ip.same_as(op_),
    }  # fmt: skip


def _float_name(g: Graph, name: str) -> str:
    """The float tensor an integer or dequantized tensor stands for (the name quantizer overrides take)."""
    p = _producer(g, name)
    if p is not None and p.op_type == "DequantizeLinear" and p.input:
        q = _producer(g, p.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input:
            return q.input[0]
    return _base_name(name)


def _pass_through_finding(
    g: Graph, layer: str, node: str, op: str, bad: list[tuple[str, _QParams, str, _QParams]]
) -> Finding:
    i, ip, o, op_ = bad[0]
    more = f" ({len(bad) - 1} more input/output pair(s) differ)" if len(bad) > 1 else ""
    if op == "Concat":
        names = list(dict.fromkeys(_float_name(g, b[0]) for b in bad))
        overrides = ", ".join(f"'{n}': [{op_.override()}]" for n in names)
        suggestion = (
            "Give every Concat input and its output one scale and zero point, so int8 kernels concatenate without "
            "requantizing: re-quantize with quantize_static(..., extra_options={'TensorQuantOverrides': "
            f"{{{overrides}}}}}) (numpy as np)."
        )
    else:
        suggestion = (
            f"Quantize '{_float_name(g, o)}' with the input's parameters: re-quantize with quantize_static(..., "
            f"extra_options={{'TensorQuantOverrides': {{'{_float_name(g, o)}': [{ip.override()}]}}}}) (numpy as np), "
            f"or remove the extra Q/DQ pair so the {op} runs on the int8 values it is given."
        )
    return Finding(
        "qparams",
        "warning",
        layer,
        f"{op} '{node}' passes int8 values through but its input '{i}' has {ip.text()} and its output '{o}' has "
        f"{op_.text()}{more}; runtimes fall back to int8→float→int8 here or compute wrongly",
        suggestion,
    )


def _declared_reads(g: Graph, node: onnx.NodeProto) -> list[tuple[str, _QParams]]:
    """Integer activation tensors a node reads, with the parameters it reads them with."""
    out = []
    if node.op_type == "DequantizeLinear" and node.input and not g.is_constant(node.input[0]):
        p = _q_node_params(g, node)
        if p is not None:
            out.append((node.input[0], p))
        return out
    spec = QOP_SPECS.get(node.op_type)
    positions: dict[int, tuple[int, int]] = dict(spec.in_params) if spec is not None else {}
    if node.op_type == "QLinearConcat":
        n_in = (len(node.input) - 2) // 3
        positions = {2 + 3 * k: (3 + 3 * k, 4 + 3 * k) for k in range(n_in)}
    for qpos, (s, z) in positions.items():
        if qpos < len(node.input) and node.input[qpos] and not g.is_constant(node.input[qpos]):
            p = _qparams(g, node, s, z)
            if p is not None:
                out.append((node.input[qpos], p))
    return out


def _writer_params(g: Graph, name: str) -> tuple[onnx.NodeProto, _QParams] | None:
    """The node that wrote an integer tensor (through integer pass-through ops) and its parameters."""
    for _ in range(16):
        node = _producer(g, name)
        if node is None:
            return None
        if node.op_type == "QuantizeLinear":
            p = _q_node_params(g, node)
            return (node, p) if p is not None else None
        spec = QOP_SPECS.get(node.op_type)
        if spec is not None and spec.out_params is not None and node.output[0] == name:
            if node.op_type == "QGemm" and (len(node.input) <= 7 or not node.input[7]):
                return None  # float output
            p = _qparams(g, node, *spec.out_params)
            return (node, p) if p is not None else None
        if node.op_type == "QLinearConcat":
            p = _qparams(g, node, 0, 1)
            return (node, p) if p is not None else None
        if node.op_type in SHARES_QPARAMS and node.input and _is_int_activation(g, node.input[0]):
            name = node.input[0]
            continue
        return None
    return None
