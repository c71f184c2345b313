"""``qdiff profile``: trace parsing, runtime-name mapping, and a real run on the sample pair.

Timings are noise: the tests assert on structure and on sums that hold by construction, never
on which model or layer is faster.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, strict_json_load

from qdiff.graph import Graph, load_model
from qdiff._profile import LAYER_COLUMNS, _find_node, normalise_name, parse_trace, profile

DIGITS_LAYERS = {"conv1+relu1", "pool1", "conv2+relu2", "pool2", "flatten", "fc1+relu3", "fc2"}


def _run(ts: float, dur: float) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _kernel(name: str, op: str, ts: float, dur: float) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op, "provider": "CPUExecutionProvider"}}


def test_parse_trace_drops_warmup_and_takes_medians():
    events = [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 50},
        _run(100, 50), _kernel("conv1", "Conv", 110, 40),  # warmup
        _run(200, 30), _kernel("conv1", "Conv", 205, 10), {"cat": "Node", "name": "conv1_fence_before", "ts": 204, "dur": 1},
        _run(300, 30), _kernel("conv1", "Conv", 305, 12), _kernel("relu", "Relu", 320, 3),
        _run(400, 90), _kernel("conv1", "Conv", 405, 80),  # one busy run
        _kernel("stray", "Add", 1000, 5),  # outside every run
    ]  # fmt: skip
    nodes, runs = parse_trace(events, skip_runs=1)
    by_name = {n.name: n for n in nodes}
    assert runs == [30.0, 30.0, 90.0]
    assert set(by_name) == {"conv1", "relu"}
    assert by_name["conv1"].us == 12.0 and by_name["conv1"].mean_us == pytest.approx(34.0)
    assert by_name["relu"].us == 0.0  # ran in one of three runs: median 0
    assert by_name["conv1"].op_type == "Conv" and by_name["conv1"].provider == "CPUExecutionProvider"


@pytest.mark.parametrize(
    "runtime,expected",
    [
        ("conv1_token_15", "conv1"),
        ("fused fc1", "fc1"),
        ("relu1_out_nchwc", "relu1_out"),
        ("InsertedPrecisionFreeCast_relu2_out_nchwc", "relu2_out"),
        ("input_DequantizeLinear/duplicated_token_1", "input_DequantizeLinear"),
        ("q_proj_matmul/MatMulAddFusion", "q_proj_matmul"),
        ("ReorderOutput_token_5", "ReorderOutput"),
    ],
)
def test_normalise_name(runtime, expected):
    assert normalise_name(runtime) == expected


def test_runtime_names_find_their_graph_nodes(samples_dir):
    fg = Graph(load_model(samples_dir / "digits_cnn.float.onnx").proto)
    qg = Graph(load_model(samples_dir / "digits_cnn.qoperator.onnx").proto)
    label = lambda g, i: None if i is None else g.node_label(i)  # noqa: E731
    # the NCHWc Conv is named after the Relu's output it was fused with: the Conv, not the Relu
    assert label(fg, _find_node(fg, "relu1_out_nchwc", op_type="Conv")) == "conv1"
    assert label(fg, _find_node(fg, "pool2_out_nchwc", op_type="MaxPool")) == "pool2"
    assert label(fg, _find_node(fg, "fused fc1", op_type="FusedGemm")) == "fc1"
    assert label(qg, _find_node(qg, "conv1_quant_token_1", op_type="QLinearConv")) == "conv1_quant"
    assert _find_node(fg, "ReorderOutput_token_5", op_type="ReorderOutput") is None


def test_profile_digits_pair(samples_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the trace files go (and must leave) here
    result = profile(
        samples_dir / "digits_cnn.float.onnx",
        samples_dir / "digits_cnn.qdq_per_tensor.onnx",
        samples_dir / "digits_test.npz",
        samples=5,
        warmup=1,
    )
    assert list(tmp_path.iterdir()) == []
    layers = result.layers
    assert list(layers.columns) == LAYER_COLUMNS
    real = layers[layers["kind"] == "layer"]
    assert DIGITS_LAYERS <= set(real["layer"])
    matched = real[real["layer"].isin(DIGITS_LAYERS)]
    assert (matched["float_us"] > 0).all() and (matched["quant_us"] > 0).all()
    assert (layers[["float_us", "quant_us", "conversion_us"]] >= 0).all().all()
    assert (layers["conversion_us"] <= layers["quant_us"] + 1e-9).all()
    assert list(real["order"]) == sorted(real["order"])  # float topological order
    s = result.summary
    # every kernel is counted in exactly one row
    assert layers["quant_us"].sum() == pytest.approx(s["quant_kernel_us"], abs=0.01)
    assert layers["float_us"].sum() == pytest.approx(s["float_kernel_us"], abs=0.01)
    assert layers["conversion_us"].sum() == pytest.approx(s["conversion_us"], abs=0.01)
    # kernel time is part of a profiled run's wall time (medians: some slack)
    assert 0 < s["quant_kernel_us"] <= 1.5 * s["quant_profiled_total_us"]
    assert 0 < s["float_kernel_us"] <= 1.5 * s["float_profiled_total_us"]
    assert s["runs"] == 5 and result.meta["warmup"] == 1
    assert s["conversion_us"] > 0  # the input QuantizeLinear and the output DequantizeLinear run
    assert layers.set_index("layer").loc["input:input", "conversion_us"] > 0
    slower = s["quant_total_us"] > s["float_total_us"]
    assert any("slower than the float model" in f.message for f in result.findings) == slower
    out = tmp_path.parent / f"{tmp_path.name}.json"
    result.to_json(out)
    doc = strict_json_load(out)
    assert {"layers", "summary", "findings", "nodes", "meta"} <= set(doc)
    out.unlink()


def test_profile_totals_and_verdict_come_from_unprofiled_sessions(samples_dir, monkeypatch):
    """Profiling adds overhead per node: the totals are timed on sessions with profiling off.

    qdiff's own timer is wrapped to record which sessions it timed and what it measured; the
    summary's totals must be the medians of exactly those runs.
    """
    profile_module = importlib.import_module("qdiff._profile")  # qdiff.profile is also the function

    timed: list[tuple[bool, float]] = []
    real = profile_module._timed_run

    def recording(sess, feed):
        us = real(sess, feed)
        timed.append((bool(sess.get_session_options().enable_profiling), us))
        return us

    monkeypatch.setattr(profile_module, "_timed_run", recording)
    result = profile(samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qoperator.onnx", samples=5, warmup=1, threads=1)
    s = result.summary
    assert len(timed) == 10 and not any(p for p, _ in timed)  # 5 runs of each model, none profiled
    f_us, q_us = [us for _, us in timed[0::2]], [us for _, us in timed[1::2]]  # alternating float, quantized
    assert s["float_total_us"] == pytest.approx(float(np.median(f_us)), abs=1e-3)
    assert s["quant_total_us"] == pytest.approx(float(np.median(q_us)), abs=1e-3)
    assert s["speedup"] == pytest.approx(s["float_total_us"] / s["quant_total_us"], rel=1e-3)
    assert s["timing"] == "unprofiled" and "unprofiled" in result.meta["timing"]
    assert s["float_profiled_total_us"] > 0 and s["quant_profiled_total_us"] > 0  # the profiled runs, kept apart


def test_profile_reports_weights_dequantized_every_run(samples_dir):
    """onnxruntime leaves the transformer's Q/K/V MatMuls in float: their weight DQ runs every time."""
    result = profile(
        samples_dir / "transformer.float.onnx", samples_dir / "transformer.qdq.onnx", samples=2, warmup=0, threads=1
    )
    found = [f for f in result.findings if "dequantize their weights on every run" in f.message]
    assert found and "q_proj_matmul" in found[0].message
    # layers ORT fuses at run time (MatMul+Add -> Gemm, the Gelu chain) are still accounted for
    assert result.layers["float_us"].sum() == pytest.approx(result.summary["float_kernel_us"], abs=0.01)


