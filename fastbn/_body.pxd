# The elementwise bodies of every pass, each written once, for both kernel
# families (_planar runs along a row with one map, _columnar along a row of
# columns with a map per column: both inline the same function, so the same
# value gets the same bits in either family).
#
# Two template parameters, as Cython fused types: ``storage``, the type the
# arrays store (fastbn._simd: float32, float64, float16, bfloat16), and
# ``real``, the type the map is applied in. float32 and 16-bit data are
# applied in float where float can carry the map (fastbn._stats.Coef32: the
# center split into hi + lo), in double otherwise; float64 data in double,
# with lo = 0 (x - 0 is x exactly, so the expressions are the double
# path's). A value is read through ``load`` (exact) and written through
# ``put`` (one rounding, to nearest even). Which body and which activation a loop applies are
# constants of its caller (an argument the inlined loop sees as a
# literal), so the compiler emits one loop per kind, with no per-value
# branch on it.

from fastbn._call cimport ACT_NONE, ACT_RELU
from fastbn._half cimport (bfloat, bfloat_load, bfloat_narrow, bfloat_of_double, bfloat_widen,
                           half, half_load, half_narrow, half_of_double, half_widen)
from fastbn._simd cimport storage


ctypedef fused real:
    float
    double


# What one value of an apply is (a = the first input, b = the second): one
# empty struct per body, the members of the fused type Body. A loop takes
# ``const Body* body`` (always NULL: only its type counts), so Cython emits
# one specialization per body, each with its body a constant: no per-value
# branch on it, and the compiler vectorizes each as the loop it is.
cdef struct BodyY:        # ((a - hi) - lo) * s + o: a forward (a = x), or a frozen
    char unused           # backward's dx from dy alone (hi = lo = o = 0)
cdef struct BodyYAct:     # act(BodyY), the activation (kind, neg) a forward fuses
    char unused
cdef struct BodyDX:       # s * a - q * ((b - hi) - lo) - o: the backward, a = dy, b = x
    char unused
cdef struct BodyDXAct:    # BodyDX of dz = dy * act'(z), z recomputed from b = x (leaky_relu;
    char unused           # no activation: slope 1)
cdef struct BodyDXRelu:   # the same through relu (act' = 0 below zero, even for inf dy)
    char unused
cdef struct BodyDXOut:    # the same from b = y, the output: b - center is xhat itself
    char unused
cdef struct BodyDZ:       # dz * s: a frozen backward through leaky_relu
    char unused
cdef struct BodyDZRelu:   # dz * s: a frozen backward through relu
    char unused

ctypedef fused Body:
    BodyY
    BodyYAct
    BodyDX
    BodyDXAct
    BodyDXRelu
    BodyDXOut
    BodyDZ
    BodyDZRelu


cdef inline double load(const storage* p, Py_ssize_t i) noexcept nogil:
    """Value i of p, exactly (a float16 or bfloat16 widens through float)."""
    if storage is half:
        return half_load(p[i])
    elif storage is bfloat:
        return bfloat_load(p[i])
    else:
        return p[i]


cdef inline void put(storage* p, Py_ssize_t i, real v) noexcept nogil:
    """p[i] = v, rounded once to p's type (to nearest even; a float widens
    to double exactly). 16-bit data applied in float are stored a block at a
    time (``narrow``), so one value at a time they come from double."""
    if storage is half:
        p[i] = half_of_double(v)
    elif storage is bfloat:
        p[i] = bfloat_of_double(v)
    else:
        p[i] = <storage>v


cdef inline void widen(const storage* p, float* out, Py_ssize_t n) noexcept nogil:
    """out[i] = p[i] of n 16-bit values, exactly, in the target's vector
    conversions (fastbn._half); the loops apply 16-bit data a block at a
    time through it and ``narrow``. Not used for float32 and float64."""
    if storage is half:
        half_widen(p, out, n)
    elif storage is bfloat:
        bfloat_widen(p, out, n)


cdef inline void narrow(const float* v, storage* p, Py_ssize_t n) noexcept nogil:
    """p[i] = v[i] of n values, each rounded once to p's 16-bit type."""
    if storage is half:
        half_narrow(v, p, n)
    elif storage is bfloat:
        bfloat_narrow(v, p, n)


