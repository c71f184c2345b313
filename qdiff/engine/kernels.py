"""Compiled metric reductions: every metric of many samples in one pass over the data.

The numpy path (:func:`qdiff.metrics.sample_metrics` / :func:`~qdiff.metrics.sample_metrics_rows`)
makes some twenty passes over float64 copies of each tensor pair: more than the two models take
to compute the tensors (figures in bench/RESULTS.md). The C extension ``qdiff._ckernels``
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
import logging
import os
import threading
from typing import Any

import numpy as np

from qdiff import metrics
from qdiff.engine.sessions import available_cpus
from qdiff.structs import DequantParams

__all__ = ["CHUNK", "available", "column_sums", "many_row_metrics", "row_metrics", "unavailable_reason"]

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

log = logging.getLogger(__name__)

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


#: the module the kernels load from (tests point it at broken ones)
_MODULE = "qdiff._ckernels"


class _NotBuilt(Exception):
    pass


def _load() -> Any:
    """The extension's ctypes library, or None with :data:`_reason` saying why.

    Any failure to load it (not built, a file that is no shared library, a stale build missing a
    symbol, an import-system error) means the numpy path runs: nothing here raises.
    """
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        if os.environ.get("QDIFF_KERNELS", "").strip().lower() == "numpy":
            _reason = "disabled by QDIFF_KERNELS=numpy"
            return None
        try:
            _lib = _open(_MODULE)
        except _NotBuilt:
            _reason = f"the C extension {_MODULE} was not built (no C compiler at install?)"
        except Exception as exc:  # noqa: BLE001 - whatever the failure, the numpy path runs
            first = (str(exc).splitlines() or [""])[0][:200]
            _reason = f"the C extension {_MODULE} could not be loaded ({type(exc).__name__}: {first}); reinstall qdiff to rebuild it"
            log.warning("%s; using the numpy path", _reason)
        return _lib


def _open(module: str) -> Any:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise _NotBuilt(module)
    lib = ctypes.CDLL(spec.origin)
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.qd_many.argtypes = [i64, p, p, p, p, i64, i64, f64, f64, f64]
    lib.qd_many.restype = i32
    lib.qd_col_sums.argtypes = [p, p, i64, i64, p, p, p]
    lib.qd_col_sums.restype = None
    return lib


def _threads() -> Any:
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdiff-metrics")
    return _pool


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


Rows = tuple[np.ndarray, list[int], list[metrics.SampleMetrics]]


def row_metrics(
    refs: np.ndarray, cands: np.ndarray, dequant: DequantParams | None = None, bins: int = metrics.KL_BINS,
    threads: int | None = None,
) -> Rows | None:
    """The metrics of each row of two ``[k, n]`` stacks (each row one sample), compiled.

    ``cands`` may hold the integer output of a QuantizeLinear with ``dequant`` its per-tensor scale
    and zero point (per-channel taps are dequantized by the caller, in their own layout).
    ``threads``: 1 keeps the call on the calling thread (a pipeline worker); None splits calls
    of several large rows over two threads where there are two cores. ``bins=0``: no histograms
    (kl is 0.0 in ``values``; the other five are the same bits), for callers that do not report KL.

    Returns:
        ``(values, slow_rows, slow_metrics)``: ``values[i]`` is ``(cosine, mse, mae, max_abs,
        sqnr_db, kl)`` of row ``i`` for every row not in ``slow_rows``; the rows in ``slow_rows``
        (NaN/Inf, sums outside the normal float64 range, a subnormal value range) were computed
        by :func:`qdiff.metrics.sample_metrics`, in ``slow_metrics``. None when the compiled
        kernels are unavailable (the caller then uses the numpy path).
    """
    got = many_row_metrics([(refs, cands, dequant)], bins, threads)
    return None if got is None else got[0]


class _Task:
    """One stack made ready for the kernels (operands in the types they take)."""

    __slots__ = ("refs", "cands", "dequant", "int_dq", "r", "c", "scale", "zp", "res")

    def __init__(self, refs: np.ndarray, cands: np.ndarray, dequant: DequantParams | None):
        refs = np.asarray(refs)
        cands = np.asarray(cands)
        if refs.ndim != 2 or cands.shape != refs.shape:
            raise ValueError(f"expected two [k, n] stacks of the same shape, got {refs.shape} and {cands.shape}")
        if dequant is not None and dequant.per_channel:
            raise ValueError("row_metrics takes per-tensor dequantization only; dequantize per-channel taps first")
        self.refs, self.cands, self.dequant = refs, cands, dequant
        self.int_dq = cands.dtype.kind in "iu" and dequant is not None
        self.res: np.ndarray | None = None
        if refs.size == 0:
            return
        scale, zp = _ONE, _ZERO
        r = refs.astype(np.float32) if refs.dtype == np.float16 else refs
        if self.int_dq and cands.dtype in _TYPES and r.dtype == np.float32:
            c = cands
            scale = np.float32(np.asarray(dequant.scale).reshape(-1)[0])
            zp = np.float32(np.asarray(dequant.zero_point).reshape(-1)[0])
            if not scale > 0:  # not valid ONNX; dequantize here (the range shortcut needs scale > 0)
                c = dequant.dequantize(cands)
        else:
            c = dequant.dequantize(cands) if self.int_dq else cands
            if c.dtype == np.float16:
                c = c.astype(np.float32)
        if r.dtype != np.float32 or c.dtype.kind == "f" and c.dtype != np.float32:
            r, c = r.astype(np.float64), c.astype(np.float64)
        self.r, self.c = np.ascontiguousarray(r), np.ascontiguousarray(c)
        self.scale, self.zp = scale, zp
        self.res = np.empty((refs.shape[0], 7))

    def careful(self, i: int) -> metrics.SampleMetrics:
        c = self.cands[i]
        return metrics.sample_metrics(self.refs[i], self.dequant.dequantize(c) if self.int_dq else c)

    def result(self) -> Rows:
        k = self.refs.shape[0]
        if self.res is None:
            return np.empty((k, 6)), list(range(k)), [self.careful(i) for i in range(k)]
        good = self.res[:, 6]
        slow_rows = [] if good.all() else np.flatnonzero(good == 0).tolist()
        return self.res[:, :6], slow_rows, [self.careful(i) for i in slow_rows]


_ONE, _ZERO = np.float32(1.0), np.float32(0.0)


def many_row_metrics(
    stacks: list[tuple[np.ndarray, np.ndarray, DequantParams | None]], bins: int = metrics.KL_BINS,
    threads: int | None = None,
) -> list[Rows] | None:
    """:func:`row_metrics` of many ``(refs, cands, dequant)`` stacks in one call of the kernels.

    Used once per group of runs for all its tensor pairs: the Python cost of a call is paid once,
    and the GIL is released for the whole reduction. With ``threads`` other than 1 and two cores,
    the stacks (or the rows of a single stack) are split over two threads by element count.
    """
    lib = _load()
    if lib is None:
        return None
    tasks = [_Task(r, c, d) for r, c, d in stacks]
    # jobs: (r, c, res, scale, zp) row ranges; one stack of several rows is cut in two halves so
    # that both threads have work (rows are independent: the same bits either way)
    jobs = [(t.r, t.c, t.res, t.scale, t.zp) for t in tasks if t.res is not None]
    if jobs:
        split = threads != 1 and available_cpus() > 1 and sum(j[0].size for j in jobs) >= _THREADED_MIN
        if split and len(jobs) == 1 and jobs[0][0].shape[0] > 1:
            r, c, res, scale, zp = jobs[0]
            h = r.shape[0] // 2
            jobs = [(r[:h], c[:h], res[:h], scale, zp), (r[h:], c[h:], res[h:], scale, zp)]
        if split and len(jobs) > 1:
            sizes = np.cumsum([j[0].size for j in jobs])
            cut = min(len(jobs) - 1, int(np.searchsorted(sizes, sizes[-1] / 2)) + 1)
            pending = _threads().submit(_many, lib, jobs[cut:], bins)
            codes = [_many(lib, jobs[:cut], bins), pending.result()]
        else:
            codes = [_many(lib, jobs, bins)]
        if any(codes):  # pragma: no cover - the type table above only passes supported pairs
            if -2 in codes:
                raise MemoryError("the compiled kernels could not allocate their scratch")
            raise RuntimeError("unsupported dtypes for the compiled kernels")
    return [t.result() for t in tasks]


def _many(lib: Any, jobs: list[tuple], bins: int) -> int:
    """One call of ``qd_many`` over ``(r, c, res, scale, zp)`` jobs (C-contiguous row ranges)."""
    if not jobs:
        return 0
    n = len(jobs)
    ptrs = (ctypes.c_void_p * (2 * n))()
    res_ptrs = (ctypes.c_void_p * n)()
    ints = np.empty(4 * n, dtype=np.int64)
    qp = np.empty(2 * n, dtype=np.float32)
    for i, (r, c, res, scale, zp) in enumerate(jobs):
        ptrs[2 * i], ptrs[2 * i + 1], res_ptrs[i] = _ptr(r), _ptr(c), _ptr(res)
        ints[4 * i : 4 * i + 4] = (_TYPES[r.dtype], _TYPES[c.dtype], r.shape[1], r.shape[0])
        qp[2 * i], qp[2 * i + 1] = scale, zp
    return lib.qd_many(n, ptrs, res_ptrs, _ptr(ints), _ptr(qp), CHUNK, bins, _TINY, metrics.SQNR_CAP_DB, metrics.EPS)


def column_sums(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per-column Σr², Σc², Σrc of two ``[rows, cols]`` float32 matrices in float64, compiled,
    without transposing them; None when the kernels are unavailable or the operands are not
    C-contiguous float32. Each column runs down the rows in order within two fixed halves of the
    rows, added at the end."""
    lib = _load()
    if lib is None or ref.dtype != np.float32 or cand.dtype != np.float32 or ref.shape != cand.shape or ref.ndim != 2:
        return None
    if not (ref.flags.c_contiguous and cand.flags.c_contiguous):
        return None
    rows, cols = ref.shape
    sums = np.zeros((2, 3, cols))
    # two halves of the rows whatever the machine (the same bits on one core or many); the
    # second in a thread where there is a second core
    halves = [(0, rows // 2), (rows // 2, rows)]

    def part(k: int) -> None:
        lo, hi = halves[k]
        lib.qd_col_sums(_ptr(ref[lo:hi]), _ptr(cand[lo:hi]), hi - lo, cols, *(_ptr(sums[k, j]) for j in range(3)))

    if ref.size >= _THREADED_MIN and available_cpus() > 1:
        pending = _threads().submit(part, 1)
        part(0)
        pending.result()
    else:
        part(0)
        part(1)
    # the two halves are added in a fixed order: the same bits whichever thread ran which
    total = sums[0] + sums[1]
    return total[0], total[1], total[2]
