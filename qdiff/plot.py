"""Plots of qdiff results with matplotlib (imported only inside the functions that draw).

Every function takes a result (or the values it plots), an optional ``ax=`` to draw on, and
returns what it drew on: an ``Axes`` (or, for :func:`layer_values`, the ``Figure`` holding its two
Axes). Nothing here computes a metric; the functions only read the result's columns (the one
transformation is ``1 - cosine``, drawn on a log scale so that 0.9999 and 0.99 look different).

::

    layer_error(compare_result, metric="cosine")   cosine / SQNR / MSE / ... along the graph
    accumulated_vs_isolated(sensitivity_result)    both errors per layer, side by side
    layer_values(inspect_layer.layer_values(...))  histograms + scatter of one layer, with the
                                                   quantization grid
    sensitivity_ranking(sensitivity_result)        the ranking column as horizontal bars
    fallback_history(fallback_result)              metric of every model the loop tried, the
                                                   target, and how many layers were in float

When no ``ax`` is given a new figure is made with ``matplotlib.pyplot`` (so notebooks show it);
pass an ``ax`` (e.g. from ``matplotlib.figure.Figure().subplots()``) to draw without pyplot.
Drawn artists carry a ``gid`` (``"metric"``, ``"threshold"``, ``"quant-grid"``, ...) so that
callers and tests can find them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qdiff.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from qdiff.inspect_layer import LayerValues

__all__ = [
    "layer_error",
    "accumulated_vs_isolated",
    "layer_values",
    "sensitivity_ranking",
    "fallback_history",
    "quantization_levels",
    "METRIC_ALIASES",
    "MAX_GRID_LINES",
]

#: short metric names accepted by :func:`layer_error` -> ``result.layers`` column
METRIC_ALIASES = {"sqnr": "sqnr_db", "sqnr_worst": "sqnr_db_worst", "cos": "cosine"}

#: error metrics (non-negative, lower is better) drawn on a log y axis
_LOG_METRICS = {"mse", "mse_worst", "mae", "mae_worst", "max_abs", "kl", "kl_worst", "isolated_mse", "noise_ratio", "noise_floor"}

#: the quantization grid is drawn only when at most this many levels fall in the value range
MAX_GRID_LINES = 512

#: at most this many points in the scatter of :func:`layer_values` (an even subsample beyond it)
_MAX_SCATTER = 20000

_BAD = "#d32f2f"
_GOOD = "#388e3c"


def _threshold() -> float:
    from qdiff.result import COSINE_THRESHOLD

    return COSINE_THRESHOLD


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, new = plt.subplots(figsize=figsize, layout="constrained")
    return new


def _label_layers(ax: Axes, names: Sequence[str], *, axis: str = "x") -> None:
    """Tick labels with the layer names; every k-th one when there are many."""
    n = len(names)
    step = max(1, math.ceil(n / 60))
    pos = list(range(0, n, step))
    if axis == "x":
        ax.set_xticks(pos)
        ax.set_xticklabels([names[i] for i in pos], rotation=60, ha="right", fontsize=8 if n > 20 else 9)
        ax.set_xlim(-0.5, max(n, 1) - 0.5)
    else:
        ax.set_yticks(pos)
        ax.set_yticklabels([names[i] for i in pos], fontsize=8 if n > 20 else 9)


def _empty(ax: Axes, title: str) -> Axes:
    """An Axes saying there is nothing to draw."""
    ax.text(0.5, 0.5, "no layers to show", ha="center", va="center", transform=ax.transAxes, gid="empty")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return ax


def _floats(values: Any) -> np.ndarray:
    import pandas as pd

    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)


def layer_error(result: Any, metric: str = "cosine", ax: Axes | None = None) -> Axes:
    """One metric per layer along the graph (the float graph's topological order).

    ``cosine`` gets a dashed line at the 0.99 threshold and the layers below it in red; ``mse``
    (and the other error metrics) a log y axis. When the result has the metric's worst-sample
    column (``cosine_worst``, ...) it is drawn as a lighter line.

    Args:
        result: a :class:`~qdiff.result.CompareResult` (or anything with a ``layers``
            DataFrame holding ``layer`` and the metric column, in graph order; a
            :class:`~qdiff.SensitivityResult` is put back in graph order).
        metric: a ``result.layers`` column (``cosine``, ``sqnr_db``, ``mse``, ``kl``,
            ``max_abs``, ...); ``sqnr`` is accepted for ``sqnr_db``.
        ax: the Axes to draw on (default: a new figure).

    Returns:
        The Axes drawn on.

    Raises:
        UsageError: ``metric`` is not a column of ``result.layers``.
    """
    layers = result.layers
    if "rank" in layers.columns and "order" in layers.columns:  # a sensitivity ranking: back to graph order
        layers = layers.sort_values("order", kind="stable")
    col = METRIC_ALIASES.get(metric, metric)
    if col not in layers.columns or col in ("layer", "op_type", "kind", "note", "shape"):
        numeric = [c for c in layers.columns if c not in ("order", "samples") and layers[c].dtype.kind in "fi"]
        raise UsageError(f"metric '{metric}' is not a per-layer metric; use one of {', '.join(numeric)}")
    names = [str(x) for x in layers["layer"]]
    n = len(names)
    ax = _new_axes(ax, (max(6.0, min(0.35 * n + 2, 18.0)), 3.8))
    if n == 0:
        return _empty(ax, f"{col} per layer")
    x = np.arange(n)
    y = _floats(layers[col])
    worst_col = f"{col}_worst"
    if worst_col in layers.columns and col != worst_col:
        ax.plot(x, _floats(layers[worst_col]), ls=":", marker=".", color="C0", alpha=0.5, label="worst sample", gid="worst")
    ax.plot(x, y, marker="o", color="C0", label="mean over samples", gid="metric")
    if col.startswith("cosine") or col.endswith("_cosine"):
        thr = _threshold()
        ax.axhline(thr, ls="--", color="grey", lw=1, label=f"cosine {thr}", gid="threshold")
        bad = y < thr
        if bad.any():
            ax.plot(x[bad], y[bad], ls="none", marker="o", color=_BAD, label=f"below {thr}", gid="below")
    if col in _LOG_METRICS:
        ax.set_yscale("log")
    ax.set_ylabel(col)
    ax.set_title(f"{col} per layer")
    _label_layers(ax, names)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return ax


def accumulated_vs_isolated(sens_result: Any, ax: Axes | None = None, *, metric: str = "cosine") -> Axes:
    """Accumulated and isolated error of each layer, side by side, in graph order.

    Accumulated error (both models on their own activations) grows along the graph; isolated
    error (the quantized layer fed float activations) shows which layer causes it. With
    ``metric="cosine"`` the bars are ``1 - cosine`` on a log axis (taller is worse; values at or
    below 1e-12 are drawn at 1e-12) with the 0.99 threshold as a dashed line; with
    ``metric="sqnr"`` they are the SQNR in dB (taller is better).

    Args:
        sens_result: a :class:`~qdiff.SensitivityResult`.
        ax: the Axes to draw on (default: a new figure).
        metric: ``cosine`` or ``sqnr``.

    Returns:
        The Axes drawn on; its two bar containers are labelled ``accumulated`` and ``isolated``.
    """
    if metric not in ("cosine", "sqnr"):
        raise UsageError(f"metric must be 'cosine' or 'sqnr', got '{metric}'")
    df = sens_result.layers.sort_values("order", kind="stable")
    names = [str(x) for x in df["layer"]]
    n = len(names)
    ax = _new_axes(ax, (max(6.0, min(0.45 * n + 2, 18.0)), 3.8))
    if n == 0:
        return _empty(ax, "accumulated vs isolated error per layer")
    x = np.arange(n)
    w = 0.4
    if metric == "cosine":
        floor = 1e-12
        acc = np.clip(1.0 - _floats(df["accumulated_cosine"]), floor, None)
        iso = np.clip(1.0 - _floats(df["isolated_cosine"]), floor, None)
        ax.set_yscale("log")
        ax.axhline(1.0 - _threshold(), ls="--", color="grey", lw=1, label=f"cosine {_threshold()}", gid="threshold")
        ax.set_ylabel("1 − cosine (log)")
    else:
        acc = _floats(df["accumulated_sqnr_db"])
        iso = _floats(df["isolated_sqnr_db"])
        ax.set_ylabel("SQNR (dB)")
    ax.bar(x - w / 2, acc, w, label="accumulated", color="C0", gid="accumulated")
    ax.bar(x + w / 2, iso, w, label="isolated", color="C1", gid="isolated")
    ax.set_title("accumulated vs isolated error per layer")
    _label_layers(ax, names)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return ax


def quantization_levels(step: float | None, zero_point: float | None, lo: float, hi: float,
                        qmin: int | None = None, qmax: int | None = None) -> np.ndarray:  # fmt: skip
    """The representable values ``step * (k - zero_point)`` within ``[lo, hi]``.

    ``k`` runs over the integers (bounded by ``qmin``/``qmax`` when given). Empty when the step is
    unknown or not positive, or when more than :data:`MAX_GRID_LINES` levels fall in the range.
    """
    if step is None or not np.isfinite(step) or step <= 0 or not (np.isfinite(lo) and np.isfinite(hi)):
        return np.empty(0)
    zp = 0.0 if zero_point is None else float(zero_point)
    k_lo = math.ceil(lo / step + zp - 1e-9)
    k_hi = math.floor(hi / step + zp + 1e-9)
    if qmin is not None:
        k_lo = max(k_lo, int(qmin))
    if qmax is not None:
        k_hi = min(k_hi, int(qmax))
    if k_hi < k_lo or k_hi - k_lo + 1 > MAX_GRID_LINES:
        return np.empty(0)
    return step * (np.arange(k_lo, k_hi + 1, dtype=float) - zp)


def layer_values(values: LayerValues, ax: Sequence[Axes] | None = None, *, bins: int = 100) -> Figure:
    """Float and quantized values of one layer: histograms, and quantized against float.

    Left: both value histograms on a shared range, with the quantization levels as vertical
    lines. Right: each quantized value against its float value, with the levels as horizontal
    lines (quantized values sit on them) and the ``y = x`` diagonal. The grid is drawn when the
    step (and zero point) are known and at most :data:`MAX_GRID_LINES` levels fall in the range.

    Args:
        values: from :func:`qdiff.inspect_layer.layer_values`.
        ax: two Axes to draw on (default: a new figure with two).
        bins: histogram bins.

    Returns:
        The Figure holding the two Axes.
    """
    if ax is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    else:
        axes = list(ax) if not hasattr(ax, "plot") else None
        if axes is None or len(axes) != 2:
            raise UsageError("layer_values draws on two Axes: pass ax=(hist_ax, scatter_ax)")
        fig = axes[0].figure
    h_ax, s_ax = axes[0], axes[1]
    f = np.asarray(values.float_values, dtype=np.float64).reshape(-1)
    q = np.asarray(values.quant_values, dtype=np.float64).reshape(-1)
    ok = np.isfinite(f) & np.isfinite(q) if f.size == q.size else None
    fin_f = f[np.isfinite(f)]
    fin_q = q[np.isfinite(q)]
    both = np.concatenate([fin_f, fin_q])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    levels = quantization_levels(values.step, values.zero_point, lo, hi, getattr(values, "qmin", None), getattr(values, "qmax", None))

    h_ax.hist(fin_f, bins=bins, range=(lo, hi), alpha=0.55, color="C0", label="float", gid="float-hist")
    h_ax.hist(fin_q, bins=bins, range=(lo, hi), alpha=0.55, color="C1", label="quantized", gid="quant-hist")
    if levels.size:
        h_ax.vlines(levels, 0, 1, transform=h_ax.get_xaxis_transform(), colors="grey", lw=0.5, alpha=0.5,
                    label=f"quantization levels ({levels.size})", gid="quant-grid")  # fmt: skip
    h_ax.set_xlabel("value")
    h_ax.set_ylabel("count")
    if fin_f.size > 1000:  # many values: a log count axis shows the tails
        h_ax.set_yscale("log")
    h_ax.legend(fontsize=8)
    title = f"{values.layer}: values"
    if values.step:
        title += f" (step {values.step:.4g}" + (f", zero point {values.zero_point:g})" if values.zero_point is not None else ")")
    h_ax.set_title(title, fontsize=10)

    if ok is not None:
        fs, qs = f[ok], q[ok]
        if fs.size > _MAX_SCATTER:
            idx = np.linspace(0, fs.size - 1, _MAX_SCATTER).astype(np.int64)
            fs, qs = fs[idx], qs[idx]
        few = fs.size <= 500
        s_ax.scatter(fs, qs, s=16 if few else 4, alpha=0.6 if few else 0.4, color="C1", label="quantized vs float",
                     gid="scatter", rasterized=fs.size > 2000)  # fmt: skip
    s_ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1, label="y = x", gid="diagonal")
    if levels.size:
        s_ax.hlines(levels, 0, 1, transform=s_ax.get_yaxis_transform(), colors="grey", lw=0.5, alpha=0.5, gid="quant-grid")
    s_ax.set_xlim(lo, hi)
    s_ax.set_ylim(lo, hi)
    s_ax.set_xlabel("float value")
    s_ax.set_ylabel("quantized value (dequantized)")
    s_ax.set_title(f"{values.layer}: quantized vs float", fontsize=10)
    s_ax.legend(fontsize=8, loc="upper left")
    return fig


def _ranking_column(sens_result: Any) -> str:
    from qdiff._sensitivity import RANK_BY

    by = sens_result.meta.get("by", "isolated")
    return RANK_BY.get(by, ("isolated_cosine", True))[0]


def sensitivity_ranking(sens_result: Any, top: int = 20, ax: Axes | None = None) -> Axes:
    """The ``top`` most sensitive layers as horizontal bars of the ranking column, most sensitive on top.

    Cosine rankings are drawn as ``1 - cosine`` (log axis; longer is worse), the noise ratio on a
    log axis, gain as it is. Layers without a value in the ranking column are left out.

    Args:
        sens_result: a :class:`~qdiff.SensitivityResult` (rows already ranked).
        top: how many layers.
        ax: the Axes to draw on (default: a new figure).

    Returns:
        The Axes drawn on (one bar per layer shown).
    """
    if top < 1:
        raise UsageError(f"top must be at least 1, got {top}")
    col = _ranking_column(sens_result)
    df = sens_result.layers
    vals = _floats(df[col])
    keep = np.isfinite(vals)
    df = df[keep].head(top)
    vals = vals[keep][:top]
    names = [str(x) for x in df["layer"]]
    ax = _new_axes(ax, (7.0, max(2.5, 0.3 * len(names) + 1.2)))
    if not names:
        return _empty(ax, f"sensitivity ranking (by {sens_result.meta.get('by', 'isolated')})")
    y = np.arange(len(names))
    if col.endswith("cosine"):
        widths = np.clip(1.0 - vals, 1e-12, None)
        label = f"1 − {col}"
        ax.set_xscale("log")
    else:
        widths = vals
        label = col
        if col == "noise_ratio":
            ax.set_xscale("log")
    colors = [_BAD if ("cos<" in str(f)) else "C0" for f in df.get("flags", [""] * len(names))]
    ax.barh(y, widths, color=colors, gid="ranking")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8 if len(names) > 20 else 9)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.set_title(f"sensitivity ranking (by {sens_result.meta.get('by', 'isolated')})")
    ax.grid(True, axis="x", alpha=0.3)
    return ax


def fallback_history(result_or_history: Any, ax: Axes | None = None, *, target: float | None = None) -> Axes:
    """The metric of every model the fallback loop tried, the target, and the float-layer count.

    Args:
        result_or_history: a :class:`~qdiff.FallbackResult` or its ``history``
            DataFrame (HISTORY_COLUMNS).
        ax: the Axes to draw on (default: a new figure); the float-layer count goes on a twin
            y axis (``ax.figure.axes``).
        target: the target value; read from the result's ``baseline["target"]`` when not given.

    Returns:
        The primary Axes (metric and target).
    """
    history: pd.DataFrame = getattr(result_or_history, "history", result_or_history)
    kind = "cosine"
    if target is None and hasattr(result_or_history, "baseline"):
        text = result_or_history.baseline.get("target")
        if text:
            from qdiff._fallback import parse_target

            t = parse_target(str(text))
            target, kind = t.value, t.kind
    n = len(history)
    ax = _new_axes(ax, (max(6.0, min(0.5 * n + 3, 16.0)), 4.0))
    if n == 0:
        return _empty(ax, "fallback history")
    x = np.arange(1, n + 1)
    metric = _floats(history["metric"])
    met = history["target_met"].astype(bool).to_numpy() if n else np.zeros(0, dtype=bool)
    ax.plot(x, metric, color="C0", marker="o", label="metric", gid="metric", zorder=3)
    if met.any():
        ax.plot(x[met], metric[met], ls="none", marker="o", ms=9, mfc="none", mec=_GOOD, mew=2, label="target met", gid="met", zorder=4)
    if target is not None:
        ax.axhline(target, ls="--", color=_BAD, lw=1, label=f"target {target:g}", gid="target")
    ax.set_xlabel("model tried")
    ax.set_ylabel("final-output cosine" if kind == "cosine" else "metric drop")
    ax.set_xticks(x)
    ax.set_xticklabels([str(s) for s in history["step"]], rotation=45, ha="right", fontsize=8)
    twin = ax.twinx()
    twin.step(x, history["n_float"].to_numpy(dtype=float), where="mid", color="C2", alpha=0.8, label="layers in float", gid="n_float")
    twin.set_ylabel("layers in float", color="C2")
    top = int(history["n_float"].max()) if n else 1
    twin.set_ylim(0, max(top, 1) + 0.5)
    twin.yaxis.get_major_locator().set_params(integer=True)
    lines = ax.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    ax.set_title("fallback history")
    ax.grid(True, axis="y", alpha=0.3)
    return ax
