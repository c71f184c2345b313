"""The ``qdiff diagnose`` and ``qdiff profile`` commands, and their terminal renderables.

Plugged into ``qdiff.cli`` through ``_EXTRA_COMMANDS``: :func:`register` adds the two parsers,
each handler parses nothing itself, calls the public API and renders. rich is imported only when
rendering.

Exit status: 0 when the run finished, whatever it found (findings are output, not failures);
with ``--fail-on error`` (or ``warning``) 1 when a finding at least that severe exists, for CI;
2 for user errors (bad paths, data, options), like every qdiff command.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qdiff._diagnose import DiagnoseResult
    from qdiff._profile import ProfileResult

__all__ = ["register", "diagnose_renderable", "profile_renderable"]

_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def register(subparsers: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``diagnose`` and ``profile`` to the ``qdiff`` command's subparsers."""
    from qdiff.cli import add_input_options
    from qdiff._diagnose import CHECKS

    d = subparsers.add_parser(
        "diagnose",
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
    d.set_defaults(func=_diagnose)

    p = subparsers.add_parser(
        "profile",
        help="per-layer latency of the float and the quantized model (onnxruntime profiler)",
        description="Run both models untapped with onnxruntime's profiler, attribute each kernel's time to a float "
        "layer and show which layers got slower after quantization and how much time Q/DQ and Cast nodes take.",
    )
    p.add_argument("float_model", metavar="FLOAT")
    p.add_argument("quant_model", metavar="INT8")
    add_input_options(p, samples_default=8, samples_help="timed runs per model (default 8)", batch_size=False)
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed runs per model first (default 2)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="intra-op threads (default 0: every core)")
    p.add_argument("--json", metavar="FILE", help='write {"layers", "summary", "findings", "nodes", "meta"} as JSON')
    p.add_argument("--csv", metavar="FILE", help="write the per-layer rows as CSV")
    p.set_defaults(func=_profile)


def _diagnose(args: argparse.Namespace) -> int:
    from qdiff.cli import check_writable, console
    from qdiff._diagnose import SEVERITIES, diagnose

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


def _profile(args: argparse.Namespace) -> int:
    from qdiff.cli import check_writable, console
    from qdiff._profile import profile

    check_writable(args.json, "--json", args)
    check_writable(args.csv, "--csv", args)
    result = profile(
        args.float_model,
        args.quant_model,
        args.data,
        samples=args.samples,
        warmup=args.warmup,
        seed=args.seed,
        input_shapes=args.input_shape,
        provider=args.provider,
        threads=args.threads,
    )
    console().print(profile_renderable(result))
    if args.json:
        result.to_json(args.json)
    if args.csv:
        result.to_csv(args.csv)
    return 0


# ---------------------------------------------------------------------------------------------
# Renderables
# ---------------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 1) -> str:
    from qdiff.render import _fmt

    return _fmt(v, digits, sci=False)


