"""Batch Normalization kernels over planar (N, C, S) views.

NCHW and its 3-D and 5-D relatives, viewed as (N, C, S) with S the spatial
size (S > 1; S == 1 goes to ``_columnar``). Channel c is the N x S matrix
``x[:, c, :]``: N rows of S contiguous values, ``C * S`` apart.

Summation order (fixed by the shape, never by the thread count)
----------------------------------------------------------------
A channel's m = N*S values are cut into blocks of about BLOCK values: whole
rows when S < BLOCK, pieces of one row otherwise. Within a block, each row
piece is summed in LANES double accumulators (value i of the piece goes to
lane i % LANES, in explicit vectors: ``fastbn._simd``, so no sum is
reassociated), the lanes are added in order, and the block
sums are added in block order. Every schedule below computes the same
block sums and adds them in the same order, so every schedule and every
thread count gives the same bits.

Schedules (one parallel region per call, units handed out dynamically)
----------------------------------------------------------------------
- by channel, when there are channels enough for the threads: a unit is a
  whole channel; its thread sums the channel's blocks and then normalizes
  (or, in the backward, writes dx for) the channel while it is still in
  cache: one sweep from memory.
- by block, when channels are few (C = 1, 3, ...): a unit is a (channel,
  block) pair; all pairs are summed into a small table, the table is merged
  per channel in block order, then every pair is normalized, the pairs
  summed last first (they are the ones still cached).

Units are handed out one at a time as threads come for them
(``schedule="dynamic"``): which thread takes a unit never changes a bit,
and a thread that the operating system deschedules holds up at most the
one unit it has, not a fixed share of the call.

Outputs of at least STREAM_MIN_BYTES that are not written in place go
through streaming stores (``fastbn._simd``): no read-for-ownership of a
cold output buffer.

The levels (scikit-learn's habit): ``noexcept nogil`` run and block
functions, the ``prange`` schedules, and one entry, ``run``, that takes a
``fastbn._call.Call`` from the compiled front (``fastbn._front``, which has
validated everything), allocates the O(C) work space with malloc and never
raises; the front reaches it through the capsule ``ENTRY``. The two halves
of a pass, ``sums`` and ``apply``, are ``def`` wrappers for
``fastbn.distributed``.
"""

from cython.parallel cimport parallel, prange
from cpython.pycapsule cimport PyCapsule_New

from fastbn._call cimport (ACT_NONE, DTYPE_BFLOAT16, DTYPE_FLOAT16, DTYPE_FLOAT32, DTYPE_FLOAT64, ENTRY_NAME, GRAD_ACT,
                           GRAD_OUTPUT, GRAD_PLAIN, MODE_BACKWARD, MODE_FORWARD, STEP_APPLY,
                           STEP_SUMS, Call)
from fastbn._openmp cimport (FASTBN_COMPILE_ARGS, Shares, barrier, late, note, omp_get_thread_num,
                             threads_for, took)
from fastbn._body cimport (Body, BodyDX, BodyDXAct, BodyDXOut, BodyDXRelu, BodyDZ, BodyDZRelu, BodyY,
                           BodyYAct, narrow, put, real, value, widen)
from fastbn._pass cimport (BODY_DX, BODY_DX_ACT, BODY_DX_OUT, BODY_DX_RELU, BODY_DZ, BODY_Y,
                           BODY_Y_ACT, PASS_FORWARD, PASS_INFERENCE, Pass, apply_b, call_pass,
                           center_of)
from fastbn._stats cimport (MAP_BLOCK, Act, Coef, Coef32, CoefBlock, Grad, coef_at, finish_block,
                            grad_of, make_act, to_float)
from fastbn._simd cimport (LANES, PREFETCH_BYTES, STREAM_CHUNK, act_sums_bf16, act_sums_f16,
                           act_sums_f32, act_sums_f64, fence, grad_sums_bf16,
                           grad_sums_f16, grad_sums_f32, grad_sums_f64, prefetch_span,
                           shifted_sums_bf16, shifted_sums_f16, shifted_sums_f32,
                           shifted_sums_f64, storage, stream, stream_end)
from fastbn._views cimport at
from fastbn._half cimport HALF_BLOCK, bfloat, half


