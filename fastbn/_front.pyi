# Stub for the compiled module fastbn._front (fastbn/_front.pyx): the fast
# paths of the public functions (None when a call needs the full checks of
# fastbn._checks) and their unchecked cores.
from typing import Any

import numpy as np
import numpy.typing as npt

from fastbn._typing import FloatArray as _Array
from fastbn._typing import Gradients, Triple

#: activation names -> the kernels' codes (fastbn/_call.pxd)
ACTIVATIONS: dict[str | None, int]
#: "plain", "activated", "output" -> the kernels' gradient kinds (fastbn/_call.pxd)
GRADIENTS: dict[str, int]

def select(planar: Any, columnar: Any) -> None: ...
def forward(
    x: Any,
    gamma: Any,
    beta: Any,
    eps: Any,
    running_mean: Any,
    running_var: Any,
    momentum: Any,
    num_batches_tracked: Any,
    unbiased: Any,
    activation: Any,
    negative_slope: Any,
    channel_axis: Any,
    out: Any,
    num_threads: Any,
    ndims: tuple[int, ...] | None = None,
    num_features: int = -1,
    dtype: np.dtype[Any] | None = None,
) -> Triple | None: ...
def inference(
    x: Any,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    eps: Any,
    activation: Any,
    negative_slope: Any,
    channel_axis: Any,
    out: Any,
    num_threads: Any,
    ndims: tuple[int, ...] | None = None,
    num_features: int = -1,
    dtype: np.dtype[Any] | None = None,
) -> _Array | None: ...
def backward(
    dy: Any,
    x: Any,
    gamma: Any,
    mean: Any,
    invstd: Any,
    beta: Any,
    activation: Any,
    negative_slope: Any,
    training: Any,
    param_grads: Any,
    channel_axis: Any,
    out: Any,
    num_threads: Any,
) -> Gradients | None: ...
def backward_from_output(
    dy: Any,
    y: Any,
    gamma: Any,
    beta: Any,
    invstd: Any,
    activation: Any,
    negative_slope: Any,
    channel_axis: Any,
    out: Any,
    num_threads: Any,
) -> Triple | None: ...
def variant_forward(
    x: Any,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    momentum: Any,
    num_batches_tracked: Any,
    eps: Any,
    unbiased: Any,
    activation: Any,
    negative_slope: Any,
    channel_axis: Any,
    out: Any,
    num_threads: Any,
    clip: tuple[Any, Any, Any] | None,
    virtual_batch_size: Any,
) -> Any: ...
def variant_backward(
    dy: Any,
    x: Any,
    gamma: Any,
    mean: Any,
    invstd: Any,
    r: Any,
    d: Any,
    beta: Any,
    activation: Any,
    negative_slope: Any,
    channel_axis: Any,
    out: Any,
    num_threads: Any,
    renorm: bool,
    grouped: bool | None,
) -> Triple | None: ...
def forward_unchecked(
    x: _Array,
    gamma: _Array | None,
    beta: _Array | None,
    running_mean: _Array | None,
    running_var: _Array | None,
    momentum: float | None,
    num_batches_tracked: npt.NDArray[np.int64] | None,
    eps: float,
    unbiased: bool,
    act: int,  # 0 none, 1 relu, 2 leaky_relu (fastbn._checks.ACTIVATIONS)
    slope: float,
    channel_axis: int,  # 1 or x.ndim - 1
    out: _Array | None,
    num_threads: int,  # resolved
) -> Triple: ...
def inference_unchecked(
    x: _Array,
    gamma: _Array | None,
    beta: _Array | None,
    running_mean: _Array,
    running_var: _Array,
    eps: float,
    act: int,
    slope: float,
    channel_axis: int,
    out: _Array | None,
    num_threads: int,
) -> _Array: ...
def backward_unchecked(
    dy: _Array,
    x: _Array,  # y with from_output
    gamma: _Array | None,
    beta: _Array | None,
    mean: _Array | None,  # None with from_output
    invstd: _Array,
    act: int,
    slope: float,
    training: bool,
    param_grads: bool,
    from_output: bool,
    channel_axis: int,
    out: _Array | None,
    num_threads: int,
) -> Gradients: ...
def variant_forward_unchecked(
    x: _Array,
    gamma: _Array | None,
    beta: _Array | None,
    running_mean: _Array | None,
    running_var: _Array | None,
    momentum: float | None,
    num_batches_tracked: npt.NDArray[np.int64] | None,
    eps: float,
    unbiased: bool,
    act: int,
    slope: float,
    channel_axis: int,
    out: _Array | None,
    num_threads: int,
    renorm: bool,  # Batch Renormalization: also r and d are returned
    rmax: float,
    rmin: float,
    dmax: float,
    groups: int,  # Ghost Batch Normalization: virtual batches (1: the batch)
    grouped: bool,  # the statistics are (groups, C)
) -> Any: ...  # (y, mean, invstd), and r, d with renorm
def variant_backward_unchecked(
    dy: _Array,
    x: _Array,
    gamma: _Array | None,
    beta: _Array | None,
    mean: _Array,
    invstd: _Array,
    r: _Array | None,
    d: _Array | None,
    act: int,
    slope: float,
    channel_axis: int,
    out: _Array | None,
    num_threads: int,
    groups: int,
) -> Triple: ...
