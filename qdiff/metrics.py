"""Streaming comparison metrics between a reference and a candidate tensor.

This module is the numeric core of qdiff.  It compares the tensor produced by
the float (*reference*) model with the tensor produced by the quantized
(*candidate*) model, for one sample at a time, and aggregates the per-sample
results over a data set without keeping the samples.

Design:

* **Pure numpy.**  Only numpy and the standard library are imported, so the
  metrics can be used (and tested) without onnx, onnxruntime, pandas,
  matplotlib or rich installed.
* **Three layers.**

  1. Pure functions :func:`cosine`, :func:`mse`, :func:`mae`,
     :func:`max_abs`, :func:`sqnr_db` and :func:`kl_divergence` take two
     finite arrays with the same number of elements (shapes may differ, both
     are flattened) and return a Python ``float``.
  2. :func:`sample_metrics` computes all of them for one sample with a few
     vectorised passes, converting each input to float64 exactly once.
     Element pairs where either side is NaN or +/-Inf are excluded and
     counted; a fast path skips building masks when every value is finite.
  3. :class:`TensorAccumulator` folds :class:`SampleMetrics` into O(1) state
     (sums, counts, minima, maxima) and can be merged with another
     accumulator, e.g. one filled by another worker.
     :class:`Top1Accumulator` does the same for argmax agreement of
     class-score outputs.

* **Degenerate inputs have defined values, never NaN.**  Zero vectors,
  constant tensors, empty tensors and extreme magnitudes are handled
  explicitly (documented per function).  SQNR is capped at
  +/-:data:`SQNR_CAP_DB`.  When no finite element pair exists, per-sample
  metrics are ``None`` and the summary says why in ``note``.
* **Exact, order-independent aggregation.**  Means in
  :class:`TensorAccumulator` are kept as exact fixed-point integer sums
  (every finite float64 is an integer multiple of 2**-1074), so the reported
  mean is the correctly rounded mean of the per-sample values and
  ``a.merge(b)`` is bit-for-bit identical to one accumulator that saw both
  streams, however the stream was split.

All arithmetic is done in float64.  Inputs may be float16, float32, float64,
integer or boolean arrays (or anything :func:`numpy.asarray` accepts);
complex inputs are rejected.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "EPS",
    "KL_BINS",
    "SQNR_CAP_DB",
    "SampleMetrics",
    "TensorAccumulator",
    "TensorSummary",
    "Top1Accumulator",
    "cosine",
    "kl_divergence",
    "looks_like_class_scores",
    "mae",
    "max_abs",
    "mse",
    "rows_from_sums",
    "sample_metrics",
    "sqnr_db",
]

#: Magnitude cap for :func:`sqnr_db`, in decibels.
SQNR_CAP_DB: float = 200.0
#: Default number of equal-width histogram bins for :func:`kl_divergence`.
KL_BINS: int = 128
#: Probability added to every histogram bin in :func:`kl_divergence`.
EPS: float = 1e-10

# Smallest positive normal float64.  Sums of squares below it have lost
# precision to gradual underflow and are recomputed on rescaled data.
_TINY: float = float(np.finfo(np.float64).tiny)

# Elements per chunk when histogramming (512 KiB of float64: stays in cache).
_CHUNK: int = 1 << 16


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------


def _as_float64_pair(
    reference: npt.ArrayLike, candidate: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Convert both inputs to flat float64 arrays (one conversion each).

    Raises:
        TypeError: if either input is complex.
        ValueError: if the inputs have different numbers of elements.
    """
    r = np.asarray(reference)
    c = np.asarray(candidate)
    if r.dtype.kind == "c" or c.dtype.kind == "c":
        raise TypeError(
            f"complex tensors are not supported (reference dtype {r.dtype}, "
            f"candidate dtype {c.dtype})"
        )
    if r.size != c.size:
        raise ValueError(
            "reference and candidate have different numbers of elements: "
            f"reference shape {tuple(r.shape)} ({r.size} elements), "
            f"candidate shape {tuple(c.shape)} ({c.size} elements)"
        )
    # astype(copy=False) is a no-op for float64 input; reshape(-1) is a view
    # for contiguous input.  Neither array is ever written to in place.
    return (
        r.astype(np.float64, copy=False).reshape(-1),
        c.astype(np.float64, copy=False).reshape(-1),
    )


