"""qdiff.plot on the Agg backend: assertions on what each function drew, not on pixels."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import qdiff  # noqa: E402
from qdiff import plot  # noqa: E402
from qdiff.errors import UsageError  # noqa: E402
from qdiff._fallback import HISTORY_COLUMNS, FallbackResult  # noqa: E402
from qdiff.inspect_layer import LayerValues, layer_values  # noqa: E402


@pytest.fixture(scope="module")
def compare_result(samples_dir):
    return qdiff.compare(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx",
        data=samples_dir / "digits_test.npz", samples=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sens_result(samples_dir):
    return qdiff.sensitivity(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx",
        data=samples_dir / "digits_test.npz", samples=8, gain=False,
    )  # fmt: skip


def _axes():
    return Figure().add_subplot()


def _by_gid(artists, gid):
    found = [a for a in artists if a.get_gid() == gid]
    assert len(found) == 1, f"expected one artist with gid {gid!r}, found {len(found)}"
    return found[0]


def _grid(ax) -> LineCollection:
    return _by_gid([c for c in ax.collections if isinstance(c, LineCollection)], "quant-grid")


def _fallback_history() -> pd.DataFrame:
    rows = [
        (0, "start", "", 0, 0, "", 0.9990, False, 9000, 0.1, "", ""),
        (0, "baseline", "conv1 fc2", 2, 410, "first+last", 0.9993, False, 9500, 0.1, "", ""),
        (1, "bisect k=1", "fc1", 1, 2000, "+fc1", 0.9996, True, 15000, 0.1, "", ""),
        (2, "prune", "", 0, 0, "-fc1", 0.9990, False, 9000, 0.1, "", ""),
    ]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


# -- layer_error ----------------------------------------------------------------------------------


def test_layer_error_cosine_draws_each_layer_and_the_threshold(compare_result):
    layers = compare_result.layers
    ax = plot.layer_error(compare_result, "cosine", ax=_axes())
    line = _by_gid(ax.lines, "metric")
    np.testing.assert_allclose(line.get_ydata(), layers["cosine"].to_numpy())
    np.testing.assert_array_equal(line.get_xdata(), np.arange(len(layers)))
    threshold = _by_gid(ax.lines, "threshold")
    assert list(threshold.get_ydata()) == [0.99, 0.99]
    assert threshold.get_linestyle() == "--"
    np.testing.assert_allclose(_by_gid(ax.lines, "worst").get_ydata(), layers["cosine_worst"].to_numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == list(layers["layer"])
    assert ax.get_yscale() == "linear"
    assert ax.get_ylabel() == "cosine"
    assert not [a for a in ax.lines if a.get_gid() == "below"]  # the sample CNN has no layer below 0.99


def test_layer_error_marks_layers_below_the_threshold():
    df = pd.DataFrame({"layer": ["a", "b", "c"], "cosine": [0.999, 0.95, np.nan]})
    ax = plot.layer_error(SimpleNamespace(layers=df), ax=_axes())
    below = _by_gid(ax.lines, "below")
    assert list(below.get_xdata()) == [1] and list(below.get_ydata()) == [0.95]


def test_layer_error_mse_is_on_a_log_scale(compare_result):
    ax = plot.layer_error(compare_result, "mse", ax=_axes())
    assert ax.get_yscale() == "log"
    assert not [a for a in ax.lines if a.get_gid() == "threshold"]
    np.testing.assert_allclose(_by_gid(ax.lines, "metric").get_ydata(), compare_result.layers["mse"].to_numpy())


def test_layer_error_sqnr_alias(compare_result):
    ax = plot.layer_error(compare_result, "sqnr", ax=_axes())
    assert ax.get_ylabel() == "sqnr_db" and ax.get_yscale() == "linear"
    np.testing.assert_allclose(_by_gid(ax.lines, "metric").get_ydata(), compare_result.layers["sqnr_db"].to_numpy())


def test_layer_error_unknown_metric_names_the_valid_ones(compare_result):
    with pytest.raises(UsageError, match="cosine"):
        plot.layer_error(compare_result, "accuracy", ax=_axes())


def test_layer_error_without_ax_makes_a_figure(compare_result):
    ax = plot.layer_error(compare_result)
    assert ax.figure is not None and ax in ax.figure.axes
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


# -- accumulated vs isolated, ranking ---------------------------------------------------------------


def test_accumulated_vs_isolated_bars_side_by_side(sens_result):
    df = sens_result.layers.sort_values("order")
    ax = plot.accumulated_vs_isolated(sens_result, ax=_axes())
    containers = {c.get_label(): c for c in ax.containers}
    assert set(containers) == {"accumulated", "isolated"}
    for name, col in (("accumulated", "accumulated_cosine"), ("isolated", "isolated_cosine")):
        heights = [p.get_height() for p in containers[name].patches]
        assert len(heights) == len(df)
        np.testing.assert_allclose(heights, np.clip(1 - df[col].to_numpy(), 1e-12, None))
    acc_x = [p.get_x() for p in containers["accumulated"].patches]
    iso_x = [p.get_x() for p in containers["isolated"].patches]
    assert all(a < i for a, i in zip(acc_x, iso_x))  # side by side, accumulated on the left
    assert ax.get_yscale() == "log"
    assert list(_by_gid(ax.lines, "threshold").get_ydata()) == pytest.approx([0.01, 0.01])
    assert [t.get_text() for t in ax.get_xticklabels()] == list(df["layer"])


def test_accumulated_vs_isolated_sqnr_is_linear(sens_result):
    ax = plot.accumulated_vs_isolated(sens_result, ax=_axes(), metric="sqnr")
    assert ax.get_yscale() == "linear"
    heights = [p.get_height() for p in ax.containers[1].patches]
    np.testing.assert_allclose(heights, sens_result.layers.sort_values("order")["isolated_sqnr_db"].to_numpy())


@pytest.mark.parametrize("top", [3, 20])
def test_sensitivity_ranking_one_bar_per_top_layer(sens_result, top):
    ax = plot.sensitivity_ranking(sens_result, top=top, ax=_axes())
    k = min(top, len(sens_result.layers))
    bars = ax.patches
    assert len(bars) == k
    expected = sens_result.layers.head(k)
    np.testing.assert_allclose([b.get_width() for b in bars], 1 - expected["isolated_cosine"].to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == list(expected["layer"])
    assert ax.yaxis_inverted()  # most sensitive on top
    assert ax.get_xscale() == "log"


def test_sensitivity_ranking_by_gain_is_linear():
    df = pd.DataFrame({"layer": ["a", "b", "c"], "gain": [0.3, 0.1, np.nan], "flags": ["cos<0.99", "", ""]})
    result = SimpleNamespace(layers=df, meta={"by": "gain"})
    ax = plot.sensitivity_ranking(result, top=5, ax=_axes())
    assert [b.get_width() for b in ax.patches] == [0.3, 0.1]  # the layer without a value is left out
    assert ax.get_xscale() == "linear"
    assert ax.patches[0].get_facecolor() != ax.patches[1].get_facecolor()  # the flagged one is red


# -- fallback history -----------------------------------------------------------------------------


def test_fallback_history_from_a_result():
    history = _fallback_history()
    result = FallbackResult(True, 0.9996, ["fc1"], 2000, None, None, history, {"target": "cosine>=0.9995"})
    ax = plot.fallback_history(result, ax=_axes())
    metric = _by_gid(ax.lines, "metric")
    np.testing.assert_allclose(metric.get_ydata(), history["metric"].to_numpy())
    np.testing.assert_array_equal(metric.get_xdata(), [1, 2, 3, 4])
    assert list(_by_gid(ax.lines, "target").get_ydata()) == [0.9995, 0.9995]
    met = _by_gid(ax.lines, "met")
    assert list(met.get_xdata()) == [3]
    twins = [a for a in ax.figure.axes if a is not ax]
    assert len(twins) == 1
    n_float = _by_gid(twins[0].lines, "n_float")
    assert list(n_float.get_ydata()) == [0, 2, 1, 0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(history["step"])


def test_fallback_history_from_a_dataframe_with_a_target():
    ax = plot.fallback_history(_fallback_history(), ax=_axes(), target=0.999)
    assert list(_by_gid(ax.lines, "target").get_ydata()) == [0.999, 0.999]
    ax = plot.fallback_history(_fallback_history(), ax=_axes())
    assert not [a for a in ax.lines if a.get_gid() == "target"]


# -- layer values and the quantization grid -------------------------------------------------------


def test_quantization_levels_in_range():
    levels = plot.quantization_levels(0.1, 3, -0.3, 0.5)
    np.testing.assert_allclose(levels, 0.1 * (np.arange(0, 9) - 3))
    np.testing.assert_allclose(plot.quantization_levels(0.1, 3, -1.0, 0.5, qmin=0, qmax=5), 0.1 * (np.arange(0, 6) - 3))
    assert plot.quantization_levels(None, 0, 0, 1).size == 0
    assert plot.quantization_levels(1e-6, 0, 0, 1).size == 0  # too many levels to draw


def test_layer_values_draws_the_grid_at_the_quantization_levels():
    step, zp = 0.1, 3.0
    rng = np.random.default_rng(0)
    f = rng.uniform(-0.3, 0.5, size=200).astype(np.float32)
    f[:2] = [-0.3, 0.5]
    q = (np.clip(np.round(f / step) + zp, 0, 255) - zp) * step
    values = LayerValues("conv1+relu1", f, q, step, zp, 0, 255)
    fig = Figure()
    axes = fig.subplots(1, 2)
    assert plot.layer_values(values, ax=axes) is fig
    expected = step * (np.arange(0, 9) - zp)
    hist_grid = _grid(axes[0])
    assert len(hist_grid.get_segments()) == len(expected) == 9
    np.testing.assert_allclose(sorted(s[0][0] for s in hist_grid.get_segments()), expected, atol=1e-9)  # vertical lines
    scatter_grid = _grid(axes[1])
    np.testing.assert_allclose(sorted(s[0][1] for s in scatter_grid.get_segments()), expected, atol=1e-9)  # horizontal
    scatter = _by_gid(axes[1].collections, "scatter")
    assert len(scatter.get_offsets()) == 200
    assert len(axes[0].patches) == 2 * 100  # two histograms of 100 bins
    assert _by_gid(axes[1].lines, "diagonal") is not None


def test_layer_values_without_a_step_draws_no_grid():
    values = LayerValues("fc2", np.arange(5.0), np.arange(5.0) + 0.01, None, None)
    fig = plot.layer_values(values, ax=Figure().subplots(1, 2))
    for ax in fig.axes:
        assert not [c for c in ax.collections if c.get_gid() == "quant-grid"]


def test_layer_values_needs_two_axes():
    values = LayerValues("fc2", np.arange(5.0), np.arange(5.0), None, None)
    with pytest.raises(UsageError, match="two Axes"):
        plot.layer_values(values, ax=_axes())


def test_layer_values_of_a_real_layer_sit_on_its_grid(samples_dir):
    values = layer_values(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx", "conv1+relu1",
        data=samples_dir / "digits_test.npz", sample=2,
    )  # fmt: skip
    assert values.layer == "conv1+relu1" and values.sample == 2
    assert values.float_values.shape == values.quant_values.shape == (1, 8, 8, 8)
    assert values.step == pytest.approx(0.0211206, rel=1e-5) and values.zero_point == 0.0
    assert (values.qmin, values.qmax) == (0, 255)
    k = values.quant_values / values.step + values.zero_point
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # every quantized value is a grid level
    fig = plot.layer_values(values, ax=Figure().subplots(1, 2))
    lo = min(values.float_values.min(), values.quant_values.min())
    hi = max(values.float_values.max(), values.quant_values.max())
    n_levels = int(np.floor(hi / values.step + 1e-9)) - int(np.ceil(lo / values.step - 1e-9)) + 1
    assert len(_grid(fig.axes[0]).get_segments()) == n_levels


def test_layer_values_integer_taps_are_dequantized(samples_dir):
    values = layer_values(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qoperator.onnx", "fc2",
        data=samples_dir / "digits_test.npz",
    )  # fmt: skip
    assert values.quant_values.dtype.kind == "f"
    assert values.zero_point == 152.0
    cos = float(np.dot(values.float_values.ravel(), values.quant_values.ravel()) / (
        np.linalg.norm(values.float_values) * np.linalg.norm(values.quant_values)))  # fmt: skip
    assert cos > 0.99


def test_layer_values_unknown_layer_lists_the_layers(samples_dir):
    with pytest.raises(UsageError, match="conv1\\+relu1"):
        layer_values(samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx", "nope")


def test_results_are_only_read(compare_result):
    before = compare_result.layers.copy()
    plot.layer_error(replace(compare_result), "kl", ax=_axes())
    pd.testing.assert_frame_equal(compare_result.layers, before)


def test_import_plot_does_not_load_matplotlib():
    code = "import sys, qdiff.plot, qdiff.report_html, qdiff.node_data, qdiff.cli._common; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_empty_results_say_so():
    empty = SimpleNamespace(layers=pd.DataFrame({"layer": [], "cosine": []}, dtype=float), meta={"by": "isolated"})
    for ax in (plot.layer_error(empty, ax=_axes()), plot.fallback_history(pd.DataFrame(columns=HISTORY_COLUMNS), ax=_axes())):
        assert _by_gid(ax.texts, "empty").get_text() == "no layers to show"


def test_layer_error_puts_a_sensitivity_ranking_back_in_graph_order(sens_result):
    ax = plot.layer_error(sens_result, "isolated_cosine", ax=_axes())
    in_order = sens_result.layers.sort_values("order")
    assert [t.get_text() for t in ax.get_xticklabels()] == list(in_order["layer"])
    np.testing.assert_allclose(_by_gid(ax.lines, "metric").get_ydata(), in_order["isolated_cosine"].to_numpy())
    assert list(_by_gid(ax.lines, "threshold").get_ydata()) == [0.99, 0.99]
