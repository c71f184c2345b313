"""The two engines that run a model pair on a group of runs and hand back :class:`Step` s.

* :class:`NumpyEngine`: both models tapped (integer taps, onnxruntime's fused graph where it
  pays, batched runs); the tapped tensors are copied out and folded by the kernels or numpy.
* :class:`FusedEngine`: one merged graph computing every pair's reductions inside onnxruntime.

:func:`run_with_fallback` goes on with numpy where the fused graph fails to run;
:func:`deployed_check` compares the tapped quantized model's outputs with the model as given;
:class:`SetUp` prepares what the first group needs on background threads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np
import onnx

from qdiff import metrics
from qdiff.engine import pipeline
from qdiff.engine.batching import Batcher, per_run_shape
from qdiff.engine.folding import Computed, Step, merge_steps
from qdiff.engine.fused import build_fused
from qdiff.engine.options import EngineOptions
from qdiff.engine.prefuse import fused_taps_differ, optimized_model, prefused_taps, unfused_session
from qdiff.engine.sessions import feed_for, open_session
from qdiff.engine.taps import group_by_memory, integer_source, integer_tap, real_values, tap_bytes
from qdiff.graph import Graph, external_dir, initializer_bytes
from qdiff.structs import TensorPair

__all__ = ["Engine", "FusedEngine", "NumpyEngine", "SetUp", "deployed_check", "run_with_fallback"]

log = logging.getLogger(__name__)


class Engine:
    notes: list[str]
    runs_per_group: int = 1

    def run_group(self, group: list[Mapping[str, np.ndarray]], first: bool) -> list[Step]:  # pragma: no cover
        """The steps of one group of runs, to be folded in order."""
        raise NotImplementedError


class SetUp:
    """What compare needs from the quantized model whatever the matching finds, prepared on a
    background thread while the caller matches the graphs and builds the weight table (the
    onnxruntime work releases the GIL, so on two cores it costs no wall time): onnxruntime's fused
    graph (:func:`optimized_model`, when ``prefuse`` — :func:`prefuse_pays`' answer, kept for the
    engine — and the numpy engine) and the untapped session of the deployed-model check. Not for
    models above ``options.prefuse_max_bytes`` or with weights on disk: the futures are None then,
    and the deployed-model check opens its session after the tapped sessions close (a third
    session of a big model while the tapped two are open adds to the peak memory)."""

    def __init__(self, factory, q_loaded, prefuse: bool, engine: str, options: EngineOptions | None = None):
        options = options or EngineOptions()
        self.prefuse = prefuse
        self.optimized: Future | None = None
        self.deployed: Future | None = None
        proto = q_loaded.proto
        if external_dir(proto) is not None or initializer_bytes(proto) > options.prefuse_max_bytes:
            return
        if prefuse and engine == "numpy":  # the engine waits for it before the first group
            self.optimized = pipeline.in_background(optimized_model, proto, factory, options)
        self.deployed = pipeline.in_background(open_session, factory, proto, q_loaded.label)


class NumpyEngine(Engine):
    """Both models tapped; every pair's tensors copied out and reduced by the kernels or numpy.

    * The quantized side reads a DequantizeLinear's integer input (the QuantizeLinear output)
      where that is all the DequantizeLinear needs, and dequantizes it itself: a quarter of the
      bytes to copy, and QLinearAdd/QLinearMul fusions survive (a DQ -> Conv -> Q group whose
      input DQ reads a tapped tensor is not fused by onnxruntime either way).
    * Groups of runs go through a :class:`Batcher`.
    * With a memory budget the pairs are split into groups whose tapped tensors fit it, and each
      group is fetched by its own run of the two sessions (more runs, bounded memory).
    """

    def __init__(
        self, factory, f_loaded, q_loaded, pairs, outputs, max_memory: int | None = None, fg: Graph | None = None,
        compiled: bool = False, qg: Graph | None = None, prefuse: bool = True, optimized: Future | None = None,
        total: int | None = None, options: EngineOptions | None = None,
    ):  # fmt: skip
        self.options = options = options or EngineOptions()
        self.pairs, self.outputs, self.compiled = pairs, outputs, compiled
        keyed = [(i, p) for i, p in enumerate(pairs)] + [(-1 - k, p) for k, p in enumerate(outputs)]
        # what is tapped on the quantized side (outputs keep their own tensors)
        self.tap_pairs = {key: (integer_tap(p, qg) if qg is not None and key >= 0 else p) for key, p in keyed}
        f_taps = list(dict.fromkeys(p.float_tensor for _, p in keyed))
        q_taps = list(dict.fromkeys(self.tap_pairs[k].quant_tensor for k, _ in keyed))
        self.groups = [keyed]
        notes = []
        if max_memory is not None and fg is not None:
            self.groups = group_by_memory(keyed, fg, max_memory)
            if len(self.groups) > 1:
                notes.append(
                    f"tapped tensors split into {len(self.groups)} groups to stay within --max-memory {max_memory} bytes"
                )
        per_run = tap_bytes(keyed, fg, self.tap_pairs, qg) if fg is not None else None
        q_model = q_loaded.proto
        self._original_names = {t.quant_tensor for t in self.tap_pairs.values()}
        self.unfused = None  # (original model, taps, factory, check session) to check the prefused taps once
        prefused = None
        if prefuse and qg is not None:  # onnxruntime's fused graph: from the set-up thread where it ran
            opt = optimized.result() if optimized is not None else optimized_model(q_loaded.proto, factory, options)
            prefused = prefused_taps(q_loaded.proto, self.tap_pairs, qg, opt) if opt is not None else None
        if prefused is not None:  # the check's session opens while the batcher opens its two
            self.unfused = (q_loaded.proto, dict(self.tap_pairs), factory, unfused_session(factory, q_loaded.proto, self.tap_pairs))
            q_model, self.tap_pairs = prefused
            q_taps = list(dict.fromkeys(self.tap_pairs[k].quant_tensor for k, _ in keyed))
        steps: dict[str, float] = {}
        for name in q_taps if qg is not None else ():
            src = integer_source(qg, name)  # a float tap that is a DequantizeLinear output
            if src is not None and np.asarray(src[1].scale).size:
                steps[name] = float(np.max(np.abs(src[1].scale)))
        self.batcher = Batcher(
            factory, [(f_loaded.proto, f_taps, f_loaded.label), (q_model, q_taps, q_loaded.label)],
            per_run, max_memory, allow=len(self.groups) == 1, total=total, steps=[{}, steps], options=options,
        )  # fmt: skip
        self._notes = notes
        self._keyed, self._args = keyed, (factory, f_loaded, q_loaded, max_memory, fg, qg, total)

    @property
    def notes(self) -> list[str]:
        return self._notes + self.batcher.notes

    @property
    def runs_per_group(self) -> int:
        return self.batcher.runs_per_group

    @property
    def batched(self) -> bool:
        return self.batcher.batched

    @property
    def prefused_count(self) -> int:
        return sum(1 for k, t in self.tap_pairs.items() if k >= 0 and t.quant_tensor not in self._original_names)

    def _check_prefused(self, run: Mapping[str, np.ndarray]) -> str | None:
        """Do the fused graph's taps give the unfused taps' values on one run? (None: yes)"""
        model, taps, factory, session = self.unfused
        return fused_taps_differ(
            factory, model, taps, self.tap_pairs, run, lambda names: self.batcher.fetch(run, [[], names])[1], session
        )

    def _names(self, group: list) -> list[list[str]]:
        return [
            list(dict.fromkeys(p.float_tensor for _, p in group)),
            list(dict.fromkeys(self.tap_pairs[k].quant_tensor for k, _ in group)),
        ]

    def run_group(self, group, first) -> Iterable[Step]:
        if first and self.unfused is not None:
            why = self._check_prefused(group[0])
            if why is not None:  # tap the model as given instead
                factory, f_loaded, q_loaded, max_memory, fg, qg, total = self._args
                self.batcher.close()
                self.__init__(
                    factory, f_loaded, q_loaded, self.pairs, self.outputs, max_memory, fg, self.compiled, qg,
                    prefuse=False, total=total, options=self.options,
                )  # fmt: skip
                self._notes.append(f"onnxruntime's fused graph not tapped: {why}")
            else:
                self._notes.append(
                    f"quantized model tapped in onnxruntime's fused graph ({self.prefused_count} layer(s) read "
                    "from fused QLinear* nodes, checked against the unfused taps on the first run)"
                )
            self.unfused = None
        if len(self.groups) == 1:
            parts = self.batcher.parts(group, first, self._names(self.groups[0]))
            return [merge_steps([self._step(vals, runs, feed, self.groups) for vals, runs, feed in parts])]
        # taps fetched in memory groups, one run of both models per group, each folded before the
        # next is fetched (a generator: at most two groups' taps are held)
        return (self._step(self.batcher.fetch(b, self._names(g)), 1, b, [g]) for b in group for g in self.groups)

    def _step(self, vals: list[dict], runs: int, feed, groups: list) -> Step:
        f_vals, q_vals = vals
        results: dict[int, Any] = {}
        top1: dict[int, tuple[int, int]] = {}
        quant_outputs: dict[int, np.ndarray] = {}
        for group in groups:
            for key, pair in group:
                tap = self.tap_pairs[key]
                ref, raw = np.asarray(f_vals[pair.float_tensor]), np.asarray(q_vals[tap.quant_tensor])
                results[key] = self._rows(ref, raw, tap, runs)
                if key < 0:
                    quant_outputs[key] = raw
                    if metrics.looks_like_class_scores(np.shape(ref)):
                        t = metrics.Top1Accumulator()
                        t.update(ref, real_values(raw, tap))
                        top1[-1 - key] = (t.rows, t.agree)
        qouts = [quant_outputs.get(-1 - k) for k in range(len(self.outputs))] if quant_outputs else None
        return Step(results, top1, qouts, feed_for(self.batcher.sessions[1], feed))

    def _rows(self, ref: np.ndarray, raw: np.ndarray, tap: TensorPair, runs: int):
        if ref.size != raw.size:
            return (
                f"shapes differ at run time: {per_run_shape(ref.shape, runs)} in the float model, "
                f"{per_run_shape(raw.shape, runs)} in the quantized model"
            )
        if runs > 1 and (ref.ndim == 0 or ref.shape[0] % runs or raw.ndim == 0 or raw.shape[0] % runs):
            return f"the batched run gave a leading axis of {list(ref.shape[:1])}, not a multiple of {runs} runs"
        dq = None
        if raw.dtype.kind in "iu" and tap.dequant is not None:
            if self.compiled and not tap.dequant.per_channel:
                dq = tap.dequant  # dequantized on the fly by the compiled kernels
            else:
                raw = tap.dequant.dequantize(raw)  # per-channel: in the tensor's own layout
        return (per_run_shape(ref.shape, runs), ref.reshape(runs, -1), raw.reshape(runs, -1), dq)


class FusedEngine(Engine):
    """One merged graph: both models and every pair's reductions (see :mod:`qdiff.engine.fused`)."""

    def __init__(self, factory, f_loaded, q_loaded, fg, pairs, outputs):
        self.pairs, self.outputs = pairs, outputs
        shapes = {o.float_tensor: fg.shape(o.float_tensor) for o in outputs}
        fused = build_fused(f_loaded.proto, q_loaded.proto, pairs, outputs, float_shapes=shapes)
        model = fused.model
        # the first run also returns the shapes and the quantized model's outputs
        self.shape_names = []
        for k, p in enumerate(list(pairs) + list(outputs)):
            name = f"qdiff/shape{k}"
            src = p.float_tensor if p.float_tensor in {i.name for i in model.graph.input} else "f/" + p.float_tensor
            model.graph.node.append(onnx.helper.make_node("Shape", [src], [name], name=name))
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            self.shape_names.append(name)
        self.qout_names = []
        for o in outputs:
            name = "q/" + o.quant_tensor
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            self.qout_names.append(name)
        self.sums = list(fused.outputs)
        self.top1_names = [t for t in fused.top1 if t]
        self.top1_index = [k for k, t in enumerate(fused.top1) if t]
        self.sess, self.notes = open_session(factory, model, f"{f_loaded.label} + {q_loaded.label} (fused)")

    def run_group(self, group, first):
        (batch,) = group
        names = self.sums + self.top1_names + ((self.shape_names + self.qout_names) if first else [])
        vals = self.sess.run(names, feed_for(self.sess, batch))
        n = len(self.pairs) + len(self.outputs)
        sums, rest = vals[:n], vals[n:]
        t1, rest = rest[: len(self.top1_names)], rest[len(self.top1_names) :]
        shapes = rest[:n] if first else [None] * n
        qouts = list(rest[n:]) if first else None
        results: dict[int, Any] = {}
        for k, v in enumerate(sums):
            key = k if k < len(self.pairs) else -1 - (k - len(self.pairs))
            if v[0] != v[1]:
                results[key] = f"shapes differ at run time: {int(v[0])} elements in the float model, {int(v[1])} in the quantized model"
                continue
            shape = [int(x) for x in shapes[k]] if shapes[k] is not None else None
            results[key] = Computed(metrics.sample_metrics_from_sums(v), shape)
        top1 = {self.top1_index[j]: (int(v[0]), int(v[1])) for j, v in enumerate(t1)}
        return [Step(results, top1, qouts, batch)]


