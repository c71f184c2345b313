"""compare() end to end: values checked against independent numpy computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import finish, matmul_relu, quantize
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat

import qdiff
from qdiff.engine.sessions import available_cpus

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _np_quantize(x, scale, zp):
    info = np.iinfo(zp.dtype)
    return np.clip(np.rint(x / scale) + zp.astype(np.int64), info.min, info.max).astype(zp.dtype)


def _np_dequantize(q, scale, zp):
    return (q.astype(np.float32) - zp.astype(np.float32)) * scale


def test_layer_metrics_match_an_independent_numpy_simulation(tmp_path):
    """MatMul -> Relu quantized to QDQ; the int8 arithmetic is redone in numpy from the model's scales."""
    f = tmp_path / "f.onnx"
    matmul_relu(f)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.normal(size=(1, 4)).astype(np.float32)} for _ in range(16)]
    q = quantize(f, tmp_path / "q.onnx", calib, quant_format=QuantFormat.QDQ, per_channel=False)
    xs = rng.normal(size=(6, 1, 4)).astype(np.float32)
    result = qdiff.compare(f, q, data={"x": xs.reshape(6, 4)})

    qm = onnx.load(str(q))
    p = {t.name: numpy_helper.to_array(t) for t in qm.graph.initializer}
    w = numpy_helper.to_array(onnx.load(str(f)).graph.initializer[0])
    w_dq = _np_dequantize(p["W_quantized"], p["W_scale"], p["W_zero_point"])
    cos, mse, sqnr, max_abs = [], [], [], 0.0
    for x in xs:
        ref = np.maximum(x @ w, 0)
        x_dq = _np_dequantize(_np_quantize(x, p["x_scale"], p["x_zero_point"]), p["x_scale"], p["x_zero_point"])
        y = np.maximum(x_dq @ w_dq, 0)  # the Relu is fused into the MatMul's output quantization
        y_dq = _np_dequantize(_np_quantize(y, p["y_scale"], p["y_zero_point"]), p["y_scale"], p["y_zero_point"])
        r, c = ref.astype(np.float64).ravel(), y_dq.astype(np.float64).ravel()
        cos.append(1.0 if not r.any() and not c.any() else r @ c / (np.linalg.norm(r) * np.linalg.norm(c)))
        mse.append(np.mean((r - c) ** 2))
        noise = np.sum((r - c) ** 2)
        sqnr.append(200.0 if noise == 0 else min(200.0, 10 * np.log10(np.sum(r**2) / noise)))
        max_abs = max(max_abs, np.abs(r - c).max())

    row = result.layers.set_index("layer").loc["mm+relu"]
    assert row["float_tensor"] == "y" and row["samples"] == 6
    assert row["cosine"] == pytest.approx(np.mean(cos), abs=1e-5)
    assert row["cosine_worst"] == pytest.approx(np.min(cos), abs=1e-5)
    assert row["mse"] == pytest.approx(np.mean(mse), rel=1e-3, abs=1e-9)
    assert row["mse_worst"] == pytest.approx(np.max(mse), rel=1e-3, abs=1e-9)
    assert row["sqnr_db"] == pytest.approx(np.mean(sqnr), abs=0.05)
    assert row["max_abs"] == pytest.approx(max_abs, rel=1e-3, abs=1e-7)
    # the input row measures the input quantization alone
    inp = result.layers.set_index("layer").loc["input:x"]
    x_err = [
        np.mean((x - _np_dequantize(_np_quantize(x, p["x_scale"], p["x_zero_point"]), p["x_scale"], p["x_zero_point"])) ** 2)
        for x in xs
    ]
    assert inp["mse"] == pytest.approx(np.mean(x_err), rel=1e-4)


