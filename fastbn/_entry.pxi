# The entry of a kernel module (included by fastbn/_planar.pyx and
# fastbn/_columnar.pyx, which define call_of): ``run`` dispatches a
# fastbn._call.Call on its dtype, and the capsule ENTRY hands it to the
# compiled front (fastbn._front). The def wrappers below run the two halves
# of a training pass through the same entry.

cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdlib cimport free, malloc

from fastbn._simd cimport streams
from fastbn._stats cimport groups_update
from fastbn._views cimport moved

cnp.import_array()

cdef int run(const Call* k) noexcept nogil:
    """The call k (fastbn._call.Entry): 0, or -1 when its work space could
    not be allocated (nothing written). Whether the output streams is
    decided here, once, by the size of the whole call (a ghost group's
    call streams as its batch's would)."""
    cdef Call c = k[0]
    c.stream = streams(k.stream, k.out, k.a, k.b if k.mode == MODE_BACKWARD else NULL,
                       k.n * k.c * k.s * (4 if k.dtype == DTYPE_FLOAT32 else 8))
    if k.dtype == DTYPE_FLOAT32:
        return run_groups(&c, <const float*>NULL) if c.groups > 1 else call_of(&c, <const float*>NULL)
    return run_groups(&c, <const double*>NULL) if c.groups > 1 else call_of(&c, <const double*>NULL)


cdef int run_groups(const Call* k, const floating* like) noexcept nogil:
    """Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train
    longer, generalize better", arXiv:1705.08741, Algorithm 1): the training
    pass k on each of its k.groups consecutive row blocks (virtual batches),
    each with its own statistics ((groups, C) arrays). With at least as many
    groups as threads, the groups share the threads out, one thread each
    (one parallel region, not one per group); otherwise they run in order,
    each on all the threads. Either way a group's bits are those of its own
    call. The running statistics update once, from the average of the
    groups' moments; dgamma and dbeta are summed over the groups in double,
    in order, and rounded once. 0, or -1 when a work space could not be
    allocated (then the running statistics, dgamma and dbeta are not
    written)."""
    cdef Py_ssize_t G = k.groups, C = k.c, j, c
    cdef Py_ssize_t size = (k.n // G) * k.c * k.s     # values per group
    cdef bint forward = k.mode == MODE_FORWARD
    cdef bint tracked = forward and k.running_mean != NULL
    cdef bint shared = G >= k.num_threads > 1
    # forward: the (G, C, 2) moments; backward: dgamma and dbeta per group
    cdef double* work = <double*>malloc(2 * G * C * sizeof(double))
    cdef Call* calls = <Call*>malloc(G * sizeof(Call))
    cdef int* rcs = <int*>malloc(G * sizeof(int))
    cdef floating* grads = <floating*>work
    cdef double dg, db
    cdef int rc = 0
    if work == NULL or calls == NULL or rcs == NULL:
        free(work)
        free(calls)
        free(rcs)
        return -1
    for j in range(G):
        calls[j] = k[0]
        calls[j].groups = 1
        calls[j].n = k.n // G
        calls[j].num_threads = 1 if shared else k.num_threads
        calls[j].a = <const floating*>k.a + j * size
        calls[j].out = <floating*>k.out + j * size
        if forward:
            calls[j].save_mean = <floating*>k.save_mean + j * C
            calls[j].save_invstd = <floating*>k.save_invstd + j * C
            calls[j].moments = work + 2 * j * C if tracked else NULL
        else:
            calls[j].b = <const floating*>k.b + j * size
            calls[j].mean = moved(k.mean, j * C, like)          # NULL from the output
            calls[j].invstd = <const floating*>k.invstd + j * C
            calls[j].dgamma = grads + 2 * j * C
            calls[j].dbeta = grads + (2 * j + 1) * C
        if k.renorm:
            calls[j].r = <floating*>k.r + j * C
            calls[j].d = <floating*>k.d + j * C
    if shared:
        for j in prange(G, num_threads=k.num_threads, schedule="static"):
            rcs[j] = call_of(&calls[j], like)
    else:
        for j in range(G):
            rcs[j] = call_of(&calls[j], like)
    for j in range(G):
        if rcs[j] != 0:
            rc = -1
    if rc == 0 and tracked:
        groups_update(work, G, C, k.factor, <floating*>k.running_mean,
                      <floating*>k.running_var)
    elif rc == 0 and not forward:
        for c in range(C):
            dg = db = 0.0
            for j in range(G):
                dg += grads[2 * j * C + c]
                db += grads[(2 * j + 1) * C + c]
            (<floating*>k.dgamma)[c] = <floating>dg
            (<floating*>k.dbeta)[c] = <floating>db
    free(work)
    free(calls)
    free(rcs)
    return rc


ENTRY = PyCapsule_New(<void*>run, ENTRY_NAME, NULL)


# ----------------------------------------------------------- wrappers ----
# The two halves of a training pass, for fastbn.distributed (a reduction
# across processes between them): one Call each, run by ``run`` as the
# front's calls are. Private: fastbn.distributed has checked the values;
# these check only what memory safety needs (types, dtypes, contiguity).

cdef const void* data_of(object arr, cnp.ndarray like, str name) except? NULL:
    """arr's data (NULL for None), once it is a C-contiguous array of
    like's dtype with like's channels (or, a second input, like's shape)."""
    cdef cnp.ndarray a
    cdef tuple shape = (<object>like).shape
    if arr is None:
        return NULL
    a = <cnp.ndarray?>arr
    if (cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(like) or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or (<object>a).shape != (shape if a.ndim != 1 else shape[1:2])):
        raise ValueError(f"{name}: expected a C-contiguous {like.dtype} array of shape "
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
    if a.ndim not in (2, 3) or cnp.PyArray_TYPE(a) not in (cnp.NPY_FLOAT, cnp.NPY_DOUBLE):
        raise ValueError(f"a: expected a 2-D or 3-D float32 or float64 array, got "
                         f"{(<object>a).dtype} with {a.ndim} dimensions")
    k.a = data_of(a, a, "a")
    k.b = data_of(b, a, "b")
    k.mode = MODE_FORWARD if b is None else MODE_BACKWARD
    k.steps = steps
    k.dtype = DTYPE_FLOAT32 if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT else DTYPE_FLOAT64
    k.n = a.shape[0]
    k.c = a.shape[1]
    k.s = a.shape[2] if a.ndim == 3 else 1
    k.out = NULL
    k.gamma = data_of(gamma, a, "gamma")
    k.beta = data_of(beta, a, "beta")
    k.mean = data_of(mean, a, "mean")
    k.invstd = data_of(invstd, a, "invstd")
    k.save_mean = k.save_invstd = k.running_mean = k.running_var = NULL
    k.dgamma = k.dbeta = NULL
    k.totals = NULL
    k.maps = NULL
    k.r = <void*>data_of(r, a, "r")
    k.d = <void*>data_of(d, a, "d")
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
