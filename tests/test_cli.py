"""The ``qdiff compare`` command line: user errors and the happy paths.

User errors: each bad input gives exit status 2, exactly one ``qdiff: error: ...`` line on stderr
naming the problem, no traceback, and no ``--json`` / ``--csv`` file left behind.

Everything runs the real models with the real onnxruntime, in-process through
``qdiff.cli.main`` (captured at the file-descriptor level with ``capfd``), plus one subprocess run
of the installed command.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from conftest import (
    IR_VERSION,
    TinyModels,
    assert_one_line_error,
    make_tiny_model,
    run_cli,
    save_model,
    strict_json_load,
    write_npz,
)
from onnx import helper

import qdiff

LAYER_KEYS = {"layer", "op_type", "float_tensor", "quant_tensor", "cosine", "mse", "mae", "max_abs", "sqnr_db", "kl"}


def _x(n: int = 6, seed: int = 0) -> np.ndarray:
    """``n`` seeded samples for the tiny model's input ``x`` [1,4], laid out [N,4] (axis 0 = samples)."""
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- bad input ------------------------------------------------------------------------------------
#
# Each case builds what it needs in ``d`` (a fresh folder) from the tiny models and returns the
# argument list after ``compare`` plus keywords the error line must contain. ``--json`` and
# ``--csv`` into ``d/out`` are appended unless the case writes its own.

Case = Callable[[TinyModels, Path], tuple[list[str], list[str]]]


def _missing_float(m: TinyModels, d: Path):
    return [str(d / "nope.onnx"), m.qdq], ["float model", "nope.onnx", "does not exist"]


def _missing_quant(m: TinyModels, d: Path):
    return [m.float, str(d / "nope.onnx")], ["quantized model", "nope.onnx", "does not exist"]


def _text_file(m: TinyModels, d: Path):
    p = d / "notes.onnx"
    p.write_text("this is a text file, not a protobuf\n")
    return [str(p), m.qdq], ["notes.onnx", "ONNX model"]


def _empty_file(m: TinyModels, d: Path):
    p = d / "empty.onnx"
    p.write_bytes(b"")
    return [m.float, str(p)], ["empty.onnx", "ONNX model"]


def _directory(m: TinyModels, d: Path):
    p = d / "model_dir.onnx"
    p.mkdir()
    return [str(p), m.qdq], ["model_dir.onnx", "directory"]


def _unknown_op(m: TinyModels, d: Path):
    bad = make_tiny_model(extra_nodes=[helper.make_node("FrobnicateXyz", ["y"], ["z"], name="frob")])
    return [save_model(bad, d / "unknown_op.onnx"), m.qdq], ["unknown_op.onnx", "FrobnicateXyz"]


def _undefined_tensor(m: TinyModels, d: Path):
    bad = make_tiny_model()
    bad.graph.node[1].input[0] = "ghost_tensor"  # relu reads a tensor nothing produces
    return [save_model(bad, d / "undefined.onnx"), m.qdq], ["undefined.onnx", "ghost_tensor"]


def _input_names_differ(m: TinyModels, d: Path):
    other = save_model(make_tiny_model(input_name="pixels"), d / "renamed.onnx")
    return [other, m.qdq], ["inputs", "pixels"]


def _input_shapes_differ(m: TinyModels, d: Path):
    other = save_model(make_tiny_model(input_shape=(2, 4)), d / "batch2.onnx")
    return [other, m.qdq], ["shape", "[2,4]", "[1,4]"]


