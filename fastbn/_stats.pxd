# Per-channel arithmetic shared by both kernel families (_planar, _columnar)
# and by the per-channel entry points of the synchronized passes (_channels):
# turning accumulated sums into statistics and coefficients, in double.
#
# Forward: the sums are shifted by ``shift`` (one value of the channel), so
#   s = sum(x - shift), q = sum((x - shift)**2), over m values,
#   mean = shift + s/m,  var = q/m - (s/m)**2  (biased).
# With the shift inside the data's range the subtraction loses nothing even
# when the data sit far from zero (the textbook "shifted data" algorithm;
# Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983).
#
# Backward (Ioffe & Szegedy 2015, Section 3), with sdy = sum(dy) and
# sdyc = sum(dy * (x - mean)):
#   dbeta = sdy,  dgamma = invstd * sdyc,
#   dx = gamma*invstd/m * (m*dy - dbeta - xhat*dgamma)
#      = a*dy - b*(x - mean) - c,
#   a = gamma*invstd,  b = a*invstd*dgamma/m,  c = a*dbeta/m.
#
# Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards
# Reducing Minibatch Dependence in Batch-Normalized Models",
# arXiv:1702.03275, Algorithm 1), with sigma = sqrt(running_var + eps) of
# the running statistics before this batch's update:
#   r = clip(sqrt(var + eps) / sigma, rmin, rmax),
#   d = clip((mean - running_mean) / sigma, -dmax, dmax),
#   y = gamma * (xhat * r + d) + beta: the plain map with gamma * r for
#   gamma and beta + gamma * d for beta.
# r and d are constants for the gradient: dx is the plain backward's with
# gamma * r, dgamma = r * sum(dy * xhat) + d * sum(dy), dbeta = sum(dy).

from cython cimport floating
from libc.float cimport FLT_MAX
from libc.math cimport fabs, frexp, sqrt


from fastbn._call cimport ACT_LEAKY_RELU, ACT_RELU, GRAD_OUTPUT
from fastbn._pass cimport PASS_BACKWARD, PASS_FROZEN, PASS_INFERENCE, Pass
from fastbn._simd cimport storage


ctypedef struct Coef:
    # y = (x - center) * scale + offset            (forward, inference)
    # dx = scale*dy - slope*(x - center) - offset  (backward)
    double center
    double scale
    double slope
    double offset


cdef inline double exact_inverse(double m) noexcept nogil:
    """1/m when m is a count that is a power of two (1/m then exact and
    normal), else 0 (over)."""
    cdef int e
    return 1.0 / m if m >= 1.0 and frexp(m, &e) == 0.5 else 0.0


cdef inline double over(double v, double m, double inv_m) noexcept nogil:
    """v / m, with inv_m = exact_inverse(m). When m is a power of two, 1/m
    is exact and v * (1/m) the same real number as v / m, rounded the same:
    the same bits without the divider, which bounds a block of channel
    finishes (a double division takes 5-10 cycles a vector, a product 1).
    Callers hoist inv_m out of their loops, so the compiler unswitches
    them."""
    return v * inv_m if inv_m != 0.0 else v / m


cdef inline void moments(double s, double q, double m, double inv_m, double shift,
                         double* mean, double* var) noexcept nogil:
    """The mean and biased variance of m values from their sums shifted by
    shift (inv_m = exact_inverse(m))."""
    cdef double mu = over(s, m, inv_m)
    cdef double v = over(q, m, inv_m) - mu * mu
    if v < 0.0:  # rounding only; NaN stays NaN
        v = 0.0
    mean[0] = shift + mu
    var[0] = v


cdef inline double clipped(double v, double lo, double hi) noexcept nogil:
    """v clipped to [lo, hi]; NaN stays NaN (as numpy.clip)."""
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


ctypedef struct Act:
    # The activation fused into a forward's apply step: y = act(map(x)).
    int kind               # ACT_NONE, ACT_RELU, ACT_LEAKY_RELU
    double slope           # leaky_relu: the slope for negative values
    float slope32


cdef inline Act make_act(int kind, double slope) noexcept nogil:
    cdef Act act
    act.kind = kind
    act.slope = slope
    act.slope32 = <float>slope
    return act


