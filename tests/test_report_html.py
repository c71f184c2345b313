"""--html reports: self-contained pages, checked as text and in a real headless Chromium.

The browser tests drive Debian's ``/usr/bin/chromium`` (installed by ``scripts/install_chromium.sh``,
which ``make test`` runs) over the Chrome DevTools Protocol on ``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on file descriptors 3 (to the browser) and 4 (from it), so no
driver package and no network port are needed. Clicks and typing are real input events
(``Input.dispatchMouseEvent`` / ``Input.insertText``). They are skipped, with the reason, only when
Chromium is not installed.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import qdiff  # noqa: E402
from qdiff import report_html  # noqa: E402
from qdiff._fallback import HISTORY_COLUMNS, FallbackResult  # noqa: E402

CHROMIUM = os.environ.get("QDIFF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
    "--window-size=1280,900",
]  # fmt: skip
needs_chromium = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
    reason=f"Chromium is not installed at {CHROMIUM} (run scripts/install_chromium.sh as root, as 'make test' does)",
)


# -- results to report ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compare_result(samples_dir):
    result = qdiff.compare(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx",
        data=samples_dir / "digits_test.npz", samples=16,
    )  # fmt: skip
    # one layer below the 0.99 threshold and one without a value, so filtering and blank cells are exercised
    layers = result.layers.copy()
    layers.loc[layers["layer"] == "pool2", "cosine"] = 0.95
    layers.loc[layers["layer"] == "flatten", ["cosine", "note"]] = [np.nan, "no finite values"]
    unmatched = pd.DataFrame([{"name": "<b>odd</b>", "side": "float", "op_type": "Foo", "reason": "no counterpart & 'quoted'"}])
    return replace(result, layers=layers, unmatched=unmatched)


@pytest.fixture(scope="module")
def sens_result(samples_dir):
    return qdiff.sensitivity(
        samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx",
        data=samples_dir / "digits_test.npz", samples=4, gain=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fallback_result():
    rows = [
        (0, "start", "", 0, 0, "", 0.9990, False, 9000, 0.1, "", ""),
        (0, "baseline", "conv1 fc2", 2, 410, "first+last in float: conv1 fc2", 0.9993, False, 9500, 0.1, "", ""),
        (1, "bisect k=1", "fc1", 1, 2000, "+fc1", 0.9996, True, 15000, 0.1, "", ""),
    ]
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    return FallbackResult(True, 0.9996, ["fc1"], 2000, None, None, history, {"target": "cosine>=0.9995", "float_metric": 1.0})


@pytest.fixture(scope="module")
def pages(tmp_path_factory, compare_result, sens_result, fallback_result) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reports")
    out = {}
    for kind, text in (
        ("compare", report_html.compare_html(compare_result, command="qdiff compare f.onnx q.onnx --html r.html")),
        ("sensitivity", report_html.sensitivity_html(sens_result, command="qdiff sensitivity f.onnx q.onnx")),
        ("fallback", report_html.fallback_html(fallback_result, command="qdiff fallback f.onnx --target 'cosine>=0.9995'")),
    ):
        out[kind] = folder / f"{kind}.html"
        report_html.write_html(text, out[kind])
    return out


# -- the page as text -----------------------------------------------------------------------------


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.in_tbody = 0
        self.body_rows = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "tbody":
            self.in_tbody += 1
        if tag == "tr" and self.in_tbody and dict(attrs).get("data-flag") is not None:
            self.body_rows += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self.in_tbody -= 1


def _parse(path: Path) -> _Collect:
    p = _Collect()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_pages_are_self_contained(pages):
    for path in pages.values():
        text = path.read_text(encoding="utf-8")
        parsed = _parse(path)
        for tag, attrs in parsed.tags:
            for key in ("src", "href"):
                value = attrs.get(key)
                if value is not None:
                    assert value.startswith("data:"), f"{path.name}: <{tag} {key}={value[:60]!r}> is not inline"
        assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", text)
        assert "Content-Security-Policy" in text and "default-src 'none'" in text
        assert [t for t, _ in parsed.tags].count("script") == 1  # inline, no src


def test_compare_page_has_summary_table_plots_unmatched_and_run(pages, compare_result):
    text = pages["compare"].read_text(encoding="utf-8")
    parsed = _parse(pages["compare"])
    assert parsed.body_rows == len(compare_result.layers)  # one row per layer row of the result
    imgs = [a for t, a in parsed.tags if t == "img"]
    assert len(imgs) == 3 and all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    for section in ('id="summary"', 'id="plots"', 'id="rows"', 'id="unmatched"', 'id="run"', 'id="filter"', 'id="flagged"'):
        assert section in text
    assert "qdiff compare f.onnx q.onnx --html r.html" in text
    assert compare_result.meta["float_model"]["sha256"] in text
    assert compare_result.meta["onnxruntime_version"] in text


def test_text_is_escaped(pages):
    text = pages["compare"].read_text(encoding="utf-8")
    assert "<b>odd</b>" not in text and "&lt;b&gt;odd&lt;/b&gt;" in text
    assert "no counterpart &amp; &#x27;quoted&#x27;" in text


def test_sensitivity_and_fallback_pages_have_one_row_per_result_row(pages, sens_result, fallback_result):
    assert _parse(pages["sensitivity"]).body_rows == len(sens_result.layers)
    assert _parse(pages["fallback"]).body_rows == len(fallback_result.history)


# -- the page in Chromium -------------------------------------------------------------------------


class _Browser:
    """A headless Chromium driven over CDP on --remote-debugging-pipe (stdlib only)."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="qdiff-chromium-")
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()

        def child_fds() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=child_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_r)
        os.close(from_w)
        self._out = os.fdopen(to_w, "wb", buffering=0)
        self._in = os.fdopen(from_r, "rb", buffering=0)
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._in.read(1 << 16)
            if not chunk:
                self._messages.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                self._messages.put(json.loads(raw))

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True, timeout: float = 30) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self._out.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._messages.get(timeout=max(0.1, deadline - time.monotonic()))
            if reply is None:
                raise RuntimeError(f"Chromium closed the pipe during {method}")
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict[str, Any]:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self._messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg is None:
                raise RuntimeError("Chromium closed the pipe")
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(f"no {method} within {timeout} s")

    def open(self, path: Path) -> None:
        """A fresh tab on ``path``, loaded, with console and log events recorded from the start."""
        self.session = ""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")
        self.events.clear()
        self.call("Page.navigate", {"url": path.resolve().as_uri()})
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise AssertionError(f"JavaScript error in {expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view)."""
        box = self.js(
            f"(function(){{var e=document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block:'center'}});"
            "var r=e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2];})()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1})
        self.js("new Promise(function (r) { requestAnimationFrame(function () { r(0); }); })")

    def type_into(self, selector: str, text: str) -> None:
        self.click(selector)
        self.call("Input.insertText", {"text": text})

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} ({p['entry'].get('url', '')})")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except Exception:  # noqa: BLE001 - it is going away anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._out.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = _Browser()
    try:
        yield b
    finally:
        b.close()


_COLUMN_VALUES = """(function (key) {
  var ths = Array.prototype.slice.call(document.querySelectorAll('#rows thead th'));
  var col = ths.findIndex(function (th) { return th.getAttribute('data-key') === key; });
  return Array.prototype.map.call(document.querySelectorAll('#rows tbody tr'), function (tr) {
    return tr.cells[col].getAttribute('data-value'); });
})(%s)"""


def _numbers(values: list[str]) -> list[float]:
    return [float(v) if v != "" else math.nan for v in values]


def _is_sorted_with_blanks_last(values: list[float], reverse: bool) -> bool:
    finite = [v for v in values if not math.isnan(v)]
    blanks_last = all(math.isnan(v) for v in values[len(finite):])
    return blanks_last and finite == sorted(finite, reverse=reverse)


@needs_chromium
def test_compare_page_in_chromium(browser, pages, compare_result):
    browser.open(pages["compare"])
    assert browser.errors() == []
    assert browser.js("document.querySelectorAll('#rows tbody tr').length") == len(compare_result.layers)
    assert browser.js("Array.prototype.every.call(document.images, function (i) { return i.complete && i.naturalWidth > 0; })")
    n = len(compare_result.layers)
    assert browser.js("document.getElementById('count').textContent") == f"{n} of {n} rows"

    # sort by a numeric column: ascending, then descending; the blank cell stays last
    browser.click('#rows th[data-key="cosine"]')
    asc = _numbers(browser.js(_COLUMN_VALUES % json.dumps("cosine")))
    assert _is_sorted_with_blanks_last(asc, reverse=False) and asc[0] == 0.95
    assert browser.js("document.querySelector('#rows th[data-key=\"cosine\"]').getAttribute('aria-sort')") == "ascending"
    browser.click('#rows th[data-key="cosine"]')
    desc = _numbers(browser.js(_COLUMN_VALUES % json.dumps("cosine")))
    assert _is_sorted_with_blanks_last(desc, reverse=True)
    assert sorted(asc, key=str) == sorted(desc, key=str)  # same rows, reordered
    # numeric, not text, order: MSE spans several decades
    browser.click('#rows th[data-key="mse"]')
    mse = _numbers(browser.js(_COLUMN_VALUES % json.dumps("mse")))
    assert _is_sorted_with_blanks_last(mse, reverse=False)
    # a text column sorts alphabetically
    browser.click('#rows th[data-key="layer"]')
    names = browser.js(_COLUMN_VALUES % json.dumps("layer"))
    assert names == sorted(names, key=str.lower)

    visible = "Array.prototype.filter.call(document.querySelectorAll('#rows tbody tr'), function (r) { return !r.hidden; })"
    # the filter box hides rows whose layer / operator does not contain the text
    browser.type_into("#filter", "conv")
    shown = browser.js(f"{visible}.map(function (r) {{ return r.cells[1].textContent; }})")
    assert shown and all("conv" in s for s in shown)
    assert len(shown) == sum("conv" in str(x).lower() for x in compare_result.layers["layer"])
    browser.js("var f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input'));")
    # "below 0.99 only": the 0.95 row and the one without a value
    browser.click("#flagged")
    assert browser.js("document.getElementById('flagged').checked") is True
    shown = browser.js(f"{visible}.map(function (r) {{ return r.cells[1].textContent; }})")
    assert sorted(shown) == ["flatten", "pool2"]
    assert browser.errors() == []


@needs_chromium
@pytest.mark.parametrize("kind", ["sensitivity", "fallback"])
def test_other_pages_in_chromium(browser, pages, sens_result, fallback_result, kind):
    browser.open(pages[kind])
    assert browser.errors() == []
    rows = len(sens_result.layers) if kind == "sensitivity" else len(fallback_result.history)
    assert browser.js("document.querySelectorAll('#rows tbody tr').length") == rows
    key = "isolated_cosine" if kind == "sensitivity" else "metric"
    browser.click(f'#rows th[data-key="{key}"]')
    assert _is_sorted_with_blanks_last(_numbers(browser.js(_COLUMN_VALUES % json.dumps(key))), reverse=False)
    browser.click(f'#rows th[data-key="{key}"]')
    assert _is_sorted_with_blanks_last(_numbers(browser.js(_COLUMN_VALUES % json.dumps(key))), reverse=True)
    assert browser.errors() == []


@needs_chromium
def test_console_errors_are_caught(browser, tmp_path):
    # the check itself: a page that breaks the CSP and throws must be reported
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "script-src 'unsafe-inline'\"><link rel=\"icon\" href=\"data:,\"></head><body>"
        "<img src=\"https://example.invalid/x.png\"><script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    browser.open(bad)
    errors = browser.errors()
    assert any("boom" in e for e in errors)
    assert any(e.startswith("exception") for e in errors)
    assert any("example.invalid" in e for e in errors)  # a blocked fetch (the CSP) is an error too


# -- the command line -----------------------------------------------------------------------------


def _cli_has_report_options() -> bool:
    import contextlib
    import io

    from qdiff.cli import _build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _build_parser().parse_args(["compare", "f.onnx", "q.onnx", "--html", "r.html", "--node-data", "n.json"])
    except SystemExit:
        return False
    return True


@pytest.mark.skipif(not _cli_has_report_options(), reason="qdiff.cli does not register --html / --node-data (see qdiff.cli._common)")
def test_cli_writes_the_reports(samples_dir, tmp_path, capfd):
    from conftest import run_cli, strict_json_load

    html_path, nd_path = tmp_path / "report.html", tmp_path / "nodes.json"
    f, q = samples_dir / "digits_cnn.float.onnx", samples_dir / "digits_cnn.qdq_per_tensor.onnx"
    rc, _, err = run_cli(
        ["compare", f, q, "--data", samples_dir / "digits_test.npz", "--samples", "8", "--html", html_path, "--node-data", nd_path],
        capfd,
    )  # fmt: skip
    assert rc == 0, err
    text = html_path.read_text(encoding="utf-8")
    assert f"--html {html_path}" in text and 'id="rows"' in text
    assert strict_json_load(nd_path)["results"]["conv1"]["value"] > 0.99
    rc, _, err = run_cli(["sensitivity", f, q, "--samples", "4", "--no-gain", "--html", tmp_path / "s.html"], capfd)
    assert rc == 0, err
    assert (tmp_path / "s.html").read_text(encoding="utf-8").count("<img") == 2
    # a folder that does not exist is a user error before the run, and nothing is written
    rc, _, err = run_cli(["compare", f, q, "--html", tmp_path / "missing" / "r.html"], capfd)
    assert rc == 2 and "--html" in err
