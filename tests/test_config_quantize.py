"""Quant config, quantize, calib-sweep, export and the fallback loop, on real quantizer runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from builders import conv_feeds, conv_net
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from qdiff import QuantConfig, UsageError, calib_sweep, export_skip_list, fallback, init_config, load_config, quantize, save_config
from qdiff.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
FLOAT = SAMPLES / "digits_cnn.float.onnx"
CALIB = SAMPLES / "digits_calib.npz"


def _inits(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _q(tmp_path, config, name="q.onnx", model=FLOAT, calib=CALIB):
    out = tmp_path / name
    quantize(model, config, calib, out)
    return _inits(out), onnx.load(str(out))


# -- the config -----------------------------------------------------------------------------------


def test_config_init_lists_layers_and_round_trips(tmp_path):
    cfg = init_config(FLOAT)
    assert list(cfg.layers) == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2"]
    assert all(layer.quant_enable for layer in cfg.layers.values())
    cfg.layers["fc1"].quant_enable = False
    cfg.layers["fc2"].activation_quant_params["calibration_method"] = "Entropy"
    p1, p2 = tmp_path / "a.json", tmp_path / "b.json"
    save_config(cfg, p1)
    again = load_config(p1)
    save_config(again, p2)
    assert p1.read_bytes() == p2.read_bytes()
    assert again.to_dict() == cfg.to_dict()
    assert again.disabled == ["fc1"]
    assert main(["config", "init", str(FLOAT), "-o", str(tmp_path / "c.json")]) == 0
    assert load_config(tmp_path / "c.json").to_dict()["layers"]["conv1"] == {"quant_enable": True}


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"batch_nmu": 3}, ["unknown key 'batch_nmu'", "batch_num"]),
        ({"activation_quant_params": {"method": "MinMax"}}, ["unknown key 'method'", "calibration_method"]),
        ({"activation_quant_params": {"calibration_method": "KL"}}, ["'KL'", "Entropy"]),
        ({"layers": {"conv1": {"enable": False}}}, ["unknown key 'enable'", "quant_enable"]),
        ({"layers": {"conv1": {"quant_enable": "no"}}}, ["quant_enable must be true or false"]),
        ({"weight_quant_params": {"per_channel": 1}}, ["per_channel must be true or false"]),
        ({"batch_num": 0}, ["batch_num must be a positive integer"]),
    ],
)
def test_bad_config_names_the_key_and_valid_ones(tmp_path, doc, words, capsys):
    with pytest.raises(UsageError) as err:
        QuantConfig.from_dict(doc)
    for w in words:
        assert w in str(err.value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    assert main(["quantize", str(FLOAT), "--config", str(path), "--calib", str(CALIB), "-o", str(tmp_path / "o.onnx")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and words[0] in err_lines[0]
    assert not (tmp_path / "o.onnx").exists()


def test_config_naming_a_missing_layer_is_an_error(tmp_path):
    cfg = init_config(FLOAT)
    cfg.layers["nope"] = cfg.layers["conv1"]
    with pytest.raises(UsageError, match="nope"):
        quantize(FLOAT, cfg, CALIB, tmp_path / "q.onnx")


# -- each config field changes the produced model as intended ---------------------------------------


def test_all_enabled_config_equals_plain_quantize_static(tmp_path):
    cfg = init_config(FLOAT)
    cfg.batch_num = 100
    ours = tmp_path / "ours.onnx"
    quantize(FLOAT, cfg, CALIB, ours)
    x = np.load(CALIB)["input"]

    class R:
        def __init__(self):
            self.it = iter([{"input": v[None]} for v in x])

        def get_next(self):
            return next(self.it, None)

    plain = tmp_path / "plain.onnx"
    quantize_static(
        str(FLOAT), str(plain), R(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )  # fmt: skip
    a, b = onnx.load(str(ours)), onnx.load(str(plain))
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    ia, ib = _inits(ours), _inits(plain)
    assert ia.keys() == ib.keys()
    for k in ia:
        np.testing.assert_array_equal(ia[k], ib[k], err_msg=k)


def test_top_level_fields_change_the_model(tmp_path):
    base = init_config(FLOAT)
    ref, ref_model = _q(tmp_path, base, "base.onnx")

    cfg = init_config(FLOAT)
    cfg.batch_num = 1
    few, _ = _q(tmp_path, cfg, "few.onnx")
    scales = [k for k in ref if k.endswith("_out_scale")]
    assert any(few[k] < ref[k] for k in scales)  # one calibration sample sees a narrower range than ten

    cfg = init_config(FLOAT, quant_format="QOperator")
    _, m = _q(tmp_path, cfg, "qop.onnx")
    assert "QLinearConv" in {n.op_type for n in m.graph.node}
    assert "QLinearConv" not in {n.op_type for n in ref_model.graph.node}

    cfg = init_config(FLOAT)
    cfg.activation_quant_params.update(calibration_method="Percentile", percentile=99.0)
    pct, _ = _q(tmp_path, cfg, "pct.onnx")
    assert pct["relu3_out_scale"] < ref["relu3_out_scale"]  # clips the top 1 %
    cfg.activation_quant_params["percentile"] = 99.999
    pct2, _ = _q(tmp_path, cfg, "pct2.onnx")
    assert pct2["relu3_out_scale"] > pct["relu3_out_scale"]

    cfg = init_config(FLOAT)
    cfg.activation_quant_params.update(moving_average=True, averaging_constant=0.5)
    mov, _ = _q(tmp_path, cfg, "mov.onnx")
    assert mov["relu3_out_scale"] != ref["relu3_out_scale"]

    cfg = init_config(FLOAT)
    cfg.activation_quant_params["type"] = "QInt8"
    s8, _ = _q(tmp_path, cfg, "s8.onnx")
    assert ref["relu1_out_zero_point"].dtype == np.uint8 and s8["relu1_out_zero_point"].dtype == np.int8

    cfg = init_config(FLOAT)
    cfg.activation_quant_params["symmetric"] = True
    sym, _ = _q(tmp_path, cfg, "sym.onnx")
    assert sym["logits_zero_point"] == 128 and ref["logits_zero_point"] != 128

    cfg = init_config(FLOAT)
    cfg.weight_quant_params["per_channel"] = False
    pt, _ = _q(tmp_path, cfg, "pt.onnx")
    assert ref["conv2.weight_scale"].size == 16 and pt["conv2.weight_scale"].size == 1

    cfg = init_config(FLOAT)
    cfg.weight_quant_params["type"] = "QUInt8"
    wu, _ = _q(tmp_path, cfg, "wu.onnx")
    assert wu["conv2.weight_quantized"].dtype == np.uint8 and ref["conv2.weight_quantized"].dtype == np.int8

    cfg = init_config(FLOAT)
    cfg.weight_quant_params["symmetric"] = False
    wa, _ = _q(tmp_path, cfg, "wa.onnx")
    assert np.any(wa["conv2.weight_zero_point"] != 0) and np.all(ref["conv2.weight_zero_point"] == 0)


def test_per_layer_fields_change_only_that_layer(tmp_path):
    ref, _ = _q(tmp_path, init_config(FLOAT), "base.onnx")
    cfg = init_config(FLOAT)
    cfg.layers["fc1"].quant_enable = False
    cfg.layers["conv2"].weight_quant_params["symmetric"] = False
    cfg.layers["relu1"].activation_quant_params["type"] = "QInt8"
    cfg.layers["relu3"].activation_quant_params.update(calibration_method="Percentile", percentile=99.0)
    got, model = _q(tmp_path, cfg, "layers.onnx")
    fc1 = next(n for n in model.graph.node if n.name == "fc1")
    assert fc1.input[1] == "fc1.weight"  # the float weight, no DequantizeLinear
    assert "fc1.weight_quantized" not in got
    assert np.any(got["conv2.weight_zero_point"] != 0) and np.all(got["conv1.weight_zero_point"] == 0)
    assert got["relu1_out_zero_point"].dtype == np.int8 and got["relu2_out_zero_point"].dtype == np.uint8
    assert got["relu3_out_scale"] < ref["relu3_out_scale"] and got["relu2_out_scale"] == ref["relu2_out_scale"]


def test_constant_node_weights_are_prepared(tmp_path):
    f = tmp_path / "f.onnx"
    conv_net(f, constant_weights=True)
    calib = {"x": np.concatenate([d["x"] for d in conv_feeds(8)])}
    cfg = init_config(f, quant_format="QOperator")  # onnxruntime's QOperator crashes on Constant weights
    out = tmp_path / "q.onnx"
    report = quantize(f, cfg, calib, out)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QLinearConv" in ops and "Constant" not in ops
    assert _inits(out)["W1_scale"].size == 4  # per-channel applied (silently skipped on Constant weights)
    assert report.prepared and not report.warnings


def test_calib_sweep_reports_identical_ranges_and_writes_a_config(tmp_path, capsys):
    cfg, table, notes = calib_sweep(FLOAT, CALIB, eval_data=SAMPLES / "digits_test.npz", samples=8, methods=("MinMax", "Entropy", "Percentile"))
    assert set(table.columns) >= {"layer", "MinMax", "Entropy", "Percentile", "best"}
    assert any("Entropy calibration gave exactly the same ranges as MinMax" in n for n in notes)
    assert cfg.activation_quant_params["calibration_method"] in ("MinMax", "Entropy", "Percentile")
    out = tmp_path / "sweep.json"
    assert main(["calib-sweep", str(FLOAT), "--calib", str(CALIB), "--samples", "4", "-o", str(out)]) == 0
    assert "same ranges" in capsys.readouterr().out
    load_config(out)


def _first_outputs(model_path: Path, names: list[str]) -> dict[str, tuple[str, str]]:
    nodes = {n.name: n for n in onnx.load(str(model_path)).graph.node}
    return {name: (nodes[name].op_type, nodes[name].output[0]) for name in names}


def test_export_skip_lists(tmp_path, capsys):
    cfg = init_config(FLOAT).with_disabled({"conv1", "fc2"})
    assert json.loads(export_skip_list(cfg, "ort")) == ["conv1", "fc2"]
    # MNN names ops after the node's first output tensor (a Gemm: <output>__matmul_converted)
    (c_op, c_out), (g_op, g_out) = _first_outputs(FLOAT, ["conv1", "fc2"]).values()
    assert (c_op, g_op) == ("Conv", "Gemm") and c_out != "conv1"
    assert json.loads(export_skip_list(cfg, "mnn", FLOAT)) == {"skip_quant_op_names": [c_out, f"{g_out}__matmul_converted"]}
    with pytest.raises(UsageError, match="--model"):
        export_skip_list(cfg, "mnn")
    nncf_text = export_skip_list(cfg, "nncf")
    assert 'nncf.IgnoredScope(names=["conv1", "fc2"])' in nncf_text and "ONNX backend" in nncf_text
    with pytest.raises(UsageError, match="TensorFlow tensor names"):
        export_skip_list(cfg, "tflite")
    path = tmp_path / "c.json"
    save_config(cfg, path)
    assert main(["export", str(path), "--to", "ort"]) == 0
    assert json.loads(capsys.readouterr().out) == ["conv1", "fc2"]
    assert main(["export", str(path), "--to", "mnn", "--model", str(FLOAT)]) == 0
    assert json.loads(capsys.readouterr().out)["skip_quant_op_names"][0] == c_out
    assert main(["export", str(path), "--to", "tflite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdiff: error: --to tflite") and len(err.strip().splitlines()) == 1


def test_mnn_export_names_are_the_op_names_of_mnns_converter(tmp_path):
    """Converted by MNN's own converter, the model's ops carry the exported names."""
    import shutil
    import subprocess

    tool = shutil.which("mnnconvert")
    if tool is None:
        pytest.skip("MNN is an optional test dependency (pip install MNN puts mnnconvert on PATH)")
    conv_net(tmp_path / "f.onnx")
    cfg = init_config(tmp_path / "f.onnx").with_disabled({"conv1", "fc"})
    exported = json.loads(export_skip_list(cfg, "mnn", tmp_path / "f.onnx"))["skip_quant_op_names"]
    mnn, dump = tmp_path / "f.mnn", tmp_path / "f.json"
    subprocess.run([tool, "-f", "ONNX", "--modelFile", str(tmp_path / "f.onnx"), "--MNNModel", str(mnn)], check=True, capture_output=True)
    subprocess.run([tool, "-f", "MNN", "--modelFile", str(mnn), "--JsonFile", str(dump)], check=True, capture_output=True)
    ops = {op["name"]: op["type"] for op in json.loads(dump.read_text())["oplists"]}
    assert [ops.get(n) for n in exported] == ["Convolution", "Convolution"], (exported, ops)


def test_nncf_export_names_are_accepted_by_nncf_on_the_onnx_model(tmp_path):
    nncf = pytest.importorskip("nncf", reason="NNCF is an optional test dependency (pip install nncf)")
    model = conv_net(tmp_path / "f.onnx")
    cfg = init_config(tmp_path / "f.onnx").with_disabled({"conv1"})
    scope: dict = {}
    exec(export_skip_list(cfg, "nncf"), scope)  # noqa: S102 - the exported snippet, run as a user would
    quantized = nncf.quantize(model, nncf.Dataset(conv_feeds(16)), subset_size=16, ignored_scope=scope["ignored_scope"])
    ops = {n.name: n.op_type for n in quantized.graph.node}
    assert ops["conv1"] == "Conv" and not any(
        n.op_type == "DequantizeLinear" and n.output[0] in next(m for m in quantized.graph.node if m.name == "conv1").input
        for n in quantized.graph.node
    )  # conv1 reads no dequantized tensor: it stayed float


def test_unnamed_nodes_get_one_name_in_configs_the_quantizer_and_layers(tmp_path):
    from qdiff.graph import Graph
    from qdiff._quantize import prepare_model

    m = conv_net(tmp_path / "f.onnx")
    for node in m.graph.node:
        node.name = ""
    onnx.save(m, str(tmp_path / "unnamed.onnx"))
    labels = [Graph(m).node_label(i) for i in range(len(m.graph.node))]
    assert labels[0] == "Conv(c1)"
    assert [n.name for n in prepare_model(m).model.graph.node] == labels  # what nodes_to_exclude matches
    cfg = init_config(tmp_path / "unnamed.onnx")
    assert set(cfg.layers) <= set(labels) and "Conv(c1)" in cfg.layers
    off = cfg.with_disabled({"Conv(c1)"})
    report = quantize(tmp_path / "unnamed.onnx", off, conv_feeds(8), tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx"))
    conv = next(n for n in q.graph.node if n.name == "Conv(c1)")
    assert conv.op_type == "Conv" and not any(
        p.op_type == "DequantizeLinear" and p.output[0] in conv.input for p in q.graph.node
    ), report  # excluded by the name every command uses


# -- the loop ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fragile_float(tmp_path_factory):
    """The digits CNN with an outlier fc1 weight on a dead feature (see test_sensitivity.fragile)."""
    import onnxruntime as ort

    d = tmp_path_factory.mktemp("fragile_loop")
    m = onnx.load(str(FLOAT))
    calib = np.load(CALIB)["input"]
    t = onnx.ModelProto()
    t.CopyFrom(m)
    t.graph.output.append(onnx.ValueInfoProto(name="flatten_out"))
    s = ort.InferenceSession(t.SerializeToString())
    feats = np.concatenate([s.run(["flatten_out"], {"input": x[None]})[0] for x in calib])
    dead = int(np.argmin(np.abs(feats).max(0)))
    inits = {x.name: x for x in m.graph.initializer}
    w = numpy_helper.to_array(inits["fc1.weight"]).copy()
    w[0, dead] = 60.0
    inits["fc1.weight"].CopyFrom(numpy_helper.from_array(w, "fc1.weight"))
    path = d / "fragile.float.onnx"
    onnx.save(m, str(path))
    return path


def _per_tensor(path):
    cfg = init_config(path)
    cfg.weight_quant_params["per_channel"] = False
    return cfg


def test_fallback_beats_the_first_and_last_baseline(fragile_float, tmp_path):
    out = tmp_path / "out"
    r = fallback(
        fragile_float, CALIB, target="cosine>=0.999", eval_data=SAMPLES / "digits_test.npz",
        config=_per_tensor(fragile_float), outdir=out, samples=48,
    )  # fmt: skip
    assert r.reached and r.metric >= 0.999
    assert "fc1" in r.float_layers
    # the usual advice, first and last layers in float, does not reach the target ...
    assert r.baseline["float_layers"] == ["conv1", "fc2"] and not r.baseline["target_met"]
    # ... and the loop keeps no more layers in float than that baseline does
    assert len(r.float_layers) <= len(r.baseline["float_layers"])
    assert {p.name for p in out.iterdir()} == {"config.json", "model.int8.onnx", "history.csv"}
    cfg = load_config(out / "config.json")
    # the config excludes every node of the float units (fc1 with its Relu), and only those
    from qdiff.units import fallback_units

    units = {u.name: u for u in fallback_units(onnx.load(str(fragile_float)))}
    assert sorted(cfg.disabled) == sorted(n for name in r.float_layers for n in units[name].nodes)
    assert "relu3" in units["fc1"].nodes
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["step"][:2]) == ["start", "baseline"]
    assert hist["target_met"].iloc[0] == False  # noqa: E712
    assert hist["target_met"].any()
    # the written model is the reported one
    from qdiff import compare

    again = compare(fragile_float, out / "model.int8.onnx", data=SAMPLES / "digits_test.npz", samples=48)
    assert again.outputs["cosine"].iloc[0] == pytest.approx(r.metric, abs=1e-6)
    # resume starts from the written config and is done at once
    r2 = fallback(fragile_float, CALIB, target="cosine>=0.999", eval_data=SAMPLES / "digits_test.npz", outdir=out, resume=True, samples=48)
    assert r2.reached and r2.float_layers == r.float_layers
    # ... appending to the history, re-measuring nothing already in it
    assert len(r2.history) == len(r.history) == len(pd.read_csv(out / "history.csv"))
    assert list(r2.history["model_sha256"]) == list(r.history["model_sha256"])


def test_fallback_interrupted_leaves_the_best_so_far(fragile_float, tmp_path):
    out = tmp_path / "out"

    def stop_after_three(n, value):
        if n >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fallback(fragile_float, CALIB, target="cosine>=0.999", config=_per_tensor(fragile_float), outdir=out, progress=stop_after_three, samples=16)
    assert (out / "model.int8.onnx").stat().st_size > 0
    assert len(pd.read_csv(out / "history.csv")) == 3
    load_config(out / "config.json")


EVAL = '''
import numpy as np, onnxruntime as ort
from pathlib import Path
S = Path({samples!r})
def accuracy(model_path):
    x = np.load(S / "digits_test.npz")["input"][:120]
    y = np.load(S / "digits_test_labels.npy")[:120]
    s = ort.InferenceSession(model_path)
    return float(np.mean([int(s.run(None, {{"input": v[None]}})[0].argmax()) == t for v, t in zip(x, y)]))
'''


def test_fallback_with_a_task_metric_via_the_cli(fragile_float, tmp_path, capsys):
    ev = tmp_path / "acc.py"
    ev.write_text(EVAL.format(samples=str(SAMPLES)))
    cfg = tmp_path / "pt.json"
    save_config(_per_tensor(fragile_float), cfg)
    out = tmp_path / "out"
    rc = main([
        "fallback", str(fragile_float), "--calib", str(CALIB), "--target", "metric_drop<=0.01",
        "--eval", f"{ev}:accuracy", "--config", str(cfg), "-o", str(out), "--samples", "8",
    ])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "reached" in text and "baseline" in text
    hist = pd.read_csv(out / "history.csv")
    assert hist["metric"].iloc[0] > 0.01 and hist["metric"].iloc[-1] <= 0.01 or hist["target_met"].any()
    assert main(["fallback", str(fragile_float), "--calib", str(CALIB), "--target", "metric_drop<=0.01"]) == 2
    assert "--eval" in capsys.readouterr().err
