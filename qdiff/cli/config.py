"""``qdiff config init``: a config listing every quantizable layer with its defaults."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qdiff.cli._common import Parser, check_writable

NAME = "config"


def add_parser(subparsers: Any) -> None:
    cfg = subparsers.add_parser(NAME, help="quantization configs")
    cfg_sub = cfg.add_subparsers(dest="config_command", parser_class=Parser)
    ci = cfg_sub.add_parser("init", help="write a config listing every quantizable layer with its defaults")
    ci.add_argument("float_model", metavar="FLOAT")
    ci.add_argument("-o", "--output", required=True, metavar="FILE")
    ci.add_argument("--per-tensor", action="store_true", help="weights per-tensor (default per-channel)")
    ci.add_argument("--format", choices=["QDQ", "QOperator"], default="QDQ")


def run(args: argparse.Namespace) -> int:
    from qdiff._quantize import init_config
    from qdiff.config import save_config

    if args.config_command != "init":
        print("qdiff: error: use 'qdiff config init FLOAT -o config.json'", file=sys.stderr)
        return 2
    check_writable(args.output, "-o", args)
    config = init_config(args.float_model, quant_format=args.format)
    config.weight_quant_params["per_channel"] = not args.per_tensor
    save_config(config, args.output)
    print(f"wrote {args.output}: {len(config.layers)} quantizable layers, all enabled")
    return 0
