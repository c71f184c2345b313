"""Names that look like rich markup or hold terminal control characters are printed as
themselves, escaped, by every command (issue 16, item 2); tables at 80 columns round numbers
instead of cropping them, and compare says when its inputs were random (item 11)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from conftest import assert_one_line_error, make_tiny_model, quantize_qdq, run_cli, save_model, tiny_calibration, write_npz

import qdiff

MM = "mm[/bogus]\x1b[31m"
RELU = "[link=http://x]relu\x07"


@pytest.fixture
def hostile(tmp_path) -> tuple[str, str]:
    """The tiny model with node names that are rich markup and hold ESC/BEL, and its QDQ twin."""
    model = make_tiny_model()
    model.graph.node[0].name = MM
    model.graph.node[1].name = RELU
    f = save_model(model, tmp_path / "hostile.onnx")
    return f, quantize_qdq(f, tmp_path / "hostile.qdq.onnx", tiny_calibration())


def _shows_names_escaped(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text  # no raw control character reaches the terminal
    assert "[/bogus]" in text and "\\x1b[31m" in text  # shown as itself, the ESC as \x1b
    assert "[link=http://x]relu" in text or "relu" in text  # folded tables may split the name


@pytest.mark.parametrize(
    "command",
    [
        lambda f, q, o: ["compare", f, q, "--json", o, "--weights"],
        lambda f, q, o: ["sensitivity", f, q, "--json", o],
        lambda f, q, o: ["diagnose", q, f, "--json", o, "--tables"],
        lambda f, q, o: ["profile", f, q, "--samples", "2", "--warmup", "0", "--json", o],
        lambda f, q, o: ["match", f, q, "-o", o],
    ],
    ids=["compare", "sensitivity", "diagnose", "profile", "match"],
)
def test_markup_and_escape_codes_in_node_names_print_as_text(command, hostile, tmp_path, capfd):
    out_json = str(tmp_path / "r.json")
    rc, out, err = run_cli(command(*hostile, out_json), capfd)
    assert rc == 0, err
    assert "Traceback" not in err
    _shows_names_escaped(out)
    assert Path(out_json).exists()  # the run's result is not lost
    assert any(MM in v for v in _strings(json.loads(Path(out_json).read_text())))  # the file keeps the real name


def _strings(doc):
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for v in doc.values():
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)


def test_renderers_at_80_columns_escape_names(hostile):
    from rich.console import Console

    from qdiff.render import alignment_renderable, compare_renderable

    f, q = hostile
    for renderable in (compare_renderable(qdiff.compare(f, q, samples=2)), alignment_renderable(qdiff.match(f, q))):
        console = Console(file=io.StringIO(), width=80, color_system=None)
        console.print(renderable)
        text = console.file.getvalue()
        assert "\x1b" not in text and "mm[/bogus" in text  # folded at 80 columns, but there
        assert max(len(line) for line in text.splitlines()) <= 80


def test_error_line_stays_one_line_whatever_a_path_holds(tiny_models, tmp_path, capfd):
    bad = str(tmp_path / "evil\nname\x1b[2J.onnx")
    rc, out, err = run_cli(["compare", bad, tiny_models.qdq], capfd)
    line = assert_one_line_error(rc, err, "does not exist", "\\n", "\\x1b[2J")
    assert "\x1b" not in line


# -- item 11 -------------------------------------------------------------------------------------


def test_compare_without_data_says_inputs_were_random(tiny_models, tmp_path, capfd):
    out_json = tmp_path / "r.json"
    rc, out, err = run_cli(["compare", tiny_models.float, tiny_models.qdq, "--json", str(out_json)], capfd)
    assert rc == 0, err
    assert re.search(r"inputs: random inputs \(seed 0\), seeded normal values, not real data", out)
    assert "--data" in out.splitlines()[-1]
    doc = json.loads(out_json.read_text())
    assert doc["summary"]["random_inputs"] is True and doc["meta"]["random_inputs"] is True

    data = write_npz(tmp_path / "d.npz", x=__import__("numpy").ones((3, 4), "float32"))
    rc, out, err = run_cli(["compare", tiny_models.float, tiny_models.qdq, "--data", data, "--json", str(out_json)], capfd)
    assert rc == 0, err
    assert "not real data" not in out
    doc = json.loads(out_json.read_text())
    assert doc["summary"]["random_inputs"] is False and doc["meta"]["random_inputs"] is False


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]


def test_compare_table_at_80_columns_rounds_numbers_instead_of_cropping(samples_dir):
    from rich.console import Console

    from qdiff.render import compare_renderable

    result = qdiff.compare(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx",
        data=samples_dir / "digits_test.npz", samples=4,
    )  # fmt: skip
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(compare_renderable(result))
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    header = next(line for line in text.splitlines() if "cosine" in line and line.startswith("┃"))
    names = [c.strip() for c in header.strip("┃").split("┃")]
    rows = [r for r in _table_rows(text) if r[0]]  # the first line of each layer row (not folded continuations)
    layer_rows = rows[: len(result.layers)]
    for row, (_, layer) in zip(layer_rows, result.layers.iterrows()):
        cos = row[names.index("cosine")]
        assert "…" not in cos
        assert abs(float(cos) - layer["cosine"]) <= 0.5 * 10 ** -(len(cos.split(".")[1])) + 1e-12, (cos, layer["cosine"])


def test_fit_table_rounds_0_999895_to_0_9999_at_80_columns():
    from rich.console import Console

    from qdiff.render.tables import Col, FitTable, _num

    cols = [Col("layer", text=True, floor=10)] + [Col(f"metric {i}", _num(6, 4)) for i in range(8)]
    table = FitTable("t", cols, [(["a_long_layer_name"] + [0.999895] * 8, None)], levels=2)
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(table)
    text = console.file.getvalue()
    assert "0.9999" in text and "0.9998" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    wide = Console(file=io.StringIO(), width=200, color_system=None)
    wide.print(table)
    assert "0.999895" in wide.file.getvalue()
