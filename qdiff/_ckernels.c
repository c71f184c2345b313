/*
 * qdiff._ckernels: the per-sample metric reductions in one pass over each tensor pair.
 *
 * Called through ctypes (see qdiff/_kernels.py), which releases the GIL, so two threads can
 * reduce different rows at once. No Python or numpy C API is used; the module init only makes
 * the shared object importable and findable.
 *
 * A "row" is one sample of one tensor pair: n reference values r (float32 or float64) and n
 * candidate values c (float32, float64, or integers dequantized as DequantizeLinear does,
 * float((float)q - zero_point) * scale in float32). Each row is cut into chunks of `chunk`
 * elements; job j = row * n_chunks + chunk index. qd_chunks fills, per job:
 *
 *   parts[j] = (sum r^2, sum c^2, sum r*c, sum (r-c)^2, sum |r-c|, max |r-c|)   (float64)
 *   hist[j]  = bins counts of r, then bins counts of c, over the row's [lo, lo + bins / factor]
 *
 * and qd_finish adds the chunk partials of each row in chunk order and computes the metrics.
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

enum { T_F32 = 0, T_F64 = 1, T_I8 = 2, T_U8 = 3, T_I16 = 4, T_U16 = 5 };

static inline int64_t bin_of(double x, double lo, double factor, int64_t last) {
    /* Only rows whose values are all finite and within [lo, hi] are binned (the caller's todo),
     * so t is in [0, bins * (1 + 2^-52)]: the conversion is defined and truncation is floor. */
    int64_t k = (int64_t)((x - lo) * factor);
    return k > last ? last : k;
}

#define SUMS_BODY(LOAD_C)                                                                  \
    double rr[4] = {0, 0, 0, 0}, cc[4] = {0, 0, 0, 0}, rc[4] = {0, 0, 0, 0};               \
    double dd[4] = {0, 0, 0, 0}, sad[4] = {0, 0, 0, 0}, mx[4] = {0, 0, 0, 0};              \
    int64_t i = 0;                                                                         \
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
    }                                                                                      \
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
    }                                                                                      \
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

#define LOAD_FLOAT(j) ((double)c[j])
#define LOAD_DEQ(j) ((double)(((float)c[j] - zp) * scale))

#define DEFINE_SUMS(NAME, RT, CT, LOAD)                                                    \
    static void NAME(const RT *r, const CT *c, int64_t m, float scale, float zp,           \
                     double *out) {                                                        \
        (void)scale;                                                                       \
        (void)zp;                                                                          \
        SUMS_BODY(LOAD)                                                                    \
    }

/* 8-bit codes: the dequantized value of each of the 256 codes, looked up (same value bit for bit) */
#define LOAD_LUT(j) (lut[(uint8_t)c[j]])

#define DEFINE_SUMS_LUT(NAME, CT)                                                          \
    static void NAME(const float *r, const CT *c, int64_t m, const double *lut,            \
                     double *out) {                                                        \
        SUMS_BODY(LOAD_LUT)                                                                \
    }

DEFINE_SUMS(sums_f32_f32, float, float, LOAD_FLOAT)
DEFINE_SUMS_LUT(sums_f32_i8_lut, int8_t)
DEFINE_SUMS_LUT(sums_f32_u8_lut, uint8_t)
DEFINE_SUMS(sums_f64_f64, double, double, LOAD_FLOAT)
DEFINE_SUMS(sums_f32_i16, float, int16_t, LOAD_DEQ)
DEFINE_SUMS(sums_f32_u16, float, uint16_t, LOAD_DEQ)

