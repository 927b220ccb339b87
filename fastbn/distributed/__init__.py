"""Batch Normalization synchronized across processes (data-parallel training).

When each process holds a slice of the batch, Batch Normalization must
normalize with the statistics of the whole global batch. Each pass of
fastbn's kernels is split at its reduction (local sums, **one** reduction
per pass, the local apply), and the per-rank statistics are merged exactly,
so unequal local batch sizes (and empty ones) give the global result.

Three levels:

- :func:`merge_records`: the reduction operator, on float64 records,
  commutative to the bit, so that an all-reduce gives every rank the same
  bits (and the running statistics stay identical on every rank);
- :func:`sync_batch_norm_forward` and :func:`sync_batch_norm_backward`: the
  functional form, taking any caller-supplied ``allreduce`` callable;
- :class:`SyncBatchNorm`: a :class:`fastbn.layers.BatchNorm` over an mpi4py
  communicator, with :class:`mpi_allreduce`.

The package, one concern per module:

- ``_records``: the records, the layout of the reduction buffer, the merge;
- ``_protocol``: the failure protocol (a failing rank still joins the
  reduction; then every rank raises, naming the failing ranks);
- ``_mpi``: the MPI transport;
- ``_passes``: the synchronized forward and backward;
- ``_layer``: the layer.

References: Ioffe & Szegedy (2015), arXiv:1502.03167; Chan, Golub & LeVeque,
"Updating formulae and a pairwise algorithm for computing sample variances"
(1979) and "Algorithms for computing the sample variance" (1983);
``torch.nn.SyncBatchNorm``; ChainerMN's ``MultiNodeBatchNormalization``
(which averages the per-process means instead, wrong for unequal local
batch sizes).
"""

from fastbn.distributed._layer import SyncBatchNorm
from fastbn.distributed._mpi import mpi_allreduce
from fastbn.distributed._passes import (sync_batch_norm_backward,
                                        sync_batch_norm_backward_from_output,
                                        sync_batch_norm_forward)
from fastbn.distributed._records import (HEADER, RECORD, TAG_CONFLICT, TAG_FIRST, TAG_RANGE,
                                         TAG_STATS, TAG_SUM, merge_records)

__all__ = [
    "HEADER",
    "RECORD",
    "TAG_CONFLICT",
    "TAG_FIRST",
    "TAG_RANGE",
    "TAG_STATS",
    "TAG_SUM",
    "SyncBatchNorm",
    "merge_records",
    "mpi_allreduce",
    "sync_batch_norm_backward",
    "sync_batch_norm_backward_from_output",
    "sync_batch_norm_forward",
]
