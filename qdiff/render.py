"""Terminal rendering of results with rich (imported only here, only when rendering)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qdiff.result import CompareResult

__all__ = ["compare_renderable", "alignment_renderable", "print_compare"]


def _fmt(v: Any, digits: int = 6, sci: bool = True) -> str:
    """A number for a table cell: '-' for missing/NaN, scientific for very large/small when ``sci``."""
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "-"
    if sci and (abs(f) >= 1e5 or (0 < abs(f) < 1e-3)):
        return f"{f:.2e}"
    return f"{f:.{digits}f}"


def compare_renderable(result: CompareResult, *, top: int | None = None, highlight: int = 5) -> Any:
    """A rich renderable: the summary, the per-layer table, outputs and the unmatched list.

    Args:
        result: what ``qdiff.compare`` returned.
        top: show only the ``top`` worst layers, worst first (default: every layer in
            topological order).
        highlight: how many of the worst layers are marked.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from qdiff.result import COSINE_THRESHOLD

    layers = result.layers
    worst = set(result.worst(highlight)["layer"]) if len(layers) else set()
    rows = result.worst(top) if top else layers
    title = f"qdiff compare: {result.meta['float_model']['name']} vs {result.meta['quant_model']['name']}"
    if top:
        title += f" — {min(top, len(rows))} worst layers"
    table = Table(title=title, title_justify="left", header_style="bold")
    for col, justify in [
        ("#", "right"), ("layer", "left"), ("op", "left"), ("cosine", "right"), ("worst cos", "right"),
        ("MSE", "right"), ("SQNR dB", "right"), ("KL", "right"), ("max abs", "right"), ("note", "left"),
    ]:  # fmt: skip
        table.add_column(col, justify=justify, overflow="fold", no_wrap=col not in ("note",))
    for _, r in rows.iterrows():
        bad = r["cosine"] < COSINE_THRESHOLD if not math.isnan(r["cosine"]) else True
        style = "bold red" if bad else ("yellow" if r["layer"] in worst else None)
        mark = " *" if r["layer"] in worst and r["kind"] != "input" else ""
        note = r["note"]
        if r["nan_quant"] or r["inf_quant"] or r["nan_float"] or r["inf_float"]:
            note = (note + " " if note else "") + (
                f"NaN/Inf float {r['nan_float']}/{r['inf_float']} quant {r['nan_quant']}/{r['inf_quant']}"
            )
        table.add_row(
            str(r["order"]) if r["order"] >= 0 else "in",
            f"{r['layer']}{mark}",
            r["op_type"],
            _fmt(r["cosine"]),
            _fmt(r["cosine_worst"]),
            _fmt(r["mse"], 4),
            _fmt(r["sqnr_db"], 2),
            _fmt(r["kl"], 4),
            _fmt(r["max_abs"], 4),
            note,
            style=style,
        )
    parts: list[Any] = []
    for w in result.meta.get("warnings", []):
        parts.append(Text(f"warning: {w}", style="bold red"))
    parts.append(table)
    if len(result.outputs):
        out = Table(title="final outputs", title_justify="left", header_style="bold")
        for col in ("output", "cosine", "worst cos", "SQNR dB", "max abs", "top-1 agreement"):
            out.add_column(col, justify="left" if col == "output" else "right")
        for _, r in result.outputs.iterrows():
            out.add_row(
                r["float_tensor"], _fmt(r["cosine"]), _fmt(r["cosine_worst"]), _fmt(r["sqnr_db"], 2),
                _fmt(r["max_abs"], 4), _fmt(r["top1_agreement"], 4),
            )  # fmt: skip
        parts.append(out)
    if len(result.unmatched):
        um = Table(title=f"unmatched ({len(result.unmatched)})", title_justify="left", header_style="bold")
        for col in ("side", "name", "op", "reason"):
            um.add_column(col, overflow="fold")
        for _, r in result.unmatched.iterrows():
            um.add_row(r["side"], r["name"], r["op_type"], r["reason"])
        parts.append(um)
    s = result.summary()
    lines = [
        f"{s['layers_matched']} layers matched, {s['unmatched_float']} float and {s['unmatched_quant']} quantized "
        f"nodes unmatched, {s['samples']} samples",
        f"worst layer: {s['worst_layer']} (cosine {_fmt(s['worst_cosine'])}); "
        f"{s['below_threshold']} layer(s) below cosine {COSINE_THRESHOLD}",
        f"final-output cosine: {_fmt(s['output_cosine'])}"
        + (f", top-1 agreement {_fmt(s['top1_agreement'], 4)}" if s["top1_agreement"] is not None else ""),
    ]
    diff = result.meta.get("tapped_vs_deployed_max_abs")
    if diff is not None and diff > 1e-6:
        lines.append(
            f"note: with its tensors tapped the quantized model's outputs differ from the untapped run by up to "
            f"{_fmt(diff, 4)} (onnxruntime fuses Q/DQ differently when intermediates are outputs)"
        )
    parts.append(Text("\n".join(lines)))
    return Group(*parts)


