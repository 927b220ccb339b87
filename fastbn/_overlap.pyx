"""Which arrays share memory: the byte extents first, the exact test only
where the extents meet.

``numpy.may_share_memory`` compares extents only, so interleaved arrays that
share no element (``stats[:, 0]`` and ``stats[:, 1]``) look overlapping;
``numpy.shares_memory`` is exact but costs more. The argument checks ask
"does this array share memory with any of these?" many times per call, and
the answer is almost always no: comparing extents here, in C, answers that
at once, and the exact test runs only for the pairs whose extents meet.
"""

cimport numpy as cnp

import numpy as np

cnp.import_array()


cdef bint extent(cnp.ndarray a, cnp.intp_t* lo, cnp.intp_t* hi):
    """[lo, hi): the bytes a can touch; False for an empty array."""
    cdef int d
    cdef cnp.intp_t n, s
    lo[0] = hi[0] = <cnp.intp_t>cnp.PyArray_DATA(a)
    for d in range(cnp.PyArray_NDIM(a)):
        n = cnp.PyArray_DIMS(a)[d]
        if n == 0:
            return False
        s = cnp.PyArray_STRIDES(a)[d] * (n - 1)
        if s < 0:
            lo[0] += s
        else:
            hi[0] += s
    hi[0] += cnp.PyArray_ITEMSIZE(a)
    return True


def shared_with(cnp.ndarray a, others):
    """Indices, in order, of the arrays of ``others`` (ndarrays or None) that
    share at least one byte with ``a`` (exactly: ``numpy.shares_memory``)."""
    cdef cnp.intp_t lo, hi, olo, ohi
    cdef list found = []
    cdef Py_ssize_t i = 0
    if not extent(a, &lo, &hi):
        return found
    for other in others:
        if other is not None and extent(<cnp.ndarray?>other, &olo, &ohi) \
                and olo < hi and lo < ohi and np.shares_memory(a, other):
            found.append(i)
        i += 1
    return found