cdef enum:
    BLOCK = 16384                     # values per block of a channel (summation order)
    GROUP_VALUES = 2048               # values of one sample a group's slab aims at
    GROUP_MAX = MAP_BLOCK             # channels per group at most: one block to finish
    GROUP_CACHE_BYTES = 1024 * 1024   # a group's inputs, cached between its two steps
    GROUP_L1_BYTES = 16 * 1024        # the same, in the L1 cache (Plane.l1_groups)
    GROUP_SLAB_BYTES = 2048           # the shortest slab of a group sized to the L1 cache


cdef struct Plane:
    Py_ssize_t N, C, S
    Py_ssize_t row_stride        # C * S: from x[n, c, 0] to x[n + 1, c, 0]
    Py_ssize_t rows_per_block    # when S < BLOCK: whole rows per block
    Py_ssize_t blocks_per_row    # when S >= BLOCK: blocks per row
    Py_ssize_t nblocks           # blocks per channel
    bint streaming               # the output is streamed
    bint l1_groups               # groups sized to the L1 cache (group_size, l1_sized)
    int body                     # the pass's apply body and sums body (fastbn._stats.BODY_*)
    int sums_body
    Act act                      # the activation fused into a forward's apply


cdef inline Plane make_plane(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                             bint streaming) noexcept nogil:
    cdef Plane p
    p.N = N
    p.C = C
    p.S = S
    p.row_stride = C * S
    p.streaming = streaming
    p.l1_groups = False
    p.act = make_act(ACT_NONE, 0.0)
    p.body = p.sums_body = BODY_Y
    if S < BLOCK:
        p.rows_per_block = BLOCK // S
        p.blocks_per_row = 0
        p.nblocks = (N + p.rows_per_block - 1) // p.rows_per_block
    else:
        p.rows_per_block = 0
        p.blocks_per_row = (S + BLOCK - 1) // BLOCK
        p.nblocks = N * p.blocks_per_row
    return p


cdef inline void set_pass(Plane* p, const Pass* ps) noexcept nogil:
    """What p's steps compute: the pass's bodies and activation."""
    p.body = ps.body
    p.sums_body = ps.sums_body
    p.act = make_act(ps.act, ps.act_slope)


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


include "_planar_loops.pxi"


# ---------------------------------------------------------- schedules ----

cdef inline bint by_group(Py_ssize_t ngroups, int nthreads) noexcept nogil:
    """Whole groups per unit when there are enough to keep the threads busy."""
    return nthreads == 1 or ngroups % nthreads == 0 or ngroups >= 4 * nthreads


cdef inline Py_ssize_t units_of(const Plane* p, const Pass* ps) noexcept nogil:
    """Units of a pass, for its thread count: (channel, block) pairs, or runs
    of rows for the apply alone (apply_units)."""
    if not ps.sums:
        return (p.N * p.C + row_run(p) - 1) // row_run(p)
    return p.C * p.nblocks


