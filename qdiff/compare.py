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
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import onnx
import pandas as pd

from qdiff import metrics
from qdiff.graph import Graph, LoadedModel, ModelLike, load_model
from qdiff.inputs import DataLike, check_same_inputs, input_specs, make_source, parse_input_shapes
from qdiff.matching import match_models
from qdiff.result import (
    ALIGNMENT_COLUMNS,
    LAYER_COLUMNS,
    OUTPUT_COLUMNS,
    UNMATCHED_COLUMNS,
    WEIGHT_COLUMNS,
    Alignment,
    CompareResult,
)
from qdiff.runner import (
    SessionFactory,
    SessionOptions,
    default_session_factory,
    feed_for,
    open_session,
    resolve_provider,
    tap_model,
)
from qdiff.structs import Matching, TensorPair, WeightPair

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
        session_factory: builds a session from a ModelProto; inject one to run elsewhere.
        progress: called as ``progress(batches_done, total_or_None)`` after each batch.
        tensor_map: float tensor -> quantized tensor pairs overriding or completing the matching,
            or the path of a JSON/CSV file holding them (see :func:`load_tensor_map`).

    Returns:
        A :class:`~qdiff.result.CompareResult`.

    Raises:
        QdiffError: a subclass naming what is wrong with the models, data or options.
    """
    started = time.perf_counter()
    f_loaded = load_model(float_model, role="float model")
    q_loaded = load_model(quant_model, role="quantized model")
    if session_factory is None:
        options = SessionOptions(provider=resolve_provider(provider))
        session_factory = default_session_factory(options)
    else:
        options = SessionOptions(provider="custom session factory")
    fg, qg = Graph(f_loaded.proto), Graph(q_loaded.proto)
    f_specs, q_specs = input_specs(fg), input_specs(qg)
    check_same_inputs(f_specs, q_specs, f_loaded.label, q_loaded.label)
    source = make_source(
        data, f_specs, samples=samples, batch_size=batch_size, seed=seed, input_shapes=parse_input_shapes(input_shapes)
    )
    if isinstance(tensor_map, (str, os.PathLike)):
        tensor_map = load_tensor_map(tensor_map)
    matching = match_models(fg, qg, tensor_map)
    pairs = list(matching.pairs)
    outputs = list(matching.outputs)

    f_taps = list(dict.fromkeys([p.float_tensor for p in pairs + outputs]))
    q_taps = list(dict.fromkeys([p.quant_tensor for p in pairs + outputs]))
    f_sess, notes_f = open_session(session_factory, tap_model(f_loaded.proto, f_taps), f_loaded.label)
    q_sess, notes_q = open_session(session_factory, tap_model(q_loaded.proto, q_taps), q_loaded.label)
    deployed_sess = None
    notes = notes_f + notes_q

    accs = [metrics.TensorAccumulator() for _ in pairs]
    out_accs = [metrics.TensorAccumulator() for _ in outputs]
    top1 = [metrics.Top1Accumulator() for _ in outputs]
    shapes: dict[int, list[int]] = {}
    broken: dict[int, str] = {}
    deployed_diff: float | None = None
    run_seconds = 0.0

    for b, batch in enumerate(source):
        t0 = time.perf_counter()
        f_vals = dict(zip(f_taps, f_sess.run(f_taps, feed_for(f_sess, batch))))
        q_vals = dict(zip(q_taps, q_sess.run(q_taps, feed_for(q_sess, batch))))
        run_seconds += time.perf_counter() - t0
        if b == 0 and outputs:
            # is the tapped quantized model still what the deployed one computes?
            deployed_sess, _ = open_session(session_factory, q_loaded.proto, q_loaded.label)
            names = [o.quant_tensor for o in outputs]
            deployed = deployed_sess.run(names, feed_for(deployed_sess, batch))
            deployed_diff = max(_finite_max_diff(_real(d, o), _real(q_vals[n], o)) for d, n, o in zip(deployed, names, outputs))
            deployed_sess = None
        for i, pair in enumerate(pairs):
            if i in broken:
                continue
            ref, cand = f_vals[pair.float_tensor], _real(q_vals[pair.quant_tensor], pair)
            if np.size(ref) != np.size(cand):
                broken[i] = (
                    f"shapes differ at run time: {list(np.shape(ref))} in the float model, "
                    f"{list(np.shape(cand))} in the quantized model"
                )
                continue
            shapes[i] = list(np.shape(ref))
            accs[i].update(ref, cand)
        for i, pair in enumerate(outputs):
            ref, cand = f_vals[pair.float_tensor], _real(q_vals[pair.quant_tensor], pair)
            if np.size(ref) != np.size(cand):
                broken[-1 - i] = f"output shapes differ: {list(np.shape(ref))} vs {list(np.shape(cand))}"
                continue
            shapes[-1 - i] = list(np.shape(ref))
            out_accs[i].update(ref, cand)
            if metrics.looks_like_class_scores(np.shape(ref)):
                top1[i].update(ref, cand)
        del f_vals, q_vals
        if progress is not None:
            progress(b + 1, source.count)

    if source.batches == 0:
        from qdiff.errors import DataError

        raise DataError(f"{source.description} produced no samples; nothing was compared")

    layers = _frame(pairs, accs, shapes, broken, LAYER_COLUMNS, offset=0)
    outs = _frame(outputs, out_accs, shapes, broken, OUTPUT_COLUMNS, offset=-1)
    if len(outs):
        outs["top1_agreement"] = [t.result() for t in top1]
    weights = _weights_frame(matching.weights)
    unmatched = pd.DataFrame([asdict(u) for u in matching.unmatched], columns=UNMATCHED_COLUMNS)
    warnings = _identity_warnings(weights, layers)
    meta = _meta(
        f_loaded, q_loaded, options, source, seed, batch_size,
        notes, deployed_diff, time.perf_counter() - started, run_seconds, matching,
    )  # fmt: skip
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
    m = match_models(Graph(f_loaded.proto), Graph(q_loaded.proto), tensor_map)
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
    hurts; weight rounding is in both models and does not show. Takes :func:`compare`'s keywords.

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
    result.meta["reference"] = f"{loaded.label} with {stripped.modified} activation Q/DQ pairs removed (--quant-only)"
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
    w = weights[weights["role"] == "weight"]["cosine"].dropna() if len(weights) else pd.Series(dtype=float)
    if len(w) >= 2 and float(w.median()) < 0.5:
        out.append(
            f"the models do not look like the same network: the weights of {int((w < 0.5).sum())} of {len(w)} layers "
            f"do not correlate (median cosine {float(w.median()):.3f}); check that QUANT was made from FLOAT"
        )
    acts = layers[layers["kind"] == "activation"]["cosine"].dropna()
    if len(acts) >= 2 and float(acts.iloc[0]) < 0.5 and not out:
        out.append(
            f"error is large from the first layer on (cosine {float(acts.iloc[0]):.3f}); check that QUANT was made "
            "from FLOAT and that both take the same input preprocessing"
        )
    return out


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
    df = pd.DataFrame(rows, columns=columns)
    for col in ("cosine", "cosine_worst", "mse", "mse_worst", "mae", "mae_worst", "max_abs", "sqnr_db", "sqnr_db_worst", "kl", "kl_worst"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def _weights_frame(weights: tuple[WeightPair, ...]) -> pd.DataFrame:
    rows = []
    for w in weights:
        ref = w.float_value.astype(np.float64)
        cand = w.quant_value.astype(np.float64)
        m = metrics.sample_metrics(ref, cand)
        worst_channel, worst_cos = None, None
        if w.channel_axis is not None and ref.ndim > 1:
            r = np.moveaxis(ref, w.channel_axis, 0).reshape(ref.shape[w.channel_axis], -1)
            c = np.moveaxis(cand, w.channel_axis, 0).reshape(ref.shape[w.channel_axis], -1)
            cos = [metrics.sample_metrics(r[k], c[k]).cosine for k in range(r.shape[0])]
            cos = [1.0 if v is None else v for v in cos]
            worst_channel = int(np.argmin(cos))
            worst_cos = float(cos[worst_channel])
        rows.append(
            {
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
        )
    return pd.DataFrame(rows, columns=WEIGHT_COLUMNS)


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