/* four sub-histograms: runs of equal values (ReLU zeros) do not serialise on one counter */
#define DEFINE_HIST(NAME, T)                                                               \
    static void NAME(const T *x, int64_t m, double lo, double factor, int64_t bins,        \
                     int64_t *h) {                                                         \
        int64_t last = bins - 1;                                                           \
        int32_t *sub = (int32_t *)calloc(4 * (size_t)bins, sizeof(int32_t));               \
        if (!sub) {                                                                        \
            for (int64_t i = 0; i < m; i++) h[bin_of((double)x[i], lo, factor, last)]++;   \
            return;                                                                        \
        }                                                                                  \
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
        free(sub);                                                                         \
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

/* 8-bit codes: count the 256 codes, then bin each value once (the same bin as one by one) */
static void hist_codes8(const uint8_t *x, int64_t m, int is_signed, float scale, float zp,
                        double lo, double factor, int64_t bins, int64_t *h) {
    int64_t counts[256];
    memset(counts, 0, sizeof(counts));
    for (int64_t i = 0; i < m; i++) counts[x[i]]++;
    int64_t last = bins - 1;
    for (int v = 0; v < 256; v++) {
        if (!counts[v]) continue;
        float q = is_signed ? (float)(int8_t)(uint8_t)v : (float)v;
        double value = (double)((q - zp) * scale);
        h[bin_of(value, lo, factor, last)] += counts[v];
    }
}

/* Fill parts/hist for jobs [job_lo, job_hi). Returns 0, or -1 for an unsupported type pair. */
int qd_chunks(const void *r, int r_type, const void *c, int c_type, float scale, float zp,
              int64_t k, int64_t n, int64_t chunk, int64_t bins, const double *lo,
              const double *factor, const uint8_t *todo, int64_t job_lo, int64_t job_hi,
              double *parts, int64_t *hist) {
    (void)k;
    int64_t n_chunks = (n + chunk - 1) / chunk;
    double lut[256];
    if (c_type == T_I8 || c_type == T_U8)
        for (int v = 0; v < 256; v++) {
            float q = c_type == T_I8 ? (float)(int8_t)(uint8_t)v : (float)v;
            lut[v] = (double)((q - zp) * scale);
        }
    for (int64_t job = job_lo; job < job_hi; job++) {
        int64_t row = job / n_chunks;
        int64_t start = (job - row * n_chunks) * chunk;
        int64_t stop = start + chunk < n ? start + chunk : n;
        int64_t m = stop - start;
        int64_t off = row * n + start;
        double *out = parts + job * 6;
        int64_t *hr = hist + job * 2 * bins;
        int64_t *hc = hr + bins;
        if (r_type == T_F32) {
            const float *rp = (const float *)r + off;
            switch (c_type) {
            case T_F32: sums_f32_f32(rp, (const float *)c + off, m, scale, zp, out); break;
            case T_I8: sums_f32_i8_lut(rp, (const int8_t *)c + off, m, lut, out); break;
            case T_U8: sums_f32_u8_lut(rp, (const uint8_t *)c + off, m, lut, out); break;
            case T_I16: sums_f32_i16(rp, (const int16_t *)c + off, m, scale, zp, out); break;
            case T_U16: sums_f32_u16(rp, (const uint16_t *)c + off, m, scale, zp, out); break;
            default: return -1;
            }
            if (todo[row]) hist_f32(rp, m, lo[row], factor[row], bins, hr);
        } else if (r_type == T_F64 && c_type == T_F64) {
            const double *rp = (const double *)r + off;
            sums_f64_f64(rp, (const double *)c + off, m, scale, zp, out);
            if (todo[row]) hist_f64(rp, m, lo[row], factor[row], bins, hr);
        } else {
            return -1;
        }
        if (!todo[row]) continue;
        switch (c_type) {
        case T_F32: hist_f32((const float *)c + off, m, lo[row], factor[row], bins, hc); break;
        case T_F64: hist_f64((const double *)c + off, m, lo[row], factor[row], bins, hc); break;
        case T_I8:
            hist_codes8((const uint8_t *)((const int8_t *)c + off), m, 1, scale, zp, lo[row],
                        factor[row], bins, hc);
            break;
        case T_U8:
            hist_codes8((const uint8_t *)c + off, m, 0, scale, zp, lo[row], factor[row], bins, hc);
            break;
        case T_I16:
            hist_i16((const int16_t *)c + off, m, scale, zp, lo[row], factor[row], bins, hc);
            break;
        case T_U16:
            hist_u16((const uint16_t *)c + off, m, scale, zp, lo[row], factor[row], bins, hc);
            break;
        default: return -1;
        }
    }
    return 0;
}

/*
 * Per row: chunk partials added in chunk order, then the metrics with the numpy path's formulas.
 * res[row] = (cosine, mse, mae, max_abs, sqnr_db, kl); ok[row] = 0 where the row must take the
 * careful path (non-finite or non-normal sums).
 */
void qd_finish(const double *parts, const int64_t *hist, int64_t k, int64_t n, int64_t chunk,
               int64_t bins, const uint8_t *todo, double tiny, double cap, double eps,
               double *res, uint8_t *ok) {
    int64_t n_chunks = (n + chunk - 1) / chunk;
    double *p = (double *)malloc(sizeof(double) * 2 * (size_t)bins);
    double *q = p + bins;
    for (int64_t row = 0; row < k; row++) {
        double rr = 0, cc = 0, rc = 0, dd = 0, sad = 0, mx = 0;
        int nan_max = 0;
        for (int64_t j = 0; j < n_chunks; j++) {
            const double *o = parts + (row * n_chunks + j) * 6;
            rr += o[0];
            cc += o[1];
            rc += o[2];
            dd += o[3];
            sad += o[4];
            if (o[5] != o[5]) nan_max = 1;
            mx = o[5] > mx ? o[5] : mx;
        }
        double norm2 = rr * cc;
        double vals[4] = {rr, cc, dd, norm2};
        int normal = isfinite(rc) && isfinite(sad) && isfinite(mx) && !nan_max;
        for (int v = 0; v < 4; v++)
            if (!(vals[v] == 0.0 || (vals[v] >= tiny && isfinite(vals[v])))) normal = 0;
        ok[row] = (uint8_t)normal;
        if (!normal) continue;
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
        if (todo[row]) {
            for (int64_t b = 0; b < bins; b++) p[b] = q[b] = 0.0;
            for (int64_t j = 0; j < n_chunks; j++) {
                const int64_t *h = hist + (row * n_chunks + j) * 2 * bins;
                for (int64_t b = 0; b < bins; b++) {
                    p[b] += (double)h[b];
                    q[b] += (double)h[bins + b];
                }
            }
            double ps = 0.0, qs = 0.0;
            for (int64_t b = 0; b < bins; b++) {
                p[b] = p[b] / (double)n + eps;
                q[b] = q[b] / (double)n + eps;
                ps += p[b];
                qs += q[b];
            }
            for (int64_t b = 0; b < bins; b++) {
                double pb = p[b] / ps, qb = q[b] / qs;
                kl += pb * (log(pb) - log(qb));
            }
            kl = kl > 0.0 ? kl : 0.0;
        }
        double *o = res + row * 6;
        o[0] = cosv;
        o[1] = dd / (double)n;
        o[2] = sad / (double)n;
        o[3] = mx;
        o[4] = sqnr;
        o[5] = kl;
    }
    free(p);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernels",
                                    "qdiff's compiled metric reductions (used through ctypes).",
                                    -1, NULL};

PyMODINIT_FUNC PyInit__ckernels(void) { return PyModule_Create(&module); }
