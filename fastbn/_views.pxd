# Raw pointers from optional memoryviews, for the kernels' def wrappers:
# None (an argument the caller left out) becomes NULL.

from cython cimport floating
from cython.view cimport array


cdef inline const floating* cptr(const floating[::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0]


cdef inline floating* wptr(floating[::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0]


cdef inline const floating* at(const floating* a, Py_ssize_t off) noexcept nogil:
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


cdef inline const floating* cptr3(const floating[:, :, ::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0, 0, 0]


cdef inline const floating* cptr2(const floating[:, ::1] v) noexcept:
    if v is None:
        return NULL
    return &v[0, 0]


cdef inline array workspace(Py_ssize_t count, size_t itemsize):
    """Work space for ``count`` items of ``itemsize`` bytes (at least one
    item: never a zero-size allocation), malloc'd and freed with the
    returned array: the caller keeps a reference while it uses
    ``<char*>ws.data``. Raises MemoryError when the memory cannot be had."""
    return array(shape=(max(count, 1) * itemsize,), itemsize=1, format="c")
