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

from cython cimport floating
from libc.float cimport FLT_MAX
from libc.math cimport fabs, sqrt


from fastbn._call cimport (ACT_LEAKY_RELU, ACT_NONE, ACT_RELU, GRAD_ACT, GRAD_OUTPUT, GRAD_PLAIN,
                           MODE_FORWARD, MODE_INFERENCE, STEP_APPLY, STEP_SUMS, Call)
from fastbn._views cimport moved


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


cdef inline Coef stats_coef(double mean, double var, double m, double eps,
                            const floating* gamma, const floating* beta,
                            floating* mean_out, floating* invstd_out,
                            floating* running_mean, floating* running_var,
                            double factor, bint unbiased, Py_ssize_t c) noexcept nogil:
    """Channel c's affine map from its mean and biased variance over m values;
    stores mean and invstd and updates the running statistics (with the
    variance var * m / (m - 1) when unbiased, PyTorch's, else var, Keras'),
    weighted by factor). The stored invstd is
    saturated at the largest float when 1/sqrt(var + eps) exceeds it (a
    constant channel with a tiny eps): the map itself keeps the exact
    double."""
    cdef Coef k
    cdef double invstd = 1.0 / sqrt(var + eps)
    k.center = mean
    k.scale = invstd * (<double>gamma[c] if gamma != NULL else 1.0)
    k.slope = 0.0
    k.offset = <double>beta[c] if beta != NULL else 0.0
    mean_out[c] = <floating>mean
    if floating is float:  # saturate: an infinite invstd would make xhat = 0 * inf = NaN
        invstd_out[c] = <float>(FLT_MAX if invstd > FLT_MAX else invstd)  # NaN stays NaN
    else:  # finite: eps >= the smallest double gives invstd < 1e162
        invstd_out[c] = invstd
    if running_mean != NULL:
        running_mean[c] = <floating>((1.0 - factor) * running_mean[c] + factor * mean)
        if unbiased:
            running_var[c] = <floating>((1.0 - factor) * running_var[c]
                                        + factor * var * m / (m - 1.0))
        else:
            running_var[c] = <floating>((1.0 - factor) * running_var[c] + factor * var)
    return k


cdef inline Coef forward_coef(double s, double q, double m, double shift, double eps,
                              const floating* gamma, const floating* beta,
                              floating* mean_out, floating* invstd_out,
                              floating* running_mean, floating* running_var,
                              double factor, bint unbiased, Py_ssize_t c) noexcept nogil:
    """Finish channel c's statistics from its shifted sums, store them and
    return the affine map."""
    cdef double mean, var
    moments(s, q, m, shift, &mean, &var)
    return stats_coef(mean, var, m, eps, gamma, beta, mean_out, invstd_out, running_mean,
                      running_var, factor, unbiased, c)


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


cdef inline Coef backward_coef(double sdy, double sdyc, double m, bint from_output,
                               const floating* mean, const floating* invstd,
                               const floating* gamma,
                               floating* dgamma_out, floating* dbeta_out,
                               Py_ssize_t c) noexcept nogil:
    """Store dgamma[c] and dbeta[c] and return the map that gives dx.
    from_output: the backward from the output, whose second input is xhat
    itself (sdyc = sum(dy * xhat), center 0; mean is not read): invstd then
    only scales dx."""
    cdef Coef k
    cdef double istd = invstd[c]
    cdef double dgamma = sdyc if from_output else istd * sdyc
    cdef double a = istd * (<double>gamma[c] if gamma != NULL else 1.0)
    dgamma_out[c] = <floating>dgamma
    dbeta_out[c] = <floating>sdy
    k.center = 0.0 if from_output else mean[c]
    k.scale = a
    k.slope = a * (1.0 if from_output else istd) * dgamma / m
    k.offset = a * sdy / m
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


cdef enum:
    # What a pass is (Pass.kind).
    PASS_FORWARD = 0       # shifted sums of x, the statistics, y
    PASS_BACKWARD = 1      # sums of (dy, x), dgamma and dbeta, dx
    PASS_FROZEN = 2        # mean and invstd constants: dx = gamma * invstd * dy (through the
                           # activation); the sums only for dgamma and dbeta, when wanted
    PASS_INFERENCE = 3     # the running statistics' map applied to x


cdef enum:
    # What one value of a pass's apply or sums computes (Pass.body, Pass.sums_body):
    # the fused type Body of fastbn._body as a value; a kernel turns it into
    # the specialization (one loop each).
    BODY_Y = 0             # BodyY
    BODY_Y_ACT = 1         # BodyYAct
    BODY_DX = 2            # BodyDX
    BODY_DX_ACT = 3        # BodyDXAct
    BODY_DX_RELU = 4       # BodyDXRelu
    BODY_DX_OUT = 5        # BodyDXOut
    BODY_DZ = 6            # BodyDZ
    BODY_DZ_RELU = 7       # BodyDZRelu


