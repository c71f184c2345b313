"""Check ``saturation``: per quantized tensor, the share of values clipped at the integer range and of the range used."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qdiff._diagnose.context import _TYPE_NAMES, DiagnoseContext, _pct, _q_node_params, _qparams, _QParams, _run
from qdiff._diagnose.findings import THRESHOLDS, CheckOutput, Finding
from qdiff.matching import QOP_SPECS
from qdiff.ops import RELU_HOSTS, RELU_LIKE


SATURATION_COLUMNS = [
    "layer", "tensor", "node", "source", "dtype", "scale", "zero_point", "calib_min", "calib_max", "data_min",
    "data_max", "values", "clipped_low", "clipped_high", "clipped", "levels_used", "range_used",
]  # fmt: skip


@dataclass
class _SatAcc:
    """Streaming counts for one quantized tensor."""

    params: _QParams
    n: int = 0
    low: int = 0
    high: int = 0
    qlo: float = math.inf
    qhi: float = -math.inf
    xlo: float = math.inf
    xhi: float = -math.inf

    def update_float(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        finite = np.isfinite(x)
        if not finite.all():
            x = np.where(finite, x, 0.0)
        scale, zp = _broadcast(self.params, x)
        q = np.rint(x / scale) + zp
        lo, hi = self.params.qrange or (-math.inf, math.inf)
        self.n += int(x.size)
        self.low += int((q < lo).sum())
        self.high += int((q > hi).sum())
        qc = np.clip(q, lo, hi)
        if x.size:
            self.qlo, self.qhi = min(self.qlo, float(qc.min())), max(self.qhi, float(qc.max()))
            self.xlo, self.xhi = min(self.xlo, float(x.min())), max(self.xhi, float(x.max()))

    def update_int(self, q: np.ndarray) -> None:
        q = np.asarray(q, dtype=np.int64)
        lo, hi = self.params.qrange or (int(q.min()), int(q.max()))
        self.n += int(q.size)
        self.low += int((q <= lo).sum())
        self.high += int((q >= hi).sum())
        if q.size:
            self.qlo, self.qhi = min(self.qlo, float(q.min())), max(self.qhi, float(q.max()))
            scale, zp = _broadcast(self.params, q)
            x = (q - zp) * scale
            self.xlo, self.xhi = min(self.xlo, float(x.min())), max(self.xhi, float(x.max()))


def _fused_relu(ctx: DiagnoseContext, tensor: str, layer: str, source: str) -> bool:
    """Whether the layer writing ``tensor`` had a Relu/Clip fused into its output quantization.

    With FLOAT the matching says so (``conv1+relu1`` is a Conv with its Relu fused); without it,
    a tensor written by a node quantizers fuse Relu into is assumed to have one.
    """
    if ctx.matching is not None:
        ops = {p.layer: p.op_type for p in ctx.matching.pairs}
        op = ops.get(layer)
        if op is not None:
            return any(part in RELU_LIKE for part in op.split("+")[1:])
    g = ctx.qg
    idx = g.producer.get(tensor)
    if idx is None:
        return False
    return g.nodes[idx].op_type in RELU_HOSTS


def _broadcast(p: _QParams, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(p.scale, dtype=np.float64)
    zp = np.asarray(p.zero_point, dtype=np.float64)
    if scale.size > 1 and x.ndim > 0:
        shape = [1] * x.ndim
        shape[p.axis % x.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


def check_saturation(ctx: DiagnoseContext) -> CheckOutput:
    """Per quantized tensor: the share of values clipped at the integer range and of the range used.

    QDQ (and the QuantizeLinear nodes of any model): each activation QuantizeLinear's float input is
    tapped and quantized in numpy (``rint(x / scale) + zero_point``); values below ``qmin`` or
    above ``qmax`` are clipped. A side whose zero point sits at the end of the range (``zp == qmin``:
    a range starting at 0, where the quantizer emulates a fused Relu) clips by design and is not
    counted. QOperator integer outputs: values sitting at a rail (an upper bound of the clipped
    share). The range used is ``(max q - min q) / (qmax - qmin)`` of the values seen.
    """
    if ctx.kind == "dynamic":
        finding = Finding(
            "saturation", "info", "", "dynamic quantization computes each activation's range at run time; nothing clips", ""
        )
        return CheckOutput([finding], {}, {"tensors": 0})
    g = ctx.qg
    targets: list[tuple[str, str, str, _QParams, str]] = []  # (tensor tapped, layer, node, params, source)
    for idx, node in enumerate(g.nodes):
        if node.op_type == "QuantizeLinear" and node.input and not g.is_constant(node.input[0]):
            p = _q_node_params(g, node)
            if p is not None and p.qrange is not None:
                targets.append((node.input[0], ctx.layers.tensor(node.input[0]), g.node_label(idx), p, "pre-quantize"))
        spec = QOP_SPECS.get(node.op_type)
        if spec is not None and spec.out_params is not None and spec.output == "quant":
            if node.op_type == "QGemm" and (len(node.input) <= 7 or not node.input[7]):
                continue
            p = _qparams(g, node, *spec.out_params)
            if p is not None and p.qrange is not None:
                targets.append((node.output[0], ctx.layers.node(idx), g.node_label(idx), p, "integer output"))
        elif node.op_type == "QLinearConcat":
            p = _qparams(g, node, 0, 1)
            if p is not None and p.qrange is not None:
                targets.append((node.output[0], ctx.layers.node(idx), g.node_label(idx), p, "integer output"))
    if not targets:
        return CheckOutput([Finding("saturation", "info", "", "the model quantizes no activation with a static scale", "")], {}, {"tensors": 0})
    accs = [_SatAcc(t[3]) for t in targets]
    taps = [t[0] for t in targets]
    for _, (vals,) in _run(ctx, [(ctx.quant, taps)]):
        for (tensor, _l, _n, _p, source), acc in zip(targets, accs):
            arr = vals[tensor]
            if source == "integer output":
                acc.update_int(arr)
            else:
                acc.update_float(arr)
    rows = []
    t = THRESHOLDS
    findings: list[Finding] = []
    for (tensor, layer, qnode, p, source), acc in zip(targets, accs):
        lo, hi = p.qrange  # type: ignore[misc]
        zp = np.asarray(p.zero_point).reshape(-1)
        sc = np.asarray(p.scale, np.float64).reshape(-1)
        # a zero point at the bottom of the range of a layer with a fused Relu/Clip: the low side
        # clips by design (the quantizer emulates the activation there)
        count_low = not (np.all(zp == lo) and _fused_relu(ctx, tensor, layer, source))
        count_high = True
        clipped = ((acc.low if count_low else 0) + (acc.high if count_high else 0)) / acc.n if acc.n else 0.0
        used = max(0.0, (acc.qhi - acc.qlo) / (hi - lo)) if acc.n else 0.0
        calib_min = float(((lo - zp.astype(np.float64)) * sc).min())
        calib_max = float(((hi - zp.astype(np.float64)) * sc).max())
        row = {
            "layer": layer, "tensor": tensor, "node": qnode, "source": source,
            "dtype": _TYPE_NAMES.get(p.elem_type, str(p.elem_type)),
            "scale": float(sc[0]) if sc.size == 1 else float(sc.max()),
            "zero_point": int(zp[0]) if zp.size == 1 else None,
            "calib_min": calib_min, "calib_max": calib_max,
            "data_min": acc.xlo if acc.n else None, "data_max": acc.xhi if acc.n else None, "values": acc.n,
            "clipped_low": (acc.low / acc.n if acc.n else 0.0) if count_low else 0.0,
            "clipped_high": (acc.high / acc.n if acc.n else 0.0) if count_high else 0.0,
            "clipped": clipped, "levels_used": int(acc.qhi - acc.qlo + 1) if acc.n else 0, "range_used": used,
        }  # fmt: skip
        rows.append(row)
        rail = " (values at the rail: an upper bound)" if source == "integer output" else ""
        random_note = " — from random inputs, which may not reflect real ranges" if ctx.random_inputs else ""
        if clipped >= t["saturation_warning"]:
            severity = "error" if clipped >= t["saturation_error"] else "warning"
            findings.append(
                Finding(
                    "saturation",
                    severity,
                    layer,
                    f"{_pct(clipped)} of the values of '{tensor}' clip at the {row['dtype']} range{rail}: the "
                    f"quantization range is [{calib_min:.4g}, {calib_max:.4g}] but the data spans "
                    f"[{acc.xlo:.4g}, {acc.xhi:.4g}]{random_note}",
                    "Recalibrate on data that covers what the model sees in use (more, representative samples), widen "
                    "this tensor's range (TensorQuantOverrides rmin/rmax, a higher Percentile), or give it 16 bits or "
                    "keep the layer in float.",
                )
            )
        elif (
            acc.n
            and used < t["range_used_warning"]
            and (hi - lo) <= 255
            and acc.xhi > acc.xlo
        ):
            findings.append(
                Finding(
                    "saturation",
                    "warning",
                    layer,
                    f"'{tensor}' uses {row['levels_used']} of {hi - lo + 1} {row['dtype']} levels ({_pct(used)} of the "
                    f"range): the quantization range [{calib_min:.4g}, {calib_max:.4g}] is much wider than the data "
                    f"[{acc.xlo:.4g}, {acc.xhi:.4g}]{random_note}",
                    "The calibration saw outliers or other data: recalibrate on representative data, or use Percentile "
                    "or Entropy calibration so a few outliers do not set the scale.",
                )
            )
    df = pd.DataFrame(rows, columns=SATURATION_COLUMNS)
    stats = {
        "tensors": len(rows),
        "clipping": int((df["clipped"] >= t["saturation_warning"]).sum()) if len(df) else 0,
        "max_clipped": float(df["clipped"].max()) if len(df) else 0.0,
        "min_range_used": float(df["range_used"].min()) if len(df) else None,
    }
    if ctx.random_inputs:
        findings.append(
            Finding(
                "saturation",
                "info",
                "",
                f"activation ranges come from {ctx.data_info.get('samples', '?')} seeded random input(s) "
                f"(seed {ctx.seed}), which may not reflect real data",
                "Pass --data with representative inputs for clipping and range figures that mean something.",
            )
        )
    return CheckOutput(findings, {"saturation": df}, stats)
