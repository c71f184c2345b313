"""What the ``qdiff`` subcommands share: the parser class, the input options, output checks made
before the run, the console, the progress bar, and ``--html`` / ``--node-data`` reports.

Reports, per command::

    add_report_options(parser)                  # --html, --node-data (fallback: node_data=False)
    check_report_options(args, "compare")       # before the run: output folders exist, metric known
    ...run...
    write_reports(args, result, "compare")      # after the run: write what was asked for

HTML: :mod:`qdiff.report_html`; node data: :mod:`qdiff.node_data` (compare and sensitivity only;
the fallback loop has no per-layer result). Files are written atomically, only after the run
succeeded. rich is imported only when printing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from qdiff.errors import UsageError

__all__ = [
    "Parser", "add_input_options", "check_writable", "check_outputs", "input_paths", "console", "progress",
    "add_report_options", "check_report_options", "write_reports", "command_line", "REPORT_KINDS", "NODE_DATA_METRICS",
]  # fmt: skip


class Parser(argparse.ArgumentParser):
    """The parser of ``qdiff`` and its subcommands: usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        cmd = " ".join(self.prog.split()[1:])
        self.exit(2, f"qdiff: error: {message} (see 'qdiff {cmd + ' ' if cmd else ''}--help')\n")


# -- input options --------------------------------------------------------------------------------


def _seed(text: str) -> int:
    """A random seed: an integer 0 or more (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_input_options(
    parser: argparse.ArgumentParser,
    *,
    samples_default: int | None = None,
    samples_help: str = "use at most N samples",
    data_help: str = "inputs (.npz or a folder of .npz/.npy files, as for compare); default: seeded random",
    batch_size: bool = True,
) -> None:
    """The input options every command that runs the models shares (--data, --samples, --seed, ...)."""
    parser.add_argument("--data", metavar="PATH", help=data_help)
    parser.add_argument("--samples", type=int, default=samples_default, metavar="N", help=samples_help)
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=1, metavar="B", help="samples per run (dynamic batch axis)")
    parser.add_argument("--seed", type=_seed, default=0, metavar="S", help="seed of the random inputs (default 0)")
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME:DIMS",
        help="shape for random inputs with dynamic dimensions, e.g. input:1x3x224x224 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--provider", default="CPUExecutionProvider", metavar="EP", help="onnxruntime execution provider (default CPU)"
    )


# -- output checks (before the run) ---------------------------------------------------------------

#: the options (argparse ``dest``) naming files or folders a command reads
_INPUT_OPTIONS = ("models", "float_model", "quant_model", "quant_only", "data", "map", "config", "calib", "eval_data")

#: every option naming an output file (option, argparse ``dest``)
_OUTPUT_OPTIONS = (("--json", "json"), ("--csv", "csv"), ("--html", "html"), ("--node-data", "node_data"), ("-o", "output"))


def input_paths(args: argparse.Namespace | None) -> list[str]:
    """The files a command reads, as given on its command line (outputs must not be one of them)."""
    if args is None:
        return []
    paths: list[str] = []
    for dest in _INPUT_OPTIONS:
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v:
                paths.append(v)
    return paths


def check_writable(path: str | None, option: str, args: argparse.Namespace | None = None) -> None:
    """Fail before the run, not after it, when an output file cannot be written.

    The path must be a regular file or a new name (a link is followed), none of the command's
    input files, in an existing folder in which a file can really be created; and no other output
    option of the command may name the same file.
    """
    if not path:
        return
    from qdiff._io import check_output

    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory; give a file name")
    check_output(path, option, inputs=input_paths(args))
    if args is not None:
        mine = os.path.realpath(path)
        for other, dest in _OUTPUT_OPTIONS:
            value = getattr(args, dest, None)
            if other != option and isinstance(value, str) and value and os.path.realpath(value) == mine:
                raise UsageError(f"{option} and {other} both name {path}; give each output its own file")


def check_outputs(args: argparse.Namespace, kind: str) -> None:
    """Validate --top and every output file option before the (long) run starts (compare, sensitivity)."""
    if args.top is not None and args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    for opt in ("csv", "json"):
        check_writable(getattr(args, opt), f"--{opt}", args)
    check_report_options(args, kind)


# -- console and progress -------------------------------------------------------------------------


def console() -> Any:
    """The rich Console commands print to (160 columns when stdout is not a terminal)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


@contextlib.contextmanager
def progress(label: str) -> Iterator[Any]:
    """A rich progress bar on stderr when it is a terminal; a no-op callback otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


# -- --html / --node-data -------------------------------------------------------------------------

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
