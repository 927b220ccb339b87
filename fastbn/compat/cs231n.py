"""Drop-in Batch Normalization for the cs231n assignment API.

Stanford's CS231n assignment 2 defines, in ``cs231n/layers.py``::

    out, cache = batchnorm_forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = batchnorm_backward(dout, cache)
    dx, dgamma, dbeta = batchnorm_backward_alt(dout, cache)
    out, cache = spatial_batchnorm_forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = spatial_batchnorm_backward(dout, cache)

This module provides the same five functions, with the same semantics,
computed by :mod:`fastbn.functional`; :func:`patch` swaps them into an
existing ``layers`` module (and the modules that star-imported it) so that a
whole ``FullyConnectedNet`` or conv net runs on fastbn with one line::

    from cs231n import layers
    from cs231n.classifiers import fc_net
    import fastbn.compat.cs231n as fbn
    fbn.patch(layers, fc_net)

The cs231n semantics differ from PyTorch's (and from fastbn's running
update) in three ways, all kept here:

- ``bn_param['momentum']`` (default 0.9) weights the *old* value:
  ``running = momentum * running + (1 - momentum) * batch``;
- the running variance takes the *biased* batch variance;
- ``bn_param['mode']`` is required, ``'train'`` or ``'test'``; the running
  statistics are created as zeros of x's dtype when absent and written back
  into ``bn_param`` as new arrays.

The batch statistics come from :func:`fastbn.batch_norm_forward` (called
without running statistics) as the mean and ``invstd = 1 / sqrt(var +
eps)``; the adapter recovers ``var = 1 / invstd**2 - eps`` in float64 for the
running update. invstd is rounded to x's dtype, so for float32 input that
variance carries a relative error of about 2.4e-7 (float64: 4e-16), far below
the tolerances of the assignment's checks; where var is much smaller than eps
the error is about 1.2e-7 * eps in absolute terms.

Formulas: Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep
Network Training by Reducing Internal Covariate Shift", arXiv:1502.03167.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from fastbn import _checks, _dtypes
from fastbn import functional as _functional
from fastbn._typing import FloatArray

__all__ = [
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "patch",
    "Patch",
]

_NAMES = ("batchnorm_forward", "batchnorm_backward", "batchnorm_backward_alt",
          "spatial_batchnorm_forward", "spatial_batchnorm_backward")


class _Cache:
    """What the forward leaves for the backward: no copy of x, no full-size array.

    ``mean``/``invstd`` are the batch statistics in 'train' mode and the
    running ones (as mean and 1/sqrt(var + eps)) in 'test' mode.
    """

    __slots__ = ("x", "gamma", "mean", "invstd", "mode", "function")

    def __init__(self, x: FloatArray, gamma: FloatArray, mean: FloatArray, invstd: FloatArray,
                 mode: str, function: str) -> None:
        self.x, self.gamma, self.mean, self.invstd = x, gamma, mean, invstd
        self.mode, self.function = mode, function

    def __repr__(self) -> str:
        return (f"<fastbn cs231n cache of {self.function}: mode={self.mode!r}, "
                f"x {self.x.shape} {self.x.dtype}>")


def _as_float_array(name: str, a: Any) -> Any:
    """a as a float32 or float64 ndarray; other real dtypes (float16 and
    bfloat16 included) are computed in float64."""
    a = np.asarray(a)
    if a.dtype not in _dtypes.PARAMETER_DTYPES:
        if a.dtype.kind not in "biuf" and not _dtypes.is_half(a.dtype):
            raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
        a = a.astype(np.float64)
    return a


def _vector(name: str, v: Any, dtype: np.dtype[Any], size: int) -> Any:
    """gamma/beta (or a running statistic) cast to dtype, shape (size,)."""
    v = np.asarray(v)
    if v.dtype.kind not in "biuf" and not _dtypes.is_half(v.dtype):
        raise TypeError(f"{name} must hold real numbers, got dtype {v.dtype}")
    if v.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {v.shape}")
    return v.astype(dtype, copy=False)


def _mode_and_options(bn_param: Any) -> tuple[str, float, Any]:
    if not isinstance(bn_param, dict):
        raise TypeError(f"bn_param must be a dict, got {type(bn_param).__name__}")
    mode = bn_param.get("mode")
    if mode not in ("train", "test"):
        raise ValueError(f"bn_param['mode'] must be 'train' or 'test', "
                         f"got {mode!r}" + ("" if "mode" in bn_param else " (no 'mode' key)"))
    eps = _checks.eps(bn_param.get("eps", 1e-5), name="bn_param['eps']")
    momentum = _checks.momentum(bn_param.get("momentum", 0.9), name="bn_param['momentum']",
                                optional=False)
    return mode, eps, momentum


def _forward(x: Any, gamma: Any, beta: Any, bn_param: dict[str, Any], function: str,
             ndim: int) -> tuple[FloatArray, _Cache]:
    mode, eps, momentum = _mode_and_options(bn_param)
    x = _as_float_array("x", x)
    if x.ndim != ndim:
        expected = "(N, D)" if ndim == 2 else "(N, C, H, W)"
        raise ValueError(f"{function}: x must be {ndim}-D {expected}, got shape {x.shape}")
    c = x.shape[1]
    g = _vector("gamma", gamma, x.dtype, c)
    b = _vector("beta", beta, x.dtype, c)
    running = []
    for key in ("running_mean", "running_var"):
        value = bn_param.get(key)
        if value is None:
            running.append(np.zeros(c, dtype=x.dtype))
        else:
            value = _as_float_array(f"bn_param[{key!r}]", value)
            running.append(_vector(f"bn_param[{key!r}]", value, value.dtype, c))
    running_mean, running_var = running

    if mode == "train":
        out, mean, invstd = _functional.batch_norm_forward(x, g, b, eps=eps)
        mean64 = mean.astype(np.float64)
        # var from invstd = 1/sqrt(var + eps); clipped: rounding can put it a hair below 0
        var64 = np.maximum(1.0 / np.square(invstd.astype(np.float64)) - eps, 0.0)
        rm_dtype = np.result_type(running_mean.dtype, x.dtype)
        rv_dtype = np.result_type(running_var.dtype, x.dtype)
        running_mean = (momentum * running_mean + (1.0 - momentum) * mean64).astype(rm_dtype)
        running_var = (momentum * running_var + (1.0 - momentum) * var64).astype(rv_dtype)
    else:
        rm = running_mean.astype(x.dtype, copy=False)
        rv = running_var.astype(x.dtype, copy=False)
        out = _functional.batch_norm_inference(x, g, b, rm, rv, eps=eps)
        mean = rm
        invstd = (1.0 / np.sqrt(running_var.astype(np.float64) + eps)).astype(x.dtype)
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    # a copy of gamma (C values): an in-place step on it before the backward
    # does not change the gradient of the forward that ran
    return out, _Cache(x, g.copy(), mean, invstd, mode, function)


def _backward(dout: Any, cache: _Cache,
              function: str) -> tuple[FloatArray, FloatArray, FloatArray]:
    if not isinstance(cache, _Cache):
        raise TypeError(f"{function}: cache must be the cache returned by the fastbn forward, "
                        f"got {type(cache).__name__}")
    x = cache.x
    dout = _as_float_array("dout", dout)
    if dout.shape != x.shape:
        raise ValueError(f"{function}: dout must have the shape of x {x.shape}, "
                         f"got {dout.shape}")
    dout = dout.astype(x.dtype, copy=False)
    dx, dgamma, dbeta = _functional.batch_norm_backward(dout, x, cache.gamma, cache.mean,
                                                        cache.invstd)
    if cache.mode == "test":
        # The running statistics are constants: y is affine in x.
        scale = cache.gamma.astype(np.float64) * cache.invstd.astype(np.float64)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        np.multiply(dout, scale.astype(x.dtype).reshape(shape), out=dx)
    assert dgamma is not None and dbeta is not None  # param_grads=True: computed
    return dx, dgamma, dbeta


def batchnorm_forward(x: FloatArray, gamma: FloatArray, beta: FloatArray,
                      bn_param: dict[str, Any]) -> tuple[FloatArray, _Cache]:
    """Forward pass for batch normalization, cs231n API.

    In 'train' mode the batch mean and biased variance normalize x and
    update the running statistics as
    ``running = momentum * running + (1 - momentum) * batch`` (biased
    variance); in 'test' mode the running statistics normalize x::

        out = (x - mean) / sqrt(var + eps) * gamma + beta

    (Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithms 1 and 2.)

    Parameters
    ----------
    x : array_like, shape (N, D)
        float32 or float64 (computed in that dtype); other real dtypes are
        computed in float64.
    gamma, beta : array_like, shape (D,)
        Scale and shift, cast to x's dtype.
    bn_param : dict
        ``'mode'``: 'train' or 'test' (required); ``'eps'`` (default 1e-5);
        ``'momentum'`` (default 0.9, the weight of the old value);
        ``'running_mean'``, ``'running_var'``: shape (D,), created as zeros
        of x's dtype when absent. The updated running statistics are stored
        back into ``bn_param`` as new arrays.

    Returns
    -------
    out : ndarray, shape (N, D), dtype of x
    cache : object
        For :func:`batchnorm_backward`; holds a reference to x (no copy).

    Raises
    ------
    TypeError
        bn_param not a dict; non-numeric arrays.
    ValueError
        A mode other than 'train' or 'test'; x not 2-D; gamma, beta or the
        running statistics not of shape (D,); one value per feature (N = 1)
        in 'train' mode; momentum outside [0, 1]; eps <= 0.
    """
    return _forward(x, gamma, beta, bn_param, "batchnorm_forward", 2)


def batchnorm_backward(dout: FloatArray,
                       cache: _Cache) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Backward pass for batch normalization, cs231n API.

    After a 'train' forward, with m = N and ``xhat = (x - mean) / sqrt(var +
    eps)`` (the fused form of Ioffe & Szegedy 2015, Section 3)::

        dbeta  = sum(dout, axis=0)
        dgamma = sum(dout * xhat, axis=0)
        dx     = gamma / sqrt(var + eps) / N * (N * dout - dbeta - xhat * dgamma)

    After a 'test' forward the running statistics are constants and
    ``dx = dout * gamma / sqrt(running_var + eps)``.

    Parameters
    ----------
    dout : array_like, shape of x
        Upstream gradient; cast to x's dtype.
    cache : object
        From :func:`batchnorm_forward`.

    Returns
    -------
    dx : ndarray, shape and dtype of x
    dgamma, dbeta : ndarray, shape (D,), dtype of x

    Raises
    ------
    TypeError
        A cache that does not come from this module's forward.
    ValueError
        dout not shaped like x.
    """
    return _backward(dout, cache, "batchnorm_backward")


