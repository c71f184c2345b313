"""``fallback``: quantize, measure, keep the most sensitive layers in float, re-quantize — until a target holds.

The loop::

    config ──quantize──> model ──measure──> target met? ── yes ──> prune ──> write OUTDIR
                                              │ no
                                              v
                          rank layers by fallback gain (qdiff.sensitivity on the current model)
                                              │
                      bisect over the ranking: disable the top 1, 2, 4, ... layers (re-quantized by
                      onnxruntime each time) until the target holds, then binary-search the smallest k
                                              │
                      not reached: take the best model, re-rank, repeat (stops when nothing improves)

Prune: once the target holds, each float layer is re-enabled in turn (least gain first) and kept
quantized if the target still holds. Among layers of similar gain (within 25%) the ranking puts
those with fewer parameters first, so the float set is cheap. Every quantize-and-measure is one
row of the history; the best result so far is on disk after every row, so an interrupted run
leaves it there and ``resume=True`` continues from it.
"""

from __future__ import annotations

import logging
import math
import os
import re
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
from qdiff.config import QuantConfig, load_config, save_config
from qdiff.errors import UsageError
from qdiff.graph import Graph, ModelLike, load_model
from qdiff.inputs import DataLike, input_specs, make_source
from qdiff.quantize import calibration_feeds, init_config, prepare_model, quantize
from qdiff.sensitivity import EvalFn, load_eval, sensitivity

__all__ = ["fallback", "FallbackResult", "Target", "parse_target", "HISTORY_COLUMNS"]

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["round", "step", "float_layers", "n_float", "float_params", "changed", "metric", "target_met", "size_bytes", "seconds", "note"]


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
        if a is None:
            return False
        if b is None:
            return True
        return a > b if self.kind == "cosine" else a < b

    def __str__(self) -> str:
        return f"{self.kind}{'>=' if self.kind == 'cosine' else '<='}{self.value:g}"


def parse_target(text: str) -> Target:
    """Parse ``cosine>=0.99`` or ``metric_drop<=0.01``."""
    m = re.fullmatch(r"\s*(cosine|metric_drop)\s*(>=|<=)\s*([0-9.eE+-]+)\s*", text or "")
    if not m:
        raise UsageError(f"--target '{text}' is not 'cosine>=VALUE' or 'metric_drop<=VALUE'")
    kind, op, value = m.group(1), m.group(2), float(m.group(3))
    if (kind == "cosine") != (op == ">="):
        raise UsageError(f"--target '{text}': use cosine>=VALUE or metric_drop<=VALUE")
    return Target(kind, value)


@dataclass
class FallbackResult:
    """What the loop ended with."""

    reached: bool
    metric: float | None
    float_layers: list[str]
    float_params: int
    config: QuantConfig
    model_path: Path | None
    history: pd.DataFrame
    baseline: dict[str, Any] = field(default_factory=dict)

    def __rich__(self) -> Any:
        from qdiff.render import fallback_renderable

        return fallback_renderable(self)


