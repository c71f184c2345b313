"""Compiled metric reductions: every metric of many samples in one pass over the data.

The numpy path (:func:`qdiff.metrics.sample_metrics` / :func:`~qdiff.metrics.sample_metrics_rows`)
makes some twenty passes over float64 copies of each tensor pair, ~20 ns per element pair here:
more than the two models take to compute the tensors. The C extension ``qdiff._ckernels``
(built from ``qdiff/_ckernels.c`` at install; see its header) reads the tapped arrays as they
come out of onnxruntime (float32, or the integer output of a QuantizeLinear, dequantized on the
fly exactly as DequantizeLinear does) and computes in one pass, per chunk of a row:
Σr², Σc², Σrc, Σ(r-c)², Σ|r-c|, max|r-c| in float64 and the row's value range; then, in a
second pass over the row while it is still in cache, the two ``KL_BINS``-bin histograms over
that shared range, with the binning formula of the numpy path. 8-bit candidates are
histogrammed by counting their 256 codes.

Each row is cut into fixed chunks of :data:`CHUNK` elements and the chunk partials are added in
chunk order, so a row's values depend on that row alone: not on which rows share the call, how
many threads ran, or how the samples were batched or sharded. Rows the fast formulas do not
cover (NaN/Inf, sums outside the normal float64 range, a subnormal value range) go to
:func:`qdiff.metrics.sample_metrics`, exactly as in the numpy path; the other values agree with
the numpy path to float64 rounding (the summation order differs).

The extension is loaded with ctypes, which releases the GIL during a call: large calls of several
rows are split across two threads. Where the extension was not built, or with ``QDIFF_KERNELS=numpy`` in the
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

_TINY = float(np.finfo(np.float64).tiny)

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
        lib.qd_metrics.argtypes = [p, i32, p, i32, f32, f32, i64, i64, i64, i64, i64, f64, f64, f64, p]
        lib.qd_metrics.restype = i32
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
    refs: np.ndarray, cands: np.ndarray, dequant: DequantParams | None = None, bins: int = metrics.KL_BINS,
    threads: int | None = None,
) -> tuple[np.ndarray, list[int], list[metrics.SampleMetrics]] | None:
    """The metrics of each row of two ``[k, n]`` stacks (each row one sample), compiled.

    ``cands`` may hold the integer output of a QuantizeLinear with ``dequant`` its per-tensor scale
    and zero point (per-channel taps are dequantized by the caller, in their own layout).
    ``threads``: 1 keeps the call on the calling thread (a pipeline worker); None splits calls
    of several large rows over two threads where there are two cores.

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
    res = np.empty((k, 7))
    head = (_ptr(r), _TYPES[r.dtype], _ptr(c), _TYPES[c.dtype], scale, zp, n, CHUNK, bins)
    tail = (_TINY, metrics.SQNR_CAP_DB, metrics.EPS, _ptr(res))
    if threads != 1 and k > 1 and k * n >= _THREADED_MIN and available_cpus() > 1:
        half = k // 2
        pending = _threads().submit(lib.qd_metrics, *head, half, k, *tail)
        rc1 = lib.qd_metrics(*head, 0, half, *tail)
        rc2 = pending.result()
    else:
        rc1, rc2 = lib.qd_metrics(*head, 0, k, *tail), 0
    if rc1 or rc2:  # pragma: no cover - the type table above only passes supported pairs
        if -2 in (rc1, rc2):
            raise MemoryError("the compiled kernels could not allocate their scratch")
        raise RuntimeError(f"unsupported dtypes {r.dtype}/{c.dtype} for the compiled kernels")
    good = res[:, 6]
    slow_rows = [] if good.all() else np.flatnonzero(good == 0).tolist()
    res = res[:, :6]
    return res, slow_rows, [careful(i) for i in slow_rows]
