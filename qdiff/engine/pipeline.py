"""Groups of runs processed by several threads at once, each running the models and reducing.

compare and sensitivity spend their time in two kinds of work that both release the GIL:
onnxruntime running the tapped models, and the compiled kernels reducing what they gave. On few
cores, onnxruntime's intra-op parallelism is the weak point: every operator of a small model
splits over the threads and waits at a barrier, and a second busy thread (the reducer) stalls the
barriers: two threads each running whole samples through single-threaded sessions beat one
session per model with two intra-op threads (figures in bench/RESULTS.md).

So qdiff runs :func:`workers` threads, each taking a whole group of runs at a time: run both
models on it (sessions of :func:`session_threads` intra-op threads, shared by the workers:
onnxruntime sessions take concurrent ``run`` calls), then reduce it with single-threaded kernels
into the worker's own accumulators. Accumulators merge exactly, so the result does not depend on
which worker took which group (the same property that makes ``--workers`` shards exact).

Models whose weights together reach ``EngineOptions.one_worker_bytes`` run on one worker whose sessions
use every core: their operators are big enough for onnxruntime's own threads, and every worker
holds its own transient tensors (the dequantized weights and the taps of each run), so one
worker is as quick and needs less memory.
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from qdiff.engine.options import EngineOptions
from qdiff.engine.sessions import available_cpus

_DEFAULTS = EngineOptions()

__all__ = ["for_each", "in_background", "release_free_memory", "run_groups", "session_threads", "weight_bytes", "workers"]

S = TypeVar("S")


def workers(cpus: int | None = None, weight_bytes: int = 0, options: EngineOptions | None = None) -> int:
    """Worker threads for ``cpus`` cores (default: the cores this process may use): one per core, at most
    ``options.max_workers``; one for models of ``weight_bytes`` >= ``options.one_worker_bytes``;
    exactly ``options.pipeline_workers`` where that is set."""
    options = options or _DEFAULTS
    if options.pipeline_workers is not None:
        return options.pipeline_workers
    cpus = available_cpus() if cpus is None else cpus
    if weight_bytes >= options.one_worker_bytes:
        return 1
    return max(1, min(options.max_workers, cpus))


def session_threads(cpus: int | None = None, weight_bytes: int = 0, options: EngineOptions | None = None) -> int:
    """onnxruntime intra-op threads per session so that :func:`workers` workers fill the cores
    (never onnxruntime's default of every core: ``--workers`` processes share the machine)."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, cpus // workers(cpus, weight_bytes, options))


def weight_bytes(*models: Any) -> int:
    """The models' (:class:`qdiff.graph.LoadedModel`) initializer bytes together (on disk or
    not): decides the pipeline's workers (``EngineOptions.one_worker_bytes``)."""
    from qdiff.graph import initializer_bytes

    return sum(initializer_bytes(m.proto) for m in models)


def in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` on a thread of its own, as a Future: set-up work (onnxruntime building a
    session or optimising a graph, which releases the GIL) that overlaps the caller's own.
    An exception is raised by the Future's ``result()``."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdiff-setup")
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


def for_each(states: list[S], fn: Callable[[S], Any]) -> None:
    """``fn(state)`` for every state, each on a thread of its own (the last on the calling thread):
    the workers' final reductions (rows their folders still buffer) run side by side instead of
    one after the other on the caller's thread after the groups. Exceptions are raised."""
    if len(states) < 2:
        for state in states:
            fn(state)
        return
    with ThreadPoolExecutor(max_workers=len(states) - 1, thread_name_prefix="qdiff-run") as pool:
        pending = [pool.submit(fn, state) for state in states[:-1]]
        fn(states[-1])
        for future in pending:
            future.result()


def release_free_memory() -> None:
    """Hand memory freed by the set-up (check sessions, the first group) back to the OS before the
    workers start, so it does not add to their peak (glibc's ``malloc_trim``; elsewhere nothing)."""
    global _trim
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # musl or another libc: nothing to call
                pass
    if _trim:
        _trim(0)


_trim: Any = None


def run_groups(
    groups: Iterable[list],
    work: Callable[[list, S], Any],
    states: list[S],
    done: Callable[[int], None] | None = None,
) -> None:
    """Call ``work(group, state)`` for every group on ``len(states)`` threads.

    Each thread holds one state at a time (a state is never used by two threads at once), so
    ``work`` may fold into it without locks. ``done(len(group))`` is called in the calling thread
    as groups finish. At most two groups per thread are taken from ``groups`` ahead of the work,
    so a lazy source stays lazy. The first exception raised by ``work`` is raised here, after the
    groups not yet started are dropped and the running ones have finished.
    """
    if not states:
        raise ValueError("run_groups needs at least one state")
    free: queue.SimpleQueue = queue.SimpleQueue()
    for state in states:
        free.put(state)

    def task(group: list) -> int:
        state = free.get()
        try:
            work(group, state)
        finally:
            free.put(state)
        return len(group)

    def finish(futures) -> None:
        for future in futures:
            n = future.result()
            if done is not None:
                done(n)

    pending: set = set()
    with ThreadPoolExecutor(max_workers=len(states), thread_name_prefix="qdiff-run") as pool:
        try:
            for group in groups:
                if len(pending) >= 2 * len(states):
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    finish(finished)
                pending.add(pool.submit(task, group))
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                finish(finished)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
