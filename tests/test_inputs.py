"""Data sources (qdiff/inputs.py): .npz files, folders, dicts, iterables and seeded random inputs.

The sources are checked directly (``make_source`` batches) and through ``qdiff.compare`` on real
models run by onnxruntime: the same data given in different forms must give identical metrics
and an identical ``data_sha256``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tiny_model, save_model, write_npz
from onnx import TensorProto, helper

import qdiff
from qdiff import DataError, Graph, UsageError, input_specs, make_source

METRICS = ["cosine", "cosine_worst", "mse", "mae", "max_abs", "sqnr_db", "kl"]


def _specs(path_or_model) -> list[qdiff.InputSpec]:
    model = onnx.load(str(path_or_model)) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    return input_specs(Graph(model))


def _x(n: int = 6, seed: int = 0) -> np.ndarray:
    """``n`` seeded samples for input ``x`` [1,4] (or ['batch',4]), laid out [N,4]."""
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def _assert_same_metrics(a: qdiff.CompareResult, b: qdiff.CompareResult) -> None:
    assert list(a.layers["layer"]) == list(b.layers["layer"])
    np.testing.assert_array_equal(a.layers[METRICS].to_numpy(), b.layers[METRICS].to_numpy())
    np.testing.assert_array_equal(a.outputs[METRICS].to_numpy(), b.outputs[METRICS].to_numpy())
    assert a.meta["samples"] == b.meta["samples"]


def _assert_finite(result: qdiff.CompareResult) -> None:
    assert len(result.layers) > 0
    assert np.isfinite(result.layers[METRICS].to_numpy()).all(), result.layers
    assert np.isfinite(result.outputs[METRICS].to_numpy()).all(), result.outputs


def make_two_input_model() -> onnx.ModelProto:
    """``a [1,4] + b [1,4] -> Add 'add' -> Relu 'relu' -> y`` (float32, opset 17, IR 10)."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["s"], name="add"),
            helper.make_node("Relu", ["s"], ["y"], name="relu"),
        ],
        "two_inputs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


# -- .npz files -----------------------------------------------------------------------------------


def test_npz_is_sliced_one_sample_per_run(tiny_models, tmp_path):
    x = _x(5)
    path = write_npz(tmp_path / "d.npz", x=x)
    source = make_source(path, _specs(tiny_models.float))
    batches = list(source)
    assert len(batches) == 5 and source.batches == 5
    for i, b in enumerate(batches):
        assert set(b) == {"x"}
        assert b["x"].shape == (1, 4) and b["x"].dtype == np.float32
        np.testing.assert_array_equal(b["x"], x[i : i + 1])


def test_npz_with_an_extra_sample_axis_feeds_each_index(samples_dir):
    """The digits data is [N,1,8,8] for an input [1,1,8,8]: sample i is arr[i:i+1]."""
    specs = _specs(samples_dir / "digits_cnn.float.onnx")
    arr = np.load(samples_dir / "digits_test.npz")["input"]
    batches = list(make_source(samples_dir / "digits_test.npz", specs, samples=3))
    assert [b["input"].shape for b in batches] == [(1, 1, 8, 8)] * 3
    for i, b in enumerate(batches):
        np.testing.assert_array_equal(b["input"], arr[i : i + 1])


def test_samples_caps_the_number_of_runs(tiny_models, tmp_path):
    path = write_npz(tmp_path / "d.npz", x=_x(6))
    specs = _specs(tiny_models.float)
    assert len(list(make_source(path, specs, samples=2))) == 2
    assert len(list(make_source(path, specs, samples=100))) == 6
    result = qdiff.compare(tiny_models.float, tiny_models.qdq, data=path, samples=4)
    assert result.meta["samples"] == 4
    assert (result.layers["samples"] == 4).all()


def test_sample_models_with_their_data(samples_dir):
    result = qdiff.compare(
        samples_dir / "transformer.float.onnx",
        samples_dir / "transformer.qdq.onnx",
        data=samples_dir / "transformer_data.npz",
        samples=2,
    )
    assert result.meta["samples"] == 2
    _assert_finite(result)


