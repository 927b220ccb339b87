"""Every argument check of fastbn's public entry points, in one place.

The functions (:mod:`fastbn.functional`), the layers (:mod:`fastbn.layers`),
the adapters (:mod:`fastbn.compat`) and the synchronized passes
(:mod:`fastbn.distributed`) check their arguments here, so that one mistake
gets one message and one exception type wherever it is made.

Exception policy
----------------
- ``TypeError``: an argument of the wrong type (not an ndarray, a masked
  array, not a number, not an int) or of the wrong dtype, whatever the
  argument (``out`` and ``num_batches_tracked`` included);
- ``ValueError``: an argument of the right type with a wrong shape,
  layout, value or memory (out of range, read-only where it is written,
  overlapping another argument), a number too large for a float included;
- a flag that is not a bool raises :class:`FlagError`, a ``TypeError`` that
  is a ``ValueError`` too (PyTorch's ``Module.train`` raises ValueError).

Messages name the argument, what was expected and what came. A layer or an
adapter passes ``who`` (its class or function name), which starts the
message: ``"BatchNorm2d: eps must be finite and > 0, got -1"``. Every check
runs before anything is written, so a call that raises changes nothing.

Each exception carries ``problem``: a tuple ``(kind, *details)`` that the
failure protocol of :mod:`fastbn.distributed` sends to the other ranks
(kinds: ``"not_array"``, ``"dtype"``, ``"ndim"``, ``"channels"``,
``"shape"``; ``("other",)`` for the rest).
"""

from __future__ import annotations

import collections.abc
import math
import numbers
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from fastbn import _dtypes, _front, _openmp, _overlap


def _error(cls: type[Exception], who: str | None, text: str, *problem: Any) -> Exception:
    """An exception of type cls, prefixed with who, carrying ``problem``."""
    exc = cls(f"{who}: {text}" if who else text)
    exc.problem = problem or ("other",)  # type: ignore[attr-defined]
    return exc


def _shown(value: object, limit: int = 20) -> str:
    """A value for a message, cut short when its text is long (10**400)."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def dtype_name(dtype: DTypeLike) -> str:
    """A dtype as a message shows it: its name, with the byte order when it
    is not the machine's ('>f4' is "float32 (big-endian)")."""
    dtype = np.dtype(dtype)
    if dtype.byteorder not in "=|" and not dtype.isnative:
        return f"{dtype.name} ({'big' if dtype.byteorder == '>' else 'little'}-endian)"
    return dtype.name


# --------------------------------------------------------------- numbers ----

def is_int(v: object) -> bool:
    """An integer that is not a bool (fast path for the built-in int)."""
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def is_real(v: object) -> bool:
    """A real number that is not a bool (fast path for built-in float and int)."""
    return type(v) is float or is_int(v) or (isinstance(v, numbers.Real)
                                              and not isinstance(v, bool))


class FlagError(TypeError, ValueError):
    """A flag that is not a bool: a TypeError by fastbn's rule, and a
    ValueError too, which is what PyTorch's ``Module.train(mode)`` raises
    (as NumPy's ``AxisError`` is both a ValueError and an IndexError)."""


def flag(value: Any, name: str, *, who: str | None = None) -> bool:
    """A bool (numpy.bool_ too) as a bool; anything else (an int, a string,
    None) is a :class:`FlagError`, at every entry point: the functions'
    flags, a layer's ``affine``, ``track_running_stats``, ``unbiased``,
    ``memory_saving``, ``train(mode)`` and ``load_state_dict(strict)``."""
    if not isinstance(value, (bool, np.bool_)):
        raise _error(FlagError, who, f"{name} must be True or False, got "
                                     f"{type(value).__name__} {_shown(value)}")
    return bool(value)