def _data_missing_key(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--data", write_npz(d / "d.npz", pixels=_x())], ["lacks", "'x'"]


def _data_extra_key(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--data", write_npz(d / "d.npz", x=_x(), mask=_x())], ["'mask'", "not model inputs"]


def _data_strings(m: TinyModels, d: Path):
    data = np.array([["a", "b", "c", "d"]] * 6)
    return [m.float, m.qdq, "--data", write_npz(d / "d.npz", x=data)], ["'x'", "<U1", "float32"]


def _data_complex(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--data", write_npz(d / "d.npz", x=_x().astype(np.complex64))], ["'x'", "complex64"]


def _data_wrong_shape(m: TinyModels, d: Path):
    data = np.zeros((6, 5), np.float32)
    return [m.float, m.qdq, "--data", write_npz(d / "d.npz", x=data)], ["shape", "[1, 5]", "[1,4]"]


def _data_nan(m: TinyModels, d: Path):
    data = _x()
    data[3, 1] = np.nan  # fails on sample 3, after three batches have already run
    return [m.float, m.qdq, "--data", write_npz(d / "d.npz", x=data)], ["NaN", "sample 3"]


def _data_empty_folder(m: TinyModels, d: Path):
    (d / "empty_data").mkdir()
    return [m.float, m.qdq, "--data", str(d / "empty_data")], ["empty_data", "no .npz"]


def _data_missing_path(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--data", str(d / "absent.npz")], ["absent.npz", "does not exist"]


def _data_not_npz(m: TinyModels, d: Path):
    p = d / "d.npz"
    p.write_text("garbage")
    return [m.float, m.qdq, "--data", str(p)], ["d.npz", "npz"]


def _dynamic_dim_without_shape(m: TinyModels, d: Path):
    f = save_model(make_tiny_model(input_shape=(1, "seq_len", 4)), d / "seq.onnx")
    return [f, f], ["'seq_len'", "--input-shape"]


def _malformed_input_shape(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--input-shape", "x=1x4"], ["--input-shape", "x=1x4"]


def _malformed_input_shape_dims(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--input-shape", "x:1xfourx"], ["--input-shape", "x:1xfourx"]


def _input_shape_unknown_name(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--input-shape", "pixels:1x4"], ["pixels", "not model inputs"]


def _input_shape_not_fitting(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--input-shape", "x:1x5"], ["--input-shape", "[1,4]"]


def _provider_unavailable(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--provider", "NoSuchExecutionProvider"], ["NoSuchExecutionProvider", "CPUExecutionProvider"]


def _batch_size_zero(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--batch-size", "0"], ["--batch-size"]


def _batch_size_on_fixed_batch(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--batch-size", "2", "--data", write_npz(d / "d.npz", x=_x())], ["'x'", "batch"]


def _batch_size_on_fixed_batch_random(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--batch-size", "2"], ["'x'", "batch"]


def _samples_zero(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--samples", "0"], ["--samples"]


def _top_zero(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--top", "0"], ["--top"]


def _top_not_int(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--top", "three"], ["--top", "three"]


def _json_into_missing_folder(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--json", str(d / "no_such_dir" / "r.json"), "--csv", str(d / "r.csv")], [
        "--json",
        "no_such_dir",
    ]


def _csv_into_missing_folder(m: TinyModels, d: Path):
    return [m.float, m.qdq, "--csv", str(d / "no_such_dir" / "r.csv"), "--json", str(d / "r.json")], [
        "--csv",
        "no_such_dir",
    ]


BAD_INPUT: dict[str, Case] = {
    "missing-float-file": _missing_float,
    "missing-quant-file": _missing_quant,
    "text-file-named-onnx": _text_file,
    "empty-file": _empty_file,
    "directory-as-model": _directory,
    "unknown-op-type": _unknown_op,
    "undefined-tensor": _undefined_tensor,
    "input-names-differ": _input_names_differ,
    "input-shapes-differ": _input_shapes_differ,
    "data-missing-key": _data_missing_key,
    "data-extra-key": _data_extra_key,
    "data-strings": _data_strings,
    "data-complex": _data_complex,
    "data-wrong-shape": _data_wrong_shape,
    "data-nan": _data_nan,
    "data-empty-folder": _data_empty_folder,
    "data-missing-path": _data_missing_path,
    "data-not-npz": _data_not_npz,
    "dynamic-dim-without-shape": _dynamic_dim_without_shape,
    "malformed-input-shape": _malformed_input_shape,
    "malformed-input-shape-dims": _malformed_input_shape_dims,
    "input-shape-unknown-name": _input_shape_unknown_name,
    "input-shape-not-fitting": _input_shape_not_fitting,
    "provider-unavailable": _provider_unavailable,
    "batch-size-zero": _batch_size_zero,
    "batch-size-on-fixed-batch-data": _batch_size_on_fixed_batch,
    "batch-size-on-fixed-batch-random": _batch_size_on_fixed_batch_random,
    "samples-zero": _samples_zero,
    "top-zero": _top_zero,
    "top-not-an-int": _top_not_int,
    "json-into-missing-folder": _json_into_missing_folder,
    "csv-into-missing-folder": _csv_into_missing_folder,
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_no_output_file(case, tiny_models, tmp_path, capfd):
    d = tmp_path / "case"
    d.mkdir()
    args, keywords = BAD_INPUT[case](tiny_models, d)
    if "--json" not in args:
        args += ["--json", str(d / "r.json"), "--csv", str(d / "r.csv")]
    before = set(d.rglob("*"))

    rc, out, err = run_cli(["compare", *args], capfd)

    assert_one_line_error(rc, err, *keywords)
    assert "Traceback" not in out
    # nothing written: neither the requested files nor atomic-write leftovers
    assert not (d / "r.json").exists()
    assert not (d / "r.csv").exists()
    assert set(d.rglob("*")) == before


def _first_ir_version_refused() -> int:
    """The lowest IR version the installed onnxruntime refuses (1.31 loads up to 13, 1.32 up to 14)."""
    for v in range(IR_VERSION + 1, IR_VERSION + 40):
        try:
            ort.InferenceSession(make_tiny_model(ir_version=v).SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception as exc:
            assert "IR version" in str(exc), exc
            return v
    pytest.skip("onnxruntime loads every IR version tried")


def test_ir_version_newer_than_onnxruntime_is_lowered_with_a_note(tiny_models, tmp_path, capfd):
    v = _first_ir_version_refused()
    newer = make_tiny_model(ir_version=v)
    f = save_model(newer, tmp_path / f"ir{v}.onnx")
    assert onnx.load(f).ir_version == v
    j = tmp_path / "r.json"

    rc, out, err = run_cli(["compare", f, tiny_models.qdq, "--samples", "2", "--json", str(j)], capfd)

    assert rc == 0, err
    notes = strict_json_load(j)["meta"]["notes"]
    assert any(f"ir{v}.onnx" in n and f"IR version {v} lowered to {v - 1}" in n for n in notes), notes
    # the API says the same
    result = qdiff.compare(f, tiny_models.qdq, samples=2)
    assert any(f"IR version {v}" in n for n in result.meta["notes"]), result.meta["notes"]
    assert np.isfinite(result.layers["cosine"]).all()


# -- happy paths on the sample models -------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, samples_dir):
    """One CLI run on the digits CNN and its per-channel QDQ twin, 5 samples, JSON + CSV."""
    from qdiff.cli import main

    d = tmp_path_factory.mktemp("digits")
    j, c = d / "r.json", d / "r.csv"
    float_path = samples_dir / "digits_cnn.float.onnx"
    quant_path = samples_dir / "digits_cnn.qdq_per_channel.onnx"
    data_path = samples_dir / "digits_test.npz"
    argv = ["compare", str(float_path), str(quant_path), "--data", str(data_path), "--samples", "5"]
    import contextlib

    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(argv + ["--json", str(j), "--csv", str(c)])
    result = qdiff.compare(float_path, quant_path, data=data_path, samples=5)
    return {
        "rc": rc,
        "stdout": buf_out.getvalue(),
        "stderr": buf_err.getvalue(),
        "json": j,
        "csv": c,
        "float": float_path,
        "quant": quant_path,
        "data": data_path,
        "argv": argv,
        "result": result,
    }


def test_happy_path_exit_0_and_table(digits_run):
    assert digits_run["rc"] == 0, digits_run["stderr"]
    out = digits_run["stdout"]
    assert "Traceback" not in digits_run["stderr"]
    for layer in ("conv1+relu1", "pool1", "conv2+relu2", "flatten", "fc1+relu3", "fc2"):
        assert layer in out, layer
    assert "digits_cnn.float.onnx vs digits_cnn.qdq_per_channel.onnx" in out
    assert "layers matched" in out and "5 samples" in out
    assert "worst layer:" in out
    assert "final-output cosine:" in out
    assert "logits" in out  # the final outputs table


def test_happy_path_json(digits_run):
    doc = strict_json_load(digits_run["json"])  # strict: no NaN / Infinity tokens
    assert {"layers", "outputs", "unmatched", "meta", "weights", "summary"} <= set(doc)
    assert doc["layers"], "no layer records"
    for rec in doc["layers"]:
        assert LAYER_KEYS <= set(rec), set(rec)
        assert isinstance(rec["cosine"], float) and 0.99 < rec["cosine"] <= 1.0 + 1e-9, rec
    layers = {r["layer"] for r in doc["layers"]}
    assert {"conv1+relu1", "fc2"} <= layers
    assert [r["layer"] for r in doc["layers"]] == list(digits_run["result"].layers["layer"])

    meta = doc["meta"]
    assert meta["qdiff_version"] == qdiff.__version__
    assert meta["onnx_version"] == onnx.__version__
    import onnxruntime

    assert meta["onnxruntime_version"] == onnxruntime.__version__
    assert meta["session"]["provider"] == "CPUExecutionProvider"
    assert meta["float_model"]["sha256"] == _sha256(digits_run["float"])
    assert meta["quant_model"]["sha256"] == _sha256(digits_run["quant"])
    assert isinstance(meta["data_sha256"], str) and len(meta["data_sha256"]) == 64
    assert meta["samples"] == 5
    assert meta["seed"] == 0
    assert doc["summary"]["samples"] == 5
    assert doc["outputs"][0]["float_tensor"] == "logits"
    # the JSON metrics are the API's metrics
    api = digits_run["result"]
    assert meta["data_sha256"] == api.meta["data_sha256"]
    np.testing.assert_allclose([r["cosine"] for r in doc["layers"]], api.layers["cosine"], rtol=0, atol=1e-12)


def test_happy_path_csv(digits_run):
    df = pd.read_csv(digits_run["csv"])
    layers = digits_run["result"].layers
    assert list(df.columns) == list(layers.columns)
    assert len(df) == len(layers)
    assert list(df["layer"]) == list(layers["layer"])
    np.testing.assert_allclose(df["cosine"], layers["cosine"], rtol=1e-12)
    np.testing.assert_allclose(df["sqnr_db"], layers["sqnr_db"], rtol=1e-12)
    # no temporary files from the atomic writes are left next to the outputs
    assert sorted(p.name for p in Path(digits_run["csv"]).parent.iterdir()) == ["r.csv", "r.json"]


def _layer_table_rows(stdout: str) -> list[str]:
    """The data rows of the first (per-layer) table in the CLI output."""
    table = stdout.split("final outputs", 1)[0]
    lines = table.splitlines()
    header_end = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    return [line for line in lines[header_end + 1 :] if line.startswith("│")]


def test_top_shows_only_the_k_worst_layers(digits_run, capfd):
    full_rows = _layer_table_rows(digits_run["stdout"])
    assert len(full_rows) == len(digits_run["result"].layers)

    rc, out, err = run_cli(digits_run["argv"] + ["--top", "3"], capfd)

    assert rc == 0, err
    rows = _layer_table_rows(out)
    assert len(rows) == 3
    worst = list(digits_run["result"].worst(3)["layer"])
    for row, name in zip(rows, worst):
        assert f" {name}" in row, (row, name)
    assert "3 worst layers" in out


def test_weights_flag_prints_the_weights_table(digits_run, capfd):
    assert "weights (float vs dequantized)" not in digits_run["stdout"]

    rc, out, err = run_cli(digits_run["argv"] + ["--weights"], capfd)

    assert rc == 0, err
    assert "weights (float vs dequantized)" in out
    weights = out.split("weights (float vs dequantized)", 1)[1]
    assert "per-channel" in weights
    for layer in digits_run["result"].weights["layer"]:
        assert layer in weights, layer


def test_random_inputs_are_reproducible_by_seed(tiny_models, tmp_path, capfd):
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        j = tmp_path / f"{name}.json"
        rc, out, err = run_cli(["compare", tiny_models.float, tiny_models.qdq, "--seed", seed, "--samples", "3", "--json", str(j)], capfd)
        assert rc == 0, err
        runs[name] = strict_json_load(j)
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a["layers"] == b["layers"]
    assert a["outputs"] == b["outputs"]
    assert a["meta"]["data_sha256"] == b["meta"]["data_sha256"]
    assert a["meta"]["seed"] == 7 and c["meta"]["seed"] == 8
    assert a["meta"]["samples"] == 3
    assert c["meta"]["data_sha256"] != a["meta"]["data_sha256"]
    assert [r["cosine"] for r in c["layers"]] != [r["cosine"] for r in a["layers"]]


def test_console_script_in_a_subprocess(samples_dir, tmp_path):
    script = Path(sys.executable).parent / "qdiff"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "qdiff.cli"]
    j = tmp_path / "r.json"
    proc = subprocess.run(
        cmd
        + [
            "compare",
            str(samples_dir / "digits_cnn.float.onnx"),
            str(samples_dir / "digits_cnn.qdq_per_channel.onnx"),
            "--data",
            str(samples_dir / "digits_test.npz"),
            "--samples",
            "4",
            "--json",
            str(j),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "conv1+relu1" in proc.stdout and "fc2" in proc.stdout
    assert strict_json_load(j)["meta"]["samples"] == 4

    bad = subprocess.run(cmd + ["compare", str(tmp_path / "missing.onnx"), str(j)], capture_output=True, text=True, timeout=120)
    assert_one_line_error(bad.returncode, bad.stderr, "missing.onnx", "does not exist")
    assert bad.stdout == ""


def test_rich_table_renders_deterministically(samples_dir):
    from rich.console import Console

    from qdiff.render import compare_renderable

    def render(result, **kw) -> str:
        console = Console(file=io.StringIO(), width=100, color_system=None)
        console.print(compare_renderable(result, **kw))
        return console.file.getvalue()

    args = (samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx")
    data = samples_dir / "digits_test.npz"
    r1 = qdiff.compare(*args, data=data, samples=4)
    r2 = qdiff.compare(*args, data=data, samples=4)
    text = render(r1)
    assert text == render(r1)
    assert text == render(r2)
    assert "\x1b[" not in text  # no colour codes
    assert max(len(line) for line in text.splitlines()) <= 100
    for layer in r1.layers["layer"]:
        assert layer in text
    assert render(r1, top=2) == render(r2, top=2)
    assert len(_layer_table_rows(render(r1, top=2))) == 2


def test_version_flag(capfd):
    rc, out, err = run_cli(["--version"], capfd)
    assert rc == 0
    assert out.strip() == f"qdiff {qdiff.__version__}"


def test_json_and_csv_round_trip_on_tiny_models(tiny_models, tmp_path, capfd):
    """The smallest end-to-end: random inputs, outputs written next to each other."""
    j, c = tmp_path / "t.json", tmp_path / "t.csv"
    rc, out, err = run_cli(["compare", tiny_models.float, tiny_models.qdq, "--samples", "2", "--json", str(j), "--csv", str(c)], capfd)
    assert rc == 0, err
    doc = strict_json_load(j)
    df = pd.read_csv(c)
    assert [r["layer"] for r in doc["layers"]] == list(df["layer"])
    assert doc["meta"]["data"].startswith("random inputs")
    assert "matmul" in out
    assert "NaN" not in j.read_text() and "Infinity" not in j.read_text()


# -- layout: one dispatch table, the library never imports the CLI ---------------------------------


def test_every_subcommand_is_in_the_one_dispatch_table():
    import qdiff.cli

    parser = qdiff.cli._build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(qdiff.cli.COMMANDS)
    for name, module in qdiff.cli.COMMANDS.items():
        assert module.NAME == name and callable(module.add_parser) and callable(module.run), name


def test_the_library_never_imports_the_cli():
    import ast

    root = Path(qdiff.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            offenders += [f"{rel}: {n}" for n in names if n == "qdiff.cli" or n.startswith("qdiff.cli.")]
    assert offenders == []


def test_render_exports_every_result_renderer():
    import importlib
    import pkgutil

    import qdiff.render
    from qdiff.result import Result

    for info in pkgutil.iter_modules(qdiff.__path__, "qdiff."):
        if not info.name.startswith(("qdiff.cli", "qdiff._ckernels")):
            importlib.import_module(info.name)
    wanted = {"compare_renderable", "alignment_renderable", "sensitivity_renderable", "fallback_renderable",
              "diagnose_renderable", "profile_renderable"}  # fmt: skip
    assert wanted <= set(qdiff.render.__all__)
    classes, todo = set(), [Result]
    while todo:
        for c in todo.pop().__subclasses__():
            classes.add(c)
            todo.append(c)
    for cls in classes:
        if cls._renderer:
            assert cls._renderer in wanted and callable(getattr(qdiff.render, cls._renderer)), cls
