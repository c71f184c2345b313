"""``diagnose``: detect the quantization failures users meet again and again, and say what to do.

Each check is a function ``(DiagnoseContext) -> CheckOutput`` (its findings, tables and figures) in
:data:`CHECKS`, one module each; :func:`diagnose` runs them and collects what they return. A finding names
the check, a severity (``error`` / ``warning`` / ``info``), the layer (the float node name where one
applies, as ``compare`` names layers), what is wrong and what to do::

    INT8.onnx [FLOAT.onnx] [--data]
        │
        ├─ static checks (graph only) ───── qparams      pass-through ops whose in/out scale or zero point differ,
        │                                                Q/DQ of one tensor that disagree
        │                                   coverage     nodes/weights quantized vs float, bytes, file sizes
        │                                   conversions  Int8→Float→Int8 round trips (DQ → float ops → Q)
        │                                   per_channel  per-tensor Conv/MatMul/Gemm weights among per-channel ones
        │
        └─ activation checks (run on --data, else seeded random inputs)
                                            fp16         FP16 model vs its float32 original: overflow, NaN/inf,
                                                         flushed subnormals, error jumps -> node_block_list
                                            saturation   per quantized tensor: fraction clipped at the integer
                                                         range, fraction of the range used

A check that cannot run (it needs FLOAT, or inputs that cannot be made) says so as an ``info``
finding; a check that does not apply to the model (saturation on an FP16 model) is recorded in
``meta["checks"]`` only. Layer names come from :func:`qdiff.match_models` when FLOAT is given,
else from the quantized node names with the quantizer's suffixes (``_quant``, ``_QuantizeLinear``,
...) removed.
"""


from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from qdiff._diagnose.context import DiagnoseContext, _Layers, _model_size, model_kind
from qdiff._diagnose.conversions import check_conversions
from qdiff._diagnose.coverage import check_coverage
from qdiff._diagnose.findings import (
    FINDING_COLUMNS, SEVERITIES, THRESHOLDS, CannotRun, Check, CheckOutput, Finding,
)
from qdiff._diagnose.fp16 import check_fp16
from qdiff._diagnose.per_channel import check_per_channel
from qdiff._diagnose.qparams import check_qparams
from qdiff._diagnose.saturation import check_saturation
from qdiff.engine.sessions import SessionFactory, SessionOptions, default_session_factory, resolve_provider
from qdiff.errors import UsageError
from qdiff.graph import Graph, ModelLike, load_model
from qdiff.inputs import DataLike, check_same_inputs, input_specs, parse_input_shapes
from qdiff.matching import _Skeleton, match_models, no_weight_values
from qdiff.result import Result, RunInfo, _records, json_safe

__all__ = [
    "Finding",
    "DiagnoseResult",
    "DiagnoseContext",
    "Check",
    "CheckOutput",
    "CannotRun",
    "CHECKS",
    "SEVERITIES",
    "THRESHOLDS",
    "diagnose",
    "model_kind",
]

@dataclass
class DiagnoseResult(Result):
    """What ``diagnose`` found.

    Attributes:
        findings: most severe first, then in check order.
        tables: per-check DataFrames (``qparams``, ``coverage``, ``weights``, ``conversions``,
            ``per_channel``, ``fp16``, ``saturation``), for the checks that ran.
        meta: versions, models, data, which checks ran (``meta["checks"]``), per-check figures
            (``meta["stats"]``) and the thresholds used.
    """

    findings: list[Finding]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    _renderer: ClassVar[str] = "diagnose_renderable"
    _title: ClassVar[str] = "qdiff diagnose"

    def findings_frame(self) -> pd.DataFrame:
        """The findings as a DataFrame with columns check, severity, layer, message, suggestion."""
        return pd.DataFrame([f.to_dict() for f in self.findings], columns=FINDING_COLUMNS)

    def table(self) -> pd.DataFrame:
        """The findings (what :meth:`to_csv` writes)."""
        return self.findings_frame()

    def by_check(self, check: str) -> list[Finding]:
        """The findings of one check."""
        return [f for f in self.findings if f.check == check]

    def counts(self) -> dict[str, int]:
        """How many findings of each severity."""
        return {s: sum(1 for f in self.findings if f.severity == s) for s in SEVERITIES}

    def worst_severity(self) -> str | None:
        """The most severe severity among the findings (None when there are none)."""
        for s in SEVERITIES:
            if any(f.severity == s for f in self.findings):
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        """``{"findings": [...], "summary": {...}, "tables": {...}, "meta": {...}}``, JSON-safe."""
        return {
            "findings": [f.to_dict() for f in self.findings],
            "summary": self.counts(),
            "tables": {name: _records(df) for name, df in self.tables.items()},
            "meta": json_safe(self.meta),
        }



# ---------------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------------

_INT8 = frozenset({"qdq", "qoperator", "dynamic"})