def test_output_metrics_match_untapped_sessions(tmp_path):
    """Final-output cosine and top-1 agreement against plain onnxruntime runs of the two files."""
    f, q = SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.qdq_per_tensor.onnx"
    data = np.load(SAMPLES / "digits_test.npz")["input"][:40]
    result = qdiff.compare(f, q, data={"input": data})
    sf, sq = ort.InferenceSession(str(f)), ort.InferenceSession(str(q))
    cos, agree = [], 0
    for x in data:
        a = sf.run(None, {"input": x[None]})[0].astype(np.float64).ravel()
        b = sq.run(None, {"input": x[None]})[0].astype(np.float64).ravel()
        cos.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        agree += int(a.argmax() == b.argmax())
    out = result.outputs.iloc[0]
    assert out["cosine"] == pytest.approx(np.mean(cos), abs=1e-6)
    assert out["top1_agreement"] == pytest.approx(agree / len(data))
    assert result.meta["tapped_vs_deployed_max_abs"] is not None


@pytest.mark.parametrize("variant", ["qdq_per_channel", "qdq_per_tensor", "qoperator", "dynamic"])
def test_sample_cnn_int8_every_layer_matched_and_plausible(variant):
    result = qdiff.compare(
        SAMPLES / "digits_cnn.float.onnx", SAMPLES / f"digits_cnn.{variant}.onnx", data=SAMPLES / "digits_test.npz", samples=30
    )
    layers = result.layers[result.layers["kind"] != "input"]
    covered = sorted(n for layer in layers["layer"] for n in layer.split("+"))
    assert covered == sorted(["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2"])
    assert result.unmatched.empty
    assert (layers["cosine"] > 0.99).all() and (layers["cosine"] <= 1.0).all()
    assert (layers["sqnr_db"] > 15).all()
    # error accumulates: the last layer is no better than the first
    assert layers["mse"].iloc[-1] >= layers["mse"].iloc[0]
    assert result.outputs.iloc[0]["top1_agreement"] >= 0.9
    assert len(result.weights) >= 4 and (result.weights["cosine"] > 0.999).all()


@pytest.mark.parametrize("model", ["digits_cnn", "transformer"])
def test_fp16_every_cosine_at_least_0_999(model):
    data = SAMPLES / ("digits_test.npz" if model == "digits_cnn" else "transformer_data.npz")
    result = qdiff.compare(SAMPLES / f"{model}.float.onnx", SAMPLES / f"{model}.fp16.onnx", data=data, samples=10)
    assert result.unmatched.empty
    assert (result.layers["cosine"] >= 0.999).all(), result.layers[["layer", "cosine"]]
    assert (result.outputs["cosine"] >= 0.999).all()


def test_multi_output_model_compares_both_outputs():
    result = qdiff.compare(
        SAMPLES / "multi_output.float.onnx", SAMPLES / "multi_output.qdq.onnx", data=SAMPLES / "digits_test.npz", samples=10
    )
    assert list(result.outputs["float_tensor"]) == ["features", "logits"]
    assert result.outputs.set_index("float_tensor").loc["logits", "top1_agreement"] >= 0.9
    assert "conv2+relu2" in set(result.layers["layer"])


