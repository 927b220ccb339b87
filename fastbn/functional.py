"""The public Batch Normalization functions.

Each function checks its arguments, views the input as one of the two kernel
layouts, allocates or checks the output, and calls the compiled kernel:

- planar ``(N, C, S)``: channel axis 1 with spatial size S > 1 (NCHW and its
  1-D and 3-D relatives), in :mod:`fastbn._planar`;
- columnar ``(M, C)``: 2-D input, channels-last input, and channel axis 1
  with S == 1, in :mod:`fastbn._columnar`.

The formulas are those of Ioffe & Szegedy (2015), "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift",
arXiv:1502.03167; the running statistics follow PyTorch's ``BatchNorm``.
Every check runs before anything is written, so a call that raises leaves
every array the caller passed as it was.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fastbn import _openmp, _overlap
from fastbn._dispatch import columnar as _columnar
from fastbn._dispatch import planar as _planar

__all__ = ["batch_norm_forward", "batch_norm_inference", "batch_norm_backward"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ------------------------------------------------------------- checking ----

def _check_array_type(name, a, what="a numpy.ndarray"):
    """a must be an ndarray, and not a masked array: its mask would be
    ignored and the masked values normalized like the others."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be {what}, got {type(a).__name__}")
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} must be {what}, got a numpy.ma.MaskedArray (its mask would "
                        f"be ignored); pass {name}.filled(value) or {name}.data")


def _check_x(name, x):
    """x must be a float32/float64 ndarray of 2 to 5 dimensions, none empty."""
    _check_array_type(name, x)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if not 2 <= x.ndim <= 5:
        raise ValueError(f"{name} must have 2 to 5 dimensions (N, C, ...), got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{name} must not have a zero-size axis, got shape {x.shape}")


def _is_int(v):
    """An integer that is not a bool (fast path for the built-in int)."""
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def _is_real(v):
    """A real number that is not a bool (fast path for built-in float and int)."""
    return type(v) is float or _is_int(v) or (isinstance(v, numbers.Real)
                                               and not isinstance(v, bool))


def _check_channel_axis(channel_axis, ndim):
    """The channel axis as 1 or ndim - 1; accepts 1, -1 and their equivalents."""
    if not _is_int(channel_axis):
        raise TypeError(f"channel_axis must be an int, got {type(channel_axis).__name__}")
    if channel_axis not in (1, -1, ndim - 1, 1 - ndim):
        raise ValueError(f"channel_axis must be 1 (channels first) or -1 (channels last), "
                         f"got {channel_axis} for an input of {ndim} dimensions")
    return int(channel_axis) % ndim


def _check_vector(name, v, dtype, num_features, *, writeable=False):
    """A (C,) array of the call's dtype; returns a C-contiguous view or copy."""
    _check_array_type(name, v, "a numpy.ndarray or None")
    if v.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of x ({dtype}), got {v.dtype}")
    if v.shape != (num_features,):
        raise ValueError(f"{name} must have shape ({num_features},) (one value per channel), "
                         f"got shape {v.shape}")
    if writeable and not v.flags.writeable:
        raise ValueError(f"{name} is updated in place and must be writeable, "
                         f"got a read-only array")
    return v if v.flags.c_contiguous else np.ascontiguousarray(v)


def _check_eps(eps):
    """eps as a float, finite and > 0 (an int too large for a float is refused
    like an infinite one)."""
    if not _is_real(eps):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    try:
        value = float(eps)
    except OverflowError:
        value = math.inf
    if not (math.isfinite(value) and value > 0):
        shown = str(eps) if len(str(eps)) <= 20 else str(eps)[:17] + "..."
        raise ValueError(f"eps must be finite and > 0, got {shown}")
    return value


def _check_momentum(momentum):
    if momentum is None:
        return None
    if not _is_real(momentum):
        raise TypeError(f"momentum must be a real number or None, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    return float(momentum)


def _check_num_threads(num_threads):
    if num_threads is None:
        return _openmp.effective_num_threads(None)
    if not _is_int(num_threads):
        raise TypeError(f"num_threads must be a positive int or None, "
                        f"got {type(num_threads).__name__}")
    if num_threads <= 0:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads}")
    return _openmp.effective_num_threads(min(int(num_threads), 2**31 - 1))


