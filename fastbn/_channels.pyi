# Stub for the compiled module fastbn._channels (fastbn/_channels.pyx): the
# per-channel finishing of the synchronized passes. Arrays of the call's
# dtype (float32 or float64) are (C,) and C-contiguous; None where allowed.
import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_Doubles = npt.NDArray[np.float64]

def moments(
    sums: _Doubles,  # const double[:, ::1], (C, 2)
    center: _Doubles,  # const double[::1], (C,)
    m: float,
    out: _Doubles,  # double[:, :], (C, 2), written: (mean, var)
) -> None: ...
def forward_map(
    stats: _Doubles,  # const double[:, :], (C, 2): (mean, var)
    m: float,
    eps: float,
    mean: _Array,  # written
    invstd: _Array,  # written
    gamma: _Array | None,
    beta: _Array | None,
    running_mean: _Array | None,  # updated
    running_var: _Array | None,  # updated
    factor: float,
    unbiased: bool,
    coef: _Doubles,  # double[:, ::1], (C, 4), written
    r: _Array | None = None,  # Batch Renormalization: written, with d
    d: _Array | None = None,
    rmax: float = 1.0,
    rmin: float = 1.0,
    dmax: float = 0.0,
) -> None: ...
def backward_map(
    sums: _Doubles,  # const double[:, :], (C, 2): (sum dy, sum dy * (x - mean))
    m: float,
    invstd: _Array,
    mean: _Array | None,  # None: the sums are (sum dy, sum dy * xhat), from the output
    gamma: _Array | None,
    dgamma: _Array,  # written
    dbeta: _Array,  # written
    coef: _Doubles,  # double[:, ::1], (C, 4), written
    r: _Array | None = None,  # Batch Renormalization: read, with d
    d: _Array | None = None,
) -> None: ...
