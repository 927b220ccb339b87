"""Batch Normalization kernels over columnar (M, C) views.

(N, D) inputs, channels-last inputs (N, ..., C) viewed as (M, C), and NCHW
inputs whose spatial size is 1. Row r holds one value of every channel, C
contiguous values; channel c is column c.

Summation order (fixed by the shape, never by the thread count)
----------------------------------------------------------------
The M rows are cut into at most MAX_ROW_BLOCKS blocks of whole rows. A
block's per-column sums are taken row after row in double (the loop runs
along the row, so the compiler vectorizes across columns with no
reassociation), and the block sums are added in block order.

Schedules
---------
- by tile, when a tile of columns over all M rows stays in cache and there
  are tiles enough for the threads: one thread takes a tile, sums its row
  blocks, then normalizes (or writes dx for) the tile while it is still
  cached: one sweep from memory.
- by row block, otherwise (few wide columns, many rows): every row block's
  per-column sums in parallel into a table of MAX_ROW_BLOCKS x C, a serial
  merge in block order, then every row block normalized in parallel.

Work space: O(C) doubles (O(MAX_ROW_BLOCKS * C) in the second schedule),
allocated by the ``def`` wrappers; nothing here raises but MemoryError.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free

from fastbn._openmp cimport threads_for
from fastbn._stats cimport Coef, forward_coef, inference_coef, backward_coef
from fastbn._views cimport cptr, cptr2, wptr


cdef enum:
    MIN_BLOCK_ROWS = 64
    MAX_ROW_BLOCKS = 64
    TILE_ALIGN = 16           # a tile's width is a multiple of this many columns
    TILE_BYTES = 512 * 1024   # target size of one tile of x (y or dx adds as much)
    PAGE_BYTES = 4096


cdef struct Grid:
    Py_ssize_t M, C
    Py_ssize_t rows_per_block, nblocks
    Py_ssize_t tile, ntiles       # columns per tile, tiles


# Work space: NWORK vectors of C doubles, by column (tiles never share one).
cdef enum:
    W_CENTER = 0    # the shift (forward) or the saved mean (backward)
    W_TOTAL_A = 1   # running totals over row blocks
    W_TOTAL_B = 2
    W_PART_A = 3    # one row block's sums
    W_PART_B = 4
    W_SCALE = 5     # the per-column map, see fastbn._stats.Coef
    W_SLOPE = 6
    W_OFFSET = 7
    W_MEAN = 8      # forward: the batch mean (the map's center)
    NWORK = 9


cdef inline Grid make_grid(Py_ssize_t M, Py_ssize_t C, Py_ssize_t bytes_per_row_value) noexcept nogil:
    """bytes_per_row_value: bytes read per value (itemsize, or twice it for dy and x)."""
    cdef Grid g
    g.M = M
    g.C = C
    g.nblocks = min(MAX_ROW_BLOCKS, max(1, M // MIN_BLOCK_ROWS))
    g.rows_per_block = (M + g.nblocks - 1) // g.nblocks
    g.nblocks = (M + g.rows_per_block - 1) // g.rows_per_block
    g.tile = TILE_BYTES // (M * bytes_per_row_value) // TILE_ALIGN * TILE_ALIGN
    g.tile = min(C, max(<Py_ssize_t>TILE_ALIGN, g.tile))
    g.ntiles = (C + g.tile - 1) // g.tile
    return g


cdef inline bint by_tile(const Grid* g, Py_ssize_t bytes_per_row_value, int nthreads) noexcept nogil:
    """Tiles when a tile stays in cache, its pieces of a row are at least a
    page long (shorter pieces, one per page, defeat the hardware prefetcher)
    or cover whole rows, and the tiles balance over the threads."""
    if g.M * g.tile * bytes_per_row_value > 2 * TILE_BYTES:
        return False
    if g.tile < g.C and g.tile * bytes_per_row_value < PAGE_BYTES:
        return False
    return nthreads == 1 or g.ntiles % nthreads == 0 or g.ntiles >= 4 * nthreads


# ---------------------------------------------------------------- rows ----

cdef inline void row_shifted_sums(const floating* x, Py_ssize_t c0, Py_ssize_t c1,
                                  const double* shift, double* s, double* q) noexcept nogil:
    cdef Py_ssize_t c
    cdef double d
    for c in range(c0, c1):
        d = <double>x[c] - shift[c]
        s[c] += d
        q[c] += d * d


cdef inline void row_grad_sums(const floating* dy, const floating* x, Py_ssize_t c0,
                               Py_ssize_t c1, const double* center,
                               double* sg, double* sc) noexcept nogil:
    cdef Py_ssize_t c
    cdef double g
    for c in range(c0, c1):
        g = dy[c]
        sg[c] += g
        sc[c] += g * (<double>x[c] - center[c])


cdef inline void row_affine(const floating* x, floating* y, Py_ssize_t c0, Py_ssize_t c1,
                            const double* center, const double* scale,
                            const double* offset) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(c0, c1):
        y[c] = <floating>((<double>x[c] - center[c]) * scale[c] + offset[c])


cdef inline void row_grad(const floating* dy, const floating* x, floating* dx, Py_ssize_t c0,
                          Py_ssize_t c1, const double* center, const double* scale,
                          const double* slope, const double* offset) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(c0, c1):
        dx[c] = <floating>(scale[c] * <double>dy[c] - slope[c] * (<double>x[c] - center[c])
                           - offset[c])


# -------------------------------------------------------------- blocks ----

cdef void block_sums(const floating* a, const floating* b, const Grid* g, Py_ssize_t blk,
                     Py_ssize_t c0, Py_ssize_t c1, const double* center,
                     double* sa, double* sb) noexcept nogil:
    """Columns [c0, c1) of row block blk: shifted sums of a (b == NULL), or
    sum(a) and sum(a * (b - center)) with a = dy, b = x."""
    cdef Py_ssize_t r, c
    cdef Py_ssize_t r0 = blk * g.rows_per_block
    cdef Py_ssize_t r1 = min(g.M, r0 + g.rows_per_block)
    for c in range(c0, c1):
        sa[c] = 0.0
        sb[c] = 0.0
    if b == NULL:
        for r in range(r0, r1):
            row_shifted_sums(a + r * g.C, c0, c1, center, sa, sb)
    else:
        for r in range(r0, r1):
            row_grad_sums(a + r * g.C, b + r * g.C, c0, c1, center, sa, sb)


cdef void block_apply(const floating* dy, const floating* x, floating* out, const Grid* g,
                      Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                      const double* w) noexcept nogil:
    """Rows [r0, r1), columns [c0, c1): y from x (dy == NULL), or dx from dy, x."""
    cdef Py_ssize_t r
    cdef const double* center = w + W_CENTER * g.C
    if dy == NULL:
        for r in range(r0, r1):
            row_affine(x + r * g.C, out + r * g.C, c0, c1, w + W_MEAN * g.C,
                       w + W_SCALE * g.C, w + W_OFFSET * g.C)
    else:
        for r in range(r0, r1):
            row_grad(dy + r * g.C, x + r * g.C, out + r * g.C, c0, c1, center,
                     w + W_SCALE * g.C, w + W_SLOPE * g.C, w + W_OFFSET * g.C)


cdef inline void add_into(double* total, const double* part, Py_ssize_t c0,
                          Py_ssize_t c1) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(c0, c1):
        total[c] += part[c]


cdef inline void store_coef(double* w, Py_ssize_t C, Py_ssize_t c, Coef k) noexcept nogil:
    w[W_MEAN * C + c] = k.center
    w[W_SCALE * C + c] = k.scale
    w[W_SLOPE * C + c] = k.slope
    w[W_OFFSET * C + c] = k.offset


cdef void tile_totals(const floating* a, const floating* b, const Grid* g,
                      Py_ssize_t c0, Py_ssize_t c1, double* w) noexcept nogil:
    """Totals over all row blocks, in block order, for columns [c0, c1)."""
    cdef Py_ssize_t C = g.C, c, blk
    for c in range(c0, c1):
        w[W_TOTAL_A * C + c] = 0.0
        w[W_TOTAL_B * C + c] = 0.0
    for blk in range(g.nblocks):
        block_sums(a, b, g, blk, c0, c1, w + W_CENTER * C, w + W_PART_A * C, w + W_PART_B * C)
        add_into(w + W_TOTAL_A * C, w + W_PART_A * C, c0, c1)
        add_into(w + W_TOTAL_B * C, w + W_PART_B * C, c0, c1)


cdef void merge_parts(const double* part, const Grid* g, double* w) noexcept nogil:
    """Totals from the per-row-block table, in block order (same sums as tile_totals)."""
    cdef Py_ssize_t C = g.C, c, blk
    for c in range(C):
        w[W_TOTAL_A * C + c] = 0.0
        w[W_TOTAL_B * C + c] = 0.0
    for blk in range(g.nblocks):
        add_into(w + W_TOTAL_A * C, part + 2 * blk * C, 0, C)
        add_into(w + W_TOTAL_B * C, part + (2 * blk + 1) * C, 0, C)


# ------------------------------------------------------------ wrappers ----

cdef double* alloc_work(const Grid* g, bint with_table) except NULL:
    cdef Py_ssize_t n = NWORK * g.C + (2 * g.nblocks * g.C if with_table else 0)
    cdef double* w = <double*>malloc(n * sizeof(double))
    if w == NULL:
        raise MemoryError()
    return w


def forward_train(const floating[:, ::1] x, const floating[::1] gamma,
                  const floating[::1] beta, floating[:, ::1] y,
                  floating[::1] mean, floating[::1] invstd,
                  floating[::1] running_mean, floating[::1] running_var,
                  double eps, double factor, int num_threads):
    """Training forward on an (M, C) view; see fastbn.functional."""
    cdef Grid g = make_grid(x.shape[0], x.shape[1], sizeof(floating))
    cdef int nt = threads_for(g.M * g.C, max(g.ntiles, g.nblocks), num_threads)
    cdef bint tiles = by_tile(&g, sizeof(floating), nt)
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &y[0, 0]
    cdef const floating* gp = cptr(gamma)
    cdef const floating* bp = cptr(beta)
    cdef floating* rm = wptr(running_mean)
    cdef floating* rv = wptr(running_var)
    cdef double* w = alloc_work(&g, not tiles)
    cdef double* part = w + NWORK * g.C
    cdef double m = <double>g.M
    cdef Py_ssize_t t, c, c0, c1, blk, C = g.C
    with nogil:
        for c in range(C):
            w[W_CENTER * C + c] = xp[c]
        if tiles:
            for t in prange(g.ntiles, num_threads=nt, schedule="static"):
                c0 = t * g.tile
                c1 = min(C, c0 + g.tile)
                tile_totals(xp, NULL, &g, c0, c1, w)
                for c in range(c0, c1):
                    store_coef(w, C, c, forward_coef(
                        w[W_TOTAL_A * C + c], w[W_TOTAL_B * C + c], m, w[W_CENTER * C + c],
                        eps, gp, bp, &mean[0], &invstd[0], rm, rv, factor, c))
                block_apply(NULL, xp, yp, &g, 0, g.M, c0, c1, w)
        else:
            for blk in prange(g.nblocks, num_threads=nt, schedule="static"):
                block_sums(xp, NULL, &g, blk, 0, C, w + W_CENTER * C,
                           part + 2 * blk * C, part + (2 * blk + 1) * C)
            merge_parts(part, &g, w)
            for c in range(C):
                store_coef(w, C, c, forward_coef(
                    w[W_TOTAL_A * C + c], w[W_TOTAL_B * C + c], m, w[W_CENTER * C + c],
                    eps, gp, bp, &mean[0], &invstd[0], rm, rv, factor, c))
            for blk in prange(g.nblocks, num_threads=nt, schedule="static"):
                block_apply(NULL, xp, yp, &g, blk * g.rows_per_block,
                            min(g.M, (blk + 1) * g.rows_per_block), 0, C, w)
    free(w)


def inference(const floating[:, ::1] x, const floating[::1] gamma,
              const floating[::1] beta, const floating[::1] running_mean,
              const floating[::1] running_var, floating[:, ::1] y,
              double eps, int num_threads):
    """Inference forward on an (M, C) view; see fastbn.functional."""
    cdef Grid g = make_grid(x.shape[0], x.shape[1], sizeof(floating))
    cdef int nt = threads_for(g.M * g.C, g.nblocks, num_threads)
    cdef const floating* xp = &x[0, 0]
    cdef floating* yp = &y[0, 0]
    cdef const floating* gp = cptr(gamma)
    cdef const floating* bp = cptr(beta)
    cdef double* w = alloc_work(&g, False)
    cdef Py_ssize_t c, blk
    with nogil:
        for c in range(g.C):
            store_coef(w, g.C, c, inference_coef(&running_mean[0], &running_var[0], eps,
                                                  gp, bp, c))
        for blk in prange(g.nblocks, num_threads=nt, schedule="static"):
            block_apply(NULL, xp, yp, &g, blk * g.rows_per_block,
                        min(g.M, (blk + 1) * g.rows_per_block), 0, g.C, w)
    free(w)


def backward(const floating[:, ::1] dy, const floating[:, ::1] x,
             const floating[::1] gamma, const floating[::1] mean,
             const floating[::1] invstd, floating[:, ::1] dx,
             floating[::1] dgamma, floating[::1] dbeta, int num_threads):
    """Fused backward on (M, C) views; see fastbn.functional."""
    cdef Grid g = make_grid(x.shape[0], x.shape[1], 2 * sizeof(floating))
    cdef int nt = threads_for(g.M * g.C, max(g.ntiles, g.nblocks), num_threads)
    cdef bint tiles = by_tile(&g, 2 * sizeof(floating), nt)
    cdef const floating* dyp = &dy[0, 0]
    cdef const floating* xp = &x[0, 0]
    cdef floating* dxp = &dx[0, 0]
    cdef const floating* gp = cptr(gamma)
    cdef double* w = alloc_work(&g, not tiles)
    cdef double* part = w + NWORK * g.C
    cdef double m = <double>g.M
    cdef Py_ssize_t t, c, c0, c1, blk, C = g.C
    with nogil:
        for c in range(C):
            w[W_CENTER * C + c] = mean[c]
        if tiles:
            for t in prange(g.ntiles, num_threads=nt, schedule="static"):
                c0 = t * g.tile
                c1 = min(C, c0 + g.tile)
                tile_totals(dyp, xp, &g, c0, c1, w)
                for c in range(c0, c1):
                    store_coef(w, C, c, backward_coef(
                        w[W_TOTAL_A * C + c], w[W_TOTAL_B * C + c], m, &mean[0], &invstd[0],
                        gp, &dgamma[0], &dbeta[0], c))
                block_apply(dyp, xp, dxp, &g, 0, g.M, c0, c1, w)
        else:
            for blk in prange(g.nblocks, num_threads=nt, schedule="static"):
                block_sums(dyp, xp, &g, blk, 0, C, w + W_CENTER * C,
                           part + 2 * blk * C, part + (2 * blk + 1) * C)
            merge_parts(part, &g, w)
            for c in range(C):
                store_coef(w, C, c, backward_coef(
                    w[W_TOTAL_A * C + c], w[W_TOTAL_B * C + c], m, &mean[0], &invstd[0],
                    gp, &dgamma[0], &dbeta[0], c))
            for blk in prange(g.nblocks, num_threads=nt, schedule="static"):
                block_apply(dyp, xp, dxp, &g, blk * g.rows_per_block,
                            min(g.M, (blk + 1) * g.rows_per_block), 0, C, w)
    free(w)


def sums(const floating[:, ::1] a, const floating[:, ::1] b, const double[::1] center,
         double[:, ::1] out, int num_threads):
    """Per-column sums of an (M, C) view into out (C, 2), in double.

    b None: ``sum(a - center)`` and ``sum((a - center)**2)``; otherwise
    ``sum(a)`` and ``sum(a * (b - center))`` (a = dy, b = x). The first
    half of each pass, for a reduction across processes in between.
    """
    cdef Py_ssize_t value_bytes = sizeof(floating) if b is None else 2 * sizeof(floating)
    cdef Grid g = make_grid(a.shape[0], a.shape[1], value_bytes)
    cdef int nt = threads_for(g.M * g.C, max(g.ntiles, g.nblocks), num_threads)
    cdef bint tiles = by_tile(&g, value_bytes, nt)
    cdef const floating* ap = &a[0, 0]
    cdef const floating* bp = cptr2(b)
    cdef double* w = alloc_work(&g, not tiles)
    cdef double* part = w + NWORK * g.C
    cdef Py_ssize_t t, c, blk, C = g.C
    with nogil:
        for c in range(C):
            w[W_CENTER * C + c] = center[c]
        if tiles:
            for t in prange(g.ntiles, num_threads=nt, schedule="static"):
                tile_totals(ap, bp, &g, t * g.tile, min(C, (t + 1) * g.tile), w)
        else:
            for blk in prange(g.nblocks, num_threads=nt, schedule="static"):
                block_sums(ap, bp, &g, blk, 0, C, w + W_CENTER * C,
                           part + 2 * blk * C, part + (2 * blk + 1) * C)
            merge_parts(part, &g, w)
        for c in range(C):
            out[c, 0] = w[W_TOTAL_A * C + c]
            out[c, 1] = w[W_TOTAL_B * C + c]
    free(w)


def apply(const floating[:, ::1] a, const floating[:, ::1] b, floating[:, ::1] out,
          const double[:, ::1] coef, int num_threads):
    """The second half of each pass on an (M, C) view, with the per-column
    map coef (C, 4) = (center, scale, slope, offset), see fastbn._stats.Coef:
    b None: out = (a - center) * scale + offset; otherwise
    out = scale * a - slope * (b - center) - offset (a = dy, b = x)."""
    cdef Grid g = make_grid(a.shape[0], a.shape[1], sizeof(floating))
    cdef int nt = threads_for(g.M * g.C, g.nblocks, num_threads)
    cdef const floating* ap = &a[0, 0]
    cdef const floating* bp = cptr2(b)
    cdef double* w = alloc_work(&g, False)
    cdef Py_ssize_t c, blk, C = g.C
    with nogil:
        for c in range(C):
            w[W_CENTER * C + c] = coef[c, 0]
            w[W_MEAN * C + c] = coef[c, 0]
            w[W_SCALE * C + c] = coef[c, 1]
            w[W_SLOPE * C + c] = coef[c, 2]
            w[W_OFFSET * C + c] = coef[c, 3]
        for blk in prange(g.nblocks, num_threads=nt, schedule="static"):
            if bp == NULL:
                block_apply(NULL, ap, &out[0, 0], &g, blk * g.rows_per_block,
                            min(g.M, (blk + 1) * g.rows_per_block), 0, C, w)
            else:
                block_apply(ap, bp, &out[0, 0], &g, blk * g.rows_per_block,
                            min(g.M, (blk + 1) * g.rows_per_block), 0, C, w)
    free(w)