cdef inline Py_ssize_t row_run(const Plane* p) noexcept nogil:
    """(n, c) rows per unit of the apply alone: about BLOCK values."""
    return max(1, BLOCK // p.S)


cdef inline Py_ssize_t value_bytes(const Pass* ps, Py_ssize_t itemsize) noexcept nogil:
    """Bytes a pass reads per value: x, or dy and x (or y)."""
    return itemsize if ps.kind == PASS_FORWARD or ps.kind == PASS_INFERENCE else 2 * itemsize


cdef inline bint grouped(const Plane* p, const Pass* ps, Py_ssize_t itemsize,
                         int nt) noexcept nogil:
    """A pass of sums and apply on nt threads goes by channel group (one
    sweep from memory, no work space) rather than by (channel, block)."""
    cdef Py_ssize_t G = group_size(p, value_bytes(ps, itemsize))
    return ps.sums and ps.apply and by_group((p.C + G - 1) // G, nt)


cdef inline Py_ssize_t pass_bytes(const Plane* p, const Pass* ps, Py_ssize_t itemsize,
                                  int nt) noexcept nogil:
    """Work space of run_pass: the maps of the apply alone; nothing by
    channel group; else the (channel, block) table of sums and the maps."""
    if not ps.sums:
        return p.C * (sizeof(Coef) + sizeof(Coef32) + 1)
    if grouped(p, ps, itemsize, nt):
        return 0
    return 2 * p.C * p.nblocks * sizeof(double) + p.C * sizeof(Coef)


cdef Coef merged_map(const double* part, const Plane* p, Py_ssize_t c, const Pass* ps,
                     const storage* a) noexcept nogil:
    """Channel c's map from the (channel, block) table of sums (the sums are
    locals of this function: private to the thread that calls it)."""
    cdef double s0 = 0.0, s1 = 0.0, center = center_of(ps, a, c * p.S, c)
    cdef CoefBlock k
    if ps.sums:
        merge_blocks(part, p, c, &s0, &s1)
    finish_block(ps, &s0, &s1, &center, c, 1, &k, a)
    return coef_at(&k, 0)


cdef void unit_sums(const storage* a, const storage* b, const Plane* p, const Pass* ps,
                    Py_ssize_t u, double center, double* part) noexcept nogil:
    """block_sums of unit u = (channel, block) of the table schedule around
    center into part[2u], part[2u + 1] (the channel's Grad is a local:
    private to the thread)."""
    cdef Py_ssize_t c = u // p.nblocks
    cdef Grad t
    if ps.grad != GRAD_PLAIN:
        t = grad_of(ps, c, a)
    block_sums(a, b, p, c, u % p.nblocks, center, NULL if ps.grad == GRAD_PLAIN else &t,
               &part[2 * u], &part[2 * u + 1])


cdef void unit_apply(const storage* a, const storage* b, storage* out, const Plane* p,
                     const Pass* ps, Py_ssize_t u, const Coef* coef) noexcept nogil:
    """block_apply of unit u = (channel, block) with the channel's map."""
    cdef Py_ssize_t c = u // p.nblocks
    cdef Grad t
    if ps.grad != GRAD_PLAIN:
        t = grad_of(ps, c, a)
    block_apply(a, b, out, p, c, u % p.nblocks, &coef[c],
                NULL if ps.grad == GRAD_PLAIN else &t)


cdef inline void unit_piece(const storage* a, const storage* b, storage* dst, const Plane* p,
                            const Pass* ps, Py_ssize_t j, Py_ssize_t m, const Coef* coef,
                            const Coef32* coef32, const char* ok) noexcept nogil:
    """Values [j, j + m) of the flat array, all in one (n, c) row, applied
    into dst."""
    cdef Py_ssize_t c = (j // p.S) % p.C
    cdef Grad t
    if ps.grad != GRAD_PLAIN:
        t = grad_of(ps, c, a)
    # the unit is contiguous: keep PREFETCH_BYTES of it in flight
    prefetch_span(a + j + PREFETCH_BYTES // sizeof(storage),
                  min(m * <Py_ssize_t>sizeof(storage), <Py_ssize_t>PREFETCH_BYTES))
    run_map(p.body, a + j, at(b, j), dst, m, &coef[c], &coef32[c] if ok[c] else NULL, &p.act,
            NULL if ps.grad == GRAD_PLAIN else &t)


cdef void apply_unit(const storage* a, const storage* b, storage* out, const Plane* p,
                     const Pass* ps, Py_ssize_t r0, Py_ssize_t r1, const Coef* coef,
                     const Coef32* coef32, const char* ok) noexcept nogil:
    """The apply alone over the contiguous (n, c) rows [r0, r1): row by row,
    or, streamed, a piece of about STREAM_CHUNK values at a time across
    rows (fastbn._simd.stream_end), so that only the unit's two ends write
    partial cache lines (a short row streamed alone has a partial line at
    each end, both of its neighbours storing to it: 7x7 rows ran 1.8x slower
    streamed than cached)."""
    cdef storage buf[STREAM_CHUNK]
    cdef Py_ssize_t S = p.S, i = r0 * S, end = r1 * S, j, e, m, r
    if not p.streaming:
        for r in range(r0, r1):
            unit_piece(a, b, out + r * S, p, ps, r * S, S, coef, coef32, ok)
        return
    while i < end:
        e = stream_end(out, i, end, sizeof(storage))
        j = i
        while j < e:                        # the piece's parts, one per row
            m = min(e, (j // S + 1) * S) - j
            unit_piece(a, b, &buf[j - i], p, ps, j, m, coef, coef32, ok)
            j += m
        stream(out + i, buf, (e - i) * sizeof(storage))
        i = e
    fence()


cdef void apply_pass(const storage* a, const storage* b, storage* out, const Plane* p,
                     const Pass* ps, char* mem, int nt) noexcept nogil:
    """A pass without sums (inference, the frozen backward without parameter
    gradients, the apply alone): the maps first, then units of whole (n, c)
    rows, contiguous in memory; ``mem`` of pass_bytes()."""
    cdef Py_ssize_t rows = row_run(p), nu = units_of(p, ps), c, u
    cdef Coef* coef = <Coef*>mem
    cdef Coef32* coef32 = <Coef32*>(coef + p.C)
    cdef char* ok = <char*>(coef32 + p.C)
    cdef Shares sh = Shares(nu, 0, 0)
    cdef CoefBlock k
    for c in range(p.C):
        if c % MAP_BLOCK == 0:  # no sums: none is read
            finish_block(ps, NULL, NULL, NULL, c, min(<Py_ssize_t>MAP_BLOCK, p.C - c), &k, a)
        coef[c] = coef_at(&k, c % MAP_BLOCK)
        ok[c] = storage is not double and to_float(&coef[c], &coef32[c])
    if nt == 1:  # no parallel region: even a team of one ends in a futex wake
        for u in range(nu):
            apply_unit(a, b, out, p, ps, u * rows, min(p.N * p.C, (u + 1) * rows), coef, coef32,
                       ok)
        return
    for u in prange(nu, num_threads=nt, schedule="dynamic"):
        took(&sh)
        apply_unit(a, b, out, p, ps, u * rows, min(p.N * p.C, (u + 1) * rows), coef, coef32, ok)
    note(late(&sh, nt))


cdef void group_schedule(const storage* a, const storage* b, storage* out, const Plane* p,
                         const Pass* ps, int nt) noexcept nogil:
    """A pass by channel group (group_pass): one sweep from memory. A thread
    that takes group u likely takes group u + nt next (the threads take
    the groups about in turn): group_pass prefetches that one."""
    cdef Py_ssize_t G = group_size(p, value_bytes(ps, sizeof(storage))), u
    cdef Shares sh = Shares((p.C + G - 1) // G, 0, 0)
    if nt == 1:
        for u in range(sh.total):
            group_pass(a, b, out, p, u * G, min(p.C, (u + 1) * G), ps, min(p.C, (u + 1) * G))
        return
    for u in prange(sh.total, num_threads=nt, schedule="dynamic"):
        took(&sh)
        group_pass(a, b, out, p, u * G, min(p.C, (u + 1) * G), ps, min(p.C, (u + nt) * G))
    note(late(&sh, nt))


cdef void run_pass(const storage* a, const storage* b, storage* out, const Plane* p,
                   const Pass* ps, char* mem, int nt) noexcept nogil:
    """A pass of sums, maps and apply (forward: a = x; backward: a = dy,
    b = x or y), with ``mem`` of pass_bytes(): the apply alone when the pass
    takes no sums (apply_pass); by channel group when ``grouped``; else by
    (channel, block) with the table of sums and the maps in mem (the sums
    alone leave their totals in ps.totals)."""
    cdef Py_ssize_t nb = p.nblocks, nu = p.C * nb, c, u
    cdef Coef* coef = <Coef*>mem
    cdef double* part = <double*>(coef + p.C)
    cdef const storage* ab = apply_b(ps, b)
    if not ps.sums:
        apply_pass(a, ab, out, p, ps, mem, nt)
        return
    if grouped(p, ps, sizeof(storage), nt):
        group_schedule(a, b, out, p, ps, nt)
        return
    cdef Shares sums = Shares(nu, 0, 0)
    cdef Shares sh = Shares(nu if ps.apply else 0, 0, 0)
    with parallel(num_threads=nt):
        for u in prange(nu, schedule="dynamic"):
            took(&sums)
            unit_sums(a, b, p, ps, u, center_of(ps, a, (u // nb) * p.S, u // nb), part)
        barrier()
        for c in prange(p.C, schedule="dynamic"):
            if ps.apply:
                coef[c] = merged_map(part, p, c, ps, a)
            else:  # the sums alone
                merge_blocks(part, p, c, &ps.totals[2 * c], &ps.totals[2 * c + 1])
        barrier()
        for u in prange(sh.total, schedule="dynamic"):  # the pairs summed last first: cached
            took(&sh)
            unit_apply(a, ab, out, p, ps, nu - 1 - u, coef)
    note(max(late(&sums, nt), late(&sh, nt)))


# ------------------------------------------------------------- entry ----
# The call (fastbn._call.Call), run by ``run``: the one entry of the
# compiled front and of the def wrappers. The front has checked
# everything; nothing here raises, and a work space that cannot be had
# returns -1 before anything is written.

cdef int call_threads(const Call* k, const storage* like) noexcept nogil:
    """The threads for call k now (fastbn._openmp.threads_for: fewer while
    the cores are busy), decided once per call."""
    cdef Plane p = make_plane(k.n, k.c, k.s, False)
    cdef Pass ps = call_pass(k, 0, <double>(k.n * k.s), like)
    return threads_for(k.n * k.c * k.s, units_of(&p, &ps), k.num_threads)


cdef inline bint l1_sized(const Call* k, const Pass* ps, int nt,
                          const storage* like) noexcept nogil:
    """A float32 forward of cold data on one thread (a ghost group's whenever
    the groups are at least as many as the threads) takes groups sized to
    the L1 cache (group_size): its apply then rereads them from L1, and the
    group it prefetches (group_pass) is the one it takes next. In-process
    A/B, random order, v = 4, at 1 and 2 threads, with out= or without:
    Ghost BN forward (32, 2048, 7, 7) 0.87-0.93x the time, (32, 256, 14, 14)
    0.88-1.00x.
    Not for float64 (1.07-1.20x: it prefetches nothing), 16-bit (0.97-0.99x:
    it prefetches nothing either, and gains too little for a rule of its
    own), several threads on one call (the plain (4, 2048, 14, 14) 1.04x at
    2: a thread's next group is a guess) nor cached data (the plain (4, 256,
    14, 14) and (8, 16, 8, 8) 1.06-1.08x: more groups, nothing to gain)."""
    return k.cold and nt == 1 and ps.kind == PASS_FORWARD and storage is float


cdef Py_ssize_t call_bytes(const Call* k, int nt, const storage* like) noexcept nogil:
    """Bytes of call k's work space on nt threads (O(C), whole cache lines;
    0 for none)."""
    cdef Plane p = make_plane(k.n, k.c, k.s, False)
    cdef Pass ps = call_pass(k, 0, <double>(k.n * k.s), like)
    p.l1_groups = l1_sized(k, &ps, nt, like)
    return (pass_bytes(&p, &ps, sizeof(storage), nt) + 63) // 64 * 64


cdef void call_in(const Call* k, int nt, char* mem, const storage* like) noexcept nogil:
    """The call k on its (N, C, S) view (a = x or dy, b = x or y in the
    backward; a frozen backward without parameter gradients reads dy alone
    unless an activation needs x) on nt threads, in the work space mem of
    call_bytes."""
    cdef const storage* ap = <const storage*>k.a
    cdef const storage* bp = <const storage*>k.b if k.mode == MODE_BACKWARD else NULL
    cdef storage* op = <storage*>k.out      # NULL for the sums alone
    cdef Plane p = make_plane(k.n, k.c, k.s, op != NULL and k.stream)
    cdef Pass ps = call_pass(k, 0, <double>(k.n * k.s), like)
    p.l1_groups = l1_sized(k, &ps, nt, like)
    set_pass(&p, &ps)
    run_pass(ap, bp, op, &p, &ps, mem, nt)


include "_entry.pxi"


def compile_args():
    """The C compiler flags this kernel module was built with, as one string
    (the columnar module of the same level is built with the same)."""
    return FASTBN_COMPILE_ARGS.decode("ascii")
