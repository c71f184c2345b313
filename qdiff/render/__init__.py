"""Terminal rendering of results with rich (imported only here, only when rendering)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qdiff.result import CompareResult

__all__ = ["compare_renderable", "alignment_renderable", "print_compare", "clean", "cell", "FitTable", "Col"]


def clean(text: Any) -> str:
    """``text`` safe to print on a terminal: control characters (ESC sequences, newlines, BEL,
    C1 codes, line/paragraph separators) become visible escapes such as ``\\x1b``, so a node name
    cannot move the cursor, recolour the terminal or break a one-line message."""
    import unicodedata

    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ord(ch) < 0x20:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)  # other non-printables (format characters, ...) render as nothing or a box
    return "".join(out)


def cell(value: Any) -> Any:
    """A table cell or title from a name or message: a rich ``Text`` (never parsed as markup, so
    ``[/bogus]`` or ``[link=...]`` in a node name prints as itself) with control characters escaped."""
    from rich.text import Text

    return Text(clean("" if value is None else value))


@dataclass(frozen=True)
class Col:
    """A column of a :class:`FitTable`.

    Attributes:
        header: the heading.
        fmt: ``(value, level) -> str``; level 0 is the widest form, higher levels shorter
            (numbers rounded to fewer digits). Default: ``str``.
        text: a name or note: it may fold; numbers never wrap nor get cropped.
        drop: from this level on the column is left out (narrow consoles); None: always shown.
        floor: the narrowest a text column may get before the next level is tried.
        justify: "left" or "right" (default: left for text, right for numbers).
    """

    header: str
    fmt: Callable[[Any, int], str] | None = None
    text: bool = False
    drop: int | None = None
    floor: int = 8
    justify: str | None = None


class FitTable:
    """A table that fits the console width by rounding numbers and leaving out the least important
    columns, never by cropping a number (rich crops no-wrap cells when a table is too wide: a
    cosine of 0.999895 would show as 0.9998). Rows are raw values; each level formats them anew.
    """

    def __init__(
        self, title: Any, columns: list[Col], rows: list[tuple[list[Any], str | None]], *, levels: int = 1,
        caption: str | None = None, show_lines: bool = False,
    ) -> None:  # fmt: skip
        self.title, self.columns, self.rows, self.levels = title, columns, rows, max(1, levels)
        self.caption, self.show_lines = caption, show_lines

    def _cells(self, level: int) -> tuple[list[Col], list[list[str]]]:
        keep = [i for i, c in enumerate(self.columns) if c.drop is None or level < c.drop]
        cols = [self.columns[i] for i in keep]
        body = [[self._fmt(self.columns[i], values[i], level) for i in keep] for values, _ in self.rows]
        return cols, body

    @staticmethod
    def _fmt(col: Col, value: Any, level: int) -> str:
        return clean(col.fmt(value, level) if col.fmt is not None else ("" if value is None else value))

    def min_width(self, level: int, *, fold: bool = True) -> int:
        """The narrowest this table gets at ``level`` with every number whole (and, with
        ``fold=False``, every name on one line)."""
        from rich.cells import cell_len

        cols, body = self._cells(level)
        total = 3 * len(cols) + 1  # one space of padding each side, one border between and around
        for j, col in enumerate(cols):
            widest = max([cell_len(col.header)] + [cell_len(r[j]) for r in body])
            total += min(widest, col.floor) if col.text and fold else widest
        return total

    def table(self, level: int = 0) -> Any:
        """The rich Table at ``level``."""
        from rich.table import Table

        cols, body = self._cells(level)
        table = Table(
            title=cell(self.title) if isinstance(self.title, str) else self.title, title_justify="left",
            header_style="bold", show_lines=self.show_lines, caption=self.caption,
        )  # fmt: skip
        for col in cols:
            table.add_column(
                col.header, justify=col.justify or ("left" if col.text else "right"),  # type: ignore[arg-type]
                no_wrap=not col.text, overflow="fold",
            )  # fmt: skip
        from rich.text import Text

        for cells, (_, style) in zip(body, self.rows):
            table.add_row(*[Text(c) for c in cells], style=style)
        return table

    def level_for(self, width: int) -> int:
        """The first level whose table fits ``width`` columns with names on one line, else the first
        that fits with names folded (the last level if none does)."""
        for fold in (False, True):  # names whole if some level allows it, else folded names
            for lv in range(self.levels):
                if self.min_width(lv, fold=fold) <= width:
                    return lv
        return self.levels - 1

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield self.table(self.level_for(options.max_width))


def _num(full: int, short: int | None = None, sci: bool = True) -> Callable[[Any, int], str]:
    """A number formatter for :class:`Col`: ``full`` decimals at level 0, ``short`` from level 1."""
    return lambda v, level: _fmt(v, full if level == 0 or short is None else short, sci)


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


def _lines(lines: list[str]) -> Any:
    """Summary lines as one Text, each line's control characters escaped."""
    from rich.text import Text

    return Text("\n".join(clean(line) for line in lines))


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


def alignment_renderable(alignment: Any) -> Any:
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


def sensitivity_renderable(result: Any, *, top: int | None = None) -> Any:
    """A rich renderable of ``qdiff sensitivity``: layers by rank, flagged ones marked."""
    from rich.console import Group
    from rich.text import Text

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


def fallback_renderable(result: Any) -> Any:
    """A rich renderable of ``qdiff fallback``: the history table and the outcome."""
    from rich.console import Group
    from rich.text import Text

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
