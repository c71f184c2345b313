"""Match a real float model against its int8 twin, as made by onnxruntime, then renamed.

Run by hand (not part of the tests; needs a model file)::

    python bench/match_real.py /path/ch_PP-OCRv4_rec_infer.onnx --shape 1x3x48x320
    python bench/match_real.py model.onnx --shape 1x3x320x320 --dynamic --repeat 5

The float model is prepared as qdiff does (Constant-node weights become initializers), quantized
with ``quantize_static`` (QDQ, per-channel, a few random calibration samples: enough for matching)
or ``quantize_dynamic``, and the int8 model is then copied with every node and every tensor that
is not a graph input or output renamed (``n<k>`` / ``t<k>``), as another export would. Each
variant is matched against the *original* float model; the script prints the number of pairs,
of unmatched float compute layers (Conv/MatMul/Gemm/LSTM/...), of unmatched nodes in all, the
reasons grouped, and the matching time (best of ``--repeat``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from qdiff import Graph, match_models
from qdiff._quantize import prepare_model

COMPUTE = {"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN"}


def rename_everything(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node and every tensor but the graph inputs and outputs renamed (initializers too)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    mapping: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return mapping.setdefault(name, f"t{len(mapping)}")

    for t in m.graph.initializer:
        t.name = rename(t.name)
    for k, node in enumerate(m.graph.node):
        node.name = f"n{k}"
        for i, x in enumerate(node.input):
            node.input[i] = rename(x)
        for i, x in enumerate(node.output):
            node.output[i] = rename(x)
    del m.graph.value_info[:]
    return m


def _quantize(float_model: onnx.ModelProto, shape: list[int], dynamic: bool, tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    prepared = prepare_model(float_model).model
    src, dst = tmp / "float.onnx", tmp / "int8.onnx"
    onnx.save(prepared, str(src))
    name = prepared.graph.input[0].name
    rng = np.random.default_rng(0)
    feeds = [{name: rng.random(shape, dtype=np.float32)} for _ in range(4)]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        if dynamic:
            quantize_dynamic(str(src), str(dst))
        else:
            quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return onnx.load(str(dst))


def report(label: str, fg: Graph, qm: onnx.ModelProto, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        qg = Graph(qm)
        t0 = time.perf_counter()
        m = match_models(fg, qg)
        times.append(time.perf_counter() - t0)
    float_unmatched = [u for u in m.unmatched if u.side == "float"]
    compute = [u for u in float_unmatched if u.op_type in COMPUTE]
    paired_compute = sum(1 for p in m.pairs if p.op_type.split("+")[0] in COMPUTE)
    print(f"## {label}")
    print(f"pairs: {len(m.pairs)} (compute layers paired: {paired_compute})")
    print(f"unmatched: {len(m.unmatched)} ({len(float_unmatched)} float, {len(m.unmatched) - len(float_unmatched)} quantized)")
    print(f"unmatched float compute layers (Conv/MatMul/Gemm/LSTM...): {len(compute)}")
    print(f"skipped: {len(m.skipped)}")
    print(f"matching time: best {min(times) * 1000:.0f} ms of {repeat}")
    reasons = collections.Counter((u.side, u.op_type, u.reason.split("'")[0][:70]) for u in m.unmatched)
    for (side, op, reason), n in reasons.most_common(12):
        print(f"  {n:4d} {side:5s} {op:22s} {reason}")
    print()
    return {"unmatched": len(m.unmatched), "compute": len(compute), "time": min(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--shape", default="1x3x48x320", help="input shape, e.g. 1x3x48x320")
    ap.add_argument("--dynamic", action="store_true", help="quantize_dynamic instead of static QDQ")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    shape = [int(x) for x in args.shape.split("x")]
    float_model = onnx.load(args.model)
    with tempfile.TemporaryDirectory(prefix="qdiff-match-real-") as tmp:
        qm = _quantize(float_model, shape, args.dynamic, Path(tmp))
    fg = Graph(float_model)
    kind = "dynamic" if args.dynamic else "QDQ static"
    print(f"# {Path(args.model).name}: {len(float_model.graph.node)} float nodes, {len(qm.graph.node)} int8 nodes ({kind})\n")
    report("int8 as quantized", fg, qm, args.repeat)
    report("int8 with every node and tensor renamed", fg, rename_everything(qm), args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
