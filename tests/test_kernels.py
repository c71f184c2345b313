"""The compiled metric kernels, batched runs and integer taps: same numbers as the plain paths."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_feeds, conv_net, finish, quantize
from onnx import TensorProto, helper, numpy_helper

import qdiff
from qdiff.engine import batching, prefuse
from qdiff.engine import kernels as _kernels
from qdiff.engine.options import EngineOptions
from qdiff import metrics as qm
from qdiff.structs import DequantParams

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
COLS = ["cosine", "cosine_worst", "mse", "mse_worst", "mae", "mae_worst", "max_abs", "sqnr_db", "sqnr_db_worst", "kl", "kl_worst"]
compare_module = importlib.import_module("qdiff._compare")
graph_module = sys.modules["qdiff.graph"]

needs_kernels = pytest.mark.skipif(
    not _kernels.available(), reason=f"compiled kernels unavailable: {_kernels.unavailable_reason()}"
)


def _as_metrics(refs, cands, dq=None):
    values, slow_rows, slow = _kernels.row_metrics(refs, cands, dq)
    out, it = [], iter(slow)
    for i in range(len(values)):
        out.append(next(it) if i in slow_rows else qm.SampleMetrics(*map(float, values[i]), refs.shape[1], refs.shape[1]))
    return out


def _close(a: qm.SampleMetrics, b: qm.SampleMetrics, rtol=1e-11):
    for f in ("cosine", "mse", "mae", "max_abs", "sqnr_db", "kl"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            # KL is a small difference of sums over the bins: its summation order shows more
            assert x == pytest.approx(y, rel=1e-8 if f == "kl" else rtol, abs=1e-300), (f, x, y)
    assert (a.size, a.finite, a.nan_ref, a.inf_ref, a.nan_cand, a.inf_cand) == (
        b.size, b.finite, b.nan_ref, b.inf_ref, b.nan_cand, b.inf_cand,
    )  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("n", [1, 7, 1000, _kernels.CHUNK + 13, 3 * _kernels.CHUNK])
def test_kernels_equal_numpy_metrics_on_every_kind_of_row(n):
    """Float rows, degenerate rows and non-finite rows give sample_metrics' values."""
    rng = np.random.default_rng(n)
    r = rng.standard_normal((9, n)).astype(np.float32)
    c = (r + 0.02 * rng.standard_normal((9, n))).astype(np.float32)
    r[1], c[1] = 0, 0  # both zero
    r[2], c[2] = 3, 3  # equal constants
    c[3] = 0  # zero candidate
    c[4, 0] = np.nan  # NaN
    r[5, -1] = np.inf  # Inf
    r[6] = np.maximum(r[6], 0)  # ReLU-like: runs of zeros
    r[7], c[7] = r[7] * 1e-30, c[7] * 1e-30  # sums below the normal range: careful path
    c[8] = -r[8]  # anti-correlated
    got = _as_metrics(r, c)
    for i in range(9):
        _close(got[i], qm.sample_metrics(r[i], c[i]))
    # float64 and float16 operands
    for cc in (c.astype(np.float64), c.astype(np.float16)):
        got = _as_metrics(r, cc)
        for i in range(9):
            _close(got[i], qm.sample_metrics(r[i], cc[i]))


@needs_kernels
@pytest.mark.parametrize("dtype,zp", [(np.uint8, 128), (np.int8, -3), (np.int16, 5), (np.uint16, 30000)])
def test_kernels_dequantize_integer_taps_like_dequantizelinear(dtype, zp):
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max, (5, 5000), endpoint=True).astype(dtype)
    q[1] = q[1, 0]  # a constant row
    dq = DequantParams(np.array(0.037, np.float32), np.array(zp, dtype))
    real = dq.dequantize(q)
    r = (real + rng.standard_normal(real.shape).astype(np.float32) * 0.01).astype(np.float32)
    r[1] = real[1]
    got = _as_metrics(r, q, dq)
    for i in range(5):
        _close(got[i], qm.sample_metrics(r[i], real[i]))