def _to_float(value: Any) -> float:
    """A real number as a float; one too large for a float (10**400) as an
    infinity of its sign, so that the range check names it (float() would
    raise a bare OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


#: activation names -> the kernels' codes (fastbn/_call.pxd, through the compiled front)
ACTIVATIONS = _front.ACTIVATIONS


def activation(value: Any, negative_slope: Any, *,
               who: str | None = None) -> tuple[int, float]:
    """(kernel code, slope) of a fused activation: None, "relu" or
    "leaky_relu" with a finite real ``negative_slope`` (PyTorch's name)."""
    if value is not None and not isinstance(value, str):
        raise _error(TypeError, who, f"activation must be None, 'relu' or 'leaky_relu', got "
                                     f"{type(value).__name__}")
    if value not in ACTIVATIONS:
        raise _error(ValueError, who, f"activation must be None, 'relu' or 'leaky_relu', got "
                                      f"{value!r}")
    if not is_real(negative_slope):
        raise _error(TypeError, who, f"negative_slope must be a real number, got "
                                     f"{type(negative_slope).__name__}")
    slope = _to_float(negative_slope)
    if not math.isfinite(slope):
        raise _error(ValueError, who, f"negative_slope must be finite, got "
                                      f"{_shown(negative_slope)}")
    return ACTIVATIONS[value], slope


def eps(value: Any, *, who: str | None = None, name: str = "eps") -> float:
    """eps as a float, finite and > 0 (an int too large for a float is refused
    like an infinite one)."""
    if not is_real(value):
        raise _error(TypeError, who, f"{name} must be a real number, got "
                                     f"{type(value).__name__}")
    result = _to_float(value)
    if not (math.isfinite(result) and result > 0):
        raise _error(ValueError, who, f"{name} must be finite and > 0, got {_shown(value)}")
    return result


def momentum(value: Any, *, who: str | None = None, name: str = "momentum",
             optional: bool = True) -> float | None:
    """momentum as a float in [0, 1], or None when ``optional``."""
    if value is None and optional:
        return None
    if not is_real(value):
        expected = "a real number or None" if optional else "a real number"
        raise _error(TypeError, who, f"{name} must be {expected}, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise _error(ValueError, who, f"{name} must be in [0, 1]"
                                      f"{' or None' if optional else ''}, got {_shown(value)}")
    return float(value)


def num_threads(value: Any, *, who: str | None = None) -> int | None:
    """A positive int or None, as given (capped at the C int range)."""
    if value is None:
        return None
    if not is_int(value):
        raise _error(TypeError, who, f"num_threads must be a positive int or None, got "
                                     f"{type(value).__name__}")
    if value <= 0:
        raise _error(ValueError, who, f"num_threads must be a positive int or None, got "
                                      f"{_shown(value)}")
    return min(int(value), 2**31 - 1)


def threads(value: Any) -> int:
    """num_threads checked and resolved: the thread count the kernels get
    (the OpenMP default for None, both capped per processor)."""
    return _openmp.effective_num_threads(num_threads(value))


def num_features(value: Any, *, who: str | None = None, note: str = "") -> int:
    """C as an int >= 1 that NumPy can allocate (C values of 8 bytes)."""
    if not is_int(value):
        raise _error(TypeError, who, f"num_features must be an int{note}, got "
                                     f"{type(value).__name__}")
    if value < 1:
        raise _error(ValueError, who, f"num_features must be >= 1, got {_shown(value)}")
    if value > np.iinfo(np.intp).max // 8:
        raise _error(ValueError, who, f"num_features must be small enough for one value "
                                      f"per channel to fit in memory, got {_shown(value)}")
    return int(value)


def channel_axis(value: Any, ndim: int | None = None, *, who: str | None = None) -> int:
    """The channel axis: 1 or -1 (as given) when ndim is None; otherwise as
    1 or ndim - 1, accepting 1, -1 and their equivalents for that ndim."""
    if not is_int(value):
        raise _error(TypeError, who, f"channel_axis must be an int, got {type(value).__name__}")
    if ndim is None:
        if value not in (1, -1):
            raise _error(ValueError, who, f"channel_axis must be 1 (channels first) or -1 "
                                          f"(channels last), got {_shown(value)}")
        return int(value)
    if value not in (1, -1, ndim - 1, 1 - ndim):
        raise _error(ValueError, who, f"channel_axis must be 1 (channels first) or -1 "
                                      f"(channels last), got {_shown(value)} for an input of "
                                      f"{ndim} dimensions")
    return int(value) % ndim


_channel_axis = channel_axis  # for the functions with an argument of that name


def axis(value: Any, ndim: int, *, who: str | None = None, name: str = "axis",
         of: str = "the array") -> int:
    """Any axis of an array ``of`` ndim dimensions (negative counts from the
    end), returned as an int in [0, ndim)."""
    if not is_int(value):
        raise _error(TypeError, who, f"{name} must be an int, got {type(value).__name__}")
    if not -ndim <= value < ndim:
        raise _error(ValueError, who, f"{name} must be an axis of {of}, in [{-ndim}, "
                                      f"{ndim - 1}] for its {ndim} dimensions, got "
                                      f"{_shown(value)}")
    return int(value) % ndim


def float_dtype(value: Any, *, who: str | None = None, name: str = "dtype") -> np.dtype[Any]:
    """A dtype argument (np.float32, 'float64', ...) as float32 or float64."""
    try:
        dtype: np.dtype[Any] = np.dtype(value)
    except TypeError:
        raise _error(TypeError, who, f"{name} must be float32 or float64, got "
                                     f"{value!r}") from None
    if dtype not in _dtypes.PARAMETER_DTYPES:
        hint = (f": the parameters' dtype; a float32 layer takes {dtype} input"
                if _dtypes.is_half(dtype) else "")
        raise _error(TypeError, who, f"{name} must be float32 or float64, got {dtype}{hint}")
    return dtype


def memory_saving(value: object, activation_: Any, negative_slope: float, *,
                  who: str | None = None) -> bool:
    """A layer's ``memory_saving`` flag as a bool. True needs an activation
    the backward from the output can invert: None, or "leaky_relu" with
    ``negative_slope`` > 0 (``activation_`` and ``negative_slope`` already
    checked by :func:`activation`)."""
    value = flag(value, "memory_saving", who=who)
    if value and (activation_ == "relu" or (activation_ == "leaky_relu"
                                            and negative_slope <= 0)):
        got = (f"activation={activation_!r}" if activation_ == "relu" else
               f"activation='leaky_relu' with negative_slope={negative_slope:g}")
        raise _error(ValueError, who, f"memory_saving=True needs activation None or "
                                      f"'leaky_relu' with negative_slope > 0 (its backward "
                                      f"inverts the activation on the output), got {got}")
    return value


# ---------------------------------------------------------------- arrays ----

def array(name: str, a: Any, *, who: str | None = None, what: str = "a numpy.ndarray") -> None:
    """a must be an ndarray, and not a masked array: its mask would be
    ignored and the masked values normalized like the others."""
    if not isinstance(a, np.ndarray):
        raise _error(TypeError, who, f"{name} must be {what}, got {type(a).__name__}",
                     "not_array", name)
    if isinstance(a, np.ma.MaskedArray):
        raise _error(TypeError, who, f"{name} must be {what}, got a numpy.ma.MaskedArray "
                                     f"(its mask would be ignored); pass {name}.filled(value) "
                                     f"or {name}.data", "not_array", name)


def dtype_of(name: str, a: NDArray[Any], dtype: np.dtype[Any] | None, *, who: str | None = None,
             whose: str = "x") -> None:
    """a (an ndarray) has dtype: a data dtype when dtype is None (float32,
    float64, float16, bfloat16: fastbn._dtypes), else that dtype
    (``whose``: x, or the layer, named in the message; or the text that
    says which dtype it is)."""
    if dtype is None:
        if not _dtypes.is_data(a.dtype):
            raise _error(TypeError, who, f"{name} must have dtype {_dtypes.DATA_NAMES}, got "
                                         f"{dtype_name(a.dtype)}", "dtype", name,
                         _dtypes.tag(a.dtype))
    elif a.dtype != dtype:
        expected = (f"the layer's dtype ({dtype})" if whose == "layer" else
                    f"dtype {dtype}, {whose}" if " " in whose else
                    f"the dtype of {whose} ({dtype})")
        raise _error(TypeError, who, f"{name} must have {expected}, got "
                                     f"{dtype_name(a.dtype)}", "dtype", name, _dtypes.tag(a.dtype))


def parameter_dtype(name: str, a: NDArray[Any], dtype: np.dtype[Any] | None, *,
                    who: str | None = None, whose: str = "x") -> None:
    """a (an ndarray) has the parameter dtype of data of ``dtype``
    (fastbn._dtypes.parameters: float32 for 16-bit data; any data dtype for
    None)."""
    if dtype is not None and _dtypes.is_half(dtype):
        whose = f"the parameter dtype of {dtype} {whose}"
    dtype_of(name, a, None if dtype is None else _dtypes.parameters(dtype), who=who,
             whose=whose)


def x(name: str, a: Any, *, who: str | None = None) -> None:
    """a must be an ndarray of a data dtype (fastbn._dtypes) and 2 to 5
    dimensions, none empty."""
    array(name, a, who=who)
    dtype_of(name, a, None, who=who)
    if not 2 <= a.ndim <= 5:
        raise _error(ValueError, who, f"{name} must have 2 to 5 dimensions (N, C, ...), got "
                                      f"shape {a.shape}", "ndim", a.ndim)
    if 0 in a.shape:
        raise _error(ValueError, who, f"{name} must not have a zero-size axis, got shape "
                                      f"{a.shape}")


def layer_input(x: Any, *, who: str, num_features: int, channel_axis: int,
                dtype: np.dtype[Any] | None, ndims: tuple[int, ...], expected: str) -> int:
    """The input of a layer (or of a synchronized pass): an ndarray with a
    number of dimensions in ``ndims`` (described by ``expected``),
    ``num_features`` channels on the channel axis, and a dtype whose
    parameters are ``dtype`` (fastbn._dtypes: a float32 layer takes
    float32, float16 and bfloat16 input; any data dtype for None). Returns
    the channel axis (>= 0)."""
    array("x", x, who=who)
    if x.ndim not in ndims:
        raise _error(ValueError, None, f"{who} expects {expected}, got {x.ndim}-D input of "
                                       f"shape {x.shape}", "ndim", x.ndim)
    axis = _channel_axis(channel_axis, x.ndim, who=who)
    if x.shape[axis] != num_features:
        raise _error(ValueError, None, f"{who} expects {num_features} channels on axis "
                                       f"{channel_axis}, got input of shape {x.shape}",
                     "channels", x.shape[axis])
    if dtype is not None and not _dtypes.is_data(x.dtype):
        dtype_of("x", x, dtype, who=who, whose="layer")  # "the layer's dtype (float32)"
    dtype_of("x", x, None, who=who)
    if dtype is not None and _dtypes.parameters(x.dtype) != dtype:
        layer = who.partition("(")[0]  # SyncBatchNorm's who is "SyncBatchNorm(C)"
        wanted = _dtypes.parameters(x.dtype)  # float32 for 16-bit input
        raise _error(TypeError, who, f"x must have the layer's dtype ({dtype}), got {x.dtype}: "
                                     f"for {x.dtype} input build the layer with "
                                     f"{layer}({num_features}, dtype=np.{wanted}), or pass "
                                     f"x.astype(np.{dtype})", "dtype", "x", _dtypes.tag(x.dtype))
    return axis


def like(name: str, a: Any, x: Any, *, who: str | None = None,
         what: str = "the last forward's input", whose: str = "x") -> None:
    """a (dy) must be an ndarray of x's dtype and shape (``whose``: what the
    message calls x)."""
    array(name, a, who=who)
    dtype_of(name, a, x.dtype, who=who, whose=whose)
    if a.shape != x.shape:
        raise _error(ValueError, who, f"{name} must have the shape of {what} {x.shape}, got "
                                      f"{a.shape}", "shape", name)


def vector(name: str, v: Any, dtype: np.dtype[Any] | None, size: int, *, writeable: bool = False,
           who: str | None = None, what: str = "a numpy.ndarray or None", per: str = "channel",
           whose: str = "x") -> NDArray[Any]:
    """A (C,) array of the parameter dtype of data of ``dtype``
    (fastbn._dtypes.parameters: float32 for 16-bit data; any data dtype for
    None); returns a C-contiguous view or copy. ``what`` is the expected
    type as the message says it, ``per`` what C counts.

    ``writeable``: it is updated in place, so it must be writeable and may
    not have a zero stride (several channels would write one value)."""
    array(name, v, who=who, what=what)
    parameter_dtype(name, v, dtype, who=who, whose=whose)
    if v.shape != (size,):
        raise _error(ValueError, who, f"{name} must have shape ({size},) (one value per "
                                      f"{per}), got shape {v.shape}")
    if writeable:
        in_place(name, v, who=who)
    return v if v.flags.c_contiguous else np.ascontiguousarray(v)


def in_place(name: str, v: NDArray[Any], *, who: str | None = None,
             what: str = "is updated in place") -> None:
    """v (an ndarray) can be written in place: writeable, and no zero stride
    (several elements would be one value). ``what`` says why it is written."""
    if not v.flags.writeable:
        raise _error(ValueError, who, f"{name} {what} and must be writeable, got a read-only "
                                      f"array")
    if v.size > 1 and 0 in v.strides:
        raise _error(ValueError, who, f"{name} {what} and needs one value per channel, got a "
                                      f"zero-stride view (every channel would write the same "
                                      f"value)")


def layer_arrays(arrays: dict[str, Any], *, who: str, what: str = "is updated in place") -> None:
    """The arrays a layer method is about to write (name -> array; None
    skipped): each an ndarray that :func:`in_place` accepts, checked all
    before the first is written, so that the method changes all or nothing."""
    for name, v in arrays.items():
        if v is None:
            continue
        array(name, v, who=who, what="a numpy.ndarray (the layer's own array)")
        in_place(name, v, who=who, what=what)
    disjoint({k: v for k, v in arrays.items() if v is not None}, {}, who=who)


def parameter(name: str, value: Any, dtype: np.dtype[Any], size: int,
              others: collections.abc.Mapping[str, NDArray[Any] | None], *, who: str | None) -> NDArray[Any]:
    """An array assigned to a layer's gamma or beta: a (size,) ndarray of the
    layer's dtype that is written in place later (by ``load_state_dict``,
    ``reset_parameters``, an optimizer), so writeable, and sharing no memory
    with the layer's other arrays (``others``: name -> array or None). A
    read-only array (``np.load(mmap_mode="r")``) is refused, not copied: a
    copy would not be the array the caller's optimizer updates."""
    array(name, value, who=who)
    dtype_of(name, value, dtype, who=who, whose="layer")
    if value.shape != (size,):
        raise _error(ValueError, who, f"{name} must have shape ({size},), got {value.shape}")
    in_place(name, value, who=who, what="is updated in place (load_state_dict, "
                                          "reset_parameters, optimizers)")
    disjoint({name: value}, {k: v for k, v in others.items() if v is not None}, who=who)
    checked: NDArray[Any] = value
    return checked


def zero_channels(gamma: NDArray[Any] | None) -> str:
    """The channels where gamma (an ndarray, or None) is 0, as a message lists
    them ("1, 4", the first ten then "..."); "" when there is none."""
    if gamma is None or np.all(gamma != 0):
        return ""
    zeros = np.flatnonzero(gamma == 0)
    return ", ".join(map(str, zeros[:10])) + (", ..." if zeros.size > 10 else "")


def saved_gamma(gamma: NDArray[Any] | None, *, who: str | None = None) -> None:
    """The gamma (a copy, or None) a memory-saving layer's output was made
    with has no 0: its backward from the output divides by it."""
    zeros = zero_channels(gamma)
    if zeros:
        raise _error(ValueError, who, f"gamma was 0 in channel(s) {zeros} at the forward: "
                                      f"the output says nothing of the input there, so "
                                      f"memory_saving=True cannot give its gradient; keep "
                                      f"gamma away from 0, or build the layer with "
                                      f"memory_saving=False")


def counter(value: Any, *, who: str | None = None, name: str = "num_batches_tracked") -> None:
    """One int64 count (PyTorch's buffer), >= 0, that can count one batch more."""
    array(name, value, who=who, what="an integer count, a numpy.ndarray of one int64 "
                                     "(updated in place)")
    if value.dtype != np.int64:
        raise _error(TypeError, who, f"{name} must be an integer count of dtype int64 "
                                     f"(PyTorch's dtype; a narrower count would wrap), got "
                                     f"dtype {dtype_name(value.dtype)}")
    if value.size != 1:
        raise _error(ValueError, who, f"{name} must hold one count, got shape {value.shape}")
    count(int(value.reshape(())), who=who, name=name)
    in_place(name, value, who=who)


def count(value: Any, *, who: str | None = None, name: str = "num_batches_tracked") -> None:
    """A batch count: an int >= 0 that can grow by one within int64."""
    if not 0 <= value < np.iinfo(np.int64).max:
        raise _error(ValueError, who, f"{name} must be an integer count >= 0 that can grow by "
                                      f"one within int64, got {_shown(value)}")


def out(value: Any, x: NDArray[Any], others: dict[str, Any], in_place: str | tuple[str, ...],
        *, who: str | None = None, whose: str = "x") -> None:
    """out must be a writeable C-contiguous array shaped and typed like x.

    It may be the array ``others[in_place]`` itself (the result then
    replaces that input; ``in_place`` is a name, or a tuple of names); it
    may overlap no other array of ``others`` (name -> array or None).
    """
    in_place = (in_place,) if isinstance(in_place, str) else in_place
    array("out", value, who=who, what="a numpy.ndarray or None")
    dtype_of("out", value, x.dtype, who=who, whose=whose)
    if value.shape != x.shape:
        raise _error(ValueError, who, f"out must have the shape of {whose} {x.shape}, got "
                                      f"{value.shape}")
    if not value.flags.c_contiguous:
        raise _error(ValueError, who, "out must be C-contiguous, got a non-contiguous array")
    if not value.flags.writeable:
        raise _error(ValueError, who, "out must be writeable, got a read-only array")
    names = list(others)
    for k in _overlap.shared_with(value, list(others.values())):
        name = names[k]
        if name in in_place and _same_memory(value, others[name]):
            continue
        raise _error(ValueError, who, f"out overlaps {name}; out may be {' or '.join(in_place)} "
                                      f"itself (in place) or memory of its own, nothing else")


def _same_memory(a: NDArray[Any], b: NDArray[Any]) -> bool:
    """True when a and b are the very same elements in the same layout."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)


def disjoint(written: dict[str, Any], others: dict[str, Any], *, who: str | None = None) -> None:
    """Arrays updated in place (``written``, name -> array) may share memory
    neither with each other nor with the call's other arrays (exactly: arrays
    that interleave without sharing an element are fine)."""
    names, arrays = list(written), list(written.values())
    for i, name in enumerate(names):
        rival_names = names[:i] + list(others)
        hits = _overlap.shared_with(arrays[i], arrays[:i] + list(others.values()))
        if hits:
            raise _error(ValueError, who, f"{name} overlaps {rival_names[hits[0]]}; it is "
                                          f"updated in place and needs memory of its own")
