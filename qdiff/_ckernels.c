/*
 * qdiff._ckernels: the per-sample metric reductions in one pass over each tensor pair.
 *
 * Called through ctypes (see qdiff/_kernels.py), which releases the GIL, so two threads can
 * reduce different rows at once. No Python or numpy C API is used; the module init only makes
 * the shared object importable and findable.
 *
 * A "row" is one sample of one tensor pair: n reference values r (float32 or float64) and n
 * candidate values c (float32, float64, or integers dequantized as DequantizeLinear does,
 * float((float)q - zero_point) * scale in float32). qd_metrics takes each row in two passes, so
 * the second reads what the first left in cache:
 *
 *   pass 1, per chunk j of `chunk` elements:
 *     parts[j] = (sum r^2, sum c^2, sum r*c, sum (r-c)^2, sum |r-c|, max |r-c|)   (float64)
 *     and the row's value range [lo, hi] of r and c (SSE2 min/max where the compiler has it)
 *   pass 2, where every value is finite and the range has a normal width:
 *     bins counts of r, then bins counts of c, over [lo, hi]
 *
 * then finish_row adds the chunk partials in chunk order and computes the row's metrics.
 * The sums use 4 independent lanes per accumulator, added in a fixed order at the end: no
 * reassociation is left to the compiler (no -ffast-math), so a chunk's sums are the same bit
 * for bit whichever thread computes it and whatever other rows share the call. Binning is
 * floor((x - lo) * factor) in double, clamped to [0, bins - 1]: the formula of the numpy path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

enum { T_F32 = 0, T_F64 = 1, T_I8 = 2, T_U8 = 3, T_I16 = 4, T_U16 = 5 };

static inline int64_t bin_of(double x, double lo, double factor, int64_t last) {
    /* Only rows whose values are all finite and within [lo, hi] are binned (qd_metrics' pass 2),
     * so t is in [0, bins * (1 + 2^-52)]: the conversion is defined and truncation is floor. */
    int64_t k = (int64_t)((x - lo) * factor);
    return k > last ? last : k;
}

/* The 4-lane main loop. With SSE2 (every x86-64) lanes (0, 1) and (2, 3) are two __m128d and
 * each lane does the scalar loop's operations in the same order (mul then add, no FMA; maxpd(a, b)
 * is a > b ? a : b), so both loops give the same bits. */
#if defined(__SSE2__)
#define SUMS_MAIN(LOAD_C, LOAD_R4, LOAD_C4)                                                \
    {                                                                                      \
        const __m128d absmask = _mm_castsi128_pd(_mm_set1_epi64x(0x7fffffffffffffffLL));   \
        __m128d rr0 = _mm_setzero_pd(), rr1 = rr0, cc0 = rr0, cc1 = rr0, rc0 = rr0;         \
        __m128d rc1 = rr0, dd0 = rr0, dd1 = rr0, sa0 = rr0, sa1 = rr0, mx0 = rr0, mx1 = rr0; \
        for (; i + 4 <= m; i += 4) {                                                       \
            __m128d a0, a1, b0, b1;                                                        \
            LOAD_R4(a0, a1);                                                               \
            LOAD_C4(b0, b1);                                                               \
            __m128d d0 = _mm_sub_pd(a0, b0), d1 = _mm_sub_pd(a1, b1);                      \
            __m128d e0 = _mm_and_pd(d0, absmask), e1 = _mm_and_pd(d1, absmask);            \
            rr0 = _mm_add_pd(rr0, _mm_mul_pd(a0, a0));                                     \
            rr1 = _mm_add_pd(rr1, _mm_mul_pd(a1, a1));                                     \
            cc0 = _mm_add_pd(cc0, _mm_mul_pd(b0, b0));                                     \
            cc1 = _mm_add_pd(cc1, _mm_mul_pd(b1, b1));                                     \
            rc0 = _mm_add_pd(rc0, _mm_mul_pd(a0, b0));                                     \
            rc1 = _mm_add_pd(rc1, _mm_mul_pd(a1, b1));                                     \
            dd0 = _mm_add_pd(dd0, _mm_mul_pd(d0, d0));                                     \
            dd1 = _mm_add_pd(dd1, _mm_mul_pd(d1, d1));                                     \
            sa0 = _mm_add_pd(sa0, e0);                                                     \
            sa1 = _mm_add_pd(sa1, e1);                                                     \
            mx0 = _mm_max_pd(e0, mx0);                                                     \
            mx1 = _mm_max_pd(e1, mx1);                                                     \
        }                                                                                  \
        _mm_storeu_pd(rr, rr0); _mm_storeu_pd(rr + 2, rr1);                                \
        _mm_storeu_pd(cc, cc0); _mm_storeu_pd(cc + 2, cc1);                                \
        _mm_storeu_pd(rc, rc0); _mm_storeu_pd(rc + 2, rc1);                                \
        _mm_storeu_pd(dd, dd0); _mm_storeu_pd(dd + 2, dd1);                                \
        _mm_storeu_pd(sad, sa0); _mm_storeu_pd(sad + 2, sa1);                              \
        _mm_storeu_pd(mx, mx0); _mm_storeu_pd(mx + 2, mx1);                                \
    }
