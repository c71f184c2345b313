"""Tests for qdiff.metrics.

Every metric is checked against an independent computation written
differently (explicit Python loops over floats, the math module, exact
fractions, scipy where available) on small hand-made inputs.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from qdiff import metrics as qm
from qdiff.metrics import (
    EPS,
    KL_BINS,
    SQNR_CAP_DB,
    SampleMetrics,
    TensorAccumulator,
    TensorSummary,
    Top1Accumulator,
    cosine,
    kl_divergence,
    looks_like_class_scores,
    mae,
    max_abs,
    mse,
    sample_metrics,
    sqnr_db,
)

METRICS_PY = Path(__file__).resolve().parent.parent / "qdiff" / "metrics.py"


# --------------------------------------------------------------------------
# Independent reference implementations (plain Python, no numpy reductions)
# --------------------------------------------------------------------------


def _flat(a) -> list[float]:
    return [float(v) for v in np.asarray(a).reshape(-1).tolist()]


def ref_cosine(r, c) -> float:
    r, c = _flat(r), _flat(c)
    dot = math.fsum(x * y for x, y in zip(r, c))
    nr = math.sqrt(math.fsum(x * x for x in r))
    nc = math.sqrt(math.fsum(y * y for y in c))
    return dot / (nr * nc)


def ref_mse(r, c) -> float:
    r, c = _flat(r), _flat(c)
    return math.fsum((x - y) ** 2 for x, y in zip(r, c)) / len(r)


def ref_mae(r, c) -> float:
    r, c = _flat(r), _flat(c)
    return math.fsum(abs(x - y) for x, y in zip(r, c)) / len(r)


def ref_max_abs(r, c) -> float:
    return max(abs(x - y) for x, y in zip(_flat(r), _flat(c)))


def ref_sqnr(r, c) -> float:
    r, c = _flat(r), _flat(c)
    sig = math.fsum(x * x for x in r)
    noise = math.fsum((x - y) ** 2 for x, y in zip(r, c))
    return 10.0 * math.log10(sig / noise)


def ref_kl(r, c, bins: int = KL_BINS) -> float:
    """Histogram KL with an explicit per-element loop for the binning."""
    r, c = _flat(r), _flat(c)
    lo, hi = min(r + c), max(r + c)
    width = (hi - lo) / bins

    def hist(xs):
        counts = [0] * bins
        for x in xs:
            k = int((x - lo) // width)
            counts[min(max(k, 0), bins - 1)] += 1
        probs = [n / len(xs) + EPS for n in counts]
        total = math.fsum(probs)
        return [p / total for p in probs]

    p, q = hist(r), hist(c)
    return math.fsum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def exact_mean(values) -> float:
    """Correctly rounded mean via exact rational arithmetic."""
    vals = list(values)
    return float(sum(Fraction(v) for v in vals) / len(vals))


RNG_CASES = [
    (np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.1, 1.9, 3.2, 3.7])),
    (np.array([[0.5, -1.5], [2.0, 0.0]]), np.array([[0.25, -1.0], [2.5, 0.125]])),
    (np.array([-3.0, 0.0, 7.0, 1.0, 2.0]), np.array([-2.0, 1.0, 6.0, 1.0, 2.5])),
]


# --------------------------------------------------------------------------
# Pure functions: hand-checked values
# --------------------------------------------------------------------------


def test_cosine_hand_values():
    assert cosine([1.0, 0.0], [0.0, 1.0]) == 0.0
    assert cosine([1.0, 2.0], [2.0, 4.0]) == 1.0
    assert cosine([1.0, 2.0], [-1.0, -2.0]) == -1.0
    assert cosine([1.0, -1.0], [-1.0, 1.0]) == -1.0
    assert cosine([1e308, -1e308], [-1e308, 1e308]) == -1.0  # rescaled path
    # [1,1] vs [1,0]: 1 / sqrt(2)
    assert cosine([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1 / math.sqrt(2), rel=1e-15)


def test_cosine_is_clamped():
    # Parallel vectors whose rounding could push the value above 1.
    r = np.full(1000, 0.1)
    assert -1.0 <= cosine(r, r) <= 1.0
    assert -1.0 <= cosine(r, -r) <= 1.0
    assert cosine(r, r) == pytest.approx(1.0, abs=1e-15)
    # Scaled copies: without the clamp some of these round to 1 + 2**-52.
    rng = np.random.default_rng(0)
    for _ in range(300):
        x = rng.standard_normal(3) * 10.0 ** rng.integers(-3, 3)
        for k in (0.1, 1 / 3, 0.7, 3.0, 1.1):
            assert -1.0 <= cosine(x, k * x) <= 1.0
            assert -1.0 <= cosine(x, -k * x) <= 1.0
    x = [0.09034701816518087, 0.009401229776087457]
    y = [0.09938171998169897, 0.010341352753696204]  # 1.1 * x
    assert cosine(x, y) <= 1.0


def test_mse_mae_max_abs_hand_values():
    r = [1.0, 2.0, 3.0, 4.0]
    c = [1.0, 3.0, 1.0, 4.5]  # errors 0, -1, 2, -0.5
    assert mse(r, c) == pytest.approx((0 + 1 + 4 + 0.25) / 4, rel=1e-15)
    assert mae(r, c) == pytest.approx((0 + 1 + 2 + 0.5) / 4, rel=1e-15)
    assert max_abs(r, c) == 2.0


def test_sqnr_hand_value():
    r = [1.0, 1.0, 1.0, 1.0]
    c = [1.0, 1.0, 1.0, 0.0]
    assert sqnr_db(r, c) == pytest.approx(10 * math.log10(4 / 1), rel=1e-15)


def test_kl_hand_value():
    # Two bins over [0, 1]: P = [1/2, 1/2], Q = [1, 0].
    r, c = [0.0, 1.0], [0.0, 0.0]
    z = 1 + 2 * EPS
    p = [(0.5 + EPS) / z, (0.5 + EPS) / z]
    q = [(1 + EPS) / z, EPS / z]
    want = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1])
    assert kl_divergence(r, c, bins=2) == pytest.approx(want, rel=1e-12)
    # Same histogram -> 0 even though the element order differs.
    assert kl_divergence([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == 0.0


def test_kl_value_at_upper_edge_goes_to_last_bin():
    # hi belongs to the last (closed) bin, so r and c have equal histograms.
    assert kl_divergence([0.0, 4.0], [0.0, 3.9], bins=4) == 0.0
    assert kl_divergence([0.0, 4.0], [0.0, 2.9], bins=4) > 0.0


def test_kl_bins_validation():
    with pytest.raises(ValueError):
        kl_divergence([1.0, 2.0], [1.0, 2.0], bins=0)
    with pytest.raises(ValueError):
        kl_divergence([1.0, 2.0], [1.0, 2.0], bins=2.5)  # type: ignore[arg-type]
    assert kl_divergence([1.0, 2.0], [2.0, 3.0], bins=1) == 0.0


# --------------------------------------------------------------------------
# Pure functions against the independent implementations
# --------------------------------------------------------------------------


@pytest.mark.parametrize("r,c", RNG_CASES)
def test_pure_functions_match_reference(r, c):
    assert cosine(r, c) == pytest.approx(ref_cosine(r, c), rel=1e-14)
    assert mse(r, c) == pytest.approx(ref_mse(r, c), rel=1e-14)
    assert mae(r, c) == pytest.approx(ref_mae(r, c), rel=1e-14)
    assert max_abs(r, c) == ref_max_abs(r, c)
    assert sqnr_db(r, c) == pytest.approx(ref_sqnr(r, c), rel=1e-13)
    for bins in (2, 3, 8, KL_BINS):
        assert kl_divergence(r, c, bins=bins) == pytest.approx(
            ref_kl(r, c, bins), rel=1e-10, abs=1e-15
        )


def test_random_data_against_numpy():
    rng = np.random.default_rng(0)
    r = rng.standard_normal(2000)
    c = r + 0.05 * rng.standard_normal(2000)
    assert cosine(r, c) == pytest.approx(ref_cosine(r, c), rel=1e-13)
    assert sqnr_db(r, c) == pytest.approx(ref_sqnr(r, c), rel=1e-12)
    # KL against numpy's own histogram (+ scipy if present).
    lo, hi = min(r.min(), c.min()), max(r.max(), c.max())
    hp, _ = np.histogram(r, bins=KL_BINS, range=(lo, hi))
    hq, _ = np.histogram(c, bins=KL_BINS, range=(lo, hi))
    p = hp / r.size + EPS
    q = hq / c.size + EPS
    p, q = p / p.sum(), q / q.sum()
    want = float(np.sum(p * np.log(p / q)))
    assert kl_divergence(r, c) == pytest.approx(want, rel=1e-9)
    assert kl_divergence(r, c) == pytest.approx(ref_kl(r, c), rel=1e-9)


def test_kl_against_scipy():
    special = pytest.importorskip("scipy.special")  # scipy.stats is slow to import
    rng = np.random.default_rng(5)
    r = rng.standard_normal(500)
    c = np.round(r * 8) / 8  # crude quantization
    for bins in (4, 16, KL_BINS):
        lo, hi = min(r.min(), c.min()), max(r.max(), c.max())
        hp, edges = np.histogram(r, bins=bins, range=(lo, hi))
        hq, _ = np.histogram(c, bins=edges)
        p = hp / r.size + EPS
        q = hq / c.size + EPS
        want = float(np.sum(special.rel_entr(p / p.sum(), q / q.sum())))
        assert kl_divergence(r, c, bins=bins) == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------
# Degenerate cases of the pure functions
# --------------------------------------------------------------------------


def test_both_zero():
    z = np.zeros(5)
    assert cosine(z, z) == 1.0
    assert mse(z, z) == 0.0
    assert mae(z, z) == 0.0
    assert max_abs(z, z) == 0.0
    assert sqnr_db(z, z) == SQNR_CAP_DB
    assert kl_divergence(z, z) == 0.0


def test_one_zero():
    z = np.zeros(3)
    x = np.array([1.0, -2.0, 0.5])
    assert cosine(z, x) == 0.0
    assert cosine(x, z) == 0.0
    assert sqnr_db(z, x) == -SQNR_CAP_DB  # zero signal, nonzero noise
    # Zero candidate: noise == signal -> 0 dB.
    assert sqnr_db(x, z) == pytest.approx(0.0, abs=1e-12)
    assert mse(z, x) == pytest.approx((1 + 4 + 0.25) / 3)


def test_identical_and_constant():
    x = np.array([3.0, -1.0, 2.0])
    assert sqnr_db(x, x) == SQNR_CAP_DB
    assert cosine(x, x) == pytest.approx(1.0, abs=1e-15)
    assert mse(x, x) == 0.0 and max_abs(x, x) == 0.0
    assert kl_divergence(x, x) == 0.0
    k = np.full(4, 2.5)
    assert kl_divergence(k, k) == 0.0  # zero-width shared range
    # Different constants: all mass in first vs last bin.
    kl = kl_divergence(np.full(4, 1.0), np.full(4, 2.0), bins=4)
    assert math.isfinite(kl) and kl > 0
    # Tiny nonzero error -> capped at +200 dB (true value ~ 320 dB).
    assert sqnr_db([1.0, 1.0], [1.0, 1.0 + 2**-52]) == SQNR_CAP_DB
    # Huge error -> capped at -200 dB.
    assert sqnr_db([1e-150, 0.0], [1e150, 0.0]) == -SQNR_CAP_DB


def test_empty():
    e = np.zeros((0, 3))
    assert cosine(e, e) == 1.0
    assert mse(e, e) == 0.0
    assert mae(e, e) == 0.0
    assert max_abs(e, e) == 0.0
    assert sqnr_db(e, e) == SQNR_CAP_DB
    assert kl_divergence(e, e) == 0.0


def test_extreme_magnitudes_never_nan():
    big = np.array([1e300, -2e300, 3e300])
    assert cosine(big, big) == pytest.approx(1.0, abs=1e-15)
    assert cosine(big, 2 * big / 3) == pytest.approx(1.0, abs=1e-15)
    assert sqnr_db(big, big * (1 + 1e-3)) == pytest.approx(60.0, abs=1e-6)
    assert math.isfinite(kl_divergence(np.array([-1e308, 1e308]), np.array([0.0, 1e308])))
    tiny = np.array([1e-200, 2e-200, -3e-200])
    assert cosine(tiny, tiny) == pytest.approx(1.0, abs=1e-15)
    assert cosine(tiny, -tiny) == pytest.approx(-1.0, abs=1e-15)
    assert sqnr_db(tiny, tiny * (1 + 1e-3)) == pytest.approx(60.0, abs=1e-6)
    assert kl_divergence(tiny, tiny) == 0.0
    assert kl_divergence([0.0, 5e-324], [0.0, 0.0], bins=4) > 0
    # Mean of squares whose sum alone would overflow is still finite.
    assert mse(np.full(4, 1e154), np.zeros(4)) == pytest.approx(1e308, rel=1e-12)
    assert mae(np.full(4, 1.5e308), np.full(4, -1.5e308)) == math.inf


def test_dtypes_are_cast_to_float64():
    r16 = np.array([1.0, 2.0, 3.0], dtype=np.float16)
    c16 = np.array([1.0, 2.5, 2.0], dtype=np.float16)
    assert mse(r16, c16) == pytest.approx((0 + 0.25 + 1) / 3, rel=1e-15)
    assert cosine(r16, c16) == pytest.approx(ref_cosine(r16, c16), rel=1e-14)
    ri = np.array([1, 2, 3], dtype=np.int8)
    ci = np.array([1, 2, -128], dtype=np.int8)  # int8 would wrap on subtraction
    assert max_abs(ri, ci) == 131.0
    assert mse([1, 2], [3, 4]) == 4.0  # python ints
    assert sqnr_db(np.array([True, True]), np.array([True, False])) == pytest.approx(
        10 * math.log10(2), rel=1e-15
    )


def test_shapes_and_errors():
    # Same number of elements, different shapes: fine (both flattened).
    assert mse(np.ones((2, 3)), np.ones(6)) == 0.0
    for fn in (cosine, mse, mae, max_abs, sqnr_db, kl_divergence, sample_metrics):
        with pytest.raises(ValueError) as info:
            fn(np.ones((2, 3)), np.ones((4, 2)))
        assert "(2, 3)" in str(info.value) and "(4, 2)" in str(info.value)
    for fn in (cosine, mse, mae, max_abs, sqnr_db, kl_divergence):
        with pytest.raises(ValueError, match="sample_metrics"):
            fn([1.0, np.nan], [1.0, 2.0])
        with pytest.raises(ValueError):
            fn([1.0, 2.0], [np.inf, 2.0])
    with pytest.raises(TypeError):
        sample_metrics(np.ones(2, dtype=complex), np.ones(2))


def test_inputs_not_mutated():
    r = np.array([1.0, np.nan, 3.0])
    c = np.array([1.5, 2.0, np.inf])
    r0, c0 = r.copy(), c.copy()
    r2 = np.array([1.0, -2.0, 3.0])
    c2 = np.array([1.5, -2.0, 2.0])
    r20, c20 = r2.copy(), c2.copy()
    sample_metrics(r, c)
    sample_metrics(r2, c2)
    for fn in (cosine, mse, mae, max_abs, sqnr_db, kl_divergence):
        fn(r2, c2)
    np.testing.assert_array_equal(r, r0)
    np.testing.assert_array_equal(c, c0)
    np.testing.assert_array_equal(r2, r20)
    np.testing.assert_array_equal(c2, c20)


# --------------------------------------------------------------------------
# sample_metrics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("r,c", RNG_CASES)
def test_sample_metrics_matches_pure_functions(r, c):
    m = sample_metrics(r, c)
    assert m.size == r.size and m.finite == r.size
    assert (m.nan_ref, m.inf_ref, m.nan_cand, m.inf_cand) == (0, 0, 0, 0)
    assert m.cosine == pytest.approx(cosine(r, c), rel=1e-15)
    assert m.mse == pytest.approx(mse(r, c), rel=1e-15)
    assert m.mae == pytest.approx(mae(r, c), rel=1e-15)
    assert m.max_abs == max_abs(r, c)
    assert m.sqnr_db == pytest.approx(sqnr_db(r, c), rel=1e-15)
    assert m.kl == kl_divergence(r, c)
    assert m.scored and not m.has_nonfinite


def test_sample_metrics_excludes_and_counts_nonfinite():
    r = np.array([1.0, np.nan, 3.0, np.inf, 5.0, -np.inf, 2.0], dtype=np.float32)
    c = np.array([1.5, 2.0, np.nan, 4.0, 5.0, 1.0, np.nan], dtype=np.float32)
    m = sample_metrics(r, c)
    assert m.size == 7
    assert m.finite == 2  # positions 0 and 4
    assert (m.nan_ref, m.inf_ref) == (1, 2)
    assert (m.nan_cand, m.inf_cand) == (2, 0)
    keep_r, keep_c = [1.0, 5.0], [1.5, 5.0]
    assert m.mse == pytest.approx(ref_mse(keep_r, keep_c), rel=1e-15)
    assert m.mae == pytest.approx(ref_mae(keep_r, keep_c), rel=1e-15)
    assert m.max_abs == 0.5
    assert m.cosine == pytest.approx(ref_cosine(keep_r, keep_c), rel=1e-14)
    assert m.sqnr_db == pytest.approx(ref_sqnr(keep_r, keep_c), rel=1e-14)
    assert m.kl == pytest.approx(ref_kl(keep_r, keep_c), rel=1e-12, abs=1e-15)
    assert m.has_nonfinite


def test_sample_metrics_all_nonfinite():
    m = sample_metrics([np.nan, 1.0], [2.0, np.inf])
    assert m.finite == 0 and m.size == 2
    assert (m.nan_ref, m.inf_ref, m.nan_cand, m.inf_cand) == (1, 0, 0, 1)
    for name in ("cosine", "mse", "mae", "max_abs", "sqnr_db", "kl"):
        assert getattr(m, name) is None
    assert not m.scored


def test_sample_metrics_empty_and_overflow_fast_path_fallback():
    m = sample_metrics(np.zeros(0), np.zeros(0))
    assert (m.cosine, m.mse, m.mae, m.max_abs, m.sqnr_db, m.kl) == (
        1.0, 0.0, 0.0, 0.0, SQNR_CAP_DB, 0.0,
    )
    assert m.size == 0 and m.finite == 0
    # Finite values whose sum of squares overflows: not counted as non-finite.
    big = np.array([1e200, 2e200])
    m = sample_metrics(big, big)
    assert m.finite == 2 and m.nan_ref == m.inf_ref == 0
    assert m.cosine == pytest.approx(1.0, abs=1e-15)
    assert m.sqnr_db == SQNR_CAP_DB


def test_sample_metrics_dtypes():
    r = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float16)
    c = np.array([1, 2, 3, 5], dtype=np.int32)
    m = sample_metrics(r, c)
    assert m.mse == 0.25 and m.mae == 0.25 and m.max_abs == 1.0
    assert isinstance(m.mse, float) and isinstance(m.size, int)
    assert m.cosine == pytest.approx(ref_cosine([1, 2, 3, 4], [1, 2, 3, 5]), rel=1e-15)
    # float16 inf is detected after the cast.
    m = sample_metrics(np.array([np.inf, 1], np.float16), [1.0, 1.0])
    assert m.inf_ref == 1 and m.finite == 1
    d = m.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(SampleMetrics)}


def test_sample_metrics_is_frozen():
    m = sample_metrics([1.0], [1.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.mse = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------
# TensorAccumulator
# --------------------------------------------------------------------------


def _stream(seed: int, n: int):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = rng.standard_normal((2, 5)).astype(np.float32)
        c = (r + rng.normal(0, 0.1 * (i + 1), r.shape)).astype(np.float32)
        out.append((r, c))
    return out


def _with_nonfinite():
    return [
        (np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 2.0])),
        (np.array([1.0, 2.0, 3.0]), np.array([1.0, -np.inf, 2.0])),  # 2 finite
        (np.array([np.nan, 2.0, 3.0]), np.array([1.0, 2.0, np.inf])),  # 1 finite
        (np.array([np.nan, np.nan, 1.0]), np.array([1.0, 2.0, np.nan])),  # 0 finite
        (np.array([4.0, 0.0, -1.0]), np.array([4.0, 0.5, -1.0])),
    ]


def test_accumulator_means_and_worsts():
    pairs = _stream(1, 7)
    acc = TensorAccumulator()
    per = [acc.update(r, c) for r, c in pairs]
    # Independently computed per-sample values.
    cos = [ref_cosine(r.astype(np.float64), c.astype(np.float64)) for r, c in pairs]
    mses = [ref_mse(r, c) for r, c in pairs]
    maes = [ref_mae(r, c) for r, c in pairs]
    maxs = [ref_max_abs(r, c) for r, c in pairs]
    sq = [ref_sqnr(r, c) for r, c in pairs]
    kls = [ref_kl(r, c) for r, c in pairs]
    s = acc.result()
    assert isinstance(s, TensorSummary)
    assert s.samples == s.scored_samples == 7
    assert s.size == 10
    assert s.cosine == pytest.approx(sum(cos) / 7, rel=1e-13)
    assert s.cosine_worst == pytest.approx(min(cos), rel=1e-13)
    assert s.mse == pytest.approx(sum(mses) / 7, rel=1e-13)
    assert s.mse_worst == pytest.approx(max(mses), rel=1e-13)
    assert s.mae == pytest.approx(sum(maes) / 7, rel=1e-13)
    assert s.mae_worst == pytest.approx(max(maes), rel=1e-13)
    assert s.max_abs == max(maxs)
    assert s.sqnr_db == pytest.approx(sum(sq) / 7, rel=1e-12)
    assert s.sqnr_db_worst == pytest.approx(min(sq), rel=1e-12)
    assert s.kl == pytest.approx(sum(kls) / 7, rel=1e-9)
    assert s.kl_worst == pytest.approx(max(kls), rel=1e-9)
    # Means are the correctly rounded means of the returned per-sample values.
    assert s.cosine == exact_mean(m.cosine for m in per)
    assert s.mse == exact_mean(m.mse for m in per)
    assert s.sqnr_db == exact_mean(m.sqnr_db for m in per)
    assert s.kl == exact_mean(m.kl for m in per)
    assert s.cosine_worst == min(m.cosine for m in per)
    assert s.kl_worst == max(m.kl for m in per)
    assert (s.nan_float, s.inf_float, s.nan_quant, s.inf_quant) == (0, 0, 0, 0)
    assert s.nonfinite_samples == 0 and s.note == ""


def test_accumulator_single_sample_equals_sample():
    acc = TensorAccumulator()
    m = acc.update([1.0, 2.0, 3.0], [1.0, 2.0, 2.5])
    s = acc.result()
    assert (s.cosine, s.mse, s.mae, s.max_abs, s.sqnr_db, s.kl) == (
        m.cosine, m.mse, m.mae, m.max_abs, m.sqnr_db, m.kl,
    )
    assert s.cosine_worst == m.cosine and s.mse_worst == m.mse


def test_accumulator_nonfinite_counts_and_note():
    acc = TensorAccumulator()
    per = [acc.update(r, c) for r, c in _with_nonfinite()]
    s = acc.result()
    assert s.samples == 5
    assert s.scored_samples == 4
    assert s.nonfinite_samples == 3
    assert (s.nan_float, s.inf_float, s.nan_quant, s.inf_quant) == (3, 0, 1, 2)
    assert s.note == "3 of 5 samples had non-finite values"
    scored = [m for m in per if m.scored]
    assert s.mse == exact_mean(m.mse for m in scored)
    assert s.mse_worst == max(m.mse for m in scored)
    assert per[1].finite == 2 and per[1].mse == ref_mse([1.0, 3.0], [1.0, 2.0])
    # Sample 3 contributes the pair (2.0, 2.0) only -> mse 0.
    assert per[2].finite == 1 and per[2].mse == 0.0
    assert per[3].cosine is None


def test_accumulator_no_samples_and_all_nonfinite():
    s = TensorAccumulator().result()
    assert s.samples == 0 and s.scored_samples == 0 and s.size == 0
    assert s.note == "no samples"
    metric_names = [
        "cosine", "cosine_worst", "mse", "mse_worst", "mae", "mae_worst",
        "max_abs", "sqnr_db", "sqnr_db_worst", "kl", "kl_worst",
    ]
    assert all(getattr(s, k) is None for k in metric_names)

    acc = TensorAccumulator()
    acc.update([np.nan, np.inf], [1.0, 2.0])
    acc.update([1.0, 2.0], [np.nan, np.nan])
    s = acc.result()
    assert s.samples == 2 and s.scored_samples == 0
    assert s.note == "all values non-finite"
    assert all(getattr(s, k) is None for k in metric_names)
    assert (s.nan_float, s.inf_float, s.nan_quant, s.inf_quant) == (1, 1, 2, 0)
    assert s.nonfinite_samples == 2
    d = s.to_dict()
    assert d["cosine"] is None and d["note"] == "all values non-finite"
    assert list(d) == [f.name for f in dataclasses.fields(TensorSummary)]


def test_accumulator_empty_tensor_samples():
    acc = TensorAccumulator()
    acc.update(np.zeros((0, 4)), np.zeros((0, 4)))
    s = acc.result()
    assert s.scored_samples == 1 and s.note == ""
    assert s.cosine == 1.0 and s.sqnr_db == SQNR_CAP_DB and s.size == 0


def test_accumulator_size_is_last_sample():
    acc = TensorAccumulator()
    acc.update(np.ones(3), np.ones(3))
    acc.update(np.ones((2, 4)), np.ones(8))
    assert acc.result().size == 8
    assert acc.samples == 2


def _feed(pairs) -> TensorAccumulator:
    acc = TensorAccumulator()
    for r, c in pairs:
        acc.update(r, c)
    return acc


@pytest.mark.parametrize("split", [0, 1, 3, 5, 8])
def test_merge_equals_single_stream(split):
    pairs = _stream(2, 5) + _with_nonfinite() + _stream(3, 2)
    whole = _feed(pairs).result()
    a, b = _feed(pairs[:split]), _feed(pairs[split:])
    a_before, b_before = a.result(), b.result()
    merged = a.merge(b)
    assert merged is not a and merged is not b
    assert merged.result() == whole  # every field exactly equal
    assert merged.result().to_dict() == whole.to_dict()
    # Inputs are not mutated.
    assert a.result() == a_before and b.result() == b_before
    # Merging the other way round changes nothing but (possibly) `size`.
    rev = b.merge(a).result()
    assert dataclasses.replace(rev, size=whole.size) == whole


def test_merge_is_exact_regardless_of_grouping():
    # Values chosen so that naive float summation depends on grouping.
    pairs = [
        (np.array([1.0, 0.0]), np.array([1.0 + k * 1e-3, 0.3 * k])) for k in range(9)
    ]
    whole = _feed(pairs).result()
    m = _feed(pairs[:4]).merge(_feed(pairs[4:7])).merge(_feed(pairs[7:]))
    assert m.result() == whole
    m2 = _feed(pairs[:2]).merge(_feed(pairs[2:5]).merge(_feed(pairs[5:])))
    assert m2.result() == whole


def test_accumulator_is_o1_state():
    acc = _feed(_stream(4, 3))
    for name in acc.__slots__:
        if name != "_pending":  # the add_values queue, bounded (below)
            assert not isinstance(getattr(acc, name), (list, dict, np.ndarray))
    assert not hasattr(acc, "__dict__")
    rng = np.random.default_rng(0)
    for _ in range(100):
        acc.add_values(rng.random((97, 6)), 10)
        assert acc._pending_rows < 4096


def test_add_values_equals_add_of_each_row():
    """add_values folds exactly what add() of each row would, in any grouping."""
    rng = np.random.default_rng(3)
    rows = np.column_stack([
        1 - rng.random(300) * 1e-3, rng.random(300) * 10.0 ** rng.integers(-30, 3, 300), rng.random(300),
        rng.random(300) * 5, rng.uniform(-200, 200, 300), rng.random(300) * 1e-2,
    ])  # fmt: skip
    one = qm.TensorAccumulator()
    for v in rows:
        one.add(qm.SampleMetrics(*[float(x) for x in v], size=7, finite=7))
    grouped = qm.TensorAccumulator()
    for chunk in np.array_split(rows[::-1], 13):
        grouped.add_values(chunk, 7)
    assert grouped.result() == one.result()
    assert grouped.merge(qm.TensorAccumulator()).result() == one.result()


def test_accumulator_update_shape_error_folds_nothing():
    acc = TensorAccumulator()
    with pytest.raises(ValueError):
        acc.update(np.ones(3), np.ones(4))
    assert acc.result().samples == 0


# --------------------------------------------------------------------------
# Top-1
# --------------------------------------------------------------------------


def test_top1_accumulator():
    r = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0], [1.0, 2.0, 3.0]])
    c = np.array([[0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.0, 0.1, 0.9], [3.0, 2.0, 1.0]])
    acc = Top1Accumulator()
    assert acc.result() is None
    acc.update(r, c)
    # Independent: explicit loop with max/index.
    agree = sum(
        list(rr).index(max(rr)) == list(cc).index(max(cc))
        for rr, cc in zip(r.tolist(), c.tolist())
    )
    assert agree == 2
    assert (acc.rows, acc.agree) == (4, 2)
    assert acc.result() == 0.5
    # Leading dims are flattened; shape [2, 2, 3].
    acc2 = Top1Accumulator()
    acc2.update(r.reshape(2, 2, 3), c.reshape(2, 2, 3))
    assert (acc2.rows, acc2.agree) == (4, 2)
    merged = acc.merge(acc2)
    assert (merged.rows, merged.agree) == (8, 4)
    assert (acc.rows, acc.agree) == (4, 2)  # not mutated
    assert merged.result() == 0.5


def test_top1_nan_rows_disagree_and_dtypes():
    acc = Top1Accumulator()
    acc.update(
        np.array([[np.nan, 1.0], [0.0, 1.0]], dtype=np.float16),
        np.array([[np.nan, 1.0], [0, 1]], dtype=np.float32),
    )
    assert (acc.rows, acc.agree) == (2, 1)
    acc.update(np.array([1, 5, 2]), np.array([0, 9, 1]))  # 1-D int: one row
    assert (acc.rows, acc.agree) == (3, 2)
    acc.update(np.zeros((0, 4)), np.zeros((0, 4)))
    assert acc.rows == 3


def test_top1_errors():
    acc = Top1Accumulator()
    with pytest.raises(ValueError):
        acc.update(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError):
        acc.update(np.float32(1.0), np.float32(1.0))
    with pytest.raises(ValueError):
        acc.update(np.ones((2, 0)), np.ones((2, 0)))


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((8, 10), True),
        ((None, 10), True),
        (("batch", 1000), True),
        ((1, 2), True),
        ((1, 1, 1000), True),
        ((None, 1, 1, 10), True),
        (("N", 1, 10), True),
        ((-1, 1, 10), True),
        ((10,), False),
        ((), False),
        ((8, 1), False),
        ((8, None), False),
        ((8, "C"), False),
        ((8, 2, 10), False),
        ((8, 1, 10), False),
        ((2, 1, 1, 5), False),
        ((1, 8, 10), False),
        ((1, None, 10), False),
        ((1, 3, 224, 224), False),
        ((None, 64, 7, 7), False),
    ],
)
def test_looks_like_class_scores(shape, expected):
    assert looks_like_class_scores(shape) is expected
    assert looks_like_class_scores(list(shape)) is expected


def test_looks_like_class_scores_numpy_ints():
    assert looks_like_class_scores((np.int64(1), np.int64(10))) is True
    assert looks_like_class_scores(np.array([4, 3, 10]).tolist()) is False


# --------------------------------------------------------------------------
# Dependencies
# --------------------------------------------------------------------------


def test_metrics_imports_only_numpy_and_stdlib():
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("qdiff_metrics_isolated", {str(METRICS_PY)!r})
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
assert mod.cosine([1.0, 0.0], [0.0, 1.0]) == 0.0
banned = ("onnx", "onnxruntime", "pandas", "matplotlib", "rich", "scipy", "qdiff")
bad = sorted(m for m in sys.modules if m.split(".")[0] in banned)
print("BAD:" + ",".join(bad))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "BAD:", proc.stdout


def test_metrics_source_imports_are_stdlib_or_numpy():
    import ast

    tree = ast.parse(METRICS_PY.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "metrics.py must not import qdiff modules"
            roots.add((node.module or "").split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    assert roots <= allowed, roots - allowed


def test_public_api():
    for name in qm.__all__:
        assert hasattr(qm, name), name
    assert SQNR_CAP_DB == 200.0 and KL_BINS == 128 and EPS == 1e-10
    assert isinstance(sample_metrics([1.0], [1.0]), SampleMetrics)


def test_rows_agree_with_per_sample_metrics_and_do_not_depend_on_grouping():
    from qdiff.metrics import sample_metrics, sample_metrics_rows

    rng = np.random.default_rng(0)
    r = rng.normal(size=(12, 300)).astype(np.float32)
    c = (r + 0.02 * rng.normal(size=r.shape)).astype(np.float32)
    r[1] = 0.0
    c[1] = 0.0  # both zero
    c[2] = 0.0  # one zero
    r[3] = 2.0
    c[3] = 2.0  # constant and equal
    c[4, 7] = np.nan  # non-finite: per-row fallback
    rows = sample_metrics_rows(r, c)
    for i, m in enumerate(rows):
        ref = sample_metrics(r[i], c[i])
        assert (m.size, m.finite, m.nan_cand) == (ref.size, ref.finite, ref.nan_cand)
        for f in ("cosine", "mse", "mae", "max_abs", "sqnr_db", "kl"):
            assert getattr(m, f) == pytest.approx(getattr(ref, f), rel=1e-12, abs=1e-15), (i, f)
    # a row's values do not depend on the other rows of its stack
    alone = [sample_metrics_rows(r[i : i + 1], c[i : i + 1])[0] for i in range(12)]
    halves = sample_metrics_rows(r[:5], c[:5]) + sample_metrics_rows(r[5:], c[5:])
    assert alone == rows == halves


def test_exact_column_sums_equal_rational_sums():
    """add_exact_columns: per column, exactly the rational sum of the values (and inf counts),
    on subnormals, huge values, zeros of both signs, infinities and both signs."""
    from fractions import Fraction

    rng = np.random.default_rng(11)
    cols = [
        rng.uniform(-1, 1, 700) * 10.0 ** rng.integers(-320, 308, 700),  # subnormals to ~1e308
        np.r_[rng.random(690), [0.0, -0.0, 5e-324, -5e-324, 1.7e308, 1.7e308, -1e-310, 2.0**-1022, 3.0, -3.0]],
        np.r_[rng.normal(size=697), [np.inf, -np.inf, np.inf]],
    ]
    v = np.column_stack(cols)
    sums = [qm._ExactSum() for _ in cols]
    qm.add_exact_columns(sums, v[:400])
    qm.add_exact_columns(sums, v[400:])
    for s, col in zip(sums, cols):
        fin = col[np.isfinite(col)]
        want = sum((Fraction(float(x)) for x in fin), Fraction(0))
        assert Fraction(s.fixed, 1 << qm._FIXED_SHIFT) == want
        assert (s.pos_inf, s.neg_inf) == (int(np.sum(col == np.inf)), int(np.sum(col == -np.inf)))
    one = qm._ExactSum()
    for x in cols[0]:
        one.add(float(x))
    assert one.fixed == sums[0].fixed
    with pytest.raises(ValueError):
        qm.add_exact_columns([qm._ExactSum()], np.array([[1.0]] * 20 + [[np.nan]]))
