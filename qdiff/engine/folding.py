"""Folding what the models gave into metric accumulators, exactly and many rows at a time.

An engine turns a group of runs into :class:`Step` s: per tensor pair the rows of both sides (or
metrics already reduced, :class:`Computed`). :class:`Folds` (one per pipeline worker) folds them
through a :class:`RowFolder` into its accumulators; the workers' Folds merge exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qdiff import metrics
from qdiff.engine import kernels as _kernels
from qdiff.engine.options import EngineOptions

__all__ = ["Computed", "Folds", "RowFolder", "Step", "merge_steps"]


@dataclass
class Computed:
    """A pair's metrics for one run, already reduced (the fused engine)."""

    metrics: metrics.SampleMetrics
    shape: list[int] | None

@dataclass
class Step:
    """What one group of runs gave.

    ``results``: per key (pair index, or -1-k for output k) either a reason the pair is broken, or
    ``(per-run shape, refs [runs, n], cands [runs, n], per-tensor DequantParams or None)``, one row
    per run. ``feed``: what the quantized model was fed (for the deployed-model check).
    """

    results: dict[int, Any]
    top1: dict[int, tuple[int, int]]
    quant_outputs: list[np.ndarray] | None
    feed: Mapping[str, np.ndarray] | None = None

def merge_steps(steps: list[Step]) -> Step:
    """One step out of single-run steps (rows stacked in run order)."""
    if len(steps) == 1:
        return steps[0]
    results: dict[int, Any] = {}
    for key in steps[0].results:
        vals = [s.results[key] for s in steps]
        bad = next((v for v in vals if isinstance(v, str)), None)
        if bad is not None:
            results[key] = bad
            continue
        if len({v[1].shape[1] for v in vals}) > 1 or len({v[3] is None for v in vals}) > 1:
            # runs of different sizes: a list, folded run by run (see take() in measure_pair)
            results[key] = vals
            continue
        results[key] = (vals[0][0], np.concatenate([v[1] for v in vals]), np.concatenate([v[2] for v in vals]), vals[0][3])
    top1: dict[int, tuple[int, int]] = {}
    for s in steps:
        for k, (rows, agree) in s.top1.items():
            r0, a0 = top1.get(k, (0, 0))
            top1[k] = (r0 + rows, a0 + agree)
    return Step(results, top1, steps[0].quant_outputs, steps[0].feed)

class RowFolder:
    """Folds samples (rows) of many tensor pairs into their accumulators, many rows per call.

    Per-call overhead dominates small tensors, so rows are buffered per key and reduced together
    once a key holds ``max_rows`` rows or ``max_bytes`` (float64 equivalent); rows of more than
    ``immediate_elements`` elements are reduced at once (``None``: buffer every size). Limits
    left out come from ``options`` (:class:`~qdiff.engine.options.EngineOptions`). What is due
    is reduced by :meth:`run` (the caller calls it once per group of runs): all of it in one call
    of the compiled kernels. A row's values never depend on which rows share its call, so the
    buffering changes no number.
    """

    def __init__(
        self, compiled: bool, max_bytes: int | None = None, max_rows: int | None = None,
        immediate_elements: int | None = -1, threads: int | None = None, kl: bool = True,
        options: EngineOptions | None = None,
    ):  # fmt: skip
        options = options or EngineOptions()
        self.compiled = compiled
        self.max_bytes = options.rows_buffer_bytes if max_bytes is None else max_bytes
        self.max_rows = options.rows_max if max_rows is None else max_rows
        # -1: the options' rows_max_elements
        self.immediate = options.rows_max_elements if immediate_elements == -1 else immediate_elements
        self.split_elements = options.rows_max_elements  # numpy path: bigger rows one at a time
        self.due_copies_max = options.due_copies_max
        # kl=False: the kernels skip the histograms (for accumulators made with kl=False)
        self.bins = metrics.KL_BINS if kl else 0
        self.threads = threads  # kernel threads per call (None: the kernels' default, 1 in a worker thread)
        self._buffers: dict[Any, tuple[metrics.TensorAccumulator, list]] = {}
        self._due: list[tuple[metrics.TensorAccumulator, np.ndarray, np.ndarray, Any]] = []
        self._due_copies = 0  # bytes of the concatenated buffers in _due (the rest are views)

    def add(self, key: Any, acc: metrics.TensorAccumulator, refs: np.ndarray, cands: np.ndarray, dq=None) -> None:
        """Take the rows of ``refs``/``cands`` (``[k, n]``, one sample per row) for ``acc``."""
        if self.immediate is not None and refs.shape[1] > self.immediate:
            self._due.append((acc, refs, cands, dq))
            return
        _, buf = self._buffers.setdefault(key, (acc, []))
        if buf and (buf[0][0].shape[1] != refs.shape[1] or buf[0][2] is not dq):
            self._flush(acc, buf)
        buf.append((refs, cands, dq))
        rows = sum(len(r) for r, _, _ in buf)
        if rows * refs.shape[1] * 8 >= self.max_bytes or rows >= self.max_rows:
            self._flush(acc, buf)

    def run(self) -> None:
        """Reduce what is due (the immediate rows and the full buffers) into the accumulators."""
        due, self._due, self._due_copies = self._due, [], 0
        if not due:
            return
        stacks = [(r, c, dq) for _, r, c, dq in due]
        got = _kernels.many_row_metrics(stacks, bins=self.bins, threads=self.threads) if self.compiled else None
        if got is None:
            for acc, refs, cands, dq in due:
                _reduce_rows(acc, refs, cands, dq, self.split_elements)
            return
        for (acc, refs, _, _), rows in zip(due, got):
            _fold_rows(acc, rows, refs.shape[1])

    def flush(self) -> None:
        """Reduce everything still buffered."""
        for acc, buf in self._buffers.values():
            self._flush(acc, buf)
        self.run()

    def _flush(self, acc: metrics.TensorAccumulator, buf: list) -> None:
        if not buf:
            return
        refs = np.concatenate([r for r, _, _ in buf]) if len(buf) > 1 else buf[0][0]
        cands = np.concatenate([c for _, c, _ in buf]) if len(buf) > 1 else buf[0][1]
        self._due.append((acc, refs, cands, buf[0][2]))
        if len(buf) > 1:
            self._due_copies += refs.nbytes + cands.nbytes
        buf.clear()
        if self._due_copies > self.due_copies_max:
            self.run()

