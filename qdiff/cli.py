"""The ``qdiff`` command: parse, call the public API, render. No maths here.

User errors (the QdiffError family) print one line on stderr and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from qdiff.errors import QdiffError, UsageError

__all__ = ["main", "add_input_options", "check_writable", "console"]

#: modules adding subcommands: each has ``register(subparsers, parser_class)`` and sets
#: ``func`` (``args -> exit status``) on its parsers with ``set_defaults``
_EXTRA_COMMANDS: list[str] = ["qdiff.cli_diagnose"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        cmd = " ".join(self.prog.split()[1:])
        self.exit(2, f"qdiff: error: {message} (see 'qdiff {cmd + ' ' if cmd else ''}--help')\n")


def _dask_client(address: str):
    """A Dask client for ``--dask-scheduler`` (one-line errors when dask is missing or unreachable)."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--dask-scheduler needs Dask's distributed package: pip install 'qdiff[dask]'") from None
    try:
        return Client(address, timeout="5s")
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        raise UsageError(f"cannot reach the Dask scheduler at {address} ({type(exc).__name__}); check the address") from None


def _bytes(text: str) -> int:
    """'512M' / '2G' / '1000' -> bytes (argparse type)."""
    import math

    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in units:
            number = float(t[:-1])
            if not math.isfinite(number):
                raise ValueError(text)
            return int(number * units[t[-1]])
        return int(t)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 512M or 2G") from None


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


