"""``profile``: per-layer latency of a float model and its quantized twin, from onnxruntime's profiler.

A quantized model that runs slower than its float model is a common report (int8 kernels pay off
only on CPUs with fast int8 dot products, and Q/DQ or Cast nodes the runtime cannot fuse cost time
of their own). ``profile`` runs both models *untapped*, as deployed, with onnxruntime's profiling
on, and attributes every kernel's time to a float layer; the totals and the faster/slower verdict
come from separate runs of sessions without profiling (its per-node overhead can reverse the
verdict; figures in bench/RESULTS.md). Every session comes from a session factory
(:mod:`qdiff.engine.sessions`)::

    FLOAT ─┐  warmup runs (dropped) + N runs, each model alternately, same inputs
    QUANT ─┘  ─> unprofiled sessions: wall time of each run ─> medians: totals, speedup
              ─> profiled sessions: onnxruntime trace (JSON, in a temporary folder, deleted afterwards)
              ─> "Node" events named "<node>_kernel_time" (args.op_name, dur in µs), assigned to
                 the "model_run" they fall in; warmup runs dropped; per node the median over runs
              ─> node -> layer:  runtime name, normalised  ─> graph node / tensor  ─> match_models
              ─> per layer: float µs, quantized µs (of which Q/DQ/Cast), ratio, slower

onnxruntime renames what it rewrites: fused groups keep the name of one member (``conv1`` for the
QLinearConv made from DQ → Conv → Q), get a prefix (``fused fc1``) or a suffix (``conv1_token_15``,
``relu1_out_nchwc`` named after the output tensor, ``input_DequantizeLinear/duplicated``); layout
nodes it inserts (``Transpose``, ``ReorderInput``, ``ReorderOutput``) have no counterpart. Names
that cannot be placed are counted in rows of their own, so every microsecond is accounted for.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from qdiff._diagnose.context import _Layers
from qdiff._diagnose.findings import Finding
from qdiff.engine.sessions import (
    Session, SessionFactory, SessionOptions, default_session_factory, feed_for, open_session, resolve_provider,
)
from qdiff.errors import DataError, UsageError
from qdiff.graph import Graph, LoadedModel, ModelLike, load_model
from qdiff.inputs import DataLike, check_same_inputs, input_specs, make_source, parse_input_shapes
from qdiff.matching import _base_name, _Skeleton, match_models, no_weight_values
from qdiff.ops import CONVERSION, RUNTIME_LAYOUT
from qdiff.result import Result, RunInfo, _records, json_safe

__all__ = ["ProfileResult", "profile", "LAYER_COLUMNS", "parse_trace", "NodeTime"]

log = logging.getLogger(__name__)

#: ``layers`` columns
LAYER_COLUMNS = [
    "order", "layer", "kind", "op_type", "float_us", "quant_us", "conversion_us", "ratio", "slower",
    "float_nodes", "quant_nodes", "quant_ops",
]  # fmt: skip

#: conversion (Q/DQ and Cast) kernels and the layout nodes onnxruntime inserts, from qdiff.ops
CONVERSION_OPS = CONVERSION
LAYOUT_OPS = RUNTIME_LAYOUT

#: a share of the quantized kernel time in Q/DQ/Cast above which a warning is given
CONVERSION_SHARE_WARNING = 0.2

ROW_CONVERSION = "(Q/DQ/Cast, unplaced)"
ROW_LAYOUT = "(layout, inserted by onnxruntime)"
ROW_UNMATCHED = "(unmatched/runtime-fused)"


@dataclass(frozen=True)
class NodeTime:
    """One runtime node's mean kernel time per run, from a profile trace."""

    name: str  #: the runtime node name (``conv1_token_15``), ``_kernel_time`` removed
    op_type: str  #: the runtime operator (``QLinearConv``, ``NhwcMaxPool``, ``FusedGemm`` ...)
    us: float  #: median microseconds per run
    provider: str = ""
    mean_us: float = 0.0  #: mean microseconds per run


