"""``qdiff sensitivity``: rank layers by the error they cause."""

from __future__ import annotations

import argparse
from typing import Any

from qdiff.cli._common import add_input_options, add_report_options, check_outputs, console, progress, write_reports

NAME = "sensitivity"


def add_parser(subparsers: Any) -> None:
    s = subparsers.add_parser(
        NAME,
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


def run(args: argparse.Namespace) -> int:
    from qdiff._sensitivity import sensitivity
    from qdiff.render import sensitivity_renderable

    check_outputs(args, NAME)
    with progress("measuring") as bar:
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
            progress=(lambda phase, done, total: bar(done, total)) if bar else None,
        )
    console().print(sensitivity_renderable(result, top=args.top))
    if args.json:
        result.to_json(args.json)
    if args.csv:
        result.to_csv(args.csv)
    write_reports(args, result, NAME)
    return 0