/* 4 values from p + i as two __m128d (float32 widened, or float64 loaded) */
#define F32X4(p, x0, x1)                                                                   \
    {                                                                                      \
        __m128 v_ = _mm_loadu_ps((const float *)(p) + i);                                  \
        x0 = _mm_cvtps_pd(v_);                                                             \
        x1 = _mm_cvtps_pd(_mm_movehl_ps(v_, v_));                                          \
    }
#define F64X4(p, x0, x1)                                                                   \
    {                                                                                      \
        x0 = _mm_loadu_pd((const double *)(p) + i);                                        \
        x1 = _mm_loadu_pd((const double *)(p) + i + 2);                                    \
    }
#define R4_F32(a0, a1) F32X4(r, a0, a1)
#define R4_F64(a0, a1) F64X4(r, a0, a1)
#define C4_F32(b0, b1) F32X4(c, b0, b1)
#define C4_F64(b0, b1) F64X4(c, b0, b1)
#define C4_LUT(b0, b1)                                                                     \
    {                                                                                      \
        b0 = _mm_set_pd(lut[(uint8_t)c[i + 1]], lut[(uint8_t)c[i]]);                       \
        b1 = _mm_set_pd(lut[(uint8_t)c[i + 3]], lut[(uint8_t)c[i + 2]]);                   \
    }
#define C4_DEQ(b0, b1)                                                                     \
    {                                                                                      \
        b0 = _mm_set_pd(LOAD_DEQ(i + 1), LOAD_DEQ(i));                                     \
        b1 = _mm_set_pd(LOAD_DEQ(i + 3), LOAD_DEQ(i + 2));                                 \
    }
#else
#define SUMS_MAIN(LOAD_C, LOAD_R4, LOAD_C4)                                                \
    for (; i + 4 <= m; i += 4) {                                                           \
        for (int l = 0; l < 4; l++) {                                                      \
            double a = (double)r[i + l];                                                   \
            double b = LOAD_C(i + l);                                                      \
            double d = a - b;                                                              \
            double ad = fabs(d);                                                           \
            rr[l] += a * a;                                                                \
            cc[l] += b * b;                                                                \
            rc[l] += a * b;                                                                \
            dd[l] += d * d;                                                                \
            sad[l] += ad;                                                                  \
            mx[l] = ad > mx[l] ? ad : mx[l]; /* a NaN row has NaN sums: slow path */        \
        }                                                                                  \
    }
#endif

/* the elements after the last whole 4 go to lane 0; then the lanes are added in a fixed order */
#define SUMS_TAIL(LOAD_C)                                                                  \
    for (; i < m; i++) {                                                                   \
        double a = (double)r[i];                                                           \
        double b = LOAD_C(i);                                                              \
        double d = a - b;                                                                  \
        double ad = fabs(d);                                                               \
        rr[0] += a * a;                                                                    \
        cc[0] += b * b;                                                                    \
        rc[0] += a * b;                                                                    \
        dd[0] += d * d;                                                                    \
        sad[0] += ad;                                                                      \
        mx[0] = ad > mx[0] ? ad : mx[0];                                                   \
    }
#define SUMS_OUT                                                                           \
    out[0] = (rr[0] + rr[1]) + (rr[2] + rr[3]);                                            \
    out[1] = (cc[0] + cc[1]) + (cc[2] + cc[3]);                                            \
    out[2] = (rc[0] + rc[1]) + (rc[2] + rc[3]);                                            \
    out[3] = (dd[0] + dd[1]) + (dd[2] + dd[3]);                                            \
    out[4] = (sad[0] + sad[1]) + (sad[2] + sad[3]);                                        \
    {                                                                                      \
        double a = mx[0] > mx[1] ? mx[0] : mx[1];                                          \
        double b = mx[2] > mx[3] ? mx[2] : mx[3];                                          \
        out[5] = a > b ? a : b;                                                            \
    }

#define SUMS_BODY(LOAD_C, LOAD_R4, LOAD_C4)                                                \
    double rr[4] = {0, 0, 0, 0}, cc[4] = {0, 0, 0, 0}, rc[4] = {0, 0, 0, 0};               \
    double dd[4] = {0, 0, 0, 0}, sad[4] = {0, 0, 0, 0}, mx[4] = {0, 0, 0, 0};              \
    int64_t i = 0;                                                                         \
    SUMS_MAIN(LOAD_C, LOAD_R4, LOAD_C4)                                                    \
    SUMS_TAIL(LOAD_C)                                                                      \
    SUMS_OUT

#define LOAD_FLOAT(j) ((double)c[j])
#define LOAD_DEQ(j) ((double)(((float)c[j] - zp) * scale))

#define DEFINE_SUMS(NAME, RT, CT, LOAD, R4, C4)                                            \
    static void NAME(const RT *r, const CT *c, int64_t m, float scale, float zp,           \
                     double *out) {                                                        \
        (void)scale;                                                                       \
        (void)zp;                                                                          \
        SUMS_BODY(LOAD, R4, C4)                                                            \
    }

/* 8-bit codes: the dequantized value of each of the 256 codes, looked up (same value bit for bit) */
#define LOAD_LUT(j) (lut[(uint8_t)c[j]])

