"""``qdiff match``: how the two graphs are paired, without running them."""

from __future__ import annotations

import argparse
from typing import Any

from qdiff.cli._common import check_writable, console
from qdiff.errors import UsageError

NAME = "match"


def add_parser(subparsers: Any) -> None:
    m = subparsers.add_parser(
        NAME,
        help="show how the two graphs are paired, without running them",
        description="Pair the float and quantized graphs by structure and print the alignment: float layer, "
        "quantized tensor, how it was matched and how sure; -o writes it as JSON or CSV for --map.",
    )
    m.add_argument("float_model", metavar="FLOAT")
    m.add_argument("quant_model", metavar="QUANT")
    m.add_argument("--map", metavar="FILE", help="JSON/CSV float tensor -> quantized tensor pairs overriding the matching")
    m.add_argument("-o", "--output", metavar="FILE", help="write the alignment (.json or .csv)")


def run(args: argparse.Namespace) -> int:
    import qdiff
    from qdiff.render import alignment_renderable

    if args.output and not args.output.lower().endswith((".json", ".csv")):
        raise UsageError(f"-o {args.output}: give a .json or .csv file name")
    check_writable(args.output, "-o", args)
    alignment = qdiff.match(args.float_model, args.quant_model, tensor_map=args.map)
    console().print(alignment_renderable(alignment))
    if args.output:
        if args.output.lower().endswith(".csv"):
            alignment.to_csv(args.output)
        else:
            alignment.to_json(args.output)
    return 0
