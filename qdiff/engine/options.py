"""The measuring engine's tunables, in one frozen record passed down explicitly.

:func:`qdiff.compare` and :func:`qdiff.sensitivity` take it as their internal ``engine_options``
keyword (default :class:`EngineOptions`\\ ``()``); tests pass other values instead of patching
module constants. None of these change a result's numbers: they trade time against memory.
Figures behind the defaults are in ``bench/RESULTS.md`` (measuring engine).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """Tunables of batching, prefusing, folding and the worker pipeline.

    Attributes:
        group_bytes: the tapped tensors of one group of runs stay within this many bytes (static
            estimate). Groups are what onnxruntime runs at once where the models' batch axis
            allows it, and each pipeline worker holds one: per-group overhead against memory.
        group_max_runs: at most this many runs in one group.
        min_groups: a data set of known size is cut into at least this many groups (where runs
            allow), so that the pipeline's workers share a small data set.
        checked_runs: runs of the first group that are also run alone, to check that batching
            changes nothing.
        prefuse_max_bytes: quantized models with more initializer bytes than this (or with
            weights on disk) are never optimised by onnxruntime for fused taps, and their
            deployed-model check opens after the tapped sessions close (peak memory).
        prefuse_min_macs: fewer multiply-accumulates than this over all runs: the models are
            tapped as given (the fused graph does not repay its fixed cost, see
            :func:`qdiff.engine.prefuse.prefuse_pays`).
        rows_max_elements: tensors up to this many elements are reduced many samples at a time
            (per-call overhead dominates small tensors).
        rows_max: at most this many rows buffered per tensor pair.
        rows_buffer_bytes: a pair's buffer stays within this many bytes of float64 (cache sized;
            also bounds memory per pair).
        isolated_rows_buffer_bytes: ``rows_buffer_bytes`` of sensitivity's folders, which buffer
            rows of every size (many more pairs: a smaller buffer each).
        due_copies_max: a RowFolder reduces what is due before its concatenated buffers pass
            this many bytes.
        max_workers: at most this many pipeline worker threads (each holds one group's taps).
        one_worker_bytes: models whose weights (float and quantized together) reach this run on
            one worker whose sessions use every core.
        pipeline_workers: run exactly this many pipeline workers (None: one per core within
            ``max_workers``, see :func:`qdiff.engine.pipeline.workers`).
    """

    group_bytes: int = 12 << 20
    group_max_runs: int = 64
    min_groups: int = 8
    checked_runs: int = 2
    prefuse_max_bytes: int = 256 << 20
    prefuse_min_macs: float = 7.5e9
    rows_max_elements: int = 4096
    rows_max: int = 64
    rows_buffer_bytes: int = 1 << 18
    isolated_rows_buffer_bytes: int = 1 << 15
    due_copies_max: int = 2 << 20
    max_workers: int = 4
    one_worker_bytes: int = 1 << 30
    pipeline_workers: int | None = None