#define DEFINE_SUMS_LUT(NAME, CT)                                                          \
    static void NAME(const float *r, const CT *c, int64_t m, const double *lut,            \
                     double *out) {                                                        \
        SUMS_BODY(LOAD_LUT, R4_F32, C4_LUT)                                                \
    }

DEFINE_SUMS(sums_f32_f32, float, float, LOAD_FLOAT, R4_F32, C4_F32)
DEFINE_SUMS_LUT(sums_f32_i8_lut, int8_t)
DEFINE_SUMS_LUT(sums_f32_u8_lut, uint8_t)
DEFINE_SUMS(sums_f64_f64, double, double, LOAD_FLOAT, R4_F64, C4_F64)
DEFINE_SUMS(sums_f32_i16, float, int16_t, LOAD_DEQ, R4_F32, C4_DEQ)
DEFINE_SUMS(sums_f32_u16, float, uint16_t, LOAD_DEQ, R4_F32, C4_DEQ)

/* Sub-histograms in a caller's scratch of 4 * bins int32 (one call covers at most one chunk, so
 * no counter can overflow): runs of equal values (ReLU zeros) do not serialise on one counter. */
#define DEFINE_HIST(NAME, T)                                                               \
    static void NAME(const T *x, int64_t m, double lo, double factor, int64_t bins,        \
                     int32_t *sub, int64_t *h) {                                           \
        int64_t last = bins - 1;                                                           \
        memset(sub, 0, 4 * (size_t)bins * sizeof(int32_t));                                \
        int64_t i = 0;                                                                     \
        for (; i + 4 <= m; i += 4) {                                                       \
            sub[bin_of((double)x[i], lo, factor, last)]++;                                 \
            sub[bins + bin_of((double)x[i + 1], lo, factor, last)]++;                      \
            sub[2 * bins + bin_of((double)x[i + 2], lo, factor, last)]++;                  \
            sub[3 * bins + bin_of((double)x[i + 3], lo, factor, last)]++;                  \
        }                                                                                  \
        for (; i < m; i++) sub[bin_of((double)x[i], lo, factor, last)]++;                  \
        for (int64_t b = 0; b < bins; b++)                                                 \
            h[b] += (int64_t)sub[b] + sub[bins + b] + sub[2 * bins + b] + sub[3 * bins + b]; \
    }

DEFINE_HIST(hist_f32, float)
DEFINE_HIST(hist_f64, double)

#define DEFINE_HIST_DEQ(NAME, T)                                                           \
    static void NAME(const T *x, int64_t m, float scale, float zp, double lo,              \
                     double factor, int64_t bins, int64_t *h) {                            \
        int64_t last = bins - 1;                                                           \
        for (int64_t i = 0; i < m; i++)                                                    \
            h[bin_of((double)(((float)x[i] - zp) * scale), lo, factor, last)]++;           \
    }

DEFINE_HIST_DEQ(hist_i16, int16_t)
DEFINE_HIST_DEQ(hist_u16, uint16_t)

/* 8-bit codes: count the codes (4 interleaved counters, for runs of one code), then bin each
 * code's value once (the same bin as one by one). Only the row's code range [vlo, vhi] (signed
 * for int8; every code of the chunk is in it) is cleared and walked. m <= one chunk, so uint32
 * counts suffice. */
static void hist_codes8(const uint8_t *x, int64_t m, int is_signed, float scale, float zp,
                        double lo, double factor, int64_t bins, int64_t *h, int32_t vlo, int32_t vhi) {
    uint32_t counts[4][256];
    for (int32_t v = vlo; v <= vhi; v++) {
        uint8_t k = (uint8_t)v;
        counts[0][k] = counts[1][k] = counts[2][k] = counts[3][k] = 0;
    }
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        counts[0][x[i]]++;
        counts[1][x[i + 1]]++;
        counts[2][x[i + 2]]++;
        counts[3][x[i + 3]]++;
    }
    for (; i < m; i++) counts[0][x[i]]++;
    int64_t last = bins - 1;
    for (int32_t v = vlo; v <= vhi; v++) {
        uint8_t k = (uint8_t)v;
        int64_t cnt = (int64_t)counts[0][k] + counts[1][k] + counts[2][k] + counts[3][k];
        if (!cnt) continue;
        float q = is_signed ? (float)(int8_t)k : (float)k;
        double value = (double)((q - zp) * scale);
        h[bin_of(value, lo, factor, last)] += cnt;
    }
}

/* Range of a chunk, folded into *lo / *hi. Only rows whose values are all finite are binned, so
 * how NaN compares here does not matter. */
static void minmax_f32(const float *x, int64_t m, float *lo, float *hi) {
    float a = *lo, b = *hi;
    int64_t i = 0;
#if defined(__SSE2__)
    if (m >= 8) {
        __m128 mn0 = _mm_loadu_ps(x), mx0 = mn0, mn1 = _mm_loadu_ps(x + 4), mx1 = mn1;
        for (i = 8; i + 8 <= m; i += 8) {
            __m128 v0 = _mm_loadu_ps(x + i), v1 = _mm_loadu_ps(x + i + 4);
            mn0 = _mm_min_ps(mn0, v0);
            mx0 = _mm_max_ps(mx0, v0);
            mn1 = _mm_min_ps(mn1, v1);
            mx1 = _mm_max_ps(mx1, v1);
        }
        float t[4], u[4];
        _mm_storeu_ps(t, _mm_min_ps(mn0, mn1));
        _mm_storeu_ps(u, _mm_max_ps(mx0, mx1));
        for (int l = 0; l < 4; l++) {
            a = t[l] < a ? t[l] : a;
            b = u[l] > b ? u[l] : b;
        }
    }
#endif
    for (; i < m; i++) {
        a = x[i] < a ? x[i] : a;
        b = x[i] > b ? x[i] : b;
    }
    *lo = a;
    *hi = b;
}

