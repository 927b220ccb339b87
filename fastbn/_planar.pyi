# Stub for the compiled kernel modules: fastbn._planar (fastbn/_planar.pyx)
# and, with the same functions (the stubs of the others import these), the
# columnar family fastbn._columnar and the x86-64-v3/v4 builds of both.
# The passes of the public functions run through ENTRY (fastbn._front); sums
# and apply, the two halves of a pass, serve fastbn.distributed.
# Arrays are C-contiguous; every array of a call has one dtype, float32 or
# float64 (the kernels are fused over both). x, y: (N, C, S) in the planar
# family, (M, C) in the columnar one; vectors: (C,). sums and apply work in
# float64 whatever the dtype of the data.
import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.float32] | npt.NDArray[np.float64]

#: the entry of the compiled front: a capsule holding ``int run(const Call*)``
#: (fastbn/_call.pxd), which fastbn._front calls without the GIL
ENTRY: object

def sums(
    a: _Array,  # C-contiguous (N, C, S) (planar), (M, C) (columnar)
    b: _Array | None,  # like a, or None; sums around a's first values (b None), else the mean
    out: npt.NDArray[np.float64],  # double[:, ::1], (C, 2), written
    num_threads: int,
    grad: int = ...,  # 0 plain (a = dy, b = x), 1 dy of an activated output, 2 b is y
    activation: int = ...,  # 0 none, 1 relu, 2 leaky_relu (fastbn._stats)
    negative_slope: float = ...,
    gamma: _Array | None = ...,
    beta: _Array | None = ...,
    mean: _Array | None = ...,
    invstd: _Array | None = ...,
    r: _Array | None = ...,  # Batch Renormalization's backward: r and d, both or neither
    d: _Array | None = ...,
) -> None: ...
def apply(
    a: _Array,  # C-contiguous (N, C, S) (planar), (M, C) (columnar)
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
    r: _Array | None = ...,  # Batch Renormalization's backward: r and d, both or neither
    d: _Array | None = ...,
) -> None: ...
def compile_args() -> str: ...
