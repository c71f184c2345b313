"""Results: the base every result shares, the run record, and the results of ``compare`` / ``match``.

:class:`Result` gives every result (compare, match, sensitivity, fallback, diagnose, profile) the
same interface: ``to_dict`` / ``to_json`` (strict JSON, atomic) / ``to_csv`` (its main table), and
display through ``__rich__`` / ``_repr_html_``, the renderer looked up by name in
:mod:`qdiff.render` when a result is shown (results never import the renderer). :class:`RunInfo`
is the frozen record of what reproduces a run, the first keys of every result's ``meta``.

The ``compare`` result is pandas DataFrames plus that meta.

Column sets (one documented set, used by the DataFrames, CSV and JSON alike):

``layers`` / ``outputs`` (one row per tensor pair, float topological order)
    order, layer, op_type, kind, float_tensor, quant_tensor, match, quant_node, shape, samples,
    cosine, cosine_worst, mse, mse_worst, mae, mae_worst, max_abs, sqnr_db, sqnr_db_worst, kl,
    kl_worst, nan_float, inf_float, nan_quant, inf_quant, note; ``outputs`` adds top1_agreement.
``weights``
    layer, op_type, role, float_tensor, quant_tensor, granularity, shape, cosine, mse, mae,
    max_abs, sqnr_db, worst_channel, worst_channel_cosine.
``unmatched``
    name, side, op_type, reason.

Means and worsts are over samples (over batches when ``batch_size`` > 1). A metric is empty
(NaN in the DataFrame, null in JSON) only when ``note`` says why (no finite values at all).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from qdiff._io import write_atomic
from qdiff.structs import TensorPair

__all__ = ["Result", "RunInfo", "ModelInfo", "measured_meta", "json_safe", "Alignment", "ALIGNMENT_COLUMNS", "CompareResult", "LAYER_COLUMNS", "OUTPUT_COLUMNS", "WEIGHT_COLUMNS", "UNMATCHED_COLUMNS", "write_atomic"]

METRIC_COLUMNS = [
    "cosine", "cosine_worst", "mse", "mse_worst", "mae", "mae_worst", "max_abs",
    "sqnr_db", "sqnr_db_worst", "kl", "kl_worst",
]  # fmt: skip
LAYER_COLUMNS = (
    ["order", "layer", "op_type", "kind", "float_tensor", "quant_tensor", "match", "confidence", "quant_node", "shape", "samples"]
    + METRIC_COLUMNS
    + ["nan_float", "inf_float", "nan_quant", "inf_quant", "note"]
)
OUTPUT_COLUMNS = LAYER_COLUMNS + ["top1_agreement"]
WEIGHT_COLUMNS = [
    "layer", "op_type", "role", "float_tensor", "quant_tensor", "granularity", "shape",
    "cosine", "mse", "mae", "max_abs", "sqnr_db", "worst_channel", "worst_channel_cosine",
]  # fmt: skip
UNMATCHED_COLUMNS = ["name", "side", "op_type", "reason"]
ALIGNMENT_COLUMNS = ["order", "layer", "op_type", "kind", "float_tensor", "quant_tensor", "quant_node", "match", "confidence"]

#: layers with a mean cosine below this are flagged (the threshold many vendor tools use)
COSINE_THRESHOLD = 0.99



class Result:
    """What every result shares: strict JSON of :meth:`to_dict` written atomically, the main
    table as CSV, and display in a terminal (``__rich__``) and a notebook (``_repr_html_``).

    Subclasses define ``to_dict`` and name their renderer in :attr:`_renderer` (a function of
    :mod:`qdiff.render`, imported only when the result is displayed, so results never import rich).
    """

    #: the function of qdiff.render that draws this result
    _renderer: ClassVar[str] = ""
    #: the title of the notebook view
    _title: ClassVar[str] = "qdiff"

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def table(self) -> pd.DataFrame:
        """The main table (what :meth:`to_csv` writes): ``layers`` unless a result says otherwise."""
        return self.layers  # type: ignore[attr-defined]

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as strict JSON (no NaN), atomically (no partial file on failure)."""
        write_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default))

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`table` as CSV, atomically."""
        write_atomic(path, self.table().to_csv(index=False))

    def __rich__(self) -> Any:
        return getattr(importlib.import_module("qdiff.render"), self._renderer)(self)

    def _repr_html_(self) -> str:
        return f"<p><b>{self._title}</b></p>" + self.table().to_html(index=False, max_rows=200)


@dataclass(frozen=True)
class ModelInfo:
    """Which model a run read: its label, path and content hash (and size where a check needs it)."""

    name: str
    path: str | None
    sha256: str | None
    bytes: int | None = None

    @classmethod
    def of(cls, loaded: Any, size: int | None = None) -> ModelInfo:
        return cls(loaded.label, str(loaded.path) if loaded.path else None, loaded.sha256, size)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "path": self.path, "sha256": self.sha256}
        if self.bytes is not None:
            out["bytes"] = self.bytes
        return out


@dataclass(frozen=True)
class RunInfo:
    """What reproduces a run, the same for every command: versions, models, data and seed.

    Results keep it in ``meta`` as :meth:`to_meta` gives it, with their own fields added.
    """

    float_model: ModelInfo | None
    quant_model: ModelInfo | None
    data: str | None
    data_sha256: str | None
    samples: int
    random_inputs: bool
    seed: int
    qdiff_version: str
    onnx_version: str
    onnxruntime_version: str | None
    numpy_version: str
    python_version: str

    @classmethod
    def collect(cls, float_model: Any, quant_model: Any, source: Any, seed: int, *, model_bytes: Any = None) -> RunInfo:
        """The record of a run over ``source`` (a :class:`qdiff.inputs.DataSource`, or None when
        no data was read) of two loaded models (either may be None); ``model_bytes(loaded)``, when
        given, adds each model's size."""
        import numpy as np
        import onnx

        from qdiff import __version__

        try:
            import onnxruntime as ort

            ort_version: str | None = ort.__version__
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            ort_version = None

        def model(m: Any) -> ModelInfo | None:
            if m is None:
                return None
            return ModelInfo.of(m, model_bytes(m) if model_bytes is not None else None)

        return cls(
            float_model=model(float_model),
            quant_model=model(quant_model),
            data=source.description if source is not None else None,
            data_sha256=source.fingerprint() if source is not None else None,
            samples=source.samples if source is not None else 0,
            random_inputs=bool(source.random) if source is not None else False,
            seed=seed,
            qdiff_version=__version__,
            onnx_version=onnx.__version__,
            onnxruntime_version=ort_version,
            numpy_version=np.__version__,
            python_version=platform.python_version(),
        )

    def to_meta(self) -> dict[str, Any]:
        """The run's fields as result ``meta`` keys (models as dicts)."""
        return {
            "qdiff_version": self.qdiff_version,
            "onnx_version": self.onnx_version,
            "onnxruntime_version": self.onnxruntime_version,
            "numpy_version": self.numpy_version,
            "python_version": self.python_version,
            "float_model": self.float_model.to_dict() if self.float_model else None,
            "quant_model": self.quant_model.to_dict() if self.quant_model else None,
            "data": self.data,
            "random_inputs": self.random_inputs,
            "data_sha256": self.data_sha256,
            "samples": self.samples,
            "seed": self.seed,
        }