static void minmax_f64(const double *x, int64_t m, double *lo, double *hi) {
    double a = *lo, b = *hi;
    for (int64_t i = 0; i < m; i++) {
        a = x[i] < a ? x[i] : a;
        b = x[i] > b ? x[i] : b;
    }
    *lo = a;
    *hi = b;
}

#define DEFINE_MINMAX_INT(ATTR, NAME, T)                                                   \
    ATTR static void NAME(const T *x, int64_t m, int32_t *lo, int32_t *hi) {               \
        T a = (T)*lo, b = (T)*hi;                                                          \
        for (int64_t i = 0; i < m; i++) {                                                  \
            a = x[i] < a ? x[i] : a;                                                       \
            b = x[i] > b ? x[i] : b;                                                       \
        }                                                                                  \
        *lo = a;                                                                           \
        *hi = b;                                                                           \
    }

#define NO_ATTR
DEFINE_MINMAX_INT(NO_ATTR, minmax_i8, int8_t)
DEFINE_MINMAX_INT(NO_ATTR, minmax_u8, uint8_t)
DEFINE_MINMAX_INT(NO_ATTR, minmax_i16, int16_t)
DEFINE_MINMAX_INT(NO_ATTR, minmax_u16, uint16_t)

/*
 * AVX2 (x86-64 with GCC or Clang, chosen at run time where the CPU has it): the same 4-lane sums
 * as SUMS_BODY in one __m256d per accumulator (lane l takes elements l, l + 4, ... in order, as
 * in the SSE2 and portable loops, mul then add, no FMA), with the value range of the operands
 * folded into the same loop, and the float bins of pass 2 computed 4 at a time (the same double
 * formula, truncated as the scalar cast does). Same bits as the other paths (tested).
 */
#if defined(__SSE2__) && (defined(__GNUC__) || defined(__clang__)) && !defined(QD_NO_AVX2)
#define QD_AVX2 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2")))

static int use_avx2 = -1; /* -1: not decided yet */

static int avx2_on(void) {
    if (use_avx2 < 0) {
        __builtin_cpu_init();
        use_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return use_avx2;
}

/* candidates: 4 values as doubles from p + i, and (float32 operands) the 4 raw floats */
#define AVX_C_F32(b, raw) { raw = _mm_loadu_ps(c + i); b = _mm256_cvtps_pd(raw); }
#define AVX_C_LUT(b, raw)                                                                  \
    {                                                                                      \
        int32_t k4_;                                                                       \
        memcpy(&k4_, c + i, 4);                                                            \
        b = _mm256_i32gather_pd(lut, _mm_cvtepu8_epi32(_mm_cvtsi32_si128(k4_)), 8);       \
        (void)raw;                                                                         \
    }

#define DEFINE_SUMS_AVX2(NAME, CT, LOADC, LOAD_SCALAR, C_IS_F32)                           \
    AVX2_FN static void NAME(const float *r, const CT *c, int64_t m, const double *lut,    \
                             double *out, float *rlo, float *rhi, float *clo, float *chi) { \
        (void)lut;                                                                         \
        double rr[4], cc[4], rc[4], dd[4], sad[4], mx[4];                                  \
        const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL)); \
        __m256d vrr = _mm256_setzero_pd(), vcc = vrr, vrc = vrr, vdd = vrr, vsa = vrr, vmx = vrr; \
        __m128 rmn = _mm_set1_ps(*rlo), rmx = _mm_set1_ps(*rhi);                           \
        __m128 cmn = _mm_set1_ps(C_IS_F32 ? *clo : 0.0f), cmx = _mm_set1_ps(C_IS_F32 ? *chi : 0.0f); \
        int64_t i = 0;                                                                     \
        for (; i + 4 <= m; i += 4) {                                                       \
            __m128 ra = _mm_loadu_ps(r + i), craw = ra;                                    \
            __m256d a = _mm256_cvtps_pd(ra), b;                                            \
            LOADC(b, craw);                                                                \
            rmn = _mm_min_ps(rmn, ra);                                                     \
            rmx = _mm_max_ps(rmx, ra);                                                     \
            if (C_IS_F32) {                                                                \
                cmn = _mm_min_ps(cmn, craw);                                               \
                cmx = _mm_max_ps(cmx, craw);                                               \
            }                                                                              \
            __m256d d = _mm256_sub_pd(a, b);                                               \
            __m256d e = _mm256_and_pd(d, absmask);                                         \
            vrr = _mm256_add_pd(vrr, _mm256_mul_pd(a, a));                                 \
            vcc = _mm256_add_pd(vcc, _mm256_mul_pd(b, b));                                 \
            vrc = _mm256_add_pd(vrc, _mm256_mul_pd(a, b));                                 \
            vdd = _mm256_add_pd(vdd, _mm256_mul_pd(d, d));                                 \
            vsa = _mm256_add_pd(vsa, e);                                                   \
            vmx = _mm256_max_pd(e, vmx);                                                   \
        }                                                                                  \
        _mm256_storeu_pd(rr, vrr); _mm256_storeu_pd(cc, vcc); _mm256_storeu_pd(rc, vrc);   \
        _mm256_storeu_pd(dd, vdd); _mm256_storeu_pd(sad, vsa); _mm256_storeu_pd(mx, vmx);  \
        float t[4], u[4];                                                                  \
        _mm_storeu_ps(t, rmn);                                                             \
        _mm_storeu_ps(u, rmx);                                                             \
        float a_lo = *rlo, a_hi = *rhi;                                                    \
        for (int l = 0; l < 4; l++) {                                                      \
            a_lo = t[l] < a_lo ? t[l] : a_lo;                                              \
            a_hi = u[l] > a_hi ? u[l] : a_hi;                                              \
        }                                                                                  \
        float b_lo = C_IS_F32 ? *clo : 0.0f, b_hi = C_IS_F32 ? *chi : 0.0f;                \
        if (C_IS_F32) {                                                                    \
            _mm_storeu_ps(t, cmn);                                                         \
            _mm_storeu_ps(u, cmx);                                                         \
            for (int l = 0; l < 4; l++) {                                                  \
                b_lo = t[l] < b_lo ? t[l] : b_lo;                                          \
                b_hi = u[l] > b_hi ? u[l] : b_hi;                                          \
            }                                                                              \
        }                                                                                  \
        for (int64_t j = i; j < m; j++) {                                                  \
            a_lo = r[j] < a_lo ? r[j] : a_lo;                                              \
            a_hi = r[j] > a_hi ? r[j] : a_hi;                                              \
            if (C_IS_F32) {                                                                \
                float cv = ((const float *)(const void *)c)[j];                            \
                b_lo = cv < b_lo ? cv : b_lo;                                              \
                b_hi = cv > b_hi ? cv : b_hi;                                              \
            }                                                                              \
        }                                                                                  \
        *rlo = a_lo;                                                                       \
        *rhi = a_hi;                                                                       \
        if (C_IS_F32) {                                                                    \
            *clo = b_lo;                                                                   \
            *chi = b_hi;                                                                   \
        }                                                                                  \
        SUMS_TAIL(LOAD_SCALAR)                                                             \
        SUMS_OUT                                                                           \
    }