# -- batching -------------------------------------------------------------------------------------


def test_batch_size_on_a_dynamic_batch_model_concatenates(dynamic_models, tmp_path):
    x = _x(12)
    specs = _specs(dynamic_models.float)
    assert specs[0].shape == ("batch", 4)
    batches = list(make_source({"x": x}, specs, batch_size=4))
    assert [b["x"].shape for b in batches] == [(4, 4)] * 3
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)

    result = qdiff.compare(dynamic_models.float, dynamic_models.qdq, data={"x": x}, batch_size=4)
    assert result.meta["samples"] == 12 and result.meta["runs"] == 3  # runs of 4 samples each
    assert result.meta["batch_size"] == 4
    out = result.layers.set_index("float_tensor")
    assert out.loc["x", "shape"] == "4x4"  # what the model saw
    assert result.outputs["shape"].tolist() == ["4x3"]
    _assert_finite(result)
    assert (result.layers["cosine"] > 0.99).all()


def test_batch_size_on_a_dynamic_batch_folder_concatenates(dynamic_models, tmp_path):
    x = _x(8)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(8):
        np.savez(folder / f"s{i:02d}.npz", x=x[i])  # no batch axis in the files
    batches = list(make_source(folder, _specs(dynamic_models.float), batch_size=4))
    assert [b["x"].shape for b in batches] == [(4, 4)] * 2
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)

    as_folder = qdiff.compare(dynamic_models.float, dynamic_models.qdq, data=folder, batch_size=4)
    as_dict = qdiff.compare(dynamic_models.float, dynamic_models.qdq, data={"x": x}, batch_size=4)
    _assert_same_metrics(as_folder, as_dict)
    assert as_folder.meta["data_sha256"] == as_dict.meta["data_sha256"]


@pytest.mark.parametrize("kind", ["npz", "folder", "random"])
def test_batch_size_on_a_fixed_batch_1_model_is_an_error(tiny_models, tmp_path, kind):
    if kind == "npz":
        data = write_npz(tmp_path / "d.npz", x=_x(8))
    elif kind == "folder":
        data = tmp_path / "data"
        data.mkdir()
        for i in range(4):
            np.savez(data / f"{i}.npz", x=_x(1, seed=i))
    else:
        data = None
    with pytest.raises(UsageError, match=r"'x'.*fixed batch dimension of 1"):
        make_source(data, _specs(tiny_models.float), batch_size=2)
    with pytest.raises(UsageError):
        qdiff.compare(tiny_models.float, tiny_models.qdq, data=data, batch_size=2)


def test_batch_size_on_per_index_samples_of_a_fixed_batch_model_is_an_error(samples_dir):
    """[N,1,8,8] data for a [1,1,8,8] input: the message names the fixed batch dimension."""
    with pytest.raises(UsageError, match=r"'input'.*fixed batch dimension of 1"):
        make_source(samples_dir / "digits_test.npz", _specs(samples_dir / "digits_cnn.float.onnx"), batch_size=4)


# -- folders --------------------------------------------------------------------------------------


def test_folder_is_read_in_sorted_order_and_matches_the_npz(tiny_models, tmp_path):
    x = _x(6)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in reversed(range(6)):  # written in reverse: the order must come from the names
        np.savez(folder / f"sample_{i:03d}.npz", x=x[i : i + 1])
    (folder / "README.txt").write_text("ignored: not .npz/.npy")

    specs = _specs(tiny_models.float)
    batches = list(make_source(folder, specs))
    assert len(batches) == 6
    for i, b in enumerate(batches):
        np.testing.assert_array_equal(b["x"], x[i : i + 1])

    npz = write_npz(tmp_path / "d.npz", x=x)
    from_npz = qdiff.compare(tiny_models.float, tiny_models.qdq, data=npz)
    from_folder = qdiff.compare(tiny_models.float, tiny_models.qdq, data=folder)
    _assert_same_metrics(from_npz, from_folder)
    assert from_npz.meta["data_sha256"] == from_folder.meta["data_sha256"]
    assert from_folder.meta["samples"] == 6
    assert str(folder) in from_folder.meta["data"]