@needs_kernels
def test_a_rows_values_do_not_depend_on_the_rows_beside_it():
    """Bit for bit: the basis of results that do not depend on batching or sharding."""
    rng = np.random.default_rng(2)
    r = rng.standard_normal((6, 3 * _kernels.CHUNK + 5)).astype(np.float32)
    c = (r + 0.1 * rng.standard_normal(r.shape)).astype(np.float32)
    together, _, _ = _kernels.row_metrics(r, c)
    for i in range(6):
        alone, _, _ = _kernels.row_metrics(r[i : i + 1], c[i : i + 1])
        assert np.array_equal(alone[0], together[i])
    two, _, _ = _kernels.row_metrics(r[2:4], c[2:4])
    assert np.array_equal(two, together[2:4])


@needs_kernels
def test_kernels_without_histograms_give_the_same_bits_but_kl():
    """bins=0 (sensitivity, which reports no KL): every row's other five values are the binned
    call's bits, kl 0; rows the binned call sends to the careful path for NaN/Inf still go there,
    and an accumulator made with kl=False reports KL as None."""
    rng = np.random.default_rng(4)
    n = 2 * _kernels.CHUNK + 7
    r = rng.standard_normal((6, n)).astype(np.float32)
    c = (r + 0.05 * rng.standard_normal(r.shape)).astype(np.float32)
    r[1], c[1] = 2, 2  # no range
    c[2, 3] = np.nan
    r[3] = np.maximum(r[3], 0)
    dq = DequantParams(np.array(0.02, np.float32), np.array(0, np.uint8))
    codes = np.clip(np.rint(np.maximum(r, 0) / 0.02), 0, 255).astype(np.uint8)
    for cand, d in ((c, None), (c.astype(np.float64), None), (codes, dq)):
        binned, slow_b, _ = _kernels.row_metrics(r, cand, d)
        plain, slow_p, _ = _kernels.row_metrics(r, cand, d, bins=0)
        assert slow_p == slow_b
        ok = [i for i in range(len(r)) if i not in slow_b]
        assert np.array_equal(plain[ok, :5], binned[ok, :5])
        assert (plain[ok, 5] == 0).all() and (binned[ok[0], 5] > 0 or cand is codes)
    acc = qm.TensorAccumulator(kl=False)
    acc.add_values(plain[ok], n)
    s = acc.result()
    assert s.kl is None and s.kl_worst is None and s.cosine == pytest.approx(plain[ok, 0].mean(), rel=1e-15)
    with pytest.raises(ValueError, match="KL"):
        acc.merge(qm.TensorAccumulator())


def _force_numpy(monkeypatch):
    monkeypatch.setattr(_kernels, "_load", lambda: None)


#: groups of one run: every run alone (no batching)
UNBATCHED = EngineOptions(group_bytes=1)


@needs_kernels
@pytest.mark.parametrize("variant", ["qdq_per_tensor", "qdq_per_channel", "qoperator", "dynamic", "fp16"])
def test_compare_with_kernels_and_batches_equals_the_plain_numpy_path(variant, monkeypatch):
    """Compiled kernels + batched runs + integer taps give the per-run numpy results.

    Dynamic quantization computes each activation's scale over the whole batch, so a batch of
    runs is not the runs one by one: the check on the first group must see it.
    """
    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / f"digits_cnn.{variant}.onnx")
    fast = qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=150)
    assert fast.meta["metrics_kernel"] == "c"
    if variant == "dynamic":
        assert "runs not batched: values differ between batched and single runs" in " ".join(fast.meta["notes"])
    else:
        # 150 runs: groups of 19, so that there are 8 (EngineOptions.min_groups) for the workers
        assert any("runs batched 19 at a time" in n for n in fast.meta["notes"]), fast.meta["notes"]
    with monkeypatch.context() as m:
        _force_numpy(m)
        plain = qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=150, engine_options=UNBATCHED)
    assert plain.meta["metrics_kernel"] == "numpy"
    assert not any("batched" in n for n in plain.meta["notes"])
    assert list(fast.layers["layer"]) == list(plain.layers["layer"])
    assert list(fast.layers["shape"]) == list(plain.layers["shape"])
    np.testing.assert_allclose(fast.layers[COLS].to_numpy(float), plain.layers[COLS].to_numpy(float), rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(
        fast.outputs[COLS + ["top1_agreement"]].to_numpy(float),
        plain.outputs[COLS + ["top1_agreement"]].to_numpy(float), rtol=2e-5, atol=1e-9,
    )  # fmt: skip
    assert (fast.layers["samples"] == 150).all()


def test_integer_taps_read_quantizelinear_outputs():
    """QDQ models are read at their QuantizeLinear outputs, and the outputs still equal the deployed model's."""
    r = qdiff.compare(SAMPLES / "transformer.float.onnx", SAMPLES / "transformer.qdq.onnx", samples=4)
    assert r.meta["integer_taps"] > 0
    assert r.meta["tapped_vs_deployed_max_abs"] == 0.0


def test_numpy_fallback_runs_everything_without_the_extension(monkeypatch):
    _force_numpy(monkeypatch)
    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.qdq_per_tensor.onnx")
    r = qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=70)
    assert r.meta["metrics_kernel"] == "numpy"
    assert r.layers["cosine"].between(0.99, 1.0).all()