class _Loop:
    def __init__(self, fp: onnx.ModelProto, feeds, measure, target: Target, outdir: Path | None, progress, params):
        self.fp, self.feeds, self.measure, self.target = fp, feeds, measure, target
        self.outdir = outdir
        self.progress = progress
        self.params = params  # float node name -> weight parameters
        self.rows: list[dict[str, Any]] = []
        self.best: tuple[float | None, QuantConfig | None, bytes | None] = (None, None, None)
        self.best_met: tuple[int, float | None, QuantConfig | None, bytes | None] = (10**9, None, None, None)
        self.tmp = outdir / ".qdiff-work" if outdir else Path(os.environ.get("TMPDIR", "/tmp")) / f"qdiff-fallback-{os.getpid()}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.cache: dict[frozenset, tuple[float | None, int, Path]] = {}

    def evaluate(self, config: QuantConfig, round_: int, step: str, changed: str) -> tuple[float | None, Path]:
        key = frozenset(config.disabled)
        if key in self.cache:
            value, size, path = self.cache[key]
            return value, path
        t0 = time.perf_counter()
        path = self.tmp / f"candidate_{len(self.cache)}.onnx"
        report = quantize(self.fp, config, None, path, feeds=self.feeds)
        value = self.measure(str(path))
        self.cache[key] = (value, report.size_bytes, path)
        met = self.target.met(value)
        float_layers = sorted(config.disabled)
        self.rows.append(
            {
                "round": round_,
                "step": step,
                "float_layers": " ".join(float_layers),
                "n_float": len(float_layers),
                "float_params": sum(self.params.get(n, 0) for n in float_layers),
                "changed": changed,
                "metric": value,
                "target_met": met,
                "size_bytes": report.size_bytes,
                "seconds": round(time.perf_counter() - t0, 3),
                "note": "; ".join(w for w in report.warnings if "weights were not quantized" not in w),
            }
        )
        data = path.read_bytes()
        if self.target.better(value, self.best[0]):
            self.best = (value, config, data)
        if met and (len(float_layers), -(value or 0)) < (self.best_met[0], -(self.best_met[1] or 0)):
            self.best_met = (len(float_layers), value, config, data)
        self.flush()
        if self.progress is not None:
            self.progress(len(self.rows), value)
        return value, path

    def flush(self) -> None:
        """The best result so far and the history, on disk (atomically)."""
        if self.outdir is None:
            return
        _, value, config, data = self.best_met
        if config is None:
            value, config, data = self.best
        if config is not None and data is not None:
            save_config(config, self.outdir / "config.json")
            write_bytes_atomic(self.outdir / "model.int8.onnx", data)
        write_atomic(self.outdir / "history.csv", pd.DataFrame(self.rows, columns=HISTORY_COLUMNS).to_csv(index=False))


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
    max_rounds: int = 4,
    progress: Callable[[int, float | None], None] | None = None,
) -> FallbackResult:
    """Keep as few layers as possible in float so that ``target`` holds.

    Args:
        float_model: the float model.
        calib: calibration data (``config.batch_num`` samples are used).
        target: ``cosine>=V`` (mean final-output cosine on ``eval_data``) or ``metric_drop<=V``
            (with ``eval``: float metric minus quantized metric).
        eval: ``function(model_path) -> float``, higher is better, or its ``module:function`` name.
        eval_data: data for the cosine measure and the ranking (default: ``calib``).
        config: the starting config (path or object); default: every layer enabled.
        max_float_layers: never keep more layers than this in float.
        outdir: where config.json, model.int8.onnx and history.csv are written.
        resume: start from ``outdir/config.json`` (and keep its disabled layers).
        samples: samples of ``eval_data`` used per measurement.
        max_rounds: re-rankings after an improvement that did not reach the target.
        progress: called as ``progress(models_tried, last_metric)``.
    """
    target = parse_target(target) if isinstance(target, str) else target
    eval_fn = load_eval(eval)
    if target.kind == "metric_drop" and eval_fn is None:
        raise UsageError("--target metric_drop<=... needs --eval MODULE:FUNCTION")
    loaded = load_model(float_model, role="float model")
    fp = prepare_model(loaded.proto).model
    out = Path(outdir) if outdir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        if out is None or not (out / "config.json").is_file():
            raise UsageError("--resume needs an OUTDIR holding config.json from an earlier run")
        base = load_config(out / "config.json")
    elif isinstance(config, (str, os.PathLike)):
        base = load_config(config)
    elif config is None:
        base = init_config(fp)
    else:
        base = config
    for name in list(base.layers):
        if name not in {n.name for n in fp.graph.node}:
            raise UsageError(f"config layer '{name}' is not a node of {loaded.label}")
    if not base.layers:
        base = init_config(fp, batch_num=base.batch_num, quant_format=base.quant_format,
                           activation_quant_params=base.activation_quant_params, weight_quant_params=base.weight_quant_params)  # fmt: skip
    feeds = calibration_feeds(fp, calib, base.batch_num)
    eval_source = eval_data if eval_data is not None else calib
    measure, float_metric = _measure(fp, eval_source, samples, target, eval_fn)
    params = _node_params(fp)
    loop = _Loop(fp, feeds, measure, target, out, progress, params)

    value, path = loop.evaluate(base, 0, "start", "")
    current = base
    reached = target.met(value)
    first_last = _first_last(fp, base)
    baseline: dict[str, Any] = {}
    if first_last:
        bcfg = base.with_disabled(set(base.disabled) | set(first_last))
        bvalue, _ = loop.evaluate(bcfg, 0, "baseline", "first+last in float: " + " ".join(first_last))
        baseline = {"float_layers": first_last, "metric": bvalue, "target_met": target.met(bvalue)}
    rnd = 0
    while not reached and rnd < max_rounds:
        rnd += 1
        ranking = _rank(fp, loop.best[1] or current, loop, eval_fn, eval_source, samples, params)
        ranking = [r for r in ranking if r not in current.disabled]
        room = (max_float_layers - len(current.disabled)) if max_float_layers is not None else len(ranking)
        ranking = ranking[: max(room, 0)]
        if not ranking:
            break
        before = loop.best[0]
        k_ok = _bisect(loop, current, ranking, rnd)
        if k_ok is not None:
            current = current.with_disabled(set(current.disabled) | set(_nodes(ranking[:k_ok])))
            reached = True
            break
        if not target.better(loop.best[0], before):
            break  # nothing improves
        current = loop.best[1]
    if reached:
        current = _prune(loop, current, rnd + 1)
    import shutil

    shutil.rmtree(loop.tmp, ignore_errors=True)
    best_cfg = loop.best_met[2] if loop.best_met[2] is not None else loop.best[1]
    best_value = loop.best_met[1] if loop.best_met[2] is not None else loop.best[0]
    loop.flush()
    history = pd.DataFrame(loop.rows, columns=HISTORY_COLUMNS)
    floats = sorted(best_cfg.disabled) if best_cfg else []
    return FallbackResult(
        reached=loop.best_met[2] is not None,
        metric=best_value,
        float_layers=floats,
        float_params=sum(params.get(n, 0) for n in floats),
        config=best_cfg,
        model_path=(out / "model.int8.onnx") if out else None,
        history=history,
        baseline={**baseline, "float_metric": float_metric, "target": str(target)},
    )