ctypedef struct Pass:
    # What a pass does, said once (kind, body, sums_body, sums, reads_b),
    # and what it needs to finish its channels; the arrays have the call's
    # dtype (void* here, because a struct cannot be fused), and NULL where
    # absent (the running statistics when not tracked, gamma and beta when
    # not affine): no NULL stands for a mode.
    int kind               # PASS_*
    int body               # BODY_*: each value of the apply
    int sums_body          # BODY_*: each value of the sums (BODY_Y: the shifted sums of x)
    bint sums              # the sums are taken (all but a frozen backward without dgamma)
    bint apply             # the apply runs (all but the synchronized passes' first half)
    bint given_maps        # the apply alone, with the maps ``maps`` (the second half)
    const void* maps       # given_maps: a Coef per channel
    double* totals         # the sums alone (not apply): (C, 2) written
    bint reads_b           # the apply reads the second input (x, or y from the output)
    bint unbiased          # forward: the running variance takes var * m / (m - 1)
    int grad               # backward: GRAD_PLAIN, GRAD_ACT or GRAD_OUTPUT (see Grad)
    int act                # the activation: ACT_NONE, ACT_RELU or ACT_LEAKY_RELU
    double act_slope       # its negative slope
    double m               # values per channel
    double eps, factor     # forward, inference
    const void* gamma
    const void* beta       # forward, inference; backward with an activation
    void* mean             # forward: written; backward: read (the sums' center; not from y)
    void* invstd           # forward: written; backward: read
    void* running_mean     # forward: updated when tracked; inference: read
    void* running_var
    void* dgamma           # backward: written when sums
    void* dbeta


cdef inline int forward_body(int act) noexcept nogil:
    return BODY_Y if act == ACT_NONE else BODY_Y_ACT


cdef inline int backward_body(bint frozen, int grad, int act) noexcept nogil:
    """The apply's body of a backward: dx from (dy, x), through the
    activation's derivative (GRAD_ACT), from the output (GRAD_OUTPUT), or
    from dy alone when frozen."""
    if frozen:
        if grad == GRAD_PLAIN:
            return BODY_Y              # gamma * invstd * dy: the map with center 0
        return BODY_DZ_RELU if act == ACT_RELU else BODY_DZ
    if grad == GRAD_PLAIN:
        return BODY_DX
    if grad == GRAD_OUTPUT:
        return BODY_DX_OUT
    return BODY_DX_RELU if act == ACT_RELU else BODY_DX_ACT


cdef inline Pass forward_pass(double m, double eps, double factor, bint unbiased,
                              const floating* gamma, const floating* beta, floating* mean,
                              floating* invstd, floating* running_mean,
                              floating* running_var, int act, double act_slope) noexcept nogil:
    cdef Pass ps
    ps.kind = PASS_FORWARD
    ps.body = forward_body(act)
    ps.sums_body = BODY_Y
    ps.sums = ps.apply = True
    ps.given_maps = False
    ps.maps = ps.totals = NULL
    ps.reads_b = False
    ps.unbiased = unbiased
    ps.grad = GRAD_PLAIN
    ps.act = act
    ps.act_slope = act_slope
    ps.m, ps.eps, ps.factor = m, eps, factor
    ps.gamma, ps.beta = gamma, beta
    ps.mean, ps.invstd = mean, invstd
    ps.running_mean, ps.running_var = running_mean, running_var
    ps.dgamma = ps.dbeta = NULL
    return ps


cdef inline Pass inference_pass(double eps, const floating* gamma, const floating* beta,
                                const floating* running_mean, const floating* running_var,
                                int act, double act_slope) noexcept nogil:
    cdef Pass ps = forward_pass(0.0, eps, 0.0, False, gamma, beta, <floating*>NULL,
                                <floating*>NULL, <floating*>running_mean,
                                <floating*>running_var, act, act_slope)
    ps.kind = PASS_INFERENCE
    ps.sums = False
    return ps


cdef inline Pass backward_pass(double m, bint frozen, bint param_grads, const floating* gamma,
                               const floating* beta, const floating* mean,
                               const floating* invstd, floating* dgamma, floating* dbeta,
                               int grad, int act, double act_slope) noexcept nogil:
    """grad GRAD_OUTPUT: the backward from the output, whose second input is
    y (the sums center on 0; mean is not read); param_grads: dgamma and
    dbeta are written (a training backward always writes them)."""
    cdef Pass ps
    ps.kind = PASS_FROZEN if frozen else PASS_BACKWARD
    ps.body = backward_body(frozen, grad, act)
    # a frozen backward's sums are those of the training backward
    ps.sums_body = backward_body(False, grad, act)
    ps.sums = param_grads or not frozen
    ps.apply = True
    ps.given_maps = False
    ps.maps = ps.totals = NULL
    ps.reads_b = ps.body != BODY_Y
    ps.unbiased = False
    ps.grad = grad
    ps.act = act
    ps.act_slope = act_slope
    ps.m, ps.eps, ps.factor = m, 0.0, 0.0
    ps.gamma, ps.beta = gamma, beta
    ps.mean, ps.invstd = <void*>mean, <void*>invstd
    ps.running_mean = ps.running_var = NULL
    ps.dgamma, ps.dbeta = dgamma, dbeta
    return ps


