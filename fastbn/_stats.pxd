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
from libc.math cimport fabs, sqrt


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


cdef inline void moments(double s, double q, double m, double shift, double* mean,
                         double* var) noexcept nogil:
    """The mean and biased variance of m values from their sums shifted by shift."""
    cdef double mu = s / m
    cdef double v = q / m - mu * mu
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


cdef inline Coef stats_coef(const Pass* ps, double mean, double var, Py_ssize_t c,
                            const floating* like) noexcept nogil:
    """Channel c's affine map from its mean and biased variance over ps.m
    values; stores mean and invstd, and r and d with Batch Renormalization,
    and updates the running statistics (with the variance var * m / (m -
    1) when unbiased, PyTorch's, else var, Keras', weighted by factor), or
    for a ghost group stores that mean and variance in ps.moments instead.
    The stored invstd is saturated at the largest float when 1/sqrt(var +
    eps) exceeds it (a constant channel with a tiny eps): the map itself
    keeps the exact double. ``like`` is any array of the call, for its
    dtype."""
    cdef const floating* gamma = <const floating*>ps.gamma
    cdef const floating* beta = <const floating*>ps.beta
    cdef floating* running_mean = <floating*>ps.running_mean
    cdef floating* running_var = <floating*>ps.running_var
    cdef double invstd = 1.0 / sqrt(var + ps.eps), m = ps.m, factor = ps.factor
    cdef double g = <double>gamma[c] if gamma != NULL else 1.0, sigma, r, d
    cdef Coef k
    k.center = mean
    k.scale = invstd * g
    k.slope = 0.0
    k.offset = <double>beta[c] if beta != NULL else 0.0
    if ps.renorm:  # r and d as stored, so that the backward reads what the forward used
        sigma = sqrt(<double>running_var[c] + ps.eps)
        r = <floating>clipped(sqrt(var + ps.eps) / sigma, ps.rmin, ps.rmax)
        d = <floating>clipped((mean - <double>running_mean[c]) / sigma, -ps.dmax, ps.dmax)
        (<floating*>ps.r)[c] = <floating>r
        (<floating*>ps.d)[c] = <floating>d
        k.scale = k.scale * r
        if d != 0.0:  # rmax = 1 and dmax = 0 keep the plain layer's bits, -0.0 included
            k.offset = k.offset + g * d
    (<floating*>ps.mean)[c] = <floating>mean
    if floating is float:  # saturate: an infinite invstd would make xhat = 0 * inf = NaN
        (<float*>ps.invstd)[c] = <float>(FLT_MAX if invstd > FLT_MAX else invstd)  # NaN stays
    else:  # finite: eps >= the smallest double gives invstd < 1e162
        (<double*>ps.invstd)[c] = invstd
    if ps.moments != NULL:
        ps.moments[2 * c] = mean
        ps.moments[2 * c + 1] = var * m / (m - 1.0) if ps.unbiased else var
    elif running_mean != NULL:
        running_mean[c] = <floating>((1.0 - factor) * running_mean[c] + factor * mean)
        if ps.unbiased:
            running_var[c] = <floating>((1.0 - factor) * running_var[c]
                                        + factor * var * m / (m - 1.0))
        else:
            running_var[c] = <floating>((1.0 - factor) * running_var[c] + factor * var)
    return k


cdef inline void groups_update(const double* moments, Py_ssize_t groups, Py_ssize_t C,
                               double factor, floating* running_mean,
                               floating* running_var) noexcept nogil:
    """Ghost Batch Normalization's running update, once per call: with the
    (groups, C, 2) moments of the groups (stats_coef), the average over the
    groups of their means and of their variances (Keras' rule), in order."""
    cdef Py_ssize_t c, j
    cdef double mean, var
    for c in range(C):
        mean = var = 0.0
        for j in range(groups):
            mean += moments[2 * (j * C + c)]
            var += moments[2 * (j * C + c) + 1]
        mean /= <double>groups
        var /= <double>groups
        running_mean[c] = <floating>((1.0 - factor) * running_mean[c] + factor * mean)
        running_var[c] = <floating>((1.0 - factor) * running_var[c] + factor * var)


cdef inline Coef forward_coef(const Pass* ps, double s, double q, double shift, Py_ssize_t c,
                              const floating* like) noexcept nogil:
    """Finish channel c's statistics from its shifted sums, store them and
    return the affine map."""
    cdef double mean, var
    moments(s, q, ps.m, shift, &mean, &var)
    return stats_coef(ps, mean, var, c, like)


cdef inline Coef inference_coef(const floating* running_mean, const floating* running_var,
                                double eps, const floating* gamma, const floating* beta,
                                Py_ssize_t c) noexcept nogil:
    """The affine map of channel c from the running statistics."""
    cdef Coef k
    k.center = running_mean[c]
    k.scale = (1.0 / sqrt(<double>running_var[c] + eps)) * (
        <double>gamma[c] if gamma != NULL else 1.0)
    k.slope = 0.0
    k.offset = <double>beta[c] if beta != NULL else 0.0
    return k


