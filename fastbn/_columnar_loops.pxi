# The loops of the columnar kernels (included by fastbn/_columnar.pyx, whose
# cimports, Grid and Maps they use): rows of columns, blocks of rows. The
# schedules, which hand these out to the threads, and the entry stay in
# _columnar.pyx.

# ---------------------------------------------------------------- rows ----

cdef inline void row_map_values(const Body* body, const storage* a, const storage* b,
                                storage* out, Py_ssize_t n, const real* hi, const real* lo,
                                const real* s, const real* q, const real* o, int kind, real neg,
                                const double* zc, const double* zs, const double* zo,
                                double sl, double inv) noexcept nogil:
    """out[c] = value(body, ...) for n columns of one row (fastbn._body),
    every pointer at the first column: the one loop of every columnar
    apply; one specialization per body."""
    cdef Py_ssize_t c
    for c in range(n):
        put(out, c, value(body, a, b, c, hi[c], lo[c], s[c], q[c], o[c], kind, neg,
                          zc[c], zs[c], zo[c], sl, inv))


cdef inline void row_map_blocks(const Body* body, const storage* a, const storage* b,
                                storage* out, Py_ssize_t n, const float* hi, const float* lo,
                                const float* s, const float* q, const float* o, int kind,
                                float neg, const double* zc, const double* zs,
                                const double* zo, double sl, double inv) noexcept nogil:
    """row_map_values of 16-bit data in float, HALF_BLOCK columns at a time:
    widened into float buffers, applied as float32 data is, narrowed into
    out (the same bits as one value at a time, in vector conversions)."""
    cdef float wa[HALF_BLOCK]
    cdef float wb[HALF_BLOCK]
    cdef float wo[HALF_BLOCK]
    cdef Py_ssize_t j = 0, m
    while j < n:
        m = min(<Py_ssize_t>HALF_BLOCK, n - j)
        widen(a + j, wa, m)
        if not (Body is BodyY or Body is BodyYAct):  # the bodies that read b
            widen(b + j, wb, m)
        row_map_values(body, <const float*>wa, <const float*>wb, wo, m, hi + j, lo + j, s + j,
                       q + j, o + j, kind, neg, zc + j, zs + j, zo + j, sl, inv)
        narrow(wo, out + j, m)
        j += m


cdef inline void row_map_in(const Body* body, const storage* a, const storage* b,
                            storage* out, Py_ssize_t c0, Py_ssize_t c1, const real* hi,
                            const real* lo, const real* s, const real* q, const real* o, int kind,
                            real neg, const Maps* k, const Grad* t) noexcept nogil:
    """out[c - c0] = value(body, ...) for columns [c0, c1) of one row (a, b
    point at column 0); 16-bit data in float through float blocks."""
    if (storage is half or storage is bfloat) and real is float:
        row_map_blocks(body, a + c0, at(b, c0), out, c1 - c0, hi + c0, lo + c0, s + c0, q + c0,
                       o + c0, kind, neg, k.grad_center + c0, k.grad_scale + c0,
                       k.grad_offset + c0, t.slope, t.inv_slope)
    else:
        row_map_values(body, a + c0, at(b, c0), out, c1 - c0, hi + c0, lo + c0, s + c0, q + c0,
                       o + c0, kind, neg, k.grad_center + c0, k.grad_scale + c0,
                       k.grad_offset + c0, t.slope, t.inv_slope)


cdef inline void row_map(const Body* body, const storage* a, const storage* b,
                         storage* out, Py_ssize_t c0, Py_ssize_t c1, const Maps* k,
                         bint in_float, const Grid* g) noexcept nogil:
    """out[c - c0] for columns [c0, c1) of one row (a, b point at column 0),
    of the body (fastbn._body): y from a = x, or dx from a = dy, b = x (or
    y), of (a, b) as they are or of the inputs g.grad turns them into.
    float32 with in_float computes in float (Coef32), else in double."""
    if storage is not double and in_float:
        row_map_in(body, a, b, out, c0, c1, k.hi, k.lo, k.scale32, k.slope32, k.offset32,
                   g.act.kind, g.act.slope32, k, &g.grad)
    else:
        row_map_in(body, a, b, out, c0, c1, k.center, k.zero, k.scale, k.slope, k.offset,
                   g.act.kind, g.act.slope, k, &g.grad)


