"""Self-contained HTML reports of ``compare``, ``sensitivity`` and ``fallback`` results.

One file that works offline: inline CSS and vanilla JavaScript (no CDN, no network; a
Content-Security-Policy forbids any fetch), the plots as inline base64 PNGs rendered with
matplotlib's Agg canvas (never pyplot), every text HTML-escaped. Layout::

    title
    summary          headline figures, warnings and notes
    plots            qdiff.plot figures
    table            one row per result row; click a header to sort (numbers numerically,
                     blanks last), type to filter by layer / operator, a checkbox keeps only the
                     flagged rows (cosine below 0.99, target met, ...)
    unmatched        what could not be paired, and why
    run              the command, versions, model and data hashes, the full meta as JSON

The table is ``<table id="rows">``; each ``<td>`` carries ``data-value`` (the full-precision
number, or the text) which the sorting reads, and flagged rows carry ``data-flag="1"``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import platform
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from qdiff._io import write_atomic

__all__ = ["compare_html", "sensitivity_html", "fallback_html", "write_html"]

#: the columns the compare table shows (all of ``result.layers`` are in the JSON/CSV exports)
COMPARE_TABLE_COLUMNS = [
    "order", "layer", "op_type", "kind", "cosine", "cosine_worst", "mse", "sqnr_db", "sqnr_db_worst",
    "kl", "max_abs", "match", "confidence", "shape", "note",
]  # fmt: skip
SENSITIVITY_TABLE_COLUMNS = [
    "rank", "layer", "op_type", "order", "params", "accumulated_cosine", "isolated_cosine", "isolated_sqnr_db",
    "noise_ratio", "gain", "solo_drop", "flags", "note",
]  # fmt: skip
FALLBACK_TABLE_COLUMNS = [
    "round", "step", "n_float", "float_layers", "float_params", "changed", "metric", "target_met", "size_bytes",
    "seconds", "note",
]  # fmt: skip

_CSS = """
:root { --bad: #c62828; --ok: #2e7d32; --muted: #666; --line: #ddd; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.45em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin-top: 0; }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; } dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; }
.warn { color: var(--bad); } .note { color: var(--muted); }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .9em; }
.controls { margin: .6em 0; display: flex; gap: 1.2em; align-items: center; flex-wrap: wrap; }
.controls input[type=search] { padding: .3em .5em; min-width: 22em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: .25em .6em; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; background: #f5f5f5; position: sticky; top: 0; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; } table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
tr.flag td { color: var(--bad); } tr.good td { color: var(--ok); }
pre { background: #f7f7f7; padding: .8em; overflow: auto; max-height: 30em; font-size: 12px; }
code { font-size: 12px; }
"""

_JS = """
(function () {
  'use strict';
  var table = document.getElementById('rows');
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var headers = table.tHead.rows[0].cells;
  var filter = document.getElementById('filter');
  var flagged = document.getElementById('flagged');
  var count = document.getElementById('count');

  function cellValue(row, col, numeric) {
    var cell = row.cells[col];
    var raw = cell ? cell.getAttribute('data-value') : '';
    if (!numeric) { return raw === null ? '' : raw.toLowerCase(); }
    if (raw === null || raw === '') { return NaN; }
    return parseFloat(raw);
  }

  function sortBy(col) {
    var th = headers[col];
    var numeric = th.getAttribute('data-type') === 'num';
    var dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
    for (var i = 0; i < headers.length; i++) { headers[i].removeAttribute('aria-sort'); }
    th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.forEach(function (r, i) { r._pos = i; });
    rows.sort(function (a, b) {
      var x = cellValue(a, col, numeric), y = cellValue(b, col, numeric);
      if (numeric) {
        var xn = isNaN(x), yn = isNaN(y);
        if (xn || yn) { return xn === yn ? a._pos - b._pos : (xn ? 1 : -1); }
      }
      if (x < y) { return -dir; }
      if (x > y) { return dir; }
      return a._pos - b._pos;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }

  function applyFilter() {
    var q = filter ? filter.value.trim().toLowerCase() : '';
    var only = flagged ? flagged.checked : false;
    var shown = 0;
    Array.prototype.forEach.call(tbody.rows, function (r) {
      var text = (r.getAttribute('data-search') || '').toLowerCase();
      var ok = (q === '' || text.indexOf(q) !== -1) && (!only || r.getAttribute('data-flag') === '1');
      r.hidden = !ok;
      if (ok) { shown += 1; }
    });
    if (count) { count.textContent = shown + ' of ' + tbody.rows.length + ' rows'; }
  }

  Array.prototype.forEach.call(headers, function (th, i) {
    th.addEventListener('click', function () { sortBy(i); });
    th.setAttribute('title', 'click to sort');
  });
  if (filter) { filter.addEventListener('input', applyFilter); }
  if (flagged) { flagged.addEventListener('change', applyFilter); }
  applyFilter();
}());
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# -- public API -----------------------------------------------------------------------------------


def compare_html(result: Any, *, command: str | None = None, title: str | None = None) -> str:
    """The HTML report of a :class:`~qdiff.result.CompareResult`.

    Args:
        result: what ``qdiff.compare`` returned.
        command: the command line that produced it (shown at the bottom).
        title: the page title (default: ``qdiff compare: FLOAT vs QUANT``).

    Returns:
        The page, one self-contained string.
    """
    from qdiff import plot
    from qdiff.result import COSINE_THRESHOLD

    meta = result.meta
    title = title or f"qdiff compare: {_model_name(meta, 'float_model')} vs {_model_name(meta, 'quant_model')}"
    s = result.summary()
    summary = [
        ("layers matched", s["layers_matched"]),
        ("unmatched nodes", f"{s['unmatched_float']} float, {s['unmatched_quant']} quantized"),
        (f"layers below cosine {COSINE_THRESHOLD}", s["below_threshold"]),
        ("worst layer", f"{s['worst_layer']} (cosine {_fmt(s['worst_cosine'])})" if s["worst_layer"] else "-"),
        ("final-output cosine", _fmt(s["output_cosine"])),
        ("top-1 agreement", _fmt(s["top1_agreement"])),
        ("samples", s["samples"]),
    ]
    figures = [
        (lambda ax: plot.layer_error(result, "cosine", ax=ax), "cosine per layer; dashed: the 0.99 threshold"),
        (lambda ax: plot.layer_error(result, "sqnr_db", ax=ax), "SQNR (dB) per layer"),
        (lambda ax: plot.layer_error(result, "mse", ax=ax), "MSE per layer (log scale)"),
    ]
    layers = result.layers
    flags = [bool(c < COSINE_THRESHOLD) if not _isnan(c) else True for c in layers["cosine"]]
    table = _table(layers, COMPARE_TABLE_COLUMNS, flags, search_cols=("layer", "op_type", "kind"))
    unmatched = _unmatched_section(result.unmatched, meta.get("skipped"))
    outputs = _plain_table(result.outputs, ["layer", "float_tensor", "quant_tensor", "cosine", "sqnr_db", "max_abs", "top1_agreement"])
    extra = f"<h2 id=\"outputs-h\">final outputs</h2>{outputs}"
    return _page(
        title=title,
        subtitle="float vs quantized, layer by layer (rows in the float graph's topological order)",
        summary=summary,
        messages=_messages(meta),
        figures=figures,
        table=table,
        table_title="per-layer metrics",
        flag_label=f"cosine below {COSINE_THRESHOLD} only",
        after_table=extra + unmatched,
        meta=meta,
        command=command,
        n_items=len(layers),
    )


def sensitivity_html(result: Any, *, command: str | None = None, title: str | None = None, top: int = 20) -> str:
    """The HTML report of a :class:`~qdiff.SensitivityResult`.

    Args:
        result: what ``qdiff.sensitivity`` returned.
        command: the command line that produced it.
        title: the page title.
        top: layers in the ranking plot.
    """
    from qdiff import plot

    meta = result.meta
    title = title or f"qdiff sensitivity: {_model_name(meta, 'float_model')} vs {_model_name(meta, 'quant_model')}"
    layers = result.layers
    summary = [
        ("ranked by", meta.get("by", "-")),
        ("layers", len(layers)),
        ("most sensitive", str(layers.iloc[0]["layer"]) if len(layers) else "-"),
        ("final-output metric", meta.get("metric", "-")),
        ("quantized model", _fmt(meta.get("base_metric"))),
        ("float model", _fmt(meta.get("float_metric"))),
        ("samples", meta.get("samples", "-")),
    ]
    figures = [
        (lambda ax: plot.sensitivity_ranking(result, top=top, ax=ax), f"the {min(top, len(layers))} most sensitive layers"),
        (lambda ax: plot.accumulated_vs_isolated(result, ax=ax), "accumulated vs isolated error (1 − cosine, log)"),
    ]
    flags = ["cos<" in str(f) for f in layers["flags"]]
    table = _table(layers, SENSITIVITY_TABLE_COLUMNS, flags, search_cols=("layer", "op_type", "flags"))
    unmeasured = meta.get("unmeasured") or []
    failures = meta.get("gain_failures") or {}
    parts = ["<h2 id=\"unmatched-h\">not measured</h2>"]
    if unmeasured or failures:
        parts.append("<ul id=\"unmatched\">")
        parts += [f"<li>{_e(n)}: no isolated measurement</li>" for n in unmeasured]
        parts += [f"<li>{_e(k)}: {_e(v)}</li>" for k, v in failures.items()]
        parts.append("</ul>")
    else:
        parts.append("<p id=\"unmatched\" class=\"note\">every layer was measured</p>")
    return _page(
        title=title,
        subtitle="which layers cause the quantization error (rows ranked, most sensitive first)",
        summary=summary,
        messages=_messages(meta),
        figures=figures,
        table=table,
        table_title="per-layer sensitivity",
        flag_label="flagged cos<0.99 only",
        after_table="".join(parts),
        meta=meta,
        command=command,
        n_items=len(layers),
    )


def fallback_html(result: Any, *, command: str | None = None, title: str | None = None) -> str:
    """The HTML report of a :class:`~qdiff.FallbackResult`.

    Args:
        result: what ``qdiff._fallback.fallback`` returned.
        command: the command line that produced it.
        title: the page title.
    """
    from qdiff import plot

    b = result.baseline or {}
    title = title or "qdiff fallback"
    summary = [
        ("target", b.get("target", "-")),
        ("reached", "yes" if result.reached else "NO"),
        ("layers in float", f"{len(result.float_layers)}: {', '.join(result.float_layers) or 'none'}"),
        ("float parameters", result.float_params),
        ("metric", _fmt(result.metric)),
        ("float model metric", _fmt(b.get("float_metric"))),
        ("baseline: first and last layers in float",
         f"{', '.join(b['float_layers'])}: metric {_fmt(b.get('metric'))}, target {'met' if b.get('target_met') else 'not met'}"
         if b.get("float_layers") else "-"),
        ("models tried", len(result.history)),
    ]  # fmt: skip
    figures = [(lambda ax: plot.fallback_history(result, ax=ax), "metric of every model tried; green: target met")]
    history = result.history
    flags = [bool(x) for x in history["target_met"]]
    table = _table(history, FALLBACK_TABLE_COLUMNS, flags, search_cols=("step", "float_layers", "changed"), good=True)
    config = getattr(result, "config", None)
    after = "<h2 id=\"unmatched-h\">config</h2>"
    if config is not None:
        disabled = list(getattr(config, "disabled", []))
        after += f"<p>layers with <code>quant_enable: false</code>: {_e(', '.join(disabled) or 'none')}</p>"
        if result.model_path is not None:
            after += f"<p>written: <code>{_e(str(result.model_path.parent))}</code> (config.json, model.int8.onnx, history.csv)</p>"
    else:
        after += "<p class=\"note\">no config</p>"
    meta = _versions()
    meta.update({k: v for k, v in b.items()})
    return _page(
        title=title,
        subtitle="the fewest layers kept in float that meet the target (one row per model tried)",
        summary=summary,
        messages=[],
        figures=figures,
        table=table,
        table_title="history",
        flag_label="target met only",
        after_table=after,
        meta=meta,
        command=command,
        n_items=len(history),
    )


def write_html(text: str, path: str | os.PathLike[str]) -> None:
    """Write a report atomically (no partial file on failure)."""
    write_atomic(path, text)


# -- building blocks ------------------------------------------------------------------------------


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _isnan(v: Any) -> bool:
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return v is None


def _fmt(v: Any, digits: int = 6) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "-"
    if isinstance(v, int) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") in "iu"):
        return str(int(f))
    if f != 0 and (abs(f) >= 1e5 or abs(f) < 1e-3):
        return f"{f:.3e}"
    return f"{f:.{digits}f}"


def _model_name(meta: dict[str, Any], key: str) -> str:
    m = meta.get(key) or {}
    return str(m.get("name", "?")) if isinstance(m, dict) else str(m)


def _is_numeric(series: pd.Series) -> bool:
    if series.dtype == bool:
        return False
    if series.dtype.kind in "fiu":
        return True
    vals = [v for v in series if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def _data_value(v: Any, numeric: bool) -> str:
    if numeric:
        if _isnan(v):
            return ""
        f = float(v)
        return repr(f) if math.isfinite(f) else ""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def _table(
    df: pd.DataFrame, columns: Sequence[str], flags: Sequence[bool], *, search_cols: Sequence[str], good: bool = False
) -> str:
    """The sortable, filterable table: one ``<tr>`` per DataFrame row, in the DataFrame's order."""
    cols = [c for c in columns if c in df.columns]
    numeric = {c: _is_numeric(df[c]) for c in cols}
    head = "".join(f'<th data-key="{_e(c)}" data-type="{"num" if numeric[c] else "text"}" scope="col">{_e(c)}</th>' for c in cols)
    rows = []
    records = df.to_dict(orient="records")
    for rec, flag in zip(records, flags):
        search = " ".join(str(rec.get(c, "")) for c in search_cols)
        cls = (" class=\"good\"" if good else " class=\"flag\"") if flag else ""
        cells = []
        for c in cols:
            v = rec.get(c)
            if numeric[c] or isinstance(v, bool):
                shown = _fmt(v)
            else:
                shown = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            td_cls = ' class="num"' if numeric[c] else ""
            cells.append(f'<td{td_cls} data-value="{_e(_data_value(v, numeric[c]))}">{_e(shown)}</td>')
        rows.append(f'<tr data-flag="{1 if flag else 0}" data-search="{_e(search)}"{cls}>{"".join(cells)}</tr>')
    return (
        f'<table id="rows" class="sortable"><thead><tr>{head}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>'
    )


def _plain_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    if not len(df):
        return '<p class="note">none</p>'
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for rec in df.to_dict(orient="records"):
        cells = "".join(
            f'<td class="num">{_e(_fmt(rec[c]))}</td>' if isinstance(rec[c], (int, float)) and not isinstance(rec[c], bool)
            else f"<td>{_e(rec[c])}</td>"
            for c in cols
        )  # fmt: skip
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _unmatched_section(unmatched: pd.DataFrame, skipped: Any) -> str:
    parts = ['<h2 id="unmatched-h">unmatched</h2>']
    if len(unmatched):
        parts.append('<div id="unmatched">' + _plain_table(unmatched, ["side", "name", "op_type", "reason"]) + "</div>")
    else:
        parts.append('<p id="unmatched" class="note">every node was paired</p>')
    if skipped:
        parts.append("<h3>skipped (matched through, not compared)</h3>")
        parts.append(_plain_table(pd.DataFrame(list(skipped)), ["side", "name", "op_type", "reason"]))
    return "".join(parts)


def _messages(meta: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("warn", str(w)) for w in meta.get("warnings") or []]
    out += [("note", str(n)) for n in meta.get("notes") or []]
    diff = meta.get("tapped_vs_deployed_max_abs")
    if diff:
        out.append(("note", f"the tapped quantized model differs from the deployed one by up to {diff:.3g} on the final outputs"))
    return out


def _figure_png(draw: Callable[[Any], Any], n_items: int = 0) -> str:
    """Render one plot on a fresh Agg figure (wider for many layers); the PNG as base64."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(max(8.5, 0.14 * n_items + 2.0), 20.0), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python_version": platform.python_version()}
    from qdiff import __version__

    out["qdiff_version"] = __version__
    for mod in ("onnx", "onnxruntime", "numpy", "matplotlib"):
        try:
            out[f"{mod}_version"] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional module is just not reported
            pass
    return out


def _run_section(meta: dict[str, Any], command: str | None) -> str:
    import matplotlib

    info = dict(meta)
    info.setdefault("matplotlib_version", matplotlib.__version__)
    rows = [("command", f"<code>{_e(command)}</code>" if command else "-")]
    for key in ("qdiff_version", "onnx_version", "onnxruntime_version", "numpy_version", "matplotlib_version", "python_version"):
        if key in info:
            rows.append((key.replace("_version", ""), _e(info[key])))
    for key in ("float_model", "quant_model"):
        m = info.get(key)
        if isinstance(m, dict):
            rows.append((key.replace("_", " "), f"{_e(m.get('name'))} <code>sha256 {_e(m.get('sha256'))}</code>"))
    if "data" in info:
        rows.append(("data", f"{_e(info['data'])} <code>sha256 {_e(info.get('data_sha256'))}</code>"))
    for key in ("samples", "seed", "batch_size"):
        if key in info:
            rows.append((key, _e(info[key])))
    if isinstance(info.get("session"), dict):
        rows.append(("provider", _e(info["session"].get("provider"))))
    rows.append(("generated", _e(_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows)
    full = json.dumps(meta, indent=2, default=str, allow_nan=True)
    return (
        f'<h2 id="run-h">run</h2><dl class="kv" id="run">{dl}</dl>'
        f"<details><summary>full meta (JSON)</summary><pre>{_e(full)}</pre></details>"
    )


def _page(
    *,
    title: str,
    subtitle: str,
    summary: list[tuple[str, Any]],
    messages: list[tuple[str, str]],
    figures: list[tuple[Callable[[Any], Any], str]],
    table: str,
    table_title: str,
    flag_label: str,
    after_table: str,
    meta: dict[str, Any],
    command: str | None,
    n_items: int = 0,
) -> str:
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in summary)
    msgs = "".join(f'<p class="{_e(kind)}">{_e(kind)}: {_e(text)}</p>' for kind, text in messages)
    figs = []
    for draw, caption in figures:
        png = _figure_png(draw, n_items)
        figs.append(
            f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{png}"><figcaption>{_e(caption)}</figcaption></figure>'
        )
    controls = (
        '<div class="controls"><input id="filter" type="search" placeholder="filter by layer or operator" '
        'aria-label="filter rows">'
        f'<label><input id="flagged" type="checkbox"> {_e(flag_label)}</label><span id="count" class="note"></span></div>'
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        f'<h1>{_e(title)}</h1><p class="sub">{_e(subtitle)}</p>\n'
        f'<h2 id="summary-h">summary</h2><dl class="kv" id="summary">{dl}</dl>{msgs}\n'
        f'<h2 id="plots-h">plots</h2><div id="plots">{"".join(figs)}</div>\n'
        f'<h2 id="table-h">{_e(table_title)}</h2>{controls}<div class="scroll">{table}</div>\n'
        f"{after_table}\n"
        f"{_run_section(meta, command)}\n"
        f"<script>{_JS}</script>\n"
        "</body></html>\n"
    )
