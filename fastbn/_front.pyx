"""The compiled front of the public functions: checks, view, dispatch.

Each function of :mod:`fastbn.functional` (and a layer's forward and
backward) tries the fast path here first. For a well-formed call, the
checks run in C, once: every array an exact ``numpy.ndarray``,
C-contiguous, aligned, in native byte order, of the call's dtype and shape;
every number of its exact built-in type (``float``, ``int``, ``bool``) and
in range; no written array sharing a byte with another argument, except
``out`` being the very input it may replace. Then the outputs are
allocated, one :c:type:`fastbn._call.Call` says what to do, and the entry
of the kernel family and level that :mod:`fastbn._dispatch` chose runs it
(without the GIL from GIL_FREE_MIN_VALUES values on).

Anything else makes the fast path return None, and the caller runs the
full checks of :mod:`fastbn._checks`, which name what is wrong or make the
contiguous copies the call needs, then calls the same core here unchecked
(``*_unchecked``). The fast path refuses more than the full checks, never
less, so the messages, the exception types and the all-or-nothing rule are
those of :mod:`fastbn._checks`; the decisions of a call (dtype path, kernel
family, view, thread count, activation, gradient kind, variant) are made in
the cores below, once. The variants' fast paths are in _front_variants.pxi.
"""

cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.math cimport isfinite
from libc.stdint cimport INT64_MAX, int64_t
from libc.string cimport memcpy

from fastbn._call cimport (ACT_LEAKY_RELU, ACT_NONE, ACT_RELU, DTYPE_BFLOAT16, DTYPE_FLOAT16,
                           DTYPE_FLOAT32, DTYPE_FLOAT64,
                           ENTRY_NAME, GRAD_ACT, GRAD_OUTPUT, GRAD_PLAIN, MODE_BACKWARD, STEPS_ALL,
                           MODE_FORWARD, MODE_INFERENCE, Call, Entry)
from fastbn._openmp cimport resolved_threads

from fastbn import _dispatch, _dtypes

cnp.import_array()

#: activation names -> the kernels' codes (ACT_* of fastbn/_call.pxd), the one table
ACTIVATIONS = {None: ACT_NONE, "relu": ACT_RELU, "leaky_relu": ACT_LEAKY_RELU}
#: what a backward's second input is -> the kernels' codes (GRAD_* of fastbn/_call.pxd)
GRADIENTS = {"plain": GRAD_PLAIN, "activated": GRAD_ACT, "output": GRAD_OUTPUT}

cdef Entry PLANAR = NULL
cdef Entry COLUMNAR = NULL


def select(planar, columnar):
    """Call the kernel entries of the modules ``planar`` and ``columnar``
    (their ``ENTRY`` capsules): fastbn._dispatch's choice, at import; a
    test selects another kernel level this way."""
    global PLANAR, COLUMNAR
    PLANAR = <Entry>PyCapsule_GetPointer(planar.ENTRY, ENTRY_NAME)
    COLUMNAR = <Entry>PyCapsule_GetPointer(columnar.ENTRY, ENTRY_NAME)


select(_dispatch.planar, _dispatch.columnar)

include "_front_checks.pxi"


# --------------------------------------------------------------- cores ----
# A call's decisions, made once: the view and kernel family, the dtype
# path, the outputs; then the kernel entry without the GIL. The arguments
# are known good (checked above or by fastbn._checks).

cdef inline Entry view(cnp.ndarray x, int ca, Call* k) noexcept:
    """The kernel family of x with its channels on axis ca, and the view
    (k.n, k.c, k.s): columnar (M, C) for channels last and for a spatial
    size of 1, planar (N, C, S) otherwise."""
    cdef int ndim = cnp.PyArray_NDIM(x), d
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    cdef Py_ssize_t size = cnp.PyArray_SIZE(x), spatial = 1
    cdef int t = cnp.PyArray_TYPE(x)
    k.dtype = (DTYPE_FLOAT32 if t == cnp.NPY_FLOAT else DTYPE_FLOAT64 if t == cnp.NPY_DOUBLE
               else DTYPE_FLOAT16 if t == cnp.NPY_FLOAT16 else DTYPE_BFLOAT16)
    k.c = dims[ca]
    k.s = 1
    if ca == ndim - 1:
        k.n = size // k.c
        return COLUMNAR
    for d in range(2, ndim):
        spatial *= dims[d]
    k.n = dims[0]
    if spatial == 1:
        return COLUMNAR
    k.s = spatial
    return PLANAR