def _finite_pair(
    reference: npt.ArrayLike, candidate: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`_as_float64_pair` but also rejects non-finite values."""
    r, c = _as_float64_pair(reference, candidate)
    for name, a in (("reference", r), ("candidate", c)):
        # A finite sum proves every element finite; an infinite sum may be an
        # overflow of finite values, so only then do the element-wise check.
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(np.add.reduce(a))
        if not math.isfinite(total) and not bool(np.isfinite(a).all()):
            raise ValueError(
                f"{name} contains NaN or Inf; these functions take finite "
                "arrays (use sample_metrics() to exclude and count "
                "non-finite values)"
            )
    return r, c


def _max_abs_value(a: np.ndarray) -> float:
    """max |a| of a non-empty finite array without a temporary |a| array."""
    return max(-float(a.min()), float(a.max()))


# --------------------------------------------------------------------------
# Metric kernels (flat, finite, non-empty float64 arrays)
# --------------------------------------------------------------------------


def _cosine_kernel(
    r: np.ndarray, c: np.ndarray, rr: float, cc: float, rc: float
) -> float:
    """Cosine similarity given precomputed <r,r>, <c,c> and <r,c>."""
    if not (_TINY <= rr < math.inf and _TINY <= cc < math.inf and math.isfinite(rc)):
        r_zero = not bool(r.any())
        c_zero = not bool(c.any())
        if r_zero and c_zero:
            return 1.0
        if r_zero or c_zero:
            return 0.0
        # Overflow or underflow of the dot products: cosine is invariant to
        # scaling each vector, so normalise each by its max |value|.
        rs = r / _max_abs_value(r)
        cs = c / _max_abs_value(c)
        rr = float(np.dot(rs, rs))
        cc = float(np.dot(cs, cs))
        rc = float(np.dot(rs, cs))
    norm2 = rr * cc
    if _TINY <= norm2 < math.inf:
        value = rc / math.sqrt(norm2)  # one rounding less: cos(x, x) == 1.0
    else:
        value = rc / (math.sqrt(rr) * math.sqrt(cc))
    return min(1.0, max(-1.0, value))


def _sqnr_kernel(
    r: np.ndarray, c: np.ndarray, d: np.ndarray, rr: float, dd: float
) -> float:
    """SQNR in dB given d = r - c, <r,r> and <d,d>."""
    if not (_TINY <= rr < math.inf and _TINY <= dd < math.inf):
        if not bool(d.any()):
            return SQNR_CAP_DB  # identical (this includes both all-zero)
        if not bool(r.any()):
            return -SQNR_CAP_DB  # zero signal, nonzero noise
        # Overflow or underflow: the ratio is invariant to scaling both
        # tensors by the same factor.
        s = max(_max_abs_value(r), _max_abs_value(c))
        rs = r / s
        ds = rs - c / s
        rr = float(np.dot(rs, rs))
        dd = float(np.dot(ds, ds))
        if dd == 0.0:
            return SQNR_CAP_DB  # noise negligible at float64 precision
        if rr == 0.0:
            return -SQNR_CAP_DB  # signal negligible next to the noise
    db = 10.0 * (math.log10(rr) - math.log10(dd))
    return min(SQNR_CAP_DB, max(-SQNR_CAP_DB, db))


def _mean_square(d: np.ndarray, dd: float, scale: float) -> float:
    """mean(d**2) given dd = <d,d> and scale = max|d| (for overflow)."""
    n = d.size
    if math.isfinite(dd) or not math.isfinite(scale):
        return dd / n
    t = d / scale
    return float(np.dot(t, t)) / n * scale * scale


def _mean_abs(ad: np.ndarray, scale: float) -> float:
    """mean(ad) for ad >= 0 given scale = max(ad) (for overflow)."""
    value = float(ad.mean())
    if math.isfinite(value) or not math.isfinite(scale):
        return value
    return float((ad / scale).mean()) * scale


def _histogram(
    x: np.ndarray, lo: float, width: float, bins: int, half: bool
) -> np.ndarray:
    """Counts of x in ``bins`` equal bins over [lo, lo + width]; last bin closed.

    Bin of x: ``floor((x - lo) * (bins / width))``, with x == hi (index
    ``bins``) folded into the last bin.  With ``half`` (the true width
    overflowed) ``width`` is the half width and ``x / 2 - lo / 2`` is binned
    instead, which is exact for normal numbers.  Works in cache-sized chunks
    with reused buffers, which avoids full-size temporaries (faster; figures in
    bench/RESULTS.md).
    """
    n = x.size
    counts = np.zeros(bins + 1, dtype=np.intp)
    factor = bins / width
    step = min(n, _CHUNK)
    t_buf = np.empty(step, dtype=np.float64)
    i_buf = np.empty(step, dtype=np.intp)
    for start in range(0, n, step):
        xs = x[start:start + step]
        t = t_buf[: xs.size]
        idx = i_buf[: xs.size]
        if half:
            np.multiply(xs, 0.5, out=t)
            t -= lo * 0.5
        else:
            np.subtract(xs, lo, out=t)
        if math.isfinite(factor):
            t *= factor
        else:  # subnormal width: (x - lo) / width is in [0, 1], no overflow
            t /= width
            t *= bins
        # 0 <= t <= bins * (1 + 2**-52) < bins + 1, so truncation is floor
        # and the largest index is `bins`.
        np.copyto(idx, t, casting="unsafe")
        counts += np.bincount(idx, minlength=bins + 1)
    counts[bins - 1] += counts[bins]
    return counts[:bins]


def _kl_kernel(r: np.ndarray, c: np.ndarray, bins: int) -> float:
    """KL(P||Q) of the value histograms of r (P) and c (Q)."""
    lo = min(float(r.min()), float(c.min()))
    hi = max(float(r.max()), float(c.max()))
    if not hi > lo:
        return 0.0
    width = hi - lo
    half = not math.isfinite(width)
    if half:
        width = hi * 0.5 - lo * 0.5
    p = _histogram(r, lo, width, bins, half) / r.size + EPS
    q = _histogram(c, lo, width, bins, half) / c.size + EPS
    p /= p.sum()
    q /= q.sum()
    kl = float(np.dot(p, np.log(p) - np.log(q)))
    return max(0.0, kl)


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    return int(bins)


# --------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------


def cosine(reference: npt.ArrayLike, candidate: npt.ArrayLike) -> float:
    """Cosine similarity of the flattened tensors.

    ``cosine = <r, c> / (||r|| * ||c||)``, clamped to [-1, 1].

    Special cases:
        * both tensors all-zero -> 1.0;
        * exactly one tensor all-zero -> 0.0;
        * empty tensors -> 1.0;
        * magnitudes whose squares overflow or underflow float64 are handled
          by rescaling each vector by its max |value| (cosine is
          scale-invariant).

    Args:
        reference: Float model's tensor (any shape, any real dtype).
        candidate: Quantized model's tensor, same number of elements.

    Returns:
        The cosine similarity as a Python float in [-1, 1]; never NaN.

    Raises:
        ValueError: if the element counts differ, or an input holds NaN/Inf.
        TypeError: if an input is complex.
    """
    r, c = _finite_pair(reference, candidate)
    if r.size == 0:
        return 1.0
    with np.errstate(over="ignore", under="ignore"):
        return _cosine_kernel(
            r, c, float(np.dot(r, r)), float(np.dot(c, c)), float(np.dot(r, c))
        )


def mse(reference: npt.ArrayLike, candidate: npt.ArrayLike) -> float:
    """Mean squared error ``mean((r - c) ** 2)``.

    Special cases:
        * empty tensors -> 0.0;
        * identical or both-constant-equal tensors -> 0.0;
        * if the true value exceeds the float64 range the result is ``inf``
          (intermediate overflow of the sum alone is avoided by rescaling).

    Args:
        reference: Float model's tensor (any shape, any real dtype).
        candidate: Quantized model's tensor, same number of elements.

    Returns:
        The mean squared error as a Python float (>= 0).

    Raises:
        ValueError: if the element counts differ, or an input holds NaN/Inf.
        TypeError: if an input is complex.
    """
    r, c = _finite_pair(reference, candidate)
    if r.size == 0:
        return 0.0
    with np.errstate(over="ignore", under="ignore"):
        d = r - c
        dd = float(np.dot(d, d))
        scale = _max_abs_value(d) if not math.isfinite(dd) else math.inf
        return _mean_square(d, dd, scale)


def mae(reference: npt.ArrayLike, candidate: npt.ArrayLike) -> float:
    """Mean absolute error ``mean(|r - c|)``.

    Special cases:
        * empty tensors -> 0.0;
        * if ``r - c`` itself overflows float64 the result is ``inf``.

    Args:
        reference: Float model's tensor (any shape, any real dtype).
        candidate: Quantized model's tensor, same number of elements.

    Returns:
        The mean absolute error as a Python float (>= 0).

    Raises:
        ValueError: if the element counts differ, or an input holds NaN/Inf.
        TypeError: if an input is complex.
    """
    r, c = _finite_pair(reference, candidate)
    if r.size == 0:
        return 0.0
    with np.errstate(over="ignore", under="ignore"):
        ad = np.abs(r - c)
        return _mean_abs(ad, float(ad.max()))


def max_abs(reference: npt.ArrayLike, candidate: npt.ArrayLike) -> float:
    """Maximum absolute error ``max(|r - c|)``.

    Special cases:
        * empty tensors -> 0.0;
        * if ``r - c`` itself overflows float64 the result is ``inf``.

    Args:
        reference: Float model's tensor (any shape, any real dtype).
        candidate: Quantized model's tensor, same number of elements.

    Returns:
        The maximum absolute error as a Python float (>= 0).

    Raises:
        ValueError: if the element counts differ, or an input holds NaN/Inf.
        TypeError: if an input is complex.
    """
    r, c = _finite_pair(reference, candidate)
    if r.size == 0:
        return 0.0
    with np.errstate(over="ignore"):
        return float(np.abs(r - c).max())


def sqnr_db(reference: npt.ArrayLike, candidate: npt.ArrayLike) -> float:
    """Signal-to-quantization-noise ratio in decibels.

    ``sqnr_db = 10 * log10(sum(r ** 2) / sum((r - c) ** 2))``, clamped to
    ``[-SQNR_CAP_DB, +SQNR_CAP_DB]`` (+/-200 dB).

    Special cases:
        * identical tensors (including both all-zero) -> ``+SQNR_CAP_DB``;
        * all-zero reference with a nonzero error -> ``-SQNR_CAP_DB``;
        * empty tensors -> ``+SQNR_CAP_DB``;
        * overflow/underflow of the sums is handled by rescaling both
          tensors by the same factor (the ratio is scale-invariant).

    Args:
        reference: Float model's tensor (signal), any shape and real dtype.
        candidate: Quantized model's tensor, same number of elements.

    Returns:
        The SQNR in dB as a Python float; never inf or NaN.

    Raises:
        ValueError: if the element counts differ, or an input holds NaN/Inf.
        TypeError: if an input is complex.
    """
    r, c = _finite_pair(reference, candidate)
    if r.size == 0:
        return SQNR_CAP_DB
    with np.errstate(over="ignore", under="ignore"):
        d = r - c
        return _sqnr_kernel(r, c, d, float(np.dot(r, r)), float(np.dot(d, d)))


def kl_divergence(
    reference: npt.ArrayLike, candidate: npt.ArrayLike, bins: int = KL_BINS
) -> float:
    """KL divergence (nats) between the value histograms of the two tensors.

    Both tensors are histogrammed over the shared range
    ``[lo, hi] = [min(r.min(), c.min()), max(r.max(), c.max())]`` with
    ``bins`` equal-width bins (half-open, the last one closed).  With
    ``P_i = count_r[i] / n`` and ``Q_i = count_c[i] / n``::

        p_i = (P_i + EPS) / sum_j (P_j + EPS)
        q_i = (Q_i + EPS) / sum_j (Q_j + EPS)
        KL(P || Q) = sum_i p_i * ln(p_i / q_i)

    with ``EPS = 1e-10``.  The value depends only on how values are
    distributed, not on where each element is.

    Special cases:
        * zero-width shared range (both tensors constant and equal) -> 0.0;
        * empty tensors -> 0.0;
        * tiny rounding below zero is clamped, so the result is >= 0.0;
        * a range wider than float64 can represent is handled exactly by
          binning ``x / 2``.

    Args:
        reference: Float model's tensor (P), any shape and real dtype.
        candidate: Quantized model's tensor (Q), same number of elements.
        bins: Number of histogram bins (positive integer).

    Returns:
        KL(P||Q) in nats as a Python float; finite, never NaN.

    Raises:
        ValueError: if the element counts differ, an input holds NaN/Inf,
            or ``bins`` is not a positive integer.
        TypeError: if an input is complex.
    """
    bins = _check_bins(bins)
    r, c = _finite_pair(reference, candidate)
    if r.size == 0:
        return 0.0
    return _kl_kernel(r, c, bins)


# --------------------------------------------------------------------------
# Per-sample metrics
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleMetrics:
    """All comparison metrics of one sample of one tensor pair.

    The metric fields have the meaning of the pure functions of the same
    name (``kl`` is :func:`kl_divergence` with :data:`KL_BINS` bins),
    computed over the element pairs that are finite on both sides.  They are
    ``None`` when the tensors have elements but no pair is finite on both
    sides.  Empty tensors (``size == 0``) use the pure functions' empty
    conventions (cosine 1.0, errors 0.0, sqnr +cap, kl 0.0).

    Attributes:
        cosine: Cosine similarity in [-1, 1], or None.
        mse: Mean squared error, or None.
        mae: Mean absolute error, or None.
        max_abs: Maximum absolute error, or None.
        sqnr_db: SQNR in dB within +/-SQNR_CAP_DB, or None.
        kl: Histogram KL divergence in nats, or None.
        size: Number of elements in the sample.
        finite: Number of element pairs finite on both sides (the elements
            the metrics were computed on).
        nan_ref: NaN elements in the reference.
        inf_ref: +/-Inf elements in the reference.
        nan_cand: NaN elements in the candidate.
        inf_cand: +/-Inf elements in the candidate.
    """

    cosine: float | None
    mse: float | None
    mae: float | None
    max_abs: float | None
    sqnr_db: float | None
    kl: float | None
    size: int
    finite: int
    nan_ref: int = 0
    inf_ref: int = 0
    nan_cand: int = 0
    inf_cand: int = 0

    @property
    def scored(self) -> bool:
        """True if the metric fields are set (not None)."""
        return self.cosine is not None

    @property
    def has_nonfinite(self) -> bool:
        """True if any element was NaN/Inf on either side."""
        return self.finite < self.size

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict."""
        return dataclasses.asdict(self)


def sample_metrics(
    reference: npt.ArrayLike, candidate: npt.ArrayLike
) -> SampleMetrics:
    """Compute every metric for one sample, excluding non-finite pairs.

    Each input is converted to float64 once.  Element pairs in which either
    side is NaN or +/-Inf are dropped before computing the metrics and are
    counted in ``nan_ref``/``inf_ref``/``nan_cand``/``inf_cand`` (a pair can
    be counted on both sides).  Fast path: ``<r,r>`` and ``<c,c>`` are needed
    anyway; when both are finite every element is finite and no mask is
    built.

    Special cases:
        * no pair finite on both sides (``size > 0``) -> metric fields None;
        * empty tensors -> the pure functions' empty values, ``finite == 0``;
        * see :func:`cosine`, :func:`sqnr_db`, :func:`kl_divergence` for
          zero and constant tensors.

    Args:
        reference: Float model's tensor (any shape; float16/32/64, int, bool).
        candidate: Quantized model's tensor with the same number of elements.

    Returns:
        A :class:`SampleMetrics`.

    Raises:
        ValueError: if the element counts differ.
        TypeError: if an input is complex.
    """
    r, c = _as_float64_pair(reference, candidate)
    size = int(r.size)
    if size == 0:
        return SampleMetrics(
            cosine=1.0, mse=0.0, mae=0.0, max_abs=0.0, sqnr_db=SQNR_CAP_DB,
            kl=0.0, size=0, finite=0,
        )
    nan_r = inf_r = nan_c = inf_c = 0
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        rr = float(np.dot(r, r))
        cc = float(np.dot(c, c))
        if not (math.isfinite(rr) and math.isfinite(cc)):
            # Non-finite values, or merely an overflow of the sums.
            fin_r = np.isfinite(r)
            fin_c = np.isfinite(c)
            bad_r = size - int(np.count_nonzero(fin_r))
            bad_c = size - int(np.count_nonzero(fin_c))
            if bad_r:
                nan_r = int(np.count_nonzero(np.isnan(r)))
                inf_r = bad_r - nan_r
            if bad_c:
                nan_c = int(np.count_nonzero(np.isnan(c)))
                inf_c = bad_c - nan_c
            if bad_r or bad_c:
                np.logical_and(fin_r, fin_c, out=fin_r)
                r = r[fin_r]
                c = c[fin_r]
                if r.size == 0:
                    return SampleMetrics(
                        cosine=None, mse=None, mae=None, max_abs=None,
                        sqnr_db=None, kl=None, size=size, finite=0,
                        nan_ref=nan_r, inf_ref=inf_r,
                        nan_cand=nan_c, inf_cand=inf_c,
                    )
                rr = float(np.dot(r, r))
                cc = float(np.dot(c, c))
        rc = float(np.dot(r, c))
        d = r - c
        dd = float(np.dot(d, d))
        cos_v = _cosine_kernel(r, c, rr, cc, rc)
        sqnr_v = _sqnr_kernel(r, c, d, rr, dd)
        np.abs(d, out=d)  # d is our own temporary; reuse it as |r - c|
        max_abs_v = float(d.max())
        mse_v = _mean_square(d, dd, max_abs_v)
        mae_v = _mean_abs(d, max_abs_v)
        kl_v = _kl_kernel(r, c, KL_BINS)
    return SampleMetrics(
        cosine=cos_v, mse=mse_v, mae=mae_v, max_abs=max_abs_v,
        sqnr_db=sqnr_v, kl=kl_v, size=size, finite=int(r.size),
        nan_ref=nan_r, inf_ref=inf_r, nan_cand=nan_c, inf_cand=inf_c,
    )


# --------------------------------------------------------------------------
# Aggregation over samples
# --------------------------------------------------------------------------

_FIXED_SHIFT = 1074  # every finite float64 is an integer multiple of 2**-1074


_EXP_BINS = 2 * 2100  # (frexp exponent + 1075) in 2..2099 (zeros: 1075), times two signs
_EXACT_CHUNK = 1 << 20  # rows per bincount pass: sums of 26-bit halves stay below 2**53 (exact in float64)


def add_exact_columns(sums: list[_ExactSum], v: np.ndarray) -> None:
    """Add column ``j`` of the float64 matrix ``v`` (rows x len(sums)) to ``sums[j]``, exactly.

    The same as adding the values one by one (any order). Every finite value is ``mant * 2**(e-53)``
    with ``mant`` an integer below 2**53 (``np.frexp``); the mantissas are split into 26/27-bit
    halves and summed per (column, sign, exponent) with ``np.bincount``, whose float64 sums of at
    most 2**20 such halves are exact; only the few non-empty bins reach Python integers.

    Raises:
        ValueError: a value is NaN (nothing is added then).
    """
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != len(sums):
        raise ValueError(f"expected a matrix of {len(sums)} columns, got shape {v.shape}")
    if v.size <= 16:  # one by one is quicker for a few values
        if np.isnan(v).any():
            raise ValueError("cannot accumulate NaN")
        for row in v.tolist():
            for s, x in zip(sums, row):
                s.add(x)
        return
    fin = np.isfinite(v)
    if not fin.all():
        if np.isnan(v).any():
            raise ValueError("cannot accumulate NaN")
        for j, s in enumerate(sums):
            s.pos_inf += int(np.count_nonzero(v[:, j] == math.inf))
            s.neg_inf += int(np.count_nonzero(v[:, j] == -math.inf))
        v = np.where(fin, v, 0.0)
    cols = v.shape[1]
    col_base = (np.arange(cols, dtype=np.int64) * _EXP_BINS)[None, :]
    for lo_row in range(0, v.shape[0], _EXACT_CHUNK):
        m, e = np.frexp(v[lo_row : lo_row + _EXACT_CHUNK])
        mant = (m * 2.0**53).astype(np.int64)  # exact: m has 53 significant bits
        neg = mant < 0
        a = np.abs(mant)
        key = (col_base + (e.astype(np.int64) + 1075) * 2 + neg).ravel()
        bins, where = np.unique(key, return_inverse=True)
        hi = np.bincount(where, weights=(a >> 26).astype(np.float64).ravel(), minlength=bins.size)
        lo = np.bincount(where, weights=(a & ((1 << 26) - 1)).astype(np.float64).ravel(), minlength=bins.size)
        for b, h, l in zip(bins.tolist(), hi.tolist(), lo.tolist()):
            if not (h or l):
                continue
            total = (int(h) << 26) + int(l)
            col, rest = divmod(b, _EXP_BINS)
            exp, sign = rest // 2 - 1075, rest % 2
            shift = exp - 53 + _FIXED_SHIFT
            # a negative shift only happens for subnormals, whose integers are multiples of 2**-shift
            total = total << shift if shift >= 0 else total >> -shift
            sums[col].fixed += -total if sign else total


class _ExactSum:
    """Exact, order-independent running sum of float64 values.

    Finite values are accumulated as a Python int in units of 2**-1074,
    infinities as counts.  ``mean(n)`` is the correctly rounded mean.
    """

    __slots__ = ("fixed", "pos_inf", "neg_inf")

    def __init__(self) -> None:
        self.fixed = 0
        self.pos_inf = 0
        self.neg_inf = 0

    def add(self, x: float) -> None:
        if math.isfinite(x):
            num, den = float(x).as_integer_ratio()
            self.fixed += num << (_FIXED_SHIFT - (den.bit_length() - 1))
        elif x > 0:
            self.pos_inf += 1
        elif x < 0:
            self.neg_inf += 1
        else:
            raise ValueError("cannot accumulate NaN")

    def merged(self, other: _ExactSum) -> _ExactSum:
        out = _ExactSum()
        out.fixed = self.fixed + other.fixed
        out.pos_inf = self.pos_inf + other.pos_inf
        out.neg_inf = self.neg_inf + other.neg_inf
        return out

    def mean(self, n: int) -> float:
        if self.pos_inf and self.neg_inf:
            return math.nan  # unreachable for qdiff's metrics
        if self.pos_inf:
            return math.inf
        if self.neg_inf:
            return -math.inf
        return self.fixed / (n << _FIXED_SHIFT)  # correctly rounded


@dataclass(frozen=True)
class TensorSummary:
    """Aggregate comparison of one tensor pair over many samples.

    Means are over the *scored* samples (those with at least one finite
    element pair, or empty); "worst" is the minimum for cosine and SQNR and
    the maximum for the error metrics and KL.  When ``scored_samples == 0``
    every metric field is ``None`` and ``note`` says why.

    Attributes:
        samples: Samples folded in.
        scored_samples: Samples whose metrics were computed.
        cosine: Mean cosine similarity.
        cosine_worst: Minimum cosine similarity.
        mse: Mean of the per-sample MSE.
        mse_worst: Maximum per-sample MSE.
        mae: Mean of the per-sample MAE.
        mae_worst: Maximum per-sample MAE.
        max_abs: Largest absolute element error seen in any sample.
        sqnr_db: Mean of the per-sample SQNR in dB.
        sqnr_db_worst: Minimum per-sample SQNR in dB.
        kl: Mean of the per-sample KL divergence.
        kl_worst: Maximum per-sample KL divergence.
        nan_float: Total NaN elements in the reference (float model).
        inf_float: Total +/-Inf elements in the reference.
        nan_quant: Total NaN elements in the candidate (quantized model).
        inf_quant: Total +/-Inf elements in the candidate.
        nonfinite_samples: Samples with any NaN/Inf on either side.
        size: Elements per sample of the last sample seen (0 if none).
        note: ``"no samples"``, ``"all values non-finite"``,
            ``"k of n samples had non-finite values"`` or ``""``.
    """

    samples: int
    scored_samples: int
    cosine: float | None
    cosine_worst: float | None
    mse: float | None
    mse_worst: float | None
    mae: float | None
    mae_worst: float | None
    max_abs: float | None
    sqnr_db: float | None
    sqnr_db_worst: float | None
    kl: float | None
    kl_worst: float | None
    nan_float: int
    inf_float: int
    nan_quant: int
    inf_quant: int
    nonfinite_samples: int
    size: int
    note: str

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (ints, floats, None, str)."""
        return {f: getattr(self, f) for f in _SUMMARY_FIELDS}


_SUMMARY_FIELDS = tuple(f.name for f in dataclasses.fields(TensorSummary))


class TensorAccumulator:
    """Streaming, mergeable aggregate of :class:`SampleMetrics` for one tensor.

    State is O(1): exact sums and counts, minima and maxima; no per-sample
    values are stored.  Use one instance per tensor pair.

    Example::

        acc = TensorAccumulator()
        for ref, cand in pairs:
            acc.update(ref, cand)
        summary = acc.result()
    """

    __slots__ = (
        "_samples", "_scored", "_nonfinite_samples", "_size",
        "_nan_ref", "_inf_ref", "_nan_cand", "_inf_cand",
        "_cos_sum", "_mse_sum", "_mae_sum", "_sqnr_sum", "_kl_sum",
        "_cos_min", "_mse_max", "_mae_max", "_max_abs", "_sqnr_min", "_kl_max",
        "_pending", "_pending_rows", "_with_kl",
    )

    def __init__(self, kl: bool = True) -> None:
        """``kl=False``: KL is not reported (``kl``/``kl_worst`` None) and callers may fold in
        rows whose KL was not computed (the compiled kernels with ``bins=0``, which then skip the
        histograms, most of their work)."""
        self._with_kl = kl
        self._samples = 0
        self._scored = 0
        self._nonfinite_samples = 0
        self._size = 0
        self._nan_ref = 0
        self._inf_ref = 0
        self._nan_cand = 0
        self._inf_cand = 0
        self._cos_sum = _ExactSum()
        self._mse_sum = _ExactSum()
        self._mae_sum = _ExactSum()
        self._sqnr_sum = _ExactSum()
        self._kl_sum = _ExactSum()
        self._cos_min = math.inf
        self._mse_max = -math.inf
        self._mae_max = -math.inf
        self._max_abs = -math.inf
        self._sqnr_min = math.inf
        self._kl_max = -math.inf
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    @property
    def samples(self) -> int:
        """Number of samples folded in so far."""
        return self._samples

    def update(
        self, reference: npt.ArrayLike, candidate: npt.ArrayLike
    ) -> SampleMetrics:
        """Compute :func:`sample_metrics` for one sample and fold it in.

        Args:
            reference: Float model's tensor for this sample.
            candidate: Quantized model's tensor, same number of elements.

        Returns:
            The sample's :class:`SampleMetrics`.

        Raises:
            ValueError: if the element counts differ (nothing is folded in).
        """
        m = sample_metrics(reference, candidate)
        self.add(m)
        return m

    def add(self, m: SampleMetrics) -> None:
        """Fold in an already computed :class:`SampleMetrics`."""
        self._samples += 1
        self._size = m.size
        self._nan_ref += m.nan_ref
        self._inf_ref += m.inf_ref
        self._nan_cand += m.nan_cand
        self._inf_cand += m.inf_cand
        if m.finite < m.size:
            self._nonfinite_samples += 1
        if m.cosine is None:
            return
        assert m.mse is not None and m.mae is not None and m.max_abs is not None
        assert m.sqnr_db is not None and m.kl is not None
        self._scored += 1
        self._cos_sum.add(m.cosine)
        self._mse_sum.add(m.mse)
        self._mae_sum.add(m.mae)
        self._sqnr_sum.add(m.sqnr_db)
        self._kl_sum.add(m.kl)
        self._cos_min = min(self._cos_min, m.cosine)
        self._mse_max = max(self._mse_max, m.mse)
        self._mae_max = max(self._mae_max, m.mae)
        self._max_abs = max(self._max_abs, m.max_abs)
        self._sqnr_min = min(self._sqnr_min, m.sqnr_db)
        self._kl_max = max(self._kl_max, m.kl)

    def add_values(self, values: np.ndarray, size: int) -> None:
        """Fold in many scored samples without NaN/Inf, given as rows of metric values.

        ``values`` is ``[k, 6]``: cosine, mse, mae, max_abs, sqnr_db, kl per sample, each sample
        of ``size`` elements all finite. Equivalent to :meth:`add` of each row (exactly: the
        sums are exact, so order and grouping do not matter).
        """
        v = np.asarray(values, dtype=np.float64).reshape(-1, 6)
        k = v.shape[0]
        if k == 0:
            return
        self._samples += k
        self._scored += k
        self._size = int(size)
        # folded in later, many calls at once (exact sums: the grouping does not matter)
        self._pending.append(v)
        self._pending_rows += k
        if self._pending_rows >= 4096:
            self._settle()

    def _settle(self) -> None:
        """Fold the values queued by :meth:`add_values` into the sums and extremes."""
        if not self._pending:
            return
        v = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        self._pending_rows = 0
        cos, mse, mae, mx, sqnr, kl = (v[:, j] for j in range(6))
        sums = [self._cos_sum, self._mse_sum, self._mae_sum, self._sqnr_sum, self._kl_sum]
        add_exact_columns(sums, v[:, [0, 1, 2, 4, 5]])
        self._cos_min = min(self._cos_min, float(cos.min()))
        self._mse_max = max(self._mse_max, float(mse.max()))
        self._mae_max = max(self._mae_max, float(mae.max()))
        self._max_abs = max(self._max_abs, float(mx.max()))
        self._sqnr_min = min(self._sqnr_min, float(sqnr.min()))
        self._kl_max = max(self._kl_max, float(kl.max()))

    def merge(self, other: TensorAccumulator) -> TensorAccumulator:
        """Combine with another accumulator without mutating either.

        The result equals (field for field, exactly) one accumulator that saw
        this accumulator's samples followed by ``other``'s.  ``size`` is
        taken from ``other`` if it has samples.

        Args:
            other: Another :class:`TensorAccumulator`.

        Returns:
            A new :class:`TensorAccumulator`.
        """
        if not isinstance(other, TensorAccumulator):
            raise TypeError(f"cannot merge TensorAccumulator with {type(other).__name__}")
        if self._with_kl != other._with_kl:
            raise ValueError("cannot merge an accumulator that measures KL with one that does not")
        out = TensorAccumulator(kl=self._with_kl)
        # rows queued by add_values are carried over unsettled (the sums are exact, so they
        # fold in equally well later, once, with everything else)
        out._pending = self._pending + other._pending
        out._pending_rows = self._pending_rows + other._pending_rows
        out._samples = self._samples + other._samples
        out._scored = self._scored + other._scored
        out._nonfinite_samples = self._nonfinite_samples + other._nonfinite_samples
        out._size = other._size if other._samples else self._size
        out._nan_ref = self._nan_ref + other._nan_ref
        out._inf_ref = self._inf_ref + other._inf_ref
        out._nan_cand = self._nan_cand + other._nan_cand
        out._inf_cand = self._inf_cand + other._inf_cand
        out._cos_sum = self._cos_sum.merged(other._cos_sum)
        out._mse_sum = self._mse_sum.merged(other._mse_sum)
        out._mae_sum = self._mae_sum.merged(other._mae_sum)
        out._sqnr_sum = self._sqnr_sum.merged(other._sqnr_sum)
        out._kl_sum = self._kl_sum.merged(other._kl_sum)
        out._cos_min = min(self._cos_min, other._cos_min)
        out._mse_max = max(self._mse_max, other._mse_max)
        out._mae_max = max(self._mae_max, other._mae_max)
        out._max_abs = max(self._max_abs, other._max_abs)
        out._sqnr_min = min(self._sqnr_min, other._sqnr_min)
        out._kl_max = max(self._kl_max, other._kl_max)
        return out

    def result(self) -> TensorSummary:
        """Summarise the samples seen so far.

        Returns:
            A :class:`TensorSummary`.  With no scored samples the metric
            fields are None and ``note`` is ``"no samples"`` or
            ``"all values non-finite"``; otherwise ``note`` is ``""`` or
            ``"k of n samples had non-finite values"``.
        """
        self._settle()
        n = self._scored
        counts = dict(
            samples=self._samples,
            scored_samples=n,
            nan_float=self._nan_ref,
            inf_float=self._inf_ref,
            nan_quant=self._nan_cand,
            inf_quant=self._inf_cand,
            nonfinite_samples=self._nonfinite_samples,
            size=self._size,
        )
        if n == 0:
            note = "no samples" if self._samples == 0 else "all values non-finite"
            return TensorSummary(
                cosine=None, cosine_worst=None, mse=None, mse_worst=None,
                mae=None, mae_worst=None, max_abs=None, sqnr_db=None,
                sqnr_db_worst=None, kl=None, kl_worst=None, note=note, **counts,
            )
        note = ""
        if self._nonfinite_samples:
            note = (
                f"{self._nonfinite_samples} of {self._samples} samples had "
                "non-finite values"
            )
        return TensorSummary(
            cosine=self._cos_sum.mean(n),
            cosine_worst=self._cos_min,
            mse=self._mse_sum.mean(n),
            mse_worst=self._mse_max,
            mae=self._mae_sum.mean(n),
            mae_worst=self._mae_max,
            max_abs=self._max_abs,
            sqnr_db=self._sqnr_sum.mean(n),
            sqnr_db_worst=self._sqnr_min,
            kl=self._kl_sum.mean(n) if self._with_kl else None,
            kl_worst=self._kl_max if self._with_kl else None,
            note=note,
            **counts,
        )

    def __repr__(self) -> str:
        return (
            f"TensorAccumulator(samples={self._samples}, "
            f"scored_samples={self._scored})"
        )


# --------------------------------------------------------------------------
# Top-1 agreement for class scores
# --------------------------------------------------------------------------


class Top1Accumulator:
    """Streaming agreement rate of ``argmax`` over the last axis.

    For class-score outputs of shape ``[..., C]`` all leading dimensions are
    flattened into rows; a row *agrees* when the reference and candidate
    argmax (first index of the maximum, as :func:`numpy.argmax`) are equal.
    A row containing NaN on either side counts as a disagreement (it has no
    meaningful top-1 class).

    Attributes:
        rows: Rows compared so far.
        agree: Rows whose argmax agreed.
    """

    __slots__ = ("rows", "agree")

    def __init__(self) -> None:
        self.rows: int = 0
        self.agree: int = 0

    def update(self, reference: npt.ArrayLike, candidate: npt.ArrayLike) -> None:
        """Fold in one batch of class scores.

        Args:
            reference: Float model's scores, shape ``[..., C]``.
            candidate: Quantized model's scores with the same last dimension
                ``C`` and the same number of elements.

        Raises:
            ValueError: if an input is a scalar, the last dimensions differ
                or are 0, or the element counts differ.
        """
        r = np.asarray(reference)
        c = np.asarray(candidate)
        if r.ndim == 0 or c.ndim == 0:
            raise ValueError(
                f"class scores need at least one axis: reference shape "
                f"{tuple(r.shape)}, candidate shape {tuple(c.shape)}"
            )
        if r.shape[-1] != c.shape[-1] or r.size != c.size or r.shape[-1] == 0:
            raise ValueError(
                "class scores must have the same non-empty last axis and "
                f"number of elements: reference shape {tuple(r.shape)}, "
                f"candidate shape {tuple(c.shape)}"
            )
        classes = r.shape[-1]
        r2 = r.reshape(-1, classes)
        c2 = c.reshape(-1, classes)
        if r2.shape[0] == 0:
            return
        same = np.argmax(r2, axis=1) == np.argmax(c2, axis=1)
        for a in (r2, c2):
            if a.dtype.kind == "f":
                same &= ~np.isnan(a).any(axis=1)
        self.rows += int(r2.shape[0])
        self.agree += int(np.count_nonzero(same))

    def merge(self, other: Top1Accumulator) -> Top1Accumulator:
        """Return a new accumulator covering both inputs' rows (no mutation)."""
        if not isinstance(other, Top1Accumulator):
            raise TypeError(f"cannot merge Top1Accumulator with {type(other).__name__}")
        out = Top1Accumulator()
        out.rows = self.rows + other.rows
        out.agree = self.agree + other.agree
        return out

    def result(self) -> float | None:
        """Fraction of agreeing rows, ``agree / rows``; None if no rows."""
        if self.rows == 0:
            return None
        return self.agree / self.rows

    def __repr__(self) -> str:
        return f"Top1Accumulator(rows={self.rows}, agree={self.agree})"


def _is_static(dim: object) -> bool:
    return (
        isinstance(dim, numbers.Integral)
        and not isinstance(dim, bool)
        and int(dim) >= 0  # negative sizes (e.g. -1) mean "dynamic"
    )


def looks_like_class_scores(shape: Sequence[int | str | None]) -> bool:
    """Heuristic: does a tensor of this shape look like class scores?

    True for:
        * rank 2 with a static last dimension >= 2 (``[N, C]``; ``N`` may be
          dynamic);
        * rank >= 3 with a static last dimension >= 2 whose other dimensions
          are all 1, except that the leading dimension may be dynamic (a
          batch), e.g. ``[1, 1, 1000]`` or ``["batch", 1, 10]``.

    A dimension is dynamic when it is None, a string, or a negative int.
    Everything else (rank 0/1, dynamic or < 2 last dimension, spatial
    dimensions) gives False.

    Args:
        shape: Tensor shape; entries may be ints, None or str.

    Returns:
        Whether argmax agreement is a meaningful metric for the tensor.
    """
    dims = list(shape)
    if len(dims) < 2:
        return False
    last = dims[-1]
    if not _is_static(last) or int(last) < 2:
        return False
    if len(dims) == 2:
        return True
    lead, middle = dims[0], dims[1:-1]
    if _is_static(lead) and int(lead) != 1:
        return False
    return all(_is_static(d) and int(d) == 1 for d in middle)


# --------------------------------------------------------------------------
# Metrics from sums (the fused engine reduces tensors inside onnxruntime)
# --------------------------------------------------------------------------

#: layout of the per-sample sums vector the fused engine computes for one tensor pair
SUMS_FIELDS = (
    "size", "size_cand", "finite", "nan_ref", "inf_ref", "nan_cand", "inf_cand",
    "rr", "cc", "rc", "dd", "sad", "max_abs", "lo", "hi",
)  # fmt: skip


def sample_metrics_from_sums(sums: np.ndarray, bins: int = KL_BINS) -> SampleMetrics:
    """:class:`SampleMetrics` from the reductions of one sample (``SUMS_FIELDS`` then two histograms).

    The sums are over the element pairs finite on both sides, in float64: ``rr = Σr²``,
    ``cc = Σc²``, ``rc = Σrc``, ``dd = Σ(r-c)²``, ``sad = Σ|r-c|``, ``max_abs``, the shared value
    range ``lo``/``hi`` and the ``bins``-bin histograms of r and c over it. The formulas and the
    degenerate cases are those of the pure functions (float32/float16 tensors cannot overflow
    these float64 sums).
    """
    v = np.asarray(sums, dtype=np.float64)
    f = dict(zip(SUMS_FIELDS, (float(x) for x in v[: len(SUMS_FIELDS)])))
    size, finite = int(f["size"]), int(f["finite"])
    counts = dict(
        size=size,
        finite=finite,
        nan_ref=int(f["nan_ref"]),
        inf_ref=int(f["inf_ref"]),
        nan_cand=int(f["nan_cand"]),
        inf_cand=int(f["inf_cand"]),
    )
    if size == 0:
        return SampleMetrics(1.0, 0.0, 0.0, 0.0, SQNR_CAP_DB, 0.0, **counts)
    if finite == 0:
        return SampleMetrics(None, None, None, None, None, None, **counts)
    rr, cc, rc, dd = f["rr"], f["cc"], f["rc"], f["dd"]
    if rr == 0.0 and cc == 0.0:
        cos = 1.0
    elif rr == 0.0 or cc == 0.0:
        cos = 0.0
    else:
        cos = min(1.0, max(-1.0, rc / math.sqrt(rr * cc)))
    if dd == 0.0:
        sqnr = SQNR_CAP_DB
    elif rr == 0.0:
        sqnr = -SQNR_CAP_DB
    else:
        sqnr = min(SQNR_CAP_DB, max(-SQNR_CAP_DB, 10.0 * (math.log10(rr) - math.log10(dd))))
    kl = 0.0
    if f["hi"] > f["lo"]:
        start = len(SUMS_FIELDS)
        p = v[start : start + bins] / finite + EPS
        q = v[start + bins : start + 2 * bins] / finite + EPS
        p /= p.sum()
        q /= q.sum()
        kl = max(0.0, float(np.dot(p, np.log(p) - np.log(q))))
    return SampleMetrics(cos, dd / finite, f["sad"] / finite, f["max_abs"], sqnr, kl, **counts)


# --------------------------------------------------------------------------
# Many samples of one tensor pair at once (small tensors: one numpy call per metric)
# --------------------------------------------------------------------------


def sample_metrics_rows(references: npt.ArrayLike, candidates: npt.ArrayLike, bins: int = KL_BINS) -> list[SampleMetrics]:
    """:func:`sample_metrics` of each row of two ``[k, n]`` stacks, computed for all rows at once.

    Every row's values depend on that row alone (sums are numpy's index-ordered pairwise sums,
    never alignment-dependent SIMD), so the result of a row does not depend on which other rows
    share its stack. Rows holding NaN/Inf, empty rows, and sums outside the normal float64 range
    go through :func:`sample_metrics` one by one. Values agree with :func:`sample_metrics` to
    float64 rounding (the summation order differs).
    """
    r_all = np.asarray(references, dtype=np.float64)
    c_all = np.asarray(candidates, dtype=np.float64)
    if r_all.shape != c_all.shape or r_all.ndim != 2:
        raise ValueError(f"expected two [k, n] stacks of the same shape, got {r_all.shape} and {c_all.shape}")
    k, n = r_all.shape
    if k == 0:
        return []
    if n == 0:
        return [sample_metrics(r_all[i], c_all[i]) for i in range(k)]
    finite = np.isfinite(r_all).all(axis=1) & np.isfinite(c_all).all(axis=1)
    if not finite.all():  # rows with NaN/Inf one by one; the others together (each row alone decides)
        good = np.flatnonzero(finite)
        fast = iter(sample_metrics_rows(r_all[good], c_all[good], bins) if good.size else [])
        return [next(fast) if ok else sample_metrics(r_all[i], c_all[i]) for i, ok in enumerate(finite.tolist())]
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        rr = (r_all * r_all).sum(axis=1)
        cc = (c_all * c_all).sum(axis=1)
        rc = (r_all * c_all).sum(axis=1)
        d = r_all - c_all
        dd = (d * d).sum(axis=1)
        ad = np.abs(d)
        max_abs = ad.max(axis=1)
        mae = ad.sum(axis=1) / n
    lo = np.minimum(r_all.min(axis=1), c_all.min(axis=1))
    hi = np.maximum(r_all.max(axis=1), c_all.max(axis=1))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        factor = bins / (hi - lo)
    binnable = (hi > lo) & np.isfinite(factor)
    counts_r = counts_c = None
    if binnable.any():
        rows = np.flatnonzero(binnable)
        offsets = (np.arange(rows.size) * bins)[:, None]
        counts = []
        for x in (r_all[rows], c_all[rows]):
            t = (x - lo[rows, None]) * factor[rows, None]
            idx = t.astype(np.intp)
            np.minimum(idx, bins - 1, out=idx)
            idx += offsets
            counts.append(np.bincount(idx.ravel(), minlength=rows.size * bins).reshape(rows.size, bins))
        counts_r = np.zeros((k, bins), dtype=np.int64)
        counts_c = np.zeros((k, bins), dtype=np.int64)
        counts_r[rows], counts_c[rows] = counts
    return rows_from_sums(
        rr, cc, rc, dd, mae, max_abs, lo, hi, counts_r, counts_c, binnable, np.ones(k, dtype=bool), n, bins,
        lambda i: sample_metrics(r_all[i], c_all[i]),
    )


def rows_from_sums(
    rr: np.ndarray, cc: np.ndarray, rc: np.ndarray, dd: np.ndarray, mae: np.ndarray, max_abs: np.ndarray,
    lo: np.ndarray, hi: np.ndarray, counts_r: np.ndarray | None, counts_c: np.ndarray | None,
    binnable: np.ndarray, finite: np.ndarray, n: int, bins: int, slow: Any,
) -> list[SampleMetrics]:
    """Per-row :class:`SampleMetrics` of ``k`` finite rows of ``n`` elements from their float64 sums.

    ``rr = Σr²``, ``cc = Σc²``, ``rc = Σrc``, ``dd = Σ(r-c)²``, ``mae = Σ|r-c| / n``, the value range
    ``lo``/``hi`` and, for the rows where ``binnable``, the ``bins``-bin histograms of r and c over
    it. Rows where ``finite`` is False, or whose sums fall outside the normal float64 range, or
    whose range is too narrow to bin, are computed by ``slow(i)`` (normally
    :func:`sample_metrics` of that row), so every degenerate case keeps its documented value.
    """
    k = len(rr)
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        norm2 = rr * cc
        sums = np.stack([rr, cc, dd, norm2])
        normal = np.all((sums == 0) | ((sums >= _TINY) & np.isfinite(sums)), axis=0)
        has_range = hi > lo
        kl = np.zeros(k)
        if counts_r is not None and binnable.any():
            rows = np.flatnonzero(binnable)
            p = counts_r[rows] / n + EPS
            q = counts_c[rows] / n + EPS
            p /= p.sum(axis=1, keepdims=True)
            q /= q.sum(axis=1, keepdims=True)
            kl[rows] = np.maximum(0.0, (p * (np.log(p) - np.log(q))).sum(axis=1))
        cos = np.where(
            (rr == 0) & (cc == 0), 1.0, np.where((rr == 0) | (cc == 0), 0.0, np.clip(rc / np.sqrt(norm2), -1.0, 1.0))
        )
        sqnr = np.where(
            dd == 0, SQNR_CAP_DB,
            np.where(rr == 0, -SQNR_CAP_DB, np.clip(10.0 * (np.log10(rr) - np.log10(dd)), -SQNR_CAP_DB, SQNR_CAP_DB)),
        )  # fmt: skip
    fast = (finite & normal & ~(has_range & ~binnable)).tolist()
    cols = zip(fast, cos.tolist(), (dd / n).tolist(), mae.tolist(), max_abs.tolist(), sqnr.tolist(), kl.tolist())
    out = []
    for i, (ok, cos_i, mse_i, mae_i, max_i, sqnr_i, kl_i) in enumerate(cols):
        if not ok:
            out.append(slow(i))
            continue
        out.append(SampleMetrics(cos_i, mse_i, mae_i, max_i, sqnr_i, kl_i, n, n))
    return out
