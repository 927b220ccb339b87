# The loops of the planar kernels (included by fastbn/_planar.pyx, whose
# cimports and Plane they use): runs of contiguous values, blocks of a
# channel, groups of channels. The schedules, which hand these out to the
# threads, and the entry stay in _planar.pyx.

# ---------------------------------------------------------------- runs ----
# A run is n contiguous values of one channel.

cdef inline void run_shifted_sums(const storage* x, Py_ssize_t n, double shift,
                                  double* acc_s, double* acc_q) noexcept nogil:
    """acc_s[k] += x[i] - shift, acc_q[k] += (x[i] - shift)**2, k = i % LANES
    (in the order fastbn._simd states)."""
    if storage is float:
        shifted_sums_f32(x, n, shift, acc_s, acc_q)
    elif storage is double:
        shifted_sums_f64(x, n, shift, acc_s, acc_q)
    elif storage is half:
        shifted_sums_f16(x, n, shift, acc_s, acc_q)
    else:
        shifted_sums_bf16(x, n, shift, acc_s, acc_q)


cdef inline void run_grad_sums(const storage* dy, const storage* x, Py_ssize_t n,
                               double center, double* acc_g, double* acc_c) noexcept nogil:
    """acc_g[k] += dy[i], acc_c[k] += dy[i] * (x[i] - center), k = i % LANES."""
    if storage is float:
        grad_sums_f32(dy, x, n, center, acc_g, acc_c)
    elif storage is double:
        grad_sums_f64(dy, x, n, center, acc_g, acc_c)
    elif storage is half:
        grad_sums_f16(dy, x, n, center, acc_g, acc_c)
    else:
        grad_sums_bf16(dy, x, n, center, acc_g, acc_c)


cdef inline void run_act_sums(const storage* dy, const storage* x, Py_ssize_t n, double center,
                              int kind, bint relu, const Grad* t, double* acc_g,
                              double* acc_c) noexcept nogil:
    """The sums of the inputs t turns (dy, x) into (fastbn._stats.Grad),
    lane by lane as the plain sums."""
    if storage is float:
        act_sums_f32(dy, x, n, center, kind, relu, t.center, t.scale, t.offset, t.slope,
                     t.inv_slope, acc_g, acc_c)
    elif storage is double:
        act_sums_f64(dy, x, n, center, kind, relu, t.center, t.scale, t.offset, t.slope,
                     t.inv_slope, acc_g, acc_c)
    elif storage is half:
        act_sums_f16(dy, x, n, center, kind, relu, t.center, t.scale, t.offset, t.slope,
                     t.inv_slope, acc_g, acc_c)
    else:
        act_sums_bf16(dy, x, n, center, kind, relu, t.center, t.scale, t.offset, t.slope,
                      t.inv_slope, acc_g, acc_c)


cdef inline void run_sums(int body, const storage* a, const storage* b, Py_ssize_t n,
                          double center, const Grad* t, double* acc_a,
                          double* acc_b) noexcept nogil:
    """A run's sums for the sums body (fastbn._stats.BODY_*): shifted sums of
    a (BODY_Y), else the backward's sums of (a, b) as they are (BODY_DX) or
    of the inputs t turns them into."""
    if body == BODY_Y:
        run_shifted_sums(a, n, center, acc_a, acc_b)
    elif body == BODY_DX:
        run_grad_sums(a, b, n, center, acc_a, acc_b)
    else:
        run_act_sums(a, b, n, center, GRAD_OUTPUT if body == BODY_DX_OUT else GRAD_ACT,
                     body == BODY_DX_RELU, t, acc_a, acc_b)


cdef inline void run_map_values(const Body* body, const storage* a, const storage* b,
                                storage* out, Py_ssize_t n, real hi, real lo, real s, real q,
                                real o, int kind, real neg, const Grad* t) noexcept nogil:
    """out[i] = value(body, ...) of n values (fastbn._body): the one loop
    of every planar apply, one specialization per body."""
    cdef Py_ssize_t i
    cdef double zc = 0.0, zs = 0.0, zo = 0.0, sl = 0.0, inv = 0.0
    if t != NULL:
        zc, zs, zo, sl, inv = t.center, t.scale, t.offset, t.slope, t.inv_slope
    for i in range(n):
        put(out, i, value(body, a, b, i, hi, lo, s, q, o, kind, neg, zc, zs, zo, sl, inv))


