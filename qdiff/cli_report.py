"""``--html FILE`` and ``--node-data FILE`` for the ``compare``, ``sensitivity`` and ``fallback`` commands.

The command parsers live in :mod:`qdiff.cli`; it calls, per command::

    add_report_options(parser)                  # --html, --node-data (fallback: node_data=False)
    check_report_options(args, "compare")       # before the run: output folders exist, metric known
    ...run...
    write_reports(args, result, "compare")      # after the run: write what was asked for

HTML: :mod:`qdiff.report_html`; node data: :mod:`qdiff.node_data` (compare and sensitivity only;
the fallback loop has no per-layer result). Files are written atomically, only after the run
succeeded.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from qdiff.errors import UsageError

__all__ = ["add_report_options", "check_report_options", "write_reports", "command_line", "REPORT_KINDS", "NODE_DATA_METRICS"]

REPORT_KINDS = ("compare", "sensitivity", "fallback")


def add_report_options(parser: argparse.ArgumentParser, *, node_data: bool = True) -> None:
    """Add ``--html FILE`` (and ``--node-data FILE`` [``--node-data-metric M``]) to a command's parser.

    Args:
        parser: the subcommand's parser.
        node_data: also add ``--node-data`` / ``--node-data-metric`` (compare, sensitivity).
    """
    parser.add_argument(
        "--html", metavar="FILE",
        help="write a self-contained HTML report (summary, sortable table, plots, run info); works offline",
    )  # fmt: skip
    if node_data:
        parser.add_argument(
            "--node-data", metavar="FILE",
            help="write per-layer values as Google Model Explorer node data JSON, to colour the float graph",
        )  # fmt: skip
        parser.add_argument(
            "--node-data-metric", metavar="COLUMN", default=None,
            help="the layer column written by --node-data (default: cosine; sensitivity: isolated_cosine)",
        )  # fmt: skip


#: the layer columns --node-data-metric accepts, per result kind
NODE_DATA_METRICS = {
    "compare": ["cosine", "cosine_worst", "mse", "mse_worst", "mae", "mae_worst", "max_abs", "sqnr_db", "sqnr_db_worst",
                "kl", "kl_worst", "sqnr"],
    "sensitivity": ["isolated_cosine", "accumulated_cosine", "isolated_sqnr_db", "accumulated_sqnr_db", "isolated_mse",
                    "noise_floor", "noise_ratio", "gain", "keep_float_metric", "solo_drop"],
}  # fmt: skip


def check_report_options(args: argparse.Namespace, kind: str | None = None) -> None:
    """Fail before the run, not after it: report folders exist, the node-data metric is known.

    Raises:
        UsageError: naming the option.
    """
    from qdiff.cli import check_writable

    check_writable(getattr(args, "html", None), "--html", args)
    check_writable(getattr(args, "node_data", None), "--node-data", args)
    metric = getattr(args, "node_data_metric", None)
    if metric and kind in NODE_DATA_METRICS and metric not in NODE_DATA_METRICS[kind]:
        raise UsageError(f"--node-data-metric '{metric}' is not a {kind} layer column; use one of {', '.join(NODE_DATA_METRICS[kind])}")


def command_line(argv: Sequence[str] | None = None) -> str:
    """``qdiff ARGS...`` shell-quoted, from ``argv`` (without the program name) or ``sys.argv``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["qdiff", *[str(a) for a in args]])


def write_reports(args: argparse.Namespace, result: Any, kind: str, *, command: str | None = None) -> list[str]:
    """Write the reports ``args`` asks for (``args.html``, ``args.node_data``).

    Args:
        args: the parsed command line; ``args.argv`` (the argument list ``main`` got), when set,
            is what the report shows as the command.
        result: the command's result (CompareResult, SensitivityResult or FallbackResult).
        kind: ``compare``, ``sensitivity`` or ``fallback``.
        command: the command line to show (default: from ``args.argv`` or ``sys.argv``).

    Returns:
        The paths written.

    Raises:
        UsageError: an unknown ``kind``, or ``--node-data`` for ``fallback``.
    """
    if kind not in REPORT_KINDS:
        raise UsageError(f"report kind must be one of {', '.join(REPORT_KINDS)}, got '{kind}'")
    if command is None:
        command = command_line(getattr(args, "argv", None))
    written: list[str] = []
    html_path = getattr(args, "html", None)
    if html_path:
        from qdiff import report_html

        build = {"compare": report_html.compare_html, "sensitivity": report_html.sensitivity_html, "fallback": report_html.fallback_html}
        report_html.write_html(build[kind](result, command=command), html_path)
        written.append(str(html_path))
    nd_path = getattr(args, "node_data", None)
    if nd_path:
        if kind == "fallback":
            raise UsageError("--node-data is for compare and sensitivity results")
        from qdiff.node_data import write_node_data

        write_node_data(result, nd_path, getattr(args, "node_data_metric", None))
        written.append(str(nd_path))
    return written