def test_folder_is_read_lazily(tiny_models, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", x=_x(1, seed=i))
    (folder / "3.npz").write_bytes(b"not an npz at all")  # only read if we get that far

    source = make_source(folder, _specs(tiny_models.float))  # nothing is read yet
    it = iter(source)
    for _ in range(3):
        next(it)
    assert source.batches == 3
    with pytest.raises(DataError, match="3.npz"):
        next(it)

    # --samples 3 never opens the broken file
    result = qdiff.compare(tiny_models.float, tiny_models.qdq, data=folder, samples=3)
    assert result.meta["samples"] == 3
    with pytest.raises(DataError, match="3.npz"):
        qdiff.compare(tiny_models.float, tiny_models.qdq, data=folder)


def test_npy_folder_for_a_single_input_model(tiny_models, tmp_path):
    x = _x(4)
    folder = tmp_path / "npy"
    folder.mkdir()
    for i in range(4):
        np.save(folder / f"{i:02d}.npy", x[i])  # [4]: gets a batch axis
    batches = list(make_source(folder, _specs(tiny_models.float)))
    assert [b["x"].shape for b in batches] == [(1, 4)] * 4
    for i, b in enumerate(batches):
        np.testing.assert_array_equal(b["x"], x[i : i + 1])

    from_npy = qdiff.compare(tiny_models.float, tiny_models.qdq, data=folder)
    from_dict = qdiff.compare(tiny_models.float, tiny_models.qdq, data={"x": x})
    _assert_same_metrics(from_npy, from_dict)
    assert from_npy.meta["data_sha256"] == from_dict.meta["data_sha256"]


def test_folder_files_without_a_batch_axis_get_one(samples_dir, tmp_path):
    arr = np.load(samples_dir / "digits_test.npz")["input"][:3]  # [3,1,8,8]
    with_axis, without_axis = tmp_path / "with", tmp_path / "without"
    with_axis.mkdir()
    without_axis.mkdir()
    for i in range(3):
        np.savez(with_axis / f"{i}.npz", input=arr[i : i + 1])  # [1,1,8,8]
        np.savez(without_axis / f"{i}.npz", input=arr[i])  # [1,8,8]
    specs = _specs(samples_dir / "digits_cnn.float.onnx")
    assert [b["input"].shape for b in make_source(without_axis, specs)] == [(1, 1, 8, 8)] * 3

    models = (samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx")
    a = qdiff.compare(*models, data=with_axis)
    b = qdiff.compare(*models, data=without_axis)
    _assert_same_metrics(a, b)
    assert a.meta["data_sha256"] == b.meta["data_sha256"]


def test_npy_in_a_folder_for_a_multi_input_model_is_an_error(tmp_path):
    model = save_model(make_two_input_model(), tmp_path / "two.onnx")
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "0.npy", np.zeros((1, 4), np.float32))
    with pytest.raises(DataError, match=r"\.npy.*2 inputs"):
        make_source(folder, _specs(model))


def test_npy_file_for_a_multi_input_model_is_a_data_error(tmp_path):
    model = save_model(make_two_input_model(), tmp_path / "two.onnx")
    np.save(tmp_path / "d.npy", np.zeros((3, 1, 4), np.float32))
    with pytest.raises(DataError, match="one array"):
        make_source(tmp_path / "d.npy", _specs(model))


# -- dtypes ---------------------------------------------------------------------------------------


def test_float64_data_is_cast_to_float32(tiny_models):
    x = _x(4)
    batches = list(make_source({"x": x.astype(np.float64)}, _specs(tiny_models.float)))
    assert all(b["x"].dtype == np.float32 for b in batches)
    as64 = qdiff.compare(tiny_models.float, tiny_models.qdq, data={"x": x.astype(np.float64)})
    as32 = qdiff.compare(tiny_models.float, tiny_models.qdq, data={"x": x})
    _assert_same_metrics(as64, as32)
    assert as64.meta["data_sha256"] == as32.meta["data_sha256"]


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_data_into_a_float_input_is_allowed(tiny_models, dtype):
    x = (np.arange(16).reshape(4, 4) % 3).astype(dtype)
    batches = list(make_source({"x": x}, _specs(tiny_models.float)))
    assert all(b["x"].dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x.astype(np.float32))
    result = qdiff.compare(tiny_models.float, tiny_models.qdq, data={"x": x})
    assert result.meta["samples"] == 4
    assert result.outputs["cosine"].notna().all()


def test_float_data_into_an_integer_input_is_an_error(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT, name="cast"),
         helper.make_node("Relu", ["f"], ["y"], name="relu")],
        "int_input",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    specs = _specs(model)
    with pytest.raises(DataError, match=r"'ids' is float32 but the model takes int64"):
        list(make_source({"ids": _x(2)}, specs))
    # random inputs for an integer input are integers
    b = next(iter(make_source(None, specs)))
    assert b["ids"].dtype == np.int64


