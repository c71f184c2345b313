"""``qdiff profile``: per-layer latency of the float and the quantized model (onnxruntime profiler)."""

from __future__ import annotations

import argparse
from typing import Any

from qdiff.cli._common import add_input_options, check_writable, console

NAME = "profile"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        NAME,
        help="per-layer latency of the float and the quantized model (onnxruntime profiler)",
        description="Run both models untapped with onnxruntime's profiler, attribute each kernel's time to a float "
        "layer and show which layers got slower after quantization and how much time Q/DQ and Cast nodes take.",
    )
    p.add_argument("float_model", metavar="FLOAT")
    p.add_argument("quant_model", metavar="INT8")
    add_input_options(p, samples_default=8, samples_help="timed runs per model (default 8)", batch_size=False)
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed runs per model first (default 2)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="intra-op threads (default 0: every core)")
    p.add_argument("--json", metavar="FILE", help='write {"layers", "summary", "findings", "nodes", "meta"} as JSON')
    p.add_argument("--csv", metavar="FILE", help="write the per-layer rows as CSV")


def run(args: argparse.Namespace) -> int:
    from qdiff._profile import profile
    from qdiff.render import profile_renderable

    check_writable(args.json, "--json", args)
    check_writable(args.csv, "--csv", args)
    result = profile(
        args.float_model,
        args.quant_model,
        args.data,
        samples=args.samples,
        warmup=args.warmup,
        seed=args.seed,
        input_shapes=args.input_shape,
        provider=args.provider,
        threads=args.threads,
    )
    console().print(profile_renderable(result))
    if args.json:
        result.to_json(args.json)
    if args.csv:
        result.to_csv(args.csv)
    return 0