def _build_parser() -> argparse.ArgumentParser:
    from qdiff.cli_report import add_report_options

    parser = _Parser(prog="qdiff", description="Layer-wise quantization accuracy debugging for ONNX models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    c = sub.add_parser(
        "compare",
        help="compare a float model and its quantized twin layer by layer",
        description="Run both models on the same inputs, tap every comparable tensor, match the graphs "
        "and report per-layer cosine, MSE, SQNR, KL and max error.",
    )
    c.add_argument("models", nargs="*", metavar="FLOAT QUANT", help="the float (reference) and the quantized or FP16 .onnx model")
    c.add_argument(
        "--quant-only", metavar="QUANT",
        help="no float model: compare a QDQ model with itself minus its activation Q/DQ (shows activation quantization error)",
    )  # fmt: skip
    c.add_argument("--map", metavar="FILE", help="JSON/CSV float tensor -> quantized tensor pairs overriding the matching")
    add_input_options(
        c, samples_help="use at most N samples (random inputs: default 8)",
        data_help=".npz keyed by input name (axis 0 = samples) or a folder of .npz/.npy files",
    )  # fmt: skip
    c.add_argument("--top", type=int, metavar="K", help="show only the K worst layers, worst first")
    c.add_argument("--csv", metavar="FILE", help="write the per-layer rows as CSV")
    c.add_argument("--json", metavar="FILE", help="write layers, outputs, weights, unmatched and meta as JSON")
    c.add_argument("--weights", action="store_true", help="also print the weight comparison table")
    c.add_argument("--workers", type=int, default=1, metavar="N", help="shard the samples across N processes")
    c.add_argument(
        "--dask-scheduler", metavar="ADDRESS",
        help="run the --workers shards on a Dask cluster (e.g. tcp://host:8786; needs pip install qdiff[dask])",
    )  # fmt: skip
    c.add_argument(
        "--max-memory", type=_bytes, metavar="SIZE",
        help="memory the tapped tensors of one sample may take (e.g. 512M, 2G); above it taps are fetched in groups",
    )  # fmt: skip
    c.add_argument(
        "--engine", choices=["numpy", "fused", "auto"], default="numpy",
        help="where metrics are reduced: numpy (copy tensors out), fused (inside onnxruntime), auto",
    )  # fmt: skip
    add_report_options(c)

    s = sub.add_parser(
        "sensitivity",
        help="rank layers by the error they cause (isolated error, fallback gain)",
        description="Measure each layer's isolated error (the quantized layer fed float activations), the gain of "
        "keeping it alone in float and the loss of quantizing it alone, and rank the layers.",
    )
    s.add_argument("float_model", metavar="FLOAT")
    s.add_argument("quant_model", metavar="QUANT")
    add_input_options(s, samples_help="use at most N samples (random inputs: default 8)")
    s.add_argument("--map", metavar="FILE", help="tensor map overriding the matching")
    s.add_argument("--by", default="isolated", choices=["isolated", "gain", "accumulated", "noise"], help="ranking")
    s.add_argument("--no-gain", action="store_true", help="skip fallback gain / solo drop (one model pair per layer)")
    s.add_argument(
        "--gain-top", type=int, default=4, metavar="N",
        help="measure gain for the N Conv/Gemm/MatMul layers with the worst isolated error (default 4; 0: all)",
    )  # fmt: skip
    s.add_argument(
        "--eval", metavar="MODULE:FUNC",
        help="task metric function(model_path) -> float, higher is better (module:function or file.py:function)",
    )  # fmt: skip
    s.add_argument("--top", type=int, metavar="K", help="show only the K most sensitive layers")
    s.add_argument("--json", metavar="FILE", help='write {"layers": [...], "meta": {...}}')
    s.add_argument("--csv", metavar="FILE", help="write the layer rows as CSV")
    add_report_options(s)

    cfg = sub.add_parser("config", help="quantization configs")
    cfg_sub = cfg.add_subparsers(dest="config_command", parser_class=_Parser)
    ci = cfg_sub.add_parser("init", help="write a config listing every quantizable layer with its defaults")
    ci.add_argument("float_model", metavar="FLOAT")
    ci.add_argument("-o", "--output", required=True, metavar="FILE")
    ci.add_argument("--per-tensor", action="store_true", help="weights per-tensor (default per-channel)")
    ci.add_argument("--format", choices=["QDQ", "QOperator"], default="QDQ")

    qz = sub.add_parser("quantize", help="quantize with onnxruntime as a config says")
    qz.add_argument("float_model", metavar="FLOAT")
    qz.add_argument("--config", metavar="FILE", help="config JSON (default: every layer quantized)")
    qz.add_argument("--calib", required=True, metavar="DATA", help="calibration data (.npz or folder)")
    qz.add_argument("-o", "--output", required=True, metavar="INT8.onnx")

    fb = sub.add_parser(
        "fallback",
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

    cs = sub.add_parser("calib-sweep", help="quantize with each calibration method and keep the best per layer")
    cs.add_argument("float_model", metavar="FLOAT")
    cs.add_argument("--calib", required=True, metavar="DATA")
    cs.add_argument("--eval-data", metavar="DATA")
    cs.add_argument("--config", metavar="FILE")
    cs.add_argument("--samples", type=int, default=32, metavar="N")
    cs.add_argument("-o", "--output", required=True, metavar="FILE", help="the config with per-layer methods")

    ex = sub.add_parser("export", help="the skip list (quant_enable=false) for another tool")
    ex.add_argument("config", metavar="CONFIG")
    ex.add_argument("--to", required=True, choices=["ort", "mnn", "nncf", "tflite"])
    ex.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    ex.add_argument("--model", metavar="FLOAT", help="the float ONNX model the config is for (needed by --to mnn)")

    for module in _EXTRA_COMMANDS:
        import importlib

        importlib.import_module(module).register(sub, _Parser)

    m = sub.add_parser(
        "match",
        help="show how the two graphs are paired, without running them",
        description="Pair the float and quantized graphs by structure and print the alignment: float layer, "
        "quantized tensor, how it was matched and how sure; -o writes it as JSON or CSV for --map.",
    )
    m.add_argument("float_model", metavar="FLOAT")
    m.add_argument("quant_model", metavar="QUANT")
    m.add_argument("--map", metavar="FILE", help="JSON/CSV float tensor -> quantized tensor pairs overriding the matching")
    m.add_argument("-o", "--output", metavar="FILE", help="write the alignment (.json or .csv)")
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
        if getattr(args, "func", None) is not None:
            return int(args.func(args))
        if args.command == "compare":
            return _compare(args)
        if args.command == "match":
            return _match(args)
        if args.command == "sensitivity":
            return _sensitivity(args)
        if args.command == "config":
            return _config(args, parser)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "fallback":
            return _fallback(args)
        if args.command == "calib-sweep":
            return _calib_sweep(args)
        if args.command == "export":
            return _export(args)
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
    return 2


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    import qdiff
    from qdiff.render import compare_renderable

    from qdiff.cli_report import write_reports

    _check_outputs(args, "compare")
    if args.quant_only and args.models:
        raise UsageError("--quant-only takes the quantized model itself; give no FLOAT QUANT with it")
    if not args.quant_only and len(args.models) != 2:
        raise UsageError(
            f"compare needs FLOAT and QUANT models, got {len(args.models)} path(s); or use --quant-only QUANT"
        )
    kwargs = dict(
        data=args.data,
        samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
        input_shapes=args.input_shape,
        provider=args.provider,
        tensor_map=args.map,
        engine=args.engine,
        workers=args.workers,
        max_memory=args.max_memory,
    )
    client = _dask_client(args.dask_scheduler) if args.dask_scheduler else None
    if client is not None:
        kwargs["executor"] = client.get_executor()
    try:
        with _progress("comparing") as progress:
            if args.quant_only:
                result = qdiff.compare_quant_only(args.quant_only, progress=progress, **kwargs)
            else:
                result = qdiff.compare(args.models[0], args.models[1], progress=progress, **kwargs)
    finally:
        if client is not None:
            client.close()
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(compare_renderable(result, top=args.top))
    if args.weights:
        from qdiff.render import Col, FitTable, _num

        cols = [
            Col("layer", text=True, floor=12), Col("role", text=True, floor=4), Col("granularity", text=True, floor=6),
            Col("shape", text=True, floor=6), Col("cosine", _num(6, 4)), Col("SQNR dB", _num(2, 1)),
            Col("max abs", lambda v, level: f"{v:.3g}"), Col("worst ch", drop=2), Col("worst ch cos", _num(6, 4), drop=2),
        ]  # fmt: skip
        rows = [
            ([r["layer"], r["role"], r["granularity"], str(r["shape"]), r["cosine"], r["sqnr_db"], r["max_abs"],
              "" if r["worst_channel"] is None or r["worst_channel"] != r["worst_channel"] else str(int(r["worst_channel"])),
              r["worst_channel_cosine"]], None)
            for _, r in result.weights.iterrows()
        ]  # fmt: skip
        console.print(FitTable("weights (float vs dequantized)", cols, rows, levels=3))
    if args.json:
        result.to_json(args.json)
    if args.csv:
        result.to_csv(args.csv)
    write_reports(args, result, "compare")
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qdiff.render import sensitivity_renderable
    from qdiff._sensitivity import sensitivity

    from qdiff.cli_report import write_reports

    _check_outputs(args, "sensitivity")
    with _progress("measuring") as progress:
        result = sensitivity(
            args.float_model,
            args.quant_model,
            data=args.data,
            by=args.by,
            gain=not args.no_gain,
            gain_top=args.gain_top,
            eval=args.eval,
            samples=args.samples,
            batch_size=args.batch_size,
            seed=args.seed,
            input_shapes=args.input_shape,
            provider=args.provider,
            tensor_map=args.map,
            progress=(lambda phase, done, total: progress(done, total)) if progress else None,
        )
    Console(width=None if sys.stdout.isatty() else 160).print(sensitivity_renderable(result, top=args.top))
    if args.json:
        result.to_json(args.json)
    if args.csv:
        result.to_csv(args.csv)
    write_reports(args, result, "sensitivity")
    return 0


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from qdiff.config import save_config
    from qdiff._quantize import init_config

    if args.config_command != "init":
        print("qdiff: error: use 'qdiff config init FLOAT -o config.json'", file=sys.stderr)
        return 2
    _check_writable(args.output, "-o", args)
    config = init_config(args.float_model, quant_format=args.format)
    config.weight_quant_params["per_channel"] = not args.per_tensor
    save_config(config, args.output)
    print(f"wrote {args.output}: {len(config.layers)} quantizable layers, all enabled")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from qdiff.config import load_config
    from qdiff._quantize import init_config, quantize

    _check_writable(args.output, "-o", args)
    config = load_config(args.config) if args.config else init_config(args.float_model)
    report = quantize(args.float_model, config, args.calib, args.output)
    print(
        f"wrote {report.path}: {report.size_bytes} bytes (float {report.float_size_bytes}), "
        f"{len(report.excluded)} layer(s) left in float, {report.calibration_samples} calibration samples"
    )
    from qdiff.render import clean

    for w in report.warnings:
        print(f"warning: {clean(w)}")
    return 0


def _fallback(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from qdiff._fallback import fallback
    from qdiff.render import fallback_renderable

    out = Path(args.outdir)
    _check_outdir(args)
    from qdiff.cli_report import check_report_options, write_reports

    check_report_options(args, "fallback")
    console = Console(width=None if sys.stdout.isatty() else 160)
    with _progress("fallback") as progress:
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
                progress=(lambda n, v: progress(n, None)) if progress else None,
            )
        except KeyboardInterrupt:
            print(f"qdiff: interrupted; the best result so far is in {out}", file=sys.stderr)
            return 130
    console.print(fallback_renderable(result))
    write_reports(args, result, "fallback")
    return 0 if result.reached else 1


def _calib_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qdiff.config import load_config, save_config
    from qdiff._quantize import calib_sweep

    _check_writable(args.output, "-o", args)
    config, table, notes = calib_sweep(
        args.float_model,
        args.calib,
        config=load_config(args.config) if args.config else None,
        eval_data=args.eval_data,
        samples=args.samples,
    )
    from qdiff.render import Col, FitTable, _num, cell

    cols = [Col(str(c), _num(6, 4)) if table[c].map(lambda v: isinstance(v, float)).all() else Col(str(c), text=True)
            for c in table.columns]  # fmt: skip
    rows = [(list(r), None) for _, r in table.iterrows()]
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(FitTable("isolated cosine per layer and calibration method", cols, rows, levels=2))
    for n in notes:
        console.print(cell(f"note: {n}"))
    save_config(config, args.output)
    console.print(cell(f"wrote {args.output} (default method {config.activation_quant_params['calibration_method']})"))
    return 0


def _export(args: argparse.Namespace) -> int:
    from qdiff._io import write_atomic
    from qdiff.config import load_config
    from qdiff._quantize import export_skip_list

    _check_writable(args.output, "-o", args)
    text = export_skip_list(load_config(args.config), args.to, model=args.model)
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def _match(args: argparse.Namespace) -> int:
    from rich.console import Console

    import qdiff
    from qdiff.render import alignment_renderable

    if args.output and not args.output.lower().endswith((".json", ".csv")):
        raise UsageError(f"-o {args.output}: give a .json or .csv file name")
    _check_writable(args.output, "-o", args)
    alignment = qdiff.match(args.float_model, args.quant_model, tensor_map=args.map)
    Console(width=None if sys.stdout.isatty() else 160).print(alignment_renderable(alignment))
    if args.output:
        if args.output.lower().endswith(".csv"):
            alignment.to_csv(args.output)
        else:
            alignment.to_json(args.output)
    return 0


def _check_outputs(args: argparse.Namespace, kind: str) -> None:
    """Validate --top and every output file option before the (long) run starts."""
    from qdiff.cli_report import check_report_options
    if args.top is not None and args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    for opt in ("csv", "json"):
        _check_writable(getattr(args, opt), f"--{opt}", args)
    check_report_options(args, kind)


def _check_outdir(args: argparse.Namespace) -> None:
    """fallback's -o OUTDIR: a folder (or a new name in one) that can be written, whose
    config.json, model.int8.onnx and history.csv are regular files or absent and no input file."""
    from pathlib import Path

    from qdiff._io import check_folder, check_output

    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {args.outdir} exists and is not a folder; give a folder name")
    if not out.exists():
        check_folder(out.parent if str(out.parent) else Path("."), f"-o {args.outdir}:")  # OUTDIR can be made there
        return
    check_folder(out, f"-o {args.outdir}:")
    inputs = [p for p in _input_paths(args) if p != getattr(args, "config", None)]  # --config may live there
    for name in ("config.json", "model.int8.onnx", "history.csv"):
        check_output(out / name, f"-o {args.outdir}:", inputs=inputs)


def console() -> Any:
    """The rich Console commands print to (160 columns when stdout is not a terminal)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def check_writable(path: str | None, option: str, args: argparse.Namespace | None = None) -> None:
    """Public name of :func:`_check_writable` for command modules."""
    _check_writable(path, option, args)


#: the options (argparse ``dest``) naming files or folders a command reads
_INPUT_OPTIONS = ("models", "float_model", "quant_model", "quant_only", "data", "map", "config", "calib", "eval_data")


def _input_paths(args: argparse.Namespace | None) -> list[str]:
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


def _check_writable(path: str | None, option: str, args: argparse.Namespace | None = None) -> None:
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
    check_output(path, option, inputs=_input_paths(args))
    if args is not None:
        mine = os.path.realpath(path)
        for other, dest in _OUTPUT_OPTIONS:
            value = getattr(args, dest, None)
            if other != option and isinstance(value, str) and value and os.path.realpath(value) == mine:
                raise UsageError(f"{option} and {other} both name {path}; give each output its own file")


#: every option naming an output file (option, argparse ``dest``)
_OUTPUT_OPTIONS = (("--json", "json"), ("--csv", "csv"), ("--html", "html"), ("--node-data", "node_data"), ("-o", "output"))


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Any]:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