# -- the API's dict and iterable data -------------------------------------------------------------


def test_dict_and_iterable_data_match_the_npz(tiny_models, tmp_path):
    x = _x(5)
    npz = qdiff.compare(tiny_models.float, tiny_models.qdq, data=write_npz(tmp_path / "d.npz", x=x))
    as_dict = qdiff.compare(tiny_models.float, tiny_models.qdq, data={"x": x})
    as_list = qdiff.compare(tiny_models.float, tiny_models.qdq, data=[{"x": x[i : i + 1]} for i in range(5)])
    as_gen = qdiff.compare(tiny_models.float, tiny_models.qdq, data=({"x": x[i : i + 1]} for i in range(5)))
    for other in (as_dict, as_list, as_gen):
        _assert_same_metrics(npz, other)
        assert other.meta["data_sha256"] == npz.meta["data_sha256"]
    assert as_list.meta["samples"] == 5


def test_iterable_data_respects_samples_and_is_validated(tiny_models):
    def endless():
        i = 0
        while True:
            yield {"x": _x(1, seed=i)}
            i += 1

    result = qdiff.compare(tiny_models.float, tiny_models.qdq, data=endless(), samples=3)
    assert result.meta["samples"] == 3
    bad = [{"x": _x(1)}, {"x": np.zeros((1, 5), np.float32)}]
    with pytest.raises(DataError, match=r"sample 1 of input 'x' has shape \[1, 5\]"):
        qdiff.compare(tiny_models.float, tiny_models.qdq, data=bad)
    with pytest.raises(DataError, match="no samples"):
        qdiff.compare(tiny_models.float, tiny_models.qdq, data=[])


def test_different_sample_counts_per_key_is_an_error(tmp_path):
    model = save_model(make_two_input_model(), tmp_path / "two.onnx")
    data = {"a": _x(5), "b": _x(6)}
    with pytest.raises(DataError, match="different numbers of samples"):
        make_source(data, _specs(model))
    with pytest.raises(DataError, match="different numbers of samples"):
        qdiff.compare(model, model, data=data)
    # equal counts work, and both inputs are fed
    good = {"a": _x(3), "b": _x(3, seed=1)}
    batches = list(make_source(good, _specs(model)))
    assert [sorted(b) for b in batches] == [["a", "b"]] * 3
    np.testing.assert_array_equal(batches[2]["b"], good["b"][2:3])
    result = qdiff.compare(model, model, data=good)
    assert result.meta["samples"] == 3
    assert list(result.layers["layer"]) == ["add", "relu"]


def test_empty_array_is_an_error(tiny_models):
    with pytest.raises(DataError, match="no samples"):
        make_source({"x": np.zeros((0, 4), np.float32)}, _specs(tiny_models.float))


# -- random inputs --------------------------------------------------------------------------------


