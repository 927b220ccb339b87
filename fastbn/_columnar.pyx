"""Batch Normalization kernels over columnar (M, C) views.

(N, D) inputs, channels-last inputs (N, ..., C) viewed as (M, C), and NCHW
inputs whose spatial size is 1. Row r holds one value of every channel, C
contiguous values; channel c is column c.

Summation order (fixed by the shape, never by the thread count)
----------------------------------------------------------------
The M rows are cut into at most MAX_ROW_BLOCKS blocks of whole rows. In a
block, a column's values are taken four rows at a time, ``s += (v0 + v1) +
(v2 + v3)`` in double (the loop runs along the row, so the compiler
vectorizes across columns and reassociates nothing), the last rows of the
block one at a time; the block sums are added in block order. Both
schedules compute the same block sums and add them in the same order.

Schedules (one parallel region per call, units handed out dynamically)
----------------------------------------------------------------------
- by tile, when a tile of columns over all M rows stays in cache: a unit
  is a tile; its thread sums the tile's row blocks, then normalizes (or
  writes dx for) the tile while it is still cached: one sweep from memory.
  A tile is at most TILE_BYTES and TILE_COLUMNS wide, so that its block
  sums and maps stay in L1 and L2 (few rows, many columns): tiles of 4096
  columns (ghost groups of (256, 4096), 32 rows each) took 1.03-1.08x the
  time of tiles of 1024 in the ghost forward at 1 thread, (32, 65536)
  1.10x at 1 thread, its backward 1.09x at 2 (AMD EPYC, in-process A/B in
  random order); as fast elsewhere.
- by row block, otherwise (many rows): every row block's per-column sums
  into a table of MAX_ROW_BLOCKS x C, a merge per column in block order,
  then every row block normalized, the blocks summed last first (they are
  the ones still cached). A pass without sums (inference) on one thread
  applies all rows in one sweep, by piece (below).

Pieces: within a block (or a tile), the sums and the apply take
PIECE_COLUMNS columns at a time across all of the block's rows, so that
the piece's per-column sums, or its maps (about 21 bytes a column in
float), stay in L1 from row to row; a column's terms are added in the same
order either way. Rows of 4096 columns and more used to read their maps
from L2 at every row: ghost groups of (256, 4096) and huge-C inference
(8, 262144) ran 0.75-0.85x and 0.74-0.77x the time with them
(benchmarks/ab.py, 2 threads, AMD EPYC). A tile's streamed apply, right
after its sums, takes TILE_PIECE_COLUMNS: ghost groups of (256, 4096) then
ran 0.81-0.90x the time, (256, 8192) float16 0.87x (AMD EPYC, in-process
A/B); from memory (one sweep, row blocks) or unstreamed, 512 was as fast
or slower (half a row of (4096, 1024) at a time: up to 2x slower).

Chunks: when a column of x weighs less than its work space (about 120
bytes: fewer than 32 float32 rows), a pass takes CHUNK_COLUMNS columns at a
time, each chunk a grid of its own whose rows are the full row apart
(``Grid.stride``), so the work space is one chunk's per thread: with many
columns and few rows ((2, 10**6)) it used to be 15 times x, allocated and
faulted in at every call. The chunks are shared out to the threads, each
run whole by one. The row blocks are those of the full width, so a column's
sums, and its bits, do not depend on its chunk or its thread.

Outputs of at least STREAM_MIN_BYTES that are not written in place go
through streaming stores (``fastbn._simd``). The conventions are those of
``fastbn._planar``: apply steps take (a, b, out) with b NULL in the forward
(a = x) and b = x in the backward (a = dy); one entry, ``run``, serves
the compiled front and mallocs its work space (the ``def`` wrappers of
fastbn.distributed take an array that frees itself); float32 outputs are computed in float with the split center
(``fastbn._stats.Coef32``) where float can carry a column's map.
"""

from cython.parallel cimport parallel, prange
from cpython.pycapsule cimport PyCapsule_New
from libc.string cimport memcpy, memset

from fastbn._call cimport (ACT_NONE, DTYPE_BFLOAT16, DTYPE_FLOAT16, DTYPE_FLOAT32, DTYPE_FLOAT64, ENTRY_NAME,
                           GRAD_PLAIN, MODE_BACKWARD, MODE_FORWARD, STEP_APPLY, STEP_SUMS, Call)
from fastbn._openmp cimport (Shares, barrier, late, note, omp_get_thread_num, threads_for,
                             took)