def _broken_kernel_module(tmp_path: Path, kind: str) -> str:
    """A module name the kernel loader can be pointed at, broken in one way."""
    import importlib.machinery
    import shutil

    if kind == "import":
        return "qdiff_no_such_package.ckernels"  # find_spec raises ModuleNotFoundError
    pkg = tmp_path / f"broken_{kind}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    so = pkg / f"ckernels{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    if kind == "not a library":
        so.write_text("not an ELF file\n")  # CDLL raises OSError
    else:  # a real shared library without the kernels' symbols: a stale build (AttributeError)
        shutil.copy(importlib.import_module("numpy.linalg._umath_linalg").__file__, so)
    return f"{pkg.name}.ckernels"


@pytest.mark.parametrize(
    "kind, error", [("stale", "AttributeError"), ("not a library", "OSError"), ("import", "ModuleNotFoundError")]
)
def test_any_failure_to_load_the_extension_falls_back_to_numpy_and_says_why(tmp_path, monkeypatch, kind, error):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_kernels, "_MODULE", _broken_kernel_module(tmp_path, kind))
    monkeypatch.setattr(_kernels, "_lib", None)
    monkeypatch.setattr(_kernels, "_reason", None)
    assert not _kernels.available()
    assert error in _kernels.unavailable_reason()
    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.qdq_per_tensor.onnx")
    r = qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=8)
    assert r.meta["metrics_kernel"] == "numpy" and error in r.meta["metrics_kernel_reason"]
    assert r.layers["cosine"].between(0.99, 1.0).all()


