"""Sharding the samples across worker processes (or a ``concurrent.futures`` executor).

Each shard loads both models, matches them and runs :func:`~qdiff.engine.loop.measure_pair`
on every k-th group of runs; the parent merges the shards' :class:`~qdiff.engine.loop.Measured`
exactly. Local workers ignore SIGINT (the parent handles Ctrl-C and stops them) and exit when the
parent dies.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import onnx

from qdiff.engine import pipeline
from qdiff.engine.loop import Measured, measure_pair
from qdiff.engine.options import EngineOptions
from qdiff.engine.sessions import SessionOptions, available_cpus, default_session_factory
from qdiff.errors import QdiffError, UsageError
from qdiff.graph import Graph, ModelLike, load_model
from qdiff.inputs import input_specs, make_source
from qdiff.matching import match_models, no_weight_values

__all__ = ["local_workers", "measure_sharded", "portable"]

log = logging.getLogger(__name__)


def portable(model: ModelLike) -> Any:
    """A model argument that pickles cheaply to a worker process."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return os.fspath(model)


def shard_worker(payload: tuple) -> Measured:
    """Run one shard in a worker process (module-level so it pickles)."""
    f_model, q_model, data, tensor_map, shard, engine, provider, cpus, source_kwargs, max_memory, options = payload
    cpus = cpus or None  # 0: every core of the machine the shard runs on
    if isinstance(f_model, bytes):
        f_model = onnx.load_from_string(f_model)
    if isinstance(q_model, bytes):
        q_model = onnx.load_from_string(q_model)
    f_loaded = load_model(f_model, role="float model")
    q_loaded = load_model(q_model, role="quantized model")
    fg, qg = Graph(f_loaded.proto), Graph(q_loaded.proto)
    matching = match_models(fg, qg, tensor_map, weigh=no_weight_values)  # weight values: not needed here
    threads = pipeline.session_threads(cpus, pipeline.weight_bytes(f_loaded, q_loaded), options)
    factory = default_session_factory(SessionOptions(provider=provider, intra_op_threads=threads))
    source = make_source(data, input_specs(fg), shard=shard, **source_kwargs)
    return measure_pair(
        factory, f_loaded, q_loaded, fg, list(matching.pairs), list(matching.outputs), source, engine, None, max_memory,
        qg, cpus, options=options,
    )  # fmt: skip


def measure_sharded(
    float_model, quant_model, data, tensor_map, workers, engine, options, source_kwargs, n_pairs, n_outputs, progress,
    max_memory=None, executor=None, total_runs: int | None = None, engine_options: EngineOptions | None = None,
) -> Measured:
    """Shard the samples across ``workers`` processes (or ``executor``) and merge their accumulators.

    Local processes are capped by :func:`local_workers` (cores, groups of runs). They ignore
    SIGINT (the parent handles Ctrl-C and stops them) and exit when the parent dies
    (:func:`_worker_init`).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if options.provider == "custom session factory":
        raise UsageError("--workers cannot be combined with a custom session factory")
    if data is not None and not isinstance(data, (str, os.PathLike, Mapping)):
        raise UsageError("--workers needs data as a file, a folder or a dict of arrays (an iterator cannot be shared)")
    if executor is not None and not callable(getattr(executor, "map", None)):
        raise UsageError(f"executor must be a concurrent.futures.Executor, not {type(executor).__name__}")
    capped = ""
    if executor is None:
        requested = workers
        workers, capped = local_workers(workers, total_runs, engine_options)
        if capped:
            log.info("--workers %d: running %d worker processes (%s)", requested, workers, capped)
    # local processes share this machine's cores; an executor's workers use their own machines'
    cpus = max(1, available_cpus() // workers) if executor is None else 0
    payloads = [
        (
            portable(float_model), portable(quant_model), data, tensor_map, (k, workers), engine, options.provider,
            cpus, source_kwargs, max_memory, engine_options or EngineOptions(),
        )
        for k in range(workers)
    ]
    merged: Measured | None = None

    def collect(parts) -> None:
        nonlocal merged
        for done, part in enumerate(parts, 1):
            merged = part if merged is None else merged.merge(part)
            if progress is not None:
                progress(done, workers)

    if executor is None:
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
        )
        try:
            with _sigint_ignored():  # the workers spawned here start with SIGINT ignored
                parts = pool.map(shard_worker, payloads)
            collect(parts)
        except BaseException:  # Ctrl-C or a failed shard: stop the others now rather than wait for them
            _stop_workers(pool)
            raise
        pool.shutdown(wait=True)
        where = f"{workers} worker processes ({cpus} core(s) each)"
        if capped:
            where += f"; --workers {requested} capped: {capped}"
    else:
        try:
            collect(executor.map(shard_worker, payloads))
        except QdiffError:
            raise
        except Exception as exc:  # noqa: BLE001 - cluster failures come in many types
            raise UsageError(f"a shard failed on the executor: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        where = f"{workers} shard(s) on {type(executor).__name__}"
    assert merged is not None
    merged.notes.append(f"samples sharded across {where}")
    merged.shards = workers
    return merged


def local_workers(requested: int, total_runs: int | None, options: EngineOptions | None = None) -> tuple[int, str]:
    """How many local worker processes to start for ``--workers requested``, and why fewer ('' if not).

    At most one per available core (more only share the cores and each loads both models), and at
    most the fewest groups of runs the data can make (a shard takes whole groups: with
    ``total_runs`` known, :class:`~qdiff.engine.batching.Batcher` groups at most
    ``ceil(total / options.min_groups)`` runs, up to ``options.group_max_runs``), so that no
    process starts without a group to run.
    """
    options = options or EngineOptions()
    cores = available_cpus()
    n, why = requested, []
    if n > cores:
        n = cores
        why.append(f"{cores} core(s) available")
    if total_runs:
        per_group = max(1, min(options.group_max_runs, -(-total_runs // options.min_groups)))
        groups = -(-total_runs // per_group)
        if n > groups:
            n = groups
            why.append(f"the {total_runs} run(s) make as few as {groups} group(s)")
    return max(1, n), ", ".join(why)


class _sigint_ignored:
    """Ignore SIGINT while worker processes are spawned (from the main thread; a no-op elsewhere).

    Python installs its KeyboardInterrupt handler only where SIGINT is not ignored at start-up, so
    a worker spawned meanwhile ignores Ctrl-C from its first instruction (no traceback from a
    worker still importing); :func:`_worker_init` ignores it again for other start methods.
    """

    def __enter__(self) -> None:
        import signal
        import threading

        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def _worker_init(parent: int) -> None:
    """Set up a local worker process: ignore SIGINT, and exit when the parent process dies.

    On Linux the kernel kills the worker when its parent dies (``prctl(PR_SET_PDEATHSIG,
    SIGKILL)``); everywhere a daemon thread also polls ``os.getppid()`` and exits when the parent
    is gone (a killed parent cannot shut its pool down: its workers would run to the end).
    """
    import signal
    import sys
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="qdiff-parent-watch", daemon=True).start()


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(1)


def _stop_workers(pool: Any) -> None:
    """Cancel what has not started and end a process pool's workers now (they hold no state worth keeping)."""
    pool.shutdown(wait=False, cancel_futures=True)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