def print_compare(result: CompareResult, *, console: Any = None, top: int | None = None) -> None:
    """Print :func:`compare_renderable` to ``console`` (a rich Console; stdout by default)."""
    from rich.console import Console

    console = console or Console()
    console.print(compare_renderable(result, top=top))


def alignment_renderable(alignment: Any) -> Any:
    """A rich renderable of ``qdiff match``: the pairs, then what stayed unmatched or was skipped."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    meta = alignment.meta
    table = Table(
        title=f"qdiff match: {meta['float_model']['name']} vs {meta['quant_model']['name']}",
        title_justify="left",
        header_style="bold",
    )
    for col in ("#", "float layer", "op", "float tensor", "quantized tensor", "how", "confidence"):
        table.add_column(col, no_wrap=col in ("#", "how", "confidence"), overflow="fold")
    for _, r in alignment.pairs.iterrows():
        table.add_row(
            str(r["order"]) if r["order"] >= 0 else "in", r["layer"], r["op_type"], r["float_tensor"],
            r["quant_tensor"], r["match"], f"{r['confidence']:.1f}",
        )  # fmt: skip
    parts: list[Any] = [table]
    for title, df in (("unmatched", alignment.unmatched), ("skipped (matched through, not compared)", alignment.skipped)):
        if len(df):
            t = Table(title=f"{title} ({len(df)})", title_justify="left", header_style="bold")
            for col in ("side", "name", "op", "reason"):
                t.add_column(col, overflow="fold")
            for _, r in df.iterrows():
                t.add_row(r["side"], r["name"], r["op_type"], r["reason"])
            parts.append(t)
    n_float = int((alignment.unmatched["side"] == "float").sum()) if len(alignment.unmatched) else 0
    parts.append(Text(f"{len(alignment.pairs)} tensor pairs; {n_float} float nodes unmatched"))
    return Group(*parts)


def sensitivity_renderable(result: Any, *, top: int | None = None) -> Any:
    """A rich renderable of ``qdiff sensitivity``: layers by rank, flagged ones marked."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    meta = result.meta
    rows = result.layers.head(top) if top else result.layers
    table = Table(
        title=f"qdiff sensitivity: {meta['float_model']['name']} vs {meta['quant_model']['name']} — ranked by {meta['by']}",
        title_justify="left",
        header_style="bold",
    )
    for col in ("rank", "layer", "op", "params", "acc. cos", "isol. cos", "isol. SQNR", "noise ratio", "gain", "solo drop", "flags"):
        table.add_column(col, justify="left" if col in ("layer", "op", "flags") else "right", no_wrap=col != "flags")
    for _, r in rows.iterrows():
        flags = r["flags"] or ""
        style = "bold red" if "cos<" in flags else None
        table.add_row(
            str(r["rank"]), r["layer"], r["op_type"], "-" if r["params"] is None or r["params"] != r["params"] else str(int(r["params"])),
            _fmt(r["accumulated_cosine"]), _fmt(r["isolated_cosine"]), _fmt(r["isolated_sqnr_db"], 2),
            _fmt(r["noise_ratio"], 2), _fmt(r["gain"], 6), _fmt(r["solo_drop"], 6), flags, style=style,
        )  # fmt: skip
    lines = [
        f"{meta['samples']} samples; final-output metric: {meta.get('metric', '-')}"
        + (f", quantized model {_fmt(meta.get('base_metric'))}" if meta.get("base_metric") is not None else "")
        + (f", float model {_fmt(meta.get('float_metric'))}" if meta.get("float_metric") is not None else ""),
        "gain: metric with only this layer kept in float minus the quantized model's; solo drop: loss with only this "
        "layer quantized; noise ratio: isolated MSE / (step²/12)",
    ]
    if meta.get("unmeasured"):
        lines.append(f"no isolated measurement for: {', '.join(meta['unmeasured'])}")
    return Group(table, Text("\n".join(lines)))


def fallback_renderable(result: Any) -> Any:
    """A rich renderable of ``qdiff fallback``: the history table and the outcome."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title="qdiff fallback history", title_justify="left", header_style="bold")
    for col in ("round", "step", "layers in float", "metric", "target", "size (bytes)", "seconds", "changed / note"):
        table.add_column(col, overflow="fold")
    for _, r in result.history.iterrows():
        note = " ".join(x for x in (r["changed"], r["note"]) if x)
        table.add_row(
            str(r["round"]), r["step"], str(r["n_float"]), _fmt(r["metric"]), "met" if r["target_met"] else "-",
            str(r["size_bytes"]), f"{r['seconds']:.2f}", note, style="green" if r["target_met"] else None,
        )  # fmt: skip
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
    return Group(table, Text("\n".join(lines)))
