# Machine-level primitives the kernels cannot say in Cython, as C in one
# place: lane sums in explicit vectors, streaming stores, prefetch.
#
# Lane sums. A run of n contiguous values is summed in LANES double lanes:
# value i goes to lane i % LANES. The whole LANES-wide steps are summed in
# vector registers (GCC's vector extensions: the compiler lowers a
# LANES-wide vector to whatever width the target has, SSE2 to AVX-512, and
# adds lane by lane, never reassociating), then added to the caller's lanes
# once per run; the last n % LANES values go straight to the caller's
# lanes. The order of every addition depends on n alone. The loop prefetches
# PREFETCH_BYTES ahead: a run is often a few pages at a large stride, where
# the hardware prefetcher starts late on every page.
#
# Streaming stores. A normal store to a line that is not cached first
# reads the line from memory (read-for-ownership): writing y costs a read
# and a write. A streaming store writes whole lines straight to memory, so
# writing a large y into a cold buffer costs one write. The kernels compute
# a short piece of output into a buffer on the stack (in L1) and hand it to
# ``stream``. Lines only partly covered by the piece are written with normal
# stores, so a piece never touches memory outside itself. ``fence`` orders
# the streaming stores before the thread's next synchronization (the end of
# a work unit). Without SSE2 (non-x86 builds) streaming is a plain copy.