def measured_meta(
    run: RunInfo,
    session: dict[str, Any],
    runs: int,
    batch_size: int,
    notes: list[str],
    pairs: int,
    seconds: float,
    *,
    deployed_check: float | None | bool = False,
    inference_seconds: float | None = None,
) -> dict[str, Any]:
    """The meta of a pass of the measuring engine (compare, sensitivity): the run record, the
    session options, runs, metric settings and notes. ``deployed_check`` (compare only, ``False``
    leaves the key out): the tapped model's largest final-output difference from the model as
    deployed; ``inference_seconds`` (compare only): time inside onnxruntime."""
    from qdiff.metrics import KL_BINS, SQNR_CAP_DB

    common = run.to_meta()
    versions = ("qdiff_version", "onnx_version", "onnxruntime_version", "numpy_version", "python_version")
    meta: dict[str, Any] = {
        **{k: common[k] for k in versions},
        "session": session,
        **{k: common[k] for k in ("float_model", "quant_model", "data", "random_inputs", "data_sha256", "samples")},
        "runs": runs,
        "batch_size": batch_size,
        "seed": common["seed"],
        "metrics": {"kl_bins": KL_BINS, "sqnr_cap_db": SQNR_CAP_DB},
    }
    if deployed_check is not False:
        meta["tapped_vs_deployed_max_abs"] = deployed_check
    meta.update({"notes": notes, "pairs": pairs, "seconds": round(seconds, 3)})
    if inference_seconds is not None:
        meta["inference_seconds"] = round(inference_seconds, 3)
    return meta


