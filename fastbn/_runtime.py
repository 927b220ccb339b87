"""fastbn's own OpenMP runtime, and how long its idle threads spin.

libgomp's threads spin-wait before they sleep: after every parallel region
and at every barrier, for ``GOMP_SPINCOUNT`` iterations of a pause loop,
300,000 by default. That is one to tens of milliseconds depending on the
CPU (an iteration costs 10-200 ns; under a hypervisor, the most). A NumPy
training step calls BatchNorm between OpenBLAS matmuls, often on a machine
where other processes run, so a fastbn thread that spins for milliseconds
after each call takes the core that the BLAS threads or a neighbour need.

The setting is the runtime's, read once when it loads, and it is shared by
every library on that runtime: PyTorch's wheel ships a ``libgomp.so.1``,
and the system's is scikit-learn's and others'. So fastbn does not set a
process-wide policy. On Linux its parallel modules are linked against a
private copy of libgomp with a soname of its own (``setup.py``), and this
module loads them so that:

- while that copy loads, ``GOMP_SPINCOUNT`` is the number of iterations
  that take :data:`SPIN_SECONDS` (50 us) on this CPU, measured at import
  (:func:`fastbn._cpu.spin_seconds`), and the environment is restored
  right after: the policy belongs to fastbn's runtime alone, and runtimes
  loaded later read the environment as the user left it;
- they are loaded with ``RTLD_DEEPBIND``, so their OpenMP calls bind to
  fastbn's copy even when another library put its ``libgomp.so.1`` into the
  process's global symbol scope first (PyTorch does);
- a user who sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` keeps control:
  fastbn then sets nothing, and its runtime reads the user's values.

The trade-off: a call that follows the previous one by more than 50 us
wakes its threads from sleep (a futex wake, a few microseconds each) instead
of finding them spinning. Threads still honour ``OMP_NUM_THREADS`` and
threadpoolctl, which finds the copy by its ``libgomp`` prefix.

Builds without the private copy (no patchelf at build time, another
compiler's runtime, the serial build) load as before, on the shared runtime.
"""

import contextlib
from collections.abc import Iterator
import os
import statistics
import sys
from pathlib import Path

__all__ = ["SPIN_SECONDS", "describe", "loading", "private_runtime", "spin_count"]

#: How long an idle fastbn thread spins before it sleeps.
SPIN_SECONDS = 50e-6

_PRIVATE = Path(__file__).resolve().parent / "_libs" / "libgomp-fastbn.so.1"
_USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# Filled in by loading(): what the runtime was given, for show_config().
_state = {"runtime": "the shared runtime of the process", "policy": "the runtime's default"}


def spin_count(seconds: float = SPIN_SECONDS) -> int:
    """Iterations of libgomp's spin loop that take ``seconds`` on this CPU:
    the median of five timings of 400 iterations (about 0.1 ms in all)."""
    from fastbn import _cpu

    per_iteration = statistics.median(_cpu.spin_seconds(400) / 400 for _ in range(5))
    return max(1, round(seconds / max(per_iteration, 1e-10)))


def _sanitizer_loaded() -> bool:
    # The sanitizers' runtimes (GCC's libasan/libtsan, Clang's libclang_rt.*)
    # refuse libraries opened with RTLD_DEEPBIND.
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return False
    return any(name in text for name in ("libasan", "libtsan", "libclang_rt"))


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Import fastbn's parallel modules inside this block: they load on
    fastbn's private runtime, with its wait policy (see the module's text)."""
    if not _PRIVATE.is_file():
        yield
        return
    _state["runtime"] = f"fastbn's own ({_PRIVATE})"
    # An empty value is no setting (libgomp ignores it, with a warning).
    user = {name: os.environ[name] for name in _USER_VARIABLES if os.environ.get(name)}
    flags = sys.getdlopenflags()
    try:
        if user:
            _state["policy"] = "from the environment: " + ", ".join(
                f"{name}={value}" for name, value in user.items())
        else:
            count = spin_count()
            os.environ["GOMP_SPINCOUNT"] = str(count)
            _state["policy"] = (f"spin {SPIN_SECONDS * 1e6:.0f} us, then sleep "
                                f"(GOMP_SPINCOUNT={count}, set at load)")
        # Local, never global (a user's RTLD_GLOBAL, set for mpi4py say, would put
        # fastbn's runtime in the scope of libraries loaded later); DEEPBIND where the
        # C library has it (glibc; not musl).
        deepbind = 0 if _sanitizer_loaded() else getattr(os, "RTLD_DEEPBIND", 0)
        sys.setdlopenflags((flags & ~os.RTLD_GLOBAL) | deepbind)
        yield
    finally:
        sys.setdlopenflags(flags)
        if not user:
            os.environ.pop("GOMP_SPINCOUNT", None)


def private_runtime() -> str | None:
    """The path of fastbn's private OpenMP runtime, or None when it was built
    without one (it then runs on the process's shared runtime)."""
    return str(_PRIVATE) if _PRIVATE.is_file() else None


def describe() -> tuple[str, str]:
    """(runtime, wait policy): the OpenMP runtime fastbn's threads run on,
    and the policy it was given at load."""
    return _state["runtime"], _state["policy"]