from fastbn._half cimport bfloat, half


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    #if defined(__SSE2__)
    #include <immintrin.h>
    #endif

    #define FASTBN_LANES 16
    #define FASTBN_PREFETCH_BYTES 2048
    /* Vectors of the target's width (VW doubles); LANES / VW of them hold
       the LANES lanes: lane k is element k % VW of vector k / VW. */
    #if defined(__AVX512F__)
    #define FASTBN_VW 8
    #elif defined(__AVX__)
    #define FASTBN_VW 4
    #else
    #define FASTBN_VW 2
    #endif
    #define FASTBN_NV (FASTBN_LANES / FASTBN_VW)
    typedef double fastbn_vd __attribute__((vector_size(FASTBN_VW * sizeof(double))));
    typedef float fastbn_vf __attribute__((vector_size(FASTBN_VW * sizeof(float))));
    typedef long long fastbn_vl __attribute__((vector_size(FASTBN_VW * sizeof(long long))));

    /* m ? a : b, lane by lane (m from a comparison: all ones or all zeros) */
    static inline fastbn_vd fastbn_select(fastbn_vl m, fastbn_vd a, fastbn_vd b)
    {
        return (fastbn_vd)(((fastbn_vl)a & m) | ((fastbn_vl)b & ~m));
    }

    /* VW floats at p as doubles (exact). In intrinsics where the target has
       them: GCC 12 lowers __builtin_convertvector of a float vector to
       narrower conversions and inserts (SSE2: one scalar conversion per
       value), three to four instructions where one does. */
    static inline fastbn_vd fastbn_load_f32(const float *p)
    {
    #if defined(__AVX512F__)
        return (fastbn_vd)_mm512_cvtps_pd(_mm256_loadu_ps(p));
    #elif defined(__AVX__)
        return (fastbn_vd)_mm256_cvtps_pd(_mm_loadu_ps(p));
    #elif defined(__SSE2__)
        return (fastbn_vd)_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)));
    #else
        fastbn_vf v;
        memcpy(&v, p, sizeof v);
        return __builtin_convertvector(v, fastbn_vd);
    #endif
    }

    static inline fastbn_vd fastbn_load_f64(const double *p)
    {
        fastbn_vd v;
        memcpy(&v, p, sizeof v);
        return v;
    }

    /* VW values at p as doubles, for the lane sums */
    static inline fastbn_vd fastbn_load_f16(const fastbn_half *p)
    {
    #if defined(__AVX512F__) && defined(__F16C__)
        return (fastbn_vd)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
    #elif defined(__AVX__) && defined(__F16C__)
        return (fastbn_vd)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)));
    #else
        fastbn_vd v;
        for (int k = 0; k < FASTBN_VW; k++)
            v[k] = fastbn_half_load(p[k]);
        return v;
    #endif
    }

    static inline fastbn_vd fastbn_load_bf16(const fastbn_bfloat *p)
    {
    #if defined(__AVX512F__)
        return (fastbn_vd)_mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16)));
    #elif defined(__AVX2__)
        return (fastbn_vd)_mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(
            _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)p)), 16)));
    #else
        fastbn_vd v;
        for (int k = 0; k < FASTBN_VW; k++)
            v[k] = fastbn_bfloat_load(p[k]);
        return v;
    #endif
    }

    /* one value as double, for the sums' last values */
    static inline double fastbn_widen_f32(float v) { return v; }
    static inline double fastbn_widen_f64(double v) { return v; }
    static inline double fastbn_widen_f16(fastbn_half v) { return fastbn_half_load(v); }
    static inline double fastbn_widen_bf16(fastbn_bfloat v) { return fastbn_bfloat_load(v); }

    /* acc[k] += v[k] for the VW lanes of one vector (lane by lane) */
    static inline void fastbn_add_into(double *acc, fastbn_vd v)
    {
        fastbn_vd a;
        memcpy(&a, acc, sizeof a);
        a += v;
        memcpy(acc, &a, sizeof a);
    }

    /* acc_s[k] += x[i] - shift, acc_q[k] += (x[i] - shift)^2, k = i % LANES */
    #define FASTBN_SHIFTED_SUMS(S, T)                                                \
    static inline void fastbn_shifted_sums_##S(const T *x, Py_ssize_t n, double shift, \
                                               double *acc_s, double *acc_q)          \
    {                                                                                \
        Py_ssize_t i = 0, j, k;                                                      \
        double d;                                                                    \
        if (n >= FASTBN_LANES) {                                                     \
            fastbn_vd s[FASTBN_NV], q[FASTBN_NV], v, sh = (fastbn_vd){0} + shift;     \
            _Pragma("GCC unroll 8")                                                  \
            for (j = 0; j < FASTBN_NV; j++)                                          \
                s[j] = q[j] = (fastbn_vd){0};                                        \
            for (; i + FASTBN_LANES <= n; i += FASTBN_LANES) {                       \
                __builtin_prefetch((const char *)(x + i) + FASTBN_PREFETCH_BYTES);   \
                _Pragma("GCC unroll 8")                                              \
                for (j = 0; j < FASTBN_NV; j++) {                                    \
                    v = fastbn_load_##S(x + i + j * FASTBN_VW) - sh;                 \
                    s[j] += v;                                                       \
                    q[j] += v * v;                                                   \
                }                                                                    \
            }                                                                        \
            _Pragma("GCC unroll 8")                                                  \
            for (j = 0; j < FASTBN_NV; j++) {                                        \
                fastbn_add_into(acc_s + j * FASTBN_VW, s[j]);                        \
                fastbn_add_into(acc_q + j * FASTBN_VW, q[j]);                        \
            }                                                                        \
        }                                                                            \
        for (k = 0; i < n; i++, k++) {                                               \
            d = fastbn_widen_##S(x[i]) - shift;                                      \
            acc_s[k] += d;                                                           \
            acc_q[k] += d * d;                                                       \
        }                                                                            \
    }

    /* acc_g[k] += dy[i], acc_c[k] += dy[i] * (x[i] - center), k = i % LANES */
    #define FASTBN_GRAD_SUMS(S, T)                                                   \
    static inline void fastbn_grad_sums_##S(const T *dy, const T *x, Py_ssize_t n,   \
                                            double center, double *acc_g,            \
                                            double *acc_c)                           \
    {                                                                                \
        Py_ssize_t i = 0, j, k;                                                      \
        double g;                                                                    \
        if (n >= FASTBN_LANES) {                                                     \
            fastbn_vd sg[FASTBN_NV], sc[FASTBN_NV], v, ce = (fastbn_vd){0} + center;  \
            _Pragma("GCC unroll 8")                                                  \
            for (j = 0; j < FASTBN_NV; j++)                                          \
                sg[j] = sc[j] = (fastbn_vd){0};                                      \
            for (; i + FASTBN_LANES <= n; i += FASTBN_LANES) {                       \
                __builtin_prefetch((const char *)(dy + i) + FASTBN_PREFETCH_BYTES);  \
                __builtin_prefetch((const char *)(x + i) + FASTBN_PREFETCH_BYTES);   \
                _Pragma("GCC unroll 8")                                              \
                for (j = 0; j < FASTBN_NV; j++) {                                    \
                    v = fastbn_load_##S(dy + i + j * FASTBN_VW);                     \
                    sg[j] += v;                                                      \
                    sc[j] += v * (fastbn_load_##S(x + i + j * FASTBN_VW) - ce);      \
                }                                                                    \
            }                                                                        \
            _Pragma("GCC unroll 8")                                                  \
            for (j = 0; j < FASTBN_NV; j++) {                                        \
                fastbn_add_into(acc_g + j * FASTBN_VW, sg[j]);                       \
                fastbn_add_into(acc_c + j * FASTBN_VW, sc[j]);                       \
            }                                                                        \
        }                                                                            \
        for (k = 0; i < n; i++, k++) {                                               \
            g = fastbn_widen_##S(dy[i]);                                             \
            acc_g[k] += g;                                                           \
            acc_c[k] += g * (fastbn_widen_##S(x[i]) - center);                       \
        }                                                                            \
    }

    /* The backward's sums of an activated output, with dz = dy * act'(z) in
       place of dy: z = (x[i] - zc) * zs + zo recomputed from x (kind 1), or
       from the output y (kind 2): z > 0 where y > 0, and x - center (center
       0) = ((y > 0 ? y : y * inv) - zo) * zs. act'(z) is 1 for z > 0, else
       slope (0 for relu: then dz is 0 even for an infinite dy). The lanes
       and their order are those of grad_sums. Unused by the columnar family,
       which transforms a row of columns at a time. */
    #define FASTBN_ACT_SUMS(S, T)                                                    \
    static __attribute__((noinline, unused)) void fastbn_act_sums_##S(const T *dy,      \
                                           const T *x,                               \
                                           Py_ssize_t n,                             \
                                           double center, int kind, int relu,        \
                                           double zc, double zs, double zo,          \
                                           double slope, double inv, double *acc_g,  \
                                           double *acc_c)                            \
    {                                                                                \
        Py_ssize_t i = 0, j, k;                                                      \
        double g, d, c;                                                              \
        int pos;                                                                     \
        if (n >= FASTBN_LANES) {                                                     \
            fastbn_vd sg[FASTBN_NV], sc[FASTBN_NV], v, xv, z, xc;                    \
            fastbn_vd ce = (fastbn_vd){0} + center, zcv = (fastbn_vd){0} + zc;      \
            fastbn_vd zsv = (fastbn_vd){0} + zs, zov = (fastbn_vd){0} + zo;          \
            fastbn_vd sl = (fastbn_vd){0} + slope, iv = (fastbn_vd){0} + inv;        \
            fastbn_vd zero = (fastbn_vd){0};                                         \
            fastbn_vl m;                                                             \
            _Pragma("GCC unroll 8")                                                  \
            for (j = 0; j < FASTBN_NV; j++)                                          \
                sg[j] = sc[j] = zero;                                                \
            for (; i + FASTBN_LANES <= n; i += FASTBN_LANES) {                       \
                __builtin_prefetch((const char *)(dy + i) + FASTBN_PREFETCH_BYTES);  \
                __builtin_prefetch((const char *)(x + i) + FASTBN_PREFETCH_BYTES);   \
                _Pragma("GCC unroll 8")                                              \
                for (j = 0; j < FASTBN_NV; j++) {                                    \
                    v = fastbn_load_##S(dy + i + j * FASTBN_VW);                     \
                    xv = fastbn_load_##S(x + i + j * FASTBN_VW);                     \
                    if (kind == 1) {                                                 \
                        z = (xv - zcv) * zsv + zov;                                  \
                        m = z > zero;                                                \
                        xc = xv - ce;                                                \
                    } else {                                                         \
                        m = xv > zero;                                               \
                        xc = (fastbn_select(m, xv, xv * iv) - zov) * zsv;            \
                    }                                                                \
                    v = fastbn_select(m, v, relu ? zero : v * sl);                   \
                    sg[j] += v;                                                      \
                    sc[j] += v * xc;                                                 \
                }                                                                    \
            }                                                                        \
            _Pragma("GCC unroll 8")                                                  \
            for (j = 0; j < FASTBN_NV; j++) {                                        \
                fastbn_add_into(acc_g + j * FASTBN_VW, sg[j]);                       \
                fastbn_add_into(acc_c + j * FASTBN_VW, sc[j]);                       \
            }                                                                        \
        }                                                                            \
        for (k = 0; i < n; i++, k++) {                                               \
            g = fastbn_widen_##S(dy[i]);                                             \
            d = fastbn_widen_##S(x[i]);                                              \
            if (kind == 1) {                                                         \
                pos = (d - zc) * zs + zo > 0.0;                                      \
                c = d - center;                                                      \
            } else {                                                                 \
                pos = d > 0.0;                                                       \
                c = ((pos ? d : d * inv) - zo) * zs;                                 \
            }                                                                        \
            g = pos ? g : (relu ? 0.0 : g * slope);                                  \
            acc_g[k] += g;                                                           \
            acc_c[k] += g * c;                                                       \
        }                                                                            \
    }

    FASTBN_ACT_SUMS(f32, float)
    FASTBN_ACT_SUMS(f64, double)
    FASTBN_SHIFTED_SUMS(f32, float)
    FASTBN_SHIFTED_SUMS(f64, double)
    FASTBN_GRAD_SUMS(f32, float)
    FASTBN_GRAD_SUMS(f64, double)
    FASTBN_ACT_SUMS(f16, fastbn_half)
    FASTBN_ACT_SUMS(bf16, fastbn_bfloat)
    FASTBN_SHIFTED_SUMS(f16, fastbn_half)
    FASTBN_SHIFTED_SUMS(bf16, fastbn_bfloat)
    FASTBN_GRAD_SUMS(f16, fastbn_half)
    FASTBN_GRAD_SUMS(bf16, fastbn_bfloat)

    /* Prefetch the lines of [p, p + nbytes) into the cache. */
    static inline void fastbn_prefetch_span(const void *p, Py_ssize_t nbytes)
    {
        const char *c = (const char *)p;
        for (Py_ssize_t i = 0; i < nbytes; i += 64)
            __builtin_prefetch(c + i);
    }

    static inline void fastbn_stream(void *dst, const void *src, Py_ssize_t nbytes)
    {
        char *d = (char *)dst;
        const char *s = (const char *)src;
        size_t n = (size_t)nbytes;
    #if defined(__SSE2__)
        size_t head = (size_t)(-(uintptr_t)d) & 63;
        if (head > n)
            head = n;
        memcpy(d, s, head);
        d += head;
        s += head;
        n -= head;
        for (; n >= 64; n -= 64, d += 64, s += 64) {
    #if defined(__AVX512F__)
            _mm512_stream_si512((__m512i *)d, _mm512_loadu_si512((const void *)s));
    #elif defined(__AVX__)
            _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
            _mm256_stream_si256((__m256i *)(d + 32), _mm256_loadu_si256((const __m256i *)(s + 32)));
    #else
            _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
            _mm_stream_si128((__m128i *)(d + 16), _mm_loadu_si128((const __m128i *)(s + 16)));
            _mm_stream_si128((__m128i *)(d + 32), _mm_loadu_si128((const __m128i *)(s + 32)));
            _mm_stream_si128((__m128i *)(d + 48), _mm_loadu_si128((const __m128i *)(s + 48)));
    #endif
        }
    #endif
        memcpy(d, s, n);
    }

    static inline void fastbn_fence(void)
    {
    #if defined(__SSE2__)
        _mm_sfence();
    #endif
    }
    """
    enum: LANES "FASTBN_LANES"
    enum: PREFETCH_BYTES "FASTBN_PREFETCH_BYTES"
    void shifted_sums_f32 "fastbn_shifted_sums_f32"(
        const float* x, Py_ssize_t n, double shift, double* acc_s, double* acc_q) noexcept nogil
    void shifted_sums_f64 "fastbn_shifted_sums_f64"(
        const double* x, Py_ssize_t n, double shift, double* acc_s, double* acc_q) noexcept nogil
    void grad_sums_f32 "fastbn_grad_sums_f32"(
        const float* dy, const float* x, Py_ssize_t n, double center, double* acc_g,
        double* acc_c) noexcept nogil
    void grad_sums_f64 "fastbn_grad_sums_f64"(
        const double* dy, const double* x, Py_ssize_t n, double center, double* acc_g,
        double* acc_c) noexcept nogil
    void act_sums_f32 "fastbn_act_sums_f32"(
        const float* dy, const float* x, Py_ssize_t n, double center, int kind, int relu,
        double zc, double zs, double zo, double slope, double inv, double* acc_g,
        double* acc_c) noexcept nogil
    void act_sums_f64 "fastbn_act_sums_f64"(
        const double* dy, const double* x, Py_ssize_t n, double center, int kind, int relu,
        double zc, double zs, double zo, double slope, double inv, double* acc_g,
        double* acc_c) noexcept nogil
    void shifted_sums_f16 "fastbn_shifted_sums_f16"(
        const half* x, Py_ssize_t n, double shift, double* acc_s, double* acc_q) noexcept nogil
    void shifted_sums_bf16 "fastbn_shifted_sums_bf16"(
        const bfloat* x, Py_ssize_t n, double shift, double* acc_s, double* acc_q) noexcept nogil
    void grad_sums_f16 "fastbn_grad_sums_f16"(
        const half* dy, const half* x, Py_ssize_t n, double center, double* acc_g,
        double* acc_c) noexcept nogil
    void grad_sums_bf16 "fastbn_grad_sums_bf16"(
        const bfloat* dy, const bfloat* x, Py_ssize_t n, double center, double* acc_g,
        double* acc_c) noexcept nogil
    void act_sums_f16 "fastbn_act_sums_f16"(
        const half* dy, const half* x, Py_ssize_t n, double center, int kind, int relu,
        double zc, double zs, double zo, double slope, double inv, double* acc_g,
        double* acc_c) noexcept nogil
    void act_sums_bf16 "fastbn_act_sums_bf16"(
        const bfloat* dy, const bfloat* x, Py_ssize_t n, double center, int kind, int relu,
        double zc, double zs, double zo, double slope, double inv, double* acc_g,
        double* acc_c) noexcept nogil
    void stream "fastbn_stream"(void* dst, const void* src, Py_ssize_t nbytes) noexcept nogil
    void fence "fastbn_fence"() noexcept nogil
    void prefetch_span "fastbn_prefetch_span"(const void* p, Py_ssize_t nbytes) noexcept nogil


# What the kernels store: float32, float64, and the two 16-bit types whose
# statistics and parameters are float32 (fastbn._stats: ``param_like``).
ctypedef fused storage:
    float
    double
    half
    bfloat


cdef enum:
    # Outputs of at least this many bytes, not written in place, are
    # streamed: larger than the per-core caches, they would be evicted
    # before anything reads them again.
    STREAM_MIN_BYTES = 4 * 1024 * 1024
    # Values computed into the stack buffer per streaming store.
    STREAM_CHUNK = 512


cdef inline Py_ssize_t stream_end(const void* out, Py_ssize_t i, Py_ssize_t end,
                                  Py_ssize_t itemsize) noexcept nogil:
    """Where the streamed piece of out starting at value i ends: at end if
    that is at most STREAM_CHUNK values on, else STREAM_CHUNK values on,
    back to the start of a cache line (so the next piece starts on one: a
    line split between two pieces would take a normal store from each,
    read for ownership first). An out not aligned to its item size (NumPy
    allows one) gets pieces that end off the line, as before: the values
    are the same either way."""
    cdef Py_ssize_t e = i + STREAM_CHUNK
    if e >= end:
        return end
    return e - <Py_ssize_t>((<size_t>(<const char*>out + e * itemsize)) & 63) // itemsize


cdef inline bint streams(bint wanted, const void* out, const void* a, const void* b,
                         Py_ssize_t nbytes) noexcept nogil:
    """Stream an output that is wanted streamed, large and not written over
    an input. The caller wants it for outputs it has reason to think cold
    (a buffer the user passed), not for a fresh one, which malloc often
    hands back still cached and which the next layer reads soon."""
    return wanted and nbytes >= STREAM_MIN_BYTES and out != a and out != b
