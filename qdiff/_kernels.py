"""Compiled metric reductions: every metric of many samples in one pass over the data.

The numpy path (:func:`qdiff.metrics.sample_metrics` / :func:`~qdiff.metrics.sample_metrics_rows`)
makes some twenty passes over float64 copies of each tensor pair, ~20 ns per element pair here:
more than the two models take to compute the tensors. The C extension ``qdiff._ckernels``
(built from ``qdiff/_ckernels.c`` at install; see its header) reads the tapped arrays as they
come out of onnxruntime (float32, or the integer output of a QuantizeLinear, dequantized on the
fly exactly as DequantizeLinear does) and computes in one pass, per chunk of a row:
Σr², Σc², Σrc, Σ(r-c)², Σ|r-c|, max|r-c| in float64 and the two ``KL_BINS``-bin histograms over
the row's shared value range (found beforehand with numpy's SIMD min/max), with the binning
formula of the numpy path. 8-bit candidates are histogrammed by counting their 256 codes.

Each row is cut into fixed chunks of :data:`CHUNK` elements and the chunk partials are added in
chunk order, so a row's values depend on that row alone: not on which rows share the call, how
many threads ran, or how the samples were batched or sharded. Rows the fast formulas do not
cover (NaN/Inf, sums outside the normal float64 range, a subnormal value range) go to
:func:`qdiff.metrics.sample_metrics`, exactly as in the numpy path; the other values agree with
the numpy path to float64 rounding (the summation order differs).

The extension is loaded with ctypes, which releases the GIL during a call: large calls are split
across two threads. Where the extension was not built, or with ``QDIFF_KERNELS=numpy`` in the
environment, :func:`available` is False and callers use the numpy path.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from typing import Any

import numpy as np

from qdiff import metrics
from qdiff.runner import available_cpus
from qdiff.structs import DequantParams

__all__ = ["CHUNK", "available", "row_metrics", "unavailable_reason"]

#: elements per chunk of a row (a row's partial sums are combined in this fixed order)
CHUNK = 1 << 14
#: calls with fewer element pairs than this stay on one thread
_THREADED_MIN = 1 << 16

_TYPES = {
    np.dtype(np.float32): 0,
    np.dtype(np.float64): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.uint8): 3,
    np.dtype(np.int16): 4,
    np.dtype(np.uint16): 5,
}

_lock = threading.Lock()
_lib: Any = None
_reason: str | None = None
_pool: Any = None


def available() -> bool:
    """True when the compiled kernels can be used (extension built, not disabled)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _reason


def _load() -> Any:
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        if os.environ.get("QDIFF_KERNELS", "").strip().lower() == "numpy":
            _reason = "disabled by QDIFF_KERNELS=numpy"
            return None
        spec = importlib.util.find_spec("qdiff._ckernels")
        if spec is None or not spec.origin:
            _reason = "the C extension qdiff._ckernels was not built (no C compiler at install?)"
            return None
        try:
            lib = ctypes.CDLL(spec.origin)
        except OSError as exc:
            _reason = f"the C extension qdiff._ckernels could not be loaded ({exc})"
            return None
        p, i64, f32, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int
        lib.qd_chunks.argtypes = [p, i32, p, i32, f32, f32, i64, i64, i64, i64, p, p, p, i64, i64, p, p]
        lib.qd_chunks.restype = i32
        lib.qd_finish.argtypes = [p, p, i64, i64, i64, i64, p, f64, f64, f64, p, p]
        lib.qd_finish.restype = None
        _lib = lib
        return _lib


