"""Bad option values and hostile model/config files: a one-line error (exit 2), never a traceback
or a hang (issue 16, item 7). Real models built in code, quantized with onnxruntime's quantizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    TinyModels,
    assert_one_line_error,
    make_tiny_model,
    quantize_qdq,
    run_cli,
    save_model,
    tiny_calibration,
    write_npz,
)


def _data(d: Path, n: int = 4) -> str:
    return write_npz(d / "d.npz", x=np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32))


# -- zero-size dimensions ---------------------------------------------------------------------------


@pytest.fixture
def zero_dim_model(tmp_path) -> str:
    return save_model(make_tiny_model(input_shape=(0, 4)), tmp_path / "zero.onnx")


@pytest.mark.parametrize(
    "command",
    [
        lambda z, t, d: ["compare", z, z],
        lambda z, t, d: ["sensitivity", z, z, "--no-gain"],
        lambda z, t, d: ["profile", z, z, "--samples", "1", "--warmup", "0"],
        lambda z, t, d: ["diagnose", t.qdq, z],
        lambda z, t, d: ["quantize", z, "--calib", _data(d), "-o", str(d / "q.onnx")],
    ],
    ids=["compare", "sensitivity", "profile", "diagnose", "quantize"],
)
def test_an_input_dimension_of_zero_is_a_one_line_error(command, zero_dim_model, tiny_models, tmp_path, capfd):
    rc, out, err = run_cli(command(zero_dim_model, tiny_models, tmp_path), capfd)
    assert_one_line_error(rc, err, "'x'", "size 0", "[0,4]")


# -- --seed, --max-memory, --threads, --batch-size ----------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "F", "Q", "--seed", "-1"],
        ["sensitivity", "F", "Q", "--no-gain", "--seed", "-1"],
        ["diagnose", "Q", "F", "--seed", "-1"],
        ["profile", "F", "Q", "--seed", "-1"],
    ],
    ids=["compare", "sensitivity", "diagnose", "profile"],
)
def test_negative_seed_is_a_one_line_error(argv, tiny_models, capfd):
    argv = [{"F": tiny_models.float, "Q": tiny_models.qdq}.get(a, a) for a in argv]
    rc, out, err = run_cli(argv, capfd)
    assert_one_line_error(rc, err, "--seed", "-1")


@pytest.mark.parametrize("value", ["infG", "inf", "nanG", "nan", "1e400G", "-infM", "-1G", "0"])
def test_max_memory_that_is_not_a_positive_finite_size_is_a_one_line_error(value, tiny_models, capfd):
    rc, out, err = run_cli(["compare", tiny_models.float, tiny_models.qdq, f"--max-memory={value}"], capfd)
    assert_one_line_error(rc, err, "--max-memory")


def test_profile_threads_beyond_any_machine_is_a_one_line_error(tiny_models, capfd):
    rc, out, err = run_cli(["profile", tiny_models.float, tiny_models.qdq, "--threads", "100000"], capfd)
    assert_one_line_error(rc, err, "--threads", "100000", "0")


@pytest.fixture
def batch2_models(tmp_path) -> TinyModels:
    d = tmp_path / "b2"
    d.mkdir()
    f = save_model(make_tiny_model(input_shape=(2, 4)), d / "f.onnx")
    return TinyModels(d, f, quantize_qdq(f, d / "q.onnx", tiny_calibration(batch=2)))


@pytest.mark.parametrize("command", ["compare", "sensitivity"])
def test_batch_size_on_a_fixed_batch_says_which_sizes_fit(command, batch2_models, tiny_models, tmp_path, capfd):
    rc, out, err = run_cli([command, batch2_models.float, batch2_models.qdq, "--batch-size", "4"], capfd)
    assert_one_line_error(rc, err, "fixed batch dimension of 2", "--batch-size 1 or 2")
    rc, out, err = run_cli([command, tiny_models.float, tiny_models.qdq, "--batch-size", "2", "--data", _data(tmp_path)], capfd)
    assert_one_line_error(rc, err, "fixed batch dimension of 1", "--batch-size 1")


# -- huge --input-shape -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["compare", "sensitivity", "diagnose", "profile"])
def test_huge_input_shape_is_refused_with_its_size(command, tmp_path, capfd):
    m = save_model(make_tiny_model(input_shape=("a", "b", 4)), tmp_path / "dyn3.onnx")
    argv = [command, m, m] + (["--no-gain"] if command == "sensitivity" else [])
    rc, out, err = run_cli(argv + ["--input-shape", "x:100000x100000x4"], capfd)
    assert_one_line_error(rc, err, "--input-shape x:100000x100000x4", "40,000,000,000 values", "GiB")


def test_input_shape_too_big_for_its_type_is_refused_with_its_size(dynamic_models, capfd):
    """400M values pass the per-value bound, but as float32 they take 1.5 GiB per run."""
    argv = ["compare", dynamic_models.float, dynamic_models.qdq, "--input-shape", "x:100000000x4"]
    rc, out, err = run_cli(argv, capfd)
    assert_one_line_error(rc, err, "x:100000000x4", "1,600,000,000 bytes", "GiB", "--input-shape")


# -- external data outside the model's folder ---------------------------------------------------------


def _traversing_model(tmp_path: Path, length: int | None = None) -> str:
    """A model in tmp/sub whose weight's external data location is '../w.bin' (the file exists)."""
    sub = tmp_path / "sub"
    sub.mkdir()
    model = make_tiny_model()
    onnx.save(model, str(sub / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    shutil.move(sub / "w.bin", tmp_path / "w.bin")
    proto = onnx.load(str(sub / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.bin"
            if e.key == "length" and length is not None:
                e.value = str(length)  # claims to be big: qdiff would leave it on disk for onnxruntime
    onnx.save(proto, str(sub / "m.onnx"))
    return str(sub / "m.onnx")


@pytest.mark.parametrize("length", [None, 300 << 20], ids=["small", "left-on-disk"])
@pytest.mark.parametrize("command", ["compare", "match", "config init", "diagnose"])
def test_external_data_outside_the_model_folder_is_refused(command, length, tmp_path, capfd):
    m = _traversing_model(tmp_path, length)
    argv = {
        "compare": ["compare", m, m],
        "match": ["match", m, m],
        "config init": ["config", "init", m, "-o", str(tmp_path / "c.json")],
        "diagnose": ["diagnose", m],
    }[command]
    rc, out, err = run_cli(argv, capfd)
    assert_one_line_error(rc, err, "'../w.bin'", "outside the model's folder", "path traversal")


# -- hostile config files -----------------------------------------------------------------------------


CONFIGS = {
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
    "deeply nested object": ('{"layers": ' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}", "nests JSON too deeply"),
    "huge int": ('{"batch_num": 1' + "0" * 5000 + "}", "4300 digits"),
    "big batch_num": ('{"batch_num": 1' + "0" * 300 + "}", "batch_num"),
    "huge percentile": ('{"activation_quant_params": {"percentile": 1' + "0" * 400 + "}}", "percentile"),
    "NaN percentile": ('{"activation_quant_params": {"percentile": NaN}}', "percentile"),
    "infinite averaging_constant": ('{"activation_quant_params": {"averaging_constant": 1e999}}', "averaging_constant"),
    "binary": ("\udcff", "UTF-8"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("command", ["quantize", "calib-sweep", "export"])
def test_hostile_config_json_is_a_short_one_line_error(case, command, tiny_models, tmp_path, capfd):
    text, keyword = CONFIGS[case]
    cfg = tmp_path / "cfg.json"
    if case == "binary":
        cfg.write_bytes(b"\xff\xfe\x00garbage\x80")
    else:
        cfg.write_text(text)
    out_path = str(tmp_path / ("o.onnx" if command == "quantize" else "o.json"))
    argv = {
        "quantize": ["quantize", tiny_models.float, "--config", str(cfg), "--calib", _data(tmp_path), "-o", out_path],
        "calib-sweep": ["calib-sweep", tiny_models.float, "--config", str(cfg), "--calib", _data(tmp_path), "-o", out_path],
        "export": ["export", str(cfg), "--to", "ort", "-o", out_path],
    }[command]
    rc, out, err = run_cli(argv, capfd)
    line = assert_one_line_error(rc, err, keyword)
    assert len(line) < 400, line
    assert not Path(out_path).exists()