def batchnorm_backward_alt(dout: FloatArray,
                           cache: _Cache) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Backward pass for batch normalization, simplified form; cs231n API.

    The same gradients as :func:`batchnorm_backward`, which already computes
    the simplified closed form in one fused pass.
    """
    return _backward(dout, cache, "batchnorm_backward_alt")


def spatial_batchnorm_forward(x: FloatArray, gamma: FloatArray, beta: FloatArray,
                              bn_param: dict[str, Any]) -> tuple[FloatArray, _Cache]:
    """Forward pass for spatial batch normalization, cs231n API.

    Normalizes each channel over N, H and W: the same as
    :func:`batchnorm_forward` applied to x transposed to (N*H*W, C), computed
    in place on the NCHW layout without the transpose.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
    gamma, beta : array_like, shape (C,)
    bn_param : dict
        As in :func:`batchnorm_forward`.

    Returns
    -------
    out : ndarray, shape (N, C, H, W), dtype of x
    cache : object
        For :func:`spatial_batchnorm_backward`.

    Raises
    ------
    TypeError, ValueError
        As :func:`batchnorm_forward`; x must be 4-D.
    """
    return _forward(x, gamma, beta, bn_param, "spatial_batchnorm_forward", 4)


def spatial_batchnorm_backward(dout: FloatArray,
                               cache: _Cache) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Backward pass for spatial batch normalization, cs231n API.

    Parameters
    ----------
    dout : array_like, shape (N, C, H, W)
    cache : object
        From :func:`spatial_batchnorm_forward`.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    dgamma, dbeta : ndarray, shape (C,)
    """
    return _backward(dout, cache, "spatial_batchnorm_backward")


