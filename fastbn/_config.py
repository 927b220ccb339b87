"""Version and build configuration of the installed fastbn."""

from importlib import metadata

from fastbn import _dispatch, _openmp

try:
    __version__ = metadata.version("fastbn")
except metadata.PackageNotFoundError:  # running from a source tree that was built in place
    __version__ = "unknown"


def show_config():
    """Print the version, OpenMP status, default thread count, the kernel
    variant chosen for this CPU and the flags it was compiled with.

    The default thread count is what ``num_threads=None`` resolves to now
    (``omp_get_max_threads()``, which honours ``OMP_NUM_THREADS`` and
    threadpoolctl limits).
    """
    openmp = _openmp.openmp_enabled()
    print(f"fastbn {__version__}")
    print(f"  OpenMP:              {'yes' if openmp else 'no (serial build)'}")
    print(f"  default num_threads: {_openmp.effective_num_threads(None)}")
    print(f"  compile flags:       {_dispatch.planar.compile_args()}")
    print(f"  kernels:             {_dispatch.level}")