def _mixing_model(tmp_path: Path):
    """y = relu(x @ W) - mean over the batch axis: a batch of runs is not a set of separate runs."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r"], ["m"], name="mean", axes=[0], keepdims=1),
        helper.make_node("Sub", ["r", "m"], ["y"], name="sub"),
    ]
    f = tmp_path / "mix.float.onnx"
    finish(helper.make_graph(nodes, "mix", [x], [y], [w]), f)
    feeds = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(8)]
    q = quantize(f, tmp_path / "mix.int8.onnx", feeds)
    return f, q, np.concatenate([d["x"] for d in feeds] * 4)


def test_models_that_mix_samples_across_the_batch_axis_run_one_at_a_time(tmp_path, monkeypatch):
    f, q, data = _mixing_model(tmp_path)
    r = qdiff.compare(f, q, data={"x": data})
    assert any(n.startswith("runs not batched: ") for n in r.meta["notes"]), r.meta["notes"]
    plain = qdiff.compare(f, q, data={"x": data}, engine_options=UNBATCHED)
    cols = ["cosine", "mse", "max_abs", "sqnr_db", "kl"]
    np.testing.assert_array_equal(r.layers[cols].to_numpy(float), plain.layers[cols].to_numpy(float))


def test_batch_check_tolerates_one_code_rounding_flips_in_integer_taps():
    """A batched kernel sums in another order: values on a rounding boundary land one code over
    (2 % of a tensor here, 1e-2 relative L2), in integer taps and in DequantizeLinear outputs
    (one quantization step). That is batching, not samples mixing; three codes, two steps, or a
    float tensor moved beyond 1e-3 relative L2 still refuse it."""
    differ = batching.runs_differ
    rng = np.random.default_rng(6)
    for dtype in (np.int8, np.uint8):
        info = np.iinfo(dtype)
        for lo, hi in ((info.min + 3, info.max - 3), (1, 4)):  # wide codes, and codes near zero (flips weigh more)
            y = rng.integers(lo, hi, 4096, endpoint=True).astype(dtype)
            x = y.copy()
            flips = rng.choice(4096, 80, replace=False)
            x[flips] = (x[flips].astype(np.int32) + rng.choice([-1, 1], 80)).astype(dtype)
            assert differ(x, y) is None
            x[flips] = (x[flips].astype(np.int32) + 2 * np.sign(x[flips].astype(np.int32) - y[flips])).astype(dtype)
            assert differ(x, y) is not None  # three codes apart in 2 % of the values
    f = rng.standard_normal(4096).astype(np.float32)
    g = f.copy()
    g[:400] += 0.2  # 10 % of the values moved: relative L2 ~0.06
    assert differ(g, f) is not None and differ(f.copy(), f) is None
    # a DequantizeLinear output (float values on a grid of `step`): one step is a rounding flip
    step = np.float32(0.0228)
    codes = rng.integers(-3, 4, 20)
    y = ((codes - np.int8(0)).astype(np.float32) * step).astype(np.float32)
    x = ((codes + np.where(np.arange(20) % 4 == 0, 1, 0)).astype(np.float32) * step).astype(np.float32)
    assert differ(x, y) is not None  # 5 of 20 values one step over: 1e-1 relative without the step
    assert differ(x, y, float(step)) is None
    assert differ(x + step, y, float(step)) is not None  # two steps


def test_batch_check_knows_the_step_of_dequantized_float_taps(monkeypatch):
    """compare hands the check each float tap of the quantized model that a DequantizeLinear
    computes, with that node's scale (here the final output, read as float)."""
    seen = []
    real = batching.batch_mismatch

    def spy(batched, singles, runs, steps=None):
        seen.append(steps)
        return real(batched, singles, runs, steps)

    monkeypatch.setattr(batching, "batch_mismatch", spy)
    qpath = SAMPLES / "digits_cnn.qdq_per_tensor.onnx"
    r = qdiff.compare(SAMPLES / "digits_cnn.float.onnx", qpath, data=SAMPLES / "digits_test.npz", samples=64)
    assert any("runs batched" in n for n in r.meta["notes"])
    (steps,) = seen
    qm_ = onnx.load(qpath)
    inits = {t.name: numpy_helper.to_array(t) for t in qm_.graph.initializer}
    out = qm_.graph.output[0].name
    (dq,) = [n for n in qm_.graph.node if out in n.output]
    assert dq.op_type == "DequantizeLinear" and steps[0] == {}
    assert steps[1] == {out: pytest.approx(float(inits[dq.input[1]]))}


def test_sessions_are_released_before_the_unbatched_ones_open(tmp_path):
    """When the first group refuses batching, the batched sessions are gone before the new ones
    are built (a 2 GB model's tapped sessions were held twice: 5.5 GB peak against 2.8 GB)."""
    import threading
    import weakref

    import onnxruntime as ort

    f, q, data = _mixing_model(tmp_path)
    live: list[tuple[weakref.ref, bool]] = []
    seen: list[int] = []
    lock = threading.Lock()

    def factory(model):
        batched = any(d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim[:1])
        with lock:
            if not batched:  # a session of the original models: count the batched ones still alive
                seen.append(sum(1 for ref, b in live if b and ref() is not None))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        with lock:
            live.append((weakref.ref(sess), batched))
        return sess

    r = qdiff.compare(f, q, data={"x": data}, session_factory=factory)
    assert any(n.startswith("runs not batched: ") for n in r.meta["notes"]), r.meta["notes"]
    assert sum(b for _, b in live) == 2 and seen and max(seen) == 0, seen