def run_with_fallback(
    eng, group, first, notes, engine_used, factory, f_loaded, q_loaded, pairs, outputs, compiled, options=None
):  # fmt: skip
    """Run one group of runs; the fused engine falls back to numpy on a run failure."""
    try:
        return eng.run_group(group, first), eng, engine_used
    except Exception as exc:  # noqa: BLE001 - any run failure of the fused graph: go on with numpy
        if not isinstance(eng, FusedEngine):
            raise
        notes.append(f"fused engine failed ({str(exc).splitlines()[0][:200]}); numpy engine used")
        log.warning(notes[-1])
        eng = NumpyEngine(factory, f_loaded, q_loaded, pairs, outputs, compiled=compiled, options=options)
        return eng.run_group(group, True), eng, ("numpy" if first else "fused+numpy")


def deployed_check(factory, batched: bool, q_loaded, outputs, quant_outputs, feed, runs: int, deployed=None) -> float:
    """Is the tapped quantized model still what the deployed one computes? (max |difference| of the outputs)

    Checked on the first run of the first group (``runs`` runs were batched into ``feed``), against
    the quantized model as given, untapped (``deployed``: a future of its session, else opened here).
    """
    if deployed is not None:
        deployed_sess, _ = deployed.result()
    else:
        deployed_sess, _ = open_session(factory, q_loaded.proto, q_loaded.label)
    names = [o.quant_tensor for o in outputs]
    tapped = list(quant_outputs)
    if runs > 1 and batched:
        feed = {k: v[: v.shape[0] // runs] for k, v in feed.items()}
        tapped = [t[: t.shape[0] // runs] if np.ndim(t) else t for t in tapped]
    deployed = deployed_sess.run(names, feed_for(deployed_sess, feed))
    return max(_finite_max_diff(real_values(d, o), real_values(tapped[k], o)) for k, (d, o) in enumerate(zip(deployed, outputs)))


def _finite_max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over the elements finite in both (0.0 for empty or shape-mismatched)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0 or a.shape != b.shape:
        return 0.0
    ok = np.isfinite(a) & np.isfinite(b)
    diff = np.zeros_like(a)
    np.subtract(a, b, out=diff, where=ok)
    return float(np.max(np.abs(diff)))
