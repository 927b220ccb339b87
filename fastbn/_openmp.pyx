"""Python-visible facts about the OpenMP runtime fastbn was built with."""

from fastbn._openmp cimport FASTBN_HAVE_OPENMP, omp_get_max_threads, omp_get_num_procs


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(FASTBN_HAVE_OPENMP)


def effective_num_threads(num_threads):
    """Resolve the public ``num_threads`` argument to a thread count.

    None gives the OpenMP default, ``omp_get_max_threads()``, which honours
    OMP_NUM_THREADS and threadpoolctl; a positive int is used as given up
    to four threads per processor (more only oversubscribes, and a huge
    count makes the OpenMP runtime fail to create its threads). The
    caller has already rejected anything else. Without OpenMP it is 1.
    """
    if not FASTBN_HAVE_OPENMP:
        return 1
    if num_threads is None:
        return omp_get_max_threads()
    return min(num_threads, 4 * omp_get_num_procs())
