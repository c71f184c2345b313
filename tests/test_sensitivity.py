"""qdiff sensitivity: isolated error, fallback gain, noise ratio; checked on a model made fragile on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import finish, quantize
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType

from qdiff import sensitivity
from qdiff.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """The digits CNN with one outlier weight in fc1, on an input feature that is always zero.

    The float model is unchanged in behaviour (the feature is dead), but per-tensor int8 weight
    quantization of fc1 now has a step ~60x coarser, which wipes out fc1's real weights: fc1 is
    the one fragile layer; fc2 inherits its error.
    """
    d = tmp_path_factory.mktemp("fragile")
    m = onnx.load(str(SAMPLES / "digits_cnn.float.onnx"))
    calib = np.load(SAMPLES / "digits_calib.npz")["input"]
    tapped = onnx.ModelProto()
    tapped.CopyFrom(m)
    tapped.graph.output.append(onnx.ValueInfoProto(name="flatten_out"))
    sess = ort.InferenceSession(tapped.SerializeToString())
    feats = np.concatenate([sess.run(["flatten_out"], {"input": x[None]})[0] for x in calib])
    dead = int(np.argmin(np.abs(feats).max(0)))
    assert np.abs(feats[:, dead]).max() == 0.0
    inits = {t.name: t for t in m.graph.initializer}
    w = numpy_helper.to_array(inits["fc1.weight"]).copy()
    w[0, dead] = 60.0
    inits["fc1.weight"].CopyFrom(numpy_helper.from_array(w, "fc1.weight"))
    f = d / "fragile.float.onnx"
    onnx.save(m, str(f))
    q = quantize(
        f, d / "fragile.qdq.onnx", [{"input": x[None]} for x in calib],
        quant_format=QuantFormat.QDQ, per_channel=False, activation_type=QuantType.QUInt8,
    )  # fmt: skip
    return f, q


DATA = SAMPLES / "digits_test.npz"


def test_isolated_and_gain_put_the_fragile_layer_first(fragile):
    f, q = fragile
    r = sensitivity(f, q, data=DATA, samples=40)
    rows = r.layers.set_index("layer")
    assert r.layers.iloc[0]["layer"] == "fc1+relu3"  # ranked by isolated error
    assert rows.loc["fc1+relu3", "isolated_cosine"] < 0.95
    # accumulated error flags the fragile layer and the one after it
    assert rows.loc["fc1+relu3", "accumulated_cosine"] < 0.99 and rows.loc["fc2", "accumulated_cosine"] < 0.99
    assert "cos<0.99" in rows.loc["fc2", "flags"]
    # ... but in isolation fc2 is fine: it only inherits the error
    assert rows.loc["fc2", "isolated_cosine"] > 0.99
    # error far above its rounding floor: a bad range, not coarse rounding
    assert rows.loc["fc1+relu3", "noise_ratio"] > 1000
    assert rows.drop("fc1+relu3")["noise_ratio"].max() < 100
    by_gain = sensitivity(f, q, data=DATA, samples=40, by="gain").layers
    assert by_gain.iloc[0]["layer"] == "fc1+relu3"
    assert by_gain.iloc[0]["gain"] > 0.1 and by_gain.iloc[1]["gain"] < 0.01
    assert by_gain.set_index("layer").loc["fc1+relu3", "solo_drop"] > 0.1
    assert "first" in rows.loc["conv1+relu1", "flags"] and "last" in rows.loc["fc2", "flags"]
    assert "small" in rows.loc["conv1+relu1", "flags"]  # 80 parameters


def _two_layer(tmp_path):
    """x[1,8] -> mm1 (W1) -> relu -> h -> mm2 (W2) -> y, QDQ per-tensor."""
    rng = np.random.default_rng(11)
    w1 = rng.normal(0, 0.5, (8, 6)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (6, 4)).astype(np.float32)
    f = tmp_path / "f.onnx"
    finish(
        helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
                helper.make_node("Relu", ["a"], ["h"], name="relu"),
                helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
            ],
            "two",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
        ),
        f,
    )
    calib = [{"x": rng.normal(size=(1, 8)).astype(np.float32)} for _ in range(32)]
    q = quantize(f, tmp_path / "q.onnx", calib, quant_format=QuantFormat.QDQ, per_channel=False)
    return f, q, w1, w2


def _qdq(x, scale, zp):
    info = np.iinfo(zp.dtype)
    qv = np.clip(np.rint(x / scale) + zp.astype(np.int64), info.min, info.max)
    return ((qv - zp.astype(np.int64)) * scale).astype(np.float32)


def _cos(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_isolated_error_and_gain_match_numpy(tmp_path):
    f, q, w1, w2 = _two_layer(tmp_path)
    p = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(q)).graph.initializer}
    w1_dq = (p["W1_quantized"].astype(np.float32) - p["W1_zero_point"]) * p["W1_scale"]
    w2_dq = (p["W2_quantized"].astype(np.float32) - p["W2_zero_point"]) * p["W2_scale"]
    xs = np.random.default_rng(5).normal(size=(12, 8)).astype(np.float32)
    r = sensitivity(f, q, data={"x": xs})
    rows = r.layers.set_index("layer")

    iso, keep, base = [], [], []
    for x in xs:
        x = x[None]
        h = np.maximum(x @ w1, 0)
        y = h @ w2
        # mm2 alone, fed the float h: Q/DQ its input, quantized weight, Q/DQ its output
        y_iso = _qdq(_qdq(h, p["h_scale"], p["h_zero_point"]) @ w2_dq, p["y_scale"], p["y_zero_point"])
        iso.append(_cos(y, y_iso))
        # the quantized model, and the same with mm2 kept in float (float weight, no output Q/DQ)
        h_q = _qdq(np.maximum(_qdq(x, p["x_scale"], p["x_zero_point"]) @ w1_dq, 0), p["h_scale"], p["h_zero_point"])
        base.append(_cos(y, _qdq(h_q @ w2_dq, p["y_scale"], p["y_zero_point"])))
        keep.append(_cos(y, h_q @ w2))
    assert rows.loc["mm2", "isolated_cosine"] == pytest.approx(np.mean(iso), abs=1e-6)
    assert rows.loc["mm2", "gain"] == pytest.approx(np.mean(keep) - np.mean(base), abs=1e-6)
    # the edited models ran only downstream of their edit, fed the base models' activations
    assert r.meta["gain_whole_model_runs"] == 0
    assert r.meta["base_metric"] == pytest.approx(np.mean(base), abs=1e-6)
    # noise floor from the output step
    assert rows.loc["mm2", "noise_floor"] == pytest.approx(float(p["y_scale"]) ** 2 / 12)


EVAL = '''
import numpy as np, onnxruntime as ort
from pathlib import Path
S = Path({samples!r})
def accuracy(model_path):
    x = np.load(S / "digits_test.npz")["input"][:150]
    y = np.load(S / "digits_test_labels.npy")[:150]
    s = ort.InferenceSession(model_path)
    pred = [int(s.run(None, {{"input": xi[None]}})[0].argmax()) for xi in x]
    return float(np.mean(np.array(pred) == y))
'''


def test_task_metric_from_a_file(fragile, tmp_path):
    f, q = fragile
    ev = tmp_path / "my_eval.py"
    ev.write_text(EVAL.format(samples=str(SAMPLES)))
    r = sensitivity(f, q, data=DATA, samples=10, by="gain", eval=f"{ev}:accuracy")
    assert r.meta["metric"] == "accuracy"
    assert r.meta["float_metric"] > r.meta["base_metric"] + 0.05  # the fragile layer costs accuracy
    top = r.layers.iloc[0]
    assert top["layer"] == "fc1+relu3"
    assert top["keep_float_metric"] == pytest.approx(r.meta["base_metric"] + top["gain"])
    assert top["keep_float_metric"] >= r.meta["float_metric"] - 0.02


def test_cli_sensitivity_json_and_bad_eval(fragile, tmp_path, capsys):
    f, q = fragile
    out = tmp_path / "s.json"
    assert main(["sensitivity", str(f), str(q), "--data", str(DATA), "--samples", "8", "--json", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "fc1+relu3" in printed and "ranked by isolated" in printed
    doc = json.loads(out.read_text())
    assert set(doc) == {"layers", "meta"}
    need = {"layer", "op_type", "rank", "accumulated_cosine", "isolated_cosine", "isolated_sqnr_db", "gain", "noise_ratio"}
    assert all(need <= set(rec) for rec in doc["layers"])
    assert doc["layers"][0]["layer"] == "fc1+relu3" and doc["layers"][0]["rank"] == 1
    for bad in ("nomodule_xyz:fn", str(tmp_path / "missing.py") + ":fn", "justtext"):
        assert main(["sensitivity", str(f), str(q), "--eval", bad, "--json", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qdiff: error: --eval")
        assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("variant", ["qoperator", "dynamic", "fp16", "qdq_per_channel"])
def test_every_format_gets_isolated_and_gain(variant):
    r = sensitivity(SAMPLES / "digits_cnn.float.onnx", SAMPLES / f"digits_cnn.{variant}.onnx", data=DATA, samples=5)
    assert r.meta["unmeasured"] == []
    assert r.layers["isolated_cosine"].notna().all()
    # gain for the layers a config can switch (Conv/Gemm), none for pooling and layout layers
    compute = r.layers["op_type"].str.contains("Conv|Gemm|MatMul")
    assert compute.sum() >= 4
    assert r.layers.loc[compute, "gain"].notna().all()
    assert r.layers.loc[~compute, "gain"].isna().all() and (~compute).any()
    assert r.layers.loc[~compute, "note"].str.startswith("no gain measured").all()
    assert (r.layers["isolated_cosine"] > 0.999).all()


def test_transformer_block_sensitivity():
    r = sensitivity(SAMPLES / "transformer.float.onnx", SAMPLES / "transformer.qdq.onnx", samples=4, gain=False)
    assert len(r.layers) == 26 and r.layers["isolated_cosine"].notna().all()
    assert r.layers["gain"].isna().all()
    # isolated error never exceeds what accumulates on the way, by much
    assert (r.layers["isolated_cosine"] >= r.layers["accumulated_cosine"] - 1e-3).all()


def test_prune_unread_drops_dead_nodes_and_their_weights_only():
    """onnxruntime runs nodes nothing reads; the shadow's are dropped before it runs them."""
    from qdiff.shadow import prune_unread

    w = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "w_dead")
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="relu"),
        helper.make_node("Neg", ["x"], ["n"], name="neg"),  # read by the dead Add only
        helper.make_node("Add", ["n", "w_dead"], ["dead"], name="add"),
        helper.make_node("Abs", ["x"], ["kept"], name="abs"),  # not an output, but asked for
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    assert prune_unread(model, {"kept"}) == 2
    assert [n.name for n in model.graph.node] == ["relu", "abs"] and not model.graph.initializer
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[-1, 2, -3, 4]], np.float32)
    np.testing.assert_array_equal(sess.run(["y"], {"x": x})[0], np.maximum(x, 0))
    assert prune_unread(model, {"kept"}) == 0
