/* Fold kernels for LIFL: acc[i] += sum_k w[k] * x_k[i], accumulating in float64.
 *
 * Why C: numpy needs two ufunc passes (multiply, add) per update, each casting
 * float32 -> float64 through a buffer, which reaches ~0.4x of memcpy bandwidth.
 * Here several pending updates are folded in one pass over a cache-sized block
 * of the accumulator, so the float64 accumulator is read and written once per
 * block for up to FUSE updates, and the GIL is released while folding.
 * Built as an optional extension; lifl.fold falls back to numpy without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#define BLOCK 4096   /* 32 KiB of float64 accumulator: stays in L1/L2 */
#define MAXSRC 64

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

enum { K_F32 = 0, K_F64 = 1, K_F16 = 2, K_BF16 = 3, K_I64 = 4, K_I32 = 5, K_I16 = 6,
       K_I8 = 7, K_U8 = 8, K_BOOL = 9 };

static inline double bf16_to_double(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16; float f; memcpy(&f, &u, 4); return (double)f;
}

/* IEEE binary16 -> float32 without branches, so the fold loop vectorises (the method of
 * Maratyszcza's FP16 library): exact for every value, Inf and NaN included. */
static inline float f32_of_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline double f16_to_double(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = f32_of_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_of_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = sign | (two_w < (1u << 27) ? bits_of_f32(denormalized) : bits_of_f32(normalized));
    return (double)f32_of_bits(r);
}

/* How a journaled fold changes the accumulator (lifl.fold.fold_in_place): each block [s, e) is
 * summed aside, into the journal's block-sized area (it stays in L1), from the block's old
 * values and the sources, which are read from memory together; then the record says the area
 * holds the block's new values, and they are copied in. The record (*mark, one release store
 * each time, nothing reordered across it) is (phase << 60 | (mark0 + s) << 32 | (mark0 + e)):
 * phase 0, summing: the block is untouched and a re-run resumes at s; phase 1, copying: the area
 * holds the new values, a re-run copies them in and resumes at e. Everything before the block is
 * folded, everything after it untouched. Where an undo copy of each block (or piece) before its
 * fold read the accumulator on its own, ahead of the sources, this reads it once, beside them. */
typedef struct { double *save; int64_t *mark; int64_t mark0; } Undo;
static inline void record(Undo *u, int64_t phase, Py_ssize_t s, Py_ssize_t e) {
    __atomic_store_n(u->mark, (phase << 60) | ((u->mark0 + (int64_t)s) << 32) | (u->mark0 + (int64_t)e),
                     __ATOMIC_RELEASE);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);   /* no later store moves above the record */
}
/* The block's new values are complete in the area: record that, then copy them in. */
static inline void copy_in(Undo *u, double *acc, Py_ssize_t s, Py_ssize_t e) {
    record(u, 1, s, e);
    memcpy(acc + s, u->save, (size_t)(e - s) * sizeof(double));
}

#define DEFINE_FOLD(NAME, T, CONV)                                                   \
MULTIVERSION static void NAME(double *restrict acc, const double *base, Py_ssize_t n, int k, \
                              const void *const *src, const double *w, Undo *u) {  \
    if (k == 0) u = NULL;                                                            \
    for (Py_ssize_t s = 0; s < n; s += BLOCK) {                                      \
        Py_ssize_t e = s + BLOCK < n ? s + BLOCK : n, m = e - s;                     \
        if (base) memcpy(acc + s, base + s, (size_t)m * sizeof(double));             \
        if (u) record(u, 0, s, e);                                                   \
        double *o = u ? u->save : acc + s;   /* where the block's new values are summed */ \
        const double *in = acc + s;                                                  \
        int j = 0;                                                                   \
        for (; j + 4 <= k; j += 4) {                                                 \
            const T *a = (const T *)src[j] + s, *b = (const T *)src[j + 1] + s;      \
            const T *c = (const T *)src[j + 2] + s, *d = (const T *)src[j + 3] + s;  \
            double wa = w[j], wb = w[j + 1], wc = w[j + 2], wd = w[j + 3];           \
            for (Py_ssize_t i = 0; i < m; i++)                                       \
                o[i] = in[i] + ((wa * CONV(a[i]) + wb * CONV(b[i])) + (wc * CONV(c[i]) + wd * CONV(d[i]))); \
            in = o;                                                                  \
        }                                                                            \
        for (; j < k; j++) {                                                         \
            const T *a = (const T *)src[j] + s; double wa = w[j];                    \
            for (Py_ssize_t i = 0; i < m; i++) o[i] = in[i] + wa * CONV(a[i]);       \
            in = o;                                                                  \
        }                                                                            \
        if (u) copy_in(u, acc, s, e);                                                \
    }                                                                                \
}

#define CAST(x) ((double)(x))
DEFINE_FOLD(fold_f32, float, CAST)
DEFINE_FOLD(fold_f64, double, CAST)
DEFINE_FOLD(fold_f16, uint16_t, f16_to_double)
DEFINE_FOLD(fold_bf16, uint16_t, bf16_to_double)
DEFINE_FOLD(fold_i64, int64_t, CAST)
DEFINE_FOLD(fold_i32, int32_t, CAST)
DEFINE_FOLD(fold_i16, int16_t, CAST)
DEFINE_FOLD(fold_i8, int8_t, CAST)
DEFINE_FOLD(fold_u8, uint8_t, CAST)

typedef void (*fold_fn)(double *, const double *, Py_ssize_t, int, const void *const *, const double *,
                        Undo *);
static fold_fn FOLDS[] = {fold_f32, fold_f64, fold_f16, fold_bf16, fold_i64, fold_i32,
                          fold_i16, fold_i8, fold_u8, fold_u8};

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
/* float16 with the F16C instruction (4 halves -> 4 floats -> 4 doubles per step): the portable
 * conversion above does not vectorise, and float16 updates (ENCODING_FLOAT16) fold as often as
 * float32 ones. Chosen at import when the CPU has AVX2 and F16C; exact like the scalar path. */