DEFINE_SUMS_AVX2(sums_f32_f32_avx2, float, AVX_C_F32, LOAD_FLOAT, 1)
DEFINE_SUMS_AVX2(sums_f32_i8_avx2, int8_t, AVX_C_LUT, LOAD_LUT, 0)
DEFINE_SUMS_AVX2(sums_f32_u8_avx2, uint8_t, AVX_C_LUT, LOAD_LUT, 0)

/* the same loop, which the compiler vectorises with AVX2 here */
DEFINE_MINMAX_INT(AVX2_FN, minmax_i8_avx2, int8_t)
DEFINE_MINMAX_INT(AVX2_FN, minmax_u8_avx2, uint8_t)

AVX2_FN static void hist_f32_avx2(const float *x, int64_t m, double lo, double factor, int64_t bins,
                                  int32_t *sub, int64_t *h) {
    int64_t last = bins - 1;
    memset(sub, 0, 4 * (size_t)bins * sizeof(int32_t));
    const __m256d vlo = _mm256_set1_pd(lo), vf = _mm256_set1_pd(factor);
    const __m128i vlast = _mm_set1_epi32((int32_t)last);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        /* t in [0, bins * (1 + 2^-52)]: int32 truncation is the scalar cast's floor */
        __m256d t = _mm256_mul_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), vlo), vf);
        int32_t k[4];
        _mm_storeu_si128((__m128i *)k, _mm_min_epi32(_mm256_cvttpd_epi32(t), vlast));
        sub[k[0]]++;
        sub[bins + k[1]]++;
        sub[2 * bins + k[2]]++;
        sub[3 * bins + k[3]]++;
    }
    for (; i < m; i++) sub[bin_of((double)x[i], lo, factor, last)]++;
    for (int64_t b = 0; b < bins; b++)
        h[b] += (int64_t)sub[b] + sub[bins + b] + sub[2 * bins + b] + sub[3 * bins + b];
}
#endif

/* Force (1) or forbid (0) the AVX2 loops, or leave the CPU's choice (-1); returns the level
 * in use afterwards (0 where the extension has no AVX2 path). For tests. */
int qd_avx2(int want) {
#ifdef QD_AVX2
    int can = (use_avx2 = -1, avx2_on());
    if (want >= 0) use_avx2 = want && can;
    return use_avx2;
#else
    (void)want;
    return 0;
#endif
}

enum { KL_SEEN = 64 };

/* x (or log(x) with take_log) for a bin of count h, remembered in seen[h] for counts below
 * KL_SEEN (bit h of *have says it is there): x must be a function of h alone within the row. */
