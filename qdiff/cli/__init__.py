"""The ``qdiff`` command: parse, dispatch to one module per subcommand, apply the error policy.

Every subcommand module (``qdiff.cli.compare``, ...) has ``NAME``, ``add_parser(subparsers)`` and
``run(args) -> int``: it parses nothing itself beyond its options, calls the public API and renders
(:mod:`qdiff.render`); no maths. What they share (input options, output checks, console, progress,
``--html`` / ``--node-data``) is in :mod:`qdiff.cli._common`. Nothing in the library imports this
package: only the ``qdiff`` entry point (``qdiff.cli:main``) and tests do.

User errors (the QdiffError family) print one line on stderr and exit with status 2; Ctrl-C exits
with 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from qdiff.cli import (
    calib_sweep,
    compare,
    config,
    diagnose,
    export,
    fallback,
    match,
    profile,
    quantize,
    sensitivity,
)
from qdiff.cli._common import Parser
from qdiff.errors import QdiffError

__all__ = ["main"]

#: every subcommand, in the order ``qdiff --help`` lists them
COMMANDS = {
    m.NAME: m
    for m in (compare, sensitivity, config, quantize, fallback, calib_sweep, export, diagnose, profile, match)
}


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qdiff", description="Layer-wise quantization accuracy debugging for ONNX models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the qdiff command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.version:
        from qdiff import __version__

        print(f"qdiff {__version__}")
        return 0
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="qdiff: %(levelname)s: %(message)s", stream=sys.stderr
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(COMMANDS[args.command].run(args))
    except QdiffError as exc:
        from qdiff.render import clean

        print(f"qdiff: error: {clean(exc)}", file=sys.stderr)  # one line, whatever a name in it holds
        detail = getattr(exc, "detail", "")  # an --eval function's own traceback frames
        if detail:
            print(detail.rstrip("\n"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdiff: interrupted", file=sys.stderr)
        return 130

