"""``qdiff export``: a config's skip list (quant_enable=false) for another tool."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qdiff.cli._common import check_writable

NAME = "export"


def add_parser(subparsers: Any) -> None:
    ex = subparsers.add_parser(NAME, help="the skip list (quant_enable=false) for another tool")
    ex.add_argument("config", metavar="CONFIG")
    ex.add_argument("--to", required=True, choices=["ort", "mnn", "nncf", "tflite"])
    ex.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    ex.add_argument("--model", metavar="FLOAT", help="the float ONNX model the config is for (needed by --to mnn)")


def run(args: argparse.Namespace) -> int:
    from qdiff._io import write_atomic
    from qdiff._quantize import export_skip_list
    from qdiff.config import load_config

    check_writable(args.output, "-o", args)
    text = export_skip_list(load_config(args.config), args.to, model=args.model)
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0
