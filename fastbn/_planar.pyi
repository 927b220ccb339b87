# Stub for the compiled kernel modules: fastbn._planar (fastbn/_planar.pyx)
# and, with the same functions (the stubs of the others import these), the
# columnar family fastbn._columnar and the x86-64-v3/v4 builds of both.
# Arrays are C-contiguous; every array of a call has one dtype, float32 or
# float64 (the kernels are fused over both). x, y: (N, C, S) in the planar
# family, (M, C) in the columnar one; vectors: (C,). sums and apply work in
# float64 whatever the dtype of the data.
import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.float32] | npt.NDArray[np.float64]

def forward_train(
    x: _Array,  # const floating[:, :, ::1] (planar), [:, ::1] (columnar)
    gamma: _Array | None,  # const floating[::1]
    beta: _Array | None,  # const floating[::1]
    y: _Array,  # floating[:, :, ::1] (planar), [:, ::1] (columnar), may be x
    mean: _Array,  # floating[::1], written
    invstd: _Array,  # floating[::1], written
    running_mean: _Array | None,  # floating[::1], updated
    running_var: _Array | None,  # floating[::1], updated
    eps: float,
    factor: float,
    unbiased: bool,  # the running variance takes var * m / (m - 1)
    activation: int,  # fused: 0 none, 1 relu, 2 leaky_relu (fastbn._checks.ACTIVATIONS)
    negative_slope: float,
    num_threads: int,
    stream: bool,  # y (dx, out) is the caller's buffer: stream it when large
) -> None: ...
def inference(
    x: _Array,  # const floating[:, :, ::1] (planar), [:, ::1] (columnar)
    gamma: _Array | None,  # const floating[::1]
    beta: _Array | None,  # const floating[::1]
    running_mean: _Array,  # const floating[::1]
    running_var: _Array,  # const floating[::1]
    y: _Array,  # floating[:, :, ::1] (planar), [:, ::1] (columnar), may be x
    eps: float,
    activation: int,
    negative_slope: float,
    num_threads: int,
    stream: bool,  # y (dx, out) is the caller's buffer: stream it when large
) -> None: ...
def backward(
    dy: _Array,  # const floating[:, :, ::1] (planar), [:, ::1] (columnar)
    x: _Array,  # const floating[:, :, ::1] (planar), [:, ::1] (columnar)
    gamma: _Array | None,  # const floating[::1]
    beta: _Array | None,  # const floating[::1]; read with an activation
    mean: _Array | None,  # const floating[::1]; None from the output (grad 2)
    invstd: _Array,  # const floating[::1]
    dx: _Array,  # floating[:, :, ::1] (planar), [:, ::1] (columnar), may be dy (or x)
    dgamma: _Array | None,  # floating[::1], written; None only when frozen
    dbeta: _Array | None,  # floating[::1], written; None only when frozen
    frozen: bool,  # mean and invstd are constants (eval mode): dx = gamma * invstd * dy
    grad: int,  # 0 plain, 1 dy of an activated output (x), 2 from the output (x is y)
    activation: int,  # 0 none, 1 relu, 2 leaky_relu (fastbn._stats)
    negative_slope: float,
    num_threads: int,
    stream: bool,  # y (dx, out) is the caller's buffer: stream it when large
) -> None: ...
def sums(
    a: _Array,  # const floating[:, :, ::1] (planar), [:, ::1] (columnar)
    b: _Array | None,  # like a, or None
    center: npt.NDArray[np.float64],  # const double[::1], (C,)
    out: npt.NDArray[np.float64],  # double[:, ::1], (C, 2), written
    num_threads: int,
    grad: int = ...,  # as backward's; then the arrays below as backward's
    activation: int = ...,
    negative_slope: float = ...,
    gamma: _Array | None = ...,
    beta: _Array | None = ...,
    mean: _Array | None = ...,
    invstd: _Array | None = ...,
) -> None: ...
def apply(
    a: _Array,  # const floating[:, :, ::1] (planar), [:, ::1] (columnar)
    b: _Array | None,  # like a, or None
    out: _Array,  # like a, written; may be a
    coef: npt.NDArray[np.float64],  # const double[:, ::1], (C, 4)
    activation: int,  # fused into a forward's apply (b None)
    negative_slope: float,
    num_threads: int,
    stream: bool,  # y (dx, out) is the caller's buffer: stream it when large
    grad: int = ...,  # as sums
    gamma: _Array | None = ...,
    beta: _Array | None = ...,
    mean: _Array | None = ...,
    invstd: _Array | None = ...,
) -> None: ...
def compile_args() -> str: ...