# -------------------------------------------------------------- blocks ----

cdef inline void rows_sums_values(const Body* body, const storage* a, const storage* b,
                                  Py_ssize_t stride, Py_ssize_t nrows, Py_ssize_t n,
                                  const double* center, const double* zc, const double* zs,
                                  const double* zo, double slope, double inv, double* sa,
                                  double* sb) noexcept nogil:
    """Add the two sums of nrows rows (stride apart) of n columns into sa[c],
    sb[c], their terms those of fastbn._body.terms for the body (one
    specialization each): four rows at a time, ``s += (t0 + t1) + (t2 + t3)``,
    then one at a time."""
    cdef Py_ssize_t r = 0, c
    cdef const storage* a0
    cdef const storage* a1
    cdef const storage* a2
    cdef const storage* a3
    cdef const storage* b0 = NULL
    cdef const storage* b1 = NULL
    cdef const storage* b2 = NULL
    cdef const storage* b3 = NULL
    cdef double u0, u1, u2, u3, v0, v1, v2, v3
    while r + 4 <= nrows:
        a0 = a + r * stride
        a1 = a0 + stride
        a2 = a1 + stride
        a3 = a2 + stride
        if not (Body is BodyY or Body is BodyYAct):  # the bodies that read b
            b0 = b + r * stride
            b1 = b0 + stride
            b2 = b1 + stride
            b3 = b2 + stride
        for c in range(n):
            terms(body, a0, b0, c, center[c], zc[c], zs[c], zo[c], slope, inv, &u0, &v0)
            terms(body, a1, b1, c, center[c], zc[c], zs[c], zo[c], slope, inv, &u1, &v1)
            terms(body, a2, b2, c, center[c], zc[c], zs[c], zo[c], slope, inv, &u2, &v2)
            terms(body, a3, b3, c, center[c], zc[c], zs[c], zo[c], slope, inv, &u3, &v3)
            sa[c] += (u0 + u1) + (u2 + u3)
            sb[c] += (v0 + v1) + (v2 + v3)
        r += 4
    while r < nrows:
        a0 = a + r * stride
        if not (Body is BodyY or Body is BodyYAct):
            b0 = b + r * stride
        for c in range(n):
            terms(body, a0, b0, c, center[c], zc[c], zs[c], zo[c], slope, inv, &u0, &v0)
            sa[c] += u0
            sb[c] += v0
        r += 1


cdef inline void rows_sums_blocks(const Body* body, const storage* a, const storage* b,
                                  Py_ssize_t stride, Py_ssize_t nrows, Py_ssize_t n,
                                  const double* center, const double* zc, const double* zs,
                                  const double* zo, double slope, double inv, double* sa,
                                  double* sb) noexcept nogil:
    """rows_sums_values of 16-bit data: each step's rows (four, then one at
    a time) widened HALF_BLOCK columns at a time into float buffers (whole
    contiguous rows of at most HALF_BLOCK columns: all of a step's rows in
    one conversion); every column adds the same terms in the same order."""
    cdef float w[8 * HALF_BLOCK]             # four rows of a, then four of b
    cdef bint whole = stride == n and n <= HALF_BLOCK
    cdef Py_ssize_t bs = n if whole else HALF_BLOCK     # the buffers' row stride
    cdef Py_ssize_t r = 0, j, m, i, nr
    while r < nrows:
        nr = 4 if r + 4 <= nrows else 1
        j = 0
        while j < n:
            m = min(<Py_ssize_t>HALF_BLOCK, n - j)
            if whole:
                widen(a + r * stride, w, nr * n)
                if not (Body is BodyY or Body is BodyYAct):  # the bodies that read b
                    widen(b + r * stride, w + 4 * HALF_BLOCK, nr * n)
            else:
                for i in range(nr):
                    widen(a + (r + i) * stride + j, w + i * bs, m)
                    if not (Body is BodyY or Body is BodyYAct):
                        widen(b + (r + i) * stride + j, w + 4 * HALF_BLOCK + i * bs, m)
            rows_sums_values(body, <const float*>w, <const float*>(w + 4 * HALF_BLOCK), bs, nr,
                             m, center + j, zc + j, zs + j, zo + j, slope, inv, sa + j, sb + j)
            j += m
        r += nr


