#!/usr/bin/env python3
"""Speed and memory of ``qdiff.compare`` as ratios to bare inference (the "floor").

Run by hand, not in CI::

    .venv/bin/python bench/bench_compare.py                      # all cases, 8,64,512 samples
    .venv/bin/python bench/bench_compare.py --cases transformer --samples 64 --json out.json

For each case (a float model and its quantized twin) and each sample count, these configurations
are measured, each in a FRESH subprocess so that peak RSS belongs to that configuration alone:

``floor``
    one untapped onnxruntime ``InferenceSession`` per model (CPU, default options and threads),
    every sample fed one at a time to both, outputs dropped at once; ``floor_nospin`` is the same
    with intra-op thread spinning off. The table's floor is the faster of the two.
``floor_streams``
    the way qdiff itself runs the models since its worker pipeline: one thread per core, each
    feeding whole samples to both models through shared sessions of one intra-op thread (no
    spinning). Faster than onnxruntime's default threading on small models; reported as a
    second, stricter floor (``compare/streams``).
``compare``
    ``qdiff.compare(float_path, quant_path, data={"input": array})``.
``sensitivity``
    ``qdiff.sensitivity(float_path, quant_path, data={"input": array}, gain=False)``: the
    isolated error of every layer (shadow model) plus the accumulated error.
``qdq_loss_debug``
    onnxruntime's own debugging recipe (``onnxruntime.quantization.qdq_loss_debug``):
    ``modify_model_output_intermediate_tensors`` on both models, ``collect_activations`` on both,
    ``create_activation_matching``, ``compute_activation_error``. It keeps every activation of
    every sample in memory, so it is skipped when a one-sample probe projects more than
    ``--qdq-max-mb`` (or when the sample count is above ``--qdq-max-samples``).

Every child imports the same modules (numpy, onnx, onnxruntime, onnxruntime.quantization, qdiff,
pandas) and builds the same input array before its clock starts, so import cost and the input
array weigh equally on every configuration; the clock runs from after that to the end of the work
(model loading and session creation included). Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss``
at the end of the child (KiB on Linux), which includes the interpreter, the imports and the array.

Cases: ``digits`` (sample_models digits CNN, float vs QDQ per-tensor, digits_test.npz tiled to the
sample count), ``transformer`` (sample_models transformer block, float vs QDQ, seeded N(0,1)
inputs) and ``midcnn`` (a 50-Conv CNN generated at run time into a temp dir, seeded He-init
weights, quantized with ``quantize_static`` QDQ per-channel on 16 calibration samples).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = ROOT / "sample_models"
CONFIGS = ("floor", "floor_nospin", "floor_streams", "compare", "sensitivity", "qdq_loss_debug")
# diagnostics, run only when named in --configs:
#   compare_nospin  qdiff.compare with onnxruntime's intra-op thread spinning turned off
#   compare_blas1   qdiff.compare in a child whose numpy BLAS (OpenBLAS/MKL/OpenMP) has one thread
#   compare_fused   qdiff.compare(..., engine="fused") (metrics reduced inside onnxruntime), where qdiff has it
EXTRA_CONFIGS = ("compare_nospin", "compare_blas1", "compare_fused")
ONE_THREAD_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
ALL_CASES = ("digits", "transformer", "midcnn")
IR_VERSION = 10  # onnxruntime <= 1.31 refuses IR 11+; onnx 1.23 writes newer by default
DATA_SEED = 20240611


# ---------------------------------------------------------------------------
# cases: model paths and input arrays
# ---------------------------------------------------------------------------


def case_models(case: str, workdir: Path) -> tuple[str, str]:
    """(float path, quant path) of a case; ``midcnn`` is generated into ``workdir`` on first use.

    Called in the parent: the generation runs in a helper process (see :func:`helper`).
    """
    if case == "digits":
        return str(SAMPLES_DIR / "digits_cnn.float.onnx"), str(
            SAMPLES_DIR / "digits_cnn.qdq_per_tensor.onnx"
        )
    if case == "transformer":
        return str(SAMPLES_DIR / "transformer.float.onnx"), str(
            SAMPLES_DIR / "transformer.qdq.onnx"
        )
    if case == "midcnn":
        f, q = workdir / "midcnn.float.onnx", workdir / "midcnn.qdq.onnx"
        if not (f.exists() and q.exists()):
            helper("build_midcnn", {"float": str(f), "quant": str(q)})
        return str(f), str(q)
    raise SystemExit(f"unknown case {case!r}; choose from {', '.join(ALL_CASES)}")


def case_data(case: str, n: int):
    """The ``input`` array of ``n`` samples (axis 0) for a case; deterministic."""
    import numpy as np

    if case == "digits":
        base = np.load(SAMPLES_DIR / "digits_test.npz")["input"]  # [450,1,8,8]
        reps = -(-n // len(base))
        return np.ascontiguousarray(np.concatenate([base] * reps)[:n], dtype=np.float32)
    rng = np.random.default_rng(DATA_SEED)
    if case == "transformer":
        return rng.standard_normal((n, 16, 32), dtype=np.float32)
    if case == "midcnn":
        return rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    raise SystemExit(f"unknown case {case!r}")


# ---------------------------------------------------------------------------
# the mid-size CNN (generated at run time, never checked in)
# ---------------------------------------------------------------------------

MIDCNN_STAGES = (
    (16, 17, 32),
    (24, 17, 16),
    (32, 16, 8),
)  # (channels, conv blocks, spatial size)
MIDCNN_RESIDUAL_EVERY = (
    4  # Add the block output to the output `every` blocks back (same channels)
)


def build_midcnn(float_path: Path, quant_path: Path, seed: int = 7) -> None:
    """A 50-Conv CNN, input [1,3,32,32] -> logits [1,10], and its QDQ per-channel twin.

    Three stages of conv3x3+relu blocks (16, 24, 32 channels at 32x32, 16x16, 8x8), MaxPool between
    stages, a residual Add every few blocks, then GlobalAveragePool -> Flatten -> Gemm. Weights are
    seeded He-normal; residual branches are scaled by 1/sqrt(2) at the Add inputs (a Mul) to keep
    activations in range.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    half = init("residual_scale", np.array(1 / np.sqrt(2), dtype=np.float32))
    x, cin, k = "input", 3, 0
    for s, (cout, blocks, _size) in enumerate(MIDCNN_STAGES):
        if s > 0:
            nodes.append(
                helper.make_node(
                    "MaxPool",
                    [x],
                    [f"pool{s}_out"],
                    name=f"pool{s}",
                    kernel_shape=[2, 2],
                    strides=[2, 2],
                )
            )
            x = f"pool{s}_out"
        skip = None
        for b in range(blocks):
            k += 1
            w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
            init(f"conv{k}.weight", w)
            init(f"conv{k}.bias", rng.standard_normal(cout) * 0.01)
            nodes.append(
                helper.make_node(
                    "Conv",
                    [x, f"conv{k}.weight", f"conv{k}.bias"],
                    [f"conv{k}_out"],
                    name=f"conv{k}",
                    pads=[1, 1, 1, 1],
                )
            )
            nodes.append(
                helper.make_node(
                    "Relu", [f"conv{k}_out"], [f"relu{k}_out"], name=f"relu{k}"
                )
            )
            x, cin = f"relu{k}_out", cout
            if b == 0:
                skip = x
            elif b % MIDCNN_RESIDUAL_EVERY == 0:
                nodes.append(
                    helper.make_node("Add", [x, skip], [f"add{k}_out"], name=f"add{k}")
                )
                nodes.append(
                    helper.make_node(
                        "Mul",
                        [f"add{k}_out", half],
                        [f"scale{k}_out"],
                        name=f"scale{k}",
                    )
                )
                x = skip = f"scale{k}_out"
    assert k >= 50, k
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten"))
    init("fc.weight", rng.standard_normal((10, cin)) * np.sqrt(1.0 / cin))
    init("fc.bias", np.zeros(10))
    nodes.append(
        helper.make_node(
            "Gemm",
            ["flat_out", "fc.weight", "fc.bias"],
            ["logits"],
            name="fc",
            transB=1,
        )
    )
    graph = helper.make_graph(
        nodes,
        "midcnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qdiff-bench"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(float_path))

    calib = np.random.default_rng(seed + 1).standard_normal(
        (16, 3, 32, 32), dtype=np.float32
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self._it, None)

    quantize_static(
        str(float_path), str(quant_path), Reader(),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    q = onnx.load(str(quant_path))
    q.ir_version = IR_VERSION
    onnx.save(q, str(quant_path))


# ---------------------------------------------------------------------------
# child: one configuration, one process
# ---------------------------------------------------------------------------


def _hwm_mb() -> float | None:
    """VmHWM of this process's address space (Linux), which, unlike ru_maxrss, starts afresh at exec."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


def _maxrss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / (1024.0 * 1024.0)


def run_child(spec: dict) -> dict:
    import resource

    # the same imports in every configuration, before the clock starts
    import onnx  # noqa: F401
    import onnxruntime as ort
    import pandas  # noqa: F401
    from onnxruntime.quantization import qdq_loss_debug as qld

    import qdiff

    # qdiff's names load on first use: load compare's and sensitivity's modules before the clock
    # too (an import is a once-per-process cost, as it was when `import qdiff` loaded everything)
    qdiff.compare, qdiff.sensitivity  # noqa: B018

    x = case_data(spec["case"], spec["samples"])
    fpath, qpath = spec["float"], spec["quant"]
    config = spec["config"]
    base_mb = _maxrss_mb()
    extra: dict = {}
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = r0.ru_utime + r0.ru_stime

    t0 = time.perf_counter()
    if config in ("floor", "floor_nospin"):
        providers = ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        if config == "floor_nospin":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        f_sess = ort.InferenceSession(fpath, sess_options=so, providers=providers)
        q_sess = ort.InferenceSession(qpath, sess_options=so, providers=providers)
        t_run = time.perf_counter()
        for i in range(len(x)):
            feed = {"input": x[i : i + 1]}
            f_sess.run(None, feed)
            q_sess.run(None, feed)
        extra["inference_s"] = time.perf_counter() - t_run
    elif config == "floor_streams":
        import threading

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        f_sess = ort.InferenceSession(fpath, sess_options=so, providers=["CPUExecutionProvider"])
        q_sess = ort.InferenceSession(qpath, sess_options=so, providers=["CPUExecutionProvider"])
        t_run = time.perf_counter()

        def stream(k: int) -> None:
            for i in range(k, len(x), cores):
                feed = {"input": x[i : i + 1]}
                f_sess.run(None, feed)
                q_sess.run(None, feed)

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(cores)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        extra["inference_s"] = time.perf_counter() - t_run
    elif config in ("compare", "compare_blas1", "compare_nospin", "compare_fused"):
        kwargs: dict = {}
        if config == "compare_nospin":

            def factory(model):
                so = ort.SessionOptions()
                so.log_severity_level = 3
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                return ort.InferenceSession(
                    model.SerializeToString(),
                    sess_options=so,
                    providers=["CPUExecutionProvider"],
                )

            kwargs["session_factory"] = factory
        elif config == "compare_fused":
            kwargs["engine"] = "fused"
        # compare_blas1: the parent set the one-thread environment
        result = qdiff.compare(fpath, qpath, data={"input": x}, **kwargs)
        extra["inference_s"] = result.meta.get("inference_seconds")
        extra["pairs"] = result.meta.get("pairs")
        extra["samples_seen"] = result.meta.get("samples")
        extra["engine"] = result.meta.get("engine", "numpy")
        del result
    elif config == "sensitivity":
        result = qdiff.sensitivity(fpath, qpath, data={"input": x}, gain=False)
        extra["layers"] = len(result.layers)
        del result
    elif config == "qdq_loss_debug":
        with tempfile.TemporaryDirectory(prefix="qdiff-bench-") as tmp:
            f_aug, q_aug = (
                os.path.join(tmp, "float_aug.onnx"),
                os.path.join(tmp, "qdq_aug.onnx"),
            )
            qld.modify_model_output_intermediate_tensors(fpath, f_aug)
            qld.modify_model_output_intermediate_tensors(qpath, q_aug)

            def reader():  # a CalibrationDataReader is only iterated; a generator keeps nothing
                for i in range(len(x)):
                    yield {"input": x[i : i + 1]}

            f_acts = qld.collect_activations(f_aug, reader())
            q_acts = qld.collect_activations(q_aug, reader())
            matched = qld.create_activation_matching(q_acts, f_acts)
            # compute_activation_error indexes match["float"]; activations the float model lacks
            # (quantizer-made tensors) would raise KeyError, so keep the cross-model ones only
            matched = {k: v for k, v in matched.items() if "float" in v}
            errors = qld.compute_activation_error(matched)
        extra["activations_matched"] = len(errors)
        extra["tensors_kept"] = len(f_acts) + len(q_acts)
        del f_acts, q_acts, matched, errors
    else:
        raise SystemExit(f"unknown config {config!r}")
    seconds = time.perf_counter() - t0
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = cpu.ru_utime + cpu.ru_stime - cpu0
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "peak_mb": _maxrss_mb(),
        "hwm_mb": _hwm_mb(),
        "base_mb": base_mb,
        **extra,
    }


def probe_qdq_bytes_per_sample(fpath: str, qpath: str, case: str) -> int:
    """Bytes qdq_loss_debug keeps per sample (float + qdq augmented outputs of one sample)."""
    import onnxruntime as ort
    from onnxruntime.quantization import qdq_loss_debug as qld

    x = case_data(case, 1)
    total = 0
    with tempfile.TemporaryDirectory(prefix="qdiff-bench-probe-") as tmp:
        for i, path in enumerate((fpath, qpath)):
            aug = os.path.join(tmp, f"aug{i}.onnx")
            qld.modify_model_output_intermediate_tensors(path, aug)
            sess = ort.InferenceSession(aug, providers=["CPUExecutionProvider"])
            total += sum(o.nbytes for o in sess.run(None, {"input": x}))
    return total


# ---------------------------------------------------------------------------
# parent: orchestrate, aggregate, print
# ---------------------------------------------------------------------------


def runnable_others() -> int | None:
    """Tasks runnable right now besides the one reading (Linux /proc/loadavg), else None."""
    try:
        with open("/proc/loadavg") as fh:
            return max(0, int(fh.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return None


def wait_quiet(max_wait: float) -> bool:
    """Wait up to ``max_wait`` s for 1 s without other runnable tasks; True if it got one."""
    if max_wait <= 0 or runnable_others() is None:
        return runnable_others() in (0, None)
    deadline, streak = time.monotonic() + max_wait, 0
    while time.monotonic() < deadline:
        streak = streak + 1 if runnable_others() == 0 else 0
        if streak >= 5:
            return True
        time.sleep(0.2)
    return False


def spawn(spec: dict, timeout: float, quiet_wait: float) -> dict:
    quiet = wait_quiet(quiet_wait)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = (
        {**os.environ, **ONE_THREAD_ENV} if spec["config"] == "compare_blas1" else None
    )
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(ROOT),
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout:.0f} s)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": f"failed (rc {proc.returncode}): {tail[0][:200]}"}
    return {"status": "ok", "quiet_start": quiet, **json.loads(lines[-1])}


def measure(
    spec: dict, repeat: int, timeout: float, quiet_wait: float, budget: float
) -> dict:
    """Run a configuration up to ``repeat`` times (fewer once ``budget`` s are spent).

    Wall time: the minimum over runs (the least disturbed one; other load on the machine only ever
    adds time), median and all runs kept too. Peak RSS: the median.
    """
    runs: list[dict] = []
    spent = 0.0
    for _ in range(max(1, repeat)):
        r = spawn(spec, timeout, quiet_wait)
        runs.append(r)
        if r["status"] != "ok":
            break
        spent += r["seconds"]
        if spent > budget:
            break
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {"status": runs[0]["status"]}
    best = min(ok, key=lambda r: r["seconds"])
    agg = {
        "status": "ok",
        "seconds": best["seconds"],
        "seconds_median": statistics.median(r["seconds"] for r in ok),
        "seconds_all": [round(r["seconds"], 4) for r in ok],
        "cpu_s": best["cpu_s"],
        "peak_mb": statistics.median(r["peak_mb"] for r in ok),
        "hwm_mb": statistics.median(r["hwm_mb"] for r in ok)
        if all(r.get("hwm_mb") for r in ok)
        else None,
        "base_mb": statistics.median(r["base_mb"] for r in ok),
        "runs_started_on_busy_machine": sum(not r["quiet_start"] for r in ok),
    }
    for key in (
        "inference_s",
        "pairs",
        "samples_seen",
        "engine",
        "activations_matched",
        "tensors_kept",
    ):
        if key in best:
            agg[key] = best[key]
    return agg


def helper(name: str, payload: dict | None = None) -> dict:
    """Run ``name`` (build_midcnn, probe, versions) in a helper process; its JSON answer.

    The parent never imports numpy, onnx or onnxruntime itself. On Linux a child's ru_maxrss
    starts from the RSS its parent had when it forked (the kernel carries the old address space's
    high-water mark over exec), so a parent that had loaded onnxruntime would inflate every
    child's peak.
    """
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--helper",
        name,
        json.dumps(payload or {}),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=str(ROOT), check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"helper {name} failed (rc {proc.returncode})")
    return json.loads(lines[-1])


def run_helper(name: str, payload: dict) -> dict:
    if name == "build_midcnn":
        build_midcnn(Path(payload["float"]), Path(payload["quant"]))
        return {"ok": True}
    if name == "probe":
        return {
            "bytes_per_sample": probe_qdq_bytes_per_sample(
                payload["float"], payload["quant"], payload["case"]
            )
        }
    if name == "versions":
        return versions()
    raise SystemExit(f"unknown helper {name!r}")


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime

    import qdiff

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *cmd],
                capture_output=True,
                text=True,
                cwd=str(ROOT),
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "qdiff")
    return {
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "qdiff_source_modified": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "qdiff": qdiff.__version__,
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


SHORT = {
    "compare": "compare",
    "sensitivity": "sens",
    "qdq_loss_debug": "qdq",
    "compare_nospin": "nospin",
    "compare_blas1": "blas1",
    "compare_fused": "fused",
}


def table(rows: list[dict], configs: list[str]) -> str:
    others = [c for c in configs if c not in ("floor", "floor_nospin", "floor_streams")]
    head = ["case", "samples", "floor s"]
    for c in others[:1]:
        head += [f"{c} s", f"{SHORT[c]}/floor time"]
    streams = "floor_streams" in configs
    if streams:
        head += ["streams floor s", f"{SHORT[others[0]]}/streams time" if others else "streams/floor time"]
    head += ["floor peak MB"]
    for c in others[:1]:
        head += [f"{c} peak MB", f"{SHORT[c]}/floor peak"]
    for c in others[1:]:
        head += [
            f"{c} s",
            f"{SHORT[c]}/floor time",
            f"{c} peak MB",
            f"{SHORT[c]}/floor peak",
        ]
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        fl = r["floor"]
        f_ok = fl.get("status") == "ok"

        def cells(m, fl=fl, f_ok=f_ok):
            if m is None:
                return ["–"] * 4
            if m["status"] != "ok":
                return [m["status"], "–", "–", "–"]
            t = m["seconds"] / fl["seconds"] if f_ok else None
            p = m["peak_mb"] / fl["peak_mb"] if f_ok else None
            return [
                _f(m["seconds"], ".3f"),
                _f(t, ".2f") + "x",
                _f(m["peak_mb"], ".0f"),
                _f(p, ".2f") + "x",
            ]

        line = [
            r["case"],
            str(r["samples"]),
            _f(fl["seconds"], ".3f") if f_ok else fl["status"],
        ]
        for c in others[:1]:
            line += cells(r.get(c))[:2]
        if streams:
            st = r.get("floor_streams") or {}
            if st.get("status") == "ok":
                ref = r.get(others[0]) if others else fl
                ratio = ref["seconds"] / st["seconds"] if ref and ref.get("status") == "ok" else None
                line += [_f(st["seconds"], ".3f"), _f(ratio, ".2f") + "x"]
            else:
                line += [st.get("status", "–"), "–"]
        line += [_f(fl["peak_mb"], ".0f") if f_ok else "–"]
        for c in others[:1]:
            line += cells(r.get(c))[2:]
        for c in others[1:]:
            line += cells(r.get(c))
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help=f"comma list of {', '.join(ALL_CASES)}",
    )
    ap.add_argument("--samples", default="8,64,512", help="comma list of sample counts")
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma list of {', '.join(CONFIGS + EXTRA_CONFIGS)} (floor always runs; default: {', '.join(CONFIGS)})",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="fresh processes per configuration; fastest reported (default 3)",
    )
    ap.add_argument(
        "--repeat-budget",
        type=float,
        default=30,
        help="stop repeating a configuration after this many seconds of runs",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=10,
        help="before each run, wait up to this long for no other runnable tasks",
    )
    ap.add_argument(
        "--qdq-max-samples",
        type=int,
        default=None,
        help="skip qdq_loss_debug above this many samples",
    )
    ap.add_argument(
        "--qdq-max-mb",
        type=float,
        default=8192,
        help="skip qdq_loss_debug when it would keep more than this (MB)",
    )
    ap.add_argument(
        "--timeout", type=float, default=600, help="seconds per child process"
    )
    ap.add_argument(
        "--json", dest="json_out", help="also write all measurements to this JSON file"
    )
    ap.add_argument(
        "--workdir",
        help="where the generated midcnn models go (default: a temp dir, removed after)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--helper", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    if args.helper:
        print(json.dumps(run_helper(args.helper[0], json.loads(args.helper[1]))))
        return 0

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    counts = [int(s) for s in args.samples.split(",") if s.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = (set(cases) - set(ALL_CASES)) | (
        set(configs) - set(CONFIGS) - set(EXTRA_CONFIGS)
    )
    if unknown:
        raise SystemExit(f"unknown: {', '.join(sorted(unknown))}")
    if "floor" not in configs:
        configs.insert(0, "floor")

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="qdiff-bench-models-")
        workdir = Path(tmp.name)

    started = time.perf_counter()
    vers = helper("versions")  # before the runs: the qdiff being measured
    print(
        f"qdiff {vers['qdiff']} at {vers['git_commit']}{' (modified)' if vers['qdiff_source_modified'] else ''}, "
        f"onnxruntime {vers['onnxruntime']}, {vers['cpu_count']} CPUs",
        file=sys.stderr,
    )
    load_start = _loadavg()
    if not wait_quiet(args.quiet_wait):
        print(
            "warning: other tasks keep running on this machine; timings will be noisy",
            file=sys.stderr,
        )
    rows: list[dict] = []
    try:
        for case in cases:
            t = time.perf_counter()
            fpath, qpath = case_models(case, workdir)
            if case == "midcnn":
                print(
                    f"[{case}] generated and quantized in {time.perf_counter() - t:.1f} s",
                    file=sys.stderr,
                )
            per_sample = (
                helper("probe", {"float": fpath, "quant": qpath, "case": case})[
                    "bytes_per_sample"
                ]
                if "qdq_loss_debug" in configs
                else None
            )
            for n in counts:
                row: dict = {"case": case, "samples": n}
                for config in configs:
                    if config == "qdq_loss_debug":
                        est_mb = per_sample * n / 2**20
                        row["qdq_loss_debug_kept_mb_est"] = round(est_mb, 1)
                        if (
                            args.qdq_max_samples is not None
                            and n > args.qdq_max_samples
                        ):
                            row[config] = {
                                "status": f"skipped (> {args.qdq_max_samples} samples)"
                            }
                            continue
                        if est_mb > args.qdq_max_mb:
                            row[config] = {
                                "status": f"skipped (would keep ~{est_mb:.0f} MB)"
                            }
                            continue
                    spec = {
                        "case": case,
                        "samples": n,
                        "config": config,
                        "float": fpath,
                        "quant": qpath,
                    }
                    row[config] = measure(
                        spec,
                        args.repeat,
                        args.timeout,
                        args.quiet_wait,
                        args.repeat_budget,
                    )
                    m = row[config]
                    msg = (
                        f"{m['seconds']:.3f} s (runs {m['seconds_all']}, {m['runs_started_on_busy_machine']} on a busy machine), "
                        f"peak {m['peak_mb']:.0f} MB (VmHWM {_f(m.get('hwm_mb'), '.0f')})"
                        if m["status"] == "ok"
                        else m["status"]
                    )
                    print(f"[{case} n={n}] {config:15s} {msg}", file=sys.stderr)
                # the floor is the faster of default sessions and sessions without thread spinning
                fd, fn = row.get("floor", {}), row.get("floor_nospin", {})
                if fd.get("status") == "ok" and fn.get("status") == "ok":
                    row["floor_default"] = fd
                    row["floor"] = dict(fn, chosen="nospin") if fn["seconds"] < fd["seconds"] else dict(fd, chosen="default")
                rows.append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()

    text = table(rows, configs)
    print(text)
    if args.json_out:
        doc = {
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": vers,
            "args": {k: v for k, v in vars(args).items() if k != "child"},
            "total_seconds": round(time.perf_counter() - started, 1),
            "loadavg_1min": {"start": load_start, "end": _loadavg()},
            "rows": rows,
            "table_markdown": text,
        }
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
