"""Renderables of ``qdiff compare`` (:class:`~qdiff.result.CompareResult`) and ``qdiff match``
(:class:`~qdiff.result.Alignment`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from qdiff.render.tables import Col, FitTable, _fmt, _lines, _num, clean

if TYPE_CHECKING:
    from qdiff.result import Alignment, CompareResult

__all__ = ["compare_renderable", "print_compare", "alignment_renderable"]


def compare_renderable(result: CompareResult, *, top: int | None = None, highlight: int = 5) -> Any:
    """A rich renderable: the summary, the per-layer table, outputs and the unmatched list.

    Args:
        result: what ``qdiff.compare`` returned.
        top: show only the ``top`` worst layers, worst first (default: every layer in
            topological order).
        highlight: how many of the worst layers are marked.
    """
    from rich.console import Group
    from rich.text import Text

    from qdiff.result import COSINE_THRESHOLD

    layers = result.layers
    worst = set(result.worst(highlight)["layer"]) if len(layers) else set()
    rows = result.worst(top) if top else layers
    title = f"qdiff compare: {result.meta['float_model']['name']} vs {result.meta['quant_model']['name']}"
    if top:
        title += f" — {min(top, len(rows))} worst layers"
    columns = [
        Col("#"), Col("layer", text=True, floor=12), Col("op", text=True, floor=6),
        Col("cosine", _num(6, 4)), Col("worst cos", _num(6, 4), drop=2), Col("MSE", _num(4, 4)),
        Col("SQNR dB", _num(2, 1)), Col("KL", _num(4, 3), drop=2), Col("max abs", _num(4, 3), drop=3),
        Col("note", text=True, floor=6),
    ]  # fmt: skip
    body = []
    for _, r in rows.iterrows():
        bad = r["cosine"] < COSINE_THRESHOLD if not math.isnan(r["cosine"]) else True
        style = "bold red" if bad else ("yellow" if r["layer"] in worst else None)
        mark = " *" if r["layer"] in worst and r["kind"] != "input" else ""
        note = r["note"]
        if r["nan_quant"] or r["inf_quant"] or r["nan_float"] or r["inf_float"]:
            note = (note + " " if note else "") + (
                f"NaN/Inf float {r['nan_float']}/{r['inf_float']} quant {r['nan_quant']}/{r['inf_quant']}"
            )
        body.append((
            [str(r["order"]) if r["order"] >= 0 else "in", f"{r['layer']}{mark}", r["op_type"], r["cosine"],
             r["cosine_worst"], r["mse"], r["sqnr_db"], r["kl"], r["max_abs"], note],
            style,
        ))  # fmt: skip
    parts: list[Any] = []
    for w in result.meta.get("warnings", []):
        parts.append(Text(f"warning: {clean(w)}", style="bold red"))
    parts.append(FitTable(title, columns, body, levels=4))
    if len(result.outputs):
        out_cols = [
            Col("output", text=True, floor=12), Col("cosine", _num(6, 4)), Col("worst cos", _num(6, 4), drop=2),
            Col("SQNR dB", _num(2, 1)), Col("max abs", _num(4, 3)), Col("top-1 agreement", _num(4, 3)),
        ]  # fmt: skip
        out_rows = [
            ([r["float_tensor"], r["cosine"], r["cosine_worst"], r["sqnr_db"], r["max_abs"], r["top1_agreement"]], None)
            for _, r in result.outputs.iterrows()
        ]
        parts.append(FitTable("final outputs", out_cols, out_rows, levels=3))
    if len(result.unmatched):
        parts.append(_unmatched_table(f"unmatched ({len(result.unmatched)})", result.unmatched))
    s = result.summary()
    lines = [
        f"{s['layers_matched']} layers matched, {s['unmatched_float']} float and {s['unmatched_quant']} quantized "
        f"nodes unmatched, {s['samples']} samples",
        f"worst layer: {s['worst_layer']} (cosine {_fmt(s['worst_cosine'])}); "
        f"{s['below_threshold']} layer(s) below cosine {COSINE_THRESHOLD}",
        f"final-output cosine: {_fmt(s['output_cosine'])}"
        + (f", top-1 agreement {_fmt(s['top1_agreement'], 4)}" if s["top1_agreement"] is not None else ""),
    ]
    if s.get("random_inputs"):
        lines.append(
            f"inputs: {result.meta.get('data', 'random inputs')}, seeded normal values, not real data: the metrics may "
            "not reflect real inputs; pass --data with real samples"
        )
    diff = result.meta.get("tapped_vs_deployed_max_abs")
    if diff is not None and diff > 1e-6:
        lines.append(
            f"note: with its tensors tapped the quantized model's outputs differ from the untapped run by up to "
            f"{_fmt(diff, 4)} (onnxruntime fuses Q/DQ differently when intermediates are outputs)"
        )
    parts.append(_lines(lines))
    return Group(*parts)


def _unmatched_table(title: str, df: Any) -> Any:
    rows = [([r["side"], r["name"], r["op_type"], r["reason"]], None) for _, r in df.iterrows()]
    cols = [Col("side", text=True, floor=5), Col("name", text=True, floor=12), Col("op", text=True, floor=6),
            Col("reason", text=True, floor=12)]  # fmt: skip
    return FitTable(title, cols, rows)


def print_compare(result: CompareResult, *, console: Any = None, top: int | None = None) -> None:
    """Print :func:`compare_renderable` to ``console`` (a rich Console; stdout by default)."""
    from rich.console import Console

    console = console or Console()
    console.print(compare_renderable(result, top=top))


def alignment_renderable(alignment: Alignment) -> Any:
    """A rich renderable of ``qdiff match``: the pairs, then what stayed unmatched or was skipped."""
    from rich.console import Group
    from rich.text import Text

    meta = alignment.meta
    title = f"qdiff match: {meta['float_model']['name']} vs {meta['quant_model']['name']}"
    cols = [
        Col("#"), Col("float layer", text=True, floor=10), Col("op", text=True, floor=6),
        Col("float tensor", text=True, floor=10), Col("quantized tensor", text=True, floor=10),
        Col("how", text=True, floor=8), Col("confidence", lambda v, level: f"{v:.1f}"),
    ]  # fmt: skip
    rows = [
        ([str(r["order"]) if r["order"] >= 0 else "in", r["layer"], r["op_type"], r["float_tensor"], r["quant_tensor"],
          r["match"], r["confidence"]], None)
        for _, r in alignment.pairs.iterrows()
    ]  # fmt: skip
    parts: list[Any] = [FitTable(title, cols, rows)]
    for title, df in (("unmatched", alignment.unmatched), ("skipped (matched through, not compared)", alignment.skipped)):
        if len(df):
            parts.append(_unmatched_table(f"{title} ({len(df)})", df))
    n_float = int((alignment.unmatched["side"] == "float").sum()) if len(alignment.unmatched) else 0
    parts.append(Text(f"{len(alignment.pairs)} tensor pairs; {n_float} float nodes unmatched"))
    return Group(*parts)