def _check_counter(num_batches_tracked):
    """One int64 count (PyTorch's buffer), >= 0, that can count one batch more."""
    _check_array_type("num_batches_tracked", num_batches_tracked,
                      "a numpy.ndarray of one int64 (updated in place)")
    if num_batches_tracked.dtype.kind not in "iu" or num_batches_tracked.size != 1:
        raise ValueError(f"num_batches_tracked must hold one integer, got dtype "
                         f"{num_batches_tracked.dtype} and shape {num_batches_tracked.shape}")
    if num_batches_tracked.dtype != np.int64:
        raise ValueError(f"num_batches_tracked must be int64 (PyTorch's dtype; a narrower "
                         f"count would wrap), got dtype {num_batches_tracked.dtype}")
    count = int(num_batches_tracked.reshape(()))
    if not 0 <= count < np.iinfo(np.int64).max:
        raise ValueError(f"num_batches_tracked must be a count >= 0 that can grow by one, "
                         f"got {count}")
    if not num_batches_tracked.flags.writeable:
        raise ValueError("num_batches_tracked is updated in place and must be writeable, "
                         "got a read-only array")


def _check_disjoint(written, others):
    """Arrays updated in place (``written``, name -> array) may share memory
    neither with each other nor with the call's other arrays (exactly: arrays
    that interleave without sharing an element are fine)."""
    names, arrays = list(written), list(written.values())
    for i, name in enumerate(names):
        rival_names = names[:i] + list(others)
        hits = _overlap.shared_with(arrays[i], arrays[:i] + list(others.values()))
        if hits:
            raise ValueError(f"{name} overlaps {rival_names[hits[0]]}; it is updated in "
                             f"place and needs memory of its own")


def _check_training_state(x, gamma, beta, running_mean, running_var, momentum,
                          num_batches_tracked, out, num_features):
    """The checks of a training forward's state, after x, gamma and beta:
    the running statistics (both or neither), ``num_batches_tracked``, and
    that nothing written in place (they and ``out``) shares memory with
    another argument. Returns the checked running statistics (C-contiguous
    views or copies, see :func:`_commit_running`), or (None, None)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together, got only "
                         + ("running_mean" if running_var is None else "running_var"))
    if num_batches_tracked is not None:
        _check_counter(num_batches_tracked)
    rm = rv = None
    if running_mean is not None:
        rm = _check_vector("running_mean", running_mean, x.dtype, num_features, writeable=True)
        rv = _check_vector("running_var", running_var, x.dtype, num_features, writeable=True)
        _check_disjoint({"running_mean": running_mean, "running_var": running_var},
                        {"x": x, "gamma": gamma, "beta": beta})
        if num_batches_tracked is not None:
            _check_disjoint({"num_batches_tracked": num_batches_tracked},
                            {"x": x, "gamma": gamma, "beta": beta,
                             "running_mean": running_mean, "running_var": running_var})
        elif momentum is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, "
                             "got None")
    if out is not None:
        _check_out(out, x, {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean,
                            "running_var": running_var,
                            "num_batches_tracked": num_batches_tracked}, in_place="x")
    return rm, rv


def _running_factor(momentum, num_batches_tracked):
    """Weight of the new batch in the running statistics: ``momentum``, or
    ``1 / (batches seen + 1)`` for the cumulative average (momentum None)."""
    if momentum is not None:
        return momentum
    count = 0 if num_batches_tracked is None else int(num_batches_tracked.reshape(()))
    return 1.0 / (count + 1)


def _commit_running(running_mean, rm, running_var, rv, num_batches_tracked):
    """After a successful update of the checked running statistics rm, rv:
    copy them back where the caller's arrays were not contiguous (rm, rv are
    copies then), and count the batch."""
    if rm is not running_mean:
        running_mean[...] = rm
    if rv is not running_var:
        running_var[...] = rv
    if num_batches_tracked is not None:
        num_batches_tracked += 1


def _same_memory(a, b):
    """True when a and b are the very same elements in the same layout."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)


