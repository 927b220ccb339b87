"""Batch Normalization kernels over planar (N, C, S) views.

NCHW and its 3-D and 5-D relatives, viewed as (N, C, S) with S the spatial
size (S > 1; S == 1 goes to ``_columnar``). Channel c is the N x S matrix
``x[:, c, :]``: N rows of S contiguous values, ``C * S`` apart.

Summation order (fixed by the shape, never by the thread count)
----------------------------------------------------------------
A channel's m = N*S values are cut into blocks of about BLOCK values: whole
rows when S < BLOCK, pieces of one row otherwise. Each block is summed in
LANES independent double accumulators (the inner loop runs along the lanes,
which the compiler vectorizes without reassociating any sum), the lanes are
added in order, and the block sums are added in block order. So every
schedule below gives the same bits.

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
from fastbn._views cimport cptr, cptr3, wptr


cdef enum:
    LANES = 64      # accumulators per block, k = i % LANES: arrays that stay in L1
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
    """acc_s[k] += x[i] - shift, acc_q[k] += (x[i] - shift)**2 with k = i % LANES.

    The inner loop runs along the lanes (arrays in L1), the shape the loop
    vectorizer takes without reassociating any sum.
    """
    cdef Py_ssize_t i = 0, k
    cdef double d
    while i < n:
        for k in range(min(LANES, n - i)):
            d = <double>x[i + k] - shift
            acc_s[k] += d
            acc_q[k] += d * d
        i += LANES


cdef inline void row_grad_sums(const floating* dy, const floating* x, Py_ssize_t n,
                               double center, double* acc_g, double* acc_c) noexcept nogil:
    """acc_g[k] += dy[i], acc_c[k] += dy[i] * (x[i] - center) with k = i % LANES."""
    cdef Py_ssize_t i = 0, k
    cdef double g
    while i < n:
        for k in range(min(LANES, n - i)):
            g = dy[i + k]
            acc_g[k] += g
            acc_c[k] += g * (<double>x[i + k] - center)
        i += LANES


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


cdef void block_sums(const floating* a, const floating* b, const Plane* p, Py_ssize_t blk,
                     double center, double* sa, double* sb) noexcept nogil:
    """Sums over block blk of the channel whose first value a (and b) point to.

    b == NULL: shifted sums of a, sum(a - center) and sum((a - center)**2).
    Otherwise, with a = dy and b = x: sum(a) and sum(a * (b - center)).
    """
    cdef double acc_a[LANES]
    cdef double acc_b[LANES]
    cdef Py_ssize_t n0, n1, s0, s1, n, k, off
    for k in range(LANES):
        acc_a[k] = 0.0
        acc_b[k] = 0.0
    block_span(p, blk, &n0, &n1, &s0, &s1)
    for n in range(n0, n1):
        off = n * p.row_stride + s0
        if b == NULL:
            row_shifted_sums(a + off, s1 - s0, center, acc_a, acc_b)
        else:
            row_grad_sums(a + off, b + off, s1 - s0, center, acc_a, acc_b)
    sa[0] = lane_total(acc_a)
    sb[0] = lane_total(acc_b)


cdef void block_apply(const floating* a, const floating* b, floating* out, const Plane* p,
                      Py_ssize_t blk, const Coef* k) noexcept nogil:
    """Block blk of a channel: y from x (a = x, b == NULL), or dx from a = dy, b = x."""
    cdef Py_ssize_t n0, n1, s0, s1, n, off
    block_span(p, blk, &n0, &n1, &s0, &s1)
    for n in range(n0, n1):
        off = n * p.row_stride + s0
        if b == NULL:
            row_affine(a + off, out + off, s1 - s0, k.center, k.scale, k.offset)
        else:
            row_grad(a + off, b + off, out + off, s1 - s0, k.center, k.scale, k.slope,
                     k.offset)


# ---------------------------------------------------------- schedules ----
#
# a is x (b == NULL) in the forward, dy (b = x) in the backward; see block_sums.

cdef inline bint by_channel(Py_ssize_t C, int nthreads) noexcept nogil:
    """Whole channels per thread when that keeps the threads evenly loaded."""
    return nthreads == 1 or C % nthreads == 0 or C >= 4 * nthreads


cdef inline const floating* at(const floating* a, Py_ssize_t off) noexcept nogil:
    """a + off, or NULL for an absent array."""
    if a == NULL:
        return NULL
    return a + off


cdef void channel_sums(const floating* a, const floating* b, const Plane* p, Py_ssize_t c,
                       double center, double* sa, double* sb) noexcept nogil:
    """Totals of channel c: block sums added in block order."""
    cdef Py_ssize_t blk, off = c * p.S
    cdef double ta = 0.0, tb = 0.0, xa, xb
    for blk in range(p.nblocks):
        block_sums(a + off, at(b, off), p, blk, center, &xa, &xb)
        ta += xa
        tb += xb
    sa[0] = ta
    sb[0] = tb


cdef void channel_apply(const floating* a, const floating* b, floating* out, const Plane* p,
                        Py_ssize_t c, const Coef* k) noexcept nogil:
    cdef Py_ssize_t blk, off = c * p.S
    for blk in range(p.nblocks):
        block_apply(a + off, at(b, off), out + off, p, blk, k)


cdef void table_sums(const floating* a, const floating* b, const Plane* p,
                     const double* center, double* totals, double* part, int nt) noexcept nogil:
    """Totals of every channel into totals[2c], totals[2c + 1], with the
    (channel, block) pairs summed in parallel into part (2 * C * nblocks)
    and merged per channel in block order: the same sums as channel_sums."""
    cdef Py_ssize_t u, c, blk, nb = p.nblocks
    cdef double ta, tb
    for u in prange(p.C * nb, num_threads=nt, schedule="static"):
        block_sums(a + (u // nb) * p.S, at(b, (u // nb) * p.S), p, u % nb, center[u // nb],
                   &part[2 * u], &part[2 * u + 1])
    for c in range(p.C):
        ta = 0.0
        tb = 0.0
        for blk in range(nb):
            ta = ta + part[2 * (c * nb + blk)]
            tb = tb + part[2 * (c * nb + blk) + 1]
        totals[2 * c] = ta
        totals[2 * c + 1] = tb


cdef void table_apply(const floating* a, const floating* b, floating* out, const Plane* p,
                      const Coef* coef, int nt) noexcept nogil:
    cdef Py_ssize_t u, nb = p.nblocks
    for u in prange(p.C * nb, num_threads=nt, schedule="static"):
        block_apply(a + (u // nb) * p.S, at(b, (u // nb) * p.S), out + (u // nb) * p.S, p,
                    u % nb, &coef[u // nb])


cdef void forward_channel(const floating* x, floating* y, const Plane* p, Py_ssize_t c,
                          const floating* gamma, const floating* beta,
                          floating* mean, floating* invstd,
                          floating* running_mean, floating* running_var,
                          double eps, double factor) noexcept nogil:
    """Statistics, then normalization, of channel c: one sweep from memory."""
    cdef double shift = x[c * p.S]
    cdef double s, q
    cdef Coef k
    channel_sums(x, NULL, p, c, shift, &s, &q)
    k = forward_coef(s, q, <double>(p.N * p.S), shift, eps, gamma, beta, mean, invstd,
                     running_mean, running_var, factor, c)
    channel_apply(x, NULL, y, p, c, &k)


cdef void backward_channel(const floating* dy, const floating* x, floating* dx,
                           const Plane* p, Py_ssize_t c, const floating* gamma,
                           const floating* mean, const floating* invstd,
                           floating* dgamma, floating* dbeta) noexcept nogil:
    """Both reductions, then dx, of channel c: one sweep from memory."""
    cdef double sg, sc
    cdef Coef k
    channel_sums(dy, x, p, c, mean[c], &sg, &sc)
    k = backward_coef(sg, sc, <double>(p.N * p.S), mean, invstd, gamma, dgamma, dbeta, c)
    channel_apply(dy, x, dx, p, c, &k)


cdef class Work:
    """O(C) work space of a split schedule: centers, totals, the (channel,
    block) table and the per-channel maps. Freed with the object."""
    cdef double* center
    cdef double* totals
    cdef double* part
    cdef Coef* coef

    def __cinit__(self, Py_ssize_t C, Py_ssize_t nblocks):
        self.center = <double*>malloc(C * sizeof(double))
        self.totals = <double*>malloc(2 * C * sizeof(double))
        self.part = <double*>malloc(2 * C * nblocks * sizeof(double))
        self.coef = <Coef*>malloc(C * sizeof(Coef))
        if not (self.center and self.totals and self.part and self.coef):
            raise MemoryError()

    def __dealloc__(self):
        free(self.center)
        free(self.totals)
        free(self.part)
        free(self.coef)


# ----------------------------------------------------------- wrappers ----

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
    cdef Py_ssize_t c
    cdef Work w
    if by_channel(p.C, nt):
        with nogil:
            for c in prange(p.C, num_threads=nt, schedule="static"):
                forward_channel(xp, yp, &p, c, g, bt, &mean[0], &invstd[0], rm, rv, eps, factor)
        return
    w = Work(p.C, p.nblocks)
    with nogil:
        for c in range(p.C):
            w.center[c] = xp[c * p.S]
        table_sums(xp, NULL, &p, w.center, w.totals, w.part, nt)
        for c in range(p.C):
            w.coef[c] = forward_coef(w.totals[2 * c], w.totals[2 * c + 1], <double>(p.N * p.S),
                                     w.center[c], eps, g, bt, &mean[0], &invstd[0], rm, rv,
                                     factor, c)
        table_apply(xp, NULL, yp, &p, w.coef, nt)


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
    cdef Work w = Work(C, 0)
    with nogil:
        for c in range(C):
            w.coef[c] = inference_coef(&running_mean[0], &running_var[0], eps, g, bt, c)
        for u in prange(N * C, num_threads=nt, schedule="static"):
            row_affine(xp + u * S, yp + u * S, S, w.coef[u % C].center, w.coef[u % C].scale,
                       w.coef[u % C].offset)


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
    cdef Py_ssize_t c
    cdef Work w
    if by_channel(p.C, nt):
        with nogil:
            for c in prange(p.C, num_threads=nt, schedule="static"):
                backward_channel(dyp, xp, dxp, &p, c, g, &mean[0], &invstd[0],
                                 &dgamma[0], &dbeta[0])
        return
    w = Work(p.C, p.nblocks)
    with nogil:
        for c in range(p.C):
            w.center[c] = mean[c]
        table_sums(dyp, xp, &p, w.center, w.totals, w.part, nt)
        for c in range(p.C):
            w.coef[c] = backward_coef(w.totals[2 * c], w.totals[2 * c + 1], <double>(p.N * p.S),
                                      &mean[0], &invstd[0], g, &dgamma[0], &dbeta[0], c)
        table_apply(dyp, xp, dxp, &p, w.coef, nt)


def sums(const floating[:, :, ::1] a, const floating[:, :, ::1] b, const double[::1] center,
         double[:, ::1] out, int num_threads):
    """Per-channel sums of an (N, C, S) view into out (C, 2), in double.

    b None: ``sum(a - center)`` and ``sum((a - center)**2)``; otherwise
    ``sum(a)`` and ``sum(a * (b - center))`` (a = dy, b = x). The first
    half of each pass, for a reduction across processes in between.
    """
    cdef Plane p = make_plane(a.shape[0], a.shape[1], a.shape[2])
    cdef int nt = threads_for(p.N * p.C * p.S, p.C * p.nblocks, num_threads)
    cdef const floating* ap = &a[0, 0, 0]
    cdef const floating* bp = cptr3(b)
    cdef Py_ssize_t c
    cdef Work w
    if by_channel(p.C, nt):
        with nogil:
            for c in prange(p.C, num_threads=nt, schedule="static"):
                channel_sums(ap, bp, &p, c, center[c], &out[c, 0], &out[c, 1])
        return
    w = Work(p.C, p.nblocks)
    with nogil:
        table_sums(ap, bp, &p, &center[0], &out[0, 0], w.part, nt)


def apply(const floating[:, :, ::1] a, const floating[:, :, ::1] b, floating[:, :, ::1] out,
          const double[:, ::1] coef, int num_threads):
    """The second half of each pass on an (N, C, S) view, with the per-channel
    map coef (C, 4) = (center, scale, slope, offset), see fastbn._stats.Coef:
    b None: out = (a - center) * scale + offset; otherwise
    out = scale * a - slope * (b - center) - offset (a = dy, b = x)."""
    cdef Plane p = make_plane(a.shape[0], a.shape[1], a.shape[2])
    cdef int nt = threads_for(p.N * p.C * p.S, p.C * p.nblocks, num_threads)
    cdef const floating* bp = cptr3(b)
    with nogil:
        table_apply(&a[0, 0, 0], bp, &out[0, 0, 0], &p, <const Coef*>&coef[0, 0], nt)