#define H4(p, i) _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((p) + (i)))))
__attribute__((target("avx2,f16c"))) static void fold_f16_f16c(double *restrict acc, const double *base,
        Py_ssize_t n, int k, const void *const *src, const double *w, Undo *u) {
    if (k == 0) u = NULL;
    for (Py_ssize_t s = 0; s < n; s += BLOCK) {
        Py_ssize_t e = s + BLOCK < n ? s + BLOCK : n, m = e - s, v = m / 4 * 4;
        if (base) memcpy(acc + s, base + s, (size_t)m * sizeof(double));
        if (u) record(u, 0, s, e);
        double *o = u ? u->save : acc + s;   /* as DEFINE_FOLD: summed aside when journaled */
        const double *in = acc + s;
        int j = 0;
        for (; j + 4 <= k; j += 4) {
            const uint16_t *a = (const uint16_t *)src[j] + s, *b = (const uint16_t *)src[j + 1] + s;
            const uint16_t *c = (const uint16_t *)src[j + 2] + s, *d = (const uint16_t *)src[j + 3] + s;
            __m256d wa = _mm256_set1_pd(w[j]), wb = _mm256_set1_pd(w[j + 1]);
            __m256d wc = _mm256_set1_pd(w[j + 2]), wd = _mm256_set1_pd(w[j + 3]);
            for (Py_ssize_t i = 0; i < v; i += 4) {
                __m256d ab = _mm256_add_pd(_mm256_mul_pd(wa, H4(a, i)), _mm256_mul_pd(wb, H4(b, i)));
                __m256d cd = _mm256_add_pd(_mm256_mul_pd(wc, H4(c, i)), _mm256_mul_pd(wd, H4(d, i)));
                _mm256_storeu_pd(o + i, _mm256_add_pd(_mm256_loadu_pd(in + i), _mm256_add_pd(ab, cd)));
            }
            for (Py_ssize_t i = v; i < m; i++)
                o[i] = in[i] + ((w[j] * f16_to_double(a[i]) + w[j + 1] * f16_to_double(b[i]))
                                + (w[j + 2] * f16_to_double(c[i]) + w[j + 3] * f16_to_double(d[i])));
            in = o;
        }
        for (; j < k; j++) {
            const uint16_t *a = (const uint16_t *)src[j] + s; __m256d wa = _mm256_set1_pd(w[j]);
            for (Py_ssize_t i = 0; i < v; i += 4)
                _mm256_storeu_pd(o + i, _mm256_add_pd(_mm256_loadu_pd(in + i), _mm256_mul_pd(wa, H4(a, i))));
            for (Py_ssize_t i = v; i < m; i++) o[i] = in[i] + w[j] * f16_to_double(a[i]);
            in = o;
        }
        if (u) copy_in(u, acc, s, e);
    }
}

static void pick_kernels(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) FOLDS[K_F16] = fold_f16_f16c;
}
#else
static void pick_kernels(void) {}
#endif
static const int ITEMSIZE[] = {4, 8, 2, 2, 8, 4, 2, 1, 1, 1};

/* fold(acc, sources, weights, kind[, base[, save, mark, mark0]]): acc float64 buffer (writable),
 * sources a sequence of buffers holding acc's element count in `kind`'s type. With base (a
 * float64 buffer of acc's size), acc = base + sum instead of acc += sum: the input accumulator
 * is never modified. With save and mark (base None): each block is summed aside and recorded
 * before it is copied in (Undo, above), so a fold cut short can be resumed exactly. */
