"""The layers' BatchNorm variants, Keras' options of one layer.

``renorm`` and ``renorm_clipping`` (Batch Renormalization, Ioffe 2017,
arXiv:1702.03275) and ``virtual_batch_size`` (Ghost Batch Normalization,
Hoffer et al. 2017, arXiv:1705.08741) of :class:`fastbn.layers.BatchNorm`:
their checks at construction, the training forward that runs them
(:mod:`fastbn.variants`, or the backend's functions of those names), and
their entries in the layer's state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fastbn import _checks, _variant_args
from fastbn._saved import for_batch

__all__ = ["OPTION_KEYS", "backend_functions", "check_options", "forward", "load_options",
           "state_entries"]

#: the state-dict keys of the options, after PyTorch's
OPTION_KEYS = ("renorm_clipping", "virtual_batch_size")


def check_options(renorm: Any, renorm_clipping: Any, virtual_batch_size: Any, *,
                  track_running_stats: bool, memory_saving: bool,
                  who: str) -> tuple[bool, dict[str, float] | None, int | None]:
    """(renorm, the full clipping dict or None, virtual_batch_size) of a
    layer, checked: ``renorm_clipping`` only with ``renorm``, which needs the
    running statistics; a ``virtual_batch_size`` an int > 0 or None; neither
    with ``memory_saving`` (its backward from the output is the plain
    layer's)."""
    renorm = _checks.flag(renorm, "renorm", who=who)
    if renorm_clipping is not None and not renorm:
        raise ValueError(f"{who}: renorm_clipping needs renorm=True, got renorm=False")
    clipping = _variant_args.renorm_clipping(renorm_clipping, who=who) if renorm else None
    if renorm and not track_running_stats:
        raise ValueError(f"{who}: renorm=True needs track_running_stats=True (r and d compare "
                         f"the batch with the running statistics)")
    if virtual_batch_size is not None:
        if not _checks.is_int(virtual_batch_size):
            raise TypeError(f"{who}: virtual_batch_size must be an int or None, got "
                            f"{type(virtual_batch_size).__name__}")
        virtual_batch_size = int(virtual_batch_size)
        if virtual_batch_size <= 0:
            raise ValueError(f"{who}: virtual_batch_size must be > 0 or None, got "
                             f"{virtual_batch_size}")
    if memory_saving and (renorm or virtual_batch_size is not None):
        raise ValueError(f"{who}: memory_saving=True is not available with renorm or "
                         f"virtual_batch_size (their backward reads x)")
    return renorm, clipping, virtual_batch_size


def backend_functions(renorm: bool, virtual_batch_size: int | None) -> tuple[str, ...]:
    """The functions a layer's backend needs for these options."""
    if renorm:
        return ("batch_renorm_forward", "batch_renorm_backward")
    if virtual_batch_size is not None:
        return ("ghost_batch_norm_forward", "ghost_batch_norm_backward")
    return ()


def forward(layer: Any, x: NDArray[Any], tracking: bool) -> Any:
    """A training forward of ``layer`` with its variant: the backend's
    ``batch_renorm_forward`` or ``ghost_batch_norm_forward``; records what
    the backward needs (r and d, the groups' statistics) and returns y."""
    layer._check_input(x)
    common: dict[str, Any] = dict(
        eps=layer.eps, momentum=layer.momentum, unbiased=layer.unbiased,
        num_batches_tracked=layer.num_batches_tracked if tracking else None,
        channel_axis=layer.channel_axis, num_threads=layer.num_threads)
    if layer.activation is not None:
        common.update(activation=layer.activation, negative_slope=layer.negative_slope)
    vbs = layer.virtual_batch_size
    r = d = None
    if layer.renorm:
        y, mean, invstd, r, d = layer.backend.batch_renorm_forward(
            x, layer.gamma, layer.beta, layer.running_mean, layer.running_var,
            **layer.renorm_clipping, virtual_batch_size=vbs, **common)
    else:
        y, mean, invstd = layer.backend.ghost_batch_norm_forward(
            x, layer.gamma, layer.beta, vbs,
            running_mean=layer.running_mean if tracking else None,
            running_var=layer.running_var if tracking else None, **common)
    layer._saved = for_batch(layer, x, y, mean, invstd)._replace(r=r, d=d,
                                                                 grouped=vbs is not None)
    return y


def state_entries(layer: Any) -> dict[str, NDArray[Any]]:
    """The options' state-dict entries: ``renorm_clipping`` (float64 (3,):
    rmax, rmin, dmax) with renorm, ``virtual_batch_size`` (0-d int64) when
    set."""
    entries = {}
    if layer.renorm:
        clip = layer.renorm_clipping
        entries["renorm_clipping"] = np.array([clip["rmax"], clip["rmin"], clip["dmax"]])
    if layer.virtual_batch_size is not None:
        entries["virtual_batch_size"] = np.array(layer.virtual_batch_size, dtype=np.int64)
    return entries


def load_options(layer: Any, state_dict: Any, *, who: str) -> tuple[Any, dict[str, Any]]:
    """(the state dict without the options' keys, the attributes of
    ``layer`` those keys set, checked with the layer's other options):
    ``renorm_clipping`` turns renorm on with that clipping,
    ``virtual_batch_size`` sets it. A state without them (a PyTorch
    layer's) leaves the layer's options as they are."""
    if not isinstance(state_dict, Mapping) or not any(k in state_dict for k in OPTION_KEYS):
        return state_dict, {}
    options: dict[str, Any] = {}
    if "renorm_clipping" in state_dict:
        clip = np.asarray(state_dict["renorm_clipping"])
        if clip.shape != (3,) or clip.dtype.kind not in "fi":
            raise TypeError(f"{who}: renorm_clipping must be 3 real numbers (rmax, rmin, "
                            f"dmax), got {clip.dtype} of shape {clip.shape}")
        rmax, rmin, dmax = (float(v) for v in clip)
        options.update(renorm=True, renorm_clipping=_variant_args.renorm_clipping(
            dict(rmax=rmax, rmin=rmin, dmax=dmax), who=who))
    if "virtual_batch_size" in state_dict:
        vbs = np.asarray(state_dict["virtual_batch_size"])
        if vbs.shape != () or vbs.dtype.kind not in "iu" or int(vbs) <= 0:
            raise ValueError(f"{who}: virtual_batch_size must be an integer > 0, got {vbs!r}")
        options["virtual_batch_size"] = int(vbs)
    check_options(options.get("renorm", layer.renorm), options.get("renorm_clipping"),
                  options.get("virtual_batch_size", layer.virtual_batch_size),
                  track_running_stats=layer.track_running_stats,
                  memory_saving=layer.memory_saving, who=who)
    rest = {k: v for k, v in state_dict.items() if k not in OPTION_KEYS}
    return rest, options