def test_a_fixed_batch_reshape_falls_back_to_single_runs(tmp_path):
    """Reshape to [1, -1] breaks batching: noticed on the first group, then runs go one at a time."""
    conv_net(tmp_path / "c.float.onnx")
    import onnx

    m = onnx.load(tmp_path / "c.float.onnx")  # its Flatten becomes a Reshape to a fixed batch of 1
    nodes = list(m.graph.node)
    flat = next(n for n in nodes if n.op_type == "Flatten")
    reshape = helper.make_node("Reshape", [flat.input[0], "fixed_shape"], list(flat.output), name=flat.name)
    m.graph.node.remove(flat)
    m.graph.node.insert(nodes.index(flat), reshape)
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "fixed_shape"))
    onnx.save(m, tmp_path / "r.float.onnx")
    q = quantize(tmp_path / "r.float.onnx", tmp_path / "r.int8.onnx", conv_feeds(8))
    data = np.concatenate([d["x"] for d in conv_feeds(20, seed=4)])
    r = qdiff.compare(tmp_path / "r.float.onnx", q, data={"x": data})
    assert any("runs not batched" in n for n in r.meta["notes"]), r.meta["notes"]
    assert (r.layers["samples"] == 20).all()
    assert r.layers["cosine"].notna().all()


@needs_kernels
def test_sharded_batched_groups_equal_one_process():
    """Groups of 19 runs (150 runs in 8 groups), sharded whole across 2 workers: the very same numbers."""
    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.qdq_per_channel.onnx")
    a = qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=150)
    b = qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=150, workers=2)
    assert any("runs batched 19 at a time" in n for n in a.meta["notes"])
    assert a.layers.equals(b.layers) and a.outputs.equals(b.outputs)


