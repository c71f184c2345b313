"""Renderables of ``qdiff diagnose`` (:class:`~qdiff._diagnose.DiagnoseResult`) and ``qdiff profile``
(:class:`~qdiff._profile.ProfileResult`), and the findings / DataFrame tables they share."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from qdiff.render.tables import Col, FitTable, _fmt, _lines, cell

if TYPE_CHECKING:
    from qdiff._diagnose import DiagnoseResult
    from qdiff._profile import ProfileResult

__all__ = ["diagnose_renderable", "profile_renderable", "findings_table", "frame_table"]

_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def _plain(v: Any, digits: int = 1) -> str:
    """A number with ``digits`` decimals, never scientific ('-' for missing)."""
    return _fmt(v, digits, sci=False)


def findings_table(findings: list[Any], title: str) -> Any:
    """A rich Table of findings: severity, check, layer, message, suggestion."""
    from rich.table import Table

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
    ]  # printed through _lines: control characters escaped, no markup
    if other:
        lines.append(f"not run: {', '.join(other)}")
    if meta.get("data"):
        lines.append(f"{meta['data']}, {meta.get('samples')} sample(s)")
    return Group(*parts, _lines(lines))


def profile_renderable(result: ProfileResult) -> Any:
    """A rich renderable of ``qdiff profile``: per-layer times, the totals and the findings."""
    import pandas as pd
    from rich.console import Group

    meta, s = result.meta, result.summary
    title = f"qdiff profile: {meta['float_model']['name']} vs {meta['quant_model']['name']} — µs per run, median of {s['runs']} runs"
    cols = [
        Col("#"), Col("layer", text=True, floor=12), Col("op", text=True, floor=6),
        Col("float µs", lambda v, level: _plain(v)), Col("quant µs", lambda v, level: _plain(v)),
        Col("of which Q/DQ/Cast", lambda v, level: _plain(v), drop=1), Col("ratio", lambda v, level: _plain(v, 2)),
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
        f"total per run, without profiling: float {_plain(s['float_total_us'])} µs, quantized {_plain(s['quant_total_us'])} µs"
        + (f" (speedup {speed:.2f}×)" if speed else ""),
        f"kernel time, profiled runs: float {_plain(s['float_kernel_us'])} µs, quantized {_plain(s['quant_kernel_us'])} µs, of which "
        f"Q/DQ/Cast {_plain(s['conversion_us'])} µs ({100 * s['conversion_share']:.0f}%)",
        f"* slower after quantization: {s['layers_slower']} of {s['layers']} layers; timings are noisy, compare runs on one machine",
    ]
    parts: list[Any] = [table, _lines(lines)]
    if result.findings:
        parts.append(findings_table(result.findings, "findings"))
    return Group(*parts)
