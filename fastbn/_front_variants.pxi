# The fast paths and the unchecked cores of fastbn.variants (Batch
# Renormalization, Ghost Batch Normalization), included by _front.pyx: the
# same checks and cores as the plain functions', with a Variant.


cdef bint clipping_of(tuple clip, Variant* v) noexcept:
    """Batch Renormalization's clipping (rmax, rmin, dmax) as floats: rmax
    >= 1, rmin None (1 / rmax) or in [0, 1], dmax >= 0 (rmax and dmax may
    be inf), else False."""
    if clip is None or len(clip) != 3:
        return False
    rmax, rmin, dmax = clip
    if type(rmax) is not float or type(dmax) is not float:
        return False
    v.rmax, v.dmax = <double>rmax, <double>dmax
    if rmin is None:
        v.rmin = 1.0 / v.rmax
    elif type(rmin) is float:
        v.rmin = <double>rmin
    else:
        return False
    return v.rmax >= 1.0 and 0.0 <= v.rmin <= 1.0 and v.dmax >= 0.0


cdef Py_ssize_t groups_of(object virtual_batch_size, cnp.ndarray x, int ca) noexcept:
    """The virtual batches of x: 1 for None; for an int that divides N and
    leaves each group more than one value per channel, N / it; else 0."""
    cdef Py_ssize_t n = cnp.PyArray_DIMS(x)[0], v
    if virtual_batch_size is None:
        return 1
    if type(virtual_batch_size) is not int or not 0 < virtual_batch_size <= n:
        return 0
    v = virtual_batch_size
    if n % v or v * (cnp.PyArray_SIZE(x) // n) // cnp.PyArray_DIMS(x)[ca] <= 1:
        return 0
    return n // v


cdef Py_ssize_t statistics_of(tuple stats, int typenum, Py_ssize_t c, Py_ssize_t n,
                              bint grouped) noexcept:
    """The number of groups of a variant backward's statistics: each a plain
    (C,) array, or (groups, C) when ``grouped``, with groups dividing n and
    the same shape for all; else 0."""
    cdef Py_ssize_t g = 1
    for a in stats:
        if not grouped:
            if not vector(a, typenum, c, False):
                return 0
            continue
        if (not plain(a, typenum, False) or cnp.PyArray_NDIM(<cnp.ndarray>a) != 2
                or cnp.PyArray_DIMS(<cnp.ndarray>a)[1] != c):
            return 0
        g = cnp.PyArray_DIMS(<cnp.ndarray>a)[0]
        if g != cnp.PyArray_DIMS(<cnp.ndarray>stats[0])[0]:
            return 0
    return g if g > 0 and n % g == 0 else 0


def variant_forward(x, gamma, beta, running_mean, running_var, momentum, num_batches_tracked,
                    eps, unbiased, activation, negative_slope, channel_axis, out, num_threads,
                    tuple clip, virtual_batch_size):
    """The forward of :mod:`fastbn.variants` for a call that passes the fast
    checks, else None: Batch Renormalization with ``clip`` (rmax, rmin,
    dmax), Ghost Batch Normalization with a ``virtual_batch_size``."""
    cdef Args a
    cdef Variant v = PLAIN
    if forward_args(&a, x, gamma, beta, eps, running_mean, running_var, momentum,
                    num_batches_tracked, unbiased, activation, negative_slope, channel_axis,
                    out, num_threads, None, -1, None) < 0:
        return None
    if clip is not None:
        if running_mean is None or not clipping_of(clip, &v):
            return None
        v.renorm = True
    v.groups = groups_of(virtual_batch_size, <cnp.ndarray>x, a.ca)
    if v.groups == 0:
        return None
    v.grouped = virtual_batch_size is not None
    return forward_core(<cnp.ndarray>x, gamma, beta, running_mean, running_var, momentum,
                        num_batches_tracked, a.eps, unbiased, a.act, a.slope, a.ca, out,
                        a.nthreads, &v)


def variant_backward(dy, x, gamma, mean, invstd, r, d, beta, activation, negative_slope,
                     channel_axis, out, num_threads, bint renorm, grouped):
    """The backward of :mod:`fastbn.variants` for a call that passes the
    fast checks, else None: with r and d when ``renorm``; the statistics
    (groups, C) when ``grouped``, (C,) when False, either when None (by
    mean's number of dimensions)."""
    cdef Args a
    cdef int typenum, pt
    cdef Variant v = PLAIN
    cdef tuple stats = (mean, invstd, r, d) if renorm else (mean, invstd)
    if gradient_args(&a, dy, x, gamma, beta, activation, negative_slope, channel_axis,
                     num_threads) < 0:
        return None
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    pt = param_type(typenum)
    if grouped is None:
        grouped = type(mean) is cnp.ndarray and cnp.PyArray_NDIM(<cnp.ndarray>mean) == 2
    v.renorm = renorm
    v.groups = statistics_of(stats, pt, cnp.PyArray_DIMS(<cnp.ndarray>x)[a.ca],
                             cnp.PyArray_DIMS(<cnp.ndarray>x)[0], grouped)
    if v.groups == 0:
        return None
    if not result_ok(out, <cnp.ndarray>x, typenum, dy, None, (x, gamma, beta) + stats):
        return None
    return backward_core(<cnp.ndarray>dy, <cnp.ndarray>x, gamma, beta, mean, invstd, a.act,
                         a.slope, True, True, False, a.ca, out, a.nthreads, &v, r, d)


cdef Variant variant(bint renorm, double rmax, double rmin, double dmax, Py_ssize_t groups,
                     bint grouped):
    cdef Variant v
    v.renorm = renorm
    v.rmax, v.rmin, v.dmax = rmax, rmin, dmax
    v.groups = groups
    v.grouped = grouped
    return v


def variant_forward_unchecked(cnp.ndarray x, gamma, beta, running_mean, running_var, momentum,
                              num_batches_tracked, double eps, bint unbiased, int act,
                              double slope, int channel_axis, out, int num_threads,
                              bint renorm, double rmax, double rmin, double dmax,
                              Py_ssize_t groups, bint grouped):
    """The core of the variants' forwards (fastbn.variants): arguments as
    :func:`forward_unchecked`, then Batch Renormalization's clipping (when
    ``renorm``) and Ghost Batch Normalization's number of virtual batches,
    the statistics (groups, C) when ``grouped``."""
    cdef Variant v = variant(renorm, rmax, rmin, dmax, groups, grouped)
    return forward_core(x, gamma, beta, running_mean, running_var, momentum,
                        num_batches_tracked, eps, unbiased, act, slope, channel_axis, out,
                        num_threads, &v)


def variant_backward_unchecked(cnp.ndarray dy, cnp.ndarray x, gamma, beta, mean, invstd, r, d,
                               int act, double slope, int channel_axis, out, int num_threads,
                               Py_ssize_t groups):
    """The core of the variants' backwards (fastbn.variants): the training
    backward with r and d (Batch Renormalization, else None) and the
    statistics of ``groups`` virtual batches."""
    cdef Variant v = variant(r is not None, 1.0, 1.0, 0.0, groups, groups > 1)
    return backward_core(dy, x, gamma, beta, mean, invstd, act, slope, True, True, False,
                         channel_axis, out, num_threads, &v, r, d)
