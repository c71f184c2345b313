"""An .npz is read as a stream: ``--samples N`` reads N rows of each member, not the whole array
(issue 16, item 8). The "bomb" is 200 MB of float32 zeros deflated to well under 1 MB."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, quantize_qdq, save_model
from onnx import TensorProto, helper, numpy_helper

from qdiff.errors import DataError
from qdiff.inputs import InputSpec, make_source

ROWS, FEATURES = 50_000, 1000  # 200 MB of float32


def write_bomb(path: Path, rows: int = ROWS, features: int = FEATURES, key: str = "x") -> str:
    """An .npz whose member ``key`` is a [rows, features] float32 array of zeros, compressed,
    written in 1 MiB chunks (the test never holds the array)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (rows, features)})
            left = rows * features * 4
            chunk = bytes(1 << 20)
            while left:
                fh.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return str(path)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> str:
    path = write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.npz")
    assert Path(path).stat().st_size < 2 << 20  # compressed: a few hundred KB for 200 MB
    return path


def test_samples_of_an_npz_bomb_read_only_those_rows(bomb):
    import tracemalloc

    spec = InputSpec("x", np.dtype(np.float32), (1, FEATURES))
    tracemalloc.start()
    try:
        batches = list(make_source(bomb, [spec], samples=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(batches) == 2 and batches[0]["x"].shape == (1, FEATURES)
    assert not batches[1]["x"].any()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB for 2 rows of 4 KB"  # the array is 200 MB


def test_rows_read_from_a_stream_equal_np_load(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3, 4)).astype(np.float32)
    ids = rng.integers(0, 9, size=(7, 5)).astype(np.int64)
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, x=x, ids=ids)
        specs = [InputSpec("x", np.dtype(np.float32), (3, 4)), InputSpec("ids", np.dtype(np.int64), (5,))]
        got = list(make_source(str(path), specs, samples=3))
        assert len(got) == 3
        for i, b in enumerate(got):
            np.testing.assert_array_equal(b["x"], x[i])
            np.testing.assert_array_equal(b["ids"], ids[i])


def test_a_member_shorter_than_its_header_is_a_data_error(tmp_path):
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("x.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (100, 4)})
            fh.write(bytes(16))  # one row of the hundred
    spec = InputSpec("x", np.dtype(np.float32), (1, 4))
    with pytest.raises(DataError, match="not a readable .npz"):
        list(make_source(str(path), [spec], samples=5))


def test_compare_on_an_npz_bomb_with_samples_keeps_memory_small(bomb, tmp_path):
    """End to end, in a fresh process: peak RSS of compare on the bomb with --samples 2 stays
    within a few MB of the same compare on a 2-sample file (the bomb's array is 200 MB). A guard
    for the whole command; the exact check of what is read is the tracemalloc test above (this one
    depends on when the data is read against the sessions' own peak, so it is not always able to
    see a whole-array read)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FEATURES])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((FEATURES, 3)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "fc", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    f = save_model(model, tmp_path / "fc.onnx")
    rng = np.random.default_rng(1)
    q = quantize_qdq(f, tmp_path / "fc.qdq.onnx", [{"x": rng.standard_normal((1, FEATURES)).astype(np.float32)} for _ in range(4)])
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((2, FEATURES), np.float32))
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}

    def peak_rss(data: str) -> int:
        script = textwrap.dedent(
            f"""
            import resource
            from qdiff.cli import main
            assert main(["compare", {f!r}, {q!r}, "--data", {data!r}, "--samples", "2"]) == 0
            print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            """
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.rsplit("PEAK", 1)[1])

    growth = peak_rss(bomb) - peak_rss(str(small))
    assert growth < 48 << 20, f"peak RSS {growth / 2**20:.0f} MiB above the 2-sample file's, reading 2 rows of a 200 MB array"
