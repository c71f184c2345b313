"""The fallback loop and the quantizer on a model shaped like a real PaddlePaddle export.

PP-OCR exports (paddle2onnx) are opset 11/12, hold their weights in Constant nodes, decompose
HardSwish into Add/Clip/Mul/Div, use opset-12 Squeeze (``axes`` attribute) and attention as
MatMul(q, k) -> Softmax -> MatMul(p, v). Each of these broke the loop on the real models; the
model below has all of them in a dozen nodes (bench/realmodels runs the real ones).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdiff import compare, fallback, init_config, match, quantize, sensitivity
from qdiff.cli import main
from qdiff.units import fallback_units

OPSET = 12


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"p2o.Constant.{name}", value=numpy_helper.from_array(value.astype(np.float32), name))


def paddle_like(path: Path, seed: int = 0) -> Path:
    """::

        x[N,3,8,16] -> Conv(c1) -> HardSwish as Add/Clip/Mul/Div -> Conv(c2) -> ReduceMean(H) -> Squeeze(axes=[2])
          -> Transpose -> MatMul(q) ─┬─> MatMul(q,k^T) -> Softmax -> MatMul(p,v) -> MatMul(head) -> y[N,16,10]
                                     └─────── k = v = q ─┘
    """
    rng = np.random.default_rng(seed)
    b1 = rng.normal(0, 0.1, 8)
    b1[0] = 80.0  # one channel far off the others, read by nothing: the per-tensor ranges of c1 and hs get coarse
    w2 = rng.normal(0, 0.2, (16, 8, 3, 3))
    w2[:, 0] = 0.0
    nodes = [
        _const("w1", rng.normal(0, 0.4, (8, 3, 3, 3))), _const("b1", b1),
        _const("w2", w2), _const("b2", rng.normal(0, 0.1, 16)),
        _const("three", np.array(3.0)), _const("six", np.array(6.0)), _const("zero", np.array(0.0)),
        _const("wq", rng.normal(0, 0.3, (16, 16))), _const("wh", rng.normal(0, 0.3, (16, 10))),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="p2o.Conv.0", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "three"], ["hs_a"], name="p2o.Add.0"),
        helper.make_node("Clip", ["hs_a", "zero", "six"], ["hs_c"], name="p2o.Clip.0"),
        helper.make_node("Mul", ["c1", "hs_c"], ["hs_m"], name="p2o.Mul.0"),
        helper.make_node("Div", ["hs_m", "six"], ["hs"], name="p2o.Div.0"),
        helper.make_node("Conv", ["hs", "w2", "b2"], ["c2"], name="p2o.Conv.1", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c2"], ["pooled"], name="p2o.ReduceMean.0", axes=[2], keepdims=1),
        helper.make_node("Squeeze", ["pooled"], ["seq"], name="p2o.Squeeze.0", axes=[2]),
        helper.make_node("Transpose", ["seq"], ["tok"], name="p2o.Transpose.0", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["tok", "wq"], ["q"], name="p2o.MatMul.0"),
        helper.make_node("Transpose", ["q"], ["kt"], name="p2o.Transpose.1", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["att"], name="p2o.MatMul.1"),
        helper.make_node("Softmax", ["att"], ["p"], name="p2o.Softmax.0", axis=2),
        helper.make_node("MatMul", ["p", "q"], ["ctx"], name="p2o.MatMul.2"),
        helper.make_node("MatMul", ["ctx", "wh"], ["y"], name="p2o.MatMul.3"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "paddle_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 10])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def paddle(tmp_path_factory):
    d = tmp_path_factory.mktemp("paddle")
    f = paddle_like(d / "rec.onnx")
    rng = np.random.default_rng(3)
    np.savez(d / "calib.npz", x=rng.normal(0, 1, (16, 3, 8, 16)).astype(np.float32))
    return f, d / "calib.npz"


def test_units_are_compute_layers_with_their_weightless_nodes(paddle):
    f, _ = paddle
    from qdiff._quantize import prepare_model

    units = {u.name: u for u in fallback_units(prepare_model(onnx.load(str(f))).model)}
    assert list(units) == ["p2o.Conv.0", "p2o.Conv.1", "p2o.MatMul.0", "p2o.MatMul.1", "p2o.MatMul.2", "p2o.MatMul.3"]
    # the decomposed HardSwish belongs to the Conv before it; the Softmax to q·kᵀ; layout ops to no unit
    assert set(units["p2o.Conv.0"].nodes) >= {"p2o.Add.0", "p2o.Clip.0", "p2o.Mul.0"}
    assert "p2o.Softmax.0" in units["p2o.MatMul.1"].nodes
    every = {n for u in units.values() for n in u.nodes}
    assert not every & {"p2o.Squeeze.0", "p2o.Transpose.0", "p2o.Transpose.1"}
    assert units["p2o.MatMul.1"].params == 0 and units["p2o.Conv.0"].params == 8 * 3 * 9 + 8  # scalars are no parameters


def test_opset12_model_quantized_per_channel_loads_in_onnxruntime(paddle, tmp_path):
    f, calib = paddle
    cfg = init_config(f)
    assert cfg.weight_quant_params["per_channel"]
    report = quantize(f, cfg, calib, tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx"))
    # raised to opset 13 (per-channel DequantizeLinear has an axis there), weights per channel
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 13
    scales = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name == "w2_scale"]
    assert scales and scales[0].shape == (16,)
    assert not [w for w in report.warnings if "per-tensor" in w]
    s = ort.InferenceSession(str(tmp_path / "q.onnx"))
    x = np.load(calib)["x"][:2]
    ref = ort.InferenceSession(str(f)).run(None, {"x": x})[0]
    got = s.run(None, {"x": x})[0]
    cos = float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.98


def test_sensitivity_of_an_opset12_float_model_and_its_opset13_int8(paddle, tmp_path):
    f, calib = paddle
    quantize(f, init_config(f), calib, tmp_path / "q.onnx")
    r = sensitivity(f, tmp_path / "q.onnx", data=calib, samples=4, by="gain", gain_top=0)
    layers = r.layers.set_index("layer")
    assert layers["isolated_cosine"].notna().sum() >= 6
    compute = layers[layers["op_type"].str.contains("Conv|MatMul")]
    assert len(compute) == 6 and compute["gain"].notna().all()
    assert layers[~layers.index.isin(compute.index)]["gain"].isna().all()
    # by default only the 4 compute layers whose isolated error stands out most get the (costly) gain
    top = sensitivity(f, tmp_path / "q.onnx", data=calib, samples=4, by="gain").layers.set_index("layer")
    measured = top.loc[compute.index, "gain"].notna()
    assert measured.sum() == 4
    skipped = top.loc[compute.index[~measured.to_numpy()]]
    assert skipped["note"].str.contains("--gain-top").all()
    # the measured ones are those of the largest noise ratio among the compute layers
    ratio = top.loc[compute.index, "noise_ratio"].fillna(0)
    assert ratio[measured.to_numpy()].min() >= ratio[~measured.to_numpy()].max() or top.loc[compute.index, "noise_ratio"].isna().any()
    # and the same layers' gains as when every layer is measured
    for name in compute.index[measured.to_numpy()]:
        assert top.loc[name, "gain"] == pytest.approx(layers.loc[name, "gain"], abs=1e-9)


EVALS = {
    "raises": ("def metric(path):\n    return helper(path)\n\ndef helper(path):\n    raise ValueError('bad labels file')\n",
               "raised ValueError: bad labels file"),
    "string": ("def metric(path):\n    return 'high'\n", "returned str 'high'"),
    "none": ("def metric(path):\n    return None\n", "returned NoneType"),
    "nan": ("def metric(path):\n    return float('nan')\n", "returned nan"),
    "exits": ("import sys\ndef metric(path):\n    sys.exit(3)\n", "SystemExit(3)"),
    "import": ("import no_such_module_qdiff\ndef metric(path):\n    return 1.0\n", "cannot import"),
    "import_raises": ("raise RuntimeError('config missing')\ndef metric(path):\n    return 1.0\n", "RuntimeError: config missing"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(EVALS))
def test_a_failing_eval_function_is_one_error_line_and_no_outdir(paddle, tmp_path, capsys, kind):
    f, calib = paddle
    code, expected = EVALS[kind]
    ev = tmp_path / "my_eval.py"
    ev.write_text(code)
    out = tmp_path / "out"
    rc = main(["fallback", str(f), "--calib", str(calib), "--eval", f"{ev}:metric", "--target", "metric_drop<=0.01", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    first = err.splitlines()[0]
    assert first.startswith("qdiff: error: --eval") and expected in first, err
    assert "Traceback" not in err and "qdiff/" not in err  # the user's frames only
    if kind == "raises":
        assert "my_eval.py" in err and "in helper" in err
    assert not out.exists()


@pytest.mark.parametrize("target", ["cosine>=1e", "cosine>=2", "metric_drop<=nan", "accuracy>=0.9", "cosine<=0.9"])
def test_a_bad_target_is_refused_before_anything_runs(paddle, tmp_path, capsys, target):
    f, calib = paddle
    out = tmp_path / "out"
    assert main(["fallback", str(f), "--calib", str(calib), "--target", target, "-o", str(out)]) == 2
    assert capsys.readouterr().err.startswith("qdiff: error: --target")
    assert not out.exists()


def test_a_model_onnxruntime_rejects_is_refused_before_outdir(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"), helper.make_node("NoSuchOp", ["t"], ["y"], name="bad")], "g", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "bad.onnx"))
    np.savez(tmp_path / "c.npz", x=np.ones((2, 1, 4), np.float32))
    out = tmp_path / "out"
    assert main(["fallback", str(tmp_path / "bad.onnx"), "--calib", str(tmp_path / "c.npz"), "--target", "cosine>=0.9", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdiff: error: onnxruntime cannot load") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_fallback_reaches_a_task_target_on_the_paddle_like_model_and_resume_repairs_a_torn_write(paddle, tmp_path):
    f, calib = paddle
    x = np.load(calib)["x"]
    ref = ort.InferenceSession(str(f)).run(None, {"x": x})[0]

    def agreement(path: str) -> float:  # token-level top-1 agreement with the float model, like a CTC decode
        got = ort.InferenceSession(path).run(None, {"x": x})[0]
        return float(np.mean(got.argmax(-1) == ref.argmax(-1)))

    cfg = init_config(f)
    cfg.activation_quant_params["type"] = "QUInt8"
    out = tmp_path / "out"
    r = fallback(f, calib, target="metric_drop<=0.005", eval=agreement, config=cfg, outdir=out, samples=8)
    hist = pd.read_csv(out / "history.csv")
    assert r.reached and r.metric <= 0.005 and r.units == 6
    assert list(hist["step"][:2]) == ["start", "baseline"] and hist["metric"].iloc[0] > 0.005  # there was work to do
    # the model on disk is the one whose hash the history gives for the written config
    chosen = hist[hist["float_layers"].fillna("") == " ".join(r.float_layers)]
    digest = hashlib.sha256((out / "model.int8.onnx").read_bytes()).hexdigest()
    assert digest in set(chosen["model_sha256"])
    assert 1.0 - agreement(str(out / "model.int8.onnx")) == pytest.approx(r.metric)
    # a kill between writing the model and the config: resume puts the config's model back
    (out / "model.int8.onnx").write_bytes(b"torn")
    r2 = fallback(f, calib, target="metric_drop<=0.005", eval=agreement, outdir=out, resume=True, samples=8)
    assert hashlib.sha256((out / "model.int8.onnx").read_bytes()).hexdigest() in set(chosen["model_sha256"])
    assert r2.float_layers == r.float_layers and len(pd.read_csv(out / "history.csv")) >= len(hist)
    assert json.loads((out / "config.json").read_text())["layers"]



def test_an_unreachable_target_says_what_was_tried_and_the_best(paddle, tmp_path, capsys):
    f, calib = paddle
    out = tmp_path / "out"
    rc = main([
        "fallback", str(f), "--calib", str(calib), "--target", "cosine>=0.99999999", "--max-float-layers", "1",
        "-o", str(out), "--samples", "4",
    ])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 1
    assert "NOT reached" in text and "tried in float:" in text
    hist = pd.read_csv(out / "history.csv")
    # never more than one unit in float, and the written model is the best one measured
    assert hist["n_float"].max() <= 2  # the first+last baseline is measured for comparison
    written = hashlib.sha256((out / "model.int8.onnx").read_bytes()).hexdigest()
    best = hist[hist["n_float"] <= 1].sort_values("metric").iloc[-1]
    assert written == best["model_sha256"]  # the best within --max-float-layers, not the 2-layer baseline
    tried = text.split("tried in float:")[1].split(";")[0]
    assert {n.strip() for n in tried.split(",")} <= {u.name for u in fallback_units(onnx.load(str(f)))}


def test_a_one_channel_conv_transpose_is_not_reported_as_lost_per_channel(tmp_path):
    # DBNet's last layer: ConvTranspose to 1 channel; its weight [in, 1, k, k] has one output channel,
    # so one scale is per-channel (was reported as "quantized per-tensor" on PP-OCRv4 det)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 2, 2)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])], [w],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "up.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.normal(0, 1, (4, 1, 4, 4, 4)).astype(np.float32).reshape(4, 1, 4, 4, 4)[:, 0])
    report = quantize(tmp_path / "up.onnx", init_config(tmp_path / "up.onnx"), tmp_path / "c.npz", tmp_path / "q.onnx")
    assert not [w for w in report.warnings if "per-tensor" in w], report.warnings


def test_the_search_combines_with_the_best_model_and_always_prunes(tmp_path):
    # issue 15: with per-tensor int8 the digits CNN meets cosine>=0.9999 only with the first+last
    # baseline's layers plus conv2; the old loop ranked on the baseline but added to the start config
    # and skipped pruning, and ended "NOT reached"
    samples = Path(__file__).resolve().parents[1] / "sample_models"
    f = samples / "digits_cnn.float.onnx"
    cfg = init_config(f)
    cfg.weight_quant_params["per_channel"] = False
    r = fallback(f, samples / "digits_calib.npz", target="cosine>=0.9999", eval_data=samples / "digits_test.npz", config=cfg, outdir=tmp_path / "o")
    hist = r.history
    assert not hist["target_met"].iloc[0] and r.reached and r.metric >= 0.9999
    baseline = hist[hist["step"] == "baseline"].iloc[0]
    first_round = hist[hist["round"] == 1].iloc[0]
    # round 1 starts from the best model so far (the baseline beat the start) ...
    assert baseline["metric"] > hist["metric"].iloc[0]
    assert set(baseline["float_layers"].split()) <= set(first_round["float_layers"].split())
    # ... and the prune then gives back what is not needed
    assert (hist["step"] == "prune").any() and len(r.float_layers) < first_round["n_float"]


def test_an_eval_that_fails_on_the_first_candidate_leaves_no_empty_outdir(paddle, tmp_path, capsys):
    f, calib = paddle
    ev = tmp_path / "flaky.py"
    # fine on the float model, fails on every quantized candidate
    ev.write_text("def metric(path):\n    if 'candidate' in path:\n        raise KeyError('labels')\n    return 1.0\n")
    out = tmp_path / "out"
    rc = main(["fallback", str(f), "--calib", str(calib), "--eval", f"{ev}:metric", "--target", "metric_drop<=0.01", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "raised KeyError: 'labels' on candidate" in err.splitlines()[0]
    assert "flaky.py" in err and not out.exists()


def test_fallback_measures_on_the_session_factory_it_is_given(paddle, tmp_path):
    from qdiff.engine.sessions import default_session_factory

    f, calib = paddle
    default = default_session_factory()
    built = []

    def factory(model):
        built.append(model.graph.name)
        return default(model)

    kw = dict(target="cosine>=0.9999", max_float_layers=2, samples=4, max_rounds=1, gain_candidates=2)
    r = fallback(f, calib, session_factory=factory, **kw)
    assert len(built) >= len(r.history) + 1  # the float model, every candidate, the ranking's sessions
    plain = fallback(f, calib, provider="cpu", **kw)  # an alias, as compare takes it
    assert r.float_layers == plain.float_layers
    assert list(r.history["metric"]) == pytest.approx(list(plain.history["metric"]))


def test_fallback_refuses_an_unknown_provider_before_outdir(paddle, tmp_path):
    from qdiff import ProviderError

    f, calib = paddle
    with pytest.raises(ProviderError):
        fallback(f, calib, target="cosine>=0.99", provider="NoSuchExecutionProvider", outdir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ProviderError):
        quantize(f, init_config(f), calib, tmp_path / "q.onnx", provider="NoSuchExecutionProvider")
    assert not (tmp_path / "q.onnx").exists()


def test_fallback_result_is_a_result_with_strict_json(tmp_path):
    from qdiff import FallbackResult, QuantConfig
    from qdiff._fallback import HISTORY_COLUMNS
    from qdiff.result import Result

    history = pd.DataFrame(
        [[0, "start", "", 0, 0, "", float("nan"), False, 10, 0.1, "", "ab"],
         [1, "bisect k=1", "fc1", 1, 2000, "+fc1", 0.9996, True, 12, 0.2, "", "cd"]],
        columns=HISTORY_COLUMNS,
    )  # fmt: skip
    cfg = QuantConfig().with_disabled({"fc1"})
    r = FallbackResult(True, np.float64(0.9996), ["fc1"], 2000, cfg, tmp_path / "model.int8.onnx", history,
                       {"metric": float("nan"), "float_layers": ["fc1"], "notes": []}, 3, ["fc1"])  # fmt: skip
    assert isinstance(r, Result) and r.table() is history
    r.to_json(tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc) == {"reached", "metric", "float_layers", "float_params", "config", "model_path", "history", "baseline", "units", "tried"}
    assert doc["metric"] == pytest.approx(0.9996) and doc["history"][0]["metric"] is None and doc["baseline"]["metric"] is None
    assert doc["config"] == cfg.to_dict() and doc["model_path"] == str(tmp_path / "model.int8.onnx")
    assert len(doc["history"]) == 2 and doc["history"][1]["target_met"] is True
    r.to_csv(tmp_path / "h.csv")
    assert list(pd.read_csv(tmp_path / "h.csv").columns) == HISTORY_COLUMNS
    assert "qdiff fallback" in r._repr_html_()
    # a result built without a config or OUTDIR (as the renderers' tests do)
    bare = FallbackResult(False, None, [], 0, None, None, history)
    assert json.loads(json.dumps(bare.to_dict(), allow_nan=False))["config"] is None
    from rich.console import Console

    with open(tmp_path / "out.txt", "w") as fh:
        Console(file=fh, width=120).print(r)
    assert "qdiff fallback history" in (tmp_path / "out.txt").read_text()


def test_compare_matches_through_the_softmax_wrapper_of_the_opset_converter(tmp_path):
    """Raising an opset-12 model to 13 wraps a Softmax that is not over the last axis (or whose
    rank is unknown, as in PP-OCRv4 rec's attention) in Flatten -> Softmax -> Reshape(x, Shape(x)).
    The quantized model then has a Reshape with a computed shape that the float model lacks: it is
    matched through, and every layer after the attention is still paired (on PP-OCRv4 rec, 101
    float nodes went unmatched behind that one Reshape)."""
    rng = np.random.default_rng(0)
    nodes = [
        _const("w1", rng.normal(0, 0.4, (6, 6))), _const("w2", rng.normal(0, 0.4, (6, 5))),
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="p2o.MatMul.0"),
        helper.make_node("Softmax", ["a"], ["p"], name="p2o.Softmax.0", axis=1),
        helper.make_node("MatMul", ["p", "w2"], ["y"], name="p2o.MatMul.1"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "softmax_axis1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 7
    f = tmp_path / "f.onnx"
    onnx.save(model, str(f))
    np.savez(tmp_path / "calib.npz", x=rng.normal(0, 1, (8, 4, 6)).astype(np.float32))
    quantize(f, init_config(f), tmp_path / "calib.npz", tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert {"Shape", "Flatten", "Reshape"} <= set(ops)  # the converter's wrapper (else this tests nothing)
    r = compare(f, tmp_path / "q.onnx", data=tmp_path / "calib.npz", samples=4)
    assert r.unmatched.empty, r.unmatched.to_string()
    layers = r.layers.set_index("layer")
    assert {"p2o.MatMul.0", "p2o.Softmax.0", "p2o.MatMul.1"} <= set(layers.index)
    assert (layers.loc[["p2o.Softmax.0", "p2o.MatMul.1"], "cosine"] > 0.99).all()  # measured, [N,24] against [N,4,6]
    assert r.outputs["cosine"].iloc[0] > 0.99
    skipped = {s.name: s.reason for s in match(f, tmp_path / "q.onnx").skipped.itertuples()}
    assert any("layout op absent from the float model" in why for why in skipped.values())