class Patch:
    """The record of a :func:`patch`: what was replaced where, and the way back.

    Attributes
    ----------
    originals : list of (module, dict)
        For every patched module, the functions that were replaced, by name.

    A context manager: ``with patch(layers): ...`` undoes the patch on exit.
    """

    def __init__(self, originals: list[tuple[ModuleType, dict[str, Any]]]) -> None:
        self.originals = originals

    def undo(self) -> None:
        """Put the original functions back (once; later calls do nothing)."""
        for module, functions in reversed(self.originals):  # a module patched twice
            for name, function in functions.items():
                setattr(module, name, function)
        self.originals = []

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        where = ", ".join(f"{getattr(m, '__name__', m)}: {len(f)}" for m, f in self.originals)
        return f"<fastbn.compat.cs231n.Patch {where or 'undone'}>"


def patch(*modules: ModuleType) -> Patch:
    """Replace the cs231n batchnorm functions of existing modules by fastbn's.

    Every one of the five names (``batchnorm_forward``,
    ``batchnorm_backward``, ``batchnorm_backward_alt``,
    ``spatial_batchnorm_forward``, ``spatial_batchnorm_backward``) that a
    module defines is rebound to this module's function. Code that looks the
    names up at call time (``layers.batchnorm_forward(...)``, or a plain
    ``batchnorm_forward(...)`` inside the patched module) then runs on
    fastbn. A module that did ``from .layers import *`` holds its own
    bindings: pass it too (in cs231n: ``layers``, ``layer_utils`` and
    ``classifiers.fc_net`` or ``classifiers.cnn``).

    Parameters
    ----------
    *modules : module or object
        The modules (any objects with attributes) to patch.

    Returns
    -------
    Patch
        Holds the replaced functions; ``.undo()`` restores them, and it works
        as a context manager.

    Raises
    ------
    ValueError
        No module given, or a module that defines none of the five names
        (nothing is patched then).
    """
    if not modules:
        raise ValueError("patch needs at least one module (e.g. cs231n.layers), got none")
    found = []
    for module in modules:
        names = [name for name in _NAMES if hasattr(module, name)]
        if not names:
            raise ValueError(f"module {getattr(module, '__name__', module)!r} defines none of "
                             f"{', '.join(_NAMES)}; is it cs231n's layers module?")
        found.append((module, names))
    ours = globals()
    originals = []
    for module, names in found:
        originals.append((module, {name: getattr(module, name) for name in names}))
        for name in names:
            setattr(module, name, ours[name])
    return Patch(originals)