ctypedef struct Grad:
    # A backward's inputs turned into the plain backward's, per channel, value
    # by value, before the sums and before the apply:
    #   GRAD_ACT:    dz = dy * act'(z), z = (x - center) * scale + offset, the
    #                pre-activation recomputed from x (center = mean, scale =
    #                gamma * invstd, offset = beta); x stays the second input.
    #   GRAD_OUTPUT: the same dz, with z > 0 exactly where y > 0, and the
    #                second input xhat = (act^-1(y) - offset) * scale
    #                (scale = 1 / gamma, offset = beta): In-Place
    #                Activated BatchNorm (Rota Bulo, Porzi & Kontschieder,
    #                CVPR 2018), x never read.
    # (fastbn._body.grad_dz and grad_xc, value by value.)
    # act'(z) is 1 for z > 0 and 0 (relu) or slope (leaky_relu, or 1 for no
    # activation) otherwise, NaN included (as PyTorch's leaky_relu_backward;
    # its relu backward lets dy through where the output is NaN).
    # Which of these a value goes through is the pass's body (Pass.body).
    double slope, inv_slope
    double center, scale, offset


cdef inline Grad grad_in(const Pass* ps, Py_ssize_t c, const floating* like) noexcept nogil:
    """Channel c's Grad (of a backward with GRAD_ACT or GRAD_OUTPUT); ``like``
    is any parameter array of the call, for its dtype."""
    cdef Grad t
    cdef const floating* gamma = <const floating*>ps.gamma
    cdef const floating* beta = <const floating*>ps.beta
    cdef double g = <double>gamma[c] if gamma != NULL else 1.0
    cdef double istd = (<const floating*>ps.invstd)[c]
    t.slope = (ps.act_slope if ps.act == ACT_LEAKY_RELU
               else 0.0 if ps.act == ACT_RELU else 1.0)
    t.inv_slope = 1.0 / t.slope if t.slope != 0.0 else 0.0
    t.offset = <double>beta[c] if beta != NULL else 0.0
    if ps.grad == GRAD_OUTPUT:
        t.center = 0.0
        t.scale = 1.0 / g
    else:
        t.center = (<const floating*>ps.mean)[c]
        t.scale = g * istd
        if ps.renorm:  # z = gamma * (xhat * r + d) + beta
            t.scale = t.scale * (<const floating*>ps.r)[c]
            if (<const floating*>ps.d)[c] != 0.0:
                t.offset = t.offset + g * (<const floating*>ps.d)[c]
    return t


# The kernels' entries to grad_in and finish_block_in, from the data's type:
# the parameters and statistics are float64 with float64 data, float32 with
# any other (PyTorch's rule for float16 and bfloat16 input).

cdef inline Grad grad_of(const Pass* ps, Py_ssize_t c, const storage* data) noexcept nogil:
    if storage is double:
        return grad_in(ps, c, <const double*>NULL)
    else:
        return grad_in(ps, c, <const float*>NULL)


ctypedef struct Coef32:
    # A Coef for float32 arithmetic: the center split into hi + lo, so that
    # x - hi is exact for x near the center (Sterbenz) and data far from
    # zero lose nothing while the vectors are twice as wide as double ones.
    float hi
    float lo
    float scale
    float slope
    float offset


cdef inline bint float_safe(double v) noexcept nogil:
    """v can be applied in float arithmetic without overflow or underflow
    (0, or a magnitude in (2**-100, 2**100)); False for NaN and Inf, which
    then take the double path."""
    return (v == 0.0) | ((fabs(v) > 7.888609052210118e-31) & (fabs(v) < 1.2676506002282294e+30))


cdef inline bint fits_float(double center, double scale, double slope,
                            double offset) noexcept nogil:
    """Float arithmetic can carry the map (center, scale, slope, offset)."""
    return float_safe(center) & float_safe(scale) & float_safe(slope) & float_safe(offset)


cdef inline Coef32 coef32_of(double center, double scale, double slope,
                             double offset) noexcept nogil:
    """The map in float (a map that fits_float)."""
    cdef Coef32 f
    f.hi = <float>center
    f.lo = <float>(center - <double>f.hi)
    f.scale = <float>scale
    f.slope = <float>slope
    f.offset = <float>offset
    return f


cdef inline bint to_float(const Coef* k, Coef32* f) noexcept nogil:
    """The map k in float (Coef32); False when float cannot carry it (then
    the caller applies k in double)."""
    if not fits_float(k.center, k.scale, k.slope, k.offset):
        return False
    f[0] = coef32_of(k.center, k.scale, k.slope, k.offset)
    return True


# ------------------------------------------------------ finishing channels ----
# A pass finishes its channels a block of at most MAP_BLOCK at a time: each
# step is a loop over the block's channels that reads arrays and writes
# only the block's own local arrays (or one output array), so the compiler
# vectorizes it (divisions and square roots included) and no step waits on
# another channel's. The arithmetic of a channel is the same expressions in
# the same order whatever the block, so its bits do not depend on it.