cdef inline const void* data_of(object a) noexcept:
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline cnp.ndarray like(cnp.ndarray x):
    """A new C-contiguous array of x's shape and dtype."""
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)


cdef inline cnp.ndarray per_channel(const Call* k, int typenum):
    cdef cnp.npy_intp c = k.c
    return cnp.PyArray_EMPTY(1, &c, typenum, 0)


cdef enum:
    # Calls on fewer values run with the GIL held: they take a few
    # microseconds, less than letting another Python thread in and taking
    # the GIL back would cost.
    GIL_FREE_MIN_VALUES = 32768


cdef inline void run(Entry entry, const Call* k) except *:
    cdef int rc
    if k.n * k.c * k.s < GIL_FREE_MIN_VALUES:
        rc = entry(k)
    else:
        with nogil:
            rc = entry(k)
    if rc != 0:
        raise MemoryError("fastbn: cannot allocate the work space of a kernel call")


cdef struct Variant:
    # The BatchNorm variants of fastbn.variants, for the cores below.
    bint renorm                # Batch Renormalization: r and d, clipped as below
    double rmax, rmin, dmax
    Py_ssize_t groups          # Ghost Batch Normalization: virtual batches (1: the batch)
    bint grouped               # the statistics are (groups, C) arrays (else (C,))

cdef Variant PLAIN
PLAIN.renorm = PLAIN.grouped = False
PLAIN.rmax = PLAIN.rmin = 1.0
PLAIN.dmax = 0.0
PLAIN.groups = 1


cdef inline void variant_of(Call* k, const Variant* v) noexcept:
    """The call's fields that the plain layer does not use: none of the
    halves of a pass, the variant v."""
    k.steps = STEPS_ALL
    k.totals = NULL
    k.maps = NULL
    k.moments = NULL
    k.r = k.d = NULL
    k.renorm = v.renorm
    k.rmax, k.rmin, k.dmax = v.rmax, v.rmin, v.dmax
    k.groups = v.groups


cdef inline cnp.ndarray statistic(const Call* k, int typenum, const Variant* v):
    """A new per-channel statistic: (C,), or (groups, C) for a grouped variant."""
    cdef cnp.npy_intp dims[2]
    dims[0] = v.groups
    dims[1] = k.c
    if v.grouped:
        return cnp.PyArray_EMPTY(2, dims, typenum, 0)
    return cnp.PyArray_EMPTY(1, &dims[1], typenum, 0)


cdef tuple forward_core(cnp.ndarray x, object gamma, object beta, object running_mean,
                        object running_var, object momentum, object num_batches_tracked,
                        double eps, bint unbiased, int act, double slope, int ca, object out,
                        int nthreads, const Variant* v=&PLAIN):
    """(y, mean, invstd), and r and d with Batch Renormalization."""
    cdef Call k
    cdef Entry entry = view(x, ca, &k)
    cdef int typenum = param_type(cnp.PyArray_TYPE(x))
    cdef cnp.ndarray y = like(x) if out is None else <cnp.ndarray>out
    cdef cnp.ndarray mean = statistic(&k, typenum, v), invstd = statistic(&k, typenum, v)
    cdef cnp.ndarray r = statistic(&k, typenum, v) if v.renorm else None
    cdef cnp.ndarray d = statistic(&k, typenum, v) if v.renorm else None
    cdef char* count = NULL  # the batch count: one int64, read and written with memcpy
    cdef int64_t seen = 0    # (the full checks take an unaligned one)
    if num_batches_tracked is not None and running_mean is not None:
        count = cnp.PyArray_BYTES(<cnp.ndarray>num_batches_tracked)
        memcpy(&seen, count, sizeof(int64_t))
    k.mode = MODE_FORWARD
    variant_of(&k, v)
    k.r = <void*>data_of(r)
    k.d = <void*>data_of(d)
    k.a = cnp.PyArray_DATA(x)
    k.b = NULL
    k.out = cnp.PyArray_DATA(y)
    k.gamma = data_of(gamma)
    k.beta = data_of(beta)
    k.mean = k.invstd = NULL
    k.save_mean = cnp.PyArray_DATA(mean)
    k.save_invstd = cnp.PyArray_DATA(invstd)
    k.running_mean = <void*>data_of(running_mean)
    k.running_var = <void*>data_of(running_var)
    k.dgamma = k.dbeta = NULL
    k.eps = eps
    # the weight of the batch: momentum, or 1 / (batches seen + 1) (a cumulative average)
    if running_mean is None:
        k.factor = 0.0
    elif momentum is not None:
        k.factor = <double>momentum
    else:
        k.factor = 1.0 / (<double>seen + 1.0)
    k.unbiased = unbiased
    k.frozen = k.param_grads = False
    k.grad = GRAD_PLAIN
    k.act = act
    k.slope = slope
    k.num_threads = nthreads
    k.stream = out is not None
    run(entry, &k)
    if count != NULL:
        seen += 1
        memcpy(count, &seen, sizeof(int64_t))
    if v.renorm:
        return y, mean, invstd, r, d
    return y, mean, invstd