cdef inline Pass call_pass(const Call* k, Py_ssize_t c0, double m,
                           const floating* like) noexcept nogil:
    """The pass of the call k over its channels c0 and on (fastbn._call.Call),
    m values per channel; ``like`` is any array of the call, for its dtype.
    A call of one step runs half of a training pass: the sums into
    k.totals, or the apply with the maps k.maps (fastbn.distributed reduces
    across processes in between)."""
    cdef Pass ps
    if k.mode == MODE_FORWARD:
        ps = forward_pass(m, k.eps, k.factor, k.unbiased, moved(k.gamma, c0, like),
                          moved(k.beta, c0, like), <floating*>moved(k.save_mean, c0, like),
                          <floating*>moved(k.save_invstd, c0, like),
                          <floating*>moved(k.running_mean, c0, like),
                          <floating*>moved(k.running_var, c0, like), k.act, k.slope)
    elif k.mode == MODE_INFERENCE:
        ps = inference_pass(k.eps, moved(k.gamma, c0, like), moved(k.beta, c0, like),
                            moved(k.running_mean, c0, like), moved(k.running_var, c0, like),
                            k.act, k.slope)
    else:
        ps = backward_pass(m, k.frozen, k.param_grads, moved(k.gamma, c0, like),
                           moved(k.beta, c0, like), moved(k.mean, c0, like),
                           moved(k.invstd, c0, like), <floating*>moved(k.dgamma, c0, like),
                           <floating*>moved(k.dbeta, c0, like), k.grad, k.act, k.slope)
    if not (k.steps & STEP_APPLY):
        ps.apply = False
        ps.totals = k.totals + 2 * c0
    if not (k.steps & STEP_SUMS):
        ps.sums = False
        ps.given_maps = True
        ps.maps = <const Coef*>k.maps + c0
    return ps


cdef inline Coef finish(const Pass* ps, double s0, double s1, double center, Py_ssize_t c,
                        const floating* like) noexcept nogil:
    """Channel c's map from its two sums around center (forward: the shifted
    sums; backward: sum(dy), sum(dy * (x - mean))), or from the running
    statistics (inference), or the given map (the apply alone); ``like`` is
    any array of the call, for its dtype."""
    if ps.given_maps:
        return (<const Coef*>ps.maps)[c]
    if ps.kind == PASS_FROZEN:
        return frozen_coef(s0, s1, ps.sums, <const floating*>ps.invstd,
                           <const floating*>ps.gamma, <floating*>ps.dgamma,
                           <floating*>ps.dbeta, c)
    if ps.kind == PASS_BACKWARD:
        return backward_coef(s0, s1, ps.m, ps.grad == GRAD_OUTPUT, <const floating*>ps.mean,
                             <const floating*>ps.invstd, <const floating*>ps.gamma,
                             <floating*>ps.dgamma, <floating*>ps.dbeta, c)
    if ps.kind == PASS_INFERENCE:
        return inference_coef(<const floating*>ps.running_mean,
                              <const floating*>ps.running_var, ps.eps,
                              <const floating*>ps.gamma, <const floating*>ps.beta, c)
    return forward_coef(s0, s1, ps.m, center, ps.eps, <const floating*>ps.gamma,
                        <const floating*>ps.beta, <floating*>ps.mean, <floating*>ps.invstd,
                        <floating*>ps.running_mean, <floating*>ps.running_var, ps.factor,
                        ps.unbiased, c)


cdef inline const floating* apply_b(const Pass* ps, const floating* b) noexcept nogil:
    """The apply's second array, NULL when the apply reads none (a forward;
    a frozen backward's dx from dy alone)."""
    return b if ps.reads_b else NULL


cdef inline double center_of(const Pass* ps, const floating* a, Py_ssize_t offset,
                             Py_ssize_t c) noexcept nogil:
    """Channel c's center of the sums: its value a[offset] in the forward
    (a value of the data: the shift), its mean in the backward."""
    if ps.kind == PASS_FORWARD:
        return a[offset]
    return 0.0 if ps.grad == GRAD_OUTPUT else (<const floating*>ps.mean)[c]


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


cdef inline Grad grad_of(const Pass* ps, Py_ssize_t c, const floating* like) noexcept nogil:
    """Channel c's Grad (of a backward with GRAD_ACT or GRAD_OUTPUT); ``like``
    is any array of the call, for its dtype."""
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
    return t


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
