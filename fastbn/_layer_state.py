"""A layer's state: its parameters, its mode, PyTorch's state dict, pickling.

:class:`LayerState` gives :class:`fastbn.layers.BatchNorm` (and so every
layer class, :class:`fastbn.SyncBatchNorm` included) the checked parameter
properties (``gamma``, ``beta``, ``weight``, ``bias``, ``params``,
``grads``), ``train`` and ``eval``, ``state_dict``, ``load_state_dict``,
``reset_running_stats``, ``reset_parameters`` and the pickle protocol. Each method that writes the state checks every array it
would write (and every value) before writing the first. The state is the
learnable parameters and the running statistics under PyTorch's key names;
the layer's options (eps, momentum, activation, memory_saving, ...) are
configuration, pickled with the layer but never in a state dict, and the
record a forward keeps for its backward (:mod:`fastbn._saved`) is neither.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from fastbn import _checks, _dtypes
from fastbn import functional as _functional
from fastbn._layer_variants import backend_functions, load_options, state_entries
from fastbn._typing import Activation
from fastbn._checks import _error, count, dtype_name, flag, is_int, layer_arrays

__all__ = ["LayerState"]

_Layer = TypeVar("_Layer", bound="LayerState")

#: options added after layers were first pickled, with the value an older
#: pickle stands for
_OPTION_DEFAULTS = {"activation": None, "negative_slope": 0.01, "memory_saving": False,
                    "renorm": False, "renorm_clipping": None, "virtual_batch_size": None}


_BACKEND_FUNCTIONS = ("batch_norm_forward", "batch_norm_inference", "batch_norm_backward")
_FROM_OUTPUT = "batch_norm_backward_from_output"


def check_backend(backend: types.ModuleType | None, memory_saving: bool = False,
                  variants: tuple[str, ...] = ()) -> types.ModuleType:
    """The backend module: fastbn.functional for None, else anything with its
    three functions (four with ``memory_saving``), and the ``variants``'
    functions (fastbn.variants) a layer's options need."""
    if backend is None:
        return _functional
    needed = _BACKEND_FUNCTIONS + ((_FROM_OUTPUT,) if memory_saving else ()) + variants
    missing = [name for name in needed if not callable(getattr(backend, name, None))]
    if missing:
        raise TypeError(f"backend must provide {', '.join(needed)} with the "
                        f"signatures of fastbn.functional and fastbn.variants (e.g. "
                        f"fastbn.functional or fastbn.reference), got {backend!r} without {', '.join(missing)}")
    return backend


def _parameter(attr: str, name: str, doc: str) -> property:
    """A property over ``attr`` whose setter checks the array (named ``name`` in errors)."""
    def get(self: LayerState) -> Any:
        return getattr(self, attr)

    def set(self: LayerState, value: Any) -> None:
        setattr(self, attr, self._set_param(name, value))

    return property(get, set, doc=doc)