cdef object inference_core(cnp.ndarray x, object gamma, object beta, object running_mean,
                           object running_var, double eps, int act, double slope, int ca,
                           object out, int nthreads):
    cdef Call k
    cdef Entry entry = view(x, ca, &k)
    cdef cnp.ndarray y = like(x) if out is None else <cnp.ndarray>out
    k.mode = MODE_INFERENCE
    variant_of(&k, &PLAIN)
    k.a = cnp.PyArray_DATA(x)
    k.b = NULL
    k.out = cnp.PyArray_DATA(y)
    k.gamma = data_of(gamma)
    k.beta = data_of(beta)
    k.mean = k.invstd = NULL
    k.save_mean = k.save_invstd = NULL
    k.running_mean = <void*>data_of(running_mean)
    k.running_var = <void*>data_of(running_var)
    k.dgamma = k.dbeta = NULL
    k.eps = eps
    k.factor = 0.0
    k.unbiased = k.frozen = k.param_grads = False
    k.grad = GRAD_PLAIN
    k.act = act
    k.slope = slope
    k.num_threads = nthreads
    k.stream = out is not None
    run(entry, &k)
    return y


cdef tuple backward_core(cnp.ndarray dy, cnp.ndarray x, object gamma, object beta,
                         object mean, object invstd, int act, double slope, bint training,
                         bint param_grads, bint from_output, int ca, object out,
                         int nthreads, const Variant* v=&PLAIN, object r=None, object d=None):
    """The backward (from_output: x is the output y and mean is None). With
    training and param_grads False and no activation, x is not read. A
    variant's backward is a training one, with r and d for Batch
    Renormalization and (groups, C) statistics for Ghost Batch
    Normalization."""
    cdef Call k
    cdef Entry entry = view(x, ca, &k)
    cdef int typenum = param_type(cnp.PyArray_TYPE(x))
    cdef bint reads_x = training or param_grads or act != ACT_NONE
    cdef cnp.ndarray dx = like(dy) if out is None else <cnp.ndarray>out
    cdef object dgamma = per_channel(&k, typenum) if reads_x else None
    cdef object dbeta = per_channel(&k, typenum) if reads_x else None
    k.mode = MODE_BACKWARD
    variant_of(&k, v)
    k.r = <void*>data_of(r)
    k.d = <void*>data_of(d)
    k.a = cnp.PyArray_DATA(dy)
    k.b = cnp.PyArray_DATA(x if reads_x else dy)
    k.out = cnp.PyArray_DATA(dx)
    k.gamma = data_of(gamma)
    k.beta = data_of(beta) if act != ACT_NONE or from_output else NULL
    k.mean = data_of(mean)
    k.invstd = data_of(invstd)
    k.save_mean = k.save_invstd = k.running_mean = k.running_var = NULL
    k.dgamma = <void*>data_of(dgamma)
    k.dbeta = <void*>data_of(dbeta)
    k.eps = k.factor = 0.0
    k.unbiased = False
    k.frozen = not training
    k.param_grads = reads_x
    k.grad = GRAD_OUTPUT if from_output else GRAD_ACT if act != ACT_NONE else GRAD_PLAIN
    k.act = act
    k.slope = slope
    k.num_threads = nthreads
    k.stream = out is not None
    run(entry, &k)
    if not param_grads:
        return dx, None, None
    return dx, dgamma, dbeta


# --------------------------------------------------------- fast paths ----

cdef struct Args:
    # A call's numbers once its fast checks passed.
    int ca, act, nthreads
    double eps, slope


