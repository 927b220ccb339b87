"""fastbn: Batch Normalization for NumPy arrays, in typed Cython with OpenMP.

The public names are the three functions of :mod:`fastbn.functional`, the
layer classes of :mod:`fastbn.layers`, :func:`fold_batch_norm`
(:mod:`fastbn.folding`), the oracle :mod:`fastbn.reference`,
:func:`show_config`, and ``SyncBatchNorm`` (:mod:`fastbn.distributed`),
imported on first use: mpi4py is optional, ``pip install "fastbn[mpi]"``.
"""

from typing import TYPE_CHECKING, Any

from fastbn import _runtime


def _check_built() -> None:
    """An ImportError that says what to do when the compiled modules are missing
    because this is an unbuilt source tree (the usual cause: Python started in
    the repository, whose fastbn/ shadows the installed package). It is raised
    ``from None``: the traceback shows this message alone, not Python's partial
    import of ``fastbn`` before it."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        # The parallel modules, on fastbn's own OpenMP runtime and its wait policy.
        with _runtime.loading():
            from fastbn import _dispatch, _openmp  # noqa: F401
    except ImportError:  # exercised in a child process by tests/test_import.py
        if (here / "_planar.pyx").exists() and not list(here.glob("_openmp.*.so")) \
                and not list(here.glob("_openmp.*.pyd")):
            raise ImportError(
                f"fastbn is being imported from its source tree ({here}), whose compiled "
                f"modules are not built. Install it (`pip install .`) and run Python from "
                f"another folder, or build it in place (`python setup.py build_ext --inplace`)."
            ) from None
        raise


_check_built()

from fastbn import reference  # noqa: E402 - after the check that explains a failure
from fastbn._config import __version__, show_config
from fastbn.folding import fold_batch_norm
from fastbn.functional import (batch_norm_backward, batch_norm_backward_from_output,
                               batch_norm_forward, batch_norm_inference)
from fastbn.layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from fastbn.variants import (batch_renorm_backward, batch_renorm_forward,
                             ghost_batch_norm_backward, ghost_batch_norm_forward)

if TYPE_CHECKING:  # imported on first use (mpi4py is optional): see __getattr__
    from fastbn.distributed import SyncBatchNorm

__all__ = [
    "SyncBatchNorm",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "__version__",
    "batch_norm_backward",
    "batch_norm_backward_from_output",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "fold_batch_norm",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_forward",
    "reference",
    "show_config",
]


def __getattr__(name: str) -> Any:
    # fastbn.SyncBatchNorm: fastbn.distributed is imported on first use only.
    if name == "SyncBatchNorm":
        from fastbn.distributed import SyncBatchNorm
        return SyncBatchNorm
    raise AttributeError(f"module 'fastbn' has no attribute {name!r}")
