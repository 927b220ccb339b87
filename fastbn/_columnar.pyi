# Stub for the compiled module fastbn._columnar (fastbn/_columnar.pyx).
# Arrays are C-contiguous; every array of a call has one dtype, float32 or
# float64 (the kernels are fused over both). x, y: (M, C); vectors: (C,).
import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.float32] | npt.NDArray[np.float64]

def forward_train(
    x: _Array,  # const floating[:, ::1]
    gamma: _Array | None,  # const floating[::1]
    beta: _Array | None,  # const floating[::1]
    y: _Array,  # floating[:, ::1], may be x
    mean: _Array,  # floating[::1], written
    invstd: _Array,  # floating[::1], written
    running_mean: _Array | None,  # floating[::1], updated
    running_var: _Array | None,  # floating[::1], updated
    eps: float,
    factor: float,
    num_threads: int,
) -> None: ...
def inference(
    x: _Array,  # const floating[:, ::1]
    gamma: _Array | None,  # const floating[::1]
    beta: _Array | None,  # const floating[::1]
    running_mean: _Array,  # const floating[::1]
    running_var: _Array,  # const floating[::1]
    y: _Array,  # floating[:, ::1], may be x
    eps: float,
    num_threads: int,
) -> None: ...
def backward(
    dy: _Array,  # const floating[:, ::1]
    x: _Array,  # const floating[:, ::1]
    gamma: _Array | None,  # const floating[::1]
    mean: _Array,  # const floating[::1]
    invstd: _Array,  # const floating[::1]
    dx: _Array,  # floating[:, ::1], may be dy
    dgamma: _Array,  # floating[::1], written
    dbeta: _Array,  # floating[::1], written
    num_threads: int,
) -> None: ...