def _threads() -> Any:
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdiff-metrics")
    return _pool


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def row_metrics(
    refs: np.ndarray, cands: np.ndarray, dequant: DequantParams | None = None, bins: int = metrics.KL_BINS
) -> tuple[np.ndarray, list[int], list[metrics.SampleMetrics]] | None:
    """The metrics of each row of two ``[k, n]`` stacks (each row one sample), compiled.

    ``cands`` may hold the integer output of a QuantizeLinear with ``dequant`` its per-tensor scale
    and zero point (per-channel taps are dequantized by the caller, in their own layout).

    Returns:
        ``(values, slow_rows, slow_metrics)``: ``values[i]`` is ``(cosine, mse, mae, max_abs,
        sqnr_db, kl)`` of row ``i`` for every row not in ``slow_rows``; the rows in ``slow_rows``
        (NaN/Inf, sums outside the normal float64 range, a subnormal value range) were computed
        by :func:`qdiff.metrics.sample_metrics`, in ``slow_metrics``. None when the compiled
        kernels are unavailable (the caller then uses the numpy path).
    """
    lib = _load()
    if lib is None:
        return None
    refs = np.asarray(refs)
    cands = np.asarray(cands)
    if refs.ndim != 2 or cands.shape != refs.shape:
        raise ValueError(f"expected two [k, n] stacks of the same shape, got {refs.shape} and {cands.shape}")
    if dequant is not None and dequant.per_channel:
        raise ValueError("row_metrics takes per-tensor dequantization only; dequantize per-channel taps first")
    k, n = refs.shape
    int_dq = cands.dtype.kind in "iu" and dequant is not None

    def careful(i: int) -> metrics.SampleMetrics:
        return metrics.sample_metrics(refs[i], dequant.dequantize(cands[i]) if int_dq else cands[i])

    if k == 0 or n == 0:
        return np.empty((k, 6)), list(range(k)), [careful(i) for i in range(k)]
    scale, zp = np.float32(1.0), np.float32(0.0)
    r = refs.astype(np.float32) if refs.dtype == np.float16 else refs
    if int_dq and cands.dtype in _TYPES and r.dtype == np.float32:
        c = cands
        scale = np.float32(np.asarray(dequant.scale).reshape(-1)[0])
        zp = np.float32(np.asarray(dequant.zero_point).reshape(-1)[0])
        if not scale > 0:  # not valid ONNX; dequantize here (the range shortcut needs scale > 0)
            c = dequant.dequantize(cands)
    else:
        c = dequant.dequantize(cands) if int_dq else cands
        if c.dtype == np.float16:
            c = c.astype(np.float32)
    if r.dtype != np.float32 or c.dtype.kind == "f" and c.dtype != np.float32:
        r, c = r.astype(np.float64), c.astype(np.float64)
    r = np.ascontiguousarray(r)
    c = np.ascontiguousarray(c)
    deq = c.dtype.kind in "iu"
    # each row's shared value range (numpy's SIMD min/max; for integer taps the dequantized range
    # of the codes, dequantization being monotonic for a positive scale)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        c_lo, c_hi = c.min(axis=1), c.max(axis=1)
        if deq:
            c_lo, c_hi = (c_lo.astype(np.float32) - zp) * scale, (c_hi.astype(np.float32) - zp) * scale
        lo = np.minimum(r.min(axis=1).astype(np.float64), c_lo)
        hi = np.maximum(r.max(axis=1).astype(np.float64), c_hi)
        has_range = hi > lo
        factor = bins / (hi - lo)
        # binned only where every value is finite (a NaN or Inf makes lo or hi non-finite): the
        # C binning relies on it
        todo = has_range & np.isfinite(factor) & np.isfinite(lo) & np.isfinite(hi)
    lo = np.ascontiguousarray(np.where(todo, lo, 0.0))
    factor = np.ascontiguousarray(np.where(todo, factor, 0.0))
    todo_u8 = todo.astype(np.uint8)
    n_chunks = (n + CHUNK - 1) // CHUNK
    jobs = k * n_chunks
    parts = np.empty((jobs, 6))
    hist = np.zeros((jobs, 2, bins), dtype=np.int64)
    head = (_ptr(r), _TYPES[r.dtype], _ptr(c), _TYPES[c.dtype], scale, zp, k, n, CHUNK, bins)
    tail = (_ptr(lo), _ptr(factor), _ptr(todo_u8))
    if k * n >= _THREADED_MIN and jobs > 1 and available_cpus() > 1:
        half = jobs // 2
        pending = _threads().submit(lib.qd_chunks, *head, *tail, half, jobs, _ptr(parts), _ptr(hist))
        rc1 = lib.qd_chunks(*head, *tail, 0, half, _ptr(parts), _ptr(hist))
        rc2 = pending.result()
    else:
        rc1 = lib.qd_chunks(*head, *tail, 0, jobs, _ptr(parts), _ptr(hist))
        rc2 = 0
    if rc1 or rc2:  # pragma: no cover - the type table above only passes supported pairs
        raise RuntimeError(f"unsupported dtypes {r.dtype}/{c.dtype} for the compiled kernels")
    res = np.empty((k, 6))
    ok = np.empty(k, dtype=np.uint8)
    tiny = float(np.finfo(np.float64).tiny)
    lib.qd_finish(
        _ptr(parts), _ptr(hist), k, n, CHUNK, bins, _ptr(todo_u8), tiny, metrics.SQNR_CAP_DB, metrics.EPS,
        _ptr(res), _ptr(ok),
    )
    # a range too narrow to bin (subnormal width) takes the careful path, as in numpy
    good = ok.astype(bool) & (todo | ~has_range)
    slow_rows = np.flatnonzero(~good).tolist()
    return res, slow_rows, [careful(i) for i in slow_rows]
