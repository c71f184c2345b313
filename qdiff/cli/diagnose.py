"""``qdiff diagnose``: detect common quantization failures and say what to do.

Exit status: 0 when the run finished, whatever it found (findings are output, not failures);
with ``--fail-on error`` (or ``warning``) 1 when a finding at least that severe exists, for CI;
2 for user errors (bad paths, data, options), like every qdiff command.
"""

from __future__ import annotations

import argparse
from typing import Any

from qdiff.cli._common import add_input_options, check_writable, console

NAME = "diagnose"


def add_parser(subparsers: Any) -> None:
    from qdiff._diagnose import CHECKS

    d = subparsers.add_parser(
        NAME,
        help="detect common quantization failures and say what to do",
        description="Check a quantized (or FP16) model for the failures users meet again and again: quantization "
        "parameters that must agree, coverage, Int8<->Float conversions, per-tensor weights among per-channel ones, "
        "FP16 overflow and error jumps, activation saturation. Checks: "
        + "; ".join(f"{c.name}: {c.description}" for c in CHECKS.values()),
    )
    d.add_argument("quant_model", metavar="INT8", help="the quantized model (QDQ, QOperator, dynamic) or an FP16 model")
    d.add_argument("float_model", metavar="FLOAT", nargs="?", help="the float32 model it was made from (optional)")
    add_input_options(
        d, samples_default=8, samples_help="use at most N samples (default 8)", batch_size=False,
        data_help="inputs for the activation checks (as for compare); default: seeded random",
    )  # fmt: skip
    d.add_argument(
        "--check", action="append", dest="checks", metavar="NAME", choices=list(CHECKS),
        help=f"run only this check (repeatable): {', '.join(CHECKS)}",
    )  # fmt: skip
    d.add_argument("--tables", action="store_true", help="also print each check's table")
    d.add_argument("--json", metavar="FILE", help='write {"findings": [...], "summary", "tables", "meta"} as JSON')
    d.add_argument(
        "--fail-on", choices=["error", "warning"], metavar="SEVERITY",
        help="exit 1 when a finding at least this severe exists (error or warning); default: exit 0",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from qdiff._diagnose import SEVERITIES, diagnose
    from qdiff.render import diagnose_renderable

    check_writable(args.json, "--json", args)
    result = diagnose(
        args.quant_model,
        args.float_model,
        args.data,
        samples=args.samples,
        seed=args.seed,
        input_shapes=args.input_shape,
        provider=args.provider,
        checks=args.checks,
    )
    console().print(diagnose_renderable(result, tables=args.tables))
    if args.json:
        result.to_json(args.json)
    if args.fail_on:
        limit = SEVERITIES.index(args.fail_on)
        if any(SEVERITIES.index(f.severity) <= limit for f in result.findings):
            return 1
    return 0