@dataclass
class CompareResult(Result):
    """Per-layer comparison of a float model and its quantized twin.

    Attributes:
        layers: one row per matched tensor pair, in the float graph's topological order.
        outputs: the final outputs of both models, with top-1 agreement for class scores.
        weights: float weights against their dequantized values.
        unmatched: what could not be paired or compared, with the reason.
        meta: versions, provider, hashes of models and data, sample count, seed.
        pairs: the tensor pairs behind ``layers`` (same order).
    """

    layers: pd.DataFrame
    outputs: pd.DataFrame
    weights: pd.DataFrame
    unmatched: pd.DataFrame
    meta: dict[str, Any]
    pairs: tuple[TensorPair, ...] = field(default=(), repr=False)

    # -- queries -----------------------------------------------------------------------------
    def worst(self, k: int = 5, by: str = "cosine") -> pd.DataFrame:
        """The ``k`` layers with the lowest mean cosine (or highest value of an error column)."""
        ascending = by in ("cosine", "cosine_worst", "sqnr_db", "sqnr_db_worst")
        df = self.layers[self.layers["kind"] != "input"]
        return df.sort_values(by, ascending=ascending, na_position="first", kind="stable").head(k)

    def summary(self) -> dict[str, Any]:
        """Headline figures: counts, the worst layer and the final-output cosine."""
        layers = self.layers[self.layers["kind"] != "input"]
        worst = self.worst(1)
        out_cos = self.outputs["cosine"].min() if len(self.outputs) else None
        top1 = self.outputs["top1_agreement"].dropna() if len(self.outputs) else pd.Series(dtype=float)
        float_unmatched = self.unmatched[self.unmatched["side"] == "float"] if len(self.unmatched) else self.unmatched
        return {
            "layers_matched": int(len(layers)),
            "unmatched_float": int(len(float_unmatched)),
            "unmatched_quant": int(len(self.unmatched) - len(float_unmatched)),
            "below_threshold": int((layers["cosine"] < COSINE_THRESHOLD).sum()),
            "worst_layer": None if worst.empty else str(worst.iloc[0]["layer"]),
            "worst_cosine": None if worst.empty else _clean(worst.iloc[0]["cosine"]),
            "output_cosine": _clean(out_cos),
            "top1_agreement": _clean(top1.min()) if len(top1) else None,
            "samples": self.meta.get("samples"),
            # no data given: the inputs were seeded normal values, the metrics may not reflect real data
            "random_inputs": bool(self.meta.get("random_inputs", str(self.meta.get("data", "")).startswith("random inputs"))),
        }

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"layers", "outputs", "weights", "unmatched", "summary", "meta"}`` with JSON-safe values."""
        return {
            "layers": _records(self.layers),
            "outputs": _records(self.outputs),
            "weights": _records(self.weights),
            "unmatched": _records(self.unmatched),
            "summary": self.summary(),
            "meta": self.meta,
        }

    _renderer = "compare_renderable"

    def _repr_html_(self) -> str:
        s = self.summary()
        head = (
            f"<p><b>qdiff compare</b>: {s['layers_matched']} layers matched, {s['unmatched_float']} float nodes "
            f"unmatched; worst layer <code>{s['worst_layer']}</code> (cosine {s['worst_cosine']}); "
            f"final-output cosine {s['output_cosine']}</p>"
        )
        return head + self.layers.to_html(index=False, max_rows=200)


@dataclass
class Alignment(Result):
    """How the two graphs were paired (``qdiff match``), without running them.

    Attributes:
        pairs: one row per tensor pair (ALIGNMENT_COLUMNS), float topological order.
        unmatched: what could not be paired, and why.
        skipped: not compared: layout nodes only one model has (matched through), integer (shape) nodes.
        meta: the two models' names and hashes.
    """

    pairs: pd.DataFrame
    unmatched: pd.DataFrame
    skipped: pd.DataFrame
    meta: dict[str, Any]

    _renderer = "alignment_renderable"
    _title = "qdiff match"

    def table(self) -> pd.DataFrame:
        """The pairs (CSV readable back by ``--map``)."""
        return self.pairs

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs": _records(self.pairs),
            "unmatched": _records(self.unmatched),
            "skipped": _records(self.skipped),
            "meta": self.meta,
        }


def _clean(v: Any) -> Any:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(f) else f


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in df.to_dict(orient="records"):
        out.append({k: _json_value(v) for k, v in rec.items()})
    return out


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else (v if math.isfinite(v) else str(v))
    if hasattr(v, "item") and not isinstance(v, (list, tuple, str)):
        try:
            return _json_value(v.item())
        except (ValueError, AttributeError):
            return str(v)
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def json_safe(v: Any) -> Any:
    """Replace NaN/inf floats (not allowed in strict JSON) by None / strings, recursively."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
    return v


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return str(v)
