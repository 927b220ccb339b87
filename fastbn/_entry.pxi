# The entry of a kernel module (included by fastbn/_planar.pyx and
# fastbn/_columnar.pyx, which define call_threads, call_bytes and
# call_in): ``run``
# dispatches a fastbn._call.Call on its dtype, and the capsule ENTRY hands
# it to the compiled front (fastbn._front). The def wrappers below run the
# two halves of a training pass through the same entry.

cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdlib cimport free, malloc

from fastbn._pass cimport param, param_at, set_param
from fastbn._simd cimport STREAM_MIN_BYTES, streams
from fastbn._stats cimport groups_update

from fastbn import _dtypes

cnp.import_array()

cdef int run(const Call* k) noexcept nogil:
    """The call k (fastbn._call.Entry): 0, or -1 when its work space could
    not be allocated (nothing written). Whether the output streams, and
    whether the data are cold, is decided here, once, by the size of the
    whole call (a ghost group's call streams as its batch's would), for
    every dtype: 16-bit outputs
    streamed ran (64, 64, 56, 56) float16 inference with out= in 0.65x the
    time of stores through the cache, on inputs colder than the last-level
    cache (benchmarks/ab.py; an earlier reading of 1.8x the other way was
    taken on buffers that stayed in that cache)."""
    cdef Call c = k[0]
    cdef Py_ssize_t itemsize = (8 if k.dtype == DTYPE_FLOAT64 else 4 if k.dtype == DTYPE_FLOAT32
                                else 2)
    cdef Py_ssize_t nbytes = k.n * k.c * k.s * itemsize
    c.stream = streams(k.stream, k.out, k.a, k.b if k.mode == MODE_BACKWARD else NULL, nbytes)
    c.cold = nbytes >= STREAM_MIN_BYTES
    if k.dtype == DTYPE_FLOAT32:
        return run_as(&c, <const float*>NULL)
    if k.dtype == DTYPE_FLOAT64:
        return run_as(&c, <const double*>NULL)
    if k.dtype == DTYPE_FLOAT16:
        return run_as(&c, <const half*>NULL)
    return run_as(&c, <const bfloat*>NULL)


cdef inline int run_as(const Call* k, const storage* like) noexcept nogil:
    return run_groups(k, like) if k.groups > 1 else call_of(k, like)


cdef int call_of(const Call* k, const storage* like) noexcept nogil:
    """The call k in a work space of its own: 0, or -1 when the work space
    could not be allocated (nothing written)."""
    cdef int nt = call_threads(k, like)
    cdef Py_ssize_t size = call_bytes(k, nt, like)
    cdef char* mem = NULL
    if size:
        mem = <char*>malloc(size)
        if mem == NULL:
            return -1
    call_in(k, nt, mem, like)
    free(mem)
    return 0