def test_shards_run_on_a_dask_cluster(tmp_path, capsys):
    """An existing Dask cluster runs the shards; the merged result is the one-process result."""
    distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
    from qdiff.cli import main

    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.qdq_per_tensor.onnx")
    data = SAMPLES / "digits_test.npz"
    a = qdiff.compare(*args, data=data, samples=150)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, distributed.Client(cluster) as client:
        b = qdiff.compare(*args, data=data, samples=150, workers=3, executor=client.get_executor())
        assert a.layers.equals(b.layers) and a.outputs.equals(b.outputs)
        assert any("3 shard(s) on" in n for n in b.meta["notes"])
        out = tmp_path / "r.json"
        code = main(["compare", *map(str, args), "--data", str(data), "--samples", "150", "--workers", "2",
                     "--dask-scheduler", cluster.scheduler_address, "--json", str(out)])  # fmt: skip
        assert code == 0
    import json

    doc = json.loads(out.read_text())
    assert [r["cosine"] for r in doc["layers"]] == pytest.approx(list(a.layers["cosine"]), rel=0, abs=0)
    capsys.readouterr()
    assert main(["compare", *map(str, args), "--dask-scheduler", "tcp://127.0.0.1:9", "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Dask scheduler" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_models_with_external_data_kept_on_disk(tmp_path, monkeypatch):
    """Above KEEP_EXTERNAL_BYTES weights stay on disk (the > 2 GB path): same numbers as loaded."""
    import onnx

    from qdiff import graph

    f = tmp_path / "f.onnx"
    conv_net(f)
    q = quantize(f, tmp_path / "q.onnx", conv_feeds(8))
    ext = tmp_path / "ext"
    ext.mkdir()
    for src in (f, q):
        m = onnx.load(src)
        onnx.save(m, ext / src.name, save_as_external_data=True, location=src.stem + ".data", size_threshold=0)
    data = {"x": np.concatenate([d["x"] for d in conv_feeds(20, seed=5)])}
    loaded = qdiff.compare(ext / "f.onnx", ext / "q.onnx", data=data)
    monkeypatch.setattr(graph, "KEEP_EXTERNAL_BYTES", 0)
    kept = graph.load_model(ext / "f.onnx")
    assert graph.external_dir(kept.proto) == str(ext.resolve())
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in kept.proto.graph.initializer if t.dims)
    monkeypatch.chdir(tmp_path)  # onnxruntime must find the data through the recorded folder
    on_disk = qdiff.compare(ext / "f.onnx", ext / "q.onnx", data=data)
    np.testing.assert_array_equal(on_disk.layers[COLS].to_numpy(float), loaded.layers[COLS].to_numpy(float))
    assert on_disk.weights[["cosine"]].equals(loaded.weights[["cosine"]])
    base = qdiff.compare(f, q, data=data)
    np.testing.assert_array_equal(base.layers[COLS].to_numpy(float), loaded.layers[COLS].to_numpy(float))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_channel_cosines_equal_per_channel_sample_metrics(axis):
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((6, 5, 40)).astype(np.float32)
    cand = (ref + 0.05 * rng.standard_normal(ref.shape)).astype(np.float32)
    idx = [slice(None)] * 3
    idx[axis] = 1
    ref[tuple(idx)], cand[tuple(idx)] = 0, 0  # both zero: 1.0
    idx[axis] = 2
    cand[tuple(idx)] = 0  # one zero: 0.0
    got = compare_module._channel_cosines(ref, cand, axis)
    want = [
        qm.sample_metrics(np.take(ref, k, axis=axis), np.take(cand, k, axis=axis)).cosine
        for k in range(ref.shape[axis])
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[1] == 1.0 and got[2] == 0.0


def _fuse_from_64_runs(model=SAMPLES / "transformer.float.onnx") -> EngineOptions:
    """Options that make the fused graph pay from 64 runs of ``model`` on (the transformer block
    is too small to pay for it below ~37 000 runs at the real threshold)."""
    macs = graph_module.layer_macs(graph_module.Graph(onnx.load(model)))
    return EngineOptions(prefuse_min_macs=64 * macs)


def test_prefuse_pays_with_the_layers_work():
    """The fused graph is made where runs x multiply-accumulates repay its two session builds."""
    def macs(name):
        return graph_module.layer_macs(graph_module.Graph(onnx.load(SAMPLES / name)))

    assert macs("transformer.float.onnx") == macs("transformer.qdq.onnx") > 100_000
    assert not prefuse.prefuse_pays(512, macs("transformer.float.onnx"))
    assert not prefuse.prefuse_pays(10_000, macs("digits_cnn.float.onnx"))
    assert prefuse.prefuse_pays(128, 70_000_000)  # the 50-conv CNN of bench/ at 128 samples
    assert not prefuse.prefuse_pays(64, 70_000_000)  # ... not at 64 (measured slower)
    assert prefuse.prefuse_pays(None, 1) and prefuse.prefuse_pays(8, None)  # unknown: made
    r = qdiff.compare(SAMPLES / "transformer.float.onnx", SAMPLES / "transformer.qdq.onnx", samples=512)
    assert not any("fused graph" in n for n in r.meta["notes"]), r.meta["notes"]


def test_quantized_model_tapped_in_onnxruntimes_fused_graph():
    """Taps found in onnxruntime's fused graph (QLinearConv/QGemm outputs) give the unfused taps' numbers."""
    opts = _fuse_from_64_runs()
    args = (SAMPLES / "transformer.float.onnx", SAMPLES / "transformer.qdq.onnx")
    fused = qdiff.compare(*args, samples=64, engine_options=opts)
    note = next(n for n in fused.meta["notes"] if "fused graph (" in n)
    assert int(note.split("(")[1].split()[0]) >= 10, note  # layers read from fused QLinear*/QGemm nodes
    assert fused.meta["tapped_vs_deployed_max_abs"] == 0.0
    plain = qdiff.compare(*args, samples=64)  # default options: 64 runs do not pay for the fused graph
    assert not any("fused graph" in n for n in plain.meta["notes"])
    cols = ["cosine", "mse", "max_abs", "sqnr_db"]
    np.testing.assert_allclose(fused.layers[cols].to_numpy(float), plain.layers[cols].to_numpy(float), rtol=1e-3)


def test_no_fused_graph_for_few_samples():
    args = (SAMPLES / "transformer.float.onnx", SAMPLES / "transformer.qdq.onnx")
    r = qdiff.compare(*args, samples=63, engine_options=_fuse_from_64_runs())
    assert not any("fused graph" in n for n in r.meta["notes"]), r.meta["notes"]


def test_no_fused_graph_when_no_tap_would_be_read_from_a_fused_node():
    """The digits CNN's QDQ taps all survive onnxruntime's fusion as they are: no second graph."""
    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.qdq_per_tensor.onnx")
    r = qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=100)
    assert not any("fused graph" in n for n in r.meta["notes"]), r.meta["notes"]


def test_sensitivity_taps_the_fused_quantized_model_and_falls_back(monkeypatch):
    """Sensitivity's quantized model is tapped in onnxruntime's fused graph: the same numbers as
    tapped as given; when the check on the first run disagrees, the model as given is tapped."""
    sens_module = importlib.import_module("qdiff._sensitivity")
    opts = _fuse_from_64_runs()
    args = (SAMPLES / "transformer.float.onnx", SAMPLES / "transformer.qdq.onnx")
    fused = qdiff.sensitivity(*args, samples=64, gain=False, engine_options=opts)
    assert any(n.startswith("quantized model tapped in onnxruntime's fused graph") for n in fused.meta["notes"])
    monkeypatch.setattr(sens_module, "fused_taps_differ", lambda *a: "values of 'x' differ")
    refused = qdiff.sensitivity(*args, samples=64, gain=False, engine_options=opts)
    assert any("fused graph not tapped: values of 'x' differ" in n for n in refused.meta["notes"])
    plain = qdiff.sensitivity(*args, samples=64, gain=False)  # default options: tapped as given
    few = qdiff.sensitivity(*args, samples=63, gain=False, engine_options=opts)  # too few samples to pay for the fused graphs
    assert not any("fused graph" in n for n in few.meta["notes"])
    assert not any("fused graph" in n for n in plain.meta["notes"])
    cols = [c for c in plain.layers.columns if c.startswith(("accumulated_cosine", "isolated_cosine"))]
    assert len(cols) >= 2
    for other in (fused, refused):
        np.testing.assert_allclose(
            other.layers[cols].to_numpy(float), plain.layers[cols].to_numpy(float), rtol=1e-3, atol=1e-6
        )


@needs_kernels
def test_avx2_sse2_and_portable_c_paths_give_the_same_bits(tmp_path):
    """The AVX2 loops (chosen at run time where the CPU has them), the SSE2 sums/min-max (every
    x86-64) and the portable C loops (other CPUs) compute the same bits: the built extension with
    AVX2 on and off, and a copy built without SSE2, on every type pair and row length."""
    import ctypes
    import platform
    import shutil
    import subprocess
    import sysconfig

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs a C compiler on x86-64")
    src = Path(_kernels.__file__).parent.parent / "_ckernels.c"
    so = tmp_path / "portable.so"
    subprocess.run(
        [cc, "-O3", "-fno-fast-math", "-std=c99", "-fPIC", "-shared", "-U__SSE2__",
         "-I" + sysconfig.get_paths()["include"], str(src), "-o", str(so)],
        check=True, capture_output=True,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    stacks = []
    for n in (1, 3, 7, 1000, _kernels.CHUNK + 13, 3 * _kernels.CHUNK):
        r = rng.standard_normal((5, n)).astype(np.float32)
        relu = np.maximum(r, 0)
        stacks += [
            (r, (r + 0.01 * rng.standard_normal(r.shape)).astype(np.float32), None),
            (relu, np.clip(np.round(relu / 0.02), 0, 255).astype(np.uint8), DequantParams(np.array(0.02, np.float32), np.array(3, np.uint8))),
            (r, np.clip(np.round(r / 0.03), -128, 127).astype(np.int8), DequantParams(np.array(0.03, np.float32), np.array(-2, np.int8))),
            (r.astype(np.float64), (r + 0.5).astype(np.float64), None),
            (r, np.clip(np.round(r / 1e-3), -32768, 32767).astype(np.int16), DequantParams(np.array(1e-3, np.float32), np.array(0, np.int16))),
        ]  # fmt: skip
    built = [v.copy() for v, _, _ in _kernels.many_row_metrics(stacks, threads=1)]
    switch = _kernels._load().qd_avx2
    switch.restype, switch.argtypes = ctypes.c_int, [ctypes.c_int]
    has_avx2 = switch(-1)
    try:
        assert switch(0) == 0
        sse2 = [v.copy() for v, _, _ in _kernels.many_row_metrics(stacks, threads=1)]
    finally:
        assert switch(-1) == has_avx2
    lib = ctypes.CDLL(str(so))
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    lib.qd_many.argtypes = [i64, p, p, p, p, i64, i64, f64, f64, f64]
    lib.qd_many.restype = ctypes.c_int
    original = _kernels._load()
    try:
        _kernels._lib = lib
        portable = [v.copy() for v, _, _ in _kernels.many_row_metrics(stacks, threads=1)]
    finally:
        _kernels._lib = original
    assert len(built) == len(portable) == len(sse2) == 30
    for a, b, c in zip(built, portable, sse2):
        assert np.array_equal(a, b) and np.array_equal(a, c)


@needs_kernels
def test_column_sums_equal_numpy_and_nan_weights_take_the_careful_path():
    rng = np.random.default_rng(11)
    ref = rng.standard_normal((300, 70)).astype(np.float32)
    cand = (ref + 0.01 * rng.standard_normal(ref.shape)).astype(np.float32)
    rr, cc, rc = _kernels.column_sums(ref, cand)
    r64, c64 = ref.astype(np.float64), cand.astype(np.float64)
    np.testing.assert_allclose(rr, (r64 * r64).sum(0), rtol=1e-13)
    np.testing.assert_allclose(cc, (c64 * c64).sum(0), rtol=1e-13)
    np.testing.assert_allclose(rc, (r64 * c64).sum(0), rtol=1e-13)
    assert _kernels.column_sums(ref.T, cand.T) is None  # not contiguous: the caller's numpy path
    cand[5, 3] = np.nan
    got = compare_module._channel_cosines(ref, cand, 1)
    want = [qm.sample_metrics(ref[:, k], cand[:, k]).cosine for k in range(ref.shape[1])]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_weights_on_disk_in_two_folders_for_sensitivity_and_quantize(tmp_path, monkeypatch):
    """Float and quantized models whose weights stay on disk in different folders: the shadow
    model (float base, quantized regions) reads the quantized weights it copies, and onnxruntime's
    quantizer gets the float model's data beside the copy it reads; same numbers as loaded."""
    import onnx

    from qdiff import graph
    from qdiff._quantize import init_config
    from qdiff._quantize import quantize as quantize_model

    f = tmp_path / "f.onnx"
    conv_net(f)
    q = quantize(f, tmp_path / "q.onnx", conv_feeds(8))
    for src, sub in ((f, "a"), (q, "b")):
        (tmp_path / sub).mkdir()
        onnx.save(onnx.load(src), tmp_path / sub / src.name, save_as_external_data=True, location=src.stem + ".data", size_threshold=0)
    fa, qb = tmp_path / "a" / "f.onnx", tmp_path / "b" / "q.onnx"
    data = {"x": np.concatenate([d["x"] for d in conv_feeds(12, seed=5)])}
    loaded = qdiff.sensitivity(fa, qb, data=data, gain=False)
    monkeypatch.setattr(graph, "KEEP_EXTERNAL_BYTES", 0)
    monkeypatch.chdir(tmp_path)
    assert graph.external_dir(graph.load_model(qb).proto) == str((tmp_path / "b").resolve())
    on_disk = qdiff.sensitivity(fa, qb, data=data, gain=False)
    cols = [c for c in loaded.layers.columns if c.endswith("cosine")]
    np.testing.assert_array_equal(on_disk.layers[cols].to_numpy(float), loaded.layers[cols].to_numpy(float))
    out = tmp_path / "requantized.onnx"
    quantize_model(fa, init_config(fa), data, out)
    r = qdiff.compare(fa, out, data=data)
    assert len(r.layers) >= 3 and float(r.layers["cosine"].min()) > 0.9
