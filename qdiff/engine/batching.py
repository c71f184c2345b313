"""Groups of runs: as one batch per group where that changes nothing.

:class:`Batcher` runs the tapped models on groups of runs (concatenated along axis 0 where every
input has a leading axis), checking on the first group that a batched run gives what single runs
give (:func:`batch_mismatch`, :func:`runs_differ`); :func:`groups_of` cuts a stream of runs into
groups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from qdiff.engine.options import EngineOptions
from qdiff.engine.sessions import feed_for, open_sessions, tap_model

__all__ = ["Batcher", "batch_mismatch", "concat_runs", "groups_of", "per_run_shape", "runs_differ", "with_batch_axis"]

log = logging.getLogger(__name__)

_BATCH_DIM = "qdiff_runs"


class Batcher:
    """Runs tapped models on groups of runs, as one batch per group where that changes nothing.

    Runs are concatenated along axis 0 and run at once (``runs_per_group`` of them: as many as fit
    ``options.group_bytes`` of taps, or ``max_memory``) when every model input has a leading axis, which
    is made symbolic. The first group is also run one run at a time for its first
    ``options.checked_runs`` runs; batching is kept only if every tapped tensor agrees (per-run shapes,
    values to 1e-3 relative L2). Otherwise the sessions are rebuilt on the original models and
    runs go one at a time (``notes`` says why). With ``total`` runs known, groups are also small
    enough that there are ``options.min_groups`` of them, so that the pipeline's workers share a
    small data set (``total`` is the whole data set's run count, the same in every shard, so every
    shard groups the runs alike).
    """

    def __init__(
        self, factory, models: list[tuple[onnx.ModelProto, list[str], str]], per_run_bytes: int | None,
        max_memory: int | None = None, allow: bool = True, total: int | None = None,
        steps: list[dict[str, float]] | None = None, options: EngineOptions | None = None,
    ):  # fmt: skip
        self.factory, self.models = factory, models
        self.options = options = options or EngineOptions()
        # per model, the quantization step of tapped float tensors that are DequantizeLinear outputs:
        # the batching check lets them move by one step (see runs_differ)
        self.steps = steps
        self.notes: list[str] = []
        budget = options.group_bytes if max_memory is None else max_memory
        runs = 1
        if allow and per_run_bytes is not None:
            runs = int(max(1, min(options.group_max_runs, budget // max(1, per_run_bytes))))
            if total:
                runs = min(runs, max(1, -(-total // options.min_groups)))
        self.batched = runs > 1 and all(batch_axis_ok(m) for m, _, _ in models)
        self.runs_per_group = runs if self.batched else 1
        self._open()

    def close(self) -> None:
        """Drop the sessions (before others are opened: a big model's would be held twice)."""
        self.sessions = []

    def _open(self) -> None:
        self.close()  # the old sessions go before the new ones open
        items = [
            (tap_model(with_batch_axis(proto) if self.batched else proto, taps), label) for proto, taps, label in self.models
        ]
        opened = open_sessions(self.factory, items)
        self.sessions = [sess for sess, _ in opened]
        for _, notes in opened:
            self.notes += [n for n in notes if n not in self.notes]

    def fetch(self, batch: Mapping[str, np.ndarray], names: list[list[str]]) -> list[dict[str, np.ndarray]]:
        """The named tensors of each model for one (possibly batched) run."""
        return [dict(zip(ns, sess.run(ns, feed_for(sess, batch)))) for sess, ns in zip(self.sessions, names)]

    def parts(self, group: list, first: bool, names: list[list[str]]) -> list[tuple[list[dict], int, Mapping]]:
        """``(values per model, runs covered, feed)`` for a group: one batched part or one part per run."""
        feed = concat_runs(group) if self.batched else None
        if feed is None:
            return [(self.fetch(b, names), 1, b) for b in group]
        if not first:
            return [(self.fetch(feed, names), len(group), feed)]
        # first group: an operator that mixes samples, a fixed batch of 1 or dynamic
        # quantization shows in its first runs
        why = None
        try:
            batched = self.fetch(feed, names)
        except Exception as exc:  # noqa: BLE001 - e.g. a Reshape to a fixed batch of 1
            batched, why = None, f"a batched run failed ({str(exc).splitlines()[0][:160]})"
        if batched is not None:
            singles = [self.fetch(b, names) for b in group[: min(len(group), self.options.checked_runs)]]
            why = batch_mismatch(batched, singles, len(group), self.steps)
        if why is None:
            self.notes.append(
                f"runs batched {self.runs_per_group} at a time (the models' leading axis is a batch axis; "
                "checked on the first runs against single runs)"
            )
            return [(batched, len(group), feed)]
        self.notes.append(f"runs not batched: {why}")
        log.info("qdiff: %s", self.notes[-1])
        self.batched, self.runs_per_group = False, 1
        self._open()
        return [(self.fetch(b, names), 1, b) for b in group]

def groups_of(items: Iterable, size: int) -> Iterable[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    group: list = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group

def per_run_shape(shape: tuple, runs: int) -> list[int]:
    out = [int(d) for d in shape]
    if runs > 1 and out:
        out[0] //= runs
    return out

def batch_mismatch(
    batched: list[dict], singles: list[list[dict]], runs: int, steps: list[dict[str, float]] | None = None
) -> str | None:
    """Why a batched run of ``runs`` runs differs from its first runs run alone (None: it does not)."""
    checked = len(singles)
    for m, values in enumerate(batched):
        for name, b in values.items():
            alone = [np.asarray(s[m][name]) for s in singles]
            b = np.asarray(b)
            a0 = alone[0]
            if b.ndim == 0 or b.ndim != a0.ndim or b.shape[1:] != a0.shape[1:] or b.shape[0] != runs * a0.shape[0]:
                return f"tensor '{name}' has shape {list(b.shape)} for {runs} runs, {list(a0.shape)} for one"
            if any(a.shape != a0.shape for a in alone):
                return f"tensor '{name}' changes shape from run to run"
            step = steps[m].get(name) if steps else None
            why = runs_differ(b[: checked * a0.shape[0]].ravel(), np.concatenate([a.ravel() for a in alone]), step)
            if why is not None:
                return why
    return None

def runs_differ(x: np.ndarray, y: np.ndarray, step: float | None = None) -> str | None:
    """Why a tensor's values from a batched run (``x``) are not those of its runs alone (``y``):
    non-finite in other places, or more than 1e-3 relative L2 apart. In float32 (quick, ample for
    the tolerance), float64 where float32 overflows; None when they agree.

    Integer tensors (QuantizeLinear outputs) that differ by at most one code everywhere agree: a
    batched MatMul/Gemm sums in another order, a value on a rounding boundary lands one code
    over, and deep in a network such flips add up past the relative tolerance. So do float
    tensors that are DequantizeLinear outputs of quantization ``step`` and move by at most one
    step (on a small output a single flip is far above the tolerance). An operator that mixes
    samples moves values by far more than one code (figures in bench/RESULTS.md)."""
    if x.dtype.kind in "iu" and y.dtype.kind in "iu" and x.shape == y.shape:
        if x.size == 0 or int(np.max(np.abs(x.astype(np.int32) - y.astype(np.int32)))) <= 1:
            return None
    wide = np.float64 if x.dtype == np.float64 else np.float32
    for dtype in (wide, np.float64):
        xf, yf = x.astype(dtype, copy=False), y.astype(dtype, copy=False)
        if x.dtype.kind == "f":
            ok = np.isfinite(yf)
            if not np.array_equal(ok, np.isfinite(xf)):
                return "non-finite values differ between batched and single runs"
            if not ok.all():
                xf, yf = xf[ok], yf[ok]
        with np.errstate(over="ignore", invalid="ignore"):
            d = xf - yf
            err, ref = float(np.dot(d, d)), float(np.dot(yf, yf))
        # one step, and float32 rounding of the dequantized values (up to 32768 codes x 2^-24 of it)
        if step is not None and d.size and float(np.max(np.abs(d))) <= step * 1.01:
            return None
        if np.isfinite(err) and np.isfinite(ref):
            if err > (1e-3 * np.sqrt(ref) + 1e-12) ** 2:
                return "values differ between batched and single runs (an operator mixes samples across the batch axis)"
            return None
    return "values differ between batched and single runs (an operator mixes samples across the batch axis)"

def batch_axis_ok(model: onnx.ModelProto) -> bool:
    """Do all graph inputs have a leading axis that can be a batch axis (rank >= 1, not scalars)?"""
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if not inputs:
        return False
    for i in inputs:
        tt = i.type.tensor_type
        if not i.type.HasField("tensor_type") or not tt.HasField("shape") or len(tt.shape.dim) == 0:
            return False
    return True

def with_batch_axis(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose inputs' and outputs' leading axis is symbolic (intermediate shapes re-inferred)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = {t.name for t in out.graph.initializer}
    for vi in [i for i in out.graph.input if i.name not in init] + list(out.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and vi.type.tensor_type.shape.dim:
            d = vi.type.tensor_type.shape.dim[0]
            if d.HasField("dim_value"):
                d.ClearField("dim_value")
                d.dim_param = _BATCH_DIM
    del out.graph.value_info[:]
    return out

def concat_runs(group: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """The runs of a group concatenated along axis 0 (None if their shapes or types differ)."""
    if len(group) == 1:
        return dict(group[0])
    first = group[0]
    for b in group[1:]:
        if b.keys() != first.keys():
            return None
        for k, v in b.items():
            if v.shape != first[k].shape or v.dtype != first[k].dtype or v.ndim == 0:
                return None
    return {k: np.concatenate([b[k] for b in group]) for k in first}
