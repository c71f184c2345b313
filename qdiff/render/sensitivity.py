"""Renderable of ``qdiff sensitivity`` (:class:`~qdiff._sensitivity.SensitivityResult`)."""

from __future__ import annotations

from typing import Any

from qdiff.render.tables import Col, FitTable, _fmt, _lines, _num

__all__ = ["sensitivity_renderable"]


def sensitivity_renderable(result: Any, *, top: int | None = None) -> Any:
    """A rich renderable of ``qdiff sensitivity``: layers by rank, flagged ones marked."""
    from rich.console import Group

    meta = result.meta
    rows = result.layers.head(top) if top else result.layers
    title = f"qdiff sensitivity: {meta['float_model']['name']} vs {meta['quant_model']['name']} — ranked by {meta['by']}"
    cols = [
        Col("rank"), Col("layer", text=True, floor=12), Col("op", text=True, floor=6),
        Col("params", drop=3), Col("acc. cos", _num(6, 4)), Col("isol. cos", _num(6, 4)),
        Col("isol. SQNR", _num(2, 1), drop=2), Col("noise ratio", _num(2, 1), drop=2),
        Col("gain", _num(6, 4)), Col("solo drop", _num(6, 4), drop=3), Col("flags", text=True, floor=6),
    ]  # fmt: skip
    body = []
    for _, r in rows.iterrows():
        flags = r["flags"] or ""
        body.append((
            [str(r["rank"]), r["layer"], r["op_type"],
             "-" if r["params"] is None or r["params"] != r["params"] else str(int(r["params"])),
             r["accumulated_cosine"], r["isolated_cosine"], r["isolated_sqnr_db"], r["noise_ratio"], r["gain"],
             r["solo_drop"], flags],
            "bold red" if "cos<" in flags else None,
        ))  # fmt: skip
    table = FitTable(title, cols, body, levels=4)
    lines = [
        f"{meta['samples']} samples; final-output metric: {meta.get('metric', '-')}"
        + (f", quantized model {_fmt(meta.get('base_metric'))}" if meta.get("base_metric") is not None else "")
        + (f", float model {_fmt(meta.get('float_metric'))}" if meta.get("float_metric") is not None else ""),
        "gain: metric with only this layer kept in float minus the quantized model's; solo drop: loss with only this "
        "layer quantized; noise ratio: isolated MSE / (step²/12)",
    ]
    if meta.get("unmeasured"):
        lines.append(f"no isolated measurement for: {', '.join(meta['unmeasured'])}")
    return Group(table, _lines(lines))