cdef int run_groups(const Call* k, const storage* like) noexcept nogil:
    """Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train
    longer, generalize better", arXiv:1705.08741, Algorithm 1): the training
    pass k on each of its k.groups consecutive row blocks (virtual batches),
    each with its own statistics ((groups, C) arrays). With at least as many
    groups as threads, the groups share the threads out, one thread each
    (one parallel region, not one per group); otherwise they run in order,
    each on all the threads. The threads are those threads_for gives the
    whole batch: a batch too small for two (a tiny call) runs its groups
    on the calling thread, waking none. Either way a group's bits are
    those of its own call. The running statistics update once, from the
    average of the groups' moments; dgamma and dbeta are summed over the
    groups in double, in order, and rounded once.

    One allocation serves the call: the groups' moments (or their dgamma
    and dbeta), then one group's work space per thread, reused from group
    to group. A malloc and free per group gave the memory back to the
    system at every call and faulted it in again: (256, 4096) float32
    took 158 page faults a call. 0, or -1 when the work space could not
    be allocated (then nothing is written)."""
    cdef Py_ssize_t G = k.groups, C = k.c, j, c
    cdef Py_ssize_t size = (k.n // G) * k.c * k.s     # values per group
    cdef bint forward = k.mode == MODE_FORWARD
    cdef bint tracked = forward and k.running_mean != NULL
    cdef int nt = threads_for(k.n * k.c * k.s, G, k.num_threads)
    cdef bint shared = G >= nt > 1
    cdef Py_ssize_t head = (2 * G * C * sizeof(double) + 63) // 64 * 64
    cdef Py_ssize_t space
    cdef int group_nt
    cdef Call* calls = <Call*>malloc(G * sizeof(Call))
    cdef char* mem = NULL
    # forward: the (G, C, 2) moments; backward: dgamma and dbeta per group
    cdef double* work
    cdef double dg, db
    if calls == NULL:
        return -1
    for j in range(G):
        calls[j] = k[0]
        calls[j].groups = 1
        calls[j].n = k.n // G
        calls[j].num_threads = 1 if shared else k.num_threads
        calls[j].a = <const storage*>k.a + j * size
        calls[j].out = <storage*>k.out + j * size
    # every group's call has the same shape (and mode: the pointers set below
    # do not change what its pass does): its threads are decided once
    group_nt = call_threads(&calls[0], like)
    space = call_bytes(&calls[0], group_nt, like)
    mem = <char*>malloc(head + (nt if shared else 1) * space)
    if mem == NULL:
        free(calls)
        return -1
    work = <double*>mem
    for j in range(G):
        if forward:
            calls[j].save_mean = param_at(k.save_mean, j * C, like)
            calls[j].save_invstd = param_at(k.save_invstd, j * C, like)
            calls[j].moments = work + 2 * j * C if tracked else NULL
        else:
            calls[j].b = <const storage*>k.b + j * size
            calls[j].mean = param_at(<void*>k.mean, j * C, like)    # NULL from the output
            calls[j].invstd = param_at(<void*>k.invstd, j * C, like)
            calls[j].dgamma = param_at(work, 2 * j * C, like)     # in the parameters' type
            calls[j].dbeta = param_at(work, (2 * j + 1) * C, like)
        if k.renorm:
            calls[j].r = param_at(k.r, j * C, like)
            calls[j].d = param_at(k.d, j * C, like)
    if shared:
        for j in prange(G, num_threads=nt, schedule="static"):
            call_in(&calls[j], group_nt, mem + head + omp_get_thread_num() * space, like)
    else:
        for j in range(G):
            call_in(&calls[j], group_nt, mem + head, like)
    if tracked and storage is double:
        groups_update(work, G, C, calls[0].n * k.s, k.unbiased, k.factor,
                      <double*>k.running_mean, <double*>k.running_var)
    elif tracked:
        groups_update(work, G, C, calls[0].n * k.s, k.unbiased, k.factor,
                      <float*>k.running_mean, <float*>k.running_var)
    elif not forward:
        for c in range(C):
            dg = db = 0.0
            for j in range(G):
                dg += param(work, 2 * j * C + c, like)
                db += param(work, (2 * j + 1) * C + c, like)
            set_param(k.dgamma, c, dg, like)
            set_param(k.dbeta, c, db, like)
    free(mem)
    free(calls)
    return 0


ENTRY = PyCapsule_New(<void*>run, ENTRY_NAME, NULL)


# ----------------------------------------------------------- wrappers ----
# The two halves of a training pass, for fastbn.distributed (a reduction
# across processes between them): one Call each, run by ``run`` as the
# front's calls are. Private: fastbn.distributed has checked the values;
# these check only what memory safety needs (types, dtypes, contiguity).

cdef const void* data_of(object arr, cnp.ndarray like, str name, bint param=False) except? NULL:
    """arr's data (NULL for None), once it is a C-contiguous array of
    like's dtype (of its parameters' dtype when ``param``:
    fastbn._dtypes) with like's channels (or, a second input, like's
    shape)."""
    cdef cnp.ndarray a
    cdef tuple shape = (<object>like).shape
    cdef object dtype = (<object>like).dtype
    if arr is None:
        return NULL
    a = <cnp.ndarray?>arr
    if param:
        dtype = _dtypes.parameters(dtype)
    if ((<object>a).dtype != dtype or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or (<object>a).shape != (shape if a.ndim != 1 else shape[1:2])):
        raise ValueError(f"{name}: expected a C-contiguous {dtype} array of shape "
                         f"{shape if a.ndim != 1 else shape[1:2]}, got {arr.dtype} "
                         f"{arr.shape}")
    return cnp.PyArray_DATA(a)


cdef Call half_call(cnp.ndarray a, object b, int steps, int num_threads, int grad,
                    int activation, double negative_slope, object gamma, object beta,
                    object mean, object invstd, object r, object d) except *:
    """The Call of one half (steps) of a training pass: a forward (b None,
    a = x) or a backward (a = dy, b = x or y), on a's kernel view; with r
    and d, a backward of Batch Renormalization."""
    cdef Call k
    cdef object dtype = (<object>a).dtype
    if a.ndim not in (2, 3) or not _dtypes.is_data(dtype):
        raise ValueError(f"a: expected a 2-D or 3-D array of dtype {_dtypes.DATA_NAMES}, "
                         f"got {dtype} with {a.ndim} dimensions")
    k.a = data_of(a, a, "a")
    k.b = data_of(b, a, "b")
    k.mode = MODE_FORWARD if b is None else MODE_BACKWARD
    k.steps = steps
    k.dtype = (DTYPE_FLOAT32 if dtype == _dtypes.FLOAT32 else DTYPE_FLOAT64
               if dtype == _dtypes.FLOAT64 else DTYPE_FLOAT16 if dtype == _dtypes.FLOAT16
               else DTYPE_BFLOAT16)
    k.n = a.shape[0]
    k.c = a.shape[1]
    k.s = a.shape[2] if a.ndim == 3 else 1
    k.out = NULL
    k.gamma = data_of(gamma, a, "gamma", True)
    k.beta = data_of(beta, a, "beta", True)
    k.mean = data_of(mean, a, "mean", True)
    k.invstd = data_of(invstd, a, "invstd", True)
    k.save_mean = k.save_invstd = k.running_mean = k.running_var = NULL
    k.dgamma = k.dbeta = NULL
    k.totals = NULL
    k.maps = NULL
    k.r = <void*>data_of(r, a, "r", True)
    k.d = <void*>data_of(d, a, "d", True)
    k.rmax = k.rmin = 1.0
    k.dmax = 0.0
    k.renorm = r is not None
    if k.renorm and (b is None or k.d == NULL):
        raise ValueError("r and d: the backward of Batch Renormalization takes both")
    k.groups = 1
    k.moments = NULL
    k.eps = k.factor = 0.0
    k.unbiased = k.frozen = False
    k.param_grads = True
    k.grad = GRAD_PLAIN if b is None else grad
    k.act = activation
    k.slope = negative_slope
    k.num_threads = num_threads
    k.stream = False
    return k


cdef void run_half(Call* k) except *:
    cdef int rc
    with nogil:
        rc = run(k)
    if rc != 0:
        raise MemoryError("fastbn: the kernel's work space could not be allocated")


def sums(cnp.ndarray a, object b, double[:, ::1] out, int num_threads, int grad=GRAD_PLAIN,
         int activation=ACT_NONE, double negative_slope=0.0, object gamma=None,
         object beta=None, object mean=None, object invstd=None, object r=None,
         object d=None):
    """Per-channel sums of a kernel view (N, C, S) or (M, C) into out (C, 2),
    in double: b None, ``sum(a - a0)`` and ``sum((a - a0)**2)`` around a0,
    the channel's first value (a[0, c, 0] or a[0, c]); otherwise ``sum(a)``
    and ``sum(a * (b - mean))`` (a = dy, b = x; b = y and center 0 with
    GRAD_OUTPUT) of the inputs ``grad`` turns (a, b) into (with gamma,
    beta, mean and invstd, and r and d of Batch Renormalization). The first
    half of a training pass; the same sums, to the bit, as the fused passes
    take."""
    cdef Call k = half_call(a, b, STEP_SUMS, num_threads, grad, activation, negative_slope,
                            gamma, beta, mean, invstd, r, d)
    if out.shape[0] != k.c or out.shape[1] != 2:
        raise ValueError(f"out: expected ({k.c}, 2), got ({out.shape[0]}, {out.shape[1]})")
    k.totals = &out[0, 0]
    run_half(&k)


def apply(cnp.ndarray a, object b, object out, const double[:, ::1] coef, int activation,
          double negative_slope, int num_threads, bint stream, int grad=GRAD_PLAIN,
          object gamma=None, object beta=None, object mean=None, object invstd=None,
          object r=None, object d=None):
    """The second half of a training pass with the per-channel maps coef (C,
    4) = (center, scale, slope, offset) (fastbn._stats.Coef): b None, out =
    act((a - center) * scale + offset), the activation fused into a
    forward; otherwise out = scale * a - slope * (b - center) - offset (a =
    dy, b = x) of the inputs ``grad`` turns (a, b) into (see sums). out is
    like a, and may be a; streamed when ``stream`` and large."""
    cdef Call k = half_call(a, b, STEP_APPLY, num_threads, grad, activation, negative_slope,
                            gamma, beta, mean, invstd, r, d)
    if coef.shape[0] != k.c or coef.shape[1] != 4:
        raise ValueError(f"coef: expected ({k.c}, 4), got ({coef.shape[0]}, {coef.shape[1]})")
    k.out = <void*>data_of(out, a, "out")
    k.maps = &coef[0, 0]
    k.stream = stream
    run_half(&k)