def test_cli_profile(samples_dir, tmp_path, capfd):
    out = tmp_path / "p.json"
    csv = tmp_path / "p.csv"
    rc, stdout, _ = run_cli(
        [
            "profile", samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qoperator.onnx",
            "--data", samples_dir / "digits_test.npz", "--samples", "3", "--warmup", "1", "--json", out, "--csv", csv,
        ],
        capfd,
    )  # fmt: skip
    assert rc == 0, stdout
    assert "qdiff profile" in stdout and "conv1+relu1" in stdout and "Q/DQ/Cast" in stdout
    assert json.loads(out.read_text())["summary"]["runs"] == 3
    assert csv.read_text().splitlines()[0] == ",".join(LAYER_COLUMNS)
    rc, _, err = run_cli(["profile", samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qoperator.onnx", "--samples", "0"], capfd)
    assert_one_line_error(rc, err, "--samples")
    rc, _, err = run_cli(["profile", samples_dir / "digits_cnn.float.onnx", Path(tmp_path) / "nope.onnx"], capfd)
    assert_one_line_error(rc, err, "nope.onnx")


def test_profile_times_the_injected_session_factory(samples_dir):
    """The timed sessions (totals and verdict) come from the injected factory; the profiled ones
    from the default factory with profiling on. The result is a Result: CSV of the layers."""
    from qdiff.engine.sessions import SessionOptions, default_session_factory
    from qdiff.result import Result

    built: list[str] = []
    inner = default_session_factory(SessionOptions(intra_op_threads=1))

    def factory(model):
        built.append(model.graph.name)
        return inner(model)

    result = profile(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qoperator.onnx", samples=2, warmup=0, threads=1,
        session_factory=factory,
    )  # fmt: skip
    assert len(built) == 2  # the float and the quantized timing session, nothing else
    assert result.summary["float_total_us"] > 0 and result.summary["float_kernel_us"] > 0
    assert isinstance(result, Result) and result.table() is result.layers
    assert result.meta["runs"] == 2 and result.meta["samples"] == 2 and "numpy_version" in result.meta