cdef inline real activated_as(real v, int kind, real slope) noexcept nogil:
    """relu: 0 for v < 0; leaky_relu: v * slope for v < 0; v otherwise (NaN
    and -0.0 stay as they are, as numpy.maximum(v, 0) keeps them), in the
    type of v."""
    if kind == ACT_NONE or not (v < 0.0):
        return v
    return 0.0 if kind == ACT_RELU else v * slope


cdef inline double grad_dz(double dy, double v, double zc, double zs, double zo, double slope,
                           bint relu, bint from_y) noexcept nogil:
    """dz = dy * act'(z) of one value (fastbn._stats.Grad): z = (v - zc) * zs
    + zo from v = x, or, from the output (from_y), z > 0 exactly where v = y
    > 0."""
    cdef bint pos = v > 0.0 if from_y else (v - zc) * zs + zo > 0.0
    return dy if pos else (0.0 if relu else dy * slope)


cdef inline double grad_xc(double v, double center, double zs, double zo, double inv,
                           bint from_y) noexcept nogil:
    """The second input of the sums, of one value (Grad): x - center from
    v = x, or, from the output (from_y, center 0), xhat = (act^-1(y) - zo) * zs."""
    return ((v if v > 0.0 else v * inv) - zo) * zs if from_y else v - center


cdef inline real value(const Body* body, const storage* a, const storage* b, Py_ssize_t i,
                       real hi, real lo, real s, real q, real o, int kind, real neg,
                       double zc, double zs, double zo, double slope,
                       double inv) noexcept nogil:
    """Value i of an apply, in real (see Body): the map (hi, lo, s, q, o),
    the forward's activation (kind, neg) and the backward's transform (zc,
    zs, zo, slope, inv: fastbn._stats.Grad, in double as the sums take it)."""
    if Body is BodyY:
        return ((<real>load(a, i) - hi) - lo) * s + o
    elif Body is BodyYAct:
        return activated_as(((<real>load(a, i) - hi) - lo) * s + o, kind, neg)
    elif Body is BodyDX:
        return s * <real>load(a, i) - q * ((<real>load(b, i) - hi) - lo) - o
    elif Body is BodyDZ:
        return <real>grad_dz(load(a, i), load(b, i), zc, zs, zo, slope, False, False) * s
    elif Body is BodyDZRelu:
        return <real>grad_dz(load(a, i), load(b, i), zc, zs, zo, slope, True, False) * s
    elif Body is BodyDXOut:
        return (s * <real>grad_dz(load(a, i), load(b, i), zc, zs, zo, slope, False, True)
                - q * <real>grad_xc(load(b, i), 0.0, zs, zo, inv, True) - o)
    elif Body is BodyDXRelu:
        return (s * <real>grad_dz(load(a, i), load(b, i), zc, zs, zo, slope, True, False)
                - q * ((<real>load(b, i) - hi) - lo) - o)
    else:
        return (s * <real>grad_dz(load(a, i), load(b, i), zc, zs, zo, slope, False, False)
                - q * ((<real>load(b, i) - hi) - lo) - o)


cdef inline void terms(const Body* body, const storage* a, const storage* b, Py_ssize_t i,
                       double center, double zc, double zs, double zo, double slope,
                       double inv, double* u, double* v) noexcept nogil:
    """Value i's terms of a pass's two sums, in double: (a - center, its
    square) for a forward (BodyY, b NULL: the shifted sums); else (dy, dy *
    (x - center)) of the inputs the body turns (a = dy, b) into (BodyDX: as
    they are; BodyDXAct, BodyDXRelu, BodyDXOut: dz, and x - center or xhat)."""
    cdef double d
    if Body is BodyY or Body is BodyYAct:
        d = load(a, i) - center
        u[0] = d
        v[0] = d * d
    elif Body is BodyDX:
        d = load(a, i)
        u[0] = d
        v[0] = d * (load(b, i) - center)
    elif Body is BodyDXOut:
        d = grad_dz(load(a, i), load(b, i), zc, zs, zo, slope, False, True)
        u[0] = d
        v[0] = d * grad_xc(load(b, i), center, zs, zo, inv, True)
    else:
        d = grad_dz(load(a, i), load(b, i), zc, zs, zo, slope, Body is BodyDXRelu or Body is BodyDZRelu, False)
        u[0] = d
        v[0] = d * grad_xc(load(b, i), center, zs, zo, inv, False)
