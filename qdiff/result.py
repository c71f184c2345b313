"""The result of ``compare``: pandas DataFrames plus the meta that reproduces the run.

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

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qdiff._io import write_atomic
from qdiff.structs import TensorPair

__all__ = ["Alignment", "ALIGNMENT_COLUMNS", "CompareResult", "LAYER_COLUMNS", "OUTPUT_COLUMNS", "WEIGHT_COLUMNS", "UNMATCHED_COLUMNS", "write_atomic"]

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


@dataclass
class CompareResult:
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

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON, atomically (no partial file on failure)."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default)
        write_atomic(path, text)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the ``layers`` rows as CSV, atomically."""
        write_atomic(path, self.layers.to_csv(index=False))

    # -- display -----------------------------------------------------------------------------
    def __rich__(self) -> Any:
        from qdiff.render import compare_renderable

        return compare_renderable(self)

    def _repr_html_(self) -> str:
        s = self.summary()
        head = (
            f"<p><b>qdiff compare</b>: {s['layers_matched']} layers matched, {s['unmatched_float']} float nodes "
            f"unmatched; worst layer <code>{s['worst_layer']}</code> (cosine {s['worst_cosine']}); "
            f"final-output cosine {s['output_cosine']}</p>"
        )
        return head + self.layers.to_html(index=False, max_rows=200)


@dataclass
class Alignment:
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs": _records(self.pairs),
            "unmatched": _records(self.unmatched),
            "skipped": _records(self.skipped),
            "meta": self.meta,
        }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the alignment as JSON (readable back by ``--map``), atomically."""
        write_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_default))

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the pairs as CSV (readable back by ``--map``), atomically."""
        write_atomic(path, self.pairs.to_csv(index=False))


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


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return str(v)