cdef inline Coef backward_coef(const Pass* ps, double sdy, double sdyc, Py_ssize_t c,
                               const floating* like) noexcept nogil:
    """Store dgamma[c] and dbeta[c] and return the map that gives dx. From
    the output (GRAD_OUTPUT) the second input is xhat itself (sdyc =
    sum(dy * xhat), center 0; mean is not read): invstd then only scales
    dx. With Batch Renormalization (never from the output) gamma * r
    scales dx and dgamma = r * sum(dy * xhat) + d * sum(dy)."""
    cdef const floating* gamma = <const floating*>ps.gamma
    cdef bint from_output = ps.grad == GRAD_OUTPUT
    cdef double istd = (<const floating*>ps.invstd)[c]
    cdef double sxhat = sdyc if from_output else istd * sdyc   # sum(dy * xhat)
    cdef double a = istd * (<double>gamma[c] if gamma != NULL else 1.0)
    cdef double dgamma = sxhat, r, d
    cdef Coef k
    if ps.renorm:
        r = (<const floating*>ps.r)[c]
        d = (<const floating*>ps.d)[c]
        a = a * r
        dgamma = r * sxhat
        if d != 0.0:
            dgamma = dgamma + d * sdy
    (<floating*>ps.dgamma)[c] = <floating>dgamma
    (<floating*>ps.dbeta)[c] = <floating>sdy
    k.center = 0.0 if from_output else (<const floating*>ps.mean)[c]
    k.scale = a
    k.slope = a * (1.0 if from_output else istd) * sxhat / ps.m
    k.offset = a * sdy / ps.m
    return k

cdef inline Coef frozen_coef(double sdy, double sdyc, bint param_grads,
                             const floating* invstd, const floating* gamma,
                             floating* dgamma_out, floating* dbeta_out,
                             Py_ssize_t c) noexcept nogil:
    """The backward with mean and invstd as constants (eval mode, frozen
    statistics): dx = gamma * invstd * dy, the map applied to dy alone
    (center 0, offset 0: x is not read, so a non-finite x leaves dx alone);
    dgamma = invstd * sdyc and dbeta = sdy stored when param_grads."""
    cdef Coef k
    cdef double istd = invstd[c]
    if param_grads:
        dgamma_out[c] = <floating>(istd * sdyc)
        dbeta_out[c] = <floating>sdy
    k.center = 0.0
    k.scale = istd * (<double>gamma[c] if gamma != NULL else 1.0)
    k.slope = 0.0
    k.offset = 0.0
    return k


cdef inline Coef finish_in(const Pass* ps, double s0, double s1, double center, Py_ssize_t c,
                           const floating* like) noexcept nogil:
    """Channel c's map from its two sums around center (forward: the shifted
    sums; backward: sum(dy), sum(dy * (x - mean))), or from the running
    statistics (inference), or the given map (the apply alone); ``like`` is
    any parameter array of the call, for its dtype."""
    if ps.given_maps:
        return (<const Coef*>ps.maps)[c]
    if ps.kind == PASS_FROZEN:
        return frozen_coef(s0, s1, ps.sums, <const floating*>ps.invstd,
                           <const floating*>ps.gamma, <floating*>ps.dgamma,
                           <floating*>ps.dbeta, c)
    if ps.kind == PASS_BACKWARD:
        return backward_coef(ps, s0, s1, c, like)
    if ps.kind == PASS_INFERENCE:
        return inference_coef(<const floating*>ps.running_mean,
                              <const floating*>ps.running_var, ps.eps,
                              <const floating*>ps.gamma, <const floating*>ps.beta, c)
    return forward_coef(ps, s0, s1, center, c, like)


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


# The kernels' entries to the two above, from the data's type: the
# parameters and statistics are float64 with float64 data, float32 with any
# other (PyTorch's rule for float16 and bfloat16 input).

cdef inline Coef finish(const Pass* ps, double s0, double s1, double center, Py_ssize_t c,
                        const storage* data) noexcept nogil:
    if storage is double:
        return finish_in(ps, s0, s1, center, c, <const double*>NULL)
    else:
        return finish_in(ps, s0, s1, center, c, <const float*>NULL)


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
    return v == 0.0 or (fabs(v) > 7.888609052210118e-31 and fabs(v) < 1.2676506002282294e+30)


cdef inline bint to_float(const Coef* k, Coef32* f) noexcept nogil:
    """The map k in float (Coef32); False when float cannot carry it (then
    the caller applies k in double)."""
    if not (float_safe(k.center) and float_safe(k.scale) and float_safe(k.slope)
            and float_safe(k.offset)):
        return False
    f.hi = <float>k.center
    f.lo = <float>(k.center - <double>f.hi)
    f.scale = <float>k.scale
    f.slope = <float>k.slope
    f.offset = <float>k.offset
    return True
