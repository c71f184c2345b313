#!/usr/bin/env python3
"""qdiff compare on a model above protobuf's 2 GB limit (weights in external data). Run by hand.

    .venv/bin/python bench/big_model.py --workdir /tmp/qdiff-big      # ~2.3 GB float, ~0.6 GB int8

Builds an MLP of 9 MatMul+Relu layers on a [1, 4096] input with 4096x16384 / 16384x4096 float32
weights (2.3 GB, saved as external data), quantizes it with onnxruntime's quantize_static (QDQ,
per-tensor, external data), then measures, each in a fresh subprocess, the floor (both models
run bare, one sample at a time) and ``qdiff compare`` on the same inputs: wall time and peak RSS.
Prints a markdown row per configuration and the compare summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = [4096, 16384, 4096, 16384, 4096, 16384, 4096, 16384, 4096, 10]


def build(workdir: Path, samples: int) -> tuple[Path, Path, Path]:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    f_path, q_path, data_path = workdir / "big.float.onnx", workdir / "big.int8.onnx", workdir / "big_data.npz"
    rng = np.random.default_rng(0)
    if not f_path.exists():
        nodes, inits, x = [], [], "input"
        for k, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
            w = (rng.standard_normal((a, b), dtype=np.float32) * np.float32(np.sqrt(2.0 / a))).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{k}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"mm{k}"], name=f"mm{k}"))
            x = f"mm{k}"
            if k < len(WIDTHS) - 2:
                nodes.append(helper.make_node("Relu", [x], [f"relu{k}"], name=f"relu{k}"))
                x = f"relu{k}"
        graph = helper.make_graph(
            nodes, "big_mlp",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, WIDTHS[0]])],
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, WIDTHS[-1]])],
            inits,
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 10
        onnx.save(model, f_path, save_as_external_data=True, all_tensors_to_one_file=True, location="big.float.data")
        del model, graph, inits
    # its own generator: the same data whether or not the model was built in this run
    data = np.random.default_rng(1).standard_normal((samples, 1, WIDTHS[0]), dtype=np.float32)
    np.savez(data_path, input=data)
    if not q_path.exists():

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"input": data[i]} for i in range(min(8, samples))])

            def get_next(self):
                return next(self.it, None)

        quantize_static(
            str(f_path), str(q_path), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
        )  # fmt: skip
        m = onnx.load(str(q_path), load_external_data=False)
        if m.ir_version > 10:
            m.ir_version = 10
            onnx.save(m, str(q_path))
    return f_path, q_path, data_path


def child(config: str, f_path: str, q_path: str, data_path: str) -> None:
    import resource

    import numpy as np
    import onnxruntime as ort

    import qdiff

    qdiff.compare  # noqa: B018 - names load on first use: compare's modules load before the clock
    data = np.load(data_path)["input"]
    t0 = time.perf_counter()
    out: dict = {}
    if config == "floor":
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        f = ort.InferenceSession(f_path, so, providers=["CPUExecutionProvider"])
        q = ort.InferenceSession(q_path, so, providers=["CPUExecutionProvider"])
        for x in data:
            f.run(None, {"input": x})
            q.run(None, {"input": x})
    else:
        r = qdiff.compare(f_path, q_path, data=data_path)
        out["layers"] = len(r.layers)
        out["final_cosine"] = float(r.outputs["cosine"].iloc[0])
        out["notes"] = r.meta["notes"]
        out["metrics_kernel"] = r.meta["metrics_kernel"]
        out["integer_taps"] = r.meta["integer_taps"]
        out["worst"] = r.worst(3)[["layer", "cosine", "sqnr_db"]].to_dict("records")
    out["seconds"] = time.perf_counter() - t0
    # VmHWM: ru_maxrss keeps the parent's peak across exec (a run that built the models first
    # reported the builder's 6.5 GB for both configurations)
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/status") as fh:
            out["peak_mb"] = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        pass
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/qdiff-big")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    f_path, q_path, data_path = build(workdir, args.samples)
    sizes = {p.name: round(p.stat().st_size / 2**20) for p in workdir.iterdir()}
    print(f"models ready in {time.perf_counter() - t:.0f} s: {sizes} (MB)", file=sys.stderr)
    rows = {}
    for config in ("floor", "compare"):
        cmd = [sys.executable, __file__, "--child", config, str(f_path), str(q_path), str(data_path)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        rows[config] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{config}: {rows[config]}", file=sys.stderr)
    fl, cp = rows["floor"], rows["compare"]
    print("| samples | floor s | compare s | compare/floor time | floor peak MB | compare peak MB | compare/floor peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.samples} | {fl['seconds']:.2f} | {cp['seconds']:.2f} | {cp['seconds'] / fl['seconds']:.2f}x | "
        f"{fl['peak_mb']:.0f} | {cp['peak_mb']:.0f} | {cp['peak_mb'] / fl['peak_mb']:.2f}x |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
