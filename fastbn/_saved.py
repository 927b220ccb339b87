"""What a layer's forward keeps for its backward, and the backward that reads it.

A forward of :class:`fastbn.layers.BatchNorm` (or of
:class:`fastbn.SyncBatchNorm`) leaves one :class:`Saved` record; nothing of
full size is copied. Every record holds copies of the gamma and beta the
forward ran with (C values each), and the backward reads those, not the
layer's arrays: an optimizer step on the parameters between a forward and
its backward (in place or by assignment) does not change the gradient,
which is always that of the forward as it ran. Four kinds:

- batch statistics (training mode, or eval mode without running
  statistics): the input x itself, the batch mean and invstd; the backward
  is :func:`fastbn.batch_norm_backward` (``training=True``);
- batch statistics with ``memory_saving``: the output y the forward
  returned instead of x; the
  backward is :func:`fastbn.batch_norm_backward_from_output`, which
  recovers the normalized input from y (In-Place ABN: Rota Bulò, Porzi and
  Kontschieder, "In-Place Activated BatchNorm for Memory-Optimized Training
  of DNNs", CVPR 2018, arXiv:1712.02616);
- a training forward of Batch Renormalization or Ghost Batch
  Normalization (fastbn.variants): x, the batch (or groups') statistics,
  and r and d; the backward is that of the variant;
- running statistics (eval mode): x, a copy of the running mean and
  ``invstd = 1 / sqrt(running_var + eps)``, constants; the backward is
  :func:`fastbn.batch_norm_backward` with ``training=False``.

The activation of the forward is recorded too, so that the backward applies
the derivative of the activation the output was made with.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

__all__ = ["Saved", "for_batch", "forward_params", "running_invstd", "gradients"]


class Saved(NamedTuple):
    """What a layer's forward leaves for its backward (no full-size copy)."""

    #: the forward's input itself (a reference, not a copy); None when y is kept
    x: np.ndarray | None
    #: (C,) statistics x was normalized with (None for an empty slice)
    mean: np.ndarray | None
    invstd: np.ndarray | None
    #: True: the batch's own statistics; False: the running ones (an affine map)
    batch: bool
    #: SyncBatchNorm: the statistics are those of the global batch
    synced: bool = False
    #: memory saving: the forward's output itself (a reference), instead of x
    y: np.ndarray | None = None
    #: copies of the gamma and beta the forward ran with (None: no affine)
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    #: the activation fused into the forward's output, and its slope
    activation: str | None = None
    negative_slope: float = 0.01
    #: Batch Renormalization: the forward's r and d (fastbn.variants), else None
    r: np.ndarray | None = None
    d: np.ndarray | None = None
    #: Ghost Batch Normalization: mean and invstd are (groups, C)
    grouped: bool = False

    @property
    def array(self) -> Any:
        """The full-size array kept (x, or y when memory saving): dy must match it."""
        return self.y if self.x is None else self.x


def forward_params(layer: Any) -> dict[str, Any]:
    """Copies of ``layer``'s gamma and beta as a forward runs with them (C
    values each; None without ``affine``), as :class:`Saved` keywords."""
    gamma, beta = layer.gamma, layer.beta
    return dict(gamma=None if gamma is None else gamma.copy(),
                beta=None if beta is None else beta.copy())


def for_batch(layer: Any, x: NDArray[Any], y: NDArray[Any], mean: NDArray[Any] | None,
              invstd: NDArray[Any] | None, *, synced: bool = False) -> Saved:
    """The record of a forward of ``layer`` with batch statistics: x, or with
    the layer's ``memory_saving`` y; and copies of its gamma and beta."""
    gamma, beta = layer.gamma, layer.beta
    gamma = None if gamma is None else gamma.copy()
    beta = None if beta is None else beta.copy()
    if not layer.memory_saving:
        return Saved(x, mean, invstd, True, synced, None, gamma, beta, layer.activation,
                     layer.negative_slope)
    return Saved(None, mean, invstd, True, synced, y, gamma, beta, layer.activation,
                 layer.negative_slope)


def running_invstd(running_var: NDArray[Any], eps: float, dtype: np.dtype[Any]) -> NDArray[Any]:
    """``1 / sqrt(running_var + eps)`` in float64, rounded to ``dtype``, and
    saturated at its largest finite value as the kernels saturate a batch's
    invstd (no inf, no 0 * inf in the backward)."""
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    return np.minimum(invstd, np.finfo(dtype).max).astype(dtype)


def gradients(backend: Any, saved: Saved, dy: NDArray[Any], *, param_grads: bool,
              channel_axis: int, num_threads: int | None) -> Any:
    """(dx, dgamma, dbeta) at the forward ``saved`` records, with ``backend``'s
    functions and the gamma and beta of that forward.

    The activation keywords are passed only with an activation, so that a
    backend written before they existed still serves a layer without one."""
    common = dict(channel_axis=channel_axis, num_threads=num_threads)
    act = {} if saved.activation is None else dict(activation=saved.activation,
                                                   negative_slope=saved.negative_slope)
    if saved.x is None:
        return backend.batch_norm_backward_from_output(dy, saved.y, saved.gamma, saved.beta,
                                                       saved.invstd, **act, **common)
    if act:
        act["beta"] = saved.beta
    if saved.r is not None:
        return backend.batch_renorm_backward(dy, saved.x, saved.gamma, saved.mean, saved.invstd,
                                             saved.r, saved.d, **act, **common)
    if saved.grouped:
        return backend.ghost_batch_norm_backward(dy, saved.x, saved.gamma, saved.mean,
                                                 saved.invstd, **act, **common)
    return backend.batch_norm_backward(dy, saved.x, saved.gamma, saved.mean, saved.invstd,
                                       training=saved.batch, param_grads=param_grads,
                                       **act, **common)
