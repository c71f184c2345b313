"""``qdiff compare``: the float model and its quantized twin layer by layer."""

from __future__ import annotations

import argparse
from typing import Any

from qdiff.cli._common import add_input_options, add_report_options, check_outputs, console, progress, write_reports
from qdiff.errors import UsageError

NAME = "compare"


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


def _dask_client(address: str) -> Any:
    """A Dask client for ``--dask-scheduler`` (one-line errors when dask is missing or unreachable)."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--dask-scheduler needs Dask's distributed package: pip install 'qdiff[dask]'") from None
    try:
        return Client(address, timeout="5s")
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        raise UsageError(f"cannot reach the Dask scheduler at {address} ({type(exc).__name__}); check the address") from None


def add_parser(subparsers: Any) -> None:
    c = subparsers.add_parser(
        NAME,
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


def run(args: argparse.Namespace) -> int:
    import qdiff
    from qdiff.render import compare_renderable

    check_outputs(args, NAME)
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
        with progress("comparing") as bar:
            if args.quant_only:
                result = qdiff.compare_quant_only(args.quant_only, progress=bar, **kwargs)
            else:
                result = qdiff.compare(args.models[0], args.models[1], progress=bar, **kwargs)
    finally:
        if client is not None:
            client.close()
    out = console()
    out.print(compare_renderable(result, top=args.top))
    if args.weights:
        out.print(_weights_table(result))
    if args.json:
        result.to_json(args.json)
    if args.csv:
        result.to_csv(args.csv)
    write_reports(args, result, NAME)
    return 0


def _weights_table(result: Any) -> Any:
    """``--weights``: float vs dequantized weights, one row per weight."""
    from qdiff.render.tables import Col, FitTable, _num

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
    return FitTable("weights (float vs dequantized)", cols, rows, levels=3)
