# What a pass of a kernel does (Pass), said once, and the one builder that
# turns a kernel call (fastbn._call.Call) into it: both kernel families
# (_planar, _columnar) run a Pass, and the per-channel entries of the
# synchronized passes (_channels) finish channels with one. The per-channel
# arithmetic that reads it is in fastbn/_stats.pxd.

from cython cimport floating

from fastbn._body cimport load
from fastbn._call cimport (ACT_NONE, ACT_RELU, GRAD_OUTPUT, GRAD_PLAIN, MODE_FORWARD,
                           MODE_INFERENCE, STEP_APPLY, STEP_SUMS, Call)
from fastbn._simd cimport storage
from fastbn._views cimport moved


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
    bint renorm            # Batch Renormalization (fastbn._stats.stats_block): r and d
    double rmax, rmin, dmax  # forward: r clipped to [rmin, rmax], d to [-dmax, dmax]
    void* r                # forward: written; backward: read (renorm only, else NULL)
    void* d
    double* moments        # a forward of one ghost group: (C, 2) written, each channel's
                           # mean and biased variance, instead of the running update


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


cdef inline void plain(Pass* ps) noexcept nogil:
    """No Batch Renormalization, no ghost group: the plain layer's pass."""
    ps.renorm = False
    ps.rmax = ps.rmin = 1.0
    ps.dmax = 0.0
    ps.r = ps.d = NULL
    ps.moments = NULL


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
    plain(&ps)
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
    plain(&ps)
    return ps


cdef inline Pass call_pass_in(const Call* k, Py_ssize_t c0, double m,
                              const floating* like) noexcept nogil:
    """The pass of the call k over its channels c0 and on (fastbn._call.Call),
    m values per channel; ``like`` is any parameter array of the call, for
    its dtype.
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
    if k.renorm:
        ps.renorm = True
        ps.rmax, ps.rmin, ps.dmax = k.rmax, k.rmin, k.dmax
        ps.r = <void*>moved(k.r, c0, like)
        ps.d = <void*>moved(k.d, c0, like)
    if k.moments != NULL:
        ps.moments = k.moments + 2 * c0
    if not (k.steps & STEP_APPLY):
        ps.apply = False
        ps.totals = k.totals + 2 * c0
    if not (k.steps & STEP_SUMS):
        ps.sums = False
        ps.given_maps = True
        ps.maps = k.maps + 4 * c0     # (C, 4): a Coef per channel
    return ps


cdef inline Pass call_pass(const Call* k, Py_ssize_t c0, double m,
                           const storage* data) noexcept nogil:
    """call_pass_in with the parameters' type of data's (fastbn._call: float64
    for float64 data, float32 otherwise)."""
    if storage is double:
        return call_pass_in(k, c0, m, <const double*>NULL)
    else:
        return call_pass_in(k, c0, m, <const float*>NULL)


cdef inline double param(const void* p, Py_ssize_t c, const storage* data) noexcept nogil:
    """Value c of a parameter or statistic p of a call on data."""
    if storage is double:
        return (<const double*>p)[c]
    else:
        return (<const float*>p)[c]


cdef inline void* param_at(void* p, Py_ssize_t off, const storage* data) noexcept nogil:
    """A parameter or statistic p of a call on data from value off on; NULL
    stays NULL."""
    if p == NULL:
        return NULL
    return <char*>p + off * (sizeof(double) if storage is double else sizeof(float))


cdef inline void set_param(void* p, Py_ssize_t c, double v, const storage* data) noexcept nogil:
    """p[c] = v, rounded to the parameters' type of a call on data."""
    if storage is double:
        (<double*>p)[c] = v
    else:
        (<float*>p)[c] = <float>v


cdef inline const storage* apply_b(const Pass* ps, const storage* b) noexcept nogil:
    """The apply's second array, NULL when the apply reads none (a forward;
    a frozen backward's dx from dy alone)."""
    return b if ps.reads_b else NULL


cdef inline double center_of(const Pass* ps, const storage* a, Py_ssize_t offset,
                             Py_ssize_t c) noexcept nogil:
    """Channel c's center of the sums: its value a[offset] in the forward
    (a value of the data: the shift), its mean in the backward, 0 from the
    output and in inference (no sums)."""
    if ps.kind == PASS_FORWARD:
        return load(a, offset)
    if ps.kind == PASS_INFERENCE:
        return 0.0
    return 0.0 if ps.grad == GRAD_OUTPUT else param(ps.mean, c, a)
