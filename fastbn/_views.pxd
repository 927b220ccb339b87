# Raw pointers from optional memoryviews, for the kernels' def wrappers:
# None (an argument the caller left out) becomes NULL.

from cython cimport floating

from fastbn._simd cimport storage


cdef inline const floating* cptr(const floating[::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0]


cdef inline floating* wptr(floating[::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0]


cdef inline const storage* at(const storage* a, Py_ssize_t off) noexcept nogil:
    """a + off, or NULL for an absent array."""
    if a == NULL:
        return NULL
    return a + off


cdef inline const floating* moved(const void* p, Py_ssize_t off,
                                  const floating* like) noexcept nogil:
    """A call's array p (of like's type) from value off on; NULL stays NULL."""
    if p == NULL:
        return NULL
    return <const floating*>p + off
