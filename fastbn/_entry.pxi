# The entry of a kernel module (included by fastbn/_planar.pyx and
# fastbn/_columnar.pyx, which define call_of): ``run`` dispatches a
# fastbn._call.Call on its dtype, and the capsule ENTRY hands it to the
# compiled front (fastbn._front).

cdef int run(const Call* k) noexcept nogil:
    """The call k (fastbn._call.Entry): 0, or -1 when its work space could
    not be allocated (nothing written)."""
    if k.dtype == DTYPE_FLOAT32:
        return call_of(k, <const float*>NULL)
    return call_of(k, <const double*>NULL)


ENTRY = PyCapsule_New(<void*>run, ENTRY_NAME, NULL)