static PyObject *py_fold(PyObject *self, PyObject *args) {
    PyObject *acc_obj, *srcs, *ws, *base_obj = Py_None, *save_obj = Py_None, *mark_obj = Py_None; int kind;
    long long mark0 = 0;
    if (!PyArg_ParseTuple(args, "OOOi|OOOL", &acc_obj, &srcs, &ws, &kind, &base_obj, &save_obj, &mark_obj, &mark0))
        return NULL;
    if (kind < 0 || kind > K_BOOL) { PyErr_SetString(PyExc_ValueError, "unknown kind"); return NULL; }
    Py_ssize_t k = PySequence_Size(srcs);
    if (k < 0) return NULL;
    if (k > MAXSRC || PySequence_Size(ws) != k) {
        PyErr_SetString(PyExc_ValueError, "need 0..64 sources and one weight each"); return NULL; }
    Py_buffer acc, bufs[MAXSRC]; const void *ptrs[MAXSRC]; double w[MAXSRC];
    if (PyObject_GetBuffer(acc_obj, &acc, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = acc.len / 8, got = 0; PyObject *ret = NULL;
    Py_buffer base, save = {0}, mark = {0}; int have_base = 0; Undo undo;
    if (base_obj != Py_None) {
        if (PyObject_GetBuffer(base_obj, &base, PyBUF_C_CONTIGUOUS) < 0) { PyBuffer_Release(&acc); return NULL; }
        have_base = 1;
        if (base.len != acc.len) {
            PyErr_SetString(PyExc_ValueError, "base and acc differ in size"); goto done; }
    }
    if ((save_obj == Py_None) != (mark_obj == Py_None) || (save_obj != Py_None && have_base)) {
        PyErr_SetString(PyExc_ValueError, "save and mark go together, and not with base"); goto done; }
    if (save_obj != Py_None) {
        if (PyObject_GetBuffer(save_obj, &save, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (PyObject_GetBuffer(mark_obj, &mark, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (save.len < BLOCK * 8 || mark.len != 8 || ((uintptr_t)mark.buf & 7)) {
            PyErr_SetString(PyExc_ValueError, "save must hold a block and mark be one aligned int64"); goto done; }
        undo.save = (double *)save.buf; undo.mark = (int64_t *)mark.buf; undo.mark0 = mark0;
    }
    for (; got < k; got++) {
        PyObject *o = PySequence_GetItem(srcs, got), *wo = PySequence_GetItem(ws, got);
        if (!o || !wo) { Py_XDECREF(o); Py_XDECREF(wo); goto done; }
        int rc = PyObject_GetBuffer(o, &bufs[got], PyBUF_C_CONTIGUOUS);
        w[got] = PyFloat_AsDouble(wo); Py_DECREF(o); Py_DECREF(wo);
        if (rc < 0) goto done;
        if (PyErr_Occurred()) { PyBuffer_Release(&bufs[got]); goto done; }
        if (bufs[got].len != n * ITEMSIZE[kind]) {
            PyBuffer_Release(&bufs[got]);
            PyErr_Format(PyExc_ValueError, "source %zd has %zd bytes, expected %zd", got,
                         bufs[got].len, n * ITEMSIZE[kind]);
            goto done;
        }
        ptrs[got] = bufs[got].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    FOLDS[kind]((double *)acc.buf, have_base ? (const double *)base.buf : NULL, n, (int)k, ptrs, w,
                save.obj ? &undo : NULL);
    Py_END_ALLOW_THREADS
    ret = Py_None; Py_INCREF(ret);
done:
    if (save.obj) PyBuffer_Release(&save);
    if (mark.obj) PyBuffer_Release(&mark);
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&bufs[i]);
    if (have_base) PyBuffer_Release(&base);
    PyBuffer_Release(&acc);
    return ret;
}

/* int8 blockwise (ENCODING_INT8_BLOCK256): element i of a source decodes to q[i] * scale[(i + phase) / QB].
 * The loop runs over quantisation blocks, so each source's weight times its block's scale is one
 * double per block and the inner loop is the same fused multiply-add as the float kernels. */
#define QB 256

MULTIVERSION static void fold_q8_impl(double *restrict acc, Py_ssize_t n, Py_ssize_t phase, int k,
                                      const int8_t *const *src, const float *const *sc, const double *w) {
    for (Py_ssize_t i0 = 0; i0 < n;) {
        Py_ssize_t b = (i0 + phase) / QB, i1 = (b + 1) * QB - phase;
        if (i1 > n) i1 = n;
        int j = 0;
        for (; j + 4 <= k; j += 4) {
            const int8_t *restrict a = src[j], *restrict bb = src[j + 1], *restrict c = src[j + 2], *restrict d = src[j + 3];
            double wa = w[j] * sc[j][b], wb = w[j + 1] * sc[j + 1][b];
            double wc = w[j + 2] * sc[j + 2][b], wd = w[j + 3] * sc[j + 3][b];
            for (Py_ssize_t i = i0; i < i1; i++)
                acc[i] += (wa * a[i] + wb * bb[i]) + (wc * c[i] + wd * d[i]);
        }
        for (; j < k; j++) {
            const int8_t *restrict a = src[j]; double wa = w[j] * sc[j][b];
            for (Py_ssize_t i = i0; i < i1; i++) acc[i] += wa * a[i];
        }
        i0 = i1;
    }
}

/* fold_q8(acc, values, scales, weights, phase): acc += sum_k w[k] * values[k][i] * scales[k][(i + phase) / 256].
 * values[k]: acc's element count of int8; scales[k]: exactly the float32 scales of the blocks
 * those elements fall in (phase: the first element's position inside its block). */
static PyObject *py_fold_q8(PyObject *self, PyObject *args) {
    PyObject *acc_obj, *vals, *scs, *ws; Py_ssize_t phase;
    if (!PyArg_ParseTuple(args, "OOOOn", &acc_obj, &vals, &scs, &ws, &phase)) return NULL;
    if (phase < 0 || phase >= QB) { PyErr_SetString(PyExc_ValueError, "phase must be in [0, 256)"); return NULL; }
    Py_ssize_t k = PySequence_Size(vals);
    if (k < 0) return NULL;
    if (k > MAXSRC || PySequence_Size(ws) != k || PySequence_Size(scs) != k) {
        PyErr_SetString(PyExc_ValueError, "need 0..64 sources, one scale array and one weight each"); return NULL; }
    Py_buffer acc, vb[MAXSRC], sb[MAXSRC]; const int8_t *vp[MAXSRC]; const float *sp[MAXSRC]; double w[MAXSRC];
    if (PyObject_GetBuffer(acc_obj, &acc, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = acc.len / 8, nblocks = n ? (phase + n + QB - 1) / QB : 0, got = 0; PyObject *ret = NULL;
    for (; got < k; got++) {
        PyObject *v = PySequence_GetItem(vals, got), *s = PySequence_GetItem(scs, got), *wo = PySequence_GetItem(ws, got);
        if (!v || !s || !wo) { Py_XDECREF(v); Py_XDECREF(s); Py_XDECREF(wo); goto done; }
        w[got] = PyFloat_AsDouble(wo); Py_DECREF(wo);
        int rc = PyObject_GetBuffer(v, &vb[got], PyBUF_C_CONTIGUOUS); Py_DECREF(v);
        if (rc < 0) { Py_DECREF(s); goto done; }
        rc = PyObject_GetBuffer(s, &sb[got], PyBUF_C_CONTIGUOUS); Py_DECREF(s);
        if (rc < 0) { PyBuffer_Release(&vb[got]); goto done; }
        if (PyErr_Occurred() || vb[got].len != n || sb[got].len != nblocks * 4) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "source %zd: %zd value bytes and %zd scale bytes, expected %zd and %zd",
                             got, vb[got].len, sb[got].len, n, nblocks * 4);
            PyBuffer_Release(&vb[got]); PyBuffer_Release(&sb[got]);
            goto done;
        }
        vp[got] = (const int8_t *)vb[got].buf; sp[got] = (const float *)sb[got].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    fold_q8_impl((double *)acc.buf, n, phase, (int)k, vp, sp, w);
    Py_END_ALLOW_THREADS
    ret = Py_None; Py_INCREF(ret);
done:
    for (Py_ssize_t i = 0; i < got; i++) { PyBuffer_Release(&vb[i]); PyBuffer_Release(&sb[i]); }
    PyBuffer_Release(&acc);
    return ret;
}

/* count_nonfinite(buf, kind) -> number of NaN/Inf elements (floats only). Loads go through
 * memcpy: ``ingest`` checks chunks at any byte offset, so elements need not be aligned. */
MULTIVERSION static Py_ssize_t nonfinite_f32(const void *x, Py_ssize_t n) {
    Py_ssize_t bad = 0; const unsigned char *p = (const unsigned char *)x;
    for (Py_ssize_t i = 0; i < n; i++) { uint32_t u; memcpy(&u, p + 4 * i, 4); bad += (u & 0x7f800000u) == 0x7f800000u; }
    return bad;
}
MULTIVERSION static Py_ssize_t nonfinite_f64(const void *x, Py_ssize_t n) {
    Py_ssize_t bad = 0; const unsigned char *p = (const unsigned char *)x;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t u; memcpy(&u, p + 8 * i, 8); bad += (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    }
    return bad;
}
MULTIVERSION static Py_ssize_t nonfinite_u16(const void *x, Py_ssize_t n, uint16_t mask) {
    Py_ssize_t bad = 0; const unsigned char *p = (const unsigned char *)x;
    for (Py_ssize_t i = 0; i < n; i++) { uint16_t u; memcpy(&u, p + 2 * i, 2); bad += (u & mask) == mask; }
    return bad;
}

static PyObject *py_count_nonfinite(PyObject *self, PyObject *args) {
    Py_buffer b; int kind; Py_ssize_t bad = 0;
    if (!PyArg_ParseTuple(args, "y*i", &b, &kind)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
        case K_F32: bad = nonfinite_f32(b.buf, b.len / 4); break;
        case K_F64: bad = nonfinite_f64(b.buf, b.len / 8); break;
        case K_F16: bad = nonfinite_u16(b.buf, b.len / 2, 0x7c00); break;
        case K_BF16: bad = nonfinite_u16(b.buf, b.len / 2, 0x7f80); break;
        default: bad = 0;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(bad);
}

/* scan(buf, kind) -> (nonfinite, sum of squares): both in one pass over an update's chunk as it
 * lands (the L2-norm screen and the NaN/Inf check read each byte once). Squares are summed in
 * float64 with four partial sums (vectorisable without -ffast-math). */
#define DEFINE_SCAN(NAME, T, CONV, BAD)                                                \
MULTIVERSION static double NAME(const T *restrict x, Py_ssize_t n, Py_ssize_t *bad) {  \
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0; Py_ssize_t nb = 0, i = 0;                 \
    for (; i + 4 <= n; i += 4) {                                                     \
        double a = CONV(x[i]), b = CONV(x[i + 1]), c = CONV(x[i + 2]), d = CONV(x[i + 3]); \
        s0 += a * a; s1 += b * b; s2 += c * c; s3 += d * d;                          \
        nb += BAD(x[i]) + BAD(x[i + 1]) + BAD(x[i + 2]) + BAD(x[i + 3]);             \
    }                                                                                \
    for (; i < n; i++) { double a = CONV(x[i]); s0 += a * a; nb += BAD(x[i]); }      \
    *bad = nb;                                                                       \
    return (s0 + s1) + (s2 + s3);                                                    \
}
#define AS_DOUBLE(v) ((double)(v))
static inline int bad_f32(float v) { uint32_t u; memcpy(&u, &v, 4); return (u & 0x7f800000u) == 0x7f800000u; }
static inline int bad_f64(double v) { uint64_t u; memcpy(&u, &v, 8); return (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull; }
static inline int bad_f16(uint16_t v) { return (v & 0x7c00) == 0x7c00; }
static inline int bad_bf16(uint16_t v) { return (v & 0x7f80) == 0x7f80; }
DEFINE_SCAN(scan_f32, float, AS_DOUBLE, bad_f32)
DEFINE_SCAN(scan_f64, double, AS_DOUBLE, bad_f64)
DEFINE_SCAN(scan_f16, uint16_t, f16_to_double, bad_f16)
DEFINE_SCAN(scan_bf16, uint16_t, bf16_to_double, bad_bf16)

static PyObject *py_scan(PyObject *self, PyObject *args) {
    Py_buffer b; int kind; Py_ssize_t bad = 0; double sq = 0;
    if (!PyArg_ParseTuple(args, "y*i", &b, &kind)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
        case K_F32: sq = scan_f32((const float *)b.buf, b.len / 4, &bad); break;
        case K_F64: sq = scan_f64((const double *)b.buf, b.len / 8, &bad); break;
        case K_F16: sq = scan_f16((const uint16_t *)b.buf, b.len / 2, &bad); break;
        case K_BF16: sq = scan_bf16((const uint16_t *)b.buf, b.len / 2, &bad); break;
        default: break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return Py_BuildValue("nd", bad, sq);
}

/* mean_to(acc, out, total_weight, kind): out[i] = (T)(acc[i] / total_weight) for float32 and
 * float64 outputs, in one pass (numpy needs a temporary per step). */
MULTIVERSION static void mean_f32(const double *restrict acc, float *restrict out, Py_ssize_t n, double w) {
    for (Py_ssize_t i = 0; i < n; i++) out[i] = (float)(acc[i] / w);
}
MULTIVERSION static void mean_f64(const double *restrict acc, double *restrict out, Py_ssize_t n, double w) {
    for (Py_ssize_t i = 0; i < n; i++) out[i] = acc[i] / w;
}

static PyObject *py_mean_to(PyObject *self, PyObject *args) {
    Py_buffer acc, out; double w; int kind;
    if (!PyArg_ParseTuple(args, "y*w*di", &acc, &out, &w, &kind)) return NULL;
    Py_ssize_t n = acc.len / 8;
    int size = kind == K_F32 ? 4 : kind == K_F64 ? 8 : 0;
    if (!size || out.len != n * size) {
        PyBuffer_Release(&acc); PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "mean_to: float32/float64 output of acc's length required");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (kind == K_F32) mean_f32((const double *)acc.buf, (float *)out.buf, n, w);
    else mean_f64((const double *)acc.buf, (double *)out.buf, n, w);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&acc); PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* quantize_q8(x, scales, values, max_scale) -> blocks holding NaN/Inf: blockwise absmax int8 quantisation of
 * float32 x (ENCODING_INT8_BLOCK256, on the client): scale = min(absmax / 127, max_scale), q = rint(x / scale)
 * clipped to +-127, in one pass over x per block (numpy needs five). A block with NaN/Inf gets scale NaN. */
MULTIVERSION static Py_ssize_t quantize_q8_impl(const float *restrict x, Py_ssize_t n, float *restrict sc,
                                                int8_t *restrict q, float max_scale) {
    Py_ssize_t bad = 0;
    for (Py_ssize_t b = 0; b * QB < n; b++) {
        const float *xb = x + b * QB; int8_t *qb = q + b * QB;
        Py_ssize_t m = n - b * QB < QB ? n - b * QB : QB;
        uint32_t top = 0;
        for (Py_ssize_t i = 0; i < m; i++) { uint32_t u; memcpy(&u, xb + i, 4); u &= 0x7fffffffu; top = u > top ? u : top; }
        if (top >= 0x7f800000u) { sc[b] = NAN; bad++; memset(qb, 0, (size_t)m); continue; }
        float s = f32_of_bits(top) / 127.0f;
        if (s > max_scale) s = max_scale;
        sc[b] = s;
        float inv = s > 0 ? 1.0f / s : 0.0f;
        for (Py_ssize_t i = 0; i < m; i++) {
            float v = rintf(xb[i] * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            qb[i] = (int8_t)v;
        }
    }
    return bad;
}

static PyObject *py_quantize_q8(PyObject *self, PyObject *args) {
    Py_buffer x, sc, q; double max_scale; Py_ssize_t bad = 0;
    if (!PyArg_ParseTuple(args, "y*w*w*d", &x, &sc, &q, &max_scale)) return NULL;
    Py_ssize_t n = x.len / 4;
    if (x.len % 4 || q.len != n || sc.len != ((n + QB - 1) / QB) * 4) {
        PyBuffer_Release(&x); PyBuffer_Release(&sc); PyBuffer_Release(&q);
        PyErr_SetString(PyExc_ValueError, "quantize_q8: float32 x, ceil(n/256) float32 scales, n int8 values");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    bad = quantize_q8_impl((const float *)x.buf, n, (float *)sc.buf, (int8_t *)q.buf, (float)max_scale);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x); PyBuffer_Release(&sc); PyBuffer_Release(&q);
    return PyLong_FromSsize_t(bad);
}

/* Server optimizer step fused with finalize (lifl/serverstep.py), float64 arithmetic:
 *   d = acc[i] * (1/w) - base[i]   (delta mode: d = acc[i] * (1/w), base the float64 master copy)
 *   sgd x = base + lr d;  avgm m = mu m + d, x = base + lr m;
 *   adam m = b1 m + (1-b1) d, v = b2 v + (1-b2) d^2;  yogi v = v - (1-b2) d^2 sign(v - d^2);
 *   adagrad v = v + d^2;  x = base + lr m / (sqrt(v) + tau);   out[i] = (T)x
 * Moments are read from m_in/v_in and written to m_out/v_out (the other half of a double-buffered
 * state: a re-run reads the same inputs), in the state's type S (float64, or float32 as Flower keeps
 * them for float32 models). One pass: acc, base, state in; state, x (and the master copy) out.
 * Written without contraction (-std=c11: no FMA). The mean multiplies by 1/w (one division less per
 * element: divisions and the square root bound FedAdam's step, not memory); it is within an ulp of numpy's
 * acc / w, so the step agrees with the blocked numpy one to ~1e-15. */
enum { OP_SGD = 0, OP_AVGM = 1, OP_ADAM = 2, OP_YOGI = 3, OP_ADAGRAD = 4 };
typedef struct { double w, lr, mu, b1, b2, tau; int delta; } StepArgs;

#define STEP_BODY(OP, TB, TO, S)                                                      \
    for (Py_ssize_t i = 0; i < n; i++) {                                                \
        double x0 = (double)base[i];                                                    \
        double d = A_delta ? acc[i] * A_iw : acc[i] * A_iw - x0, x;                    \
        if (OP == OP_SGD) { x = x0 + d * A_lr; }                                       \
        else if (OP == OP_AVGM) { double m = (double)mi[i] * A_mu + d; mo[i] = (S)m; x = x0 + m * A_lr; } \
        else {                                                                          \
            double m = (double)mi[i] * A_b1 + d * (1.0 - A_b1), d2 = d * d, v;        \
            double vi = (double)vin[i];                                                 \
            if (OP == OP_ADAM) v = vi * A_b2 + d2 * (1.0 - A_b2);                     \
            else if (OP == OP_YOGI) { double g = vi - d2;                               \
                double sg = (double)((g > 0) - (g < 0));                                \
                v = vi - (d2 * sg) * (1.0 - A_b2); }                                   \
            else v = vi + d2;                                                           \
            mo[i] = (S)m; vo[i] = (S)v;                                                 \
            x = x0 + (m / (sqrt(v) + A_tau)) * A_lr;                                  \
        }                                                                               \
        out[i] = (TO)x;                                                                 \
        if (master) master[i] = x;                                                      \
    }

#define DEFINE_STEP(NAME, TB, TO, S)                                                    \
MULTIVERSION static void NAME(int op, const double *restrict acc, const TB *restrict base, TO *restrict out, \
        double *restrict master, const S *restrict mi, const S *restrict vin, S *restrict mo, S *restrict vo, \
        Py_ssize_t n, const StepArgs *a) {                                               \
    const double A_lr = a->lr, A_mu = a->mu, A_b1 = a->b1, A_b2 = a->b2, A_tau = a->tau; \
    const double A_iw = 1.0 / a->w; const int A_delta = a->delta;                       \
    switch (op) {                                                                       \
    case OP_SGD: STEP_BODY(OP_SGD, TB, TO, S) break;                                    \
    case OP_AVGM: STEP_BODY(OP_AVGM, TB, TO, S) break;                                  \
    case OP_ADAM: STEP_BODY(OP_ADAM, TB, TO, S) break;                                  \
    case OP_YOGI: STEP_BODY(OP_YOGI, TB, TO, S) break;                                  \
    default: STEP_BODY(OP_ADAGRAD, TB, TO, S) break;                                    \
    }                                                                                   \
}
DEFINE_STEP(step_f32_f32_d, float, float, double)
DEFINE_STEP(step_f64_f64_d, double, double, double)
DEFINE_STEP(step_f64_f32_d, double, float, double)
DEFINE_STEP(step_f32_f32_s, float, float, float)
DEFINE_STEP(step_f64_f64_s, double, double, float)
DEFINE_STEP(step_f64_f32_s, double, float, float)

static int get_opt_buf(PyObject *o, Py_buffer *b, int writable, Py_ssize_t need, const char *what) {
    if (o == Py_None) { b->obj = NULL; b->buf = NULL; return 0; }
    if (PyObject_GetBuffer(o, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->len != need) {
        PyErr_Format(PyExc_ValueError, "opt_step: %s has %zd bytes, expected %zd", what, b->len, need);
        PyBuffer_Release(b); b->obj = NULL; return -1;
    }
    return 0;
}

/* opt_step(op, acc, w, base, out, out_kind, master, m_in, v_in, m_out, v_out, state_kind, delta,
 *          lr, mu, b1, b2, tau): base is float64 when `master` is given or delta is set (the master copy),
 * else of out_kind (the round's initial model); out is float32 or float64; moments may be None when op
 * has none; master (float64, may be None) receives x as well. */
static PyObject *py_opt_step(PyObject *self, PyObject *args) {
    int op, okind, skind, delta; double w; StepArgs a;
    PyObject *acc_o, *base_o, *out_o, *master_o, *mi_o, *vi_o, *mo_o, *vo_o;
    if (!PyArg_ParseTuple(args, "iOdOOiOOOOOipddddd", &op, &acc_o, &w, &base_o, &out_o, &okind, &master_o,
                          &mi_o, &vi_o, &mo_o, &vo_o, &skind, &delta, &a.lr, &a.mu, &a.b1, &a.b2, &a.tau))
        return NULL;
    if (op < OP_SGD || op > OP_ADAGRAD || (okind != K_F32 && okind != K_F64) || (skind != K_F32 && skind != K_F64)) {
        PyErr_SetString(PyExc_ValueError, "opt_step: unknown op, or output/state not float32/float64"); return NULL; }
    a.w = w; a.delta = delta;
    Py_buffer acc, base, out, master, mi, vi, mo, vo; PyObject *ret = NULL;
    Py_buffer *held[] = {&base, &out, &master, &mi, &vi, &mo, &vo};
    for (int i = 0; i < 7; i++) held[i]->obj = NULL;
    if (PyObject_GetBuffer(acc_o, &acc, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = acc.len / 8; int bsize = (master_o != Py_None || delta) ? 8 : ITEMSIZE[okind];
    int osize = ITEMSIZE[okind], ssize = ITEMSIZE[skind], moments = op == OP_SGD ? 0 : op == OP_AVGM ? 1 : 2;
    if (get_opt_buf(base_o, &base, 0, n * bsize, "base") || get_opt_buf(out_o, &out, 1, n * osize, "out")
        || get_opt_buf(master_o, &master, 1, n * 8, "master")
        || get_opt_buf(moments > 0 ? mi_o : Py_None, &mi, 0, n * ssize, "m_in")
        || get_opt_buf(moments > 1 ? vi_o : Py_None, &vi, 0, n * ssize, "v_in")
        || get_opt_buf(moments > 0 ? mo_o : Py_None, &mo, 1, n * ssize, "m_out")
        || get_opt_buf(moments > 1 ? vo_o : Py_None, &vo, 1, n * ssize, "v_out")) goto done;
    if (!base.buf || !out.buf || (moments > 0 && (!mi.buf || !mo.buf)) || (moments > 1 && (!vi.buf || !vo.buf))) {
        PyErr_SetString(PyExc_ValueError, "opt_step: base, out and the op's moments are required"); goto done; }
    Py_BEGIN_ALLOW_THREADS
    double *ms = (double *)master.buf;
    if (skind == K_F64) {
        if (bsize == 8 && okind == K_F64) step_f64_f64_d(op, acc.buf, base.buf, out.buf, ms, mi.buf, vi.buf, mo.buf, vo.buf, n, &a);
        else if (bsize == 8) step_f64_f32_d(op, acc.buf, base.buf, out.buf, ms, mi.buf, vi.buf, mo.buf, vo.buf, n, &a);
        else step_f32_f32_d(op, acc.buf, base.buf, out.buf, ms, mi.buf, vi.buf, mo.buf, vo.buf, n, &a);
    } else {
        if (bsize == 8 && okind == K_F64) step_f64_f64_s(op, acc.buf, base.buf, out.buf, ms, mi.buf, vi.buf, mo.buf, vo.buf, n, &a);
        else if (bsize == 8) step_f64_f32_s(op, acc.buf, base.buf, out.buf, ms, mi.buf, vi.buf, mo.buf, vo.buf, n, &a);
        else step_f32_f32_s(op, acc.buf, base.buf, out.buf, ms, mi.buf, vi.buf, mo.buf, vo.buf, n, &a);
    }
    Py_END_ALLOW_THREADS
    ret = Py_None; Py_INCREF(ret);
done:
    for (int i = 0; i < 7; i++) if (held[i]->obj) PyBuffer_Release(held[i]);
    PyBuffer_Release(&acc);
    return ret;
}

/* ingest(slot or None, pos, src, h, start, checks or None, max_scale) -> (h, region, bad): what a
 * gateway does with each received chunk, in one pass over it by 16 KiB blocks:
 *  - copy: slot[pos:pos + len(src)] = src. Plain stores: streaming (non-temporal) ones were 1.3x
 *    faster into a slot out of cache, but 0.64x for a round's fresh slots, whose pages the
 *    gateway has just mapped (zeroed, so in cache) — every round's first pushes;
 *  - content hash of src's whole little-endian 8-byte words from byte ``start`` on, continuing h:
 *      h' = h * P^m + sum_i w_i * P^(m-1-i)  (mod 2^64; P odd, so a change of any one word changes h').
 *    It composes over consecutive ranges, so chunks of any size give one update's hash
 *    (lifl.content_hash keeps the words that straddle chunks); four lanes break the multiply's
 *    dependency chain. Hashed from src, which the copy just brought into L1;
 *  - checks: ``checks`` is int64 triples (byte offset, end, kind) in slot coordinates, ascending:
 *    every element of a listed region that ends inside (pos, pos + len(src)] is checked, also the
 *    one that began in the previous chunk (read back from the slot), so a stream's chunks check
 *    each element exactly once, while it is in L1. Kinds: float kernel ids (NaN/Inf refused) and
 *    CHECK_SCALE (int8 block scales: finite float32 of magnitude <= max_scale). region: the first
 *    listed region with refused elements in this chunk (-1: none), bad: how many it has here.
 * Why: a separate check pass re-read each chunk from memory (~0.4 ms per 2 MiB), and the copy
 * and hash were ~20 % of a pooled gateway's CPU. */
#define HASH_P 0x9E3779B97F4A7C15ull
#define HASH_BLOCK 16384
#define CHECK_SCALE 100
static uint64_t hash_words(const unsigned char *p, size_t m, uint64_t h) {
    const uint64_t P2 = HASH_P * HASH_P, P3 = P2 * HASH_P, P4 = P2 * P2;
    size_t k = 0, K = m / 4;
    if (K) {
        uint64_t l0 = 0, l1 = 0, l2 = 0, l3 = 0, pm = 1, base = P4;
        for (; k < K; k++) {
            uint64_t w[4]; memcpy(w, p + 32 * k, 32);
            l0 = l0 * P4 + w[0]; l1 = l1 * P4 + w[1]; l2 = l2 * P4 + w[2]; l3 = l3 * P4 + w[3];
        }
        for (size_t e = K; e; e >>= 1) { if (e & 1) pm *= base; base *= base; }   /* P^(4K) */
        h = h * pm + l0 * P3 + l1 * P2 + l2 * HASH_P + l3;
    }
    for (size_t i = 4 * K; i < m; i++) { uint64_t w; memcpy(&w, p + 8 * i, 8); h = h * HASH_P + w; }
    return h;
}

static uint64_t pow_p(uint64_t base, size_t e) {   /* base^e mod 2^64 */
    uint64_t r = 1;
    for (; e; e >>= 1) { if (e & 1) r *= base; base *= base; }
    return r;
}

/* Copy (d NULL: none) and hash one block, the plain way: memcpy, then hash_words over it in L1. */
static uint64_t copy_hash_plain(unsigned char *d, const unsigned char *s, size_t len, uint64_t h,
                                Py_ssize_t *bad) {
    if (d) memcpy(d, s, len);
    if (bad) *bad = nonfinite_f32(s, (Py_ssize_t)(len / 4));
    return hash_words(s, len / 8, h);
}

#if defined(__GNUC__) && defined(__x86_64__)
/* The same copy and hash with AVX-512: memcpy (which writes whole lines without reading them
 * first, where a loop of vector stores would), then the hash over the block while it is in L1 in
 * 32 lanes (lane j takes words j, j + 32, ...: l = l * P^32 + w, 64-bit multiplies), combined
 * as h * P^m + sum_j l_j * P^(31 - j): the value of hash_words at about the copy's speed (a
 * scalar hash after the copy made the pair 1.35x slower than the copy alone, 2-core machine).
 * ``bad`` (not NULL): the block is whole float32 elements, and their NaN/Inf are counted in the
 * same loop, from the same loads. */
#define HASH_LANES_STEP(M, q)                                                     \
    __m512i x0 = _mm512_loadu_si512(q), x1 = _mm512_loadu_si512((q) + 64);       \
    __m512i x2 = _mm512_loadu_si512((q) + 128), x3 = _mm512_loadu_si512((q) + 192); \
    a0 = _mm512_add_epi64(_mm512_mullo_epi64(a0, M), x0);                         \
    a1 = _mm512_add_epi64(_mm512_mullo_epi64(a1, M), x1);                         \
    a2 = _mm512_add_epi64(_mm512_mullo_epi64(a2, M), x2);                         \
    a3 = _mm512_add_epi64(_mm512_mullo_epi64(a3, M), x3);
__attribute__((target("avx512f,avx512dq,popcnt"))) static uint64_t copy_hash_avx512(unsigned char *d,
        const unsigned char *s, size_t len, uint64_t h, Py_ssize_t *bad) {
    size_t K = len / 256;
    if (!K) return copy_hash_plain(d, s, len, h, bad);
    if (d) memcpy(d, s, len);
    {
        const __m512i M = _mm512_set1_epi64((long long)pow_p(HASH_P, 32));
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        if (bad) {
            const __m512i E = _mm512_set1_epi32(0x7f800000);
            Py_ssize_t n = 0;
            for (size_t k = 0; k < K; k++) {
                HASH_LANES_STEP(M, s + 256 * k)
                n += _mm_popcnt_u32(_mm512_cmpeq_epi32_mask(_mm512_and_si512(x0, E), E))
                   + _mm_popcnt_u32(_mm512_cmpeq_epi32_mask(_mm512_and_si512(x1, E), E))
                   + _mm_popcnt_u32(_mm512_cmpeq_epi32_mask(_mm512_and_si512(x2, E), E))
                   + _mm_popcnt_u32(_mm512_cmpeq_epi32_mask(_mm512_and_si512(x3, E), E));
            }
            *bad = n + nonfinite_f32(s + 256 * K, (Py_ssize_t)((len - 256 * K) / 4));
        } else {
            for (size_t k = 0; k < K; k++) { HASH_LANES_STEP(M, s + 256 * k) }
        }
        uint64_t l[32], t = 0;
        _mm512_storeu_si512(l, a0); _mm512_storeu_si512(l + 8, a1);
        _mm512_storeu_si512(l + 16, a2); _mm512_storeu_si512(l + 24, a3);
        for (int j = 0; j < 32; j++) t = t * HASH_P + l[j];
        h = h * pow_p(HASH_P, 32 * K) + t;
    }
    return hash_words(s + 256 * K, (len - 256 * K) / 8, h);
}
#endif

typedef uint64_t (*copy_hash_fn)(unsigned char *, const unsigned char *, size_t, uint64_t, Py_ssize_t *);
static copy_hash_fn COPY_HASH = copy_hash_plain;

MULTIVERSION static Py_ssize_t bad_scales(const void *x, Py_ssize_t n, float max_scale) {
    Py_ssize_t bad = 0; const unsigned char *p = (const unsigned char *)x;
    for (Py_ssize_t i = 0; i < n; i++) { float v; memcpy(&v, p + 4 * i, 4); bad += !(fabsf(v) <= max_scale); }
    return bad;
}

static int check_size(int64_t kind) {
    return kind == K_F64 ? 8 : kind == K_F16 || kind == K_BF16 ? 2 : kind == K_F32 || kind == CHECK_SCALE ? 4 : 0;
}

/* refused elements of ``kind`` among n starting at p */
static Py_ssize_t count_bad(const unsigned char *p, Py_ssize_t n, int64_t kind, float max_scale) {
    switch (kind) {
        case K_F32: return nonfinite_f32(p, n);
        case K_F64: return nonfinite_f64(p, n);
        case K_F16: return nonfinite_u16(p, n, 0x7c00);
        case K_BF16: return nonfinite_u16(p, n, 0x7f80);
        case CHECK_SCALE: return bad_scales(p, n, max_scale);
        default: return 0;
    }
}

typedef struct {
    const int64_t *t; Py_ssize_t k;   /* (offset, end, kind) triples */
    Py_ssize_t r;                     /* first region that may still hold unchecked elements */
    Py_ssize_t region, bad;           /* the first refused region and its count */
    float max_scale;
} Checks;

/* Check the elements of the listed regions that end in (done, upto] (slot coordinates); the
 * chunk [pos, pos + n) is src, and an element that began before pos is read back from the slot. */
static void check_range(Checks *c, const unsigned char *slot, Py_ssize_t pos, const unsigned char *src,
                        int64_t done, int64_t upto) {
    while (c->r < c->k && c->t[3 * c->r + 1] <= done) c->r++;
    for (Py_ssize_t r = c->r; r < c->k && c->t[3 * r] < upto; r++) {
        int64_t off = c->t[3 * r], end = c->t[3 * r + 1], kind = c->t[3 * r + 2];
        int size = check_size(kind);
        if (!size) continue;
        int64_t i0 = done > off ? (done - off) / size : 0;
        int64_t i1 = ((upto < end ? upto : end) - off) / size;
        Py_ssize_t bad = 0;
        if (i0 < i1 && off + i0 * size < pos) {   /* began in the previous chunk */
            unsigned char e[8];
            int64_t at = off + i0 * size, before = pos - at;
            memcpy(e, slot + at, (size_t)before);
            memcpy(e + before, src, (size_t)(size - before));
            bad += count_bad(e, 1, kind, c->max_scale);
            i0++;
        }
        if (i0 < i1) bad += count_bad(src + (off + i0 * size - pos), (Py_ssize_t)(i1 - i0), kind, c->max_scale);
        if (bad) {
            if (c->region < 0) c->region = r;
            if (c->region == r) c->bad += bad;
        }
    }
}

/* The region whose float32 elements are exactly [b0, b1), all unchecked (-1: none such, or
 * the block holds other kinds, a region's edge or part of an element): the fast path's test. */
static Py_ssize_t in_f32_region(Checks *c, int64_t done, int64_t b0, int64_t b1) {
    if (!c->k || done != b0) return -1;
    while (c->r < c->k && c->t[3 * c->r + 1] <= done) c->r++;
    if (c->r >= c->k) return -1;
    const int64_t *t = c->t + 3 * c->r;
    if (t[2] != K_F32 || t[0] > b0 || t[1] < b1 || (b0 - t[0]) % 4 || (b1 - b0) % 4) return -1;
    return c->r;
}

static PyObject *py_ingest(PyObject *self, PyObject *args) {
    PyObject *sloto, *checko; Py_buffer slot = {0}, src, tab = {0}; unsigned long long h;
    Py_ssize_t pos, start; double max_scale;
    if (!PyArg_ParseTuple(args, "Ony*KnOd", &sloto, &pos, &src, &h, &start, &checko, &max_scale))
        return NULL;
    const char *err = NULL;
    if (sloto != Py_None && PyObject_GetBuffer(sloto, &slot, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto fail;
    if (checko != Py_None && PyObject_GetBuffer(checko, &tab, PyBUF_C_CONTIGUOUS) < 0) goto fail;
    if (start < 0 || start > src.len) err = "ingest: start out of range";
    else if (slot.obj && (pos < 0 || pos > slot.len - src.len)) err = "ingest: the chunk does not fit the slot";
    else if (tab.obj && (!slot.obj || tab.len % 24 || tab.itemsize != 8)) err = "ingest: checks need a slot and int64 triples";
    if (err) { PyErr_SetString(PyExc_ValueError, err); goto fail; }
    Checks c = {tab.obj ? (const int64_t *)tab.buf : NULL, tab.obj ? tab.len / 24 : 0, 0, -1, 0, (float)max_scale};
    uint64_t hv = (uint64_t)h;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *s = (const unsigned char *)src.buf;
    unsigned char *d = slot.obj ? (unsigned char *)slot.buf + pos : NULL;
    if (d && start) memcpy(d, s, (size_t)start);
    int64_t done = pos;
    for (Py_ssize_t off = start; off < src.len; off += HASH_BLOCK) {
        size_t len = (size_t)(src.len - off < HASH_BLOCK ? src.len - off : HASH_BLOCK);
        int64_t b0 = pos + off, b1 = b0 + (int64_t)len;
        Py_ssize_t r = in_f32_region(&c, done, b0, b1);
        if (r >= 0) {   /* whole float32 elements of one region: checked in the hash's loop */
            Py_ssize_t bad = 0;
            hv = COPY_HASH(d ? d + off : NULL, s + off, len, hv, &bad);
            if (bad) {
                if (c.region < 0) c.region = r;
                if (c.region == r) c.bad += bad;
            }
            done = b1;
            continue;
        }
        hv = COPY_HASH(d ? d + off : NULL, s + off, len, hv, NULL);
        if (c.k) { check_range(&c, (const unsigned char *)slot.buf, pos, s, done, b1); done = b1; }
    }
    if (c.k && done < pos + src.len) check_range(&c, (const unsigned char *)slot.buf, pos, s, done, pos + src.len);
    Py_END_ALLOW_THREADS
    if (slot.obj) PyBuffer_Release(&slot);
    if (tab.obj) PyBuffer_Release(&tab);
    PyBuffer_Release(&src);
    return Py_BuildValue("Knn", (unsigned long long)hv, c.region, c.bad);
fail:
    if (slot.obj) PyBuffer_Release(&slot);
    if (tab.obj) PyBuffer_Release(&tab);
    PyBuffer_Release(&src);
    return NULL;
}

/* populate(buf) -> 0 or an errno: madvise(MADV_POPULATE_WRITE) over the writable buffer (a
 * mapping's whole pages), without the GIL. Why here: Python's mmap.madvise holds the GIL while the
 * kernel allocates and zeroes the pages (~1 ms for a 4 MiB slot), and a gateway process's other
 * streams wait that long for it. */
#if defined(__linux__)
#include <sys/mman.h>
#include <errno.h>
#endif
static PyObject *py_populate(PyObject *self, PyObject *args) {
    Py_buffer b; int rc = ENOSYS;
    if (!PyArg_ParseTuple(args, "w*", &b)) return NULL;
#if defined(__linux__)
    Py_BEGIN_ALLOW_THREADS
    rc = madvise(b.buf, (size_t)b.len, 23 /* MADV_POPULATE_WRITE */) ? errno : 0;
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&b);
    return PyLong_FromLong(rc);
}

static int have_avx512(void) {
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

/* use_simd(on) -> whether ingest now uses its AVX-512 loop: on picks it where the CPU has it
 * (the default at import), off the portable one (tests check both give the same results). */
static PyObject *py_use_simd(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    COPY_HASH = copy_hash_plain;
#if defined(__GNUC__) && defined(__x86_64__)
    if (on && have_avx512()) COPY_HASH = copy_hash_avx512;
#endif
    return PyBool_FromLong(COPY_HASH != copy_hash_plain);
}

static PyMethodDef METHODS[] = {
    {"populate", py_populate, METH_VARARGS, "populate(buf) -> 0 or errno: madvise(MADV_POPULATE_WRITE) without the GIL"},
    {"use_simd", py_use_simd, METH_VARARGS, "use_simd(on) -> bool: ingest's AVX-512 loop on (where the CPU has it) or off"},
    {"ingest", py_ingest, METH_VARARGS,
     "ingest(slot|None, pos, src, h, start, checks|None, max_scale) -> (h, region, bad): copy, hash, check"},
    {"opt_step", py_opt_step, METH_VARARGS, "opt_step(...): a server optimizer step fused with finalize"},
    {"quantize_q8", py_quantize_q8, METH_VARARGS, "quantize_q8(x, scales, values, max_scale) -> bad blocks"},
    {"mean_to", py_mean_to, METH_VARARGS, "mean_to(acc, out, total_weight, kind): out = acc / w"},
    {"fold", py_fold, METH_VARARGS, "fold(acc, sources, weights, kind): acc += sum w*x (float64)."},
    {"fold_q8", py_fold_q8, METH_VARARGS, "fold_q8(acc, values, scales, weights, phase): int8 blockwise fold."},
    {"count_nonfinite", py_count_nonfinite, METH_VARARGS, "count_nonfinite(buf, kind) -> int"},
    {"scan", py_scan, METH_VARARGS, "scan(buf, kind) -> (nonfinite count, sum of squares in float64)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_foldc", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__foldc(void) {
    pick_kernels();
    PyObject *m = PyModule_Create(&MODULE);
    if (m && PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0) { Py_DECREF(m); return NULL; }
#if defined(__GNUC__) && defined(__x86_64__)
    if (have_avx512()) COPY_HASH = copy_hash_avx512;
#endif
    return m;
}
