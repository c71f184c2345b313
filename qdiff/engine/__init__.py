"""The measuring engine: sessions, batching, taps, folding and the measuring loop.

compare (:mod:`qdiff._compare`) and sensitivity (:mod:`qdiff._sensitivity`) measure through it;
nothing here imports them (arrows: _compare/_sensitivity -> engine -> graph/matching/metrics/structs).

Data flow::

    load_pair (loop)         both models, input check, session factory (sessions)
      |
    taps                     what is read: integer taps of DequantizeLinear inputs, tap sizes
    prefuse                  onnxruntime's fused graph where it pays (optimized_model via sessions),
      |                      its taps checked against the unfused taps on the first run
    engines                  NumpyEngine (tapped models through a Batcher) or FusedEngine (one
      |                      merged graph, fused.py); a group of runs -> Steps (folding)
    batching                 Batcher: runs concatenated along axis 0 where that changes nothing
      |
    loop.measure             first group alone (settles batching, fused taps, deployed check),
      |                      the rest over pipeline.run_groups' W workers, each folding into its
      |                      own state (folding: Folds/RowFolder -> kernels), flushed side by side,
      |                      merged exactly
    loop.measure_pair        compare's pass -> Measured;  sharding: the same per process, merged

:class:`EngineOptions` (options) holds every tunable; it is passed down explicitly.
The package imports nothing heavy: :func:`measure` is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qdiff.engine.options import EngineOptions

if TYPE_CHECKING:
    from qdiff.engine.loop import measure

__all__ = ["EngineOptions", "measure"]


def __getattr__(name: str) -> Any:
    if name == "measure":
        from qdiff.engine.loop import measure

        return measure
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
