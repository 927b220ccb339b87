# The entry of a kernel module (included by fastbn/_planar.pyx and
# fastbn/_columnar.pyx, which define forward_of, inference_of and
# backward_of): ``run`` dispatches a fastbn._call.Call on its mode and dtype,
# and the capsule ENTRY hands it to the compiled front (fastbn._front).

cdef int run_as(const Call* k, const floating* like) noexcept nogil:
    if k.mode == MODE_FORWARD:
        return forward_of(k, like)
    if k.mode == MODE_INFERENCE:
        return inference_of(k, like)
    return backward_of(k, like)


cdef int run(const Call* k) noexcept nogil:
    """The call k (fastbn._call.Entry): 0, or -1 when its work space could
    not be allocated (nothing written)."""
    if k.dtype == DTYPE_FLOAT32:
        return run_as(k, <const float*>NULL)
    return run_as(k, <const double*>NULL)


ENTRY = PyCapsule_New(<void*>run, ENTRY_NAME, NULL)
