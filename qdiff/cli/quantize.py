"""``qdiff quantize``: quantize with onnxruntime as a config says."""

from __future__ import annotations

import argparse
from typing import Any

from qdiff.cli._common import check_writable

NAME = "quantize"


def add_parser(subparsers: Any) -> None:
    qz = subparsers.add_parser(NAME, help="quantize with onnxruntime as a config says")
    qz.add_argument("float_model", metavar="FLOAT")
    qz.add_argument("--config", metavar="FILE", help="config JSON (default: every layer quantized)")
    qz.add_argument("--calib", required=True, metavar="DATA", help="calibration data (.npz or folder)")
    qz.add_argument("-o", "--output", required=True, metavar="INT8.onnx")


def run(args: argparse.Namespace) -> int:
    from qdiff._quantize import init_config, quantize
    from qdiff.config import load_config
    from qdiff.render import clean

    check_writable(args.output, "-o", args)
    config = load_config(args.config) if args.config else init_config(args.float_model)
    report = quantize(args.float_model, config, args.calib, args.output)
    print(
        f"wrote {report.path}: {report.size_bytes} bytes (float {report.float_size_bytes}), "
        f"{len(report.excluded)} layer(s) left in float, {report.calibration_samples} calibration samples"
    )
    for w in report.warnings:
        print(f"warning: {clean(w)}")
    return 0