from fastbn._simd cimport STREAM_CHUNK, fence, storage, stream
from fastbn._body cimport (Body, BodyDX, BodyDXAct, BodyDXOut, BodyDXRelu, BodyDZ, BodyDZRelu, BodyY,
                           BodyYAct, narrow, put, real, terms, value, widen)
from fastbn._pass cimport (BODY_DX, BODY_DX_ACT, BODY_DX_OUT, BODY_DX_RELU, BODY_DZ, BODY_Y,
                           BODY_Y_ACT, Pass, apply_b, call_pass, center_of)
from fastbn._stats cimport (MAP_BLOCK, Act, Coef32, CoefBlock, Grad, coef32_of, finish_block,
                            fits_float, grad_of, make_act)
from fastbn._views cimport at
from fastbn._half cimport HALF_BLOCK, bfloat, half


cdef enum:
    MAX_ROW_BLOCKS = 64
    MERGE_COLUMNS = 256         # columns per unit of the merge
    BLOCK_VALUES = 65536        # a row block holds at least this many values (or all rows)
    TILE_BYTES = 512 * 1024     # a tile of the inputs over all rows, cached between its steps
    TILE_COLUMNS = 1024         # columns per tile at most (see the module docstring)
    CHUNK_COLUMNS = 4096        # columns per pass when x has few rows (see chunk_width)
    MIN_TILE_BYTES = 1024       # narrower row pieces defeat the hardware prefetcher
    PIECE_COLUMNS = 1024        # columns the sums and the apply take across a block's rows
                                # at a time: their float maps (about 21 KiB) stay in L1
    TILE_PIECE_COLUMNS = 512    # the same for a tile's streamed apply after its sums


cdef struct Grid:
    Py_ssize_t M, C
    Py_ssize_t ld                 # doubles from one per-column array of the work space to
                                  # the next (work_stride)
    Py_ssize_t stride             # values from a row to the next (C, or more for a chunk)
    Py_ssize_t rows_per_block, nblocks
    Py_ssize_t tile, ntiles       # columns per tile, tiles (tile == 0: by row block)
    bint streaming
    int body                      # the pass's apply body and sums body (fastbn._stats.BODY_*)
    int sums_body
    Act act                       # the activation fused into a forward's apply
    Grad grad                     # a backward's transform (its slopes; per column in Maps)


cdef struct Maps:
    # The per-column maps, by column (vectorizable across columns), in
    # double (Coef) and, where ok[c], in float (Coef32).
    double* center
    double* scale
    double* slope
    double* offset
    double* zero                # 0: the double path's lo (fastbn._body)
    float* hi
    float* lo
    float* scale32
    float* slope32
    float* offset32
    char* ok
    double* grad_center         # the columns' Grad (center, scale, offset), for a
    double* grad_scale          # backward with GRAD_ACT or GRAD_OUTPUT
    double* grad_offset


