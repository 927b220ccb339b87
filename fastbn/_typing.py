"""Type aliases of fastbn's public signatures (for readers, mypy and help()).

The dtype rules the aliases cannot state (float32, float64, float16 or
bfloat16 data, per-channel arrays of the data's parameter dtype:
:mod:`fastbn._dtypes`) are checked at run time by :mod:`fastbn._checks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional, TypeAlias

import numpy as np
from numpy.typing import NDArray

#: An array of float values (float32, float64, float16; bfloat16 at run time).
FloatArray: TypeAlias = NDArray[np.floating[Any]]
#: A per-channel (C,) array or None, such as gamma and beta (None: no affine map).
OptionalArray: TypeAlias = Optional[FloatArray]
#: The activation fused into a pass.
Activation: TypeAlias = Optional[Literal["relu", "leaky_relu"]]
#: The running-statistics counter: a 0-d or one-element int64 array, or None.
Counter: TypeAlias = Optional[NDArray[np.int64]]
#: A synchronized pass's reduction: combines every rank's (C + 10, 4) float64 records.
Allreduce: TypeAlias = Callable[[NDArray[np.float64]], Optional[NDArray[np.float64]]]
#: What a forward returns: y, mean, invstd.
Triple: TypeAlias = tuple[FloatArray, FloatArray, FloatArray]
#: What Batch Renormalization's forward returns: y, mean, invstd, r, d.
Renormed: TypeAlias = tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]
#: What a backward returns: dx, dgamma, dbeta (the last two None when not computed).
Gradients: TypeAlias = tuple[FloatArray, Optional[FloatArray], Optional[FloatArray]]

__all__ = ["Activation", "Allreduce", "Counter", "FloatArray", "Gradients", "OptionalArray", "Renormed",
           "Triple"]
