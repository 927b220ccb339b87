# The fast checks of the compiled front (included by fastbn/_front.pyx,
# whose cimports they use): each answers whether an argument is one the
# fast path takes as it is; anything else goes to the full checks of
# fastbn/_checks.py, which raise the errors.

# ------------------------------------------------------------- checks ----
# Each says whether a value passes the fast path: False sends the call to
# the full checks. None of them raises.

cdef extern from "numpy/ndarraytypes.h":
    enum: NPY_USERDEF          # the first type number of a dtype a library registers

cdef int BFLOAT16 = -1         # the type number of ml_dtypes' bfloat16, once seen


cdef inline int bfloat16_type() noexcept:
    """The type number of ml_dtypes' bfloat16, or -1 while the program has
    not imported ml_dtypes (fastbn._dtypes)."""
    global BFLOAT16
    cdef object dtype
    if BFLOAT16 < 0:
        dtype = _dtypes.bfloat16()
        if dtype is not None:
            BFLOAT16 = (<cnp.dtype>dtype).type_num
    return BFLOAT16


cdef inline int float_type(object a) noexcept:
    """The NumPy type number of an ndarray of a data dtype (float32,
    float64, float16, bfloat16), else -1."""
    cdef int t
    if type(a) is not cnp.ndarray:
        return -1
    t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE or t == cnp.NPY_FLOAT16:
        return t
    return t if t >= NPY_USERDEF and t == bfloat16_type() else -1


cdef inline int param_type(int typenum) noexcept:
    """The type number of the parameters and statistics of data of typenum:
    float64 for float64, else float32 (fastbn._dtypes)."""
    return cnp.NPY_DOUBLE if typenum == cnp.NPY_DOUBLE else cnp.NPY_FLOAT


cdef inline bint plain(object a, int typenum, bint writeable) noexcept:
    """An exact ndarray of typenum, C-contiguous, aligned, native byte order
    (and writeable when asked)."""
    if type(a) is not cnp.ndarray or cnp.PyArray_TYPE(<cnp.ndarray>a) != typenum:
        return False
    if writeable:
        return cnp.PyArray_ISCARRAY(<cnp.ndarray>a)
    return cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>a)


cdef inline bint vector(object v, int typenum, Py_ssize_t c, bint writeable) noexcept:
    """A plain (C,) array."""
    return (plain(v, typenum, writeable) and cnp.PyArray_NDIM(<cnp.ndarray>v) == 1
            and cnp.PyArray_DIMS(<cnp.ndarray>v)[0] == c)


cdef inline bint optional_vector(object v, int typenum, Py_ssize_t c) noexcept:
    return v is None or vector(v, typenum, c, False)


cdef inline bint same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int d
    if cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b):
        return False
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[d] != cnp.PyArray_DIMS(b)[d]:
            return False
    return True


cdef inline bint same_memory(cnp.ndarray a, cnp.ndarray b) noexcept:
    """The very same elements in the same layout: data, shape and strides
    (fastbn._checks' rule; a C-contiguous array may have any stride on an
    axis of length 1)."""
    cdef int d
    if cnp.PyArray_BYTES(a) != cnp.PyArray_BYTES(b) or not same_shape(a, b):
        return False
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_STRIDES(a)[d] != cnp.PyArray_STRIDES(b)[d]:
            return False
    return True


cdef inline bint apart(object a, object b) noexcept:
    """Two plain arrays (or None) share no byte: their spans are disjoint."""
    cdef char* a0
    cdef char* b0
    if a is None or b is None:
        return True
    a0 = cnp.PyArray_BYTES(<cnp.ndarray>a)
    b0 = cnp.PyArray_BYTES(<cnp.ndarray>b)
    return (a0 + cnp.PyArray_NBYTES(<cnp.ndarray>a) <= b0
            or b0 + cnp.PyArray_NBYTES(<cnp.ndarray>b) <= a0)


