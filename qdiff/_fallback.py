"""``fallback``: quantize, measure, keep the most sensitive units in float, re-quantize — until a target holds.

The candidates are *units* (:mod:`qdiff.units`): one compute layer (Conv, ConvTranspose, Gemm,
MatMul) with the weight-less quantized nodes that belong to it. Layout operators and weight-less
nodes are never candidates on their own. The loop::

    start config ──quantize──> measure ──> target met? ── yes ───────────────────────────┐
                                              │ no                                        │
                                              v                                           │
       rank the units of the best model so far: isolated error of every layer (one        │
       streaming pass through the shadow model), then the fallback gain of the top ones     │
       measured by re-quantizing with each kept in float (final-output cosine, cheap)      │
                                              │                                           │
       bisect over the ranking on top of the best model: float the top 1, 2, 4, ... units  │
       until the target holds, then binary-search the smallest count                       │
                                              │                                           │
       not met: re-rank from the best model, combine, repeat (stops when nothing improves)  │
                                              v                                           v
                        prune (always): re-enable float units, least useful first, in halving chunks,
                        while the target still holds (or, not reached, while the metric does not get worse)

Every candidate is quantized once by onnxruntime (the activation ranges are calibrated once and
reused: they depend on the float model and the data, not on which nodes are excluded) and
measured once (results cached by the set of float units). The search is monotone: each round
starts from the best model found so far. Every measurement is a row of ``history.csv``.

Files in OUTDIR, in the order they are written after each candidate: ``model.int8.onnx`` (the
best so far), ``history.csv`` (every candidate, with its model's SHA-256) and ``config.json``
last, each atomically; ``--resume`` reads config.json and the history, appends to the history and
re-measures nothing already in it. After a kill at any moment the config is that of the model,
except when the kill falls between the two writes (the model is then one row newer than the
config); resume checks the model's hash against the history and re-quantizes it from the config
when they differ.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

from qdiff import metrics
from qdiff._io import write_atomic, write_bytes_atomic
from qdiff._quantize import calibration_feeds, init_config, prepare_model, quantize
from qdiff._sensitivity import EvalFn, call_eval, load_eval, sensitivity
from qdiff.config import QuantConfig, load_config, save_config
from qdiff.engine.sessions import SessionFactory, SessionOptions, default_session_factory, feed_for
from qdiff.errors import ModelError, QdiffError, UsageError
from qdiff.graph import Graph, ModelLike, load_model
from qdiff.inputs import DataLike, input_specs, make_source
from qdiff.result import Result, _json_value, _records, json_safe
from qdiff.units import Unit, fallback_units

__all__ = ["fallback", "FallbackResult", "Target", "parse_target", "HISTORY_COLUMNS"]

log = logging.getLogger(__name__)

HISTORY_COLUMNS = [
    "round", "step", "float_layers", "n_float", "float_params", "changed", "metric", "target_met",
    "size_bytes", "seconds", "note", "model_sha256",
]  # fmt: skip

#: units whose fallback gain is measured (re-quantized) per round, after the isolated-error ranking
GAIN_CANDIDATES = 12


@dataclass(frozen=True)
class Target:
    """``cosine >= v`` (final-output cosine) or ``metric_drop <= v`` (float metric minus quantized, with --eval)."""

    kind: str
    value: float

    def met(self, value: float | None) -> bool:
        if value is None or math.isnan(value):
            return False
        return value >= self.value if self.kind == "cosine" else value <= self.value

    def better(self, a: float | None, b: float | None) -> bool:
        """Is measurement ``a`` better than ``b``?"""
        if a is None or math.isnan(a):
            return False
        if b is None or math.isnan(b):
            return True
        return a > b if self.kind == "cosine" else a < b

    def __str__(self) -> str:
        return f"{self.kind}{'>=' if self.kind == 'cosine' else '<='}{self.value:g}"


def parse_target(text: str) -> Target:
    """Parse ``cosine>=0.99`` or ``metric_drop<=0.01``."""
    m = re.fullmatch(r"\s*(cosine|metric_drop)\s*(>=|<=)\s*(\S+)\s*", text or "")
    value = None
    if m:
        try:
            value = float(m.group(3))
        except ValueError:
            value = None
    if not m or value is None or not math.isfinite(value):
        raise UsageError(f"--target '{text}' is not 'cosine>=VALUE' or 'metric_drop<=VALUE' with a finite number")
    kind, op = m.group(1), m.group(2)
    if (kind == "cosine") != (op == ">="):
        raise UsageError(f"--target '{text}': use cosine>=VALUE or metric_drop<=VALUE")
    if kind == "cosine" and not -1.0 <= value <= 1.0:
        raise UsageError(f"--target '{text}': a cosine lies in [-1, 1]")
    return Target(kind, value)


@dataclass
class FallbackResult(Result):
    """What the loop ended with.

    Attributes:
        reached: whether the target holds for ``config``.
        metric: the measured metric of ``config`` (cosine, or the metric drop with --eval).
        float_layers: the units kept in float (their compute node names).
        float_params: their weight parameters.
        config: the config written (``quant_enable: false`` on every node of the float units).
        model_path: OUTDIR/model.int8.onnx, or None without OUTDIR.
        history: one row per model measured (HISTORY_COLUMNS).
        baseline: the 'first and last layers in float' measurement, the float metric, the target.
        units: how many units the model has (the candidates).
        tried: the units the search floated at some point (what it tried, when not reached).
    """

    reached: bool
    metric: float | None
    float_layers: list[str]
    float_params: int
    config: QuantConfig
    model_path: Path | None
    history: pd.DataFrame
    baseline: dict[str, Any] = field(default_factory=dict)
    units: int = 0
    tried: list[str] = field(default_factory=list)

    _renderer = "fallback_renderable"
    _title = "qdiff fallback"

    def table(self) -> pd.DataFrame:
        """The history: one row per model measured (what ``to_csv`` writes)."""
        return self.history

    def to_dict(self) -> dict[str, Any]:
        """The outcome, the config as a dict, the history records and the baseline, JSON-safe."""
        return {
            "reached": bool(self.reached),
            "metric": _json_value(self.metric),
            "float_layers": list(self.float_layers),
            "float_params": int(self.float_params),
            "config": self.config.to_dict() if self.config is not None else None,
            "model_path": str(self.model_path) if self.model_path is not None else None,
            "history": _records(self.history),
            "baseline": json_safe(self.baseline),
            "units": int(self.units),
            "tried": list(self.tried),
        }


class _Runtime:
    """Where the loop runs onnxruntime: the provider (the quantizer's load checks, the ranking)
    and the session factory of the measurements (the default one on ``provider`` unless given)."""

    def __init__(self, provider: str = "CPUExecutionProvider", session_factory: SessionFactory | None = None):
        self.provider = provider
        self.session_factory = session_factory
        self.factory = session_factory or default_session_factory(SessionOptions(provider=provider))


class _Loop:
    """Quantize-and-measure with a cache, the history, the best so far, and OUTDIR kept current."""

    def __init__(self, fp, units: list[Unit], base: QuantConfig, feeds, measure, proxy, target: Target, outdir: Path | None, progress,
                 runtime: _Runtime | None = None):  # fmt: skip
        self.fp, self.feeds, self.measure, self.proxy, self.target = fp, feeds, measure, proxy, target
        self.runtime = runtime or _Runtime()
        self.units = {u.name: u for u in units}
        unit_nodes = {n for u in units for n in u.nodes}
        self.base = base
        self.extra = [n for n in base.disabled if n not in unit_nodes]  # the user's own exclusions, kept
        self.outdir = outdir
        self.progress = progress
        self.rows: list[dict[str, Any]] = []
        self.cache: dict[frozenset, float | None] = {}
        self.paths: dict[frozenset, Path] = {}
        self.best: tuple[frozenset, float | None] | None = None  # best metric
        self.best_met: tuple[frozenset, float | None] | None = None  # fewest units meeting the target
        self.written: frozenset | None = None
        self.tried: set[str] = set()
        self.notes: list[str] = []
        self.started = time.perf_counter()
        self.limit = len(units)  # --max-float-layers: larger sets are measured (the baseline) but never chosen
        self.reports: dict[frozenset, Any] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="qdiff-fallback-"))
        self.calibration = self.tmp / "calibration.json"

    # -- configs ---------------------------------------------------------------------------
    def config(self, floats: frozenset) -> QuantConfig:
        nodes = set(self.extra)
        for name in floats:
            nodes.update(self.units[name].nodes)
        return self.base.with_disabled(nodes)

    def floats_of(self, config: QuantConfig) -> frozenset:
        off = set(config.disabled)
        return frozenset(name for name in self.units if name in off)

    def params(self, floats) -> int:
        return sum(self.units[n].params for n in floats)

    def label(self, floats) -> str:
        return " ".join(sorted(floats, key=lambda n: self.units[n].order))

    # -- measuring -------------------------------------------------------------------------
    def model(self, floats: frozenset) -> Path:
        """The quantized model of ``floats`` (made once)."""
        if floats not in self.paths:
            path = self.tmp / f"candidate_{len(self.paths)}.onnx"
            report = quantize(
                self.fp, self.config(floats), None, path, feeds=self.feeds, calibration_cache=self.calibration,
                provider=self.runtime.provider,
            )  # fmt: skip
            self.reports[floats] = report
            self.paths[floats] = path
        return self.paths[floats]

    def evaluate(self, floats: frozenset, round_: int, step: str, changed: str = "") -> float | None:
        if floats in self.cache:
            return self.cache[floats]
        t0 = time.perf_counter()
        path = self.model(floats)
        value = self.measure(str(path))
        self.cache[floats] = value
        self.tried.update(floats)
        report = self.reports.get(floats)
        data = path.read_bytes()
        met = self.target.met(value)
        self.rows.append(
            {
                "round": round_,
                "step": step,
                "float_layers": self.label(floats),
                "n_float": len(floats),
                "float_params": self.params(floats),
                "changed": changed,
                "metric": value,
                "target_met": met,
                "size_bytes": len(data),
                "seconds": round(time.perf_counter() - t0, 3),
                "note": "; ".join(w for w in (report.warnings if report else []) if "weights were not quantized" not in w),
                "model_sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        eligible = len(floats) <= self.limit or floats == self.floats_of(self.base)  # a start config may exceed it
        if eligible and (self.best is None or self.target.better(value, self.best[1]) or (
            value == self.best[1] and len(floats) < len(self.best[0])
        )):  # fmt: skip
            self.best = (floats, value)
        if eligible and met and (
            self.best_met is None
            or (len(floats), self.params(floats)) < (len(self.best_met[0]), self.params(self.best_met[0]))
            or (len(floats) == len(self.best_met[0]) and self.target.better(value, self.best_met[1]))
        ):
            self.best_met = (floats, value)
        self.flush()
        if self.progress is not None:
            self.progress(len(self.rows), value)
        return value

    def chosen(self) -> tuple[frozenset, float | None] | None:
        return self.best_met if self.best_met is not None else self.best

    def flush(self) -> None:
        """OUTDIR: the chosen model, then the history, then its config (each atomically)."""
        if self.outdir is None:
            return
        chosen = self.chosen()
        if chosen is not None and chosen[0] != self.written and chosen[0] in self.paths:
            write_bytes_atomic(self.outdir / "model.int8.onnx", self.paths[chosen[0]].read_bytes())
        write_atomic(self.outdir / "history.csv", pd.DataFrame(self.rows, columns=HISTORY_COLUMNS).to_csv(index=False))
        if chosen is not None and chosen[0] != self.written:
            save_config(self.config(chosen[0]), self.outdir / "config.json")
            self.written = chosen[0]

    def resume(self, history: pd.DataFrame) -> None:
        """Take the rows of an earlier run: cached results, the best so far."""
        for rec in history.to_dict("records"):
            row = {c: rec.get(c) for c in HISTORY_COLUMNS}
            for c in ("float_layers", "changed", "note", "model_sha256", "step"):
                if not isinstance(row[c], str):
                    row[c] = ""
            self.rows.append(row)
            names = row["float_layers"].split()
            if not all(n in self.units for n in names):
                continue  # a row of another model or unit scheme: kept in the history, not reused
            floats = frozenset(names)
            value = None if row["metric"] is None or (isinstance(row["metric"], float) and math.isnan(row["metric"])) else float(row["metric"])
            self.cache[floats] = value
            self.tried.update(floats)
            if len(floats) > self.limit:
                continue
            if self.best is None or self.target.better(value, self.best[1]):
                self.best = (floats, value)
            if self.target.met(value) and (self.best_met is None or len(floats) < len(self.best_met[0])):
                self.best_met = (floats, value)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def fallback(
    float_model: ModelLike,
    calib: DataLike,
    *,
    target: Target | str,
    eval: str | EvalFn | None = None,  # noqa: A002
    eval_data: DataLike = None,
    config: QuantConfig | str | None = None,
    max_float_layers: int | None = None,
    outdir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    samples: int | None = 64,
    max_rounds: int = 8,
    gain_candidates: int = GAIN_CANDIDATES,
    time_budget: float | None = None,
    progress: Callable[[int, float | None], None] | None = None,
    provider: str = "CPUExecutionProvider",
    session_factory: SessionFactory | None = None,
) -> FallbackResult:
    """Keep as few units in float as possible so that ``target`` holds.

    Args:
        float_model: the float model.
        calib: calibration data (``config.batch_num`` samples are used).
        target: ``cosine>=V`` (mean final-output cosine on ``eval_data``) or ``metric_drop<=V``
            (with ``eval``: float metric minus quantized metric).
        eval: ``function(model_path) -> float``, higher is better, or its ``module:function`` /
            ``file.py:function`` name. Called on the float model first (to check it works and to
            get the float metric) and on every candidate.
        eval_data: data for the cosine measure and the ranking (default: ``calib``).
        config: the starting config (path or object); default: every layer enabled.
        max_float_layers: never keep more units than this in float.
        outdir: where model.int8.onnx, history.csv and config.json are written.
        resume: continue from ``outdir``: its config.json is the best so far and its history.csv
            is appended to (candidates in it are not measured again).
        samples: samples of ``eval_data`` per cosine measurement (and at most 16 for the ranking).
        max_rounds: rankings at most (each from the best model so far; a round that improves
            nothing ends the search).
        gain_candidates: units per round whose fallback gain is measured by re-quantizing, and
            then tried one at a time.
        time_budget: seconds after which no further unit is tried (the prune still runs).
        progress: called as ``progress(models_measured, last_metric)``.
        provider: onnxruntime execution provider of the measurements (ignored for them when
            ``session_factory`` is given; the quantizer's load check of each candidate uses it).
        session_factory: builds a session from a ModelProto (as :func:`qdiff.compare`'s); the
            cosine measurements and the ranking run on its sessions.

    Raises:
        UsageError, ModelError, DataError, EvalError, ProviderError: before OUTDIR is created or touched.
    """
    target = parse_target(target) if isinstance(target, str) else target
    if max_float_layers is not None and max_float_layers < 0:
        raise UsageError(f"--max-float-layers must be >= 0, got {max_float_layers}")
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        raise UsageError(f"--time-budget must be a positive number of seconds, got {time_budget}")
    eval_fn = load_eval(eval)
    if target.kind == "metric_drop" and eval_fn is None:
        raise UsageError("--target metric_drop<=... needs --eval MODULE:FUNCTION")
    runtime = _Runtime(provider, session_factory)
    loaded = load_model(float_model, role="float model")
    fp = prepare_model(loaded.proto).model
    _check_loads(runtime.factory, fp, loaded.label)
    out = Path(outdir) if outdir is not None else None
    history = None
    if resume:
        if out is None or not (out / "config.json").is_file():
            raise UsageError("--resume needs an OUTDIR holding config.json from an earlier run")
        base = load_config(out / "config.json")
        if (out / "history.csv").is_file():
            try:
                history = pd.read_csv(out / "history.csv")
            except Exception as exc:  # noqa: BLE001 - a damaged history is the user's to see
                raise UsageError(f"--resume: {out / 'history.csv'} cannot be read ({exc}); move it away to start afresh") from None
    elif isinstance(config, (str, os.PathLike)):
        base = load_config(config)
    elif config is None:
        base = init_config(fp)
    else:
        base = config
    names = {n.name for n in fp.graph.node}
    for name in list(base.layers):
        if name not in names:
            raise UsageError(f"config layer '{name}' is not a node of {loaded.label}; run 'qdiff config init' on this model")
    if not base.layers:
        base = init_config(fp, batch_num=base.batch_num, quant_format=base.quant_format,
                           activation_quant_params=base.activation_quant_params, weight_quant_params=base.weight_quant_params)  # fmt: skip
    units = fallback_units(fp)
    if not units:
        raise UsageError(f"{loaded.label} has no Conv, ConvTranspose, Gemm or MatMul layer to keep in float")
    feeds = calibration_feeds(fp, calib, base.batch_num)
    eval_source = eval_data if eval_data is not None else calib
    proxy = _cosine_measure(fp, eval_source, samples, runtime.factory)
    if target.kind == "metric_drop":
        float_metric = _float_metric(fp, eval_fn)  # the user's function runs once before OUTDIR exists
        measure = _drop_measure(eval_fn, float_metric)
    else:
        float_metric, measure = 1.0, proxy
    created = out is not None and not out.exists()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    loop = _Loop(fp, units, base, feeds, measure, proxy, target, out, progress, runtime)
    if max_float_layers is not None:
        loop.limit = max_float_layers
    try:
        if history is not None:
            loop.resume(history)
            _check_written(loop, out)
        return _search(loop, fp, units, target, eval_source, samples, max_float_layers, max_rounds, gain_candidates, float_metric, time_budget)
    except BaseException:
        # a failure before anything was measured (the quantizer refusing the start config, the
        # eval function failing on it) leaves no empty OUTDIR behind; after that, OUTDIR holds the
        # best so far, as after an interrupt
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        loop.close()


def _search(loop: _Loop, fp, units, target, eval_source, samples, max_float_layers, max_rounds, gain_candidates, float_metric, time_budget) -> FallbackResult:
    start = loop.floats_of(loop.base)
    loop.evaluate(start, 0, "start")
    first_last = _first_last(units)
    baseline: dict[str, Any] = {}
    earlier = [r for r in loop.rows if r["step"] == "baseline"]
    if earlier:  # resumed: the baseline of the first run (on its start config)
        value = earlier[0]["metric"]
        baseline = {"float_layers": earlier[0]["float_layers"].split(), "metric": value, "target_met": target.met(value)}
    elif first_last:
        floats = start | set(first_last)
        value = loop.evaluate(frozenset(floats), 0, "baseline", "first+last in float: " + " ".join(first_last))
        baseline = {"float_layers": first_last, "metric": value, "target_met": target.met(value)}
    limit = loop.limit
    deadline = None if time_budget is None else loop.started + time_budget
    rnd = 0
    gains: dict[str, float] = {}
    while loop.best_met is None and rnd < max_rounds:
        if deadline is not None and time.perf_counter() > deadline:
            loop.notes.append(f"time budget of {time_budget:g} s spent after {rnd} round(s)")
            break
        rnd += 1
        current, _ = loop.best
        if len(current) >= limit:
            break
        before = loop.best[1]
        ranking, round_gains = _rank(loop, current, eval_source, samples, gain_candidates, rnd)
        gains.update(round_gains)
        ranking = [u for u in ranking if u not in current][: limit - len(current)]
        if not ranking:
            break
        _bisect(loop, current, ranking, rnd, deadline)
        if loop.best_met is None and not target.better(loop.best[1], before):
            break  # this round improved nothing
    chosen = loop.chosen()
    if chosen is not None and chosen[0]:
        _prune(loop, chosen[0], rnd + 1, gains)
    loop.flush()
    floats, value = loop.chosen()
    names = sorted(floats, key=lambda n: loop.units[n].order)
    return FallbackResult(
        reached=loop.best_met is not None,
        metric=value,
        float_layers=names,
        float_params=loop.params(floats),
        config=loop.config(floats),
        model_path=(loop.outdir / "model.int8.onnx") if loop.outdir else None,
        history=pd.DataFrame(loop.rows, columns=HISTORY_COLUMNS),
        baseline={**baseline, "float_metric": float_metric, "target": str(target), "notes": loop.notes},
        units=len(units),
        tried=sorted(loop.tried, key=lambda n: loop.units[n].order),
    )


def _bisect(loop: _Loop, current: frozenset, ranking: list[str], rnd: int, deadline: float | None) -> int | None:
    """Smallest k such that floating the top-k ranked units on top of ``current`` meets the target.

    Doubling (1, 2, 4, ... units) until the target holds, then a binary search between the last
    two counts: O(log n) quantize-and-measure steps. A task metric is neither smooth nor monotone
    in k (more units in float can measure worse than fewer; an example in bench/RESULTS.md), so
    nothing is assumed from a trial but its own result: the best model so far is tracked
    separately, and the next round starts from it.
    """

    def trial(k: int) -> bool:
        floats = current | frozenset(ranking[:k])
        value = loop.evaluate(floats, rnd, f"bisect k={k}", "+" + " +".join(ranking[:k]))
        return loop.target.met(value)

    lo, k = 0, 1
    while True:
        if trial(k):
            hi = k
            break
        lo = k
        if k >= len(ranking) or (deadline is not None and time.perf_counter() > deadline):
            return None
        k = min(2 * k, len(ranking))
    while hi - lo > 1 and (deadline is None or time.perf_counter() <= deadline):
        mid = (lo + hi) // 2
        if trial(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _prune(loop: _Loop, floats: frozenset, rnd: int, gains: dict[str, float]) -> frozenset:
    """Re-enable float units, least useful first, while the result holds.

    Reached: units go back to int8 while the target still holds. Not reached: while the metric is
    no worse. Units are tried in chunks (half of them first, halving the chunk on a refusal, one
    at a time at the end), so a long float list that is mostly unneeded costs a few measurements,
    not one per unit.
    """
    current = floats
    value = loop.cache.get(current)
    order = sorted(current, key=lambda n: (gains.get(n, 0.0), loop.units[n].order))
    size = max(1, len(order) // 2)
    i = 0
    while i < len(order):
        chunk = [n for n in order[i : i + size] if n in current]
        if not chunk:
            i += size
            continue
        trial = current - set(chunk)
        before = len(loop.rows)
        v = loop.evaluate(trial, rnd, "prune", "-" + " -".join(chunk))
        keep = loop.target.met(v) if loop.target.met(value) else not loop.target.better(value, v)
        if keep:
            current, value = trial, v
            i += size
        elif size > 1:
            size = max(1, size // 2)
        else:
            if len(loop.rows) > before:
                row = loop.rows[-1]
                row["note"] = (row["note"] + "; " if row["note"] else "") + f"step back: {chunk[0]} stays float"
                loop.flush()
            i += 1
    return current


def _rank(loop: _Loop, current: frozenset, eval_source, samples, gain_candidates: int, rnd: int) -> tuple[list[str], dict[str, float]]:
    """Units not in ``current``, most useful to keep in float first.

    1. the isolated error of every layer of the current model (one pass through the shadow model),
       summed per unit as relative noise power (10^(-SQNR/10));
    2. for the ``gain_candidates`` worst units, the fallback gain measured by re-quantizing with
       that unit in float (final-output cosine against the float model);
    3. units with a measured positive gain first (among gains within 25 %, fewer parameters
       first), then the rest by isolated error.
    """
    model = loop.model(current)
    result = sensitivity(
        loop.fp, str(model), data=eval_source, samples=min(samples or 16, 16), gain=False,
        provider=loop.runtime.provider, session_factory=loop.runtime.session_factory,
    )  # fmt: skip
    unit_of = {n: u.name for u in loop.units.values() for n in u.nodes}
    noise: dict[str, float] = {}
    for rec in result.layers[["layer", "isolated_sqnr_db"]].to_dict("records"):
        sqnr = rec["isolated_sqnr_db"]
        if sqnr is None or not math.isfinite(sqnr):
            continue
        owners = {unit_of[n] for n in _nodes([rec["layer"]]) if n in unit_of}
        for o in owners:
            noise[o] = noise.get(o, 0.0) + 10 ** (-sqnr / 10)
    free = [n for n in loop.units if n not in current]
    by_noise = sorted(free, key=lambda n: (-noise.get(n, 0.0), loop.units[n].order))
    base_cos = loop.proxy(str(model))
    gains: dict[str, float] = {}
    for name in by_noise[:gain_candidates]:
        gains[name] = loop.proxy(str(loop.model(current | {name}))) - base_cos

    def key(name: str):
        g = gains[name]
        bucket = math.floor(math.log(g) / math.log(1.25)) if g > 0 else -(10**6)
        return (-bucket, loop.units[name].params, -g)

    positive = sorted((n for n in gains if gains[n] > 0), key=key)
    rest = [n for n in by_noise if n not in positive]
    log.info("round %d ranking: %s", rnd, ", ".join(f"{n} ({gains.get(n, float('nan')):.2e})" for n in positive[:10]))
    return positive + rest, gains


def _nodes(layers: list[str]) -> list[str]:
    """Float node names of layers (``conv1+relu1`` -> conv1, relu1; ``split:1`` -> split)."""
    out = []
    for layer in layers:
        for part in layer.split("+"):
            out.append(part.split(":")[0])
    return out


def _first_last(units: list[Unit]) -> list[str]:
    """The first and last units with weights (the usual 'keep first and last in float' advice)."""
    weighted = [u.name for u in units if u.params > 0]
    if not weighted:
        return []
    return list(dict.fromkeys([weighted[0], weighted[-1]]))


def _check_loads(factory: SessionFactory, model: onnx.ModelProto, label: str) -> None:
    try:
        factory(model)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's reason is the message
        raise ModelError(f"onnxruntime cannot load {label}: {str(exc).strip().splitlines()[0][:300]}") from None


def _check_written(loop: _Loop, out: Path) -> None:
    """After a kill between writing the model and the config, bring the model back in line."""
    floats = loop.floats_of(load_config(out / "config.json"))
    loop.written = floats
    want = [r["model_sha256"] for r in loop.rows if r["float_layers"] == loop.label(floats) and r["model_sha256"]]
    path = out / "model.int8.onnx"
    have = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    if want and have not in want:
        log.warning("model.int8.onnx is not the model of config.json (interrupted write); re-quantizing it")
        write_bytes_atomic(path, loop.model(floats).read_bytes())


def _float_metric(fp: onnx.ModelProto, eval_fn: EvalFn) -> float:
    with tempfile.TemporaryDirectory(prefix="qdiff-float-") as tmp:
        p = os.path.join(tmp, "float.onnx")
        onnx.save(fp, p)
        return call_eval(eval_fn, p, "the float model")


def _drop_measure(eval_fn: EvalFn, float_metric: float) -> Callable[[str], float]:
    def drop(path: str) -> float:
        return float_metric - call_eval(eval_fn, path, f"candidate {Path(path).name}")

    return drop


def _cosine_measure(fp: onnx.ModelProto, data: DataLike, samples: int | None, factory: SessionFactory) -> Callable[[str], float]:
    """Mean final-output cosine of a model against the float model on ``samples`` of ``data``
    (sessions from ``factory``)."""
    specs = input_specs(Graph(fp))
    batches = list(make_source(data, specs, samples=samples))
    if not batches:
        raise UsageError("the evaluation data holds no samples")
    fs = factory(fp)
    refs = [fs.run(None, feed_for(fs, b)) for b in batches]

    def cosine(path: str) -> float:
        try:
            qs = factory(onnx.load(path))
        except Exception as exc:  # noqa: BLE001
            raise QdiffError(f"onnxruntime cannot load the candidate {Path(path).name}: {str(exc).splitlines()[0][:300]}") from None
        accs = None
        for b, ref in zip(batches, refs):
            outs = qs.run(None, feed_for(qs, b))
            if accs is None:
                accs = [metrics.TensorAccumulator() for _ in outs]
            for a, r, c in zip(accs, ref, outs):
                a.update(r, c)
        vals = [a.result().cosine for a in accs or []]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else float("nan")

    return cosine