cdef int forward_args(Args* r, x, gamma, beta, eps, running_mean, running_var, momentum,
                      num_batches_tracked, unbiased, activation, negative_slope, channel_axis,
                      out, num_threads, tuple ndims, Py_ssize_t num_features,
                      object dtype) except -2:
    """The fast checks of a training forward: 0 with r filled in, or -1."""
    cdef int typenum, pt
    cdef Py_ssize_t c
    r.ca = input_of(x, channel_axis, ndims, num_features, dtype)
    if r.ca < 0:
        return -1
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    pt = param_type(typenum)
    c = cnp.PyArray_DIMS(<cnp.ndarray>x)[r.ca]
    if cnp.PyArray_SIZE(<cnp.ndarray>x) // c <= 1 or not positive(eps, &r.eps):
        return -1
    if not (momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0)):
        return -1
    r.nthreads = threads_of(num_threads)
    if r.nthreads == 0 or not is_bool(unbiased) or not activation_of(
            activation, negative_slope, &r.act, &r.slope):
        return -1
    if not (optional_vector(gamma, pt, c) and optional_vector(beta, pt, c)):
        return -1
    if running_mean is not None or running_var is not None:
        if not (vector(running_mean, pt, c, True) and vector(running_var, pt, c, True)
                and apart(running_mean, running_var)):
            return -1
        for a in (x, gamma, beta):
            if not (apart(running_mean, a) and apart(running_var, a)):
                return -1
        if num_batches_tracked is None:
            if momentum is None:
                return -1
        elif not counter_ok(num_batches_tracked):
            return -1
        else:
            for a in (x, gamma, beta, running_mean, running_var):
                if not apart(num_batches_tracked, a):
                    return -1
    elif num_batches_tracked is not None and not counter_ok(num_batches_tracked):
        return -1
    if not result_ok(out, <cnp.ndarray>x, typenum, x, None,
                     (gamma, beta, running_mean, running_var, num_batches_tracked)):
        return -1
    return 0


def forward(x, gamma, beta, eps, running_mean, running_var, momentum, num_batches_tracked,
            unbiased, activation, negative_slope, channel_axis, out, num_threads,
            tuple ndims=None, Py_ssize_t num_features=-1, object dtype=None):
    """:func:`fastbn.batch_norm_forward` for a call that passes the fast
    checks, else None. A layer adds its own constraints: the numbers of
    dimensions it takes (``ndims``, a tuple), ``num_features`` and its
    ``dtype``."""
    cdef Args a
    if forward_args(&a, x, gamma, beta, eps, running_mean, running_var, momentum,
                    num_batches_tracked, unbiased, activation, negative_slope, channel_axis,
                    out, num_threads, ndims, num_features, dtype) < 0:
        return None
    return forward_core(<cnp.ndarray>x, gamma, beta, running_mean, running_var, momentum,
                        num_batches_tracked, a.eps, unbiased, a.act, a.slope, a.ca, out,
                        a.nthreads)


def inference(x, gamma, beta, running_mean, running_var, eps, activation, negative_slope,
              channel_axis, out, num_threads, tuple ndims=None,
              Py_ssize_t num_features=-1, object dtype=None):
    """:func:`fastbn.batch_norm_inference` for a call that passes the fast
    checks, else None (a layer's constraints as in :func:`forward`)."""
    cdef int ca = input_of(x, channel_axis, ndims, num_features, dtype), act, nthreads, typenum, pt
    cdef double e, slope
    cdef Py_ssize_t c
    if ca < 0:
        return None
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    pt = param_type(typenum)
    c = cnp.PyArray_DIMS(<cnp.ndarray>x)[ca]
    nthreads = threads_of(num_threads)
    if nthreads == 0 or not positive(eps, &e) or not activation_of(activation, negative_slope,
                                                                   &act, &slope):
        return None
    if not (optional_vector(gamma, pt, c) and optional_vector(beta, pt, c)
            and vector(running_mean, pt, c, False) and vector(running_var, pt, c, False)):
        return None
    if not result_ok(out, <cnp.ndarray>x, typenum, x, None,
                     (gamma, beta, running_mean, running_var)):
        return None
    return inference_core(<cnp.ndarray>x, gamma, beta, running_mean, running_var, e, act,
                          slope, ca, out, nthreads)


cdef int gradient_args(Args* r, dy, x, gamma, beta, activation, negative_slope,
                       channel_axis, num_threads) except -2:
    """The fast checks that every backward makes (x is y from the output):
    0 with r filled in (not r.eps), or -1."""
    cdef int typenum, pt
    cdef Py_ssize_t c
    r.ca = gradient_input_of(dy, x, channel_axis)
    if r.ca < 0:
        return -1
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    pt = param_type(typenum)
    c = cnp.PyArray_DIMS(<cnp.ndarray>x)[r.ca]
    r.nthreads = threads_of(num_threads)
    if r.nthreads == 0 or not activation_of(activation, negative_slope, &r.act, &r.slope):
        return -1
    if not (optional_vector(gamma, pt, c) and optional_vector(beta, pt, c)):
        return -1
    return 0