cdef enum:
    MAP_BLOCK = 64         # channels finished together


ctypedef struct CoefBlock:
    # The maps (Coef) of the channels of a block, field by field.
    double center[MAP_BLOCK]
    double scale[MAP_BLOCK]
    double slope[MAP_BLOCK]
    double offset[MAP_BLOCK]


cdef inline void load_block(const floating* p, Py_ssize_t c0, Py_ssize_t n, double fill,
                            double* out) noexcept nogil:
    """out[j] = p[c0 + j] of n channels, or ``fill`` where p is NULL."""
    cdef Py_ssize_t j
    if p == NULL:
        for j in range(n):
            out[j] = fill
    else:
        for j in range(n):
            out[j] = <double>p[c0 + j]


cdef inline void store_block(floating* p, Py_ssize_t c0, Py_ssize_t n,
                             const double* v) noexcept nogil:
    """p[c0 + j] = v[j] of n channels, rounded once to p's type."""
    cdef Py_ssize_t j
    for j in range(n):
        p[c0 + j] = <floating>v[j]


cdef inline void running_update(floating* running_mean, floating* running_var,
                                Py_ssize_t c0, Py_ssize_t n, const double* mean,
                                const double* var, double m, bint unbiased,
                                double factor) noexcept nogil:
    """The running statistics of channels [c0, c0 + n) moved towards the
    means and biased variances of m values, with weight factor; the
    variance var * m / (m - 1) when unbiased (PyTorch's), else var
    (Keras')."""
    cdef Py_ssize_t j
    for j in range(n):
        running_mean[c0 + j] = <floating>((1.0 - factor) * running_mean[c0 + j]
                                          + factor * mean[j])
    if unbiased:
        for j in range(n):
            running_var[c0 + j] = <floating>((1.0 - factor) * running_var[c0 + j]
                                             + factor * var[j] * m / (m - 1.0))
    else:
        for j in range(n):
            running_var[c0 + j] = <floating>((1.0 - factor) * running_var[c0 + j]
                                             + factor * var[j])


cdef inline void stats_block(const Pass* ps, const double* mean, const double* var,
                             Py_ssize_t c0, Py_ssize_t n, CoefBlock* k,
                             const floating* like) noexcept nogil:
    """The affine maps of channels [c0, c0 + n) from their means and biased
    variances over ps.m values; stores mean and invstd, and r and d with
    Batch Renormalization, and updates the running statistics
    (running_update), or for a ghost group stores each mean and biased
    variance in ps.moments instead (groups_update). The stored invstd is
    saturated at the largest float when 1/sqrt(var + eps) exceeds it (a
    constant channel with a tiny eps): the map itself keeps the exact
    double. ``like`` is any array of the call, for its dtype."""
    cdef double g[MAP_BLOCK]
    cdef double rm[MAP_BLOCK]
    cdef double rv[MAP_BLOCK]
    cdef double invstd[MAP_BLOCK]
    cdef double r[MAP_BLOCK]
    cdef double d[MAP_BLOCK]
    cdef double eps = ps.eps, m = ps.m, factor = ps.factor, sigma
    cdef floating* running_mean = <floating*>ps.running_mean
    cdef floating* running_var = <floating*>ps.running_var
    cdef Py_ssize_t j
    load_block(<const floating*>ps.gamma, c0, n, 1.0, g)
    load_block(<const floating*>ps.beta, c0, n, 0.0, k.offset)
    for j in range(n):
        invstd[j] = 1.0 / sqrt(var[j] + eps)
        k.center[j] = mean[j]
        k.scale[j] = invstd[j] * g[j]
        k.slope[j] = 0.0
    if ps.renorm:  # r and d as stored, so that the backward reads what the forward used
        load_block(<const floating*>running_mean, c0, n, 0.0, rm)
        load_block(<const floating*>running_var, c0, n, 1.0, rv)
        for j in range(n):
            sigma = sqrt(rv[j] + eps)
            r[j] = <floating>clipped(sqrt(var[j] + eps) / sigma, ps.rmin, ps.rmax)
            d[j] = <floating>clipped((mean[j] - rm[j]) / sigma, -ps.dmax, ps.dmax)
            k.scale[j] = k.scale[j] * r[j]
            # rmax = 1 and dmax = 0 keep the plain layer's bits, -0.0 included
            k.offset[j] = k.offset[j] + g[j] * d[j] if d[j] != 0.0 else k.offset[j]
        store_block(<floating*>ps.r, c0, n, r)
        store_block(<floating*>ps.d, c0, n, d)
    store_block(<floating*>ps.mean, c0, n, mean)
    for j in range(n):
        if floating is float:  # saturate: an infinite invstd would make xhat = 0 * inf = NaN
            (<float*>ps.invstd)[c0 + j] = <float>(FLT_MAX if invstd[j] > FLT_MAX
                                                  else invstd[j])  # NaN stays
        else:  # finite: eps >= the smallest double gives invstd < 1e162
            (<double*>ps.invstd)[c0 + j] = invstd[j]
    if ps.moments != NULL:
        for j in range(n):
            ps.moments[2 * (c0 + j)] = mean[j]
            ps.moments[2 * (c0 + j) + 1] = var[j]
    elif running_mean != NULL:
        running_update(running_mean, running_var, c0, n, mean, var, m, ps.unbiased, factor)