def _reduce_rows(acc: metrics.TensorAccumulator, refs: np.ndarray, cands: np.ndarray, dq, split: int) -> None:
    """Fold the samples of one pair (one per row of ``refs``/``cands``) into ``acc`` with numpy
    (where the compiled kernels are unavailable); rows of more than ``split`` elements one at a time."""
    if dq is not None:
        cands = dq.dequantize(cands)
    if refs.shape[1] > split:
        for r, c in zip(refs, cands):
            acc.add(metrics.sample_metrics(r, c))
    else:
        for m in metrics.sample_metrics_rows(refs, cands):
            acc.add(m)

def _fold_rows(acc: metrics.TensorAccumulator, rows: _kernels.Rows, n: int) -> None:
    """Fold the kernels' ``(values, slow_rows, slow_metrics)`` of one stack into ``acc``."""
    values, slow_rows, slow = rows
    if slow_rows:
        keep = np.ones(len(values), dtype=bool)
        keep[slow_rows] = False
        values = values[keep]
        for m in slow:
            acc.add(m)
    acc.add_values(values, n)

class Folds:
    """What folding steps accumulates: one per worker thread, merged exactly at the end."""

    def __init__(
        self, n_pairs: int, n_outputs: int, compiled: bool, kernel_threads: int | None = None,
        options: EngineOptions | None = None,
    ):  # fmt: skip
        self.options = options
        self.accs = [metrics.TensorAccumulator() for _ in range(n_pairs)]
        self.out_accs = [metrics.TensorAccumulator() for _ in range(n_outputs)]
        self.top1 = [metrics.Top1Accumulator() for _ in range(n_outputs)]
        self.shapes: dict[int, list[int]] = {}
        self.broken: dict[int, str] = {}
        self.folder = RowFolder(compiled, threads=kernel_threads, options=options)

    def take(self, key: int, value: Any) -> None:
        if isinstance(value, list):  # runs of different sizes in one group: one at a time
            for v in value:
                if key not in self.broken:
                    self.take(key, v)
            return
        if isinstance(value, str):
            self.broken[key] = value
            return
        acc = self.accs[key] if key >= 0 else self.out_accs[-1 - key]
        if isinstance(value, Computed):
            if value.shape is not None:
                self.shapes[key] = value.shape
            acc.add(value.metrics)
            return
        shape, refs, cands, dq = value
        if shape is not None:
            self.shapes[key] = shape
        self.folder.add(key, acc, refs, cands, dq)

    def fold(self, step: Step) -> None:
        for key, value in step.results.items():
            if key not in self.broken:
                self.take(key, value)
        self.folder.run()
        for k, (rows, agree) in step.top1.items():
            self.top1[k].rows += rows
            self.top1[k].agree += agree

    def flush(self) -> None:
        self.folder.flush()

    def merge(self, other: Folds) -> Folds:
        self.folder.flush()
        other.folder.flush()
        out = Folds(0, 0, self.folder.compiled, options=self.options)
        out.accs = [a.merge(b) for a, b in zip(self.accs, other.accs)]
        out.out_accs = [a.merge(b) for a, b in zip(self.out_accs, other.out_accs)]
        out.top1 = [a.merge(b) for a, b in zip(self.top1, other.top1)]
        out.shapes = {**other.shapes, **self.shapes}
        out.broken = {**other.broken, **self.broken}
        return out