#: the checks, in the order they run and report
CHECKS: dict[str, Check] = {
    c.name: c
    for c in (
        Check("qparams", check_qparams, "pass-through ops whose input/output scale or zero point differ; Q/DQ pairs that disagree", frozenset({"qdq", "qoperator"})),
        Check("coverage", check_coverage, "nodes and weights quantized vs left in float, weight bytes, file sizes", _INT8 | {"fp16", "float"}),
        Check("conversions", check_conversions, "Int8↔Float transitions and DQ → float ops → Q round trips", _INT8),
        Check("per_channel", check_per_channel, "per-channel vs per-tensor weights; per-tensor ones among per-channel", _INT8),
        Check("fp16", check_fp16, "FP16 vs float32: overflow, NaN/inf, flushed subnormals, error jumps, node_block_list", frozenset({"fp16"}), activations=True),
        Check("saturation", check_saturation, "share of values clipped at the integer range and of the range used", frozenset({"qdq", "qoperator", "dynamic"}), activations=True),
    )
}  # fmt: skip


def diagnose(
    quant_model: ModelLike,
    float_model: ModelLike | None = None,
    data: DataLike = None,
    *,
    samples: int | None = 8,
    seed: int = 0,
    input_shapes: Mapping[str, Any] | list[str] | None = None,
    provider: str = "CPUExecutionProvider",
    session_factory: SessionFactory | None = None,
    checks: Sequence[str] | None = None,
) -> DiagnoseResult:
    """Run the quantization checks on a quantized (or FP16) model.

    Args:
        quant_model: the int8 model (QDQ, QOperator, dynamic) or an FP16 model, path or ModelProto.
        float_model: the float32 model it was made from (optional: layer names from the matching,
            file-size comparison, and the FP16 check's reference).
        data: inputs for the checks that run the models (as for :func:`qdiff.compare`); None
            for seeded random inputs from the input spec.
        samples: at most this many samples (None: all the data).
        seed: seed of the random inputs.
        input_shapes: shapes of random inputs with dynamic dimensions.
        provider: onnxruntime execution provider.
        session_factory: builds sessions from ModelProtos (overrides ``provider``).
        checks: names of the checks to run (default: all of :data:`CHECKS`).

    Returns:
        A :class:`DiagnoseResult`; findings most severe first.

    Raises:
        UsageError: an unknown check name, bad sample count or input shape.
        QdiffError: models or data that cannot be read or do not fit (as for ``compare``).
    """
    started = time.perf_counter()
    names = list(CHECKS) if checks is None else list(dict.fromkeys(checks))
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise UsageError(f"unknown check(s) {unknown}; the checks are {list(CHECKS)}")
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    q_loaded = load_model(quant_model, role="quantized model")
    f_loaded = load_model(float_model, role="float model") if float_model is not None else None
    qg = Graph(q_loaded.proto)
    fg = Graph(f_loaded.proto) if f_loaded is not None else None
    if fg is not None:
        check_same_inputs(input_specs(fg), input_specs(qg), f_loaded.label, q_loaded.label)  # type: ignore[union-attr]
    if session_factory is None:
        options = SessionOptions(provider=resolve_provider(provider))
        session_factory = default_session_factory(options)
        provider_name = options.provider
    else:
        provider_name = "custom session factory"
    matching = match_models(fg, qg, weigh=no_weight_values) if fg is not None else None
    skeleton = _Skeleton(qg)
    ctx = DiagnoseContext(
        quant=q_loaded, qg=qg, float=f_loaded, fg=fg, matching=matching, kind=model_kind(qg),
        layers=_Layers(qg, skeleton, matching), skeleton=skeleton, data=data, samples=samples, seed=seed,
        input_shapes=parse_input_shapes(input_shapes), session_factory=session_factory, provider=provider_name,
    )  # fmt: skip
    findings: list[Finding] = []
    tables: dict[str, pd.DataFrame] = {}
    stats: dict[str, dict[str, Any]] = {}
    status: dict[str, dict[str, str]] = {}
    for name in names:
        check = CHECKS[name]
        if ctx.kind not in check.applies:
            status[name] = {"status": "not applicable", "reason": f"{ctx.kind} model"}
            continue
        try:
            out = check.func(ctx)
        except CannotRun as exc:
            status[name] = {"status": "cannot run", "reason": str(exc)}
            findings.append(Finding(name, "info", "", f"{name} check cannot run: {exc}", ""))
            continue
        status[name] = {"status": "ran", "reason": ""}
        findings.extend(out.findings)
        tables.update(out.tables)
        if out.stats is not None:
            stats[name] = out.stats
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    findings.sort(key=lambda f: rank[f.severity])
    meta = _meta(ctx, provider_name, status, stats, time.perf_counter() - started)
    return DiagnoseResult(findings, tables, meta)


def _meta(
    ctx: DiagnoseContext, provider: str, status: dict[str, dict[str, str]], stats: dict[str, dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """RunInfo's keys (models with their sizes; the data an activation check read, else none),
    then diagnose's own."""
    meta = RunInfo.collect(ctx.float, ctx.quant, ctx.source_used, ctx.seed, model_bytes=_model_size).to_meta()
    if ctx.source_used is None:
        meta["random_inputs"] = ctx.random_inputs  # no check read data: whether it would have been random
    return {
        **meta,
        "model_kind": ctx.kind,
        "provider": provider,
        "checks": status,
        "stats": stats,
        "thresholds": dict(THRESHOLDS),
        "notes": ctx.notes,
        "seconds": round(seconds, 3),
    }