cdef inline void groups_update(const double* moments, Py_ssize_t groups, Py_ssize_t C,
                               double m, bint unbiased, double factor,
                               floating* running_mean, floating* running_var) noexcept nogil:
    """Ghost Batch Normalization's running update, once per call: with the
    (groups, C, 2) means and biased variances of the groups (stats_block),
    each over m values, the average over the groups of their means and of
    their variances (Keras' rule), added in group order, the variance
    unbiased when ``unbiased``, as the plain update's: the average of the
    groups' var * m / (m - 1), taken out of the sum. MAP_BLOCK channels at
    a time, so that the loops run across channels."""
    cdef double mean[MAP_BLOCK]
    cdef double var[MAP_BLOCK]
    cdef double inv_g = exact_inverse(<double>groups)
    cdef const double* p
    cdef Py_ssize_t c0 = 0, n, i, j
    while c0 < C:
        n = min(<Py_ssize_t>MAP_BLOCK, C - c0)
        for i in range(n):
            mean[i] = var[i] = 0.0
        for j in range(groups):
            p = moments + 2 * (j * C + c0)
            for i in range(n):
                mean[i] += p[2 * i]
                var[i] += p[2 * i + 1]
        for i in range(n):
            mean[i] = over(mean[i], groups, inv_g)
            var[i] = over(var[i], groups, inv_g)
        running_update(running_mean, running_var, c0, n, mean, var, m, unbiased, factor)
        c0 += n


cdef inline void backward_block(const Pass* ps, const double* sdy, const double* sdyc,
                                Py_ssize_t c0, Py_ssize_t n, CoefBlock* k,
                                const floating* like) noexcept nogil:
    """Store dgamma and dbeta of channels [c0, c0 + n) and their maps that
    give dx, from sdy = sum(dy) and sdyc = sum(dy * (x - mean)). From the
    output (GRAD_OUTPUT) the second sum is sum(dy * xhat) (center 0; mean
    is not read): invstd then only scales dx. With Batch Renormalization
    (never from the output) gamma * r scales dx and dgamma = r * sum(dy *
    xhat) + d * sum(dy); without it r = 1 and d = 0, whose products are
    exact, so the bits are the plain backward's."""
    cdef double istd[MAP_BLOCK]
    cdef double g[MAP_BLOCK]
    cdef double r[MAP_BLOCK]
    cdef double d[MAP_BLOCK]
    cdef double dgamma[MAP_BLOCK]
    cdef double m = ps.m, inv_m = exact_inverse(ps.m), sxhat, a
    cdef bint from_output = ps.grad == GRAD_OUTPUT
    cdef Py_ssize_t j
    load_block(<const floating*>ps.invstd, c0, n, 0.0, istd)
    load_block(<const floating*>ps.gamma, c0, n, 1.0, g)
    load_block(<const floating*>ps.r, c0, n, 1.0, r)
    load_block(<const floating*>ps.d, c0, n, 0.0, d)
    load_block(<const floating*>(NULL if from_output else ps.mean), c0, n, 0.0, k.center)
    for j in range(n):
        sxhat = sdyc[j] if from_output else istd[j] * sdyc[j]     # sum(dy * xhat)
        a = istd[j] * g[j] * r[j]
        dgamma[j] = r[j] * sxhat + d[j] * sdy[j] if d[j] != 0.0 else r[j] * sxhat
        k.scale[j] = a
        k.slope[j] = over(a * (1.0 if from_output else istd[j]) * sxhat, m, inv_m)
        k.offset[j] = over(a * sdy[j], m, inv_m)
    store_block(<floating*>ps.dgamma, c0, n, dgamma)
    store_block(<floating*>ps.dbeta, c0, n, sdy)


