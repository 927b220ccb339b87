"""The checks of the BatchNorm variants' arguments (:mod:`fastbn.variants`).

Batch Renormalization's clipping and Ghost Batch Normalization's
``virtual_batch_size``, single and as the argument sets of the variants'
functions; the policy and messages are :mod:`fastbn._checks`'. Every check
runs before anything is written.
"""

from __future__ import annotations

import math
from typing import Any

from numpy.typing import NDArray

from fastbn._checks import _error, _shown, array, is_int, is_real, parameter_dtype

__all__ = ["clipping", "groups", "renorm_clipping", "statistics"]

#: Keras' defaults of ``renorm_clipping`` (rmin defaults to 1 / rmax)
RMAX, DMAX = 3.0, 5.0


def _bound(name: str, value: Any, who: str | None) -> float:
    if not is_real(value):
        raise _error(TypeError, who, f"{name} must be a real number, got "
                                     f"{type(value).__name__}")
    result = float(value)
    if math.isnan(result):
        raise _error(ValueError, who, f"{name} must not be NaN")
    return result


def clipping(rmax: Any, rmin: Any, dmax: Any, *,
             who: str | None = None) -> tuple[float, float, float]:
    """Batch Renormalization's clipping as floats (rmax, rmin, dmax): r is
    clipped to [rmin, rmax] with ``0 <= rmin <= 1 <= rmax`` (rmin None is
    1 / rmax) and d to [-dmax, dmax] with ``dmax >= 0``; rmax and dmax may
    be inf (no clipping)."""
    rmax_ = _bound("rmax", rmax, who)
    if not rmax_ >= 1.0:
        raise _error(ValueError, who, f"rmax must be >= 1 (r is clipped to [rmin, rmax], "
                                      f"around 1), got {_shown(rmax)}")
    rmin_ = 1.0 / rmax_ if rmin is None else _bound("rmin", rmin, who)
    if not 0.0 <= rmin_ <= 1.0:
        raise _error(ValueError, who, f"rmin must be in [0, 1] (r is clipped to [rmin, rmax], "
                                      f"around 1), got {_shown(rmin)}")
    dmax_ = _bound("dmax", dmax, who)
    if not dmax_ >= 0.0:
        raise _error(ValueError, who, f"dmax must be >= 0 (d is clipped to [-dmax, dmax]), "
                                      f"got {_shown(dmax)}")
    return rmax_, rmin_, dmax_


def renorm_clipping(value: Any, *, who: str | None = None) -> dict[str, float]:
    """A layer's ``renorm_clipping`` (Keras' argument): None or a dict with
    keys among "rmax" (default 3), "rmin" (default 1 / rmax) and "dmax"
    (default 5), checked as :func:`clipping`; returns the full dict."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _error(TypeError, who, f"renorm_clipping must be a dict or None, got "
                                     f"{type(value).__name__}")
    unknown = sorted(str(k) for k in set(value) - {"rmax", "rmin", "dmax"})
    if unknown:
        raise _error(ValueError, who, f"renorm_clipping takes the keys 'rmax', 'rmin' and "
                                      f"'dmax', got {', '.join(map(repr, unknown))}")
    rmax, rmin, dmax = clipping(value.get("rmax", RMAX), value.get("rmin"),
                                value.get("dmax", DMAX), who=who)
    return {"rmax": rmax, "rmin": rmin, "dmax": dmax}


def groups(virtual_batch_size: Any, x: NDArray[Any], channel_axis: int, *,
           who: str | None = None) -> int:
    """The number of virtual batches of x (Ghost Batch Normalization):
    ``virtual_batch_size`` an int > 0 that divides the batch size N
    (``x.shape[0]``), each group holding more than one value per channel."""
    if not is_int(virtual_batch_size):
        raise _error(TypeError, who, f"virtual_batch_size must be an int, got "
                                     f"{type(virtual_batch_size).__name__}")
    v = int(virtual_batch_size)
    n = x.shape[0]
    if v <= 0 or n % v:
        raise _error(ValueError, who, f"virtual_batch_size={_shown(v)} must be > 0 and divide "
                                      f"the batch size N={n} (x of shape {x.shape})")
    values = v * (x.size // n) // x.shape[channel_axis]
    if values <= 1:
        raise _error(ValueError, who, f"virtual_batch_size={v} gives groups of {values} value "
                                      f"per channel for x of shape {x.shape} (batch size "
                                      f"N={n}): each group needs more than 1")
    groups: int = n // v
    return groups


def statistics(names: tuple[str, ...], arrays: tuple[Any, ...], x: NDArray[Any],
               num_features: int, *, grouped: bool,
               who: str | None = None) -> tuple[int, list[NDArray[Any]]]:
    """A variant backward's per-channel inputs (mean, invstd and r, d), as
    the forward returned them: each an ndarray of x's parameter dtype, (C,), or
    (groups, C) when ``grouped``, with groups dividing x's batch size.
    Returns (groups, the arrays C-contiguous)."""
    checked = []
    shape = None
    for name, a in zip(names, arrays):
        if a is None:
            raise _error(TypeError, who, f"{name} (from the forward) is required, got None")
        array(name, a, who=who)
        parameter_dtype(name, a, x.dtype, who=who)
        expected = f"(groups, {num_features})" if grouped else f"({num_features},)"
        if (a.ndim != (2 if grouped else 1) or a.shape[-1] != num_features
                or (shape is not None and a.shape != shape)):
            same = "" if shape is None else f", that of {names[0]} {shape}"
            raise _error(ValueError, who, f"{name} must have shape {expected}{same}, got "
                                          f"{a.shape}")
        shape = a.shape
        checked.append(a if a.flags.c_contiguous else a.copy())
    count = shape[0] if grouped and shape is not None else 1
    if count == 0 or x.shape[0] % count:
        raise _error(ValueError, who, f"{names[0]} has {count} groups, which must divide the "
                                      f"batch size N={x.shape[0]}")
    return count, checked