def _nodes(layers: list[str]) -> list[str]:
    """Float node names of layers (``conv1+relu1`` -> conv1, relu1; ``split:1`` -> split)."""
    out = []
    for layer in layers:
        for part in layer.split("+"):
            out.append(part.split(":")[0])
    return out


def _bisect(loop: _Loop, config: QuantConfig, ranking: list[str], rnd: int) -> int | None:
    """Smallest k such that disabling the top-k ranked layers meets the target (None if none does)."""
    base = set(config.disabled)
    def trial(k: int) -> bool:
        cfg = config.with_disabled(base | set(_nodes(ranking[:k])))
        value, _ = loop.evaluate(cfg, rnd, f"bisect k={k}", "+" + " +".join(ranking[:k]))
        return loop.target.met(value)

    lo, k = 0, 1
    while True:
        if trial(k):
            hi = k
            break
        lo = k
        if k >= len(ranking):
            return None
        k = min(2 * k, len(ranking))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if trial(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _prune(loop: _Loop, config: QuantConfig, rnd: int) -> QuantConfig:
    """Re-enable float layers one at a time (least gain first) while the target still holds."""
    current = config
    for name in reversed(list(current.disabled)):
        trial = current.with_disabled(set(current.disabled) - {name})
        before = len(loop.rows)
        value, _ = loop.evaluate(trial, rnd, "prune", f"-{name}")
        if loop.target.met(value):
            current = trial
        elif len(loop.rows) > before:  # a new row (not a cached candidate): note the step back on it
            row = loop.rows[-1]
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"step back: {name} stays float"
            loop.flush()
    return current


def _rank(fp, config, loop: _Loop, eval_fn, eval_source, samples, params) -> list[str]:
    """Layers by fallback gain on the current model, cheap ones first among similar gains."""
    path = loop.tmp / "ranking.onnx"
    quantize(fp, config, None, path, feeds=loop.feeds)
    result = sensitivity(fp, str(path), data=eval_source, samples=min(samples or 16, 16), by="gain", eval=eval_fn)
    df = result.layers
    df = df[(df["gain"] > 0) & df["params"].notna()]

    def key(row):
        bucket = math.floor(math.log(row["gain"]) / math.log(1.25)) if row["gain"] > 0 else -10**6
        return (-bucket, sum(params.get(n, 0) for n in _nodes([row["layer"]])), -row["gain"])

    rows = sorted((r for _, r in df.iterrows()), key=key)
    ranked = [r["layer"] for r in rows]
    known = {n.name for n in fp.graph.node}
    return [layer for layer in ranked if all(n in known for n in _nodes([layer]))]


def _measure(fp: onnx.ModelProto, data: DataLike, samples: int | None, target: Target, eval_fn: EvalFn | None):
    """The measurement for a candidate model path, and the float model's value."""
    if target.kind == "metric_drop":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="qdiff-float-") as tmp:
            p = os.path.join(tmp, "float.onnx")
            onnx.save(fp, p)
            float_metric = float(eval_fn(p))

        def drop(path: str) -> float:
            return float_metric - float(eval_fn(path))

        return drop, float_metric
    import onnxruntime as ort

    from qdiff.runner import feed_for

    specs = input_specs(Graph(fp))
    batches = list(make_source(data, specs, samples=samples))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    fs = ort.InferenceSession(fp.SerializeToString(), so, providers=["CPUExecutionProvider"])
    refs = [fs.run(None, feed_for(fs, b)) for b in batches]

    def cosine(path: str) -> float:
        qs = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
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

    return cosine, 1.0


def _node_params(fp: onnx.ModelProto) -> dict[str, int]:
    g = Graph(fp)
    out = {}
    for idx, node in enumerate(g.nodes):
        n = 0
        for i in node.input:
            v = g.const_value(i) if i else None
            if v is not None and v.dtype.kind == "f" and v.ndim >= 1:
                n += int(v.size)
        out[node.name or g.node_label(idx)] = n
    return out


def _first_last(fp: onnx.ModelProto, config: QuantConfig) -> list[str]:
    """The first and last layers with weights (the usual 'keep first and last in float' advice)."""
    params = _node_params(fp)
    weighted = [name for name in config.layers if params.get(name, 0) > 0]
    if not weighted:
        return []
    return list(dict.fromkeys([weighted[0], weighted[-1]]))
