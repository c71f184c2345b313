"""Renderable of ``qdiff fallback`` (:class:`~qdiff._fallback.FallbackResult`)."""

from __future__ import annotations

from typing import Any

from qdiff.render.tables import Col, FitTable, _fmt, _lines, _num

__all__ = ["fallback_renderable"]


def fallback_renderable(result: Any) -> Any:
    """A rich renderable of ``qdiff fallback``: the history table and the outcome."""
    from rich.console import Group

    cols = [
        Col("round"), Col("step", text=True, floor=6), Col("layers in float"), Col("metric", _num(6, 4)),
        Col("target", text=True, floor=4), Col("size (bytes)", drop=2), Col("seconds", lambda v, level: f"{v:.2f}", drop=2),
        Col("changed / note", text=True, floor=10),
    ]  # fmt: skip
    body = [
        ([str(r["round"]), r["step"], str(r["n_float"]), r["metric"], "met" if r["target_met"] else "-",
          str(r["size_bytes"]), r["seconds"], " ".join(x for x in (r["changed"], r["note"]) if x)],
         "green" if r["target_met"] else None)
        for _, r in result.history.iterrows()
    ]  # fmt: skip
    table = FitTable("qdiff fallback history", cols, body, levels=3)
    b = result.baseline
    units = getattr(result, "units", 0)
    share = f" of {units} ({100 * len(result.float_layers) / units:.0f} %)" if units else ""
    lines = [
        f"target {b.get('target')}: {'reached' if result.reached else 'NOT reached'} with {len(result.float_layers)}{share} "
        f"layer(s) in float ({', '.join(result.float_layers) or 'none'}; {result.float_params} float parameters), "
        f"metric {_fmt(result.metric)}",
    ]
    if not result.reached and getattr(result, "tried", None):
        lines.append(f"tried in float: {', '.join(result.tried)}; the best it got is the metric above")
    for note in b.get("notes") or []:
        lines.append(f"note: {note}")
    if b.get("float_layers"):
        lines.append(
            f"baseline 'first and last layers in float' ({', '.join(b['float_layers'])}): metric {_fmt(b.get('metric'))}, "
            f"target {'met' if b.get('target_met') else 'not met'}"
        )
    if result.model_path is not None:
        lines.append(f"wrote {result.model_path.parent}/config.json, model.int8.onnx, history.csv")
    return Group(table, _lines(lines))