cdef inline void frozen_block(const Pass* ps, const double* sdy, const double* sdyc,
                              Py_ssize_t c0, Py_ssize_t n, CoefBlock* k,
                              const floating* like) noexcept nogil:
    """The backward with mean and invstd as constants (eval mode, frozen
    statistics): dx = gamma * invstd * dy, the map applied to dy alone
    (center 0, offset 0: x is not read, so a non-finite x leaves dx alone);
    dgamma = invstd * sdyc and dbeta = sdy stored when the sums are taken."""
    cdef double istd[MAP_BLOCK]
    cdef double g[MAP_BLOCK]
    cdef double dgamma[MAP_BLOCK]
    cdef Py_ssize_t j
    load_block(<const floating*>ps.invstd, c0, n, 0.0, istd)
    load_block(<const floating*>ps.gamma, c0, n, 1.0, g)
    for j in range(n):
        k.center[j] = 0.0
        k.scale[j] = istd[j] * g[j]
        k.slope[j] = 0.0
        k.offset[j] = 0.0
    if ps.sums:  # else sdy and sdyc are not read
        for j in range(n):
            dgamma[j] = istd[j] * sdyc[j]
        store_block(<floating*>ps.dgamma, c0, n, dgamma)
        store_block(<floating*>ps.dbeta, c0, n, sdy)


cdef inline void inference_block(const Pass* ps, Py_ssize_t c0, Py_ssize_t n, CoefBlock* k,
                                 const floating* like) noexcept nogil:
    """The affine maps of channels [c0, c0 + n) from the running statistics."""
    cdef double g[MAP_BLOCK]
    cdef double rv[MAP_BLOCK]
    cdef Py_ssize_t j
    load_block(<const floating*>ps.running_mean, c0, n, 0.0, k.center)
    load_block(<const floating*>ps.running_var, c0, n, 0.0, rv)
    load_block(<const floating*>ps.gamma, c0, n, 1.0, g)
    load_block(<const floating*>ps.beta, c0, n, 0.0, k.offset)
    for j in range(n):
        k.scale[j] = (1.0 / sqrt(rv[j] + ps.eps)) * g[j]
        k.slope[j] = 0.0


cdef inline void finish_block_in(const Pass* ps, const double* s0, const double* s1,
                                 const double* center, Py_ssize_t c0, Py_ssize_t n,
                                 CoefBlock* k, const floating* like) noexcept nogil:
    """The maps of channels [c0, c0 + n), n <= MAP_BLOCK, from their two
    sums around their centers (s0[j], s1[j], center[j] of channel c0 + j;
    forward: the shifted sums; backward: sum(dy), sum(dy * (x - mean))), or
    from the running statistics (inference), or the given maps (the apply
    alone; the sums are not read then); ``like`` is any parameter array of
    the call, for its dtype."""
    cdef double mean[MAP_BLOCK]
    cdef double var[MAP_BLOCK]
    cdef const Coef* given = <const Coef*>ps.maps
    cdef double inv_m
    cdef Py_ssize_t j
    if ps.given_maps:
        for j in range(n):
            k.center[j] = given[c0 + j].center
            k.scale[j] = given[c0 + j].scale
            k.slope[j] = given[c0 + j].slope
            k.offset[j] = given[c0 + j].offset
    elif ps.kind == PASS_FROZEN:
        frozen_block(ps, s0, s1, c0, n, k, like)
    elif ps.kind == PASS_BACKWARD:
        backward_block(ps, s0, s1, c0, n, k, like)
    elif ps.kind == PASS_INFERENCE:
        inference_block(ps, c0, n, k, like)
    else:
        inv_m = exact_inverse(ps.m)
        for j in range(n):
            moments(s0[j], s1[j], ps.m, inv_m, center[j], &mean[j], &var[j])
        stats_block(ps, mean, var, c0, n, k, like)


cdef inline void finish_block(const Pass* ps, const double* s0, const double* s1,
                              const double* center, Py_ssize_t c0, Py_ssize_t n, CoefBlock* k,
                              const storage* data) noexcept nogil:
    if storage is double:
        finish_block_in(ps, s0, s1, center, c0, n, k, <const double*>NULL)
    else:
        finish_block_in(ps, s0, s1, center, c0, n, k, <const float*>NULL)


cdef inline Coef coef_at(const CoefBlock* k, Py_ssize_t j) noexcept nogil:
    """The map of channel j of the block."""
    cdef Coef m
    m.center = k.center[j]
    m.scale = k.scale[j]
    m.slope = k.slope[j]
    m.offset = k.offset[j]
    return m
