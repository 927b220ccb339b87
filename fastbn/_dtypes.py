"""The dtypes of fastbn's arrays, in one place.

The data (x, dy, y, out) may be float32, float64, float16 or bfloat16. The
parameters and statistics (gamma, beta, the running statistics, mean,
invstd, dgamma, dbeta) are float64 with float64 data and float32 with any
other, as in PyTorch's CPU BatchNorm: 16-bit data is stored in 16 bits and
computed on in float32 and float64, its parameters stay float32.

bfloat16 is the NumPy dtype of ``ml_dtypes`` (the one JAX uses), an
optional dependency: fastbn never imports it (its import takes a good part
of a second); a bfloat16 array can only exist once the program has imported
it, so it is looked up where it is, in ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from fastbn._typing import FloatArray

FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
FLOAT16 = np.dtype(np.float16)
#: the dtypes of parameters and statistics, and of float32/float64 data
PARAMETER_DTYPES = (FLOAT32, FLOAT64)
#: the data dtypes as messages list them
DATA_NAMES = "float32, float64, float16 or bfloat16"


def bfloat16() -> np.dtype[Any] | None:
    """ml_dtypes' bfloat16 dtype, or None when the program has not imported
    ml_dtypes (then no array has that dtype)."""
    module = sys.modules.get("ml_dtypes")
    return None if module is None else np.dtype(module.bfloat16)


def is_half(dtype: np.dtype[Any]) -> bool:
    """float16 or bfloat16 (native byte order)."""
    if dtype == FLOAT16:
        return True
    if dtype.kind != "V" or dtype.itemsize != 2:
        return False
    b = bfloat16()
    return b is not None and dtype == b


def is_data(dtype: np.dtype[Any]) -> bool:
    """A dtype the data may have (native byte order)."""
    return dtype in PARAMETER_DTYPES or is_half(dtype)


def tag(dtype: np.dtype[Any]) -> str:
    """A dtype as a string another process reads back: its ``str`` ('<f4'),
    or "bfloat16" (whose ``str``, '<V2', names no dtype)."""
    return "bfloat16" if dtype.kind == "V" and is_half(dtype) else dtype.str


def parameters(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype of the parameters and statistics of data of ``dtype``:
    float64 for float64, float32 for float32, float16 and bfloat16."""
    return FLOAT64 if dtype == FLOAT64 else FLOAT32


def rounded(a: FloatArray, dtype: np.dtype[Any]) -> FloatArray:
    """A float64 result rounded once to ``dtype``: the last step of each
    function of :mod:`fastbn.reference`. A value beyond the dtype's range
    becomes +-inf, as the kernels' float32 results do (a float32 dx with a
    saturated invstd, say): that is the result, so it raises no warning.
    bfloat16 goes through float32 rounded to odd, which rounds to bfloat16
    as the float64 value does (ml_dtypes before 0.7 rounds float64 to
    bfloat16 through float32 rounded to nearest: twice)."""
    with np.errstate(over="ignore"):
        return (_to_odd_float32(a) if np.dtype(dtype).kind == "V" else a).astype(dtype)


def _to_odd_float32(a: FloatArray) -> FloatArray:
    """a rounded to float32 toward zero, its last bit set where that was
    inexact (rounding to odd; float32 has more than bfloat16's 8 + 2 bits)."""
    f = np.asarray(a, dtype=np.float64).astype(np.float32)
    back = f.astype(np.float64)
    inexact = np.isfinite(a) & (back != a)
    toward_zero = np.where(np.abs(back) > np.abs(a), np.nextafter(f, np.float32(0)), f)
    odd = (toward_zero.view(np.uint32) | np.uint32(1)).view(np.float32)
    result: FloatArray = np.where(inexact, odd, f)
    return result
