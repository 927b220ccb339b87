# 16-bit storage, as C in one place: float16 (IEEE 754 binary16) and
# bfloat16 (the upper half of a binary32), each a struct of its 16 bits, so
# no C conversion applies to it unseen. A load widens exactly (to float,
# which holds every value of both); a store rounds once, to nearest even,
# from float or from double (never through a float rounded first). The
# block conversions widen or narrow n values at once, in the target's
# widest conversion instructions (F16C, AVX-512; bfloat16 in integer lanes):
# the kernels apply 16-bit data through them, a block at a time, since a
# loop of scalar conversions does not vectorize.

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
    #if defined(__SSE2__)
    #include <immintrin.h>
    #endif

    typedef struct { uint16_t bits; } fastbn_half;
    typedef struct { uint16_t bits; } fastbn_bfloat;

    static inline float fastbn_float_of_bits(uint32_t u)
    {
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }

    static inline uint32_t fastbn_bits_of_float(float f)
    {
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        return u;
    }

    static inline float fastbn_half_load(fastbn_half h)
    {
    #if defined(__F16C__)
        return _cvtsh_ss(h.bits);
    #else
        uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
        uint32_t e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
        if (e == 0x1f)                     /* inf, NaN (payload kept) */
            return fastbn_float_of_bits(sign | 0x7f800000u | (m << 13));
        if (e == 0)                        /* zero, subnormal: m * 2^-24 */
            return fastbn_float_of_bits(sign | fastbn_bits_of_float((float)m * 0x1p-24f));
        return fastbn_float_of_bits(sign | ((e + 112) << 23) | (m << 13));
    #endif
    }

    static inline fastbn_half fastbn_half_store_double(double d)
    {
        fastbn_half h;
        double a = fabs(d), k;
        int e;
        uint16_t sign = signbit(d) ? 0x8000u : 0;
        uint64_t u;
        if (a != a) {                      /* quiet NaN, the payload's top bits kept (as F16C) */
            memcpy(&u, &d, sizeof u);
            h.bits = (uint16_t)(0x7e00u | sign | ((u >> 42) & 0x3ffu));
        }
        else if (a >= 65520.0)             /* the midpoint of 65504 and 2^16: ties go to inf */
            h.bits = 0x7c00u | sign;
        else if (a < 0x1p-14)              /* subnormal: the nearest multiple of 2^-24 */
            h.bits = (uint16_t)nearbyint(a * 0x1p24) | sign;   /* 1024 is the least normal */
        else {
            frexp(a, &e);                  /* a in [2^(e-1), 2^e) */
            k = nearbyint(ldexp(a, 11 - e));                    /* [1024, 2048]: exact scaling */
            h.bits = (uint16_t)(((e + 14) << 10) + (int)k - 1024) | sign;  /* 2048 carries */
        }
        return h;
    }

    static inline fastbn_half fastbn_half_store_float(float f)
    {
    #if defined(__F16C__)
        fastbn_half h;
        h.bits = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
        return h;
    #else
        return fastbn_half_store_double((double)f);
    #endif
    }

    static inline float fastbn_bfloat_load(fastbn_bfloat b)
    {
        return fastbn_float_of_bits((uint32_t)b.bits << 16);
    }

    static inline fastbn_bfloat fastbn_bfloat_store_float(float f)
    {
        fastbn_bfloat b;
        uint32_t u = fastbn_bits_of_float(f);
        uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        b.bits = (uint16_t)(f != f ? (u >> 16) | 0x40u : r);   /* NaN: quiet, sign kept */
        return b;
    }

    static inline fastbn_bfloat fastbn_bfloat_store_double(double d)
    {
        /* round to odd into float (toward zero, the last bit set when
           inexact), then to nearest even: one rounding of d, since float
           has more than 8 + 2 bits of significand */
        float f = (float)d;
        uint32_t u;
        if (d == d && (double)f != d && !isinf(f)) {
            if (fabs((double)f) > fabs(d))
                f = nextafterf(f, 0.0f);
            u = fastbn_bits_of_float(f) | 1u;
            f = fastbn_float_of_bits(u);
        }
        return fastbn_bfloat_store_float(f);
    }

    /* out[i] = p[i] of n values, exactly */
    static inline void fastbn_half_widen(const fastbn_half *p, float *out, Py_ssize_t n)
    {
        Py_ssize_t i = 0;
    #if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + i))));
    #elif defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + i))));
    #endif
        for (; i < n; i++)
            out[i] = fastbn_half_load(p[i]);
    }

    /* p[i] = v[i] of n values, each rounded once to nearest even */
    static inline void fastbn_half_narrow(const float *v, fastbn_half *p, Py_ssize_t n)
    {
        Py_ssize_t i = 0;
    #if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)(p + i), _mm512_cvtps_ph(_mm512_loadu_ps(v + i),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    #elif defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(p + i), _mm256_cvtps_ph(_mm256_loadu_ps(v + i),
                             _MM_FROUND_TO_NEAREST_INT));
    #endif
        for (; i < n; i++)
            p[i] = fastbn_half_store_float(v[i]);
    }

    /* The same for bfloat16, in integer lanes (the compiler vectorizes them) */
    static inline void fastbn_bfloat_widen(const fastbn_bfloat *p, float *out, Py_ssize_t n)
    {
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = fastbn_bfloat_load(p[i]);
    }

    static inline void fastbn_bfloat_narrow(const float *v, fastbn_bfloat *p, Py_ssize_t n)
    {
        for (Py_ssize_t i = 0; i < n; i++)
            p[i] = fastbn_bfloat_store_float(v[i]);
    }
    """
    ctypedef struct half "fastbn_half":
        unsigned short bits
    ctypedef struct bfloat "fastbn_bfloat":
        unsigned short bits
    float half_load "fastbn_half_load"(half h) noexcept nogil
    half half_of_double "fastbn_half_store_double"(double v) noexcept nogil
    void half_widen "fastbn_half_widen"(const half* p, float* out, Py_ssize_t n) noexcept nogil
    void half_narrow "fastbn_half_narrow"(const float* v, half* p, Py_ssize_t n) noexcept nogil
    float bfloat_load "fastbn_bfloat_load"(bfloat b) noexcept nogil
    bfloat bfloat_of_double "fastbn_bfloat_store_double"(double v) noexcept nogil
    void bfloat_widen "fastbn_bfloat_widen"(const bfloat* p, float* out, Py_ssize_t n) noexcept nogil
    void bfloat_narrow "fastbn_bfloat_narrow"(const float* v, bfloat* p, Py_ssize_t n) noexcept nogil


cdef enum:
    # Values per block of a 16-bit apply (fastbn._body.apply_block): three
    # float buffers of it stay in L1.
    HALF_BLOCK = 256
