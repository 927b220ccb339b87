"""fastbn: Batch Normalization for NumPy arrays, in typed Cython with OpenMP.

The public names are the three functions of :mod:`fastbn.functional`, the
layer classes of :mod:`fastbn.layers`, the oracle :mod:`fastbn.reference`,
:func:`show_config`, and ``SyncBatchNorm`` (:mod:`fastbn.distributed`),
imported on first use: mpi4py is optional, ``pip install "fastbn[mpi]"``.
"""

from fastbn import reference
from fastbn._config import __version__, show_config
from fastbn.functional import batch_norm_backward, batch_norm_forward, batch_norm_inference
from fastbn.layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "SyncBatchNorm",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "__version__",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "reference",
    "show_config",
]


def __getattr__(name):
    # fastbn.SyncBatchNorm: fastbn.distributed is imported on first use only.
    if name == "SyncBatchNorm":
        from fastbn.distributed import SyncBatchNorm
        return SyncBatchNorm
    raise AttributeError(f"module 'fastbn' has no attribute {name!r}")