@dataclass
class ProfileResult(Result):
    """Per-layer latency of both models.

    Attributes:
        layers: one row per float layer (float topological order), then rows for time that has no
            layer (``kind`` ``runtime``): Q/DQ/Cast that could not be placed, layout nodes
            onnxruntime inserted, and runtime-fused nodes whose name matches nothing. Columns:
            :data:`LAYER_COLUMNS`; times are µs per run (median over the timed runs); ``quant_us``
            includes the layer's ``conversion_us`` (its Q/DQ/Cast kernels); ``ratio`` is
            ``quant_us / float_us``, ``slower`` is ``ratio > 1``.
        summary: totals: ``float_total_us`` / ``quant_total_us`` (median wall time of
            ``InferenceSession.run`` on sessions *without* profiling, same options, runs of both
            models alternating; ``*_mean_run_us`` the means; ``timing`` is ``"unprofiled"``), the
            profiled sessions' ``model_run`` medians as ``*_profiled_total_us`` (profiling adds
            overhead per node, enough to reverse the verdict), ``float_kernel_us`` /
            ``quant_kernel_us`` (sum of the nodes' median kernel times, which is the sum of the
            ``layers`` column), ``speedup`` (float / quantized total), ``conversion_us`` and
            ``conversion_share`` (of the quantized kernel time), ``layers_slower``.
        findings: "quantized slower than float", conversion share, weights dequantized at every
            run, slower layers (``check`` is ``"profile"``).
        nodes: the raw per-node times of both models (``model``, ``name``, ``op_type``, ``us``,
            ``layer``).
        meta: versions, models, data, runs, warmup, provider, threads, machine.
    """

    layers: pd.DataFrame
    summary: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    nodes: pd.DataFrame = field(default_factory=pd.DataFrame)
    meta: dict[str, Any] = field(default_factory=dict)

    _renderer: ClassVar[str] = "profile_renderable"
    _title: ClassVar[str] = "qdiff profile"

    def slower(self) -> pd.DataFrame:
        """The layers the quantized model runs slower than the float model, slowest first."""
        df = self.layers[(self.layers["kind"] == "layer") & self.layers["slower"].astype(bool)]
        return df.sort_values("ratio", ascending=False, kind="stable")

    def to_dict(self) -> dict[str, Any]:
        """``{"layers", "summary", "findings", "nodes", "meta"}``, JSON-safe."""
        return {
            "layers": _records(self.layers),
            "summary": json_safe(self.summary),
            "findings": [f.to_dict() for f in self.findings],
            "nodes": _records(self.nodes),
            "meta": json_safe(self.meta),
        }



# ---------------------------------------------------------------------------------------------
# Trace parsing
# ---------------------------------------------------------------------------------------------


def parse_trace(events: Sequence[Mapping[str, Any]], *, skip_runs: int = 0) -> tuple[list[NodeTime], list[float]]:
    """Per-node kernel time and per-run wall time from an onnxruntime profile trace.

    Args:
        events: the trace (a JSON list of Chrome-trace events as onnxruntime writes it).
        skip_runs: how many of the first ``model_run`` events to drop (warmup).

    Returns:
        The nodes, in order of first appearance, each with the median over the kept runs of its
        kernel time in that run (0 in a run where it did not appear) and the mean; and the kept
        runs' wall times in µs. Kernel events outside every kept run are ignored. Medians keep one
        run the machine was busy in from skewing a layer.
    """
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e.get("ts", 0)
    )
    kept = runs[skip_runs:]
    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in kept]
    per_run: dict[tuple[str, str], list[float]] = {}
    providers: dict[tuple[str, str], str] = {}
    for e in events:
        if e.get("cat") != "Node":
            continue
        name = str(e.get("name", ""))
        if not name.endswith("_kernel_time"):
            continue
        ts = float(e.get("ts", 0))
        k = next((i for i, (a, b) in enumerate(spans) if a <= ts <= b), None)
        if k is None:
            continue
        args = e.get("args") or {}
        key = (name[: -len("_kernel_time")], str(args.get("op_name", "")))
        per_run.setdefault(key, [0.0] * len(spans))[k] += float(e.get("dur", 0))
        providers.setdefault(key, str(args.get("provider", "")))
    nodes = [
        NodeTime(name, op, float(np.median(v)), providers[(name, op)], float(np.mean(v))) for (name, op), v in per_run.items()
    ]
    return nodes, [float(e.get("dur", 0)) for e in kept]