cdef inline void run_map_blocks(const Body* body, const storage* a, const storage* b,
                                storage* out, Py_ssize_t n, float hi, float lo, float s,
                                float q, float o, int kind, float neg,
                                const Grad* t) noexcept nogil:
    """run_map_values of 16-bit data in float, HALF_BLOCK values at a time:
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
        run_map_values(body, <const float*>wa, <const float*>wb, wo, m, hi, lo, s, q, o,
                       kind, neg, t)
        narrow(wo, out + j, m)
        j += m


cdef inline void run_map_in(const Body* body, const storage* a, const storage* b,
                            storage* out, Py_ssize_t n, real hi, real lo, real s, real q, real o,
                            int kind, real neg, const Grad* t) noexcept nogil:
    """run_map_values, through float blocks for 16-bit data in float."""
    if (storage is half or storage is bfloat) and real is float:
        run_map_blocks(body, a, b, out, n, hi, lo, s, q, o, kind, neg, t)
    else:
        run_map_values(body, a, b, out, n, hi, lo, s, q, o, kind, neg, t)


cdef inline void run_map_as(int body, const storage* a, const storage* b, storage* out,
                            Py_ssize_t n, real hi, real lo, real s, real q, real o, real neg,
                            int kind, const Grad* t) noexcept nogil:
    """run_map in real: one loop per body."""
    if body == BODY_Y:
        run_map_in(<BodyY*>NULL, a, b, out, n, hi, lo, s, q, o, kind, neg, t)
    elif body == BODY_Y_ACT:
        run_map_in(<BodyYAct*>NULL, a, b, out, n, hi, lo, s, q, o, kind, neg, t)
    elif body == BODY_DX:
        run_map_in(<BodyDX*>NULL, a, b, out, n, hi, lo, s, q, o, kind, neg, t)
    elif body == BODY_DX_ACT:
        run_map_in(<BodyDXAct*>NULL, a, b, out, n, hi, lo, s, q, o, kind, neg, t)
    elif body == BODY_DX_RELU:
        run_map_in(<BodyDXRelu*>NULL, a, b, out, n, hi, lo, s, q, o, kind, neg, t)
    elif body == BODY_DX_OUT:
        run_map_in(<BodyDXOut*>NULL, a, b, out, n, hi, lo, s, q, o, kind, neg, t)
    elif body == BODY_DZ:
        run_map_in(<BodyDZ*>NULL, a, b, out, n, hi, lo, s, q, o, kind, neg, t)
    else:
        run_map_in(<BodyDZRelu*>NULL, a, b, out, n, hi, lo, s, q, o, kind, neg, t)


cdef inline void run_map(int body, const storage* a, const storage* b, storage* out,
                         Py_ssize_t n, const Coef* k, const Coef32* f, const Act* act,
                         const Grad* t) noexcept nogil:
    """n values of an apply with the body (fastbn._body): y from a = x, or
    dx from a = dy and b = x (or y), of (a, b) as they are or of the inputs
    t turns them into. float32 with f != NULL computes in float (Coef32),
    anything else in double. out may be a or b."""
    if storage is not double and f != NULL:
        run_map_as(body, a, b, out, n, f.hi, f.lo, f.scale, f.slope, f.offset, act.slope32,
                   act.kind, t)
    else:
        run_map_as(body, a, b, out, n, k.center, 0.0, k.scale, k.slope, k.offset, act.slope,
                   act.kind, t)


cdef inline void run_apply(int body, const storage* a, const storage* b, storage* out,
                           Py_ssize_t n, const Coef* k, const Coef32* f, bint streaming,
                           const Act* act, const Grad* t) noexcept nogil:
    """run_map into out; through a stack buffer and streaming stores when
    ``streaming``."""
    cdef storage buf[STREAM_CHUNK]
    cdef Py_ssize_t i = 0, m
    if not streaming:
        run_map(body, a, b, out, n, k, f, act, t)
        return
    while i < n:
        m = stream_end(out, i, n, sizeof(storage)) - i
        run_map(body, a + i, at(b, i), buf, m, k, f, act, t)
        stream(out + i, buf, m * sizeof(storage))
        i += m


# -------------------------------------------------------------- blocks ----

cdef void block_sums(const storage* a, const storage* b, const Plane* p, Py_ssize_t c,
                     Py_ssize_t blk, double center, const Grad* t, double* sa,
                     double* sb) noexcept nogil:
    """Sums over block blk of channel c.

    b == NULL: shifted sums of a, sum(a - center) and sum((a - center)**2).
    Otherwise, with a = dy and b = x: sum(a) and sum(a * (b - center)), of
    the inputs t turns them into (t NULL: as they are).
    """
    cdef double acc_a[LANES]
    cdef double acc_b[LANES]
    cdef double ta = 0.0, tb = 0.0
    cdef Py_ssize_t n0, n1, s0, s1, n, k, off
    for k in range(LANES):
        acc_a[k] = 0.0
        acc_b[k] = 0.0
    block_span(p, blk, &n0, &n1, &s0, &s1)
    for n in range(n0, n1):
        off = n * p.row_stride + c * p.S + s0
        run_sums(p.sums_body, a + off, at(b, off), s1 - s0, center, t, acc_a, acc_b)
    for k in range(LANES):
        ta += acc_a[k]
        tb += acc_b[k]
    sa[0] = ta
    sb[0] = tb


cdef void block_apply(const storage* a, const storage* b, storage* out, const Plane* p,
                      Py_ssize_t c, Py_ssize_t blk, const Coef* k, const Grad* t) noexcept nogil:
    """Block blk of channel c: y from x (a = x, b == NULL), or dx from a = dy,
    b = x (or y, t GRAD_OUTPUT)."""
    cdef Py_ssize_t n0, n1, s0, s1, n, off
    cdef Coef32 f
    cdef const Coef32* fp = &f if (storage is not double and to_float(k, &f)) else NULL
    block_span(p, blk, &n0, &n1, &s0, &s1)
    for n in range(n0, n1):
        off = n * p.row_stride + c * p.S + s0
        run_apply(p.body, a + off, at(b, off), out + off, s1 - s0, k, fp, p.streaming, &p.act,
                  t)
    if p.streaming:
        fence()


cdef void merge_blocks(const double* part, const Plane* p, Py_ssize_t c,
                       double* sa, double* sb) noexcept nogil:
    """Totals of channel c from the (channel, block) table, in block order:
    the same sums as group_sums."""
    cdef Py_ssize_t blk
    cdef const double* row = part + 2 * c * p.nblocks
    cdef double ta = 0.0, tb = 0.0
    for blk in range(p.nblocks):
        ta += row[2 * blk]
        tb += row[2 * blk + 1]
    sa[0] = ta
    sb[0] = tb


# -------------------------------------------------------------- groups ----
# A group is a run of channels [c0, c1) taken as one unit: for small S the
# rows of the group's channels in one sample are contiguous (G * S values),
# so the group is read as N slabs rather than N * G short scattered rows.

cdef inline Py_ssize_t group_size(const Plane* p, Py_ssize_t bytes_per_value) noexcept nogil:
    """Channels per group: a slab of about GROUP_VALUES values, and the
    whole group small enough to stay cached between its sums and its
    normalization. One channel when S is large. With p.l1_groups, fewer
    when the group then fits GROUP_L1_BYTES (half the L1 cache: the rest
    holds its lanes and its output), in slabs of GROUP_SLAB_BYTES or more,
    two channels or more, and a multiple of 8 from 8 on (whole vectors in
    the finish). The group size changes no bit: a channel's sums are its
    own (group_sums)."""
    cdef Py_ssize_t g = min(<Py_ssize_t>GROUP_MAX, max(1, GROUP_VALUES // p.S)), g1
    g = min(g, max(1, GROUP_CACHE_BYTES // (p.N * p.S * bytes_per_value)))
    if p.l1_groups:
        g1 = GROUP_L1_BYTES // (p.N * p.S * bytes_per_value)
        if g1 >= 8:
            g1 = g1 // 8 * 8
        if g1 >= 2 and g1 * p.S * bytes_per_value >= GROUP_SLAB_BYTES:
            g = min(g, g1)
    return min(g, p.C)


cdef void group_sums(const storage* a, const storage* b, const Plane* p, Py_ssize_t c0,
                     Py_ssize_t c1, const double* center, const Grad* t,
                     double* totals) noexcept nogil:
    """totals[2j], totals[2j + 1] for channel c0 + j of the group: the block
    sums of block_sums, added in block order, with the group's rows of one
    sample read together (t: the channels' Grad, or NULL)."""
    cdef double lanes[2 * GROUP_MAX * LANES]
    cdef Py_ssize_t G = c1 - c0, blk, n0, n1, s0, s1, n, j, k, off
    cdef double ta, tb
    for j in range(2 * G):
        totals[j] = 0.0
    for blk in range(p.nblocks):
        block_span(p, blk, &n0, &n1, &s0, &s1)
        for j in range(2 * G * LANES):
            lanes[j] = 0.0
        for n in range(n0, n1):
            for j in range(G):
                off = n * p.row_stride + (c0 + j) * p.S + s0
                run_sums(p.sums_body, a + off, at(b, off), s1 - s0, center[j],
                         (&t[j] if t != NULL else NULL),
                         &lanes[2 * j * LANES], &lanes[(2 * j + 1) * LANES])
        for j in range(G):
            ta = 0.0
            tb = 0.0
            for k in range(LANES):
                ta += lanes[2 * j * LANES + k]
                tb += lanes[(2 * j + 1) * LANES + k]
            totals[2 * j] += ta
            totals[2 * j + 1] += tb


cdef void group_apply(const storage* a, const storage* b, storage* out, const Plane* p,
                      Py_ssize_t c0, Py_ssize_t c1, const Coef* coef, const Grad* t,
                      Py_ssize_t ahead) noexcept nogil:
    """The group's output, slab by slab (streamed whole when streaming); with
    each slab, the same sample's slab of the group of as many channels from
    channel ``ahead`` on is prefetched from a (none when ahead is C)."""
    cdef storage buf[GROUP_VALUES]
    cdef Coef32 f[GROUP_MAX]
    cdef bint ok[GROUP_MAX]
    cdef Py_ssize_t G = c1 - c0, blk, n, j, base, off
    if G == 1:
        for blk in range(p.nblocks):
            block_apply(a, b, out, p, c0, blk, coef, t)
        return
    for j in range(G):
        ok[j] = storage is not double and to_float(&coef[j], &f[j])
    for n in range(p.N):
        base = n * p.row_stride + c0 * p.S
        if ahead < p.C:
            prefetch_span(a + n * p.row_stride + ahead * p.S,
                          min(G, p.C - ahead) * p.S * sizeof(storage))
        for j in range(G):
            off = base + j * p.S
            run_apply(p.body, a + off, at(b, off), &buf[j * p.S] if p.streaming else out + off,
                      p.S, &coef[j], &f[j] if ok[j] else NULL, False, &p.act,
                      (&t[j] if t != NULL else NULL))
        if p.streaming:
            stream(out + base, buf, G * p.S * sizeof(storage))
    if p.streaming:
        fence()


cdef void group_pass(const storage* a, const storage* b, storage* out, const Plane* p,
                     Py_ssize_t c0, Py_ssize_t c1, const Pass* ps,
                     Py_ssize_t ahead) noexcept nogil:
    """Both sums, the maps, then the apply, of channels [c0, c1): one sweep
    from memory (forward: a = x, b NULL; backward: a = dy, b = x). A
    forward's apply prefetches the group from channel ``ahead`` on (the
    one its thread likely sums next; C for none), so that memory works
    while the cached group is normalized. Float32 only: its forward ran
    in 0.92-0.98x the time with it (plain and Ghost BN, (32, 2048, 7, 7) to
    (16, 128, 28, 28), 1 and 2 threads), where float64 read 0.94-1.10x,
    float16 1.02-1.06x (its conversions, not memory, bound it) and a
    backward, prefetching dy and x, 1.02-1.11x."""
    cdef double center[GROUP_MAX]
    cdef double totals[2 * GROUP_MAX]
    cdef double s0[GROUP_MAX]
    cdef double s1[GROUP_MAX]
    cdef CoefBlock k
    cdef Coef coef[GROUP_MAX]
    cdef Grad grad[GROUP_MAX]
    cdef const Grad* t = NULL if ps.grad == GRAD_PLAIN else grad
    cdef Py_ssize_t j
    for j in range(c1 - c0):
        center[j] = center_of(ps, a, (c0 + j) * p.S, c0 + j)
        totals[2 * j] = totals[2 * j + 1] = 0.0
        if t != NULL:
            grad[j] = grad_of(ps, c0 + j, a)
    if ps.sums:
        group_sums(a, b, p, c0, c1, center, t, totals)
    for j in range(c1 - c0):
        s0[j] = totals[2 * j]
        s1[j] = totals[2 * j + 1]
    finish_block(ps, s0, s1, center, c0, c1 - c0, &k, a)      # GROUP_MAX == MAP_BLOCK
    for j in range(c1 - c0):
        coef[j] = coef_at(&k, j)
    group_apply(a, apply_b(ps, b), out, p, c0, c1, coef, t,
                ahead if ps.kind == PASS_FORWARD and storage is float else p.C)