cdef inline void rows_sums_of(const Body* body, const storage* a, const storage* b,
                              Py_ssize_t stride, Py_ssize_t nrows, Py_ssize_t n,
                              const double* center, const double* zc, const double* zs,
                              const double* zo, double slope, double inv, double* sa,
                              double* sb) noexcept nogil:
    """rows_sums_values, PIECE_COLUMNS columns at a time across all nrows
    rows (each column's terms in the same order as across whole rows: the
    same bits), so that the pieces' sums and centers stay in the L1 cache
    from row to row; 16-bit data through float blocks."""
    cdef Py_ssize_t j = 0, m
    while j < n:
        m = min(<Py_ssize_t>PIECE_COLUMNS, n - j)
        if storage is half or storage is bfloat:
            rows_sums_blocks(body, a + j, at(b, j), stride, nrows, m, center + j, zc + j,
                             zs + j, zo + j, slope, inv, sa + j, sb + j)
        else:
            rows_sums_values(body, a + j, at(b, j), stride, nrows, m, center + j, zc + j,
                             zs + j, zo + j, slope, inv, sa + j, sb + j)
        j += m


cdef void block_sums(const storage* a, const storage* b, const Grid* g, Py_ssize_t blk,
                     Py_ssize_t c0, Py_ssize_t c1, const double* center, const Maps* k,
                     double* sa, double* sb) noexcept nogil:
    """Columns [c0, c1) of row block blk into sa[c], sb[c]: shifted sums of a
    (b NULL), or sum(a) and sum(a * (b - center)) with a = dy, b = x, of the
    inputs g.grad turns them into."""
    cdef Py_ssize_t c
    for c in range(c0, c1):
        sa[c] = 0.0
        sb[c] = 0.0
    add_block_sums(a, b, g, blk, c0, c1, center, k, sa, sb)


cdef void add_block_sums(const storage* a, const storage* b, const Grid* g, Py_ssize_t blk,
                         Py_ssize_t c0, Py_ssize_t c1, const double* center, const Maps* k,
                         double* sa, double* sb) noexcept nogil:
    """block_sums added into sa[c], sb[c] as they are: the block's rows four
    at a time, then one at a time (rows_sums_of)."""
    cdef Py_ssize_t S = g.stride
    cdef Py_ssize_t r0 = blk * g.rows_per_block
    cdef Py_ssize_t r1 = min(g.M, r0 + g.rows_per_block)
    cdef const double* zc = k.grad_center + c0
    cdef const double* zs = k.grad_scale + c0
    cdef const double* zo = k.grad_offset + c0
    cdef const Grad* t = &g.grad
    cdef const storage* ap = a + r0 * S + c0
    cdef const storage* bp = at(b, r0 * S + c0)
    cdef Py_ssize_t n = c1 - c0, nr = r1 - r0
    # one loop per body, the body a constant in each
    if g.sums_body == BODY_Y:
        rows_sums_of(<BodyY*>NULL, ap, bp, S, nr, n, center + c0, zc, zs, zo,
                     0.0, 0.0, sa + c0, sb + c0)
    elif g.sums_body == BODY_DX:
        rows_sums_of(<BodyDX*>NULL, ap, bp, S, nr, n, center + c0, zc, zs, zo,
                     0.0, 0.0, sa + c0, sb + c0)
    elif g.sums_body == BODY_DX_OUT:
        rows_sums_of(<BodyDXOut*>NULL, ap, bp, S, nr, n, center + c0, zc, zs, zo,
                     t.slope, t.inv_slope, sa + c0, sb + c0)
    elif g.sums_body == BODY_DX_RELU:
        rows_sums_of(<BodyDXRelu*>NULL, ap, bp, S, nr, n, center + c0, zc, zs, zo,
                     t.slope, t.inv_slope, sa + c0, sb + c0)
    else:
        rows_sums_of(<BodyDXAct*>NULL, ap, bp, S, nr, n, center + c0, zc, zs, zo,
                     t.slope, t.inv_slope, sa + c0, sb + c0)