cdef inline bint result_ok(object out, cnp.ndarray like, int typenum, object in_place,
                           object in_place2, tuple others) noexcept:
    """``out`` is None, or a writeable plain array of like's shape that is
    in_place (or in_place2) itself or shares no byte with it, and shares no
    byte with any of ``others``."""
    if out is None:
        return True
    if not plain(out, typenum, True) or not same_shape(<cnp.ndarray>out, like):
        return False
    for a in (in_place, in_place2):
        if a is not None and not (same_memory(<cnp.ndarray>out, <cnp.ndarray>a)
                                  or apart(out, a)):
            return False
    for a in others:
        if not apart(out, a):
            return False
    return True


cdef inline int channel_axis_of(object value, int ndim) noexcept:
    """The channel axis (1 or ndim - 1) of an int 1, -1 or an equivalent,
    else -1."""
    cdef long v
    if type(value) is not int or not (-8 < value < 8):
        return -1
    v = value
    if v == 1 or v == 1 - ndim:
        return 1
    if v == -1 or v == ndim - 1:
        return ndim - 1
    return -1


cdef inline int input_of(object x, object channel_axis, tuple ndims=None,
                         Py_ssize_t num_features=-1, object dtype=None) noexcept:
    """The channel axis of a plain float input of 2 to 5 dimensions without
    a zero-size axis, else -1; a layer's constraints too, where given: a
    number of dimensions in ``ndims``, ``num_features`` channels, and its
    ``dtype``."""
    cdef int typenum = float_type(x), ndim, d, ca
    if typenum < 0 or not cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>x):
        return -1
    ndim = cnp.PyArray_NDIM(<cnp.ndarray>x)
    if ndim < 2 or ndim > 5 or (ndims is not None and ndim not in ndims):
        return -1
    for d in range(ndim):
        if cnp.PyArray_DIMS(<cnp.ndarray>x)[d] == 0:
            return -1
    ca = channel_axis_of(channel_axis, ndim)
    if ca < 0 or (num_features >= 0 and cnp.PyArray_DIMS(<cnp.ndarray>x)[ca] != num_features):
        return -1
    if dtype is not None and param_type(typenum) != (<cnp.dtype>dtype).type_num:
        return -1
    return ca


cdef inline int gradient_input_of(object dy, object x, object channel_axis) noexcept:
    """The channel axis of x (as input_of) when dy is a plain array of x's
    dtype and shape, else -1."""
    cdef int ca = input_of(x, channel_axis)
    if ca < 0 or not plain(dy, cnp.PyArray_TYPE(<cnp.ndarray>x), False):
        return -1
    return ca if same_shape(<cnp.ndarray>dy, <cnp.ndarray>x) else -1


cdef inline bint positive(object value, double* result) noexcept:
    """A float, finite and > 0 (eps)."""
    if type(value) is not float:
        return False
    result[0] = <double>value
    return isfinite(result[0]) and result[0] > 0.0


cdef inline bint activation_of(object activation, object slope, int* act,
                               double* result) noexcept:
    """An activation of ACTIVATIONS and a finite float slope."""
    cdef object code
    if activation is not None and type(activation) is not str:
        return False
    code = (<dict>ACTIVATIONS).get(activation)
    if code is None or type(slope) is not float:
        return False
    act[0] = <int>code
    result[0] = <double>slope
    return isfinite(result[0])


cdef inline int threads_of(object num_threads) noexcept:
    """The resolved thread count of None or an int > 0, else 0."""
    if num_threads is None:
        return resolved_threads(0)
    if type(num_threads) is not int or num_threads <= 0:
        return 0
    return resolved_threads(num_threads if num_threads < 2**31 else 2**31 - 1)


cdef inline bint is_bool(object value) noexcept:
    return value is True or value is False


cdef inline bint counter_ok(object count) noexcept:
    """One writeable int64 count, >= 0, that can grow by one."""
    cdef int64_t v
    if (type(count) is not cnp.ndarray or cnp.PyArray_TYPE(<cnp.ndarray>count) != cnp.NPY_INT64
            or not cnp.PyArray_ISCARRAY(<cnp.ndarray>count)
            or cnp.PyArray_SIZE(<cnp.ndarray>count) != 1):
        return False
    v = (<int64_t*>cnp.PyArray_DATA(<cnp.ndarray>count))[0]
    return 0 <= v < INT64_MAX