def _check_out(out, x, others, in_place):
    """out must be a writeable C-contiguous array shaped and typed like x.

    It may be the array ``others[in_place]`` itself (the result then replaces
    that input); it may overlap no other array of ``others`` (name -> array
    or None).
    """
    _check_array_type("out", out, "a numpy.ndarray or None")
    if out.dtype != x.dtype:
        raise ValueError(f"out must have the dtype of x ({x.dtype}), got {out.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"out must have the shape of x {x.shape}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous, got a non-contiguous array")
    if not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    names = list(others)
    for k in _overlap.shared_with(out, list(others.values())):
        name = names[k]
        if name == in_place and _same_memory(out, others[name]):
            continue
        raise ValueError(f"out overlaps {name}; out may be {in_place} itself (in place) "
                         f"or memory of its own, nothing else")


# --------------------------------------------------------------- layout ----

def _kernel_view(shape, channel_axis):
    """(module, view_shape): the kernel family and the shape to view x as.

    Channels last (and 2-D) inputs are columnar (M, C); channels first
    inputs are planar (N, C, S), or columnar (N, C) when S == 1. The views
    of a C-contiguous array share its memory.
    """
    if channel_axis == len(shape) - 1:
        return _columnar, (-1, shape[-1])
    spatial = math.prod(shape[2:])
    if spatial == 1:
        return _columnar, shape[:2]
    return _planar, (shape[0], shape[1], spatial)


def _output(out, x):
    return np.empty_like(x, order="C") if out is None else out


# ---------------------------------------------------------- public API ----

def batch_norm_forward(x, gamma, beta, *, eps=1e-5, running_mean=None, running_var=None,
                       momentum=0.1, num_batches_tracked=None, channel_axis=1, out=None,
                       num_threads=None):
    """Batch Normalization in training mode: normalize with the batch statistics.

    For every channel c, over the m values of that channel (m = N times the
    spatial size)::

        mean[c]   = sum(x[..c..]) / m
        var[c]    = sum((x[..c..] - mean[c])**2) / m                  (biased)
        invstd[c] = 1 / sqrt(var[c] + eps)
        y[..c..]  = (x[..c..] - mean[c]) * invstd[c] * gamma[c] + beta[c]

    (Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 1.) The sums run in
    float64 around a shift taken from the data, so data far from zero keep
    their digits; the result is the same to the bit for any ``num_threads``.

    Parameters
    ----------
    x : ndarray of float32 or float64
        (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) with
        ``channel_axis=1``; the channel axis last with ``channel_axis=-1``.
        Read-only input is fine; non-contiguous input is copied first.
    gamma, beta : ndarray, shape (C,), dtype of x, or None
        Scale and shift. None means 1 and 0 (no affine transform).
    eps : float, default 1e-5
        Added to the variance; finite and > 0.
    running_mean, running_var : ndarray, shape (C,), dtype of x, or None
        Running statistics, both or neither, updated in place as in PyTorch:
        ``running = (1 - f) * running + f * batch`` with ``f = momentum``;
        the running variance takes the unbiased batch variance
        ``var * m / (m - 1)``.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch. None is a cumulative average, with
        ``f = 1 / num_batches_tracked`` after the increment; it needs
        ``num_batches_tracked``.
    num_batches_tracked : ndarray holding one int64 >= 0, or None
        Batches seen so far (PyTorch's buffer of that name, and its dtype: a
        narrower integer would wrap). When given with the running statistics
        it is incremented in place; a count that cannot grow is refused.
    channel_axis : {1, -1}, default 1
        Axis of the channels: 1 for NCHW-style, -1 for channels last (the
        positive equivalent ``x.ndim - 1`` is accepted).
    out : ndarray or None
        C-contiguous, writeable, x's shape and dtype, for y. ``out=x``
        normalizes in place; any other overlap with an argument is an error.
    num_threads : int > 0 or None
        OpenMP threads; None uses the OpenMP default (``OMP_NUM_THREADS``,
        threadpoolctl). Small inputs run on fewer threads.

    Returns
    -------
    y : ndarray, shape and dtype of x (``out`` when given)
    mean : ndarray, shape (C,), dtype of x
        The batch mean, to pass to :func:`batch_norm_backward`.
    invstd : ndarray, shape (C,), dtype of x
        ``1 / sqrt(var + eps)``, to pass to :func:`batch_norm_backward`.

    Raises
    ------
    TypeError
        An argument that is not an ndarray (or is a masked array, whose mask
        would be ignored), a dtype other than float32 or float64, or arrays
        of different dtypes.
    ValueError
        x with fewer than 2 or more than 5 dimensions or a zero-size axis;
        only one value per channel (as PyTorch: "Expected more than 1 value
        per channel when training, got input size ..."); a per-channel array
        not of shape (C,); only one of the running statistics; momentum None
        with running statistics but no ``num_batches_tracked``; a bad
        ``out``, ``eps``, ``momentum``, ``channel_axis`` or ``num_threads``.
    """
    _check_x("x", x)
    ca = _check_channel_axis(channel_axis, x.ndim)
    num_features = x.shape[ca]
    if x.size // num_features <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {x.shape}")
    eps = _check_eps(eps)
    momentum = _check_momentum(momentum)
    nthreads = _check_num_threads(num_threads)
    g = None if gamma is None else _check_vector("gamma", gamma, x.dtype, num_features)
    b = None if beta is None else _check_vector("beta", beta, x.dtype, num_features)
    rm, rv = _check_training_state(x, gamma, beta, running_mean, running_var, momentum,
                                   num_batches_tracked, out, num_features)
    tracking = rm is not None
    factor = _running_factor(momentum, num_batches_tracked) if tracking else 0.0

    xc = np.ascontiguousarray(x)
    y = _output(out, xc)
    mean = np.empty(num_features, dtype=x.dtype)
    invstd = np.empty(num_features, dtype=x.dtype)
    kernel, view = _kernel_view(x.shape, ca)
    kernel.forward_train(xc.reshape(view), g, b, y.reshape(view), mean, invstd, rm, rv, eps,
                         factor, nthreads, out is not None)
    if tracking:
        _commit_running(running_mean, rm, running_var, rv, num_batches_tracked)
    return y, mean, invstd


def batch_norm_inference(x, gamma, beta, running_mean, running_var, *, eps=1e-5,
                         channel_axis=1, out=None, num_threads=None):
    """Batch Normalization in inference mode: normalize with running statistics.

    For every channel c::

        y[..c..] = (x[..c..] - running_mean[c]) / sqrt(running_var[c] + eps)
                   * gamma[c] + beta[c]

    computed in float64 and rounded once to x's dtype (Ioffe & Szegedy 2015,
    arXiv:1502.03167, Algorithm 2, step 11).

    Parameters
    ----------
    x : ndarray of float32 or float64
        (N, C, ...) with ``channel_axis=1`` or (N, ..., C) with
        ``channel_axis=-1``, 2 to 5 dimensions. Non-contiguous input is
        copied first.
    gamma, beta : ndarray, shape (C,), dtype of x, or None
        Scale and shift; None means 1 and 0.
    running_mean, running_var : ndarray, shape (C,), dtype of x
        The statistics to normalize with. Not modified.
    eps : float, default 1e-5
        Added to the variance; finite and > 0.
    channel_axis : {1, -1}, default 1
    out : ndarray or None
        As in :func:`batch_norm_forward`; ``out=x`` works in place.
    num_threads : int > 0 or None

    Returns
    -------
    y : ndarray, shape and dtype of x (``out`` when given)

    Raises
    ------
    TypeError
        Non-ndarray or masked-array arguments, unsupported or mixed dtypes.
    ValueError
        Bad shapes, ``out``, ``eps``, ``channel_axis`` or ``num_threads``.
    """
    _check_x("x", x)
    ca = _check_channel_axis(channel_axis, x.ndim)
    num_features = x.shape[ca]
    eps = _check_eps(eps)
    nthreads = _check_num_threads(num_threads)
    g = None if gamma is None else _check_vector("gamma", gamma, x.dtype, num_features)
    b = None if beta is None else _check_vector("beta", beta, x.dtype, num_features)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required in inference, got None")
    rm = _check_vector("running_mean", running_mean, x.dtype, num_features)
    rv = _check_vector("running_var", running_var, x.dtype, num_features)
    if out is not None:
        _check_out(out, x, {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean,
                            "running_var": running_var}, in_place="x")

    xc = np.ascontiguousarray(x)
    y = _output(out, xc)
    kernel, view = _kernel_view(x.shape, ca)
    kernel.inference(xc.reshape(view), g, b, rm, rv, y.reshape(view), eps, nthreads,
                     out is not None)
    return y


def batch_norm_backward(dy, x, gamma, mean, invstd, *, channel_axis=1, out=None,
                        num_threads=None):
    """Gradients of training-mode Batch Normalization, fused in two sweeps.

    With ``xhat = (x - mean) * invstd`` recomputed from x (never stored) and
    m the number of values per channel (Ioffe & Szegedy 2015,
    arXiv:1502.03167, Section 3, gathered into one expression)::

        dbeta[c]  = sum(dy[..c..])
        dgamma[c] = sum(dy[..c..] * xhat[..c..])
        dx[..c..] = gamma[c] * invstd[c] / m
                    * (m * dy[..c..] - dbeta[c] - xhat[..c..] * dgamma[c])

    The sums run in float64; dx is the same to the bit for any
    ``num_threads``.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y; shape and dtype of x.
    x : ndarray of float32 or float64
        The forward's input, 2 to 5 dimensions.
    gamma : ndarray, shape (C,), dtype of x, or None
        None means a scale of 1 (no affine); dgamma and dbeta are still
        returned, as the gradients of an implicit gamma = 1 and beta = 0.
    mean, invstd : ndarray, shape (C,), dtype of x
        As returned by :func:`batch_norm_forward`.
    channel_axis : {1, -1}, default 1
    out : ndarray or None
        C-contiguous, writeable, x's shape and dtype, for dx. ``out=dy``
        computes in place; any other overlap is an error.
    num_threads : int > 0 or None

    Returns
    -------
    dx : ndarray, shape and dtype of x (``out`` when given)
    dgamma, dbeta : ndarray, shape (C,), dtype of x

    Raises
    ------
    TypeError
        Non-ndarray or masked-array arguments, unsupported or mixed dtypes.
    ValueError
        dy not shaped like x; per-channel arrays not of shape (C,); a bad
        ``out``, ``channel_axis`` or ``num_threads``.
    """
    _check_x("x", x)
    ca = _check_channel_axis(channel_axis, x.ndim)
    _check_array_type("dy", dy)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
    num_features = x.shape[ca]
    nthreads = _check_num_threads(num_threads)
    g = None if gamma is None else _check_vector("gamma", gamma, x.dtype, num_features)
    if mean is None or invstd is None:
        raise ValueError("mean and invstd (from batch_norm_forward) are required, got None")
    mu = _check_vector("mean", mean, x.dtype, num_features)
    istd = _check_vector("invstd", invstd, x.dtype, num_features)
    if out is not None:
        _check_out(out, x, {"dy": dy, "x": x, "gamma": gamma, "mean": mean, "invstd": invstd},
                   in_place="dy")

    dyc = np.ascontiguousarray(dy)
    xc = np.ascontiguousarray(x)
    dx = _output(out, xc)
    dgamma = np.empty(num_features, dtype=x.dtype)
    dbeta = np.empty(num_features, dtype=x.dtype)
    kernel, view = _kernel_view(x.shape, ca)
    kernel.backward(dyc.reshape(view), xc.reshape(view), g, mu, istd, dx.reshape(view), dgamma,
                    dbeta, nthreads, out is not None)
    return dx, dgamma, dbeta
