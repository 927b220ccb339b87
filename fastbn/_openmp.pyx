"""Python-visible facts about the OpenMP runtime fastbn was built with, and
the thread policy: how many threads a call may use.

After ``fork()`` the child has one thread: the parent's OpenMP workers do
not exist there, and libgomp would wait for them forever in the child's
first parallel region. As PyTorch does, an at-fork handler (registered at
import) marks the child, and every call in it runs on one thread (results
are the same bits: the kernels' partitions depend on the shape alone).
"""

from fastbn._openmp cimport FASTBN_HAVE_OPENMP, omp_get_max_threads, omp_get_num_procs


cdef extern from *:
    """
    #include <time.h>
    /* Seconds on a clock that costs nanoseconds to read (its resolution, a
       few milliseconds, is finer than the back-off it times). */
    static inline double fastbn_coarse_now(void)
    {
        struct timespec t;
    #ifdef CLOCK_MONOTONIC_COARSE
        clock_gettime(CLOCK_MONOTONIC_COARSE, &t);
    #else
        clock_gettime(CLOCK_MONOTONIC, &t);
    #endif
        return t.tv_sec + 1e-9 * t.tv_nsec;
    }
    """
    double coarse_now "fastbn_coarse_now"() noexcept nogil


cdef extern from "<pthread.h>" nogil:
    int pthread_atfork(void (*prepare)() noexcept nogil, void (*parent)() noexcept nogil,
                       void (*child)() noexcept nogil)


cdef bint forked_child = False
# Four threads per processor at most: omp_get_num_procs() asks the kernel for the
# affinity mask on every call (about 0.4 us), so it is read once, at import.
cdef int max_threads_cap = 4 * omp_get_num_procs() if FASTBN_HAVE_OPENMP else 1


cdef void mark_forked_child() noexcept nogil:
    global forked_child
    forked_child = True


if pthread_atfork(NULL, NULL, mark_forked_child) != 0:
    raise ImportError("fastbn: pthread_atfork failed; cannot make forked processes safe")


# The busy-core back-off (see _openmp.pxd). Shared by every kernel module; the
# Python threads that call fastbn at once may race on it, harmlessly: each
# value written is a valid one.
cdef double BACKOFF_MIN = 0.02
cdef double BACKOFF_MAX = 1.0
cdef double calm_until = 0.0
cdef double backoff = BACKOFF_MIN


cdef int threads_now(int wanted) noexcept nogil:
    """``wanted`` threads, or half of them while the cores are busy."""
    if wanted > 1 and coarse_now() < calm_until:
        return max(1, wanted // 2)
    return wanted


cdef void note(int verdict) noexcept nogil:
    """After a call: its loops' verdict (the largest of their ``late``). Only a
    call on the full thread count, made after any back-off ended, says
    something: late (1), it backs off for ``backoff`` and doubles the next
    one; on time (0), it resets the back-off to its shortest."""
    global calm_until, backoff
    cdef double now = coarse_now()
    if now < calm_until:
        return
    if verdict == 1:
        calm_until = now + backoff
        backoff = min(2 * backoff, BACKOFF_MAX)
    elif verdict == 0:
        backoff = BACKOFF_MIN


def busy_backoff():
    """Seconds left of the busy-core back-off (0 when calls use every
    thread), and the length of the next one."""
    return max(0.0, calm_until - coarse_now()), backoff


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(FASTBN_HAVE_OPENMP)


def in_forked_child():
    """True in a process made by ``fork()`` after fastbn was imported."""
    return bool(forked_child)


cdef int resolved_threads(Py_ssize_t requested) noexcept nogil:
    """The thread count of a call: ``requested`` (0 for the OpenMP default,
    ``omp_get_max_threads()``, which honours OMP_NUM_THREADS and
    threadpoolctl), capped at four threads per processor available at
    import (more only oversubscribes, and a huge count makes the OpenMP
    runtime fail to create its threads); 1 in a forked child and without
    OpenMP."""
    if not FASTBN_HAVE_OPENMP or forked_child:
        return 1
    if requested <= 0:
        requested = omp_get_max_threads()
    return <int>max(1, min(requested, <Py_ssize_t>max_threads_cap))


def effective_num_threads(num_threads):
    """Resolve the public ``num_threads`` argument (None or an int > 0, the
    caller has rejected anything else) to a thread count: see
    ``resolved_threads``."""
    return resolved_threads(0 if num_threads is None else min(num_threads, 2**31 - 1))
