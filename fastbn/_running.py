"""The running statistics' bookkeeping around a training forward.

The update itself, ``running = (1 - f) * running + f * batch`` with the
unbiased batch variance, is compiled (``fastbn/_stats.pxd``); this module
gives it its weight ``f`` and, once the pass has succeeded, copies the
result back where the caller's arrays were not contiguous and counts the
batch (PyTorch's ``num_batches_tracked``).
"""

from __future__ import annotations

from typing import Any

from numpy.typing import NDArray


def factor(momentum: float | None, num_batches_tracked: NDArray[Any] | None) -> float:
    """Weight of the new batch: ``momentum``, or ``1 / (batches seen + 1)``
    for the cumulative average (momentum None)."""
    if momentum is not None:
        return momentum
    count = 0 if num_batches_tracked is None else int(num_batches_tracked.reshape(()))
    return 1.0 / (count + 1)


def commit(running_mean: Any, rm: NDArray[Any], running_var: Any,
           rv: NDArray[Any], num_batches_tracked: NDArray[Any] | None) -> None:
    """After a successful update of the checked running statistics rm, rv
    (see :func:`fastbn._arguments.training_state`): copy them back where the
    caller's arrays were not contiguous (rm, rv are copies then), and count
    the batch."""
    if rm is not running_mean:
        running_mean[...] = rm
    if rv is not running_var:
        running_var[...] = rv
    if num_batches_tracked is not None:
        num_batches_tracked += 1