_SUFFIXES = (re.compile(r"_token_\d+$"), re.compile(r"_nchwc$"))
_PREFIXES = ("fused ", "InsertedPrecisionFreeCast_")

#: runtime operators standing for a graph operator of another name (fusions, layout variants)
_RUNTIME_OPS = {
    "FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul", "NhwcMaxPool": "MaxPool",
    "QLinearConv": "Conv", "QGemm": "Gemm", "QLinearMatMul": "MatMul", "NhwcConv": "Conv",
}  # fmt: skip


def normalise_name(name: str) -> str:
    """A runtime node name without onnxruntime's rewrite marks.

    ``fused fc1`` -> ``fc1``; ``conv1_token_15`` -> ``conv1``; ``relu1_out_nchwc`` -> ``relu1_out``
    (a tensor name); ``InsertedPrecisionFreeCast_x`` -> ``x``; ``input_DequantizeLinear/duplicated``
    and ``fc1_matmul/MatMulAddFusion`` -> the part before the first ``/``.
    """
    if "/" in name and name.split("/", 1)[0]:
        name = name.split("/", 1)[0]
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        for rx in _SUFFIXES:
            new = rx.sub("", name)
            if new != name:
                name, changed = new, True
    return name


def _find_node(g: Graph, runtime_name: str, by_name: Mapping[str, int] | None = None, op_type: str = "") -> int | None:
    """The graph node a runtime node stands for.

    By node name, then as the producer of a tensor of that name (the NCHWc transformer names
    nodes after their output), then without quantizer suffixes. When the runtime operator is not
    the found node's (``relu1_out_nchwc`` is the Conv the Relu was fused into), the nearest
    producer upstream with that operator is taken.
    """
    if by_name is None:
        by_name = {g.node_label(i): i for i in range(len(g.nodes))}
    name = normalise_name(runtime_name)
    found = None
    for candidate in (name, _base_name(name)):
        if candidate in by_name:
            found = by_name[candidate]
            break
        if candidate in g.producer:
            found = g.producer[candidate]
            break
    if found is None or not op_type:
        return found
    want = _RUNTIME_OPS.get(op_type, op_type)
    idx = found
    for _ in range(3):
        node = g.nodes[idx]
        if node.op_type == want:
            return idx
        src = next((i for i in node.input if i and not g.is_constant(i) and i in g.producer), None)
        if src is None:
            break
        idx = g.producer[src]
    return found


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def profile(
    float_model: ModelLike,
    quant_model: ModelLike,
    data: DataLike = None,
    *,
    samples: int = 8,
    warmup: int = 2,
    seed: int = 0,
    input_shapes: Mapping[str, Any] | list[str] | None = None,
    provider: str = "CPUExecutionProvider",
    threads: int = 0,
    session_factory: SessionFactory | None = None,
) -> ProfileResult:
    """Profile both models per node with onnxruntime and compare the time per float layer.

    Args:
        float_model: the float model, path or ModelProto.
        quant_model: its quantized (or FP16) twin.
        data: inputs as for :func:`qdiff.compare`; None for seeded random inputs.
        samples: timed runs per model (one per sample; the data is cycled when it holds fewer).
        warmup: untimed runs per model first (on the first sample).
        seed: seed of the random inputs.
        input_shapes: shapes of random inputs with dynamic dimensions.
        provider: onnxruntime execution provider.
        threads: intra-op threads (0: onnxruntime's default, every core).
        session_factory: builds the sessions whose runs are timed for the totals and the verdict
            (default: onnxruntime on ``provider`` with ``threads``, ``ORT_ENABLE_ALL`` and
            onnxruntime's own thread spinning and memory pattern, as deployed). The per-layer
            times need onnxruntime's profiler: those sessions always come from
            :func:`~qdiff.engine.sessions.default_session_factory` with the same options and
            profiling on.

    Returns:
        A :class:`ProfileResult`. Timings are noisy: compare figures from runs on one machine.

    Raises:
        QdiffError: models or data that cannot be read or do not fit, bad options.
    """
    started = time.perf_counter()
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    if warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {warmup}")
    if threads < 0:
        raise UsageError(f"--threads must be 0 or more, got {threads}")
    from qdiff.engine.sessions import available_cpus

    most = max(64, 4 * available_cpus())
    if threads > most:
        raise UsageError(
            f"--threads {threads} is more than {most} (4 per core of the {available_cpus()} here, at least 64); "
            "use 0 for one per core"
        )
    provider = resolve_provider(provider)
    f_loaded = load_model(float_model, role="float model")
    q_loaded = load_model(quant_model, role="quantized model")
    fg, qg = Graph(f_loaded.proto), Graph(q_loaded.proto)
    f_specs = input_specs(fg)
    check_same_inputs(f_specs, input_specs(qg), f_loaded.label, q_loaded.label)
    source = make_source(data, f_specs, samples=samples, seed=seed, input_shapes=parse_input_shapes(input_shapes))
    batches = list(source)
    if not batches:
        raise DataError(f"{source.description} produced no samples; nothing was profiled")
    runs = [batches[i % len(batches)] for i in range(samples)]
    matching = match_models(fg, qg, weigh=no_weight_values)
    tmp = tempfile.mkdtemp(prefix="qdiff-profile-")
    notes: list[str] = []
    try:
        f_factory = default_session_factory(_session_options(provider, threads, os.path.join(tmp, "float")))
        q_factory = default_session_factory(_session_options(provider, threads, os.path.join(tmp, "quant")))
        f_sess, n1 = open_session(f_factory, f_loaded.proto, f_loaded.label)
        q_sess, n2 = open_session(q_factory, q_loaded.proto, q_loaded.label)
        notes += n1 + n2
        for _ in range(warmup):
            _run(f_sess, runs[0])
            _run(q_sess, runs[0])
        for batch in runs:  # alternate, so drift in machine load hits both models alike
            _run(f_sess, batch)
            _run(q_sess, batch)
        f_trace = _read_trace(f_sess.end_profiling())  # type: ignore[attr-defined]
        q_trace = _read_trace(q_sess.end_profiling())  # type: ignore[attr-defined]
        del f_sess, q_sess  # the untimed sessions open next, not beside these
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the totals and the verdict: sessions without profiling (its overhead per node can reverse the
    # verdict), same options, alternating runs, medians
    if session_factory is None:
        session_factory = default_session_factory(_session_options(provider, threads))
    f_plain, _ = open_session(session_factory, f_loaded.proto, f_loaded.label)
    q_plain, _ = open_session(session_factory, q_loaded.proto, q_loaded.label)
    f_wall, q_wall = _time_runs(f_plain, q_plain, runs, warmup)
    del f_plain, q_plain
    f_nodes, f_runs = parse_trace(f_trace, skip_runs=warmup)
    q_nodes, q_runs = parse_trace(q_trace, skip_runs=warmup)
    layers, nodes = _attribute(fg, qg, matching, f_nodes, q_nodes)
    summary = _summary(layers, f_nodes, q_nodes, f_wall, q_wall, f_runs, q_runs)
    findings = _findings(layers, summary, qg, q_nodes)
    meta = _meta(f_loaded, q_loaded, source, provider, threads, warmup, samples, seed, notes, time.perf_counter() - started)
    return ProfileResult(layers, summary, findings, nodes, meta)


def _time_runs(f_sess: Session, q_sess: Session, runs: list[Mapping[str, np.ndarray]], warmup: int) -> tuple[list[float], list[float]]:
    """Wall µs of each run of both (unprofiled) sessions: warmup runs first, then alternating runs."""
    feeds = [(feed_for(f_sess, b), feed_for(q_sess, b)) for b in runs]
    for _ in range(warmup):
        f_sess.run(None, feeds[0][0])
        q_sess.run(None, feeds[0][1])
    f_us, q_us = [], []
    for f_feed, q_feed in feeds:  # alternate, so drift in machine load hits both models alike
        f_us.append(_timed_run(f_sess, f_feed))
        q_us.append(_timed_run(q_sess, q_feed))
    return f_us, q_us


def _timed_run(sess: Session, feed: Mapping[str, np.ndarray]) -> float:
    """Microseconds of one ``InferenceSession.run`` (the feed prepared beforehand)."""
    t0 = time.perf_counter()
    sess.run(None, feed)
    return (time.perf_counter() - t0) * 1e6


def _session_options(provider: str, threads: int, profile_prefix: str | None = None) -> SessionOptions:
    """How ``profile`` opens sessions: as deployed (onnxruntime's own spinning and memory pattern),
    every graph optimization, the profiler on when ``profile_prefix`` is given."""
    return SessionOptions(
        provider=provider, intra_op_threads=threads, graph_optimization="ORT_ENABLE_ALL", allow_spinning=True,
        mem_pattern=True, profile_prefix=profile_prefix,
    )  # fmt: skip


def _run(sess: Session, batch: Mapping[str, np.ndarray]) -> None:
    sess.run(None, feed_for(sess, batch))


def _read_trace(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        events = json.load(fh)
    return events if isinstance(events, list) else list(events.get("traceEvents", []))


def _attribute(
    fg: Graph, qg: Graph, matching: Any, f_nodes: list[NodeTime], q_nodes: list[NodeTime]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-layer rows (float topological order, then runtime rows) and the raw node table."""
    float_layer: dict[str, str] = {}
    layer_op: dict[str, str] = {}
    order: dict[str, int] = {}
    for p in matching.pairs:
        for name in p.layer.split("+"):
            float_layer.setdefault(name, p.layer)
        layer_op.setdefault(p.layer, p.op_type)
        order.setdefault(p.layer, p.order)
    f_order = {fg.node_label(i): i for i in range(len(fg.nodes))}
    qlayers = _Layers(qg, _Skeleton(qg), matching)

    acc: dict[str, dict[str, Any]] = {}

    def row(layer: str, kind: str, op: str, pos: float) -> dict[str, Any]:
        if layer not in acc:
            acc[layer] = {
                "layer": layer, "kind": kind, "op_type": op, "order": pos, "float_us": 0.0, "quant_us": 0.0,
                "conversion_us": 0.0, "float_nodes": [], "quant_nodes": [], "quant_ops": [],
            }  # fmt: skip
        return acc[layer]

    node_rows = []
    f_names = {fg.node_label(i): i for i in range(len(fg.nodes))}
    q_names = {qg.node_label(i): i for i in range(len(qg.nodes))}
    for nt in f_nodes:
        idx = _find_node(fg, nt.name, f_names, nt.op_type)
        if idx is None:
            layer = ROW_LAYOUT if nt.op_type in LAYOUT_OPS else ROW_UNMATCHED
            r = row(layer, "runtime", "", 1e9)
        else:
            name = fg.node_label(idx)
            layer = float_layer.get(name, name)
            pos = order.get(layer, f_order.get(name, idx))
            r = row(layer, "input" if layer.startswith("input:") else "layer", layer_op.get(layer, fg.nodes[idx].op_type), pos)
        r["float_us"] += nt.us
        r["float_nodes"].append(nt.name)
        node_rows.append({"model": "float", "name": nt.name, "op_type": nt.op_type, "us": nt.us, "layer": layer})
    for nt in q_nodes:
        idx = _find_node(qg, nt.name, q_names, nt.op_type)
        conversion = nt.op_type in CONVERSION_OPS
        if idx is None:
            layer = ROW_CONVERSION if conversion else (ROW_LAYOUT if nt.op_type in LAYOUT_OPS else ROW_UNMATCHED)
            r = row(layer, "runtime", "", 1e9 + (0 if conversion else 1))
        else:
            layer = qlayers.node(idx)
            if layer not in acc and layer not in order:
                # a quantized node with no float layer of that name: place it after the float layers
                pos = order.get(layer, f_order.get(layer, 1e8))
                r = row(layer, "input" if layer.startswith("input:") else "layer", layer_op.get(layer, qg.nodes[idx].op_type), pos)
            else:
                r = row(layer, "input" if layer.startswith("input:") else "layer", layer_op.get(layer, ""), order.get(layer, 1e8))
        r["quant_us"] += nt.us
        if conversion:
            r["conversion_us"] += nt.us
        r["quant_nodes"].append(nt.name)
        if nt.op_type not in r["quant_ops"]:
            r["quant_ops"].append(nt.op_type)
        node_rows.append({"model": "quant", "name": nt.name, "op_type": nt.op_type, "us": nt.us, "layer": layer})
    rows = sorted(acc.values(), key=lambda r: (r["kind"] == "runtime", r["order"], r["layer"]))
    out = []
    for r in rows:
        ratio = r["quant_us"] / r["float_us"] if r["float_us"] > 0 else None
        out.append(
            {
                "order": int(r["order"]) if r["kind"] != "runtime" and r["order"] < 1e8 else None,
                "layer": r["layer"],
                "kind": r["kind"],
                "op_type": r["op_type"],
                "float_us": round(r["float_us"], 3),
                "quant_us": round(r["quant_us"], 3),
                "conversion_us": round(r["conversion_us"], 3),
                "ratio": ratio,
                "slower": bool(r["kind"] == "layer" and ratio is not None and ratio > 1.0),
                "float_nodes": ", ".join(r["float_nodes"]),
                "quant_nodes": ", ".join(r["quant_nodes"]),
                "quant_ops": ", ".join(r["quant_ops"]),
            }
        )
    layers = pd.DataFrame(out, columns=LAYER_COLUMNS)
    layers["ratio"] = pd.to_numeric(layers["ratio"], errors="coerce").astype(float)
    layers["order"] = layers["order"].astype("Int64")
    return layers, pd.DataFrame(node_rows, columns=["model", "name", "op_type", "us", "layer"])


def _summary(
    layers: pd.DataFrame, f_nodes: list[NodeTime], q_nodes: list[NodeTime], f_wall: list[float], q_wall: list[float],
    f_runs: list[float], q_runs: list[float],
) -> dict[str, Any]:  # fmt: skip
    """Totals from the unprofiled runs (``f_wall``/``q_wall``), kernel sums from the profiled ones."""
    f_total = float(np.median(f_wall)) if f_wall else 0.0
    q_total = float(np.median(q_wall)) if q_wall else 0.0
    f_kernel = float(sum(n.us for n in f_nodes))
    q_kernel = float(sum(n.us for n in q_nodes))
    conv = float(sum(n.us for n in q_nodes if n.op_type in CONVERSION_OPS))
    real = layers[layers["kind"] == "layer"]
    return {
        "float_total_us": round(f_total, 3),
        "quant_total_us": round(q_total, 3),
        "speedup": (f_total / q_total) if q_total > 0 else None,
        "float_kernel_us": round(f_kernel, 3),
        "quant_kernel_us": round(q_kernel, 3),
        "conversion_us": round(conv, 3),
        "conversion_share": (conv / q_kernel) if q_kernel > 0 else 0.0,
        "float_mean_run_us": round(float(np.mean(f_wall)), 3) if f_wall else 0.0,
        "quant_mean_run_us": round(float(np.mean(q_wall)), 3) if q_wall else 0.0,
        "float_profiled_total_us": round(float(np.median(f_runs)), 3) if f_runs else 0.0,
        "quant_profiled_total_us": round(float(np.median(q_runs)), 3) if q_runs else 0.0,
        "timing": "unprofiled",
        "layers": int(len(real)),
        "layers_slower": int(real["slower"].sum()) if len(real) else 0,
        "runs": len(q_wall),
    }


def _findings(layers: pd.DataFrame, s: dict[str, Any], qg: Graph, q_nodes: list[NodeTime]) -> list[Finding]:
    out: list[Finding] = []
    if s["quant_total_us"] > s["float_total_us"] > 0:
        out.append(
            Finding(
                "profile",
                "warning",
                "",
                f"the quantized model is slower than the float model: {s['quant_total_us']:.0f} µs vs "
                f"{s['float_total_us']:.0f} µs per run ({s['quant_total_us'] / s['float_total_us']:.2f}×); "
                f"{s['layers_slower']} of {s['layers']} layers got slower",
                "int8 kernels pay off on CPUs with fast int8 dot products (AVX512-VNNI/AVX-VNNI, ARM dot product) and "
                "for layers large enough to amortise their overhead; look at the slower layers and the Q/DQ time "
                "below, and measure on the deployment machine.",
            )
        )
    if s["conversion_share"] >= CONVERSION_SHARE_WARNING:
        out.append(
            Finding(
                "profile",
                "warning",
                "",
                f"{100 * s['conversion_share']:.0f}% of the quantized model's kernel time ({s['conversion_us']:.0f} µs per "
                "run) goes to QuantizeLinear/DequantizeLinear/Cast",
                "Run `qdiff diagnose` for the Int8→Float→Int8 round trips behind them; quantize or fuse the float ops "
                "between quantized layers, or keep whole blocks in float.",
            )
        )
    # weights dequantized at run time: onnxruntime did not fuse the layer into an int8 kernel
    weight_dq: dict[str, float] = defaultdict(float)
    q_names = {qg.node_label(i): i for i in range(len(qg.nodes))}
    for nt in q_nodes:
        if nt.op_type != "DequantizeLinear":
            continue
        idx = _find_node(qg, nt.name, q_names)
        if idx is None:
            continue
        node = qg.nodes[idx]
        if node.input and qg.is_constant(node.input[0]):
            layer = layers[layers["quant_nodes"].str.split(", ").apply(lambda xs, n=nt.name: n in xs)]["layer"]
            weight_dq[layer.iloc[0] if len(layer) else node.name] += nt.us
    if weight_dq:
        names = sorted(weight_dq, key=lambda k: -weight_dq[k])
        out.append(
            Finding(
                "profile",
                "warning",
                names[0],
                f"{len(names)} layer(s) dequantize their weights on every run ({sum(weight_dq.values()):.0f} µs per run): "
                f"{', '.join(names)}; onnxruntime did not fuse them into int8 kernels, so they compute in float",
                "Check that the execution provider has an int8 kernel for these ops with these types (e.g. int8 vs uint8 "
                "activations, per-channel weights) and that their inputs and output all carry Q/DQ; otherwise leave "
                "them unquantized to save the dequantization.",
            )
        )
    slow = layers[(layers["kind"] == "layer") & layers["slower"].astype(bool)].sort_values("ratio", ascending=False, kind="stable")
    if len(slow):
        items = [f"{r['layer']} ({r['ratio']:.2f}×)" for _, r in slow.head(5).iterrows()]
        out.append(Finding("profile", "info", "", f"layers slower after quantization: {', '.join(items)}", ""))
    out.append(
        Finding(
            "profile",
            "info",
            "",
            f"per run: float {s['float_total_us']:.0f} µs, quantized {s['quant_total_us']:.0f} µs; Q/DQ/Cast "
            f"{s['conversion_us']:.0f} µs ({100 * s['conversion_share']:.0f}% of the quantized kernel time); "
            f"{s['runs']} timed runs",
            "",
        )
    )
    return out


def _meta(
    f: LoadedModel, q: LoadedModel, source: Any, provider: str, threads: int, warmup: int, samples: int, seed: int,
    notes: list[str], seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """RunInfo's keys, then profile's own (``samples`` is RunInfo's: the distinct samples read)."""
    return {
        **RunInfo.collect(f, q, source, seed).to_meta(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "distinct_samples": source.samples,
        "runs": samples,
        "warmup": warmup,
        "provider": provider,
        "intra_op_threads": threads,
        "graph_optimization": "ORT_ENABLE_ALL",
        "timing": "totals and speedup: median wall time of InferenceSession.run on unprofiled sessions (same "
        "options, the two models alternating); per-layer times: onnxruntime's profiler on separate sessions",
        "notes": notes,
        "seconds": round(seconds, 3),
    }