def _qdq_wrap(nodes_before, tensor, nodes_after, inputs, outputs, inits=(), scale=0.05, path=None):
    """A "quantized" model: the float nodes with a Q/DQ pair inserted on ``tensor``."""
    s = numpy_helper.from_array(np.array(scale, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    qdq = [
        helper.make_node("QuantizeLinear", [tensor, "s", "z"], [tensor + "_q"]),
        helper.make_node("DequantizeLinear", [tensor + "_q", "s", "z"], [tensor + "_dq"]),
    ]
    after = []
    for n in nodes_after:
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        for i, x in enumerate(n2.input):
            if x == tensor:
                n2.input[i] = tensor + "_dq"
        after.append(n2)
    return finish(helper.make_graph(nodes_before + qdq + after, "q", inputs, outputs, [s, z, *inits]), path)


def test_degenerate_tensors_have_defined_results(tmp_path):
    """All-zero, constant and empty tensors, and NaN/Inf produced by a model: no crash, no silent NaN."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("lg", TensorProto.FLOAT, [1, 4])]
    zero = numpy_helper.from_array(np.zeros((1, 4), np.float32), "zero")
    three = numpy_helper.from_array(np.full((1, 4), 3.0, np.float32), "three")
    starts = numpy_helper.from_array(np.array([0], np.int64), "st")
    ends = numpy_helper.from_array(np.array([0], np.int64), "en")
    axes = numpy_helper.from_array(np.array([1], np.int64), "ax")
    before = [
        helper.make_node("Mul", ["x", "zero"], ["zeros"], name="zeroed"),  # all zeros
        helper.make_node("Add", ["zeros", "three"], ["consts"], name="constant"),  # constant 3
        helper.make_node("Slice", ["x", "st", "en", "ax"], ["empty"], name="empty_slice"),  # shape [1, 0]
        helper.make_node("Concat", ["consts", "empty"], ["joined"], name="join", axis=1),
        helper.make_node("Add", ["joined", "x"], ["y"], name="out_add"),
        helper.make_node("Log", ["x"], ["lg"], name="log"),  # NaN for x<0, -inf for x==0
    ]
    inits = [zero, three, starts, ends, axes]
    f = finish(helper.make_graph(before, "f", [x], outs, inits), tmp_path / "f.onnx")
    # quantize the all-zero tensor and the constant one through Q/DQ
    q = _qdq_wrap(before[:1], "zeros", before[1:], [x], outs, inits, path=tmp_path / "q.onnx")
    data = np.array([[[1.0, -1.0, 0.0, 2.0]], [[0.5, 0.25, 1.0, 2.0]]], np.float32).reshape(2, 4)
    result = qdiff.compare(f, q, data={"x": data})
    rows = result.layers.set_index("layer")
    assert rows.loc["zeroed", "cosine"] == 1.0 and rows.loc["zeroed", "mse"] == 0.0
    assert rows.loc["zeroed", "sqnr_db"] == 200.0  # identical: the documented cap, not inf
    assert rows.loc["constant", "cosine"] == pytest.approx(1.0)
    assert rows.loc["empty_slice", "cosine"] == 1.0 and rows.loc["empty_slice", "shape"] == "1x0"
    log = rows.loc["log"]
    assert log["nan_float"] == 1 and log["nan_quant"] == 1  # sample 0: log(-1)
    assert log["inf_float"] == 1 and log["inf_quant"] == 1  # sample 0: log(0)
    assert log["cosine"] == pytest.approx(1.0) and "non-finite" in log["note"]
    for col in ("cosine", "mse", "sqnr_db", "kl", "max_abs"):
        assert not rows[col].isna().any(), col
    # the result serializes as strict JSON
    result.to_json(tmp_path / "r.json")
    import json

    json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_integer_tensors_are_listed_not_compared(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 1])
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="relu"),
        helper.make_node("ArgMax", ["y"], ["idx"], name="argmax", axis=1),
    ]
    f = finish(helper.make_graph(nodes, "f", [x], [y, idx]), tmp_path / "f.onnx")
    q = _qdq_wrap(nodes[:1], "y", nodes[1:], [x], [y, idx], path=tmp_path / "q.onnx")
    result = qdiff.compare(f, q, samples=3)
    # listed as skipped (not compared), not as an unmatched layer (issue 16 item 9)
    assert "argmax" not in set(result.unmatched["name"])
    skipped = {u["name"]: u["reason"] for u in result.meta["skipped"]}
    assert "not a float tensor" in skipped["argmax"]
    # the integer graph output is still compared (exactly: max_abs 0 means every index agrees)
    out = result.outputs.set_index("float_tensor")
    assert out.loc["idx", "max_abs"] >= 0


def test_result_is_a_dataframe_api():
    result = qdiff.compare(SAMPLES / "transformer.float.onnx", SAMPLES / "transformer.qdq.onnx", samples=2)
    from qdiff.result import LAYER_COLUMNS, OUTPUT_COLUMNS

    assert list(result.layers.columns) == LAYER_COLUMNS
    assert list(result.outputs.columns) == OUTPUT_COLUMNS
    assert result.layers["order"].is_monotonic_increasing
    worst = result.worst(3)
    assert len(worst) == 3 and worst["cosine"].is_monotonic_increasing
    assert result.summary()["layers_matched"] == int((result.layers["kind"] != "input").sum())
    assert "<table" in result._repr_html_()


@pytest.mark.parametrize("variant", ["qdq_per_tensor", "qoperator", "dynamic"])
def test_fused_engine_equals_numpy_engine(variant):
    """The reductions run inside onnxruntime give the numpy metrics (to float64 rounding)."""
    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / f"digits_cnn.{variant}.onnx")
    a = qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=12, engine="numpy")
    b = qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=12, engine="fused")
    assert a.meta["engine"] == "numpy" and b.meta["engine"] == "fused"
    cols = ["cosine", "cosine_worst", "mse", "mse_worst", "mae", "max_abs", "sqnr_db", "sqnr_db_worst", "kl", "kl_worst"]
    np.testing.assert_allclose(b.layers[cols].to_numpy(float), a.layers[cols].to_numpy(float), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.outputs[cols + ["top1_agreement"]].to_numpy(float), a.outputs[cols + ["top1_agreement"]].to_numpy(float), rtol=1e-9, atol=1e-12)
    assert list(a.layers["shape"]) == list(b.layers["shape"])


def test_fused_engine_counts_non_finite_values(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Log", ["x"], ["y"], name="log")]
    f = finish(helper.make_graph(nodes, "f", [x], [y]), tmp_path / "f.onnx")
    q = _qdq_wrap([], "x", nodes, [x], [y], path=tmp_path / "q.onnx")
    data = {"x": np.array([[1.0, -1.0, 0.0, 2.0], [0.5, 0.25, 1.0, 2.0]], np.float32)}
    a = qdiff.compare(f, q, data=data, engine="numpy").layers.set_index("layer")
    b = qdiff.compare(f, q, data=data, engine="fused").layers.set_index("layer")
    for col in ("nan_float", "inf_float", "nan_quant", "inf_quant", "cosine", "mse", "note"):
        assert a.loc["log", col] == pytest.approx(b.loc["log", col]) if col != "note" else a.loc["log", col] == b.loc["log", col]


def test_sharded_workers_equal_single_process(tmp_path):
    """Accumulators merge exactly: two worker processes give the very same result."""
    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.qoperator.onnx")
    folder = tmp_path / "data"
    folder.mkdir()
    x = np.load(SAMPLES / "digits_test.npz")["input"][:11]
    for i, v in enumerate(x):
        np.save(folder / f"{i:03d}.npy", v)
    for data in (SAMPLES / "digits_test.npz", folder, None):
        a = qdiff.compare(*args, data=data, samples=11)
        b = qdiff.compare(*args, data=data, samples=11, workers=2)
        assert a.layers.equals(b.layers) and a.outputs.equals(b.outputs)
        assert a.meta["data_sha256"] == b.meta["data_sha256"] and b.meta["samples"] == 11
        assert b.meta["workers"] == min(2, available_cpus())  # capped by the cores
    with pytest.raises(qdiff.UsageError, match="iterator"):
        qdiff.compare(*args, data=iter([{"input": x[0][None]}]), workers=2)


def test_max_memory_fetches_taps_in_groups():
    args = (SAMPLES / "transformer.float.onnx", SAMPLES / "transformer.qdq.onnx")
    a = qdiff.compare(*args, data=SAMPLES / "transformer_data.npz", samples=3)
    b = qdiff.compare(*args, data=SAMPLES / "transformer_data.npz", samples=3, max_memory=8 * 1024)
    assert any("split into" in n for n in b.meta["notes"])
    cols = ["cosine", "mse", "max_abs", "sqnr_db", "kl"]
    np.testing.assert_array_equal(a.layers[cols].to_numpy(), b.layers[cols].to_numpy())


def test_unrelated_models_are_flagged_with_counts_from_the_weight_table(tmp_path):
    """Weights that do not correlate with the float model's: one warning, its counts those of the
    weight table (an independent count over the rows), nothing for the model with itself."""
    import re

    model = onnx.load(SAMPLES / "digits_cnn.float.onnx")
    rng = np.random.default_rng(5)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    for t in other.graph.initializer:
        value = numpy_helper.to_array(t)
        if value.dtype == np.float32 and value.size > 1:
            t.CopyFrom(numpy_helper.from_array(rng.standard_normal(value.shape).astype(np.float32), t.name))
    path = tmp_path / "unrelated.onnx"
    onnx.save(other, path)
    r = qdiff.compare(SAMPLES / "digits_cnn.float.onnx", path, samples=4)
    (warning,) = [w for w in r.meta["warnings"] if "do not look like the same network" in w]
    w = r.weights[r.weights["role"] == "weight"]["cosine"].dropna().to_numpy()
    n_bad, n_all = map(int, re.search(r"weights of (\d+) of (\d+) layers", warning).groups())
    assert (n_bad, n_all) == (int((w < 0.5).sum()), len(w)) and n_all >= 4
    assert f"median cosine {np.median(w):.3f}" in warning
    assert qdiff.compare(SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.float.onnx", samples=4).meta["warnings"] == []


@pytest.mark.parametrize(
    "pair",
    [("digits_cnn.float.onnx", "digits_cnn.qdq_per_channel.onnx"), ("transformer.float.onnx", "transformer.qdq.onnx")],
)
def test_weight_table_matches_numpy_per_channel(pair):
    """Each weight row's cosine and worst channel against plain numpy on the float initializer and
    the quantized model's DequantizeLinear of it (Conv/Gemm channels on axis 0, MatMul columns)."""
    fm, qm = (onnx.load(SAMPLES / p) for p in pair)
    inits = {t.name: numpy_helper.to_array(t) for m in (fm, qm) for t in m.graph.initializer}
    dq = {n.input[0]: n for n in qm.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    r = qdiff.compare(SAMPLES / pair[0], SAMPLES / pair[1], samples=2)
    rows = r.weights[r.weights["worst_channel"].notna()]
    assert len(rows) >= 4
    for row in rows.itertuples():
        f = inits[row.float_tensor].astype(np.float64)
        node = dq[row.quant_tensor]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale, zp = inits[node.input[1]], inits[node.input[2]]
        if scale.ndim:  # per-channel: broadcast along the axis
            shape = [1] * f.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        q = _np_dequantize(inits[row.quant_tensor], scale, zp).astype(np.float64)  # float32, as onnxruntime
        cos = np.sum(f * q) / np.sqrt(np.sum(f * f) * np.sum(q * q))
        assert row.cosine == pytest.approx(cos, abs=1e-12)
        ch = 0 if row.op_type in ("Conv", "Gemm") else f.ndim - 1
        fc, qc = np.moveaxis(f, ch, 0).reshape(f.shape[ch], -1), np.moveaxis(q, ch, 0).reshape(f.shape[ch], -1)
        per = np.sum(fc * qc, 1) / np.sqrt(np.sum(fc * fc, 1) * np.sum(qc * qc, 1))
        assert int(row.worst_channel) == int(np.argmin(per))
        assert row.worst_channel_cosine == pytest.approx(per.min(), abs=1e-12)


def test_channel_cosines_conventions_and_non_finite_weights():
    """Zero channels (both: 1, one: 0), a channel holding inf (counted by the row metrics), every
    axis; against numpy on the finite channels."""
    import sys

    cmp = sys.modules["qdiff._compare"]
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((6, 5, 4)).astype(np.float32)
    cand = (ref + 0.1 * rng.standard_normal(ref.shape)).astype(np.float32)
    for axis in (0, 1, 2):
        r, c = np.moveaxis(ref.copy(), axis, 0), np.moveaxis(cand.copy(), axis, 0)
        r[1], c[1] = 0, 0
        c[2] = 0
        got = cmp._channel_cosines(np.moveaxis(r, 0, axis), np.moveaxis(c, 0, axis), axis)
        a, b = r.reshape(len(r), -1).astype(np.float64), c.reshape(len(c), -1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            want = np.sum(a * b, 1) / np.sqrt(np.sum(a * a, 1) * np.sum(b * b, 1))
        want[1], want[2] = 1.0, 0.0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        r[3, 0] = np.inf
        got = cmp._channel_cosines(np.moveaxis(r, 0, axis), np.moveaxis(c, 0, axis), axis)
        keep = [i for i in range(len(r)) if i != 3]
        np.testing.assert_allclose(got[keep], want[keep], rtol=0, atol=1e-12)
        assert np.isfinite(got[3])  # the finite elements of that channel
