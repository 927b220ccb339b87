"""A layer's state as data: PyTorch's state dict, and pickling.

:class:`LayerState` gives :class:`fastbn.layers.BatchNorm` (and so every
layer class, :class:`fastbn.SyncBatchNorm` included) ``state_dict``,
``load_state_dict``, ``reset_running_stats``, ``reset_parameters`` and the
pickle protocol. Each method that writes the state checks every array it
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
from typing import Any

from numpy.typing import NDArray

from fastbn import _checks

__all__ = ["LayerState"]

#: options added after layers were first pickled, with the value an older
#: pickle stands for
_OPTION_DEFAULTS = {"activation": None, "negative_slope": 0.01, "memory_saving": False}


class LayerState:
    """``state_dict``, ``load_state_dict``, the resets and pickling of the layers.

    It reads the layer's ``affine``, ``track_running_stats``, ``_gamma``,
    ``_beta``, ``running_mean``, ``running_var``, ``num_batches_tracked``
    and ``backend``.
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
        layer with any options, and back).

        Returns
        -------
        dict of str to ndarray
            Copies, in PyTorch's order: ``weight`` and ``bias`` (with
            ``affine``), ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` (0-d int64; with
            ``track_running_stats``).
        """
        return {key: value.copy() for key, value in self._state_arrays().items()}

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
        strict : bool, default True
            Require exactly the keys of :meth:`state_dict`.

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
        staged = _checks.state_values(self._state_arrays(), state_dict, strict,
                                      who=f"{type(self).__name__}.load_state_dict")
        for target, value in staged:
            target[...] = value

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