cdef inline void row_apply(const Body* body, const storage* a, const storage* b,
                           storage* out, Py_ssize_t c0, Py_ssize_t c1, const Maps* k,
                           int mode, const Grid* g) noexcept nogil:
    """row_map over columns [c0, c1): mode 1 all in float, 0 all in double,
    -1 each column in float where its map allows (k.ok[c]) and in double
    otherwise: a column's bits never depend on another column's map."""
    cdef Py_ssize_t c, e
    if mode >= 0:
        row_map(body, a, b, out, c0, c1, k, mode == 1, g)
        return
    c = c0
    while c < c1:
        e = c + 1
        while e < c1 and k.ok[e] == k.ok[c]:
            e += 1
        row_map(body, a, b, out + (c - c0), c, e, k, k.ok[c], g)
        c = e


cdef inline void rows_map_blocks(const Body* body, const storage* a, const storage* b,
                                 storage* out, Py_ssize_t r0, Py_ssize_t r1, const Maps* k,
                                 const Grid* g) noexcept nogil:
    """Whole contiguous rows [r0, r1) of fewer than HALF_BLOCK columns, of
    16-bit data applied in float: as many rows as fill a block widened and
    narrowed at once, each row applied as row_map_values applies it (the
    same bits as row by row, with one conversion loop per block). Stored
    through the cache even when g.streaming: streamed four blocks at a
    time, (64, 56, 56, 64) bfloat16 inference measured 1.10-1.19x slower
    (benchmarks/ab.py, 2 threads), one block at a time 1.25-1.37x."""
    cdef float wa[HALF_BLOCK]
    cdef float wb[HALF_BLOCK]
    cdef float wo[HALF_BLOCK]
    cdef Py_ssize_t C = g.C, per = HALF_BLOCK // g.C, r = r0, n, j
    while r < r1:
        n = min(per, r1 - r)
        widen(a + r * C, wa, n * C)
        if not (Body is BodyY or Body is BodyYAct):  # the bodies that read b
            widen(b + r * C, wb, n * C)
        for j in range(n):
            row_map_values(body, <const float*>&wa[j * C], <const float*>&wb[j * C], &wo[j * C],
                           C, k.hi, k.lo, k.scale32, k.slope32, k.offset32, g.act.kind,
                           g.act.slope32, k.grad_center, k.grad_scale, k.grad_offset,
                           g.grad.slope, g.grad.inv_slope)
        narrow(wo, out + r * C, n * C)
        r += n


cdef inline void block_apply_in(const Body* body, const storage* a, const storage* b,
                                storage* out, const Grid* g, Py_ssize_t r0, Py_ssize_t r1,
                                Py_ssize_t c0, Py_ssize_t c1, const Maps* k,
                                Py_ssize_t piece) noexcept nogil:
    """block_apply of one body (one specialization each: the body is chosen
    once per block, not once per row)."""
    cdef storage buf[STREAM_CHUNK]
    cdef Py_ssize_t C = g.C, S = g.stride, r, c, j, m, p, e
    cdef int mode = 1 if storage is not double else 0
    if storage is not double:
        for c in range(c0, c1):
            if not k.ok[c]:
                mode = -1
                break
    if (storage is half or storage is bfloat) and mode == 1 and c1 - c0 == C == S < HALF_BLOCK:
        rows_map_blocks(body, a, b, out, r0, r1, k, g)
    elif not g.streaming:
        p = c0
        while p < c1:      # by piece across the rows: the piece's maps stay in L1
            e = min(p + piece, c1)
            for r in range(r0, r1):
                row_apply(body, a + r * S, at(b, r * S), out + r * S + p, p, e, k, mode, g)
            p = e
    elif c1 - c0 == C and C == S and C <= STREAM_CHUNK:
        # whole rows, contiguous: several rows per buffer
        m = STREAM_CHUNK // C
        r = r0
        while r < r1:
            m = min(m, r1 - r)
            for j in range(m):
                row_apply(body, a + (r + j) * C, at(b, (r + j) * C), &buf[j * C], 0, C, k, mode,
                          g)
            stream(out + r * C, buf, m * C * sizeof(storage))
            r += m
    else:
        p = c0
        while p < c1:
            e = min(p + piece, c1)
            for r in range(r0, r1):
                c = p
                while c < e:
                    m = min(<Py_ssize_t>STREAM_CHUNK, e - c)
                    row_apply(body, a + r * S, at(b, r * S), buf, c, c + m, k, mode, g)
                    stream(out + r * S + c, buf, m * sizeof(storage))
                    c += m
            p = e
    if g.streaming:
        fence()