def test_random_inputs_are_deterministic_by_seed(tiny_models):
    specs = _specs(tiny_models.float)

    def draw(seed):
        src = make_source(None, specs, samples=3, seed=seed)
        return [b["x"] for b in src], src

    a, src_a = draw(11)
    b, src_b = draw(11)
    c, src_c = draw(12)
    assert len(a) == 3 and a[0].shape == (1, 4) and a[0].dtype == np.float32
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    assert src_a.fingerprint() == src_b.fingerprint() != src_c.fingerprint()
    assert len(list(make_source(None, specs))) == 8  # the default count

    r1 = qdiff.compare(tiny_models.float, tiny_models.qdq, seed=5, samples=2)
    r2 = qdiff.compare(tiny_models.float, tiny_models.qdq, seed=5, samples=2)
    r3 = qdiff.compare(tiny_models.float, tiny_models.qdq, seed=6, samples=2)
    _assert_same_metrics(r1, r2)
    assert r1.meta["data_sha256"] == r2.meta["data_sha256"] != r3.meta["data_sha256"]
    assert "seed 5" in r1.meta["data"]


def test_random_inputs_on_a_dynamic_batch_take_the_batch_size(dynamic_models):
    specs = _specs(dynamic_models.float)
    batches = list(make_source(None, specs, samples=6, batch_size=3))
    assert [b["x"].shape for b in batches] == [(3, 4)] * 2
    assert [b["x"].shape for b in make_source(None, specs, samples=4, batch_size=3)] == [(3, 4), (1, 4)]
    assert [b["x"].shape for b in make_source(None, specs, samples=1)] == [(1, 4)]

    result = qdiff.compare(dynamic_models.float, dynamic_models.qdq, samples=6, batch_size=3)
    assert result.meta["samples"] == 6 and result.meta["runs"] == 2
    assert result.outputs["shape"].tolist() == ["3x3"]
    _assert_finite(result)


def test_input_shape_fills_dynamic_dims(tmp_path):
    model = make_tiny_model(input_shape=(1, "seq", 4))
    path = save_model(model, tmp_path / "seq.onnx")
    specs = _specs(model)
    with pytest.raises(UsageError, match="'seq'"):
        make_source(None, specs)
    batches = list(make_source(None, specs, samples=2, input_shapes={"x": (1, 5, 4)}))
    assert [b["x"].shape for b in batches] == [(1, 5, 4)] * 2

    result = qdiff.compare(path, path, samples=2, input_shapes=["x:1x5x4"])
    assert result.outputs["shape"].tolist() == ["1x5x3"]
    assert (result.layers["cosine"] == 1.0).all()  # a model against itself
    with pytest.raises(UsageError, match="does not fit"):
        qdiff.compare(path, path, samples=2, input_shapes={"x": (2, 5, 4)})  # batch is fixed at 1


def test_input_shape_on_a_dynamic_batch_model(dynamic_models):
    result = qdiff.compare(dynamic_models.float, dynamic_models.qdq, samples=1, input_shapes=["x:6x4"])
    assert result.outputs["shape"].tolist() == ["6x3"]
    _assert_finite(result)


# -- the fingerprint ------------------------------------------------------------------------------


def test_data_sha256_tracks_the_data(tiny_models):
    x = _x(3)
    y = x.copy()
    y[2, 0] += 1.0
    a = qdiff.compare(tiny_models.float, tiny_models.qdq, data={"x": x})
    b = qdiff.compare(tiny_models.float, tiny_models.qdq, data={"x": y})
    assert a.meta["data_sha256"] != b.meta["data_sha256"]
    assert len(a.meta["data_sha256"]) == 64


def test_path_objects_and_strings_are_both_accepted(tiny_models, tmp_path):
    npz = Path(write_npz(tmp_path / "d.npz", x=_x(2)))
    a = qdiff.compare(Path(tiny_models.float), Path(tiny_models.qdq), data=npz)
    b = qdiff.compare(tiny_models.float, tiny_models.qdq, data=str(npz))
    _assert_same_metrics(a, b)