class LayerState:
    """The parameters, the mode, ``state_dict``, ``load_state_dict``, the
    resets and pickling of the layers.

    It reads the layer's ``affine``, ``track_running_stats``, ``dtype``,
    ``num_features``, ``_gamma``, ``_beta``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``, ``dgamma``, ``dbeta``, the
    accepted input (``_ndims``, ``_expected``) and ``backend``.
    """

    # set by the layer classes; the arrays are None without affine or
    # track_running_stats
    affine: bool
    track_running_stats: bool
    _gamma: Any
    _beta: Any
    running_mean: Any
    running_var: Any
    num_batches_tracked: Any
    backend: Any
    dtype: Any
    num_features: int
    dgamma: NDArray[Any] | None
    dbeta: NDArray[Any] | None
    training: bool
    _ndims: tuple[int, ...]
    _expected: str
    # configuration, shown by __repr__
    eps: float
    momentum: float | None
    channel_axis: int
    unbiased: bool
    activation: Activation
    negative_slope: float
    memory_saving: bool
    renorm: bool
    renorm_clipping: dict[str, float] | None
    virtual_batch_size: int | None

    def _new_state(self) -> None:
        """The initial parameters (gamma 1, beta 0) and running statistics (mean
        0, variance 1, no batch tracked), new arrays of the layer's dtype; no
        gradients yet."""
        c, dtype = self.num_features, self.dtype
        self._gamma = np.ones(c, dtype=dtype) if self.affine else None
        self._beta = np.zeros(c, dtype=dtype) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, dtype=dtype)
            self.running_var = np.ones(c, dtype=dtype)
            self.num_batches_tracked = np.zeros((), dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.dgamma = None
        self.dbeta = None

    def _check_input(self, x: Any) -> None:
        _checks.layer_input(x, who=type(self).__name__, num_features=self.num_features,
                            channel_axis=self.channel_axis, dtype=self.dtype,
                            ndims=self._ndims, expected=self._expected)

    # ---------------------------------------------------------- parameters

    def _set_param(self, name: str, value: Any) -> Any:
        if not self.affine:
            if value is not None:
                raise ValueError(f"{type(self).__name__}(affine=False) has no {name}; "
                                 f"got an array to assign")
            return None
        who = type(self).__name__
        own = "_gamma" if name in ("gamma", "weight") else "_beta"
        others = {key: array for key, array in self._state_arrays().items()
                  if array is not getattr(self, own)}
        return _checks.parameter(f"{who}.{name}", value, self.dtype, self.num_features,
                                 others, who=None)

    gamma = _parameter("_gamma", "gamma", "Scale, shape (C,), the layer's dtype; None without "
                       "``affine``.")
    beta = _parameter("_beta", "beta", "Shift, shape (C,), the layer's dtype; None without "
                      "``affine``.")
    weight = _parameter("_gamma", "weight", "PyTorch's name for :attr:`gamma`.")
    bias = _parameter("_beta", "bias", "PyTorch's name for :attr:`beta`.")

    @property
    def params(self) -> list[NDArray[Any]]:
        """``[gamma, beta]`` (the arrays themselves), or ``[]`` without ``affine``."""
        return [self._gamma, self._beta] if self.affine else []

    @property
    def grads(self) -> list[NDArray[Any] | None]:
        """``[dgamma, dbeta]`` in the order of :attr:`params` (None before a backward)."""
        return [self.dgamma, self.dbeta] if self.affine else []

    def _share_arrays(self, layer: LayerState) -> None:
        """Take ``layer``'s accepted input, parameter and running-statistics
        arrays (the arrays themselves) and its mode: a layer of another class
        standing in for it (:meth:`fastbn.SyncBatchNorm.from_batch_norm`)."""
        self._ndims, self._expected = layer._ndims, layer._expected
        self._gamma, self._beta = layer._gamma, layer._beta
        self.running_mean, self.running_var = layer.running_mean, layer.running_var
        self.num_batches_tracked = layer.num_batches_tracked
        self.training = layer.training

    # ---------------------------------------------------------------- mode

    def train(self: _Layer, mode: bool = True) -> _Layer:
        """Set training mode (``mode=True``) or eval mode; returns the layer.

        Raises
        ------
        TypeError
            ``mode`` is not a bool (``numpy.bool_`` is one); the exception
            is a ValueError too, as PyTorch's. The mode is not changed.
        """
        self.training = _checks.flag(mode, "mode", who=f"{type(self).__name__}.train")
        return self

    def eval(self: _Layer) -> _Layer:
        """Set eval mode (the same as ``train(False)``); returns the layer."""
        return self.train(False)

    # --------------------------------------------------------------- state

    def _state_arrays(self) -> dict[str, NDArray[Any]]:
        """The layer's own arrays under PyTorch's keys, in PyTorch's order."""
        own = {}
        if self.affine:
            own["weight"] = self._gamma
            own["bias"] = self._beta
        if self.track_running_stats:
            own["running_mean"] = self.running_mean
            own["running_var"] = self.running_var
            own["num_batches_tracked"] = self.num_batches_tracked
        return own

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """The learnable parameters and running statistics under PyTorch's key names.

        Options such as ``activation`` or ``memory_saving`` are not state:
        they are not in it (a PyTorch layer's state loads into a fastbn
        layer with any options, and back). The variants' options are, as
        they change what training computes: ``renorm_clipping`` with
        ``renorm`` and ``virtual_batch_size`` when set (PyTorch, which has
        neither, loads such a state with ``strict=False``).

        Returns
        -------
        dict of str to ndarray
            Copies, in PyTorch's order: ``weight`` and ``bias`` (with
            ``affine``), ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` (0-d int64; with
            ``track_running_stats``); then ``renorm_clipping`` (float64
            (3,): rmax, rmin, dmax; with ``renorm``) and
            ``virtual_batch_size`` (0-d int64; when set).
        """
        return {**{key: value.copy() for key, value in self._state_arrays().items()},
                **state_entries(self)}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Copy parameters and running statistics in place from a state dict.

        The layer's arrays keep their identity (an optimizer holding them
        sees the new values); values are cast to the layer's dtype. A state
        from ``torch.nn.BatchNorm*d`` loads as is, its tensors converted by
        ``numpy.asarray`` (tensors that require grad are detached first). As
        in PyTorch, a missing ``num_batches_tracked`` keeps the current
        count.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            Keys ``weight``, ``bias``, ``running_mean``, ``running_var``,
            ``num_batches_tracked`` as :meth:`state_dict` gives them: float32
            or float64 values (ndarrays, torch tensors, lists of floats) for
            the first four, an integer count for ``num_batches_tracked``.
            ``renorm_clipping`` and ``virtual_batch_size``, when present,
            set the layer's options (renorm on with that clipping; the
            virtual batch size); when absent the options stay.
        strict : bool, default True
            Require exactly the keys of :meth:`state_dict` (the options'
            keys may be absent or present).

        Raises
        ------
        KeyError
            With ``strict``, missing or unexpected keys (all of them named).
        TypeError
            ``state_dict`` not a mapping; ``strict`` not a bool; a value
            that is None, a string, or of a dtype fastbn does not take
            (anything but float32 and float64 for the parameters and
            running statistics, such as an integer, complex or
            ``torch.bfloat16`` tensor; anything but an integer for
            ``num_batches_tracked``, a float included), the message naming
            the key and what was expected.
        ValueError
            A value whose shape does not match; a ``num_batches_tracked``
            that is not an integer count >= 0 able to grow within int64; one
            of the layer's arrays to be loaded read-only, or sharing memory
            with another (the message names it).

        Nothing is modified when an error is raised: every value and every
        array to be written is checked before the first is written.
        """
        who = f"{type(self).__name__}.load_state_dict"
        state_dict, options = load_options(self, state_dict, who=who)
        staged = state_values(self._state_arrays(), state_dict, strict, who=who)
        if options:
            check_backend(self.backend if self.backend is not _functional else None,
                          self.memory_saving,
                          backend_functions(options.get("renorm", self.renorm),
                                            options.get("virtual_batch_size",
                                                        self.virtual_batch_size)))
        for target, value in staged:
            target[...] = value
        self.__dict__.update(options)

    def reset_running_stats(self) -> None:
        """Running mean to 0, running variance to 1, ``num_batches_tracked`` to 0, in place.

        Raises
        ------
        TypeError, ValueError
            One of the arrays is not an ndarray or is read-only (the message
            names it); nothing is written then.
        """
        self._reset("reset_running_stats", parameters=False)

    def reset_parameters(self) -> None:
        """Reset the running statistics and set ``gamma`` to 1 and ``beta`` to 0, in place.

        Raises
        ------
        TypeError, ValueError
            As :meth:`reset_running_stats`, for these arrays too.
        """
        self._reset("reset_parameters", parameters=True)

    def _reset(self, method: str, *, parameters: bool) -> None:
        """Write the initial values into the state arrays (with ``parameters``:
        gamma and beta too), every array checked before the first is written."""
        values = {"running_mean": 0, "running_var": 1, "num_batches_tracked": 0,
                  "weight": 1, "bias": 0}
        targets = {key: array for key, array in self._state_arrays().items()
                   if parameters or key not in ("weight", "bias")}
        _checks.layer_arrays(targets, who=f"{type(self).__name__}.{method}",
                             what="is reset in place")
        for key, array in targets.items():
            array[...] = values[key]

    def __getstate__(self) -> dict[str, Any]:
        # Modules do not pickle: keep a backend module by name. What the last
        # forward kept for its backward is not part of the layer's state.
        state = self.__dict__.copy()
        state["_saved"] = None
        if isinstance(self.backend, types.ModuleType):
            state["backend"] = self.backend.__name__
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("backend"), str):
            state["backend"] = importlib.import_module(state["backend"])
        self.__dict__.update({**_OPTION_DEFAULTS, **state})

    def __repr__(self) -> str:
        momentum = "None" if self.momentum is None else f"{self.momentum:g}"
        extra = ""
        if self.dtype != np.float32:
            extra += f", dtype={self.dtype.name}"
        if self.channel_axis != 1:
            extra += f", channel_axis={self.channel_axis}"
        if not self.unbiased:
            extra += ", unbiased=False"
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
        if self.negative_slope != 0.01:
            extra += f", negative_slope={self.negative_slope:g}"
        if self.memory_saving:
            extra += ", memory_saving=True"
        if self.renorm:
            extra += f", renorm=True, renorm_clipping={self.renorm_clipping}"
        if self.virtual_batch_size is not None:
            extra += f", virtual_batch_size={self.virtual_batch_size}"
        if self.backend is not _functional:
            extra += f", backend={getattr(self.backend, '__name__', self.backend)!s}"
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps:g}, "
                f"momentum={momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}{extra})")


# ------------------------------------------------------- state dict values

def _to_numpy(value: Any) -> Any:
    """A state-dict value as an ndarray; torch tensors are detached first,
    and a bfloat16 one (a dtype NumPy has only through ml_dtypes) widened
    to float32, exactly."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, no torch import
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _state_value(key: str, value: Any, target: NDArray[Any], *, who: str) -> NDArray[Any]:
    """One value of a state dict, checked, as an ndarray of ``target``'s shape
    and dtype: float values for the parameters and running statistics (of
    any dtype fastbn takes: a half-precision model's load), an integer count for
    ``num_batches_tracked``."""
    counts = key == "num_batches_tracked"
    expected = ("an integer count (an int, or an integer array or tensor holding one)"
                if counts else f"{_dtypes.DATA_NAMES} values (a numpy.ndarray, a "
                               f"torch.Tensor or a list of floats)")
    if value is None or isinstance(value, (str, bytes)):
        raise _error(TypeError, who, f"{key} must be {expected}, got {type(value).__name__}")
    if counts and is_int(value):  # however large: the range check says it
        count(value, who=who, name=key)
    try:
        array_ = _to_numpy(value)
    except (TypeError, RuntimeError) as exc:  # a torch dtype without a NumPy one (float8)
        raise _error(TypeError, who, f"{key} must be {expected}, got {type(value).__name__} "
                                     f"({exc})") from None
    except ValueError as exc:  # a ragged list
        raise _error(ValueError, who, f"{key} must be {expected} of shape {target.shape}, got "
                                      f"{type(value).__name__} ({exc})") from None
    kind = array_.dtype.kind
    if counts and kind == "O" and array_.size == 1 and is_int(array_.reshape(-1)[0]):
        count(array_.reshape(-1)[0], who=who, name=key)  # an int beyond int64: out of range
    if (kind not in "iu") if counts else not _dtypes.is_data(array_.dtype):
        held = " of dtype" if hasattr(value, "dtype") else " holding values of dtype"
        raise _error(TypeError, who, f"{key} must be {expected}, got "
                                     f"{type(value).__name__}{held} "
                                     f"{dtype_name(array_.dtype)}")
    if array_.shape != target.shape and not (counts and array_.size == 1):
        raise _error(ValueError, who, f"{key} must have shape {target.shape}, got "
                                      f"{array_.shape}")
    if counts:
        count(int(array_.reshape(())), who=who, name=key)
    with np.errstate(over="ignore"):
        cast = array_.reshape(target.shape).astype(target.dtype)
    if not counts and cast.dtype.itemsize < array_.dtype.itemsize and (
            np.isfinite(array_).sum() != np.isfinite(cast).sum()):
        raise _error(ValueError, who, f"{key} holds finite values too large for the layer's "
                                      f"dtype {target.dtype} (largest "
                                      f"{np.finfo(target.dtype).max:.4g}), got "
                                      f"{np.abs(array_[np.isfinite(array_)]).max():.4g}")
    result: NDArray[Any] = cast
    return result


def state_values(own: dict[str, Any], state_dict: Any, strict: bool, *,
                 who: str) -> list[tuple[NDArray[Any], NDArray[Any]]]:
    """The values of ``state_dict`` for a layer's arrays ``own`` (key ->
    array), checked and cast: a list of (array, value) to copy in place.
    ``strict``: exactly the keys of ``own`` (num_batches_tracked may be
    missing, as in PyTorch). Every check (the layer's arrays writeable
    included) runs before the caller writes anything."""
    strict = flag(strict, "strict", who=who)
    if not isinstance(state_dict, Mapping):
        raise _error(TypeError, who, f"state_dict must be a mapping of str to arrays (as "
                                     f"state_dict() returns), got {type(state_dict).__name__}")
    if strict:
        missing = [k for k in own if k not in state_dict and k != "num_batches_tracked"]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise _error(KeyError, who, f"missing keys {missing}, unexpected keys {unexpected}")
    written = {key: target for key, target in own.items() if key in state_dict}
    staged = [(target, _state_value(key, state_dict[key], target, who=who))
              for key, target in written.items()]
    layer_arrays(written, who=who, what="is loaded in place")
    return staged
