"""Batch Normalization kernels over planar (N, C, S) views.

NCHW and its 3-D and 5-D relatives, viewed as (N, C, S) with S the spatial
size (S > 1; S == 1 goes to ``_columnar``). Channel c is the N x S matrix
``x[:, c, :]``: N rows of S contiguous values, ``C * S`` apart.

Summation order (fixed by the shape, never by the thread count)
----------------------------------------------------------------
A channel's m = N*S values are cut into blocks of about BLOCK values: whole
rows when S < BLOCK, pieces of one row otherwise. Each block is summed in
LANES independent double accumulators (the compiler vectorizes them without
reassociating), the lanes are added in order, and the block sums are added in
block order. So every schedule below gives the same bits.

Schedules
---------
- by channel, when there are enough channels for the threads: one thread
  takes a whole channel, sums its blocks and then normalizes (or, in the
  backward, writes dx for) the channel while it is still in cache: one sweep
  from memory.
- by block, when channels are few (C = 1, 3, ...): every (channel, block)
  pair is summed in parallel into a small table, the table is merged per
  channel in block order, then every pair is normalized in parallel.

The three levels (scikit-learn's habit): ``noexcept nogil`` row and block
functions, the ``prange`` schedules, and thin ``def`` wrappers that take
memoryviews, allocate the O(C) work space and release the GIL. The caller
(``fastbn.functional``) has validated everything; nothing here raises except
MemoryError for the work space.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free

from fastbn._openmp cimport threads_for
from fastbn._stats cimport Coef, forward_coef, inference_coef, backward_coef, float_safe
from fastbn._views cimport cptr, wptr


cdef extern from *:
    """
    /* Independent double accumulators per block: enough to hide the add
       latency with the widest vectors the build targets, no more than the
       registers hold. A build for another target may round differently. */
    #if defined(__AVX512F__)
    #define FASTBN_LANES 32
    #elif defined(__AVX__)
    #define FASTBN_LANES 16
    #else
    #define FASTBN_LANES 8
    #endif
    """
    enum: LANES "FASTBN_LANES"


cdef enum:
    BLOCK = 16384   # values per block of a channel (shape-fixed summation order)


cdef struct Plane:
    Py_ssize_t N, C, S
    Py_ssize_t row_stride        # C * S: from x[n, c, 0] to x[n + 1, c, 0]
    Py_ssize_t rows_per_block    # when S < BLOCK: whole rows per block
    Py_ssize_t blocks_per_row    # when S >= BLOCK: blocks per row
    Py_ssize_t nblocks           # blocks per channel


cdef inline Plane make_plane(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    cdef Plane p
    p.N = N
    p.C = C
    p.S = S
    p.row_stride = C * S
    if S < BLOCK:
        p.rows_per_block = BLOCK // S
        p.blocks_per_row = 0
        p.nblocks = (N + p.rows_per_block - 1) // p.rows_per_block
    else:
        p.rows_per_block = 0
        p.blocks_per_row = (S + BLOCK - 1) // BLOCK
        p.nblocks = N * p.blocks_per_row
    return p


cdef inline void block_span(const Plane* p, Py_ssize_t b, Py_ssize_t* n0, Py_ssize_t* n1,
                            Py_ssize_t* s0, Py_ssize_t* s1) noexcept nogil:
    """Rows [n0, n1) and columns [s0, s1) of block b of a channel."""
    cdef Py_ssize_t j
    if p.blocks_per_row == 0:
        n0[0] = b * p.rows_per_block
        n1[0] = min(p.N, n0[0] + p.rows_per_block)
        s0[0] = 0
        s1[0] = p.S
    else:
        n0[0] = b // p.blocks_per_row
        n1[0] = n0[0] + 1
        j = b % p.blocks_per_row
        s0[0] = j * BLOCK
        s1[0] = min(p.S, s0[0] + BLOCK)


# ---------------------------------------------------------------- rows ----

cdef inline void row_shifted_sums(const floating* x, Py_ssize_t n, double shift,
                                  double* acc_s, double* acc_q) noexcept nogil:
    """acc_s[k] += x[i] - shift, acc_q[k] += (x[i] - shift)**2 with k = i % LANES."""
    cdef Py_ssize_t i = 0, k
    cdef double d
    while i + LANES <= n:
        for k in range(LANES):
            d = <double>x[i + k] - shift
            acc_s[k] += d
            acc_q[k] += d * d
        i += LANES
    for k in range(n - i):
        d = <double>x[i + k] - shift
        acc_s[k] += d
        acc_q[k] += d * d


cdef inline void row_grad_sums(const floating* dy, const floating* x, Py_ssize_t n,
                               double center, double* acc_g, double* acc_c) noexcept nogil:
    """acc_g[k] += dy[i], acc_c[k] += dy[i] * (x[i] - center) with k = i % LANES."""
    cdef Py_ssize_t i = 0, k
    cdef double g
    while i + LANES <= n:
        for k in range(LANES):
            g = dy[i + k]
            acc_g[k] += g
            acc_c[k] += g * (<double>x[i + k] - center)
        i += LANES
    for k in range(n - i):
        g = dy[i + k]
        acc_g[k] += g
        acc_c[k] += g * (<double>x[i + k] - center)


cdef inline void row_affine(const floating* x, floating* y, Py_ssize_t n,
                            double center, double scale, double offset) noexcept nogil:
    """y = (x - center) * scale + offset. y may be x.

    float64 computes in double. float32 computes in float with the center
    split in two floats, hi + lo: x - hi is exact when x is near the center
    (Sterbenz), so data far from zero lose nothing, and the float vectors
    are twice as wide as double ones. Coefficients that float cannot carry
    (extreme scales, NaN) take the double path.
    """
    cdef Py_ssize_t i
    cdef float hi, lo, s, o
    if floating is double or not (float_safe(center) and float_safe(scale)
                                  and float_safe(offset)):
        for i in range(n):
            y[i] = <floating>((<double>x[i] - center) * scale + offset)
    else:
        hi = <float>center
        lo = <float>(center - <double>hi)
        s = <float>scale
        o = <float>offset
        for i in range(n):
            y[i] = ((x[i] - hi) - lo) * s + o


cdef inline void row_grad(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                          double center, double scale, double slope, double offset) noexcept nogil:
    """dx = scale*dy - slope*(x - center) - offset. dx may be dy.

    float32 computes in float with the center split as in row_affine, when
    float can carry the coefficients; in double otherwise.
    """
    cdef Py_ssize_t i
    cdef float hi, lo, s, k, o
    if floating is double or not (float_safe(center) and float_safe(scale)
                                  and float_safe(slope) and float_safe(offset)):
        for i in range(n):
            dx[i] = <floating>(scale * <double>dy[i] - slope * (<double>x[i] - center) - offset)
    else:
        hi = <float>center
        lo = <float>(center - <double>hi)
        s = <float>scale
        k = <float>slope
        o = <float>offset
        for i in range(n):
            dx[i] = s * dy[i] - k * ((x[i] - hi) - lo) - o


# -------------------------------------------------------------- blocks ----

cdef inline double lane_total(const double* acc) noexcept nogil:
    cdef double t = 0.0
    cdef Py_ssize_t k
    for k in range(LANES):
        t += acc[k]
    return t


cdef void block_shifted_sums(const floating* xc, const Plane* p, Py_ssize_t b, double shift,
                             double* s, double* q) noexcept nogil:
    """Shifted sums of block b of the channel that starts at xc."""
    cdef double acc_s[LANES]
    cdef double acc_q[LANES]
    cdef Py_ssize_t n0, n1, s0, s1, n, k
    for k in range(LANES):
        acc_s[k] = 0.0
        acc_q[k] = 0.0
    block_span(p, b, &n0, &n1, &s0, &s1)
    for n in range(n0, n1):
        row_shifted_sums(xc + n * p.row_stride + s0, s1 - s0, shift, acc_s, acc_q)
    s[0] = lane_total(acc_s)
    q[0] = lane_total(acc_q)


cdef void block_grad_sums(const floating* dyc, const floating* xc, const Plane* p,
                          Py_ssize_t b, double center, double* sg, double* sc) noexcept nogil:
    """sum(dy) and sum(dy * (x - center)) over block b of a channel."""
    cdef double acc_g[LANES]
    cdef double acc_c[LANES]
    cdef Py_ssize_t n0, n1, s0, s1, n, k, off
    for k in range(LANES):
        acc_g[k] = 0.0
        acc_c[k] = 0.0
    block_span(p, b, &n0, &n1, &s0, &s1)
    for n in range(n0, n1):
        off = n * p.row_stride + s0
        row_grad_sums(dyc + off, xc + off, s1 - s0, center, acc_g, acc_c)
    sg[0] = lane_total(acc_g)
    sc[0] = lane_total(acc_c)


cdef void block_affine(const floating* xc, floating* yc, const Plane* p, Py_ssize_t b,
                       const Coef* k) noexcept nogil:
    cdef Py_ssize_t n0, n1, s0, s1, n, off
    block_span(p, b, &n0, &n1, &s0, &s1)
    for n in range(n0, n1):
        off = n * p.row_stride + s0
        row_affine(xc + off, yc + off, s1 - s0, k.center, k.scale, k.offset)


cdef void block_grad(const floating* dyc, const floating* xc, floating* dxc, const Plane* p,
                     Py_ssize_t b, const Coef* k) noexcept nogil:
    cdef Py_ssize_t n0, n1, s0, s1, n, off
    block_span(p, b, &n0, &n1, &s0, &s1)
    for n in range(n0, n1):
        off = n * p.row_stride + s0
        row_grad(dyc + off, xc + off, dxc + off, s1 - s0, k.center, k.scale, k.slope, k.offset)


# ----------------------------------------------------------- schedules ----

cdef inline bint by_channel(Py_ssize_t C, int nthreads) noexcept nogil:
    """Whole channels per thread when that keeps the threads evenly loaded."""
    return nthreads == 1 or C % nthreads == 0 or C >= 4 * nthreads


cdef void forward_channel(const floating* x, floating* y, const Plane* p, Py_ssize_t c,
                          const floating* gamma, const floating* beta,
                          floating* mean, floating* invstd,
                          floating* running_mean, floating* running_var,
                          double eps, double factor) noexcept nogil:
    """Statistics, then normalization, of channel c: one sweep from memory."""
    cdef const floating* xc = x + c * p.S
    cdef double shift = xc[0]
    cdef double s = 0.0, q = 0.0, sb, qb
    cdef Py_ssize_t b
    cdef Coef k
    for b in range(p.nblocks):
        block_shifted_sums(xc, p, b, shift, &sb, &qb)
        s += sb
        q += qb
    k = forward_coef(s, q, <double>(p.N * p.S), shift, eps, gamma, beta, mean, invstd,
                     running_mean, running_var, factor, c)
    for b in range(p.nblocks):
        block_affine(xc, y + c * p.S, p, b, &k)


cdef void backward_channel(const floating* dy, const floating* x, floating* dx,
                           const Plane* p, Py_ssize_t c, const floating* gamma,
                           const floating* mean, const floating* invstd,
                           floating* dgamma, floating* dbeta) noexcept nogil:
    """Both reductions, then dx, of channel c: one sweep from memory."""
    cdef Py_ssize_t off = c * p.S
    cdef double center = mean[c]
    cdef double sg = 0.0, sc = 0.0, gb, cb
    cdef Py_ssize_t b
    cdef Coef k
    for b in range(p.nblocks):
        block_grad_sums(dy + off, x + off, p, b, center, &gb, &cb)
        sg += gb
        sc += cb
    k = backward_coef(sg, sc, <double>(p.N * p.S), mean, invstd, gamma, dgamma, dbeta, c)
    for b in range(p.nblocks):
        block_grad(dy + off, x + off, dx + off, p, b, &k)


def forward_train(const floating[:, :, ::1] x, const floating[::1] gamma,
                  const floating[::1] beta, floating[:, :, ::1] y,
                  floating[::1] mean, floating[::1] invstd,
                  floating[::1] running_mean, floating[::1] running_var,
                  double eps, double factor, int num_threads):
    """Training forward on an (N, C, S) view; see fastbn.functional."""
    cdef Plane p = make_plane(x.shape[0], x.shape[1], x.shape[2])
    cdef int nt = threads_for(p.N * p.C * p.S, p.C * p.nblocks, num_threads)
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = &y[0, 0, 0]
    cdef const floating* g = cptr(gamma)
    cdef const floating* bt = cptr(beta)
    cdef floating* rm = wptr(running_mean)
    cdef floating* rv = wptr(running_var)
    cdef Py_ssize_t c, u, b, nb = p.nblocks
    cdef double* part = NULL
    cdef Coef* coef = NULL
    cdef double s, q

    if by_channel(p.C, nt):
        with nogil:
            for c in prange(p.C, num_threads=nt, schedule="static"):
                forward_channel(xp, yp, &p, c, g, bt, &mean[0], &invstd[0], rm, rv, eps, factor)
        return

    part = <double*>malloc(2 * p.C * nb * sizeof(double))
    coef = <Coef*>malloc(p.C * sizeof(Coef))
    if part == NULL or coef == NULL:
        free(part)
        free(coef)
        raise MemoryError()
    with nogil:
        for u in prange(p.C * nb, num_threads=nt, schedule="static"):
            block_shifted_sums(xp + (u // nb) * p.S, &p, u % nb, xp[(u // nb) * p.S],
                               &part[2 * u], &part[2 * u + 1])
        for c in range(p.C):
            s = 0.0
            q = 0.0
            for b in range(nb):
                s = s + part[2 * (c * nb + b)]
                q = q + part[2 * (c * nb + b) + 1]
            coef[c] = forward_coef(s, q, <double>(p.N * p.S), <double>xp[c * p.S], eps, g, bt,
                                   &mean[0], &invstd[0], rm, rv, factor, c)
        for u in prange(p.C * nb, num_threads=nt, schedule="static"):
            block_affine(xp + (u // nb) * p.S, yp + (u // nb) * p.S, &p, u % nb, &coef[u // nb])
    free(part)
    free(coef)


def inference(const floating[:, :, ::1] x, const floating[::1] gamma,
              const floating[::1] beta, const floating[::1] running_mean,
              const floating[::1] running_var, floating[:, :, ::1] y,
              double eps, int num_threads):
    """Inference forward on an (N, C, S) view; see fastbn.functional."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], c, u
    cdef int nt = threads_for(N * C * S, N * C, num_threads)
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = &y[0, 0, 0]
    cdef const floating* g = cptr(gamma)
    cdef const floating* bt = cptr(beta)
    cdef Coef* coef = <Coef*>malloc(C * sizeof(Coef))
    if coef == NULL:
        raise MemoryError()
    with nogil:
        for c in range(C):
            coef[c] = inference_coef(&running_mean[0], &running_var[0], eps, g, bt, c)
        for u in prange(N * C, num_threads=nt, schedule="static"):
            row_affine(xp + u * S, yp + u * S, S, coef[u % C].center, coef[u % C].scale,
                       coef[u % C].offset)
    free(coef)


def backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x,
             const floating[::1] gamma, const floating[::1] mean,
             const floating[::1] invstd, floating[:, :, ::1] dx,
             floating[::1] dgamma, floating[::1] dbeta, int num_threads):
    """Fused backward on (N, C, S) views; see fastbn.functional."""
    cdef Plane p = make_plane(x.shape[0], x.shape[1], x.shape[2])
    cdef int nt = threads_for(p.N * p.C * p.S, p.C * p.nblocks, num_threads)
    cdef const floating* dyp = &dy[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* dxp = &dx[0, 0, 0]
    cdef const floating* g = cptr(gamma)
    cdef Py_ssize_t c, u, b, off, nb = p.nblocks
    cdef double* part = NULL
    cdef Coef* coef = NULL
    cdef double sg, sc

    if by_channel(p.C, nt):
        with nogil:
            for c in prange(p.C, num_threads=nt, schedule="static"):
                backward_channel(dyp, xp, dxp, &p, c, g, &mean[0], &invstd[0],
                                 &dgamma[0], &dbeta[0])
        return

    part = <double*>malloc(2 * p.C * nb * sizeof(double))
    coef = <Coef*>malloc(p.C * sizeof(Coef))
    if part == NULL or coef == NULL:
        free(part)
        free(coef)
        raise MemoryError()
    with nogil:
        for u in prange(p.C * nb, num_threads=nt, schedule="static"):
            off = (u // nb) * p.S
            block_grad_sums(dyp + off, xp + off, &p, u % nb, <double>mean[u // nb],
                            &part[2 * u], &part[2 * u + 1])
        for c in range(p.C):
            sg = 0.0
            sc = 0.0
            for b in range(nb):
                sg = sg + part[2 * (c * nb + b)]
                sc = sc + part[2 * (c * nb + b) + 1]
            coef[c] = backward_coef(sg, sc, <double>(p.N * p.S), &mean[0], &invstd[0], g,
                                    &dgamma[0], &dbeta[0], c)
        for u in prange(p.C * nb, num_threads=nt, schedule="static"):
            off = (u // nb) * p.S
            block_grad(dyp + off, xp + off, dxp + off, &p, u % nb, &coef[u // nb])
    free(part)
    free(coef)
