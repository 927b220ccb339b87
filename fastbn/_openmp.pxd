# OpenMP shim: the kernels cimport what they need of OpenMP from here, so that
# the package also builds, and runs on one thread, without OpenMP.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBN_HAVE_OPENMP 1
    #else
    #define FASTBN_HAVE_OPENMP 0
    static inline int omp_get_max_threads(void) { return 1; }
    static inline int omp_get_num_procs(void) { return 1; }
    #endif
    /* A barrier for the team of the enclosing parallel region. Cython emits
       each prange inside a `with parallel()` block as `omp for nowait`, so the
       steps of a multi-step region need one between them. */
    static inline void fastbn_barrier(void)
    {
    #ifdef _OPENMP
        _Pragma("omp barrier")
    #endif
    }
    #ifndef FASTBN_COMPILE_ARGS
    #define FASTBN_COMPILE_ARGS ""
    #endif
    """
    bint FASTBN_HAVE_OPENMP
    const char* FASTBN_COMPILE_ARGS
    int omp_get_max_threads() noexcept nogil
    int omp_get_num_procs() noexcept nogil
    void barrier "fastbn_barrier"() noexcept nogil


cdef enum:
    # Below this many elements per thread, another thread costs more than it
    # gives: a fork/join is a few microseconds on idle cores, and far more when
    # a core is busy with other work (a shared machine, NumPy's BLAS threads).
    MIN_ELEMENTS_PER_THREAD = 131072


cdef inline int threads_for(Py_ssize_t n_elements, Py_ssize_t n_units,
                            int num_threads) noexcept nogil:
    """Threads to use for ``n_elements`` split into ``n_units`` work units.

    ``num_threads`` is the caller's resolved count (>= 1). The result never
    changes a result's bits: the kernels' partitions depend on the shape only.
    """
    cdef Py_ssize_t by_size = n_elements // MIN_ELEMENTS_PER_THREAD
    cdef Py_ssize_t n = num_threads
    if by_size < n:
        n = by_size
    if n_units < n:
        n = n_units
    return <int>n if n > 1 else 1
