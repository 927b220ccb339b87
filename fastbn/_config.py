"""Version and build configuration of the installed fastbn."""

from fastbn import _dispatch, _openmp, _runtime

# The one version source: pyproject.toml reads it (``[tool.setuptools.dynamic]``)
# into the distribution's metadata, so a wheel and an in-place build agree.
__version__ = "0.2.0"


def show_config() -> None:
    """Print the version, OpenMP status, the OpenMP runtime fastbn's threads
    run on and their wait policy (:mod:`fastbn._runtime`), the default thread
    count, the kernel variant chosen for this CPU and the flags it was
    compiled with.

    The default thread count is what ``num_threads=None`` resolves to now
    (``omp_get_max_threads()``, which honours ``OMP_NUM_THREADS`` and
    threadpoolctl limits).
    """
    openmp = _openmp.openmp_enabled()
    print(f"fastbn {__version__}")
    print(f"  OpenMP:              {'yes' if openmp else 'no (serial build)'}")
    if openmp:
        runtime, policy = _runtime.describe()
        print(f"  OpenMP runtime:      {runtime}")
        print(f"  idle threads:        {policy}")
    print(f"  default num_threads: {_openmp.effective_num_threads(None)}")
    print(f"  compile flags:       {_dispatch.planar.compile_args()}")
    print(f"  kernels:             {_dispatch.level}")
