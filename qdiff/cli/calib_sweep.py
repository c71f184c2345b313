"""``qdiff calib-sweep``: quantize with each calibration method and keep the best per layer."""

from __future__ import annotations

import argparse
from typing import Any

from qdiff.cli._common import check_writable, console

NAME = "calib-sweep"


def add_parser(subparsers: Any) -> None:
    cs = subparsers.add_parser(NAME, help="quantize with each calibration method and keep the best per layer")
    cs.add_argument("float_model", metavar="FLOAT")
    cs.add_argument("--calib", required=True, metavar="DATA")
    cs.add_argument("--eval-data", metavar="DATA")
    cs.add_argument("--config", metavar="FILE")
    cs.add_argument("--samples", type=int, default=32, metavar="N")
    cs.add_argument("-o", "--output", required=True, metavar="FILE", help="the config with per-layer methods")


def run(args: argparse.Namespace) -> int:
    from qdiff._quantize import calib_sweep
    from qdiff.config import load_config, save_config
    from qdiff.render.tables import Col, FitTable, _num, cell

    check_writable(args.output, "-o", args)
    config, table, notes = calib_sweep(
        args.float_model,
        args.calib,
        config=load_config(args.config) if args.config else None,
        eval_data=args.eval_data,
        samples=args.samples,
    )
    cols = [Col(str(c), _num(6, 4)) if table[c].map(lambda v: isinstance(v, float)).all() else Col(str(c), text=True)
            for c in table.columns]  # fmt: skip
    rows = [(list(r), None) for _, r in table.iterrows()]
    out = console()
    out.print(FitTable("isolated cosine per layer and calibration method", cols, rows, levels=2))
    for n in notes:
        out.print(cell(f"note: {n}"))
    save_config(config, args.output)
    out.print(cell(f"wrote {args.output} (default method {config.activation_quant_params['calibration_method']})"))
    return 0
