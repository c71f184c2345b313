"""Check ``fp16``: an FP16 model against its float32 original (overflow, NaN/inf, flushed subnormals, error jumps)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qdiff._diagnose.context import _REDUCED_FLOAT, DiagnoseContext, _compute_nodes, _pct, _run
from qdiff._diagnose.findings import THRESHOLDS, CannotRun, CheckOutput, Finding
from qdiff.graph import Graph
from qdiff.ops import LAYOUT, TRANSPARENT
from qdiff.structs import PairKind, TensorPair


FP16_MAX = 65504.0  #: largest finite float16
FP16_MIN_NORMAL = 6.103515625e-05  #: smallest normal float16 (2**-14)
FP16_EPS = 2.0**-11  #: float16 unit roundoff, the floor of "input error" for error jumps

FP16_COLUMNS = [
    "layer", "op_type", "float_tensor", "fp16_tensor", "values", "overflow_fp32", "inf_fp16", "nan_fp16",
    "nonfinite_new", "underflow", "tiny_fp32", "max_abs_fp32", "rel_error", "input_rel_error", "jump", "block",
]  # fmt: skip


@dataclass
class _F16Acc:
    n: int = 0
    overflow: int = 0
    inf: int = 0
    nan: int = 0
    new_nonfinite: int = 0
    underflow: int = 0
    tiny: int = 0
    err2: float = 0.0
    ref2: float = 0.0
    max_abs: float = 0.0

    def update(self, f: np.ndarray | None, q: np.ndarray) -> None:
        """Add one sample: ``f`` the float32 model's tensor (None without FLOAT), ``q`` the FP16 model's.

        A ``q`` in float32 comes from a node the FP16 model computes in float32 (kept out of the
        conversion, e.g. by ``node_block_list``: Casts around it): it cannot overflow float16, so its
        float32 values beyond ±65504 are not counted as overflow.
        """
        q = np.asarray(q)
        reduced = q.dtype == np.float16 or q.dtype.name == "bfloat16"
        self.n += int(q.size)
        self.inf += int(np.isinf(q).sum())
        self.nan += int(np.isnan(q).sum())
        if f is None:
            return
        f = np.asarray(f, dtype=np.float64)
        q64 = q.astype(np.float64)
        if f.shape != q64.shape:
            if f.size != q64.size:
                return
            q64 = q64.reshape(f.shape)
        ff = np.isfinite(f)
        qf = np.isfinite(q64)
        af = np.abs(f)
        if ff.any():
            self.max_abs = max(self.max_abs, float(af[ff].max()))
        if reduced:
            self.overflow += int((ff & (af > FP16_MAX)).sum())
        self.new_nonfinite += int((ff & ~qf).sum())
        tiny = ff & (af > 0) & (af < FP16_MIN_NORMAL)
        self.tiny += int(tiny.sum())
        self.underflow += int((tiny & (q64 == 0)).sum())
        both = ff & qf
        d = np.where(both, q64 - f, 0.0)
        r = np.where(both, f, 0.0)
        self.err2 += float(np.sum(d * d))
        self.ref2 += float(np.sum(r * r))

    @property
    def rel_error(self) -> float:
        if self.ref2 > 0:
            return math.sqrt(self.err2 / self.ref2)
        return 0.0 if self.err2 == 0 else math.inf


def check_fp16(ctx: DiagnoseContext) -> CheckOutput:
    """An FP16 model against its float32 original: overflow, NaN/inf, flushed values, error jumps.

    Both models run on the same inputs, tapped at every matched tensor pair. Per layer: float32
    values beyond ±65504 (they overflow float16), inf and NaN in the FP16 model, float32 values
    with 0 < |x| < 6.1e-5 that are 0 in float16 (flushed), and the relative error
    ``‖fp16 - fp32‖ / ‖fp32‖`` against that of the layer's inputs: a layer whose error is at least
    ``fp16_jump_min_error`` and ``fp16_jump_factor`` times its inputs' jumps (Softmax, LayerNorm,
    residual Adds are the usual ones). The layers to keep in float32 (overflowing layers and the
    layers reading their values, jumps, heavy underflow) are suggested as the ``node_block_list``
    of ``onnxconverter_common.float16.convert_float_to_float16``. Without FLOAT only inf/NaN in
    the FP16 model's own activations are counted.
    """
    if ctx.fg is None or ctx.matching is None:
        return _fp16_alone(ctx)
    fg, m = ctx.fg, ctx.matching
    paired = {p.float_tensor for p in m.pairs}
    # graph outputs not already a layer's tensor, unless they are a layout copy of one (Identity ...)
    extra = [
        o for o in m.outputs
        if o.float_tensor not in paired
        and not (o.float_tensor in fg.producer and fg.nodes[fg.producer[o.float_tensor]].op_type in LAYOUT)
    ]  # fmt: skip
    pairs: list[TensorPair] = list(dict.fromkeys(list(m.pairs) + extra))
    if not pairs:
        raise CannotRun("no layer of the FP16 model could be paired with the float model")
    accs = [_F16Acc() for _ in pairs]
    for _, (fvals, qvals) in _run(ctx, [(ctx.float, [p.float_tensor for p in pairs]), (ctx.quant, [p.quant_tensor for p in pairs])]):  # type: ignore[list-item]
        for p, acc in zip(pairs, accs):
            acc.update(fvals[p.float_tensor], qvals[p.quant_tensor])
    by_tensor = {p.float_tensor: k for k, p in enumerate(pairs)}
    inputs_of = {k: _upstream_pairs(fg, p.float_tensor, by_tensor) for k, p in enumerate(pairs)}
    t = THRESHOLDS
    findings: list[Finding] = []
    block: dict[str, str] = {}  # float node -> why
    rows = []
    for k, (p, acc) in enumerate(zip(pairs, accs)):
        err = acc.rel_error
        in_err = max((accs[j].rel_error for j in inputs_of[k]), default=0.0)
        jump = err / max(in_err, FP16_EPS) if math.isfinite(err) else math.inf
        inputs_nonfinite = any(accs[j].inf + accs[j].nan > 0 for j in inputs_of[k])
        nodes = [] if p.kind is PairKind.INPUT else p.layer.split("+")
        reasons = []
        if acc.overflow:
            reasons.append("overflow")
            findings.append(
                Finding(
                    "fp16",
                    "error",
                    p.layer,
                    f"{acc.overflow} float32 value(s) of '{p.float_tensor}' exceed ±65504, the float16 range; the FP16 "
                    f"model has {acc.inf} inf and {acc.nan} NaN there",
                    "Keep this layer and the layers reading it in float32 (node_block_list below), or rescale the "
                    "computation so its values stay within ±65504.",
                )
            )
            for c in fg.consumers.get(p.float_tensor, []):
                for name in _layer_nodes_of(fg, c, ctx):
                    block.setdefault(name, f"reads values beyond ±65504 from {p.layer}")
        elif acc.new_nonfinite and not inputs_nonfinite:
            reasons.append("nonfinite")
            findings.append(
                Finding(
                    "fp16",
                    "error",
                    p.layer,
                    f"the FP16 model gives {acc.inf} inf and {acc.nan} NaN value(s) in '{p.quant_tensor}' where float32 "
                    "is finite (an intermediate overflows inside the operator)",
                    "Keep this layer in float32 (node_block_list below).",
                )
            )
        if acc.underflow and acc.n and acc.underflow / acc.n >= t["fp16_underflow_warning"]:
            reasons.append("underflow")
            findings.append(
                Finding(
                    "fp16",
                    "warning",
                    p.layer,
                    f"{acc.underflow} value(s) ({_pct(acc.underflow / acc.n)}) of '{p.float_tensor}' with "
                    f"0 < |x| < 6.1e-5 become 0 in float16 (flushed subnormals)",
                    "Keep this layer in float32, or scale its values up (e.g. fold a small multiplier into a later op).",
                )
            )
        is_jump = (
            not acc.overflow and not inputs_nonfinite and "underflow" not in reasons and math.isfinite(err)
            and err >= t["fp16_jump_min_error"] and jump >= t["fp16_jump_factor"]
        )  # fmt: skip
        if is_jump:
            reasons.append("jump")
            in_max = max((accs[j].max_abs for j in inputs_of[k]), default=0.0)
            where = f"; its inputs reach |x| = {in_max:.4g}, where float16 steps are {_fp16_step(in_max):.3g}" if in_max else ""
            findings.append(
                Finding(
                    "fp16",
                    "warning",
                    p.layer,
                    f"relative error jumps to {err:.3g} at this {p.op_type} from {in_err:.3g} at its inputs (×{jump:.0f}): "
                    f"it amplifies the float16 rounding of its inputs{where}",
                    "Keep this layer and the layers feeding it in float32 (node_block_list below); Softmax, LayerNorm and "
                    "residual Adds are the usual ones.",
                )
            )
            for j in inputs_of[k]:
                if pairs[j].kind is not PairKind.INPUT:
                    for name in pairs[j].layer.split("+"):
                        block.setdefault(name, f"feeds {p.layer}, whose error jumps")
        for name in nodes if reasons else []:
            block.setdefault(name, ", ".join(reasons))
        rows.append(
            {
                "layer": p.layer, "op_type": p.op_type, "float_tensor": p.float_tensor, "fp16_tensor": p.quant_tensor,
                "values": acc.n, "overflow_fp32": acc.overflow, "inf_fp16": acc.inf, "nan_fp16": acc.nan,
                "nonfinite_new": acc.new_nonfinite, "underflow": acc.underflow, "tiny_fp32": acc.tiny,
                "max_abs_fp32": acc.max_abs, "rel_error": err, "input_rel_error": in_err, "jump": jump, "block": False,
            }
        )  # fmt: skip
    order = {n.name: i for i, n in enumerate(fg.nodes)}
    block_list = sorted((b for b in block if b in order), key=lambda n: order[n])
    for r in rows:
        r["block"] = any(n in block_list for n in r["layer"].split("+"))
    stats = {
        "layers": len(rows),
        "overflow_layers": sum(1 for a in accs if a.overflow),
        "nonfinite_layers": sum(1 for a in accs if a.inf + a.nan),
        "max_rel_error": max((a.rel_error for a in accs), default=0.0),
        "node_block_list": block_list,
    }
    if block_list:
        findings.append(
            Finding(
                "fp16",
                "info",
                "",
                f"keep {len(block_list)} node(s) in float32: {block_list}",
                "onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True, "
                f"node_block_list={block_list})",
            )
        )
    else:
        findings.append(
            Finding(
                "fp16",
                "info",
                "",
                f"no overflow, NaN/inf, flushed values or error jump in {len(rows)} layer(s); largest relative error "
                f"{max((a.rel_error for a in accs), default=0.0):.3g}",
                "",
            )
        )
    if ctx.provider == "CPUExecutionProvider":
        findings.append(
            Finding(
                "fp16",
                "info",
                "",
                "on the CPU execution provider onnxruntime runs float16 models largely in float32 (it casts around "
                "operators without float16 kernels and merges the casts), so errors here come from float16 weights, "
                "inputs and outputs; float16 arithmetic on a GPU can show larger error jumps. Overflow (|x| > 65504 "
                "in float32) holds for any runtime",
                "Run with --provider cuda (or your deployment provider) to measure float16 arithmetic.",
            )
        )
    if ctx.random_inputs:
        findings.append(
            Finding(
                "fp16", "info", "", f"activations come from {ctx.data_info.get('samples', '?')} seeded random input(s) "
                f"(seed {ctx.seed}), which may not reflect real ranges", "Pass --data with representative inputs.",
            )
        )  # fmt: skip
    return CheckOutput(findings, {"fp16": pd.DataFrame(rows, columns=FP16_COLUMNS)}, stats)


def _fp16_step(x: float) -> float:
    """Spacing of float16 values around ``x`` (normal range)."""
    if x <= FP16_MIN_NORMAL:
        return 2.0**-24
    return 2.0 ** (math.floor(math.log2(x)) - 10)


def _layer_nodes_of(fg: Graph, idx: int, ctx: DiagnoseContext) -> list[str]:
    """Float node names of the layer a float node belongs to (itself when unpaired)."""
    name = fg.node_label(idx)
    if ctx.matching is not None:
        for p in ctx.matching.pairs:
            if name in p.layer.split("+"):
                return p.layer.split("+")
    return [name]


def _upstream_pairs(fg: Graph, tensor: str, by_tensor: dict[str, int]) -> list[int]:
    """Pairs whose float tensors feed ``tensor``'s producer (looking through unpaired nodes)."""
    idx = fg.producer.get(tensor)
    if idx is None:
        return []
    found: list[int] = []
    stack = [(i, 0) for i in fg.nodes[idx].input if i and not fg.is_constant(i)]
    seen: set[str] = set()
    while stack:
        name, depth = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in by_tensor and name != tensor:
            found.append(by_tensor[name])
            continue
        p = fg.producer.get(name)
        if p is not None and depth < 4:
            stack.extend((i, depth + 1) for i in fg.nodes[p].input if i and not fg.is_constant(i))
    return found


