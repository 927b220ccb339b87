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
    static inline int omp_get_thread_num(void) { return 0; }
    static inline int omp_get_num_threads(void) { return 1; }
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
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    void barrier "fastbn_barrier"() noexcept nogil


cdef enum:
    # Below this many elements per thread, another thread costs more than it
    # gives: a fork/join is a few microseconds on idle cores, and far more when
    # a core is busy with other work (a shared machine, NumPy's BLAS threads).
    MIN_ELEMENTS_PER_THREAD = 131072


# Busy cores. A parallel loop ends when its slowest thread does; when another
# process (or BLAS's threads) holds a core, the thread woken there starts late
# or is descheduled mid-unit, and the call can take several times its
# one-thread time. Units are handed out dynamically, so the calling thread
# (thread 0) then takes more than its share of the loop's units: ``Shares``
# count them (``took``, first in the body of every prange over blocks of data;
# the merges' units are too small to judge), ``late`` judges one loop,
# and ``note`` takes the verdict of a call's loops: while the other threads
# keep coming late, calls run on half the threads (``threads_for``), for
# 20 ms after the first late call, then twice as long after each late retry,
# up to a second; a call where they kept up resets it. Bits do not depend on
# the thread count, so neither do results.

cdef struct Shares:
    Py_ssize_t total    # units of the loop
    Py_ssize_t mine     # units its calling thread took
    int team            # threads the runtime gave the region (0 before a unit is taken)


cdef inline void took(Shares* s) noexcept nogil:
    """Count a unit when the calling thread of the region takes it, and the
    size of its team (the runtime may give fewer threads than asked for:
    OMP_DYNAMIC, OMP_THREAD_LIMIT, a nested region)."""
    if omp_get_thread_num() == 0:
        s.mine += 1
        s.team = omp_get_num_threads()


cdef inline int late(const Shares* s, int nt) noexcept nogil:
    """1 when the calling thread took over 1.5 times its share of the loop's
    units (the other threads came late), 0 when not, -1 for a loop of fewer
    than 2 units a thread (too few to say). The share is of the team the
    region had (``nt`` threads were asked for)."""
    cdef int n = s.team if s.team > 0 else nt
    if n < 2 or s.total < 2 * n:
        return -1
    return 1 if 2 * n * s.mine > 3 * s.total else 0


cdef void note(int verdict) noexcept nogil
cdef int threads_now(int wanted) noexcept nogil
cdef int resolved_threads(Py_ssize_t requested) noexcept nogil


cdef inline int threads_for(Py_ssize_t n_elements, Py_ssize_t n_units,
                            int num_threads) noexcept nogil:
    """Threads to use for ``n_elements`` split into ``n_units`` work units.

    ``num_threads`` is the caller's resolved count (>= 1); fewer while the
    cores are busy (``note``). The result never changes a result's bits: the
    kernels' partitions depend on the shape only.
    """
    cdef Py_ssize_t by_size = n_elements // MIN_ELEMENTS_PER_THREAD
    cdef Py_ssize_t n = num_threads
    if by_size < n:
        n = by_size
    if n_units < n:
        n = n_units
    return threads_now(<int>n) if n > 1 else 1