def findings_table(findings: list[Any], title: str) -> Any:
    """A rich Table of findings: severity, check, layer, message, suggestion."""
    from rich.table import Table

    from qdiff.render import cell

    table = Table(title=cell(title), title_justify="left", header_style="bold", show_lines=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("layer", overflow="fold")
    table.add_column("what is wrong", overflow="fold", ratio=3)
    table.add_column("what to do", overflow="fold", ratio=2)
    for f in findings:
        table.add_row(
            *[cell(v) for v in (f.severity, f.check, f.layer or "-", f.message, f.suggestion or "")], style=_STYLE.get(f.severity)
        )
    return table


def frame_table(df: Any, title: str, max_rows: int = 60) -> Any:
    """A rich Table of a DataFrame (floats to 4 significant digits), at most ``max_rows`` rows."""
    from qdiff.render import Col, FitTable

    def number(v: Any, level: int) -> str:
        return "-" if math.isnan(v) else f"{v:.{4 if level == 0 else 3}g}"

    head = df.head(max_rows)
    cols = [
        Col(str(c), number) if head[c].map(lambda v: isinstance(v, float)).all() and len(head) else Col(str(c), text=True)
        for c in df.columns
    ]
    rows = [([v if isinstance(v, float) else ("" if v is None else str(v)) for v in r], None) for _, r in head.iterrows()]
    caption = f"{len(df) - max_rows} more row(s) in the JSON output" if len(df) > max_rows else None
    return FitTable(title, cols, rows, levels=2, caption=caption)


def diagnose_renderable(result: DiagnoseResult, *, tables: bool = False) -> Any:
    """A rich renderable of ``qdiff diagnose``: the findings, optionally each check's table, a summary."""
    from rich.console import Group
    from rich.text import Text

    meta = result.meta
    q = (meta.get("quant_model") or {}).get("name", "?")
    f = (meta.get("float_model") or {}).get("name")
    title = f"qdiff diagnose: {q}" + (f" (float: {f})" if f else "") + f" — {meta.get('model_kind', '?')} model"
    parts: list[Any] = [findings_table(result.findings, title)]
    if tables:
        for name, df in result.tables.items():
            if len(df):
                parts.append(frame_table(df, name))
    counts = result.counts()
    ran = [k for k, v in meta.get("checks", {}).items() if v.get("status") == "ran"]
    other = [f"{k} ({v['status']}: {v['reason']})" for k, v in meta.get("checks", {}).items() if v.get("status") != "ran"]
    lines = [
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info; checks run: {', '.join(ran) or 'none'}",
    ]  # printed through render._lines: control characters escaped, no markup
    if other:
        lines.append(f"not run: {', '.join(other)}")
    if meta.get("data"):
        lines.append(f"{meta['data']}, {meta.get('samples')} sample(s)")
    from qdiff.render import _lines

    return Group(*parts, _lines(lines))


def profile_renderable(result: ProfileResult) -> Any:
    """A rich renderable of ``qdiff profile``: per-layer times, the totals and the findings."""
    import pandas as pd
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    meta, s = result.meta, result.summary
    from qdiff.render import Col, FitTable, _lines

    title = f"qdiff profile: {meta['float_model']['name']} vs {meta['quant_model']['name']} — µs per run, median of {s['runs']} runs"
    cols = [
        Col("#"), Col("layer", text=True, floor=12), Col("op", text=True, floor=6),
        Col("float µs", lambda v, level: _num(v)), Col("quant µs", lambda v, level: _num(v)),
        Col("of which Q/DQ/Cast", lambda v, level: _num(v), drop=1), Col("ratio", lambda v, level: _num(v, 2)),
        Col("quantized kernels", text=True, floor=10),
    ]  # fmt: skip
    body = []
    for _, r in result.layers.iterrows():
        order = r["order"]
        pos = "" if order is None or pd.isna(order) else ("in" if order < 0 else str(int(order)))
        style = "yellow" if r["slower"] else ("dim" if r["kind"] == "runtime" else None)
        body.append((
            [pos, str(r["layer"]) + (" *" if r["slower"] else ""), str(r["op_type"] or ""), r["float_us"], r["quant_us"],
             r["conversion_us"], r["ratio"], str(r["quant_ops"] or "")],
            style,
        ))  # fmt: skip
    table = FitTable(title, cols, body, levels=2)
    speed = s.get("speedup")
    lines = [
        f"total per run, without profiling: float {_num(s['float_total_us'])} µs, quantized {_num(s['quant_total_us'])} µs"
        + (f" (speedup {speed:.2f}×)" if speed else ""),
        f"kernel time, profiled runs: float {_num(s['float_kernel_us'])} µs, quantized {_num(s['quant_kernel_us'])} µs, of which "
        f"Q/DQ/Cast {_num(s['conversion_us'])} µs ({100 * s['conversion_share']:.0f}%)",
        f"* slower after quantization: {s['layers_slower']} of {s['layers']} layers; timings are noisy, compare runs on one machine",
    ]
    parts: list[Any] = [table, _lines(lines)]
    if result.findings:
        parts.append(findings_table(result.findings, "findings"))
    return Group(*parts)
