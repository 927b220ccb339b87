# Raw pointers from optional memoryviews, for the kernels' def wrappers:
# None (an argument the caller left out) becomes NULL.

from cython cimport floating


cdef inline const floating* cptr(const floating[::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0]


cdef inline floating* wptr(floating[::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0]


cdef inline const floating* cptr3(const floating[:, :, ::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0, 0, 0]


cdef inline const floating* cptr2(const floating[:, ::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0, 0]


cdef inline bytearray workspace(Py_ssize_t count, size_t itemsize):
    """Zeroed work space for ``count`` items of ``itemsize`` bytes (at least
    one, never a zero-size allocation), owned and freed by the returned
    bytearray: the caller keeps a reference while it uses ``<char*>`` of it.
    Raises MemoryError when the memory cannot be had."""
    return bytearray(max(count, 1) * itemsize)