cdef inline Grid make_grid(Py_ssize_t M, Py_ssize_t C, Py_ssize_t bytes_per_value,
                           bint streaming) noexcept nogil:
    """bytes_per_value: bytes read per value (itemsize, or twice it for dy and x)."""
    cdef Grid g
    g.M = M
    g.C = g.stride = C
    g.ld = work_stride(C)
    g.streaming = streaming
    g.act = make_act(ACT_NONE, 0.0)
    g.body = g.sums_body = BODY_Y
    g.grad.slope = g.grad.inv_slope = g.grad.center = g.grad.scale = g.grad.offset = 0.0
    g.rows_per_block = max((M + MAX_ROW_BLOCKS - 1) // MAX_ROW_BLOCKS,
                           (BLOCK_VALUES + C - 1) // C)
    g.nblocks = (M + g.rows_per_block - 1) // g.rows_per_block
    g.tile = min(TILE_BYTES // (M * bytes_per_value), <Py_ssize_t>TILE_COLUMNS)
    if g.tile >= C:
        g.tile = C
    elif g.tile * bytes_per_value < MIN_TILE_BYTES:
        g.tile = 0
    g.ntiles = (C + g.tile - 1) // g.tile if g.tile else 0
    return g


cdef inline Py_ssize_t chunk_width(Py_ssize_t M, Py_ssize_t C, Py_ssize_t itemsize) noexcept nogil:
    """Columns per pass: all of them when a column of x outweighs its work
    space (about 120 bytes), else CHUNK_COLUMNS."""
    return C if M * itemsize >= 128 else min(C, <Py_ssize_t>CHUNK_COLUMNS)


cdef inline Grid chunk_of(Grid g, Py_ssize_t width) noexcept nogil:
    """``width`` of g's columns as a grid of their own, their rows g.stride
    values apart, in g's tiles (a chunk narrower than a tile is one tile).
    The row blocks stay g's, those of the full width: a column's sums do
    not depend on its chunk."""
    if g.tile and width < g.C:
        g.tile = min(g.tile, width)
        g.ntiles = (width + g.tile - 1) // g.tile
    g.C = width
    g.ld = work_stride(width)
    return g


cdef inline Py_ssize_t odd_lines(Py_ssize_t nbytes) noexcept nogil:
    """nbytes rounded up to an odd number of cache lines."""
    cdef Py_ssize_t lines = (nbytes + 63) // 64
    return 64 * (lines + 1 - lines % 2)


cdef inline Py_ssize_t work_stride(Py_ssize_t C) noexcept nogil:
    """Doubles from one per-column array of the work space (totals, centers,
    block sums, double maps) to the next: an odd number of cache lines, so
    that arrays fewer than 64 apart never start at the same offset in a
    4 KiB page (the float maps likewise, maps_in). A loop that stores into
    one array and loads from another at the same page offset waits on the
    store (4K aliasing): with C a multiple of 512 every array did, and
    adding the block sums into the totals took about 10% of a warm
    (256, 4096) forward."""
    return odd_lines(C * sizeof(double)) // sizeof(double)


cdef inline Maps maps_in(char* mem, const Grid* g) noexcept nogil:
    """Carve g's per-column maps out of 8 arrays of doubles (g.ld apart), 5
    of floats (an odd number of cache lines apart) and C chars
    (maps_bytes)."""
    cdef Maps k
    cdef Py_ssize_t ld = g.ld, lf = odd_lines(g.C * sizeof(float)) // sizeof(float)
    k.center = <double*>mem
    k.scale = k.center + ld
    k.slope = k.scale + ld
    k.offset = k.slope + ld
    k.zero = k.offset + ld
    k.grad_center = k.zero + ld
    k.grad_scale = k.grad_center + ld
    k.grad_offset = k.grad_scale + ld
    k.hi = <float*>(k.grad_offset + ld)
    k.lo = k.hi + lf
    k.scale32 = k.lo + lf
    k.slope32 = k.scale32 + lf
    k.offset32 = k.slope32 + lf
    k.ok = <char*>(k.offset32 + lf)
    return k


cdef inline Py_ssize_t maps_bytes(const Grid* g) noexcept nogil:
    return 8 * g.ld * sizeof(double) + 5 * odd_lines(g.C * sizeof(float)) + g.C


cdef inline void store_maps(const Maps* k, Py_ssize_t c0, Py_ssize_t n, const CoefBlock* m,
                            bint in_float) noexcept nogil:
    """Columns [c0, c0 + n) of k from a block of maps, for data applied in
    float where float can carry the map (``in_float``: float32 and 16-bit
    data) or in double: the float maps and k.ok when in_float, the double
    maps (and the zero column) unless every column is applied in float. The
    apply reads no other (fastbn._columnar_loops.row_apply)."""
    cdef float hi[MAP_BLOCK]
    cdef float lo[MAP_BLOCK]
    cdef float scale[MAP_BLOCK]
    cdef float slope[MAP_BLOCK]
    cdef float offset[MAP_BLOCK]
    cdef char ok[MAP_BLOCK]
    cdef bint all_ok = in_float
    cdef Coef32 f
    cdef Py_ssize_t j
    if in_float:
        for j in range(n):
            ok[j] = fits_float(m.center[j], m.scale[j], m.slope[j], m.offset[j])
            all_ok = all_ok & ok[j]
            f = coef32_of(m.center[j], m.scale[j], m.slope[j], m.offset[j])
            hi[j] = f.hi
            lo[j] = f.lo
            scale[j] = f.scale
            slope[j] = f.slope
            offset[j] = f.offset
        memcpy(k.hi + c0, hi, n * sizeof(float))
        memcpy(k.lo + c0, lo, n * sizeof(float))
        memcpy(k.scale32 + c0, scale, n * sizeof(float))
        memcpy(k.slope32 + c0, slope, n * sizeof(float))
        memcpy(k.offset32 + c0, offset, n * sizeof(float))
        memcpy(k.ok + c0, ok, n)
    if not all_ok:
        memcpy(k.center + c0, m.center, n * sizeof(double))
        memcpy(k.scale + c0, m.scale, n * sizeof(double))
        memcpy(k.slope + c0, m.slope, n * sizeof(double))
        memcpy(k.offset + c0, m.offset, n * sizeof(double))
        memset(k.zero + c0, 0, n * sizeof(double))


cdef inline void finish_maps(const Pass* ps, const double* total, const double* center,
                             Py_ssize_t ld, Py_ssize_t c0, Py_ssize_t c1, const Maps* k,
                             const storage* a) noexcept nogil:
    """The maps of columns [c0, c1) from their totals (total[c], total[ld +
    c]) around center[c], MAP_BLOCK columns at a time (fastbn._stats)."""
    cdef CoefBlock m
    cdef Py_ssize_t c = c0, n
    while c < c1:
        n = min(<Py_ssize_t>MAP_BLOCK, c1 - c)
        finish_block(ps, total + c, total + ld + c, center + c, c, n, &m, a)
        store_maps(k, c, n, &m, storage is not double)
        c += n


cdef inline void set_pass(Grid* g, const Pass* ps, char* maps,
                          const storage* like) noexcept nogil:
    """What g's steps compute: the pass's bodies and activation, and the
    backward's transform of ps (fastbn._stats.Grad): its slopes in g, its
    columns' coefficients in the maps at ``maps`` (nothing for GRAD_PLAIN)."""
    cdef Maps k = maps_in(maps, g)
    cdef Grad t
    cdef Py_ssize_t c
    g.body = ps.body
    g.sums_body = ps.sums_body
    g.act = make_act(ps.act, ps.act_slope)
    if ps.grad == GRAD_PLAIN:
        return
    g.grad = grad_of(ps, 0, like)
    for c in range(g.C):
        t = grad_of(ps, c, like)
        k.grad_center[c] = t.center
        k.grad_scale[c] = t.scale
        k.grad_offset[c] = t.offset


include "_columnar_loops.pxi"


# ---------------------------------------------------------- schedules ----
#
# A pass: sums of (a, b) around center, the per-column maps (``Pass`` and
# ``finish_block`` of fastbn._stats), the apply.

cdef inline Py_ssize_t nunits(const Grid* g) noexcept nogil:
    """Units of the first step: tiles, or row blocks."""
    return g.ntiles if g.tile else g.nblocks


cdef inline Py_ssize_t pass_bytes(const Grid* g, bint sums) noexcept nogil:
    """Work space of run_pass: totals (2 arrays), centers, the scratch of the
    sums (2 arrays by tile, 2 a block by row block), then the maps; the
    arrays g.ld doubles apart."""
    return 3 * g.ld * sizeof(double) + maps_bytes(g) + (
        0 if not sums else (2 if g.tile else 2 * g.nblocks) * g.ld * sizeof(double))


cdef void tile_unit(const storage* a, const storage* b, const storage* ab, storage* out,
                    const Grid* g, const Pass* ps, Py_ssize_t t, const double* center,
                    const Maps* k, double* scratch, double* total, bint sums) noexcept nogil:
    """Tile t of the by-tile schedule: its totals, maps and apply."""
    cdef Py_ssize_t c0 = t * g.tile, c1 = min(g.C, c0 + g.tile)
    if sums:
        tile_totals(a, b, g, c0, c1, center, k, scratch, total)
    if ps.apply:
        finish_maps(ps, total, center, g.ld, c0, c1, k, a)
        block_apply(a, ab, out, g, 0, g.M, c0, c1, k,
                    TILE_PIECE_COLUMNS if sums and g.streaming else PIECE_COLUMNS)


cdef void merge_unit(const storage* a, const Grid* g, const Pass* ps, Py_ssize_t u,
                     const double* center, const Maps* k, const double* scratch,
                     double* total, bint sums, bint maps) noexcept nogil:
    """Columns [u * MERGE_COLUMNS, ...) of the by-row-block schedule: their
    totals merged in block order, and their maps when ``maps``."""
    cdef Py_ssize_t c0 = u * MERGE_COLUMNS, c1 = min(g.C, c0 + MERGE_COLUMNS)
    if sums:
        merge_blocks(scratch, g, c0, c1, total)
    if maps:  # without sums, from the running statistics or given maps: no total is read
        finish_maps(ps, total, center, g.ld, c0, c1, k, a)


cdef void run_pass(const storage* a, const storage* b, storage* out, const Grid* g,
                   const Pass* ps, char* mem, int nt) noexcept nogil:
    """Sums, maps and apply in one parallel region (see the module docstring).

    mem: pass_bytes(g): two arrays of totals and one of centers (already
    set by the caller), the scratch, then the maps, the arrays g.ld doubles
    apart. Without ps.apply (the synchronized passes' first half), the sums
    only, left in ``totals(mem, g)`` (the first sum at [c], the second at
    [g.ld + c]);
    without ps.sums (a frozen backward without parameter gradients), the
    apply only."""
    cdef Py_ssize_t C = g.C, ld = g.ld, u, t, c, c0, c1, blk, nb = g.nblocks
    cdef bint sums = ps.sums, apply = ps.apply
    cdef const storage* ab = apply_b(ps, b)
    cdef Maps k = maps_in(maps_at(mem, g, ps.sums), g)
    cdef double* total = totals(mem, g)
    cdef const double* center = total + 2 * ld
    cdef double* scratch = total + 3 * ld
    cdef Shares sh
    cdef Py_ssize_t nmerge = (C + MERGE_COLUMNS - 1) // MERGE_COLUMNS
    if g.tile:
        sh = Shares(g.ntiles, 0, 0)
        if nt == 1:  # no parallel region: even a team of one ends in a futex wake
            for t in range(g.ntiles):
                tile_unit(a, b, ab, out, g, ps, t, center, &k, scratch, total, sums)
            return
        for t in prange(g.ntiles, num_threads=nt, schedule="dynamic"):
            took(&sh)
            tile_unit(a, b, ab, out, g, ps, t, center, &k, scratch, total, sums)
        note(late(&sh, nt))
        return
    cdef Shares blocks = Shares(nb if sums else 0, 0, 0)
    sh = Shares(nb if apply else 0, 0, 0)
    if nt == 1:
        for blk in range(nb if sums else 0):
            block_sums(a, b, g, blk, 0, C, center, &k, scratch + 2 * blk * ld,
                       scratch + (2 * blk + 1) * ld)
        for u in range(nmerge):
            merge_unit(a, g, ps, u, center, &k, scratch, total, sums, apply)
        if apply and not sums:  # nothing cached to favour: all rows at once, by piece
            block_apply(a, ab, out, g, 0, g.M, 0, C, &k, PIECE_COLUMNS)
            return
        for blk in range(nb if apply else 0):
            block_apply(a, ab, out, g, (nb - 1 - blk) * g.rows_per_block,
                        min(g.M, (nb - blk) * g.rows_per_block), 0, C, &k, PIECE_COLUMNS)
        return
    with parallel(num_threads=nt):
        for blk in prange(nb if sums else 0, schedule="dynamic"):
            took(&blocks)
            block_sums(a, b, g, blk, 0, C, center, &k, scratch + 2 * blk * ld,
                       scratch + (2 * blk + 1) * ld)
        barrier()
        for u in prange(nmerge, schedule="dynamic"):
            merge_unit(a, g, ps, u, center, &k, scratch, total, sums, apply)
        barrier()
        for blk in prange(nb if apply else 0, schedule="dynamic"):
            took(&sh)
            block_apply(a, ab, out, g, (nb - 1 - blk) * g.rows_per_block,
                        min(g.M, (nb - blk) * g.rows_per_block), 0, C, &k, PIECE_COLUMNS)
    note(max(late(&blocks, nt), late(&sh, nt)))


cdef inline double* totals(char* mem, const Grid* g) noexcept nogil:
    return <double*>mem


cdef inline double* centers(char* mem, const Grid* g) noexcept nogil:
    return totals(mem, g) + 2 * g.ld


cdef inline char* maps_at(char* mem, const Grid* g, bint sums) noexcept nogil:
    """The maps follow the doubles: totals, centers and the scratch."""
    return mem + pass_bytes(g, sums) - maps_bytes(g)


# ------------------------------------------------------------- entry ----
# The passes of a call (fastbn._call.Call), as in fastbn._planar: ``run`` is
# the one entry of the compiled front; a work space that cannot be had
# returns -1 before anything is written.

cdef void chunk_pass(const Call* k, const Grid* whole, Py_ssize_t W, Py_ssize_t q, char* wp,
                     int nt, const storage* like) noexcept nogil:
    """Chunk q of the call (its columns [q * W, q * W + W)) on nt threads,
    with the work space wp."""
    cdef const storage* ap = <const storage*>k.a + q * W
    cdef const storage* bp = at(<const storage*>k.b if k.mode == MODE_BACKWARD else NULL, q * W)
    cdef storage* op = <storage*>at(<storage*>k.out, q * W)      # NULL for the sums alone
    cdef Grid g = chunk_of(whole[0], min(k.c - q * W, W))
    cdef Pass ps = call_pass(k, q * W, <double>g.M, like)
    cdef double* center = centers(wp, &g)
    cdef Py_ssize_t c
    for c in range(g.C):
        center[c] = center_of(&ps, ap, c, c)
    set_pass(&g, &ps, maps_at(wp, &g, ps.sums), ap)
    run_pass(ap, bp, op, &g, &ps, wp, nt)
    for c in range(g.C if not ps.apply else 0):   # the sums alone
        ps.totals[2 * c] = totals(wp, &g)[c]
        ps.totals[2 * c + 1] = totals(wp, &g)[g.ld + c]


cdef inline Grid whole_grid(const Call* k, const storage* like) noexcept nogil:
    """The grid of call k over all its columns (a pass without sums, as
    inference, goes by row block: nothing to keep cached between steps)."""
    cdef Grid whole = make_grid(k.n, k.c, (2 if k.mode == MODE_BACKWARD else 1) * sizeof(storage),
                                k.out != NULL and k.stream)
    if not call_pass(k, 0, <double>k.n, like).sums:
        whole.tile = whole.ntiles = 0
    return whole


cdef inline Py_ssize_t chunk_bytes(const Call* k, const Grid* g,
                                   const storage* like) noexcept nogil:
    """The work space of a chunk g of call k, in whole cache lines."""
    return (pass_bytes(g, call_pass(k, 0, <double>k.n, like).sums) + 63) // 64 * 64


cdef int call_threads(const Call* k, const storage* like) noexcept nogil:
    """The threads for call k now (fastbn._openmp.threads_for: fewer while
    the cores are busy), decided once per call: those that share its
    chunks, or those that split its one chunk."""
    cdef Py_ssize_t W = chunk_width(k.n, k.c, sizeof(storage)), nq = (k.c + W - 1) // W
    cdef Grid g = chunk_of(whole_grid(k, like), W)
    if nq > 1:
        return threads_for(k.n * k.c, nq, k.num_threads)
    return threads_for(g.M * g.C, nunits(&g), k.num_threads)


cdef Py_ssize_t call_bytes(const Call* k, int nt, const storage* like) noexcept nogil:
    """Bytes of call k's work space on nt threads: that of one chunk per
    thread (one in all when the threads split one chunk)."""
    cdef Py_ssize_t W = chunk_width(k.n, k.c, sizeof(storage))
    cdef Grid g = chunk_of(whole_grid(k, like), W)
    return (nt if W < k.c else 1) * chunk_bytes(k, &g, like)


cdef void call_in(const Call* k, int nt, char* mem, const storage* like) noexcept nogil:
    """The call on an (M, C) view (fastbn._call.Call: a = x or dy, b = x or
    y in the backward), chunk_width columns at a time, on nt threads, in
    the work space mem of call_bytes. Inference is the pass without sums,
    by row block; so is the apply alone (k.steps). Several chunks (few
    rows, many columns) are shared out to the threads, each run whole by
    one thread in a work space of its own; one chunk is split across the
    threads by run_pass."""
    cdef Grid whole = whole_grid(k, like)
    cdef Py_ssize_t W = chunk_width(k.n, k.c, sizeof(storage)), nq = (k.c + W - 1) // W, q
    cdef Grid g = chunk_of(whole, W)
    cdef Py_ssize_t size = chunk_bytes(k, &g, like)
    cdef Shares sh = Shares(nq, 0, 0)
    if nq == 1:
        chunk_pass(k, &whole, W, 0, mem, nt, like)
    elif nt == 1:
        for q in range(nq):
            chunk_pass(k, &whole, W, q, mem, 1, like)
    else:
        for q in prange(nq, num_threads=nt, schedule="dynamic"):
            took(&sh)
            chunk_pass(k, &whole, W, q, mem + omp_get_thread_num() * size, 1, like)
        note(late(&sh, nt))


include "_entry.pxi"