static inline double by_count(double *seen, uint64_t *have, int64_t h, double x, int take_log) {
    if (h >= KL_SEEN) return take_log ? log(x) : x;
    if (!((*have >> h) & 1u)) {
        seen[h] = take_log ? log(x) : x;
        *have |= (uint64_t)1 << h;
    }
    return seen[h];
}

/*
 * One row's metrics from its chunk partials (added in chunk order) and, when binned, its two
 * histograms, with the numpy path's formulas: o = (cosine, mse, mae, max_abs, sqnr_db, kl).
 * Returns 0 where the row must take the careful path (non-finite or non-normal sums).
 */
static int finish_row(const double *parts, int64_t n_chunks, const int64_t *hist, int64_t n,
                      int64_t bins, double tiny, double cap, double eps, double *p, double *o) {
    double *q = p + bins;
    double rr = 0, cc = 0, rc = 0, dd = 0, sad = 0, mx = 0;
    int nan_max = 0;
    for (int64_t j = 0; j < n_chunks; j++) {
        const double *v = parts + j * 6;
        rr += v[0];
        cc += v[1];
        rc += v[2];
        dd += v[3];
        sad += v[4];
        if (v[5] != v[5]) nan_max = 1;
        mx = v[5] > mx ? v[5] : mx;
    }
    double norm2 = rr * cc;
    double vals[4] = {rr, cc, dd, norm2};
    int normal = isfinite(rc) && isfinite(sad) && isfinite(mx) && !nan_max;
    for (int v = 0; v < 4; v++)
        if (!(vals[v] == 0.0 || (vals[v] >= tiny && isfinite(vals[v])))) normal = 0;
    if (!normal) return 0;
    double cosv, sqnr, kl = 0.0;
    if (rr == 0.0 && cc == 0.0)
        cosv = 1.0;
    else if (rr == 0.0 || cc == 0.0)
        cosv = 0.0;
    else {
        cosv = rc / sqrt(norm2);
        cosv = cosv > 1.0 ? 1.0 : (cosv < -1.0 ? -1.0 : cosv);
    }
    if (dd == 0.0)
        sqnr = cap;
    else if (rr == 0.0)
        sqnr = -cap;
    else {
        sqnr = 10.0 * (log10(rr) - log10(dd));
        sqnr = sqnr > cap ? cap : (sqnr < -cap ? -cap : sqnr);
    }
    if (hist) {
        /* Every per-bin quantity is a function of the bin's count alone (n, eps, ps and qs are the
         * row's): count/n + eps, and the logs of p/ps and q/qs. For counts below KL_SEEN (most bins
         * of a small tensor, and every empty bin of the tails) each is computed once per row and
         * looked up after (by_count): the same operations on the same values, so the same bits. */
        double val_seen[KL_SEEN], lp_seen[KL_SEEN], lq_seen[KL_SEEN];
        uint64_t have_v = 0, have_p = 0, have_q = 0;
        double ps = 0.0, qs = 0.0;
        for (int64_t b = 0; b < bins; b++) {
            p[b] = by_count(val_seen, &have_v, hist[b], (double)hist[b] / (double)n + eps, 0);
            q[b] = by_count(val_seen, &have_v, hist[bins + b], (double)hist[bins + b] / (double)n + eps, 0);
            ps += p[b];
            qs += q[b];
        }
        for (int64_t b = 0; b < bins; b++) {
            double pb = p[b] / ps;
            double lp = by_count(lp_seen, &have_p, hist[b], pb, 1);
            double lq = by_count(lq_seen, &have_q, hist[bins + b], q[b] / qs, 1);
            kl += pb * (lp - lq);
        }
        kl = kl > 0.0 ? kl : 0.0;
    }
    o[0] = cosv;
    o[1] = dd / (double)n;
    o[2] = sad / (double)n;
    o[3] = mx;
    o[4] = sqnr;
    o[5] = kl;
    return 1;
}

/*
 * Rows [row_lo, row_hi) of two [k, n] stacks: for each row, pass 1 over its chunks (the chunk
 * sums, the row's value range of r and c), then pass 2 (only where every value is finite and the
 * range has a normal width) bins r and c over [lo, hi], then the metrics. res[row] = (cosine,
 * mse, mae, max_abs, sqnr_db, kl, good): good is 1.0, or 0.0 where the row must take the careful
 * path (non-finite or non-normal sums, a range too narrow to bin). Integer candidates' range is
 * the dequantized range of their codes (dequantization is monotonic: the caller passes integer
 * codes only with scale > 0), computed as numpy would in float32. bins == 0: no pass 2 (kl is
 * 0; callers that ask for it do not report KL).
 * Returns 0, -1 for an unsupported type pair, -2 when scratch memory cannot be had.
 */
