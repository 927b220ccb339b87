"""A layer's state as data: PyTorch's state dict, and pickling.

:class:`LayerState` gives :class:`fastbn.layers.BatchNorm` (and so every
layer class, :class:`fastbn.SyncBatchNorm` included) ``state_dict``,
``load_state_dict`` and the pickle protocol. The state is the learnable
parameters and the running statistics under PyTorch's key names; the
layer's options (eps, momentum, activation, memory_saving, ...) are
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
    """``state_dict``, ``load_state_dict`` and pickling for the layer classes.

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
            ``num_batches_tracked`` as :meth:`state_dict` gives them.
        strict : bool, default True
            Require exactly the keys of :meth:`state_dict`.

        Raises
        ------
        KeyError
            With ``strict``, missing or unexpected keys (all of them named).
        TypeError
            A value not of a real dtype (an integer one for
            ``num_batches_tracked``).
        ValueError
            A value whose shape does not match, or a ``num_batches_tracked``
            that is not a count >= 0 able to grow within int64.

        Nothing is modified when an error is raised.
        """
        staged = _checks.state_values(self._state_arrays(), state_dict, strict,
                                      who=f"{type(self).__name__}.load_state_dict")
        for target, value in staged:
            target[...] = value

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
