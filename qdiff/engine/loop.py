"""The measuring loop, shared by compare and sensitivity (and the set-up it needs).

Data flow::

    source of runs --(Batcher.runs_per_group)--> groups of runs
      first group, alone:     settles batching (checked against single runs), the fused-graph
                              taps (checked against the unfused taps) and the deployed-model check
      the other groups:       pipeline.run_groups over W worker threads; each runs the models on
                              a whole group and folds it into its own state (accumulators + RowFolder)
      then:                   the workers flush their folders side by side, states merge exactly

:func:`measure` is that loop, for any per-worker state (compare's :class:`~qdiff.engine.folding.Folds`,
sensitivity's own). :func:`measure_pair` is compare's pass: an engine (numpy or fused) over one
model pair, giving a :class:`Measured`; :func:`load_pair` loads a pair and settles its session factory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from qdiff.engine import kernels as _kernels, pipeline
from qdiff.engine.batching import groups_of
from qdiff.engine.engines import Engine, FusedEngine, NumpyEngine, SetUp, deployed_check, run_with_fallback
from qdiff.engine.folding import Folds, RowFolder
from qdiff.engine.fused import FusedUnavailable
from qdiff.engine.options import EngineOptions
from qdiff.engine.prefuse import prefuse_pays
from qdiff.engine.sessions import SessionFactory, SessionOptions, default_session_factory, resolve_provider
from qdiff.errors import QdiffError, UsageError
from qdiff.graph import Graph, ModelLike, layer_macs, load_model
from qdiff.inputs import check_same_inputs, input_specs

__all__ = ["Measured", "State", "load_pair", "measure", "measure_pair"]


class State(Protocol):
    """What one pipeline worker folds into: its own accumulators and :class:`RowFolder`."""

    folder: RowFolder

    def flush(self) -> None: ...

    def merge(self, other: Any) -> Any: ...


S = TypeVar("S", bound=State)


def measure(
    source: Any,
    runs_per_group: Callable[[], int],
    first: Callable[[list, S], None],
    rest: Callable[[list, S], None],
    make_state: Callable[[int | None], S],
    n_workers: Callable[[], int],
    report: Callable[[int], None],
) -> tuple[S, int]:
    """One pass over ``source`` (a :class:`qdiff.inputs.DataSource`), folded into one state;
    returns it and the number of workers (states) that took part.

    ``runs_per_group()`` is asked before the first group (it sets ``source.group``: runs are
    grouped by global index, run i in group i // K, so shards hold whole groups) and again after
    it (the first group may have refused batching). ``first(group, state)`` runs the first group
    alone into the first state; ``n_workers()`` is then asked how many workers take the others,
    each calling ``rest(group, state)`` with a state of its own (``make_state(kernel_threads)``:
    None for the first state, 1 for the workers' states, which then share the cores).
    ``report(runs)`` is called as groups finish. The states flush side by side and merge in
    order (exactly: the result does not depend on which worker took which group).
    """
    k = runs_per_group()
    source.group = k
    batches = iter(source)
    group = [b for _, b in zip(range(k), batches)]
    states = [make_state(None)]
    if group:
        first(group, states[0])
        report(len(group))
        n = n_workers()
        if n > 1:
            states[0].folder.threads = 1
            states += [make_state(1) for _ in range(n - 1)]
        pipeline.release_free_memory()
        pipeline.run_groups(groups_of(batches, runs_per_group()), rest, states, report)
    pipeline.for_each(states, lambda state: state.flush())
    merged = states[0]
    for other in states[1:]:
        merged = merged.merge(other)
    merged.flush()
    return merged, len(states)


@dataclass
class Measured:
    """Everything one pass over (a shard of) the data accumulated; merges exactly."""

    accs: list
    out_accs: list
    top1: list
    shapes: dict[int, list[int]]
    broken: dict[int, str]
    notes: list[str]
    deployed_diff: float | None
    run_seconds: float
    engine: str
    batches: int = 0
    samples: int = 0
    digests: dict[int, str] | None = None
    kernel: str = "numpy"
    integer_taps: int = 0
    pipeline_workers: int = 1
    #: shards (worker processes or executor tasks) the data was measured in; set by measure_sharded
    shards: int = 1

    def merge(self, other: Measured) -> Measured:
        return Measured(
            [a.merge(b) for a, b in zip(self.accs, other.accs)],
            [a.merge(b) for a, b in zip(self.out_accs, other.out_accs)],
            [a.merge(b) for a, b in zip(self.top1, other.top1)],
            {**other.shapes, **self.shapes},
            {**other.broken, **self.broken},
            list(dict.fromkeys(self.notes + other.notes)),
            self.deployed_diff if self.deployed_diff is not None else other.deployed_diff,
            self.run_seconds + other.run_seconds,
            self.engine if self.engine == other.engine else f"{self.engine}+{other.engine}",
            self.batches + other.batches,
            self.samples + other.samples,
            {**(self.digests or {}), **(other.digests or {})},
            self.kernel if self.kernel == other.kernel else f"{self.kernel}+{other.kernel}",
            max(self.integer_taps, other.integer_taps),
            max(self.pipeline_workers, other.pipeline_workers),
        )


def measure_pair(
    factory, f_loaded, q_loaded, fg, pairs, outputs, source, engine, progress, max_memory=None, qg=None, cpus=None,
    setup: SetUp | None = None, options: EngineOptions | None = None,
) -> Measured:
    """Compare's pass over ``source``: run both models per group of runs, fold every pair into its
    accumulator (:func:`measure`; one worker for the fused engine, whose runs reduce inside
    onnxruntime). ``setup``: the deployed-model session and onnxruntime's fused graph, prepared
    while the caller matched the graphs (None: made here when needed).
    """
    options = options or EngineOptions()
    notes: list[str] = []
    engine_used = "numpy"
    eng: Engine | None = None
    if engine != "numpy":
        try:
            eng = FusedEngine(factory, f_loaded, q_loaded, fg, pairs, outputs)
            notes += eng.notes
            engine_used = "fused"
        except (FusedUnavailable, QdiffError) as exc:
            if engine == "fused":
                raise UsageError(f"the fused engine cannot run these models: {exc}") from None
            notes.append(f"fused engine unavailable ({exc}); numpy engine used")
    compiled = _kernels.available()
    if eng is None:
        if setup is not None:
            prefuse = setup.prefuse
        else:
            prefuse = prefuse_pays(source.count, layer_macs(fg) if fg is not None else None, options)
        eng = NumpyEngine(
            factory, f_loaded, q_loaded, pairs, outputs, max_memory, fg, compiled, qg, prefuse=prefuse,
            optimized=setup.optimized if setup is not None else None, total=source.count, options=options,
        )  # fmt: skip
        notes += eng.notes
    deployed_diff: float | None = None
    later: tuple | None = None  # the deployed-model check's inputs, where it runs after the others
    run_seconds = 0.0
    done = 0
    parallel = False

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, source.count)

    def run_first(group: list, fold: Folds) -> None:
        nonlocal eng, engine_used, run_seconds, deployed_diff, later
        t0 = time.perf_counter()
        steps, eng, engine_used = run_with_fallback(
            eng, group, True, notes, engine_used, factory, f_loaded, q_loaded, pairs, outputs, compiled, options
        )
        qouts: list = [None] * len(outputs)
        feed0 = None
        for step in steps:  # an iterator with --max-memory groups: fetched as they are folded
            run_seconds += time.perf_counter() - t0
            feed0 = step.feed if feed0 is None else feed0
            for k, v in enumerate(step.quant_outputs or []):
                qouts[k] = v if v is not None else qouts[k]
            fold.fold(step)
            t0 = time.perf_counter()
        if outputs and all(v is not None for v in qouts):
            batched = getattr(eng, "batched", False)
            if setup is not None and setup.deployed is not None:
                deployed_diff = deployed_check(factory, batched, q_loaded, outputs, qouts, feed0, len(group), setup.deployed)
            else:  # big models: the deployed session opens once the tapped ones are closed (peak memory)
                later = (qouts, feed0, len(group), batched)

    def run_next(group: list, fold: Folds) -> None:
        nonlocal eng, engine_used, run_seconds
        t0 = time.perf_counter()
        if parallel:
            steps = eng.run_group(group, False)
        else:  # the fused engine may fall back to numpy
            steps, eng, engine_used = run_with_fallback(
                eng, group, False, notes, engine_used, factory, f_loaded, q_loaded, pairs, outputs, compiled, options
            )
        for step in steps:
            run_seconds += time.perf_counter() - t0  # summed over the workers
            fold.fold(step)
            t0 = time.perf_counter()

    def n_workers() -> int:
        nonlocal parallel
        n = pipeline.workers(cpus, pipeline.weight_bytes(f_loaded, q_loaded), options)
        parallel = isinstance(eng, NumpyEngine) and n > 1
        return n if parallel else 1

    merged, workers = measure(
        source, lambda: eng.runs_per_group, run_first, run_next,
        lambda threads: Folds(len(pairs), len(outputs), compiled, kernel_threads=threads, options=options),
        n_workers, report,
    )  # fmt: skip
    notes += [n for n in eng.notes if n not in notes]
    integer_taps = sum(1 for k, t in getattr(eng, "tap_pairs", {}).items() if k >= 0 and t is not pairs[k])
    if later is not None:
        eng = None  # its sessions go first
        qouts, feed0, runs, batched = later
        deployed_diff = deployed_check(factory, batched, q_loaded, outputs, qouts, feed0, runs)
    return Measured(
        merged.accs, merged.out_accs, merged.top1, merged.shapes, merged.broken, notes, deployed_diff, run_seconds,
        engine_used, source.batches, source.samples, dict(source.digests),
        "c" if compiled and engine_used != "fused" else "numpy",
        integer_taps,
        workers,
    )  # fmt: skip


def load_pair(
    float_model: ModelLike, quant_model: ModelLike, provider: str, session_factory: SessionFactory | None,
    options: EngineOptions | None = None,
):  # fmt: skip
    """Load both models, check they take the same inputs, and settle the session factory.

    Returns:
        ``(float LoadedModel, quant LoadedModel, float Graph, quant Graph, float input specs,
        session factory, SessionOptions recorded in meta)``.
    """
    f_loaded = load_model(float_model, role="float model")
    q_loaded = load_model(quant_model, role="quantized model")
    if session_factory is None:
        threads = pipeline.session_threads(weight_bytes=pipeline.weight_bytes(f_loaded, q_loaded), options=options)
        session_options = SessionOptions(provider=resolve_provider(provider), intra_op_threads=threads)
        session_factory = default_session_factory(session_options)
    else:
        session_options = SessionOptions(provider="custom session factory")
    fg, qg = Graph(f_loaded.proto), Graph(q_loaded.proto)
    f_specs = input_specs(fg)
    check_same_inputs(f_specs, input_specs(qg), f_loaded.label, q_loaded.label)
    return f_loaded, q_loaded, fg, qg, f_specs, session_factory, session_options
