"""``qdiff fallback``: keep the fewest layers in float that meet an accuracy target."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qdiff.cli._common import add_report_options, check_report_options, console, input_paths, progress, write_reports
from qdiff.errors import UsageError

NAME = "fallback"


def add_parser(subparsers: Any) -> None:
    fb = subparsers.add_parser(
        NAME,
        help="keep the fewest layers in float that meet an accuracy target",
        description="quantize -> measure -> rank layers by fallback gain -> disable the most sensitive -> "
        "re-quantize, until the target holds; then prune. Writes OUTDIR/config.json, model.int8.onnx, history.csv.",
    )
    fb.add_argument("float_model", metavar="FLOAT")
    fb.add_argument("--calib", required=True, metavar="DATA")
    fb.add_argument("--eval-data", metavar="DATA", help="data for the cosine target and the ranking (default: --calib)")
    fb.add_argument("--target", required=True, metavar="EXPR", help="'cosine>=0.99' or 'metric_drop<=0.01' (with --eval)")
    fb.add_argument("--eval", metavar="MODULE:FUNC", help="task metric function(model_path) -> float, higher is better")
    fb.add_argument("--config", metavar="FILE", help="starting config (default: every layer quantized)")
    fb.add_argument("--max-float-layers", type=int, metavar="N")
    fb.add_argument("--samples", type=int, default=64, metavar="N", help="eval samples per measurement (default 64)")
    fb.add_argument("-o", "--outdir", default="qdiff-fallback", metavar="OUTDIR")
    fb.add_argument("--resume", action="store_true", help="continue from OUTDIR (config.json, history.csv appended)")
    fb.add_argument("--time-budget", type=float, metavar="SECONDS", help="try no further layer after this many seconds (the prune still runs)")
    add_report_options(fb, node_data=False)


def run(args: argparse.Namespace) -> int:
    from qdiff._fallback import fallback
    from qdiff.render import fallback_renderable

    out = Path(args.outdir)
    _check_outdir(args)
    check_report_options(args, NAME)
    screen = console()
    with progress("fallback") as bar:
        try:
            result = fallback(
                args.float_model,
                args.calib,
                target=args.target,
                eval=args.eval,
                eval_data=args.eval_data,
                config=args.config,
                max_float_layers=args.max_float_layers,
                outdir=out,
                resume=args.resume,
                samples=args.samples,
                time_budget=args.time_budget,
                progress=(lambda n, v: bar(n, None)) if bar else None,
            )
        except KeyboardInterrupt:
            print(f"qdiff: interrupted; the best result so far is in {out}", file=sys.stderr)
            return 130
    screen.print(fallback_renderable(result))
    write_reports(args, result, NAME)
    return 0 if result.reached else 1


def _check_outdir(args: argparse.Namespace) -> None:
    """-o OUTDIR: a folder (or a new name in one) that can be written, whose config.json,
    model.int8.onnx and history.csv are regular files or absent and no input file."""
    from qdiff._io import check_folder, check_output

    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {args.outdir} exists and is not a folder; give a folder name")
    if not out.exists():
        check_folder(out.parent if str(out.parent) else Path("."), f"-o {args.outdir}:")  # OUTDIR can be made there
        return
    check_folder(out, f"-o {args.outdir}:")
    inputs = [p for p in input_paths(args) if p != getattr(args, "config", None)]  # --config may live there
    for name in ("config.json", "model.int8.onnx", "history.csv"):
        check_output(out / name, f"-o {args.outdir}:", inputs=inputs)
