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

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from qdiff import metrics
from qdiff.engine import kernels as _kernels
from qdiff.engine.engines import SetUp
from qdiff.engine.loop import load_pair, measure_pair
from qdiff.engine.options import EngineOptions
from qdiff.engine.prefuse import prefuse_pays
from qdiff.engine.sessions import SessionFactory, SessionOptions
from qdiff.engine.sharding import measure_sharded
from qdiff.errors import UsageError
from qdiff.graph import Graph, LoadedModel, ModelLike, layer_macs, load_model
from qdiff.inputs import DataLike, make_source, parse_input_shapes
from qdiff.matching import load_tensor_map, match_models, no_weight_values
from qdiff.result import (
    ALIGNMENT_COLUMNS,
    LAYER_COLUMNS,
    OUTPUT_COLUMNS,
    UNMATCHED_COLUMNS,
    WEIGHT_COLUMNS,
    Alignment,
    CompareResult,
    RunInfo,
    measured_meta,
)
from qdiff.structs import Matching, TensorPair, WeightPair

__all__ = ["compare", "compare_quant_only", "match"]

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
    engine_options: EngineOptions | None = None,
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
        engine: ``numpy`` (default) copies the tapped tensors out and reduces them in the
            compiled kernels (numpy without them); ``fused`` reduces every tensor inside
            onnxruntime (both models merged into one graph with the metric reductions,
            :mod:`qdiff.engine.fused`); ``auto`` uses fused where the models can be merged and
            falls back to numpy otherwise, saying why in ``meta.notes``.
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
        engine_options: the measuring engine's tunables (internal; they change time and memory,
            not the numbers), see :class:`qdiff.engine.EngineOptions`.

    Returns:
        A :class:`~qdiff.result.CompareResult`.

    Raises:
        QdiffError: a subclass naming what is wrong with the models, data or options.
    """
    started = time.perf_counter()
    engine_options = engine_options or EngineOptions()
    if engine not in ("auto", "fused", "numpy"):
        raise UsageError(f"engine must be auto, fused or numpy, not '{engine}'")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if max_memory is not None and max_memory < 1:
        raise UsageError(f"--max-memory must be a positive number of bytes, got {max_memory}")
    f_loaded, q_loaded, fg, qg, f_specs, session_factory, options = load_pair(
        float_model, quant_model, provider, session_factory, engine_options
    )
    source = make_source(
        data, f_specs, samples=samples, batch_size=batch_size, seed=seed, input_shapes=parse_input_shapes(input_shapes)
    )
    if isinstance(tensor_map, (str, os.PathLike)):
        tensor_map = load_tensor_map(tensor_map)
    local = workers == 1 and executor is None
    setup = (
        SetUp(session_factory, q_loaded, prefuse_pays(source.count, layer_macs(fg), engine_options), engine, engine_options)
        if local
        else None
    )
    # the weight table is computed as the matching finds the weights, one at a time, and before
    # the sessions load the models (a 2 GB model's float weights and their dequantized twins are
    # 4 GB of arrays)
    matching = match_models(fg, qg, tensor_map, weigh=_weight_row)
    pairs = list(matching.pairs)
    outputs = list(matching.outputs)
    weights = _weights_frame(matching.weights)

    if local:
        m = measure_pair(
            session_factory, f_loaded, q_loaded, fg, pairs, outputs, source, engine, progress, max_memory, qg,
            setup=setup, options=engine_options,
        )  # fmt: skip
    else:
        m = measure_sharded(
            float_model, quant_model, data, tensor_map, workers, engine, options,
            dict(samples=samples, batch_size=batch_size, seed=seed, input_shapes=parse_input_shapes(input_shapes)),
            len(pairs), len(outputs), progress, max_memory, executor, source.count, engine_options,
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


def _identity_warnings(weights: pd.DataFrame, layers: pd.DataFrame) -> list[str]:
    """Say so up front when the two models do not look like the same network."""
    out = []
    # plain arrays, not filtered frames (a filtered frame is a noticeable part of a small compare)
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
    is reduced per column without transposing the weight (a big weight's transpose is slow),
    compiled (``_kernels.column_sums``) or in float64 blocks with numpy; a leading one row by row
    in float64 blocks (cheaper than the full metrics of every channel, histograms included);
    other axes are moved to the front (figures in bench/RESULTS.md). Weights
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
    """compare's meta: :func:`~qdiff.result.measured_meta` with the deployed-model check and the inference time."""
    run = RunInfo.collect(f, q, source, seed)
    return measured_meta(
        run, options.to_dict(), source.batches, batch_size, notes, len(matching.pairs), seconds,
        deployed_check=deployed_diff, inference_seconds=run_seconds,
    )  # fmt: skip
