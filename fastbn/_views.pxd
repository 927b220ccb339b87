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