def _fp16_alone(ctx: DiagnoseContext) -> CheckOutput:
    """Without FLOAT: inf/NaN in the FP16 model's own activations."""
    g = ctx.qg
    targets = []
    for idx in _compute_nodes(ctx):
        for o in g.nodes[idx].output:
            if o and g.elem_type(o) in _REDUCED_FLOAT:
                targets.append((o, idx))
    findings = [
        Finding(
            "fp16",
            "info",
            "",
            "without FLOAT only inf/NaN in the FP16 model's own activations are counted",
            "Pass the float32 original as FLOAT to also find overflow against float32, flushed subnormals and "
            "layers whose error jumps.",
        )
    ]
    if not targets:
        return CheckOutput(findings, {}, {"layers": 0})
    accs = {o: _F16Acc() for o, _ in targets}
    for _, (vals,) in _run(ctx, [(ctx.quant, [o for o, _ in targets])]):
        for o, _ in targets:
            accs[o].update(None, vals[o])
    bad = {o for o, a in accs.items() if a.inf + a.nan}
    rows = []
    block: list[str] = []
    for o, idx in targets:
        a = accs[o]
        ins_bad = any(i in bad for i in g.nodes[idx].input)
        rows.append({"layer": ctx.layers.node(idx), "op_type": g.nodes[idx].op_type, "float_tensor": None, "fp16_tensor": o,
                     "values": a.n, "inf_fp16": a.inf, "nan_fp16": a.nan, "block": o in bad and not ins_bad})  # fmt: skip
        if o in bad and not ins_bad:
            name = g.node_label(idx)
            block.append(name)
            block.extend(g.node_label(c) for c in g.consumers.get(o, []) if g.nodes[c].op_type not in TRANSPARENT)
            findings.append(
                Finding(
                    "fp16",
                    "error",
                    ctx.layers.node(idx),
                    f"the FP16 model gives {a.inf} inf and {a.nan} NaN value(s) in '{o}' from finite inputs",
                    "Keep this layer and its readers in float32 (node_block_list below).",
                )
            )
    block = list(dict.fromkeys(block))
    stats = {"layers": len(rows), "nonfinite_layers": len(bad), "node_block_list": block}
    if block:
        findings.append(
            Finding(
                "fp16", "info", "", f"keep {len(block)} node(s) in float32: {block}",
                f"onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True, node_block_list={block})",
            )
        )  # fmt: skip
    return CheckOutput(findings, {"fp16": pd.DataFrame(rows, columns=FP16_COLUMNS)}, stats)