cdef void block_apply(const storage* a, const storage* b, storage* out, const Grid* g,
                      Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1,
                      const Maps* k, Py_ssize_t piece) noexcept nogil:
    """Rows [r0, r1), columns [c0, c1) of g's apply body: y from a = x, or dx
    from a = dy, b = x (or y); ``piece`` columns at a time across the rows
    (PIECE_COLUMNS, or TILE_PIECE_COLUMNS; whole rows of at most STREAM_CHUNK
    values and 16-bit rows in float blocks go by rows); streamed through a
    stack buffer when g.streaming."""
    if g.body == BODY_Y:
        block_apply_in(<BodyY*>NULL, a, b, out, g, r0, r1, c0, c1, k, piece)
    elif g.body == BODY_Y_ACT:
        block_apply_in(<BodyYAct*>NULL, a, b, out, g, r0, r1, c0, c1, k, piece)
    elif g.body == BODY_DX:
        block_apply_in(<BodyDX*>NULL, a, b, out, g, r0, r1, c0, c1, k, piece)
    elif g.body == BODY_DX_ACT:
        block_apply_in(<BodyDXAct*>NULL, a, b, out, g, r0, r1, c0, c1, k, piece)
    elif g.body == BODY_DX_RELU:
        block_apply_in(<BodyDXRelu*>NULL, a, b, out, g, r0, r1, c0, c1, k, piece)
    elif g.body == BODY_DX_OUT:
        block_apply_in(<BodyDXOut*>NULL, a, b, out, g, r0, r1, c0, c1, k, piece)
    elif g.body == BODY_DZ:
        block_apply_in(<BodyDZ*>NULL, a, b, out, g, r0, r1, c0, c1, k, piece)
    else:
        block_apply_in(<BodyDZRelu*>NULL, a, b, out, g, r0, r1, c0, c1, k, piece)


cdef inline void zero_totals(const Grid* g, Py_ssize_t c0, Py_ssize_t c1,
                             double* total) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(c0, c1):
        total[c] = 0.0
        total[g.ld + c] = 0.0


cdef void tile_totals(const storage* a, const storage* b, const Grid* g, Py_ssize_t c0,
                      Py_ssize_t c1, const double* center, const Maps* k, double* part,
                      double* total) noexcept nogil:
    """Totals over all row blocks, in block order, for columns [c0, c1):
    total[c], total[g.ld + c]; part is 2 * g.ld doubles of scratch. Blocks of one
    row (few rows, C of 65536 or more) add their terms straight into the
    totals: a block's sum of one term is 0 + t, which is t but for the sign
    of a zero, and a total that starts at +0 is never -0, so the bits are
    the same without the pass through part."""
    cdef Py_ssize_t ld = g.ld, c, blk
    zero_totals(g, c0, c1, total)
    if g.rows_per_block == 1:
        for blk in range(g.nblocks):
            add_block_sums(a, b, g, blk, c0, c1, center, k, total, total + ld)
        return
    for blk in range(g.nblocks):
        block_sums(a, b, g, blk, c0, c1, center, k, part, part + ld)
        for c in range(c0, c1):
            total[c] += part[c]
            total[ld + c] += part[ld + c]


cdef void merge_blocks(const double* table, const Grid* g, Py_ssize_t c0, Py_ssize_t c1,
                       double* total) noexcept nogil:
    """Totals from the per-row-block table, in block order: the same sums as
    tile_totals."""
    cdef Py_ssize_t ld = g.ld, c, blk
    zero_totals(g, c0, c1, total)
    for blk in range(g.nblocks):
        for c in range(c0, c1):
            total[c] += table[2 * blk * ld + c]
            total[ld + c] += table[(2 * blk + 1) * ld + c]
