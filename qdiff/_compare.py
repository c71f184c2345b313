"""``compare``: run a float model and its quantized twin side by side and measure every layer.

Data flow::

    load both -> Graph views -> check same inputs -> match (pairs, weights, unmatched)
      -> tap both models -> sessions (one each, built once)
      -> for each batch: run both, dequantize integer taps, fold into one accumulator per pair
      -> CompareResult (DataFrames + meta)

Nothing from a batch outlives its iteration except the accumulators, so memory does not grow with
the number of samples.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import pandas as pd
from onnx import numpy_helper

from qdiff import metrics
from qdiff.engine import kernels as _kernels, pipeline
from qdiff.ops import INTEGER_PASS, QLINEAR_OUTPUT
from qdiff.errors import QdiffError, UsageError
from qdiff.engine.fused import FusedUnavailable, build_fused
from qdiff.graph import (
    Graph,
    LoadedModel,
    ModelLike,
    attr_value,
    external_dir,
    initializer_bytes,
    layer_macs,
    load_model,
)
from qdiff.inputs import DataLike, check_same_inputs, input_specs, make_source, parse_input_shapes
from qdiff.matching import match_models, no_weight_values
from qdiff.result import (
    ALIGNMENT_COLUMNS,
    LAYER_COLUMNS,
    OUTPUT_COLUMNS,
    UNMATCHED_COLUMNS,
    WEIGHT_COLUMNS,
    Alignment,
    CompareResult,
)
from qdiff.engine.sessions import (
    available_cpus,
    SessionFactory,
    SessionOptions,
    default_session_factory,
    feed_for,
    open_session,
    open_sessions,
    resolve_provider,
    tap_model,
)
from qdiff.structs import DequantParams, Matching, TensorPair, WeightPair

__all__ = ["compare", "compare_quant_only", "match", "load_tensor_map"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, "int | None"], None]


def compare(
    float_model: ModelLike,
    quant_model: ModelLike,
    data: DataLike = None,
    *,
    samples: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    input_shapes: Mapping[str, Any] | list[str] | None = None,
    provider: str = "CPUExecutionProvider",
    session_factory: SessionFactory | None = None,
    progress: ProgressCallback | None = None,
    tensor_map: Mapping[str, str] | str | None = None,
    engine: str = "numpy",
    workers: int = 1,
    max_memory: int | None = None,
    executor: Any = None,
) -> CompareResult:
    """Compare a float model with its quantized (or FP16) version layer by layer.

    Args:
        float_model: the reference model, a path or ModelProto.
        quant_model: the quantized model (QDQ, QOperator, dynamic) or FP16 model.
        data: an .npz path, a folder of per-sample .npz/.npy files, a dict of arrays (axis 0
            indexes samples), an iterable of ``{input: array}`` dicts, or None for seeded
            random inputs.
        samples: at most this many samples (default: all the data; 8 for random inputs).
        batch_size: samples per run where the model's batch axis is dynamic.
        seed: seed of the random inputs.
        input_shapes: ``{"x": (1, 3, 224, 224)}`` or ``["x:1x3x224x224"]`` for random inputs
            with dynamic dimensions.
        provider: onnxruntime execution provider (ignored when ``session_factory`` is given).
        session_factory: builds a session from a ModelProto; inject one to run elsewhere. It is
            called from several threads at once (sessions open concurrently, some on a set-up
            thread while the graphs are matched), so it must be thread-safe.
        progress: called as ``progress(batches_done, total_or_None)`` after each batch.
        tensor_map: float tensor -> quantized tensor pairs overriding or completing the matching,
            or the path of a JSON/CSV file holding them (see :func:`load_tensor_map`).
        engine: ``fused`` reduces every tensor inside onnxruntime (both models merged into one
            graph with the metric reductions, :mod:`qdiff.engine.fused`); ``numpy`` copies the tapped
            tensors out and reduces them in numpy; ``auto`` (default) uses fused where the
            models can be merged and falls back to numpy otherwise, saying why in ``meta.notes``.
        workers: processes the samples are sharded across (each runs every k-th sample with
            its own sessions and ``cores / workers`` threads); the metric accumulators merge
            exactly, so the result equals the single-process one. Needs ``data`` as a path, a
            dict of arrays or None, and models as paths or ModelProtos.
        max_memory: bytes the tapped tensors of one sample may take; above it the taps are
            fetched in groups, one run of both models per group (numpy engine).
        executor: a :class:`concurrent.futures.Executor` to run the ``workers`` shards on instead
            of local processes, e.g. a Dask cluster's ``distributed.Client(...).get_executor()``
            (``pip install qdiff[dask]``). Shards are plain picklable payloads (models as bytes
            or paths, data as a path or arrays); paths must be readable where the shards run.

    Returns:
        A :class:`~qdiff.result.CompareResult`.

    Raises:
        QdiffError: a subclass naming what is wrong with the models, data or options.
    """
    started = time.perf_counter()
    if engine not in ("auto", "fused", "numpy"):
        raise UsageError(f"engine must be auto, fused or numpy, not '{engine}'")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if max_memory is not None and max_memory < 1:
        raise UsageError(f"--max-memory must be a positive number of bytes, got {max_memory}")
    f_loaded, q_loaded, fg, qg, f_specs, session_factory, options = load_pair(
        float_model, quant_model, provider, session_factory
    )
    source = make_source(
        data, f_specs, samples=samples, batch_size=batch_size, seed=seed, input_shapes=parse_input_shapes(input_shapes)
    )
    if isinstance(tensor_map, (str, os.PathLike)):
        tensor_map = load_tensor_map(tensor_map)
    local = workers == 1 and executor is None
    setup = _SetUp(session_factory, q_loaded, prefuse_pays(source.count, layer_macs(fg)), engine) if local else None
    # the weight table is computed as the matching finds the weights, one at a time, and before
    # the sessions load the models (a 2 GB model's float weights and their dequantized twins are
    # 4 GB of arrays)
    matching = match_models(fg, qg, tensor_map, weigh=_weight_row)
    pairs = list(matching.pairs)
    outputs = list(matching.outputs)
    weights = _weights_frame(matching.weights)

    if local:
        m = _measure(
            session_factory, f_loaded, q_loaded, fg, pairs, outputs, source, engine, progress, max_memory, qg, setup=setup
        )
    else:
        m = _measure_sharded(
            float_model, quant_model, data, tensor_map, workers, engine, options,
            dict(samples=samples, batch_size=batch_size, seed=seed, input_shapes=parse_input_shapes(input_shapes)),
            len(pairs), len(outputs), progress, max_memory, executor, source.count,
        )  # fmt: skip
        source.batches, source.samples, source.digests = m.batches, m.samples, m.digests
    if source.batches == 0:
        from qdiff.errors import DataError

        raise DataError(f"{source.description} produced no samples; nothing was compared")
    accs, out_accs, top1, shapes, broken = m.accs, m.out_accs, m.top1, m.shapes, m.broken
    notes, deployed_diff, run_seconds, engine_used = m.notes, m.deployed_diff, m.run_seconds, m.engine

    layers = _frame(pairs, accs, shapes, broken, LAYER_COLUMNS, offset=0)
    outs = _frame(outputs, out_accs, shapes, broken, OUTPUT_COLUMNS, offset=-1)
    if len(outs):
        outs["top1_agreement"] = [t.result() for t in top1]
    unmatched = pd.DataFrame([asdict(u) for u in matching.unmatched], columns=UNMATCHED_COLUMNS)
    warnings = _identity_warnings(weights, layers)
    meta = _meta(
        f_loaded, q_loaded, options, source, seed, batch_size,
        notes, deployed_diff, time.perf_counter() - started, run_seconds, matching,
    )  # fmt: skip
    meta["engine"] = engine_used
    meta["metrics_kernel"] = m.kernel
    if not _kernels.available():
        meta["metrics_kernel_reason"] = _kernels.unavailable_reason()
    meta["integer_taps"] = m.integer_taps
    meta["pipeline_workers"] = m.pipeline_workers
    meta["workers"] = m.shards
    if m.shards != workers:
        meta["workers_requested"] = workers
    meta["warnings"] = warnings
    if len(matching.skipped):
        meta["skipped"] = [asdict(u) for u in matching.skipped]
    return CompareResult(layers, outs, weights, unmatched, meta, tuple(pairs))


def match(
    float_model: ModelLike, quant_model: ModelLike, *, tensor_map: Mapping[str, str] | str | None = None
) -> Alignment:
    """Pair the two graphs without running them (what ``qdiff match`` prints).

    Args:
        float_model: the reference model, a path or ModelProto.
        quant_model: the quantized or FP16 model.
        tensor_map: overrides, as for :func:`compare`.
    """
    f_loaded = load_model(float_model, role="float model")
    q_loaded = load_model(quant_model, role="quantized model")
    if isinstance(tensor_map, (str, os.PathLike)):
        tensor_map = load_tensor_map(tensor_map)
    m = match_models(Graph(f_loaded.proto), Graph(q_loaded.proto), tensor_map, weigh=no_weight_values)
    rows = [
        {
            "order": p.order,
            "layer": p.layer,
            "op_type": p.op_type,
            "kind": p.kind.value,
            "float_tensor": p.float_tensor,
            "quant_tensor": p.quant_tensor,
            "quant_node": p.quant_node,
            "match": p.method.value,
            "confidence": p.confidence,
        }
        for p in m.pairs
    ]
    return Alignment(
        pd.DataFrame(rows, columns=ALIGNMENT_COLUMNS),
        pd.DataFrame([asdict(u) for u in m.unmatched], columns=UNMATCHED_COLUMNS),
        pd.DataFrame([asdict(u) for u in m.skipped], columns=UNMATCHED_COLUMNS),
        {
            "float_model": {"name": f_loaded.label, "sha256": f_loaded.sha256},
            "quant_model": {"name": q_loaded.label, "sha256": q_loaded.sha256},
        },
    )


def compare_quant_only(quant_model: ModelLike, data: DataLike = None, **kwargs: Any) -> CompareResult:
    """Compare a QDQ model with itself minus its activation Q/DQ pairs (no float model needed).

    The reference keeps the quantized weights, so this shows where *activation* quantization
    hurts; weight rounding is in both models and does not show. A Relu (or ReLU6) the quantizer
    folded into a quantization is put back in the reference (see
    :func:`qdiff.passes.strip_activation_qdq`; ``meta["reference"]`` says how many, and
    ``meta["warnings"]`` where that could not be done). Takes :func:`compare`'s keywords.

    Raises:
        ModelError: the model has no activation QuantizeLinear/DequantizeLinear pairs.
    """
    from qdiff.errors import ModelError
    from qdiff.passes import strip_activation_qdq

    loaded = load_model(quant_model, role="quantized model")
    stripped = strip_activation_qdq(loaded.proto)
    if stripped.modified == 0:
        raise ModelError(
            f"{loaded.label} has no QuantizeLinear/DequantizeLinear pairs on activations; --quant-only needs a QDQ model"
        )
    result = compare(stripped.model, loaded.proto, data, **kwargs)
    result.meta["reference"] = "; ".join(
        [f"{loaded.label} with {stripped.modified} activation Q/DQ pairs removed (--quant-only)", *stripped.notes]
    )
    result.meta["warnings"] = [*result.meta.get("warnings", []), *stripped.warnings]
    result.meta["float_model"] = {"name": f"{loaded.label} without activation Q/DQ", "path": None, "sha256": None}
    result.meta["quant_model"] = {"name": loaded.label, "path": str(loaded.path) if loaded.path else None, "sha256": loaded.sha256}
    return result


def load_tensor_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a float-tensor -> quantized-tensor map.

    Accepted: a JSON object ``{"float": "quant"}``; a JSON list of records, or ``{"pairs": [...]}``
    as ``qdiff match -o`` writes, with ``float_tensor`` and ``quant_tensor`` keys; a CSV with those
    two columns.

    Raises:
        UsageError: the file is missing or not in one of those forms.
    """
    from qdiff.errors import UsageError

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise UsageError(f"--map file '{p}' does not exist")
    try:
        if p.lower().endswith(".csv"):
            with open(p, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            with open(p, encoding="utf-8") as fh:
                doc = json.load(fh)
            if isinstance(doc, dict) and "pairs" in doc:
                rows = doc["pairs"]
            elif isinstance(doc, dict):
                return {str(k): str(v) for k, v in doc.items()}
            else:
                rows = doc
        mapping = {str(r["float_tensor"]): str(r["quant_tensor"]) for r in rows}
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--map file '{p}' is not a tensor map ({type(exc).__name__}: {exc}); give JSON {{\"float\": \"quant\"}} "
            "or a CSV with columns float_tensor,quant_tensor"
        ) from None
    return mapping


def _identity_warnings(weights: pd.DataFrame, layers: pd.DataFrame) -> list[str]:
    """Say so up front when the two models do not look like the same network."""
    out = []
    # plain arrays, not filtered frames (those cost ~3 ms, a tenth of compare on the digits CNN at 8 samples)
    w = np.zeros(0)
    if len(weights):
        w = weights["cosine"].to_numpy(dtype=float, na_value=np.nan)[weights["role"].to_numpy() == "weight"]
        w = w[~np.isnan(w)]
    if len(w) >= 2 and float(np.median(w)) < 0.5:
        out.append(
            f"the models do not look like the same network: the weights of {int((w < 0.5).sum())} of {len(w)} layers "
            f"do not correlate (median cosine {float(np.median(w)):.3f}); check that QUANT was made from FLOAT"
        )
    acts = layers["cosine"].to_numpy(dtype=float, na_value=np.nan)[layers["kind"].to_numpy() == "activation"]
    acts = acts[~np.isnan(acts)]
    if len(acts) >= 2 and float(acts[0]) < 0.5 and not out:
        out.append(
            f"error is large from the first layer on (cosine {float(acts[0]):.3f}); check that QUANT was made "
            "from FLOAT and that both take the same input preprocessing"
        )
    return out


@dataclass
class _Measured:
    """Everything one pass over (a shard of) the data accumulated; merges exactly."""

    accs: list
    out_accs: list
    top1: list
    shapes: dict[int, list[int]]
    broken: dict[int, str]
    notes: list[str]
    deployed_diff: float | None
    run_seconds: float
    engine: str
    batches: int = 0
    samples: int = 0
    digests: dict[int, str] | None = None
    kernel: str = "numpy"
    integer_taps: int = 0
    pipeline_workers: int = 1
    #: shards (worker processes or executor tasks) the data was measured in; set by _measure_sharded
    shards: int = 1

    def merge(self, other: _Measured) -> _Measured:
        return _Measured(
            [a.merge(b) for a, b in zip(self.accs, other.accs)],
            [a.merge(b) for a, b in zip(self.out_accs, other.out_accs)],
            [a.merge(b) for a, b in zip(self.top1, other.top1)],
            {**other.shapes, **self.shapes},
            {**other.broken, **self.broken},
            list(dict.fromkeys(self.notes + other.notes)),
            self.deployed_diff if self.deployed_diff is not None else other.deployed_diff,
            self.run_seconds + other.run_seconds,
            self.engine if self.engine == other.engine else f"{self.engine}+{other.engine}",
            self.batches + other.batches,
            self.samples + other.samples,
            {**(self.digests or {}), **(other.digests or {})},
            self.kernel if self.kernel == other.kernel else f"{self.kernel}+{other.kernel}",
            max(self.integer_taps, other.integer_taps),
            max(self.pipeline_workers, other.pipeline_workers),
        )


class _Folds:
    """What folding steps accumulates: one per worker thread, merged exactly at the end."""

    def __init__(self, n_pairs: int, n_outputs: int, compiled: bool, kernel_threads: int | None = None):
        self.accs = [metrics.TensorAccumulator() for _ in range(n_pairs)]
        self.out_accs = [metrics.TensorAccumulator() for _ in range(n_outputs)]
        self.top1 = [metrics.Top1Accumulator() for _ in range(n_outputs)]
        self.shapes: dict[int, list[int]] = {}
        self.broken: dict[int, str] = {}
        self.folder = RowFolder(compiled, threads=kernel_threads)

    def take(self, key: int, value: Any) -> None:
        if isinstance(value, list):  # runs of different sizes in one group: one at a time
            for v in value:
                if key not in self.broken:
                    self.take(key, v)
            return
        if isinstance(value, str):
            self.broken[key] = value
            return
        acc = self.accs[key] if key >= 0 else self.out_accs[-1 - key]
        if isinstance(value, _Computed):
            if value.shape is not None:
                self.shapes[key] = value.shape
            acc.add(value.metrics)
            return
        shape, refs, cands, dq = value
        if shape is not None:
            self.shapes[key] = shape
        self.folder.add(key, acc, refs, cands, dq)

    def fold(self, step: _Step) -> None:
        for key, value in step.results.items():
            if key not in self.broken:
                self.take(key, value)
        self.folder.run()
        for k, (rows, agree) in step.top1.items():
            self.top1[k].rows += rows
            self.top1[k].agree += agree

    def merge(self, other: _Folds) -> _Folds:
        self.folder.flush()
        other.folder.flush()
        out = _Folds(0, 0, self.folder.compiled)
        out.accs = [a.merge(b) for a, b in zip(self.accs, other.accs)]
        out.out_accs = [a.merge(b) for a, b in zip(self.out_accs, other.out_accs)]
        out.top1 = [a.merge(b) for a, b in zip(self.top1, other.top1)]
        out.shapes = {**other.shapes, **self.shapes}
        out.broken = {**other.broken, **self.broken}
        return out


def _measure(
    factory, f_loaded, q_loaded, fg, pairs, outputs, source, engine, progress, max_memory=None, qg=None, cpus=None,
    setup: _SetUp | None = None,
) -> _Measured:
    """One pass over ``source``: run both models per group of runs, fold every pair into its accumulator.

    The first group runs alone (it settles batching, the fused-graph taps and the deployed-model
    check); the others go to :func:`qdiff.engine.pipeline.run_groups` workers, each folding into its own
    :class:`_Folds` (one worker for the fused engine, whose runs reduce inside onnxruntime).
    ``setup``: the deployed-model session and onnxruntime's fused graph, prepared while the
    caller matched the graphs (None: made here when needed).
    """
    notes: list[str] = []
    engine_used = "numpy"
    eng: _Engine | None = None
    if engine != "numpy":
        try:
            eng = _FusedEngine(factory, f_loaded, q_loaded, fg, pairs, outputs)
            notes += eng.notes
            engine_used = "fused"
        except (FusedUnavailable, QdiffError) as exc:
            if engine == "fused":
                raise UsageError(f"the fused engine cannot run these models: {exc}") from None
            notes.append(f"fused engine unavailable ({exc}); numpy engine used")
    compiled = _kernels.available()
    if eng is None:
        if setup is not None:
            prefuse = setup.prefuse
        else:
            prefuse = prefuse_pays(source.count, layer_macs(fg) if fg is not None else None)
        eng = _NumpyEngine(
            factory, f_loaded, q_loaded, pairs, outputs, max_memory, fg, compiled, qg, prefuse=prefuse,
            optimized=setup.optimized if setup is not None else None, total=source.count,
        )  # fmt: skip
        notes += eng.notes
    first_fold = _Folds(len(pairs), len(outputs), compiled)
    deployed_diff: float | None = None
    later: tuple | None = None  # the deployed-model check's inputs, where it runs after the others
    run_seconds = 0.0
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, source.count)

    def run_first(group: list) -> None:
        nonlocal eng, engine_used, run_seconds, deployed_diff, later
        t0 = time.perf_counter()
        steps, eng, engine_used = _run_group(
            eng, group, True, notes, engine_used, factory, f_loaded, q_loaded, pairs, outputs, compiled
        )
        qouts: list = [None] * len(outputs)
        feed0 = None
        for step in steps:  # an iterator with --max-memory groups: fetched as they are folded
            run_seconds += time.perf_counter() - t0
            feed0 = step.feed if feed0 is None else feed0
            for k, v in enumerate(step.quant_outputs or []):
                qouts[k] = v if v is not None else qouts[k]
            first_fold.fold(step)
            t0 = time.perf_counter()
        if outputs and all(v is not None for v in qouts):
            batched = getattr(eng, "batched", False)
            if setup is not None and setup.deployed is not None:
                deployed_diff = _deployed_diff(factory, batched, q_loaded, outputs, qouts, feed0, len(group), setup.deployed)
            else:  # big models: the deployed session opens once the tapped ones are closed (peak memory)
                later = (qouts, feed0, len(group), batched)
        report(len(group))

    def run_next(group: list, fold: _Folds) -> None:
        nonlocal eng, engine_used, run_seconds
        t0 = time.perf_counter()
        if parallel:
            steps = eng.run_group(group, False)
        else:  # the fused engine may fall back to numpy
            steps, eng, engine_used = _run_group(
                eng, group, False, notes, engine_used, factory, f_loaded, q_loaded, pairs, outputs, compiled
            )
        for step in steps:
            run_seconds += time.perf_counter() - t0  # summed over the workers
            fold.fold(step)
            t0 = time.perf_counter()

    # runs are grouped by global index (run i in group i // K), so shards hold whole groups and
    # every group is computed the same way however the runs were sharded
    source.group = eng.runs_per_group
    batches = iter(source)
    group = [b for _, b in zip(range(eng.runs_per_group), batches)]
    folds = [first_fold]
    parallel = False
    if group:
        run_first(group)
        n_workers = pipeline.workers(cpus, weight_bytes(f_loaded, q_loaded))
        parallel = isinstance(eng, _NumpyEngine) and n_workers > 1
        if parallel:
            folds += [_Folds(len(pairs), len(outputs), compiled, kernel_threads=1) for _ in range(n_workers - 1)]
            first_fold.folder.threads = 1
        pipeline.release_free_memory()
        pipeline.run_groups(_groups_of(batches, eng.runs_per_group), run_next, folds, report)
        pipeline.for_each(folds, lambda fold: fold.folder.flush())
    merged = folds[0]
    for other in folds[1:]:
        merged = merged.merge(other)
    merged.folder.flush()
    notes += [n for n in eng.notes if n not in notes]
    integer_taps = sum(1 for k, t in getattr(eng, "tap_pairs", {}).items() if k >= 0 and t is not pairs[k])
    if later is not None:
        eng = None  # its sessions go first
        qouts, feed0, runs, batched = later
        deployed_diff = _deployed_diff(factory, batched, q_loaded, outputs, qouts, feed0, runs)
    return _Measured(
        merged.accs, merged.out_accs, merged.top1, merged.shapes, merged.broken, notes, deployed_diff, run_seconds,
        engine_used, source.batches, source.samples, dict(source.digests),
        "c" if compiled and engine_used != "fused" else "numpy",
        integer_taps,
        len(folds),
    )  # fmt: skip


class _SetUp:
    """What compare needs from the quantized model whatever the matching finds, prepared on a
    background thread while the caller matches the graphs and builds the weight table (the
    onnxruntime work releases the GIL, so on two cores it costs no wall time): onnxruntime's fused
    graph (:func:`optimized_model`, when ``prefuse`` — :func:`prefuse_pays`' answer, kept for the
    engine — and the numpy engine) and the untapped session of the deployed-model check. Not for models above :data:`_PREFUSE_MAX_BYTES` or with weights on disk: the futures are
    None then, and the deployed-model check opens its session after the tapped sessions close (a
    third session of a big model while the tapped two are open was 1.5 GB more peak)."""

    def __init__(self, factory, q_loaded, prefuse: bool, engine: str):
        self.prefuse = prefuse
        self.optimized: Future | None = None
        self.deployed: Future | None = None
        proto = q_loaded.proto
        if external_dir(proto) is not None or initializer_bytes(proto) > _PREFUSE_MAX_BYTES:
            return
        if prefuse and engine == "numpy":  # the engine waits for it before the first group
            self.optimized = pipeline.in_background(optimized_model, proto)
        self.deployed = pipeline.in_background(open_session, factory, proto, q_loaded.label)


def _groups_of(items: Iterable, size: int) -> Iterable[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    group: list = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _run_group(eng, group, first, notes, engine_used, factory, f_loaded, q_loaded, pairs, outputs, compiled):
    """Run one group of runs; the fused engine falls back to numpy on a run failure."""
    try:
        return eng.run_group(group, first), eng, engine_used
    except Exception as exc:  # noqa: BLE001 - any run failure of the fused graph: go on with numpy
        if not isinstance(eng, _FusedEngine):
            raise
        notes.append(f"fused engine failed ({str(exc).splitlines()[0][:200]}); numpy engine used")
        log.warning(notes[-1])
        eng = _NumpyEngine(factory, f_loaded, q_loaded, pairs, outputs, compiled=compiled)
        return eng.run_group(group, True), eng, ("numpy" if first else "fused+numpy")


def _deployed_diff(factory, batched: bool, q_loaded, outputs, quant_outputs, feed, runs: int, deployed=None) -> float:
    """Is the tapped quantized model still what the deployed one computes? (max |difference| of the outputs)

    Checked on the first run of the first group (``runs`` runs were batched into ``feed``), against
    the quantized model as given, untapped (``deployed``: a future of its session, else opened here).
    """
    if deployed is not None:
        deployed_sess, _ = deployed.result()
    else:
        deployed_sess, _ = open_session(factory, q_loaded.proto, q_loaded.label)
    names = [o.quant_tensor for o in outputs]
    tapped = list(quant_outputs)
    if runs > 1 and batched:
        feed = {k: v[: v.shape[0] // runs] for k, v in feed.items()}
        tapped = [t[: t.shape[0] // runs] if np.ndim(t) else t for t in tapped]
    deployed = deployed_sess.run(names, feed_for(deployed_sess, feed))
    return max(_finite_max_diff(_real(d, o), _real(tapped[k], o)) for k, (d, o) in enumerate(zip(deployed, outputs)))


def _reduce_rows(acc: metrics.TensorAccumulator, refs: np.ndarray, cands: np.ndarray, dq) -> None:
    """Fold the samples of one pair (one per row of ``refs``/``cands``) into ``acc`` with numpy
    (where the compiled kernels are unavailable)."""
    if dq is not None:
        cands = dq.dequantize(cands)
    if refs.shape[1] > _ROWS_MAX_ELEMENTS:
        for r, c in zip(refs, cands):
            acc.add(metrics.sample_metrics(r, c))
    else:
        for m in metrics.sample_metrics_rows(refs, cands):
            acc.add(m)


def _fold_rows(acc: metrics.TensorAccumulator, rows: _kernels.Rows, n: int) -> None:
    """Fold the kernels' ``(values, slow_rows, slow_metrics)`` of one stack into ``acc``."""
    values, slow_rows, slow = rows
    if slow_rows:
        keep = np.ones(len(values), dtype=bool)
        keep[slow_rows] = False
        values = values[keep]
        for m in slow:
            acc.add(m)
    acc.add_values(values, n)


def _portable(model: ModelLike) -> Any:
    """A model argument that pickles cheaply to a worker process."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return os.fspath(model)


def _shard_worker(payload: tuple) -> _Measured:
    """Run one shard in a worker process (module-level so it pickles)."""
    f_model, q_model, data, tensor_map, shard, engine, provider, cpus, source_kwargs, max_memory = payload
    cpus = cpus or None  # 0: every core of the machine the shard runs on
    if isinstance(f_model, bytes):
        f_model = onnx.load_from_string(f_model)
    if isinstance(q_model, bytes):
        q_model = onnx.load_from_string(q_model)
    f_loaded = load_model(f_model, role="float model")
    q_loaded = load_model(q_model, role="quantized model")
    fg, qg = Graph(f_loaded.proto), Graph(q_loaded.proto)
    matching = match_models(fg, qg, tensor_map, weigh=no_weight_values)  # weight values: not needed here
    threads = pipeline.session_threads(cpus, weight_bytes(f_loaded, q_loaded))
    factory = default_session_factory(SessionOptions(provider=provider, intra_op_threads=threads))
    source = make_source(data, input_specs(fg), shard=shard, **source_kwargs)
    return _measure(
        factory, f_loaded, q_loaded, fg, list(matching.pairs), list(matching.outputs), source, engine, None, max_memory,
        qg, cpus,
    )  # fmt: skip


def _measure_sharded(
    float_model, quant_model, data, tensor_map, workers, engine, options, source_kwargs, n_pairs, n_outputs, progress,
    max_memory=None, executor=None, total_runs: int | None = None,
) -> _Measured:
    """Shard the samples across ``workers`` processes (or ``executor``) and merge their accumulators.

    Local processes are capped by :func:`_local_workers` (cores, groups of runs). They ignore
    SIGINT (the parent handles Ctrl-C and stops them) and exit when the parent dies
    (:func:`_worker_init`).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if options.provider == "custom session factory":
        raise UsageError("--workers cannot be combined with a custom session factory")
    if data is not None and not isinstance(data, (str, os.PathLike, Mapping)):
        raise UsageError("--workers needs data as a file, a folder or a dict of arrays (an iterator cannot be shared)")
    if executor is not None and not callable(getattr(executor, "map", None)):
        raise UsageError(f"executor must be a concurrent.futures.Executor, not {type(executor).__name__}")
    capped = ""
    if executor is None:
        requested = workers
        workers, capped = _local_workers(workers, total_runs)
        if capped:
            log.info("--workers %d: running %d worker processes (%s)", requested, workers, capped)
    # local processes share this machine's cores; an executor's workers use their own machines'
    cpus = max(1, available_cpus() // workers) if executor is None else 0
    payloads = [
        (
            _portable(float_model), _portable(quant_model), data, tensor_map, (k, workers), engine, options.provider,
            cpus, source_kwargs, max_memory,
        )
        for k in range(workers)
    ]
    merged: _Measured | None = None

    def collect(parts) -> None:
        nonlocal merged
        for done, part in enumerate(parts, 1):
            merged = part if merged is None else merged.merge(part)
            if progress is not None:
                progress(done, workers)

    if executor is None:
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
        )
        try:
            with _sigint_ignored():  # the workers spawned here start with SIGINT ignored
                parts = pool.map(_shard_worker, payloads)
            collect(parts)
        except BaseException:  # Ctrl-C or a failed shard: stop the others now rather than wait for them
            _stop_workers(pool)
            raise
        pool.shutdown(wait=True)
        where = f"{workers} worker processes ({cpus} core(s) each)"
        if capped:
            where += f"; --workers {requested} capped: {capped}"
    else:
        try:
            collect(executor.map(_shard_worker, payloads))
        except QdiffError:
            raise
        except Exception as exc:  # noqa: BLE001 - cluster failures come in many types
            raise UsageError(f"a shard failed on the executor: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        where = f"{workers} shard(s) on {type(executor).__name__}"
    assert merged is not None
    merged.notes.append(f"samples sharded across {where}")
    merged.shards = workers
    return merged


def _local_workers(requested: int, total_runs: int | None) -> tuple[int, str]:
    """How many local worker processes to start for ``--workers requested``, and why fewer ('' if not).

    At most one per available core (more only share the cores and each loads both models), and at
    most the fewest groups of runs the data can make (a shard takes whole groups: with
    ``total_runs`` known, :class:`Batcher` groups at most ``ceil(total / _MIN_GROUPS)`` runs, up to
    ``_GROUP_MAX_RUNS``), so that no process starts without a group to run.
    """
    cores = available_cpus()
    n, why = requested, []
    if n > cores:
        n = cores
        why.append(f"{cores} core(s) available")
    if total_runs:
        per_group = max(1, min(_GROUP_MAX_RUNS, -(-total_runs // _MIN_GROUPS)))
        groups = -(-total_runs // per_group)
        if n > groups:
            n = groups
            why.append(f"the {total_runs} run(s) make as few as {groups} group(s)")
    return max(1, n), ", ".join(why)


class _sigint_ignored:
    """Ignore SIGINT while worker processes are spawned (from the main thread; a no-op elsewhere).

    Python installs its KeyboardInterrupt handler only where SIGINT is not ignored at start-up, so
    a worker spawned meanwhile ignores Ctrl-C from its first instruction (no traceback from a
    worker still importing); :func:`_worker_init` ignores it again for other start methods.
    """

    def __enter__(self) -> None:
        import signal
        import threading

        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def _worker_init(parent: int) -> None:
    """Set up a local worker process: ignore SIGINT, and exit when the parent process dies.

    On Linux the kernel kills the worker when its parent dies (``prctl(PR_SET_PDEATHSIG,
    SIGKILL)``); everywhere a daemon thread also polls ``os.getppid()`` and exits when the parent
    is gone (a killed parent cannot shut its pool down: its workers would run to the end).
    """
    import signal
    import sys
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="qdiff-parent-watch", daemon=True).start()


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(1)


def _stop_workers(pool: Any) -> None:
    """Cancel what has not started and end a process pool's workers now (they hold no state worth keeping)."""
    pool.shutdown(wait=False, cancel_futures=True)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)


@dataclass
class _Computed:
    """A pair's metrics for one run, already reduced (the fused engine)."""

    metrics: metrics.SampleMetrics
    shape: list[int] | None


@dataclass
class _Step:
    """What one group of runs gave.

    ``results``: per key (pair index, or -1-k for output k) either a reason the pair is broken, or
    ``(per-run shape, refs [runs, n], cands [runs, n], per-tensor DequantParams or None)``, one row
    per run. ``feed``: what the quantized model was fed (for the deployed-model check).
    """

    results: dict[int, Any]
    top1: dict[int, tuple[int, int]]
    quant_outputs: list[np.ndarray] | None
    feed: Mapping[str, np.ndarray] | None = None


class _Engine:
    notes: list[str]
    runs_per_group: int = 1

    def run_group(self, group: list[Mapping[str, np.ndarray]], first: bool) -> list[_Step]:  # pragma: no cover
        """The steps of one group of runs, to be folded in order."""
        raise NotImplementedError


#: the tapped tensors of one group of runs stay within this many bytes (static estimate); groups
#: are what onnxruntime runs at once when the models' batch axis allows it, and each pipeline
#: worker holds one. Measured on the 50-conv CNN (512 samples, 2 workers): 3/6/9/12/18 MiB
#: groups took 5.5/4.3/3.4/3.0/2.9 s with peaks of 172/179/193/199/225 MB (per-group overhead
#: against memory)
_GROUP_BYTES = 12 << 20
_GROUP_MAX_RUNS = 64
#: a data set of known size is cut into at least this many groups (where runs allow): on the
#: 2-core VM, 64 runs of the transformer block in one group ran on one worker alone
_MIN_GROUPS = 8
#: runs of the first group that are also run alone to check that batching changes nothing
_CHECKED_RUNS = 2
_BATCH_DIM = "qdiff_runs"


class Batcher:
    """Runs tapped models on groups of runs, as one batch per group where that changes nothing.

    Runs are concatenated along axis 0 and run at once (``runs_per_group`` of them: as many as fit
    ``_GROUP_BYTES`` of taps, or ``max_memory``) when every model input has a leading axis, which
    is made symbolic. The first group is also run one run at a time for its first
    ``_CHECKED_RUNS`` runs; batching is kept only if every tapped tensor agrees (per-run shapes,
    values to 1e-3 relative L2). Otherwise the sessions are rebuilt on the original models and
    runs go one at a time (``notes`` says why). With ``total`` runs known, groups are also small
    enough that there are :data:`_MIN_GROUPS` of them, so that the pipeline's workers share a
    small data set (``total`` is the whole data set's run count, the same in every shard, so every
    shard groups the runs alike).
    """

    def __init__(
        self, factory, models: list[tuple[onnx.ModelProto, list[str], str]], per_run_bytes: int | None,
        max_memory: int | None = None, allow: bool = True, total: int | None = None,
        steps: list[dict[str, float]] | None = None,
    ):  # fmt: skip
        self.factory, self.models = factory, models
        # per model, the quantization step of tapped float tensors that are DequantizeLinear outputs:
        # the batching check lets them move by one step (see _runs_differ)
        self.steps = steps
        self.notes: list[str] = []
        budget = _GROUP_BYTES if max_memory is None else max_memory
        runs = 1
        if allow and per_run_bytes is not None:
            runs = int(max(1, min(_GROUP_MAX_RUNS, budget // max(1, per_run_bytes))))
            if total:
                runs = min(runs, max(1, -(-total // _MIN_GROUPS)))
        self.batched = runs > 1 and all(_batch_axis_ok(m) for m, _, _ in models)
        self.runs_per_group = runs if self.batched else 1
        self._open()

    def close(self) -> None:
        """Drop the sessions (before others are opened: a 2 GB model's were held twice)."""
        self.sessions = []

    def _open(self) -> None:
        self.close()  # the old sessions go before the new ones open
        items = [
            (tap_model(_with_batch_axis(proto) if self.batched else proto, taps), label) for proto, taps, label in self.models
        ]
        opened = open_sessions(self.factory, items)
        self.sessions = [sess for sess, _ in opened]
        for _, notes in opened:
            self.notes += [n for n in notes if n not in self.notes]

    def fetch(self, batch: Mapping[str, np.ndarray], names: list[list[str]]) -> list[dict[str, np.ndarray]]:
        """The named tensors of each model for one (possibly batched) run."""
        return [dict(zip(ns, sess.run(ns, feed_for(sess, batch)))) for sess, ns in zip(self.sessions, names)]

    def parts(self, group: list, first: bool, names: list[list[str]]) -> list[tuple[list[dict], int, Mapping]]:
        """``(values per model, runs covered, feed)`` for a group: one batched part or one part per run."""
        feed = _concat_runs(group) if self.batched else None
        if feed is None:
            return [(self.fetch(b, names), 1, b) for b in group]
        if not first:
            return [(self.fetch(feed, names), len(group), feed)]
        # first group: an operator that mixes samples, a fixed batch of 1 or dynamic
        # quantization shows in its first runs
        why = None
        try:
            batched = self.fetch(feed, names)
        except Exception as exc:  # noqa: BLE001 - e.g. a Reshape to a fixed batch of 1
            batched, why = None, f"a batched run failed ({str(exc).splitlines()[0][:160]})"
        if batched is not None:
            singles = [self.fetch(b, names) for b in group[: min(len(group), _CHECKED_RUNS)]]
            why = _batch_mismatch(batched, singles, len(group), self.steps)
        if why is None:
            self.notes.append(
                f"runs batched {self.runs_per_group} at a time (the models' leading axis is a batch axis; "
                "checked on the first runs against single runs)"
            )
            return [(batched, len(group), feed)]
        self.notes.append(f"runs not batched: {why}")
        log.info("qdiff: %s", self.notes[-1])
        self.batched, self.runs_per_group = False, 1
        self._open()
        return [(self.fetch(b, names), 1, b) for b in group]


class _NumpyEngine(_Engine):
    """Both models tapped; every pair's tensors copied out and reduced by the kernels or numpy.

    * The quantized side reads a DequantizeLinear's integer input (the QuantizeLinear output)
      where that is all the DequantizeLinear needs, and dequantizes it itself: a quarter of the
      bytes to copy, and QLinearAdd/QLinearMul fusions survive (a DQ -> Conv -> Q group whose
      input DQ reads a tapped tensor is not fused by onnxruntime either way).
    * Groups of runs go through a :class:`Batcher`.
    * With a memory budget the pairs are split into groups whose tapped tensors fit it, and each
      group is fetched by its own run of the two sessions (more runs, bounded memory).
    """

    def __init__(
        self, factory, f_loaded, q_loaded, pairs, outputs, max_memory: int | None = None, fg: Graph | None = None,
        compiled: bool = False, qg: Graph | None = None, prefuse: bool = True, optimized: Future | None = None,
        total: int | None = None,
    ):  # fmt: skip
        self.pairs, self.outputs, self.compiled = pairs, outputs, compiled
        keyed = [(i, p) for i, p in enumerate(pairs)] + [(-1 - k, p) for k, p in enumerate(outputs)]
        # what is tapped on the quantized side (outputs keep their own tensors)
        self.tap_pairs = {key: (_integer_tap(p, qg) if qg is not None and key >= 0 else p) for key, p in keyed}
        f_taps = list(dict.fromkeys(p.float_tensor for _, p in keyed))
        q_taps = list(dict.fromkeys(self.tap_pairs[k].quant_tensor for k, _ in keyed))
        self.groups = [keyed]
        notes = []
        if max_memory is not None and fg is not None:
            self.groups = _group_by_memory(keyed, fg, max_memory)
            if len(self.groups) > 1:
                notes.append(
                    f"tapped tensors split into {len(self.groups)} groups to stay within --max-memory {max_memory} bytes"
                )
        per_run = _tap_bytes(keyed, fg, self.tap_pairs, qg) if fg is not None else None
        q_model = q_loaded.proto
        self._original_names = {t.quant_tensor for t in self.tap_pairs.values()}
        self.unfused = None  # (original model, taps, factory, check session) to check the prefused taps once
        prefused = None
        if prefuse and qg is not None:  # onnxruntime's fused graph: from the set-up thread where it ran
            opt = optimized.result() if optimized is not None else optimized_model(q_loaded.proto)
            prefused = _prefused(q_loaded.proto, self.tap_pairs, qg, opt) if opt is not None else None
        if prefused is not None:  # the check's session opens while the batcher opens its two
            self.unfused = (q_loaded.proto, dict(self.tap_pairs), factory, unfused_session(factory, q_loaded.proto, self.tap_pairs))
            q_model, self.tap_pairs = prefused
            q_taps = list(dict.fromkeys(self.tap_pairs[k].quant_tensor for k, _ in keyed))
        steps: dict[str, float] = {}
        for name in q_taps if qg is not None else ():
            src = integer_source(qg, name)  # a float tap that is a DequantizeLinear output
            if src is not None and np.asarray(src[1].scale).size:
                steps[name] = float(np.max(np.abs(src[1].scale)))
        self.batcher = Batcher(
            factory, [(f_loaded.proto, f_taps, f_loaded.label), (q_model, q_taps, q_loaded.label)],
            per_run, max_memory, allow=len(self.groups) == 1, total=total, steps=[{}, steps],
        )  # fmt: skip
        self._notes = notes
        self._keyed, self._args = keyed, (factory, f_loaded, q_loaded, max_memory, fg, qg, total)

    @property
    def notes(self) -> list[str]:
        return self._notes + self.batcher.notes

    @property
    def runs_per_group(self) -> int:
        return self.batcher.runs_per_group

    @property
    def batched(self) -> bool:
        return self.batcher.batched

    @property
    def prefused_count(self) -> int:
        return sum(1 for k, t in self.tap_pairs.items() if k >= 0 and t.quant_tensor not in self._original_names)

    def _check_prefused(self, run: Mapping[str, np.ndarray]) -> str | None:
        """Do the fused graph's taps give the unfused taps' values on one run? (None: yes)"""
        model, taps, factory, session = self.unfused
        return fused_taps_differ(
            factory, model, taps, self.tap_pairs, run, lambda names: self.batcher.fetch(run, [[], names])[1], session
        )

    def _names(self, group: list) -> list[list[str]]:
        return [
            list(dict.fromkeys(p.float_tensor for _, p in group)),
            list(dict.fromkeys(self.tap_pairs[k].quant_tensor for k, _ in group)),
        ]

    def run_group(self, group, first) -> Iterable[_Step]:
        if first and self.unfused is not None:
            why = self._check_prefused(group[0])
            if why is not None:  # tap the model as given instead
                factory, f_loaded, q_loaded, max_memory, fg, qg, total = self._args
                self.batcher.close()
                self.__init__(
                    factory, f_loaded, q_loaded, self.pairs, self.outputs, max_memory, fg, self.compiled, qg,
                    prefuse=False, total=total,
                )  # fmt: skip
                self._notes.append(f"onnxruntime's fused graph not tapped: {why}")
            else:
                self._notes.append(
                    f"quantized model tapped in onnxruntime's fused graph ({self.prefused_count} layer(s) read "
                    "from fused QLinear* nodes, checked against the unfused taps on the first run)"
                )
            self.unfused = None
        if len(self.groups) == 1:
            parts = self.batcher.parts(group, first, self._names(self.groups[0]))
            return [_merge_steps([self._step(vals, runs, feed, self.groups) for vals, runs, feed in parts])]
        # taps fetched in memory groups, one run of both models per group, each folded before the
        # next is fetched (a generator: at most two groups' taps are held)
        return (self._step(self.batcher.fetch(b, self._names(g)), 1, b, [g]) for b in group for g in self.groups)

    def _step(self, vals: list[dict], runs: int, feed, groups: list) -> _Step:
        f_vals, q_vals = vals
        results: dict[int, Any] = {}
        top1: dict[int, tuple[int, int]] = {}
        quant_outputs: dict[int, np.ndarray] = {}
        for group in groups:
            for key, pair in group:
                tap = self.tap_pairs[key]
                ref, raw = np.asarray(f_vals[pair.float_tensor]), np.asarray(q_vals[tap.quant_tensor])
                results[key] = self._rows(ref, raw, tap, runs)
                if key < 0:
                    quant_outputs[key] = raw
                    if metrics.looks_like_class_scores(np.shape(ref)):
                        t = metrics.Top1Accumulator()
                        t.update(ref, _real(raw, tap))
                        top1[-1 - key] = (t.rows, t.agree)
        qouts = [quant_outputs.get(-1 - k) for k in range(len(self.outputs))] if quant_outputs else None
        return _Step(results, top1, qouts, feed_for(self.batcher.sessions[1], feed))

    def _rows(self, ref: np.ndarray, raw: np.ndarray, tap: TensorPair, runs: int):
        if ref.size != raw.size:
            return (
                f"shapes differ at run time: {_per_run_shape(ref.shape, runs)} in the float model, "
                f"{_per_run_shape(raw.shape, runs)} in the quantized model"
            )
        if runs > 1 and (ref.ndim == 0 or ref.shape[0] % runs or raw.ndim == 0 or raw.shape[0] % runs):
            return f"the batched run gave a leading axis of {list(ref.shape[:1])}, not a multiple of {runs} runs"
        dq = None
        if raw.dtype.kind in "iu" and tap.dequant is not None:
            if self.compiled and not tap.dequant.per_channel:
                dq = tap.dequant  # dequantized on the fly by the compiled kernels
            else:
                raw = tap.dequant.dequantize(raw)  # per-channel: in the tensor's own layout
        return (_per_run_shape(ref.shape, runs), ref.reshape(runs, -1), raw.reshape(runs, -1), dq)


def _per_run_shape(shape: tuple, runs: int) -> list[int]:
    out = [int(d) for d in shape]
    if runs > 1 and out:
        out[0] //= runs
    return out


def _merge_steps(steps: list[_Step]) -> _Step:
    """One step out of single-run steps (rows stacked in run order)."""
    if len(steps) == 1:
        return steps[0]
    results: dict[int, Any] = {}
    for key in steps[0].results:
        vals = [s.results[key] for s in steps]
        bad = next((v for v in vals if isinstance(v, str)), None)
        if bad is not None:
            results[key] = bad
            continue
        if len({v[1].shape[1] for v in vals}) > 1 or len({v[3] is None for v in vals}) > 1:
            # runs of different sizes: a list, folded run by run (see take() in _measure)
            results[key] = vals
            continue
        results[key] = (vals[0][0], np.concatenate([v[1] for v in vals]), np.concatenate([v[2] for v in vals]), vals[0][3])
    top1: dict[int, tuple[int, int]] = {}
    for s in steps:
        for k, (rows, agree) in s.top1.items():
            r0, a0 = top1.get(k, (0, 0))
            top1[k] = (r0 + rows, a0 + agree)
    return _Step(results, top1, steps[0].quant_outputs, steps[0].feed)


def _batch_mismatch(
    batched: list[dict], singles: list[list[dict]], runs: int, steps: list[dict[str, float]] | None = None
) -> str | None:
    """Why a batched run of ``runs`` runs differs from its first runs run alone (None: it does not)."""
    checked = len(singles)
    for m, values in enumerate(batched):
        for name, b in values.items():
            alone = [np.asarray(s[m][name]) for s in singles]
            b = np.asarray(b)
            a0 = alone[0]
            if b.ndim == 0 or b.ndim != a0.ndim or b.shape[1:] != a0.shape[1:] or b.shape[0] != runs * a0.shape[0]:
                return f"tensor '{name}' has shape {list(b.shape)} for {runs} runs, {list(a0.shape)} for one"
            if any(a.shape != a0.shape for a in alone):
                return f"tensor '{name}' changes shape from run to run"
            step = steps[m].get(name) if steps else None
            why = _runs_differ(b[: checked * a0.shape[0]].ravel(), np.concatenate([a.ravel() for a in alone]), step)
            if why is not None:
                return why
    return None


def _runs_differ(x: np.ndarray, y: np.ndarray, step: float | None = None) -> str | None:
    """Why a tensor's values from a batched run (``x``) are not those of its runs alone (``y``):
    non-finite in other places, or more than 1e-3 relative L2 apart. In float32 (quick, ample for
    the tolerance), float64 where float32 overflows; None when they agree.

    Integer tensors (QuantizeLinear outputs) that differ by at most one code everywhere agree: a
    batched MatMul/Gemm sums in another order, a value on a rounding boundary lands one code
    over, and deep in a network such flips add up (2 GB MLP, 4 runs batched: one code in 602 of
    32 768 elements of the last hidden layer, 1.2e-3 relative, and batching was refused). So
    do float tensors that are DequantizeLinear outputs of quantization ``step`` and move by at
    most one step (its final output: one code in 5 of 20 values, 1e-2 relative). An operator
    that mixes samples moves values by far more than one code."""
    if x.dtype.kind in "iu" and y.dtype.kind in "iu" and x.shape == y.shape:
        if x.size == 0 or int(np.max(np.abs(x.astype(np.int32) - y.astype(np.int32)))) <= 1:
            return None
    wide = np.float64 if x.dtype == np.float64 else np.float32
    for dtype in (wide, np.float64):
        xf, yf = x.astype(dtype, copy=False), y.astype(dtype, copy=False)
        if x.dtype.kind == "f":
            ok = np.isfinite(yf)
            if not np.array_equal(ok, np.isfinite(xf)):
                return "non-finite values differ between batched and single runs"
            if not ok.all():
                xf, yf = xf[ok], yf[ok]
        with np.errstate(over="ignore", invalid="ignore"):
            d = xf - yf
            err, ref = float(np.dot(d, d)), float(np.dot(yf, yf))
        # one step, and float32 rounding of the dequantized values (up to 32768 codes x 2^-24 of it)
        if step is not None and d.size and float(np.max(np.abs(d))) <= step * 1.01:
            return None
        if np.isfinite(err) and np.isfinite(ref):
            if err > (1e-3 * np.sqrt(ref) + 1e-12) ** 2:
                return "values differ between batched and single runs (an operator mixes samples across the batch axis)"
            return None
    return "values differ between batched and single runs (an operator mixes samples across the batch axis)"


def _batch_axis_ok(model: onnx.ModelProto) -> bool:
    """Do all graph inputs have a leading axis that can be a batch axis (rank >= 1, not scalars)?"""
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if not inputs:
        return False
    for i in inputs:
        tt = i.type.tensor_type
        if not i.type.HasField("tensor_type") or not tt.HasField("shape") or len(tt.shape.dim) == 0:
            return False
    return True


def _with_batch_axis(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose inputs' and outputs' leading axis is symbolic (intermediate shapes re-inferred)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = {t.name for t in out.graph.initializer}
    for vi in [i for i in out.graph.input if i.name not in init] + list(out.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and vi.type.tensor_type.shape.dim:
            d = vi.type.tensor_type.shape.dim[0]
            if d.HasField("dim_value"):
                d.ClearField("dim_value")
                d.dim_param = _BATCH_DIM
    del out.graph.value_info[:]
    return out


def _concat_runs(group: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """The runs of a group concatenated along axis 0 (None if their shapes or types differ)."""
    if len(group) == 1:
        return dict(group[0])
    first = group[0]
    for b in group[1:]:
        if b.keys() != first.keys():
            return None
        for k, v in b.items():
            if v.shape != first[k].shape or v.dtype != first[k].dtype or v.ndim == 0:
                return None
    return {k: np.concatenate([b[k] for b in group]) for k in first}


_PREFUSE_MAX_BYTES = 256 << 20
#: fewer multiply-accumulates than this over all runs: the models are tapped as given (see prefuse_pays)
_PREFUSE_MIN_MACS = 7.5e9


def prefuse_pays(runs: int | None, macs_per_run: int | None = None) -> bool:
    """Is tapping onnxruntime's fused graph worth its fixed cost for ``runs`` runs of a model doing
    ``macs_per_run`` multiply-accumulates in its Conv/MatMul/Gemm layers (None: unknown)?

    The optimisation and the check on the first run cost about two session builds per model and
    save what the fused integer kernels save, which scales with the layers' work. Measured on the
    50-conv CNN (70 M MAC a sample; onnxruntime 1.32, fused against as-given taps, 64/128/512
    samples): compare 0.066 s fixed against 0.64 ms saved a sample, sensitivity (two models)
    0.16 s against 1.4 ms: they break even at 103 and 112 samples (at 64 the fused graph made
    compare 8 % and sensitivity 15 % slower; at 512 both 17-22 % quicker), hence
    :data:`_PREFUSE_MIN_MACS` = 7.5e9 in all. The transformer block (0.2 M MAC) would need
    ~37 000 samples; at 512 its main thread waited 20 ms for a fused graph that saved ~3 ms."""
    if runs is None or macs_per_run is None:
        return True
    return runs * macs_per_run >= _PREFUSE_MIN_MACS


def optimized_model(q_proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's fused version of ``q_proto`` (batch axis symbolic, ``ORT_ENABLE_EXTENDED``,
    saved and reloaded); None for a model that keeps its weights on disk or is above
    :data:`_PREFUSE_MAX_BYTES`, or when onnxruntime fails."""
    # big models: optimising, saving, reloading and checking a second copy costs more than the
    # fused taps save (measured on a 2 GB MLP: 37 s -> 44 s)
    if external_dir(q_proto) is not None or initializer_bytes(q_proto) > _PREFUSE_MAX_BYTES:
        return None
    try:
        import tempfile

        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix="qdiff-fused-") as tmp:
            path = os.path.join(tmp, "fused.onnx")
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = path
            so.log_severity_level = 3
            ort.InferenceSession(_with_batch_axis(q_proto).SerializeToString(), so, providers=["CPUExecutionProvider"])
            return onnx.load(path)
    except Exception:  # noqa: BLE001 - optimisation is an optimisation: tap the model as given
        return None


def _prefused(
    q_proto: onnx.ModelProto, taps: dict, qg: Graph, optimized: onnx.ModelProto | None = None
) -> tuple[onnx.ModelProto, dict] | None:
    """onnxruntime's own fused version of the quantized model, and each tap's tensor in it.

    Tapping a QuantizeLinear output stops onnxruntime fusing the DQ -> Conv -> Q group that reads
    it, so the tapped model would run its convolutions in float. Instead the model (batch axis
    symbolic) is optimized once by onnxruntime (``ORT_ENABLE_EXTENDED``, saved), and the taps are
    found in that graph: a tensor kept under its name, a QuantizeLinear kept under its node name,
    or the fused ``QLinear*`` node named after the original target (through a Relu/Clip), read
    with that node's output scale and zero point (onnxruntime turns int8 into uint8 with the
    zero point shifted by 128). None where any tap cannot be found, none is read from a fused
    node, or :func:`optimized_model` gives none; the caller then taps the model as given.
    ``optimized``: :func:`optimized_model`'s result where the caller has it already.
    """
    opt = optimized if optimized is not None else optimized_model(q_proto)
    if opt is None:
        return None
    produced = {o for n in opt.graph.node for o in n.output} | {i.name for i in opt.graph.input}
    producer = {o: n for n in opt.graph.node for o in n.output}
    by_name = {n.name: n for n in opt.graph.node if n.name}
    consts = {t.name: t for t in opt.graph.initializer}

    def value(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(consts[name]) if name in consts else None

    def params(node: onnx.NodeProto, depth: int = 0) -> tuple[str, str] | None:
        """Names of the scale and zero point of ``node``'s (integer) output."""
        if node.op_type == "QuantizeLinear" and len(node.input) >= 3:
            return node.input[1], node.input[2]
        if node.op_type in QLINEAR_OUTPUT:
            i, j = QLINEAR_OUTPUT[node.op_type]
            return node.input[i], node.input[j]
        # ops onnxruntime runs on the integers as they are (their Q/DQ dropped): input's params
        if node.op_type in INTEGER_PASS and node.input and node.input[0] in producer and depth < 64:
            return params(producer[node.input[0]], depth + 1)
        return None

    out = {}
    for key, tap in taps.items():
        t = tap.quant_tensor
        if t in produced:
            out[key] = tap
            continue
        if key < 0 or tap.dequant is None or t not in qg.producer:
            return None
        qnode = qg.nodes[qg.producer[t]]
        fused = by_name.get(qnode.name)
        if fused is None or fused.op_type != "QuantizeLinear":
            src = qg.nodes[qg.producer[qnode.input[0]]] if qnode.input[0] in qg.producer else None
            while src is not None and src.op_type in ("Relu", "Clip") and src.input[0] in qg.producer:
                src = qg.nodes[qg.producer[src.input[0]]]
            fused = by_name.get(src.name) if src is not None and src.name else None
        names = params(fused) if fused is not None else None
        if names is None:
            return None
        scale, zp = value(names[0]), value(names[1])
        if scale is None or zp is None or scale.size != 1 or zp.size != 1 or scale.dtype != np.float32:
            return None
        out[key] = dataclasses.replace(tap, quant_tensor=fused.output[0], dequant=DequantParams(scale, zp, 1))
    if all(out[key] is tap for key, tap in taps.items()):
        return None  # nothing is read from a fused node: the model as given fuses the same
    opt.ir_version = min(opt.ir_version, q_proto.ir_version) or q_proto.ir_version
    return opt, out


def unfused_session(factory, model: onnx.ModelProto, taps: dict) -> Future:
    """The session :func:`fused_taps_differ` checks against (``model`` with ``taps`` tapped),
    opened on a background thread while the caller opens its own."""
    names = list(dict.fromkeys(t.quant_tensor for t in taps.values()))
    return pipeline.in_background(open_session, factory, tap_model(model, names), "unfused check")


def fused_taps_differ(
    factory, model: onnx.ModelProto, taps: dict, fused_taps: dict, run, fetch_fused, session: Future | None = None
) -> str | None:
    """Why the taps of onnxruntime's fused graph (:func:`_prefused`) cannot stand for ``taps`` of
    ``model``, found by running both on one run; None when every tap agrees (1e-2 relative L2,
    the fused kernels round differently). ``fetch_fused(names)`` returns the fused graph's tensors;
    ``session``: :func:`unfused_session`'s future where the caller started it."""
    names = list(dict.fromkeys(t.quant_tensor for t in taps.values()))
    try:
        if session is None:
            session = unfused_session(factory, model, taps)
        sess, _ = session.result()
        want = dict(zip(names, sess.run(names, feed_for(sess, run))))
        got_names = list(dict.fromkeys(fused_taps[k].quant_tensor for k in taps))
        got = fetch_fused(got_names)
    except Exception as exc:  # noqa: BLE001 - any failure: tap the model as given
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    for key, tap in taps.items():
        a = _real(want[tap.quant_tensor], tap).astype(np.float64).ravel()
        b = _real(got[fused_taps[key].quant_tensor], fused_taps[key]).astype(np.float64).ravel()
        if a.shape != b.shape:
            return f"tensor for '{fused_taps[key].layer}' has another shape"
        ok = np.isfinite(a) & np.isfinite(b)
        if np.linalg.norm(a[ok] - b[ok]) > 1e-2 * np.linalg.norm(a[ok]) + 1e-9:
            return f"values of '{fused_taps[key].layer}' differ from the unfused model's"
    return None


def _integer_tap(pair: TensorPair, qg: Graph) -> TensorPair:
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


def _tap_bytes(keyed: list, fg: Graph, tap_pairs: dict, qg: Graph | None) -> int | None:
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


#: tensors up to this many elements are reduced many samples at a time (per-call overhead
#: dominates small tensors); a pair's buffer stays within _ROWS_BUFFER_BYTES of float64 (cache
#: sized: larger stacks were measured slower, and it bounds memory at ~256 KiB per pair)
_ROWS_MAX_ELEMENTS = 4096
_ROWS_MAX = 64
_ROWS_BUFFER_BYTES = 1 << 18
#: a RowFolder reduces what is due before its concatenated buffers pass this many bytes
_DUE_COPIES_MAX = 2 << 20


class RowFolder:
    """Folds samples (rows) of many tensor pairs into their accumulators, many rows per call.

    Per-call overhead dominates small tensors, so rows are buffered per key and reduced together
    once a key holds ``max_rows`` rows or ``max_bytes`` (float64 equivalent); rows of more than
    ``immediate_elements`` elements are reduced at once (``None``: buffer every size). What is due
    is reduced by :meth:`run` (the caller calls it once per group of runs): all of it in one call
    of the compiled kernels. A row's values never depend on which rows share its call, so the
    buffering changes no number.
    """

    def __init__(
        self, compiled: bool, max_bytes: int = _ROWS_BUFFER_BYTES, max_rows: int = _ROWS_MAX,
        immediate_elements: int | None = _ROWS_MAX_ELEMENTS, threads: int | None = None, kl: bool = True,
    ):  # fmt: skip
        self.compiled, self.max_bytes, self.max_rows, self.immediate = compiled, max_bytes, max_rows, immediate_elements
        # kl=False: the kernels skip the histograms (for accumulators made with kl=False)
        self.bins = metrics.KL_BINS if kl else 0
        self.threads = threads  # kernel threads per call (None: the kernels' default, 1 in a worker thread)
        self._buffers: dict[Any, tuple[metrics.TensorAccumulator, list]] = {}
        self._due: list[tuple[metrics.TensorAccumulator, np.ndarray, np.ndarray, Any]] = []
        self._due_copies = 0  # bytes of the concatenated buffers in _due (the rest are views)

    def add(self, key: Any, acc: metrics.TensorAccumulator, refs: np.ndarray, cands: np.ndarray, dq=None) -> None:
        """Take the rows of ``refs``/``cands`` (``[k, n]``, one sample per row) for ``acc``."""
        if self.immediate is not None and refs.shape[1] > self.immediate:
            self._due.append((acc, refs, cands, dq))
            return
        _, buf = self._buffers.setdefault(key, (acc, []))
        if buf and (buf[0][0].shape[1] != refs.shape[1] or buf[0][2] is not dq):
            self._flush(acc, buf)
        buf.append((refs, cands, dq))
        rows = sum(len(r) for r, _, _ in buf)
        if rows * refs.shape[1] * 8 >= self.max_bytes or rows >= self.max_rows:
            self._flush(acc, buf)

    def run(self) -> None:
        """Reduce what is due (the immediate rows and the full buffers) into the accumulators."""
        due, self._due, self._due_copies = self._due, [], 0
        if not due:
            return
        stacks = [(r, c, dq) for _, r, c, dq in due]
        got = _kernels.many_row_metrics(stacks, bins=self.bins, threads=self.threads) if self.compiled else None
        if got is None:
            for acc, refs, cands, dq in due:
                _reduce_rows(acc, refs, cands, dq)
            return
        for (acc, refs, _, _), rows in zip(due, got):
            _fold_rows(acc, rows, refs.shape[1])

    def flush(self) -> None:
        """Reduce everything still buffered."""
        for acc, buf in self._buffers.values():
            self._flush(acc, buf)
        self.run()

    def _flush(self, acc: metrics.TensorAccumulator, buf: list) -> None:
        if not buf:
            return
        refs = np.concatenate([r for r, _, _ in buf]) if len(buf) > 1 else buf[0][0]
        cands = np.concatenate([c for _, c, _ in buf]) if len(buf) > 1 else buf[0][1]
        self._due.append((acc, refs, cands, buf[0][2]))
        if len(buf) > 1:
            self._due_copies += refs.nbytes + cands.nbytes
        buf.clear()
        if self._due_copies > _DUE_COPIES_MAX:
            self.run()


def _group_by_memory(keyed: list, fg: Graph, budget: int) -> list[list]:
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


class _FusedEngine(_Engine):
    """One merged graph: both models and every pair's reductions (see :mod:`qdiff.engine.fused`)."""

    def __init__(self, factory, f_loaded, q_loaded, fg, pairs, outputs):
        self.pairs, self.outputs = pairs, outputs
        shapes = {o.float_tensor: fg.shape(o.float_tensor) for o in outputs}
        fused = build_fused(f_loaded.proto, q_loaded.proto, pairs, outputs, float_shapes=shapes)
        model = fused.model
        # the first run also returns the shapes and the quantized model's outputs
        self.shape_names = []
        for k, p in enumerate(list(pairs) + list(outputs)):
            name = f"qdiff/shape{k}"
            src = p.float_tensor if p.float_tensor in {i.name for i in model.graph.input} else "f/" + p.float_tensor
            model.graph.node.append(onnx.helper.make_node("Shape", [src], [name], name=name))
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            self.shape_names.append(name)
        self.qout_names = []
        for o in outputs:
            name = "q/" + o.quant_tensor
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            self.qout_names.append(name)
        self.sums = list(fused.outputs)
        self.top1_names = [t for t in fused.top1 if t]
        self.top1_index = [k for k, t in enumerate(fused.top1) if t]
        self.sess, self.notes = open_session(factory, model, f"{f_loaded.label} + {q_loaded.label} (fused)")

    def run_group(self, group, first):
        (batch,) = group
        names = self.sums + self.top1_names + ((self.shape_names + self.qout_names) if first else [])
        vals = self.sess.run(names, feed_for(self.sess, batch))
        n = len(self.pairs) + len(self.outputs)
        sums, rest = vals[:n], vals[n:]
        t1, rest = rest[: len(self.top1_names)], rest[len(self.top1_names) :]
        shapes = rest[:n] if first else [None] * n
        qouts = list(rest[n:]) if first else None
        results: dict[int, Any] = {}
        for k, v in enumerate(sums):
            key = k if k < len(self.pairs) else -1 - (k - len(self.pairs))
            if v[0] != v[1]:
                results[key] = f"shapes differ at run time: {int(v[0])} elements in the float model, {int(v[1])} in the quantized model"
                continue
            shape = [int(x) for x in shapes[k]] if shapes[k] is not None else None
            results[key] = _Computed(metrics.sample_metrics_from_sums(v), shape)
        top1 = {self.top1_index[j]: (int(v[0]), int(v[1])) for j, v in enumerate(t1)}
        return [_Step(results, top1, qouts, batch)]


def load_pair(float_model: ModelLike, quant_model: ModelLike, provider: str, session_factory: SessionFactory | None):
    """Load both models, check they take the same inputs, and settle the session factory.

    Returns:
        ``(float LoadedModel, quant LoadedModel, float Graph, quant Graph, float input specs,
        session factory, SessionOptions recorded in meta)``.
    """
    f_loaded = load_model(float_model, role="float model")
    q_loaded = load_model(quant_model, role="quantized model")
    if session_factory is None:
        threads = pipeline.session_threads(weight_bytes=weight_bytes(f_loaded, q_loaded))
        options = SessionOptions(provider=resolve_provider(provider), intra_op_threads=threads)
        session_factory = default_session_factory(options)
    else:
        options = SessionOptions(provider="custom session factory")
    fg, qg = Graph(f_loaded.proto), Graph(q_loaded.proto)
    f_specs = input_specs(fg)
    check_same_inputs(f_specs, input_specs(qg), f_loaded.label, q_loaded.label)
    return f_loaded, q_loaded, fg, qg, f_specs, session_factory, options


def weight_bytes(*models: LoadedModel) -> int:
    """The models' initializer bytes together (on disk or not): decides the pipeline's workers
    (:data:`qdiff.engine.pipeline.ONE_WORKER_BYTES`)."""
    return sum(initializer_bytes(m.proto) for m in models)


def _finite_max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over the elements finite in both (0.0 for empty or shape-mismatched)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0 or a.shape != b.shape:
        return 0.0
    ok = np.isfinite(a) & np.isfinite(b)
    diff = np.zeros_like(a)
    np.subtract(a, b, out=diff, where=ok)
    return float(np.max(np.abs(diff)))


def _real(arr: np.ndarray, pair: TensorPair) -> np.ndarray:
    """The real values of a tapped tensor: integer taps dequantized, FP16 widened."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "iu" and pair.dequant is not None:
        return pair.dequant.dequantize(arr)
    return arr


def _frame(
    pairs: list[TensorPair],
    accs: list[metrics.TensorAccumulator],
    shapes: dict[int, list[int]],
    broken: dict[int, str],
    columns: list[str],
    offset: int,
) -> pd.DataFrame:
    rows = []
    for i, (pair, acc) in enumerate(zip(pairs, accs)):
        key = i if offset == 0 else -1 - i
        s = acc.result().to_dict()
        row = {
            "order": pair.order,
            "layer": pair.layer,
            "op_type": pair.op_type,
            "kind": "output" if offset else ("input" if pair.kind.value == "input" else "activation"),
            "float_tensor": pair.float_tensor,
            "quant_tensor": pair.quant_tensor,
            "match": pair.method.value,
            "confidence": pair.confidence,
            "quant_node": pair.quant_node,
            "shape": "x".join(str(d) for d in shapes.get(key, [])),
            "samples": s["samples"],
        }
        for col in columns:
            if col in s and col not in row:
                row[col] = s[col]
        row["note"] = broken.get(key, s.get("note", ""))
        rows.append(row)
    data: dict[str, Any] = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        if col in _METRIC_COLUMNS:  # None (no samples) as NaN, every metric column float
            data[col] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        else:
            data[col] = values
    return pd.DataFrame(data, columns=columns)


_METRIC_COLUMNS = (
    "cosine", "cosine_worst", "mse", "mse_worst", "mae", "mae_worst", "max_abs", "sqnr_db", "sqnr_db_worst", "kl", "kl_worst",
)  # fmt: skip


def _rows_metrics(refs: np.ndarray, cands: np.ndarray) -> list[metrics.SampleMetrics]:
    """SampleMetrics of each row (compiled kernels where built: weights of big models take seconds, not minutes)."""
    got = _kernels.row_metrics(refs, cands)
    if got is None:
        return [metrics.sample_metrics(r, c) for r, c in zip(refs, cands)]
    values, slow_rows, slow = got
    n = refs.shape[1]
    out = [metrics.SampleMetrics(*map(float, v), n, n) for v in values.tolist()]
    for i, m in zip(slow_rows, slow):
        out[i] = m
    return out


def _channel_cosines(ref: np.ndarray, cand: np.ndarray, axis: int) -> np.ndarray:
    """Cosine of each channel (slices along ``axis``), with sample_metrics' conventions.

    From float64 sums Σr², Σc², Σrc per channel: a trailing channel axis (MatMul/Gemm weights)
    is reduced per column without transposing the weight (a 256 MB transpose took ~1.5 s),
    compiled (``_kernels.column_sums``, ~1 ns per element pair) or in float64 blocks with numpy;
    a leading one row by row in float64 blocks (the full metrics of every channel, histograms
    included, took 2-3x as long on conv weights); other axes are moved to the front. Weights
    holding NaN/Inf (non-finite sums: float32 squares cannot overflow float64) go through
    :func:`_rows_metrics`, which counts them.
    """
    channels = ref.shape[axis]
    sums = None
    if axis == ref.ndim - 1:
        sums = _kernels.column_sums(ref.reshape(-1, channels), cand.reshape(-1, channels))
        if sums is None:
            sums = _block_sums(ref.reshape(-1, channels), cand.reshape(-1, channels), "ij,ij->j", 0)
    else:
        r = np.moveaxis(ref, axis, 0).reshape(channels, -1)
        c = np.moveaxis(cand, axis, 0).reshape(channels, -1)
        sums = _block_sums(r, c, "ij,ij->i", 1)
    rr, cc, rc = sums
    if not (np.isfinite(rr).all() and np.isfinite(cc).all() and np.isfinite(rc).all()):
        r = np.moveaxis(ref, axis, 0).reshape(channels, -1)
        c = np.moveaxis(cand, axis, 0).reshape(channels, -1)
        return np.array([1.0 if v.cosine is None else v.cosine for v in _rows_metrics(r, c)])
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.clip(rc / np.sqrt(rr * cc), -1.0, 1.0)
    return np.where((rr == 0) & (cc == 0), 1.0, np.where((rr == 0) | (cc == 0), 0.0, cos))


def _block_sums(r: np.ndarray, c: np.ndarray, spec: str, along: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Σr², Σc², Σrc of two 2-D float arrays reduced by ``spec`` (einsum), in float64 blocks of
    about 4M elements cut along axis ``along`` (the axis that is summed over), so a big weight
    never has a float64 copy."""
    out = r.shape[1 - along]
    rr, cc, rc = np.zeros(out), np.zeros(out), np.zeros(out)
    step = max(1, (1 << 22) // max(1, out))
    for i in range(0, r.shape[along], step):
        cut = (slice(None), slice(i, i + step)) if along == 1 else (slice(i, i + step), slice(None))
        a, b = r[cut].astype(np.float64), c[cut].astype(np.float64)
        rr += np.einsum(spec, a, a)
        cc += np.einsum(spec, b, b)
        rc += np.einsum(spec, a, b)
    return rr, cc, rc


def _weight_row(w: WeightPair) -> dict[str, Any]:
    """The weight table's row of one pair (given to :func:`match_models` as ``weigh``)."""
    ref, cand = np.asarray(w.float_value), np.asarray(w.quant_value)
    (m,) = _rows_metrics(ref.reshape(1, -1), cand.reshape(1, -1))
    worst_channel, worst_cos = None, None
    if w.channel_axis is not None and ref.ndim > 1:
        cos = _channel_cosines(ref, cand, w.channel_axis % ref.ndim)
        worst_channel = int(np.argmin(cos))
        worst_cos = float(cos[worst_channel])
    return {
        "layer": w.layer,
        "op_type": w.op_type,
        "role": w.role,
        "float_tensor": w.float_tensor,
        "quant_tensor": w.quant_tensor,
        "granularity": w.granularity,
        "shape": "x".join(str(d) for d in ref.shape),
        "cosine": m.cosine,
        "mse": m.mse,
        "mae": m.mae,
        "max_abs": m.max_abs,
        "sqnr_db": m.sqnr_db,
        "worst_channel": worst_channel,
        "worst_channel_cosine": worst_cos,
    }


def _weights_frame(weights: tuple[WeightPair, ...]) -> pd.DataFrame:
    return pd.DataFrame([w.row if w.row is not None else _weight_row(w) for w in weights], columns=WEIGHT_COLUMNS)


def _meta(
    f: LoadedModel,
    q: LoadedModel,
    options: SessionOptions,
    source: Any,
    seed: int,
    batch_size: int,
    notes: list[str],
    deployed_diff: float | None,
    seconds: float,
    run_seconds: float,
    matching: Matching,
) -> dict[str, Any]:
    import onnxruntime as ort

    from qdiff import __version__

    return {
        "qdiff_version": __version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "session": options.to_dict(),
        "float_model": {"name": f.label, "path": str(f.path) if f.path else None, "sha256": f.sha256},
        "quant_model": {"name": q.label, "path": str(q.path) if q.path else None, "sha256": q.sha256},
        "data": source.description,
        "random_inputs": source.random,  # no --data: seeded normal values, not real data
        "data_sha256": source.fingerprint(),
        "samples": source.samples,
        "runs": source.batches,
        "batch_size": batch_size,
        "seed": seed,
        "metrics": {"kl_bins": metrics.KL_BINS, "sqnr_cap_db": metrics.SQNR_CAP_DB},
        "tapped_vs_deployed_max_abs": deployed_diff,
        "notes": notes,
        "pairs": len(matching.pairs),
        "seconds": round(seconds, 3),
        "inference_seconds": round(run_seconds, 3),
    }