int qd_metrics(const void *r, int r_type, const void *c, int c_type, float scale, float zp,
               int64_t n, int64_t chunk, int64_t bins, int64_t row_lo, int64_t row_hi, double tiny,
               double cap, double eps, double *res) {
    int f32 = r_type == T_F32;
    if (!(f32 && (c_type == T_F32 || c_type == T_I8 || c_type == T_U8 || c_type == T_I16 ||
                  c_type == T_U16)) &&
        !(r_type == T_F64 && c_type == T_F64))
        return -1;
    double lut[256];
    if (c_type == T_I8 || c_type == T_U8)
        for (int v = 0; v < 256; v++) {
            float q = c_type == T_I8 ? (float)(int8_t)(uint8_t)v : (float)v;
            lut[v] = (double)((q - zp) * scale);
        }
    int64_t n_chunks = (n + chunk - 1) / chunk;
    /* scratch: chunk partials, the two histograms, the sub-histograms, the KL probabilities */
    size_t n_parts = 6 * (size_t)(n_chunks > 0 ? n_chunks : 1);
    char *scratch = (char *)malloc(n_parts * sizeof(double) + 2 * (size_t)bins * sizeof(int64_t) +
                                   4 * (size_t)bins * sizeof(int32_t) + 2 * (size_t)bins * sizeof(double));
    if (!scratch) return -2;
    double *parts = (double *)scratch;
    int64_t *hist = (int64_t *)(parts + n_parts);
    double *probs = (double *)(hist + 2 * bins);
    int32_t *sub = (int32_t *)(probs + 2 * bins);
    for (int64_t row = row_lo; row < row_hi; row++) {
        int64_t base = row * n;
        float rlo32 = 0, rhi32 = 0, clo32 = 0, chi32 = 0;
        double rlo64 = 0, rhi64 = 0, clo64 = 0, chi64 = 0;
        int32_t clo_i = 0, chi_i = 0;
        int finite = 1;
        if (n > 0) {
            if (f32) rlo32 = rhi32 = ((const float *)r)[base];
            else rlo64 = rhi64 = ((const double *)r)[base];
            switch (c_type) {
            case T_F32: clo32 = chi32 = ((const float *)c)[base]; break;
            case T_F64: clo64 = chi64 = ((const double *)c)[base]; break;
            case T_I8: clo_i = chi_i = ((const int8_t *)c)[base]; break;
            case T_U8: clo_i = chi_i = ((const uint8_t *)c)[base]; break;
            case T_I16: clo_i = chi_i = ((const int16_t *)c)[base]; break;
            case T_U16: clo_i = chi_i = ((const uint16_t *)c)[base]; break;
            }
        }
        for (int64_t j = 0; j < n_chunks; j++) {
            int64_t start = j * chunk;
            int64_t m = start + chunk < n ? chunk : n - start;
            int64_t off = base + start;
            double *out = parts + j * 6;
            if (f32) {
                const float *rp = (const float *)r + off;
#ifdef QD_AVX2
                if (avx2_on() && (c_type == T_F32 || c_type == T_I8 || c_type == T_U8)) {
                    if (c_type == T_F32)
                        sums_f32_f32_avx2(rp, (const float *)c + off, m, lut, out, &rlo32, &rhi32, &clo32, &chi32);
                    else if (c_type == T_I8) {
                        sums_f32_i8_avx2(rp, (const int8_t *)c + off, m, lut, out, &rlo32, &rhi32, NULL, NULL);
                        minmax_i8_avx2((const int8_t *)c + off, m, &clo_i, &chi_i);
                    } else {
                        sums_f32_u8_avx2(rp, (const uint8_t *)c + off, m, lut, out, &rlo32, &rhi32, NULL, NULL);
                        minmax_u8_avx2((const uint8_t *)c + off, m, &clo_i, &chi_i);
                    }
                    if (!(isfinite(out[0]) && isfinite(out[1]))) finite = 0;
                    continue;
                }
#endif
                switch (c_type) {
                case T_F32:
                    sums_f32_f32(rp, (const float *)c + off, m, scale, zp, out);
                    minmax_f32((const float *)c + off, m, &clo32, &chi32);
                    break;
                case T_I8:
                    sums_f32_i8_lut(rp, (const int8_t *)c + off, m, lut, out);
                    minmax_i8((const int8_t *)c + off, m, &clo_i, &chi_i);
                    break;
                case T_U8:
                    sums_f32_u8_lut(rp, (const uint8_t *)c + off, m, lut, out);
                    minmax_u8((const uint8_t *)c + off, m, &clo_i, &chi_i);
                    break;
                case T_I16:
                    sums_f32_i16(rp, (const int16_t *)c + off, m, scale, zp, out);
                    minmax_i16((const int16_t *)c + off, m, &clo_i, &chi_i);
                    break;
                case T_U16:
                    sums_f32_u16(rp, (const uint16_t *)c + off, m, scale, zp, out);
                    minmax_u16((const uint16_t *)c + off, m, &clo_i, &chi_i);
                    break;
                }
                minmax_f32(rp, m, &rlo32, &rhi32);
            } else {
                const double *rp = (const double *)r + off;
                sums_f64_f64(rp, (const double *)c + off, m, scale, zp, out);
                minmax_f64(rp, m, &rlo64, &rhi64);
                minmax_f64((const double *)c + off, m, &clo64, &chi64);
            }
            /* finite squares: every value of the chunk is finite (a NaN or Inf makes them NaN/Inf) */
            if (!(isfinite(out[0]) && isfinite(out[1]))) finite = 0;
        }
        double lo, hi, c_lo, c_hi;
        if (f32) {
            lo = (double)rlo32;
            hi = (double)rhi32;
        } else {
            lo = rlo64;
            hi = rhi64;
        }
        switch (c_type) {
        case T_F32: c_lo = (double)clo32; c_hi = (double)chi32; break;
        case T_F64: c_lo = clo64; c_hi = chi64; break;
        default:
            c_lo = (double)(((float)clo_i - zp) * scale);
            c_hi = (double)(((float)chi_i - zp) * scale);
        }
        lo = c_lo < lo ? c_lo : lo;
        hi = c_hi > hi ? c_hi : hi;
        int has_range = hi > lo;
        double factor = has_range ? (double)bins / (hi - lo) : 0.0;
        int todo = finite && n > 0 && has_range && isfinite(factor) && isfinite(lo) && isfinite(hi);
        double *o = res + row * 7;
        if (bins == 0) {
            /* no histograms asked for (KL not reported): the sums' metrics, kl 0; non-finite or
             * non-normal sums still take the careful path */
            o[6] = finish_row(parts, n_chunks, NULL, n, bins, tiny, cap, eps, probs, o);
            continue;
        }
        if (!todo) {
            /* a row without a range is not binned (KL 0); one whose range is too narrow to bin,
             * or with a non-finite value, takes the careful path */
            o[6] = finish_row(parts, n_chunks, NULL, n, bins, tiny, cap, eps, probs, o) && !has_range;
            continue;
        }
        int64_t *hr = hist;
        int64_t *hc = hr + bins;
        memset(hist, 0, 2 * (size_t)bins * sizeof(int64_t));
        for (int64_t start = 0; start < n; start += chunk) {
            int64_t m = start + chunk < n ? chunk : n - start;
            int64_t off = base + start;
#ifdef QD_AVX2
            if (f32 && avx2_on()) hist_f32_avx2((const float *)r + off, m, lo, factor, bins, sub, hr);
            else
#endif
            if (f32) hist_f32((const float *)r + off, m, lo, factor, bins, sub, hr);
            else hist_f64((const double *)r + off, m, lo, factor, bins, sub, hr);
            switch (c_type) {
            case T_F32:
#ifdef QD_AVX2
                if (avx2_on()) {
                    hist_f32_avx2((const float *)c + off, m, lo, factor, bins, sub, hc);
                    break;
                }
#endif
                hist_f32((const float *)c + off, m, lo, factor, bins, sub, hc);
                break;
            case T_F64: hist_f64((const double *)c + off, m, lo, factor, bins, sub, hc); break;
            case T_I8:
                hist_codes8((const uint8_t *)((const int8_t *)c + off), m, 1, scale, zp, lo, factor,
                            bins, hc, clo_i, chi_i);
                break;
            case T_U8:
                hist_codes8((const uint8_t *)c + off, m, 0, scale, zp, lo, factor, bins, hc, clo_i, chi_i);
                break;
            case T_I16:
                hist_i16((const int16_t *)c + off, m, scale, zp, lo, factor, bins, hc);
                break;
            case T_U16:
                hist_u16((const uint16_t *)c + off, m, scale, zp, lo, factor, bins, hc);
                break;
            }
        }
        o[6] = finish_row(parts, n_chunks, hist, n, bins, tiny, cap, eps, probs, o);
    }
    free(scratch);
    return 0;
}