def backward(dy, x, gamma, mean, invstd, beta, activation, negative_slope, training,
             param_grads, channel_axis, out, num_threads):
    """:func:`fastbn.batch_norm_backward` for a call that passes the fast
    checks, else None."""
    cdef Args a
    cdef int typenum, pt
    cdef Py_ssize_t c
    if (gradient_args(&a, dy, x, gamma, beta, activation, negative_slope, channel_axis,
                      num_threads) < 0 or not is_bool(training) or not is_bool(param_grads)):
        return None
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    pt = param_type(typenum)
    c = cnp.PyArray_DIMS(<cnp.ndarray>x)[a.ca]
    if not (vector(mean, pt, c, False) and vector(invstd, pt, c, False)):
        return None
    if not result_ok(out, <cnp.ndarray>x, typenum, dy, None, (x, gamma, beta, mean, invstd)):
        return None
    return backward_core(<cnp.ndarray>dy, <cnp.ndarray>x, gamma, beta, mean, invstd, a.act,
                         a.slope, training, param_grads, False, a.ca, out, a.nthreads)


cdef bint nonzero(object gamma) noexcept:
    """No element of a plain float vector (or None) is 0."""
    cdef Py_ssize_t i
    if gamma is None:
        return True
    cdef const void* g = cnp.PyArray_DATA(<cnp.ndarray>gamma)
    cdef bint single = cnp.PyArray_TYPE(<cnp.ndarray>gamma) == cnp.NPY_FLOAT
    for i in range(cnp.PyArray_SIZE(<cnp.ndarray>gamma)):
        if ((<const float*>g)[i] if single else (<const double*>g)[i]) == 0:
            return False
    return True


def backward_from_output(dy, y, gamma, beta, invstd, activation, negative_slope,
                         channel_axis, out, num_threads):
    """:func:`fastbn.batch_norm_backward_from_output` for a call that passes
    the fast checks (an invertible activation, no gamma of 0), else None."""
    cdef Args a
    cdef int typenum, pt
    if gradient_args(&a, dy, y, gamma, beta, activation, negative_slope, channel_axis,
                     num_threads) < 0:
        return None
    if a.act == ACT_RELU or (a.act == ACT_LEAKY_RELU and not a.slope > 0.0):
        return None
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>y)
    pt = param_type(typenum)
    if not (vector(invstd, pt, cnp.PyArray_DIMS(<cnp.ndarray>y)[a.ca], False)
            and nonzero(gamma)):
        return None
    if not result_ok(out, <cnp.ndarray>y, typenum, dy, y, (gamma, beta, invstd)):
        return None
    return backward_core(<cnp.ndarray>dy, <cnp.ndarray>y, gamma, beta, None, invstd, a.act,
                         a.slope, True, True, True, a.ca, out, a.nthreads)


# ---------------------------------------------------------- unchecked ----
# The cores for callers that have run the full checks (fastbn._checks) and
# made the contiguous copies: the arguments as those checks return them.

def forward_unchecked(cnp.ndarray x, gamma, beta, running_mean, running_var, momentum,
                      num_batches_tracked, double eps, bint unbiased, int act, double slope,
                      int channel_axis, out, int num_threads):
    """The core of :func:`forward`; the channel axis as 1 or x.ndim - 1, the
    thread count resolved, the activation as its code."""
    return forward_core(x, gamma, beta, running_mean, running_var, momentum,
                        num_batches_tracked, eps, unbiased, act, slope, channel_axis, out,
                        num_threads)


def inference_unchecked(cnp.ndarray x, gamma, beta, running_mean, running_var, double eps,
                        int act, double slope, int channel_axis, out, int num_threads):
    """The core of :func:`inference` (arguments as :func:`forward_unchecked`)."""
    return inference_core(x, gamma, beta, running_mean, running_var, eps, act, slope,
                          channel_axis, out, num_threads)


def backward_unchecked(cnp.ndarray dy, cnp.ndarray x, gamma, beta, mean, invstd, int act,
                       double slope, bint training, bint param_grads, bint from_output,
                       int channel_axis, out, int num_threads):
    """The core of :func:`backward` and :func:`backward_from_output` (x is
    y and mean None from the output)."""
    return backward_core(dy, x, gamma, beta, mean, invstd, act, slope, training, param_grads,
                         from_output, channel_axis, out, num_threads)


include "_front_variants.pxi"
