"""Shared fixtures and helpers for the qdiff tests.

Everything here builds *real* ONNX models and runs them with the real onnxruntime; nothing is
mocked. Models built in code follow the conventions onnxruntime 1.31 needs: opset 17 and
``ir_version = 10`` (onnx 1.23 would write IR 14, which onnxruntime refuses).

Fixtures
--------
``samples_dir``
    Path to ``sample_models/`` (the digits CNN, transformer and multi-output models and data).
``tiny_models``
    A :class:`TinyModels` in a fresh ``tmp_path``: a tiny float model
    ``x [1,4] -> MatMul W[4,3] -> Relu -> y [1,3]`` and its int8 QDQ twin made by
    ``onnxruntime.quantization.quantize_static``. The quantization itself runs once per test
    session; each test gets its own copies of the files.
``dynamic_models``
    Like ``tiny_models`` but the input is ``x ['batch', 4]`` (a dynamic batch dimension).

Helpers (import them with ``from conftest import ...``)
-------------------------------------------------------
``make_tiny_model(...)``       the tiny float ModelProto, with options (input name, shape, IR, ...)
``make_dynamic_batch_model()`` the same model with input shape ``['batch', 4]``
``save_model(model, path)``    ``onnx.save`` returning the path as str
``quantize_qdq(float_path, qdq_path, calib)``  real ``quantize_static`` (QDQ, int8)
``write_npz(path, **arrays)``  ``np.savez`` returning the path as str
``run_cli(argv, capfd)``       ``qdiff.cli.main(argv)`` -> ``(rc, stdout, stderr)``
``assert_one_line_error(rc, err, *keywords)``  the CLI's user-error contract
``strict_json_load(path)``     ``json.load`` that fails on NaN / Infinity
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "sample_models"

#: opset and IR version every model built in the tests uses (onnxruntime 1.31 loads IR <= 13)
OPSET = 17
IR_VERSION = 10

#: the tiny model's weight: deterministic, mixed signs so Relu clips some outputs
TINY_W = np.array(
    [[0.5, -0.25, 1.0], [-0.75, 0.5, 0.25], [0.125, 1.0, -0.5], [1.0, -1.0, 0.75]], dtype=np.float32
)


# -- model building -------------------------------------------------------------------------------


def make_tiny_model(
    *,
    input_name: str = "x",
    input_shape: Sequence[int | str | None] = (1, 4),
    weight: np.ndarray | None = None,
    ir_version: int = IR_VERSION,
    input_dtype: int = TensorProto.FLOAT,
    extra_nodes: Iterable[onnx.NodeProto] = (),
    output_name: str = "y",
) -> onnx.ModelProto:
    """The tiny float model ``x -> MatMul(W[4,3]) 'matmul' -> Relu 'relu' -> y``.

    Args:
        input_name: name of the graph input.
        input_shape: the input shape; strings (or None) make dynamic dimensions. The last
            dimension must stay 4.
        weight: a ``[4,3]`` float32 weight (default :data:`TINY_W`).
        ir_version: the model's IR version (10 by default; 14 makes onnxruntime refuse it).
        input_dtype: onnx element type of the input (the weight stays float32).
        extra_nodes: nodes appended after ``relu`` (to build broken models).
        output_name: name of the graph output.
    """
    w = TINY_W if weight is None else np.asarray(weight, dtype=np.float32)
    out_shape = list(input_shape[:-1]) + [3]
    nodes = [
        helper.make_node("MatMul", [input_name, "W"], ["mm_out"], name="matmul"),
        helper.make_node("Relu", ["mm_out"], [output_name], name="relu"),
        *extra_nodes,
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, input_dtype, list(input_shape))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qdiff-tests")
    model.ir_version = ir_version
    return model


def make_dynamic_batch_model(**kwargs) -> onnx.ModelProto:
    """The tiny model with input shape ``['batch', 4]`` (dynamic batch axis named ``batch``)."""
    kwargs.setdefault("input_shape", ("batch", 4))
    return make_tiny_model(**kwargs)


def save_model(model: onnx.ModelProto, path: str | Path) -> str:
    """Save ``model`` to ``path`` (IR version left as set on the proto); returns ``str(path)``."""
    onnx.save(model, str(path))
    return str(path)


def tiny_calibration(n: int = 16, batch: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` seeded calibration feeds ``{"x": float32 [batch,4]}`` for the tiny models."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 4)).astype(np.float32)} for _ in range(n)]


def quantize_qdq(float_path: str | Path, qdq_path: str | Path, calib: Sequence[Mapping[str, np.ndarray]]) -> str:
    """Quantize with onnxruntime's real ``quantize_static`` (QDQ, int8 activations and weights).

    The result is reloaded and set to IR 10 (the quantizer writes onnx's default IR version).
    Returns ``str(qdq_path)``.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([dict(c) for c in calib])

        def get_next(self):  # type: ignore[override]
            return next(self._it, None)

    quantize_static(
        str(float_path),
        str(qdq_path),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    model = onnx.load(str(qdq_path))
    model.ir_version = IR_VERSION
    onnx.save(model, str(qdq_path))
    return str(qdq_path)


@dataclass(frozen=True)
class TinyModels:
    """Paths (as str) of a tiny float model and its QDQ twin, in ``dir``."""

    dir: Path
    float: str
    qdq: str


def _build_pair(directory: Path, model: onnx.ModelProto, calib_batch: int) -> tuple[bytes, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    f = save_model(model, directory / "float.onnx")
    q = quantize_qdq(f, directory / "qdq.onnx", tiny_calibration(batch=calib_batch))
    return Path(f).read_bytes(), Path(q).read_bytes()


@pytest.fixture(scope="session")
def _tiny_pair_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return _build_pair(tmp_path_factory.mktemp("tiny"), make_tiny_model(), 1)


@pytest.fixture(scope="session")
def _dynamic_pair_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    return _build_pair(tmp_path_factory.mktemp("tiny_dyn"), make_dynamic_batch_model(), 2)


def _materialise(directory: Path, pair: tuple[bytes, bytes]) -> TinyModels:
    directory.mkdir(parents=True, exist_ok=True)
    f, q = directory / "tiny.float.onnx", directory / "tiny.qdq.onnx"
    f.write_bytes(pair[0])
    q.write_bytes(pair[1])
    return TinyModels(directory, str(f), str(q))


@pytest.fixture
def tiny_models(tmp_path: Path, _tiny_pair_bytes: tuple[bytes, bytes]) -> TinyModels:
    """Tiny float model (input ``x`` [1,4], output ``y`` [1,3]) and its QDQ twin, in ``tmp_path/models``."""
    return _materialise(tmp_path / "models", _tiny_pair_bytes)


@pytest.fixture
def dynamic_models(tmp_path: Path, _dynamic_pair_bytes: tuple[bytes, bytes]) -> TinyModels:
    """Tiny float model with input ``x`` ['batch', 4] and its QDQ twin, in ``tmp_path/dyn_models``."""
    return _materialise(tmp_path / "dyn_models", _dynamic_pair_bytes)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """Path to the repository's ``sample_models`` folder."""
    if not (SAMPLES_DIR / "digits_cnn.float.onnx").exists():
        pytest.skip("sample_models/ is missing")
    return SAMPLES_DIR


# -- data and CLI helpers -------------------------------------------------------------------------


def write_npz(path: str | Path, **arrays: np.ndarray) -> str:
    """``np.savez(path, **arrays)``; returns ``str(path)``."""
    np.savez(str(path), **arrays)
    return str(path)


def run_cli(argv: Sequence[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``qdiff.cli.main(argv)`` in-process; returns ``(rc, stdout, stderr)``.

    Use ``capfd`` (not ``capsys``) so that anything onnxruntime writes straight to the stderr
    file descriptor is seen too. argparse errors (``SystemExit``) are turned into a return code.
    """
    from qdiff.cli import main

    capfd.readouterr()  # drop anything a fixture printed
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's parser.error / exit
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capfd.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *keywords: str) -> str:
    """Assert qdiff's user-error contract and return the error line.

    Exit status 2; stderr is exactly one non-empty line starting with ``qdiff: error:``; no
    traceback; the line contains every keyword (case-insensitive).
    """
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert rc == 2, f"rc={rc}, stderr={err!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    line = lines[0]
    assert line.strip(), err
    assert line.startswith("qdiff: error:"), line
    for kw in keywords:
        assert kw.lower() in line.lower(), f"{kw!r} not in {line!r}"
    return line


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-strict JSON constant {name}")


def strict_json_load(path: str | Path) -> dict:
    """Load JSON from ``path``, raising on ``NaN``, ``Infinity`` and ``-Infinity``."""
    with open(path, encoding="utf-8") as fh:
        return json.loads(fh.read(), parse_constant=_reject_constant)


def copy_file(src: str | Path, dst: str | Path) -> str:
    """``shutil.copyfile`` returning ``str(dst)``."""
    shutil.copyfile(src, dst)
    return str(dst)