/*
 * Many stacks in one call (one call per group of runs: the caller's per-call cost is paid once).
 * Task t: ptrs[2t] = r, ptrs[2t + 1] = c, res_ptrs[t] = its res ([k, 7] as in qd_metrics);
 * ints[4t..4t+3] = (r_type, c_type, n, k); qp[2t..2t+1] = (scale, zero point). Returns the first
 * non-zero status of qd_metrics, or 0.
 */
int qd_many(int64_t n_tasks, void *const *ptrs, double *const *res_ptrs, const int64_t *ints,
            const float *qp, int64_t chunk, int64_t bins, double tiny, double cap, double eps) {
    for (int64_t t = 0; t < n_tasks; t++) {
        const int64_t *d = ints + 4 * t;
        int rc = qd_metrics(ptrs[2 * t], (int)d[0], ptrs[2 * t + 1], (int)d[1], qp[2 * t], qp[2 * t + 1],
                            d[2], chunk, bins, 0, d[3], tiny, cap, eps, res_ptrs[t]);
        if (rc) return rc;
    }
    return 0;
}

/*
 * Per-column sums of two [rows, cols] float32 matrices (the per-channel cosines of MatMul/Gemm
 * weights, whose channel axis is the last): rr[j] += r[i, j]^2, cc[j] += c[i, j]^2,
 * rc[j] += r[i, j] * c[i, j] over i in order, in float64 (the caller zeroes the sums). Each
 * column's sum runs down the rows in order, so vectorising across columns changes no bit.
 */
void qd_col_sums(const float *r, const float *c, int64_t rows, int64_t cols, double *rr, double *cc,
                 double *rc) {
    for (int64_t i = 0; i < rows; i++) {
        const float *ri = r + i * cols, *ci = c + i * cols;
        for (int64_t j = 0; j < cols; j++) {
            double a = (double)ri[j], b = (double)ci[j];
            rr[j] += a * a;
            cc[j] += b * b;
            rc[j] += a * b;
        }
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernels",
                                    "qdiff's compiled metric reductions (used through ctypes).",
                                    -1, NULL};

PyMODINIT_FUNC PyInit__ckernels(void) { return PyModule_Create(&module); }
