"""Pure-NumPy oracle for Batch Normalization.

Every compiled kernel of fastbn is tested against the functions here. They
have the signatures of :mod:`fastbn.functional`, accumulate in float64 and are
written for clarity, not speed: each step is one line of the formula.

Source of the formulas: S. Ioffe and C. Szegedy, "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift",
ICML 2015, arXiv:1502.03167, Algorithm 1 (forward) and Section 3 (backward).
The backward from the output (x not needed) is that of In-Place Activated
BatchNorm: S. Rota Bulo, L. Porzi and P. Kontschieder, "In-Place Activated
BatchNorm for Memory-Optimized Training of DNNs", CVPR 2018,
arXiv:1712.02616, Section 3.2. The running statistics follow PyTorch's
``torch.nn.BatchNorm2d``: the new batch is weighted by ``momentum`` and the
running variance takes the unbiased batch variance.

Batch Renormalization: Ioffe, NIPS 2017, arXiv:1702.03275, Algorithm 1;
Ghost Batch Normalization: Hoffer, Hubara & Soudry, NIPS 2017,
arXiv:1705.08741, with Keras' running update (the groups' average).

The oracle checks no input beyond what it needs to compute (the values the
backward from the output cannot invert are refused with the ValueErrors of
:mod:`fastbn.functional`); the argument checking lives in
:mod:`fastbn.functional`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fastbn._dtypes import parameters as _parameters
from fastbn._dtypes import rounded as _rounded
from fastbn._typing import (Activation, Counter, FloatArray, Gradients, OptionalArray, Renormed,
                            Triple)

__all__ = ["batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "batch_norm_backward_from_output", "batch_renorm_forward", "batch_renorm_backward",
           "ghost_batch_norm_forward", "ghost_batch_norm_backward"]


def _reduce_axes(ndim: int, channel_axis: int) -> tuple[tuple[int, ...], int]:
    """Axes summed over: every axis but the channel axis."""
    channel_axis = channel_axis % ndim
    return tuple(a for a in range(ndim) if a != channel_axis), channel_axis


def _per_channel(v: Any, ndim: int, channel_axis: int) -> NDArray[np.float64]:
    """Reshape a (C,) vector so that it broadcasts along ``channel_axis``."""
    shape = [1] * ndim
    shape[channel_axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def _into(out: FloatArray | None, result: FloatArray) -> FloatArray:
    """result, written into out when given (and out returned)."""
    if out is None:
        return result
    out[...] = result
    return out


def _activated(y: FloatArray, activation: Activation,
               negative_slope: float) -> FloatArray:
    """The fused activation in float64: None, "relu" (numpy.maximum(y, 0)) or
    "leaky_relu" (negative_slope * y where y < 0)."""
    if activation is None:
        return y
    if activation == "relu":
        return np.maximum(y, 0.0)
    if activation == "leaky_relu":
        return np.where(y < 0, y * negative_slope, y)
    raise ValueError(f"activation must be None, 'relu' or 'leaky_relu', got {activation!r}")


def _activation_gradient(dy: FloatArray, z: FloatArray, activation: Activation,
                         negative_slope: float) -> FloatArray:
    """dz = dy * act'(z) in float64: act'(z) is 1 where z > 0, else 0 ("relu")
    or ``negative_slope`` ("leaky_relu"); a NaN z counts as not > 0, as in
    PyTorch's leaky_relu_backward (its relu backward lets dy through at NaN)."""
    if activation is None:
        return dy
    if activation == "relu":
        return np.where(z > 0, dy, 0.0)
    if activation == "leaky_relu":
        return np.where(z > 0, dy, dy * negative_slope)
    raise ValueError(f"activation must be None, 'relu' or 'leaky_relu', got {activation!r}")


def _backward_from_xhat(dz: FloatArray, xhat: FloatArray,
                       g: FloatArray, invstd_b: FloatArray,
                       axes: tuple[int, ...], m: int, channel_axis: int,
                       training: bool) -> Triple:
    """(dx, dgamma, dbeta) in float64 from dz, xhat and the broadcastable
    gamma and invstd: the formula of :func:`batch_norm_backward`."""
    ndim = dz.ndim
    dbeta = dz.sum(axis=axes)
    dgamma = (dz * xhat).sum(axis=axes)
    if training:
        dx = g * invstd_b / m * (m * dz - _per_channel(dbeta, ndim, channel_axis)
                                 - xhat * _per_channel(dgamma, ndim, channel_axis))
    else:
        dx = g * invstd_b * dz
    return dx, dgamma, dbeta


def batch_norm_forward(x: FloatArray, gamma: OptionalArray, beta: OptionalArray, *,
                       eps: float = 1e-5, running_mean: OptionalArray = None,
                       running_var: OptionalArray = None, momentum: float | None = 0.1,
                       num_batches_tracked: Counter = None, unbiased: bool = True,
                       activation: Activation = None, negative_slope: float = 0.01,
                       channel_axis: int = 1, out: FloatArray | None = None,
                       num_threads: int | None = None) -> Triple:
    """Training-mode Batch Normalization, computed in float64.

    ``mean = E[x]``, ``var = E[(x - mean)**2]`` (biased) over every axis but
    the channel axis; ``y = (x - mean) / sqrt(var + eps) * gamma + beta``
    (Ioffe & Szegedy 2015, Algorithm 1). When ``running_mean`` and
    ``running_var`` are given they are updated in place with
    ``running = (1 - f) * running + f * batch`` where ``f = momentum``, or
    ``f = 1 / num_batches_tracked`` after incrementing it when ``momentum`` is
    None; the running variance takes the unbiased variance ``var * m / (m-1)``
    (the biased ``var`` with ``unbiased=False``).

    Returns
    -------
    y : ndarray, shape and dtype of x
    mean, invstd : ndarray, shape (C,), the parameter dtype of x (float32
        for float16 and bfloat16 x)
        The batch mean and ``1 / sqrt(var + eps)``, the latter saturated at
        the dtype's largest finite value.
    """
    del num_threads
    axes, channel_axis = _reduce_axes(x.ndim, channel_axis)
    x64 = np.asarray(x, dtype=np.float64)
    m = x64.size // x64.shape[channel_axis]
    mean = x64.mean(axis=axes)
    var = ((x64 - _per_channel(mean, x.ndim, channel_axis)) ** 2).mean(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x64 - _per_channel(mean, x.ndim, channel_axis)) * _per_channel(invstd, x.ndim, channel_axis)
    y: FloatArray = xhat
    if gamma is not None:
        y = y * _per_channel(gamma, x.ndim, channel_axis)
    if beta is not None:
        y = y + _per_channel(beta, x.ndim, channel_axis)
    y = _activated(y, activation, negative_slope)
    if running_mean is not None and running_var is not None:
        if momentum is None:
            assert num_batches_tracked is not None, "momentum=None needs num_batches_tracked"
            num_batches_tracked += 1
            factor = 1.0 / float(num_batches_tracked)
        else:
            if num_batches_tracked is not None:
                num_batches_tracked += 1
            factor = momentum
        batch_var = var * m / (m - 1) if unbiased else var
        running_mean[...] = (1.0 - factor) * running_mean.astype(np.float64) + factor * mean
        running_var[...] = (1.0 - factor) * running_var.astype(np.float64) + factor * batch_var
    y = _rounded(y, x.dtype)
    y = _into(out, y)
    p = _parameters(x.dtype)
    largest = np.finfo(p).max  # invstd saturates there, as fastbn's does
    return y, mean.astype(p), np.minimum(invstd, largest).astype(p)


def batch_norm_inference(x: FloatArray, gamma: OptionalArray, beta: OptionalArray,
                         running_mean: FloatArray, running_var: FloatArray, *,
                         eps: float = 1e-5, activation: Activation = None,
                         negative_slope: float = 0.01, channel_axis: int = 1,
                         out: FloatArray | None = None,
                         num_threads: int | None = None) -> FloatArray:
    """Inference-mode Batch Normalization with the running statistics.

    ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta``,
    computed in float64 and returned in x's dtype.
    """
    del num_threads
    _, channel_axis = _reduce_axes(x.ndim, channel_axis)
    x64 = np.asarray(x, dtype=np.float64)
    mean = _per_channel(running_mean, x.ndim, channel_axis)
    invstd = 1.0 / np.sqrt(_per_channel(running_var, x.ndim, channel_axis) + eps)
    y: FloatArray = (x64 - mean) * invstd
    if gamma is not None:
        y = y * _per_channel(gamma, x.ndim, channel_axis)
    if beta is not None:
        y = y + _per_channel(beta, x.ndim, channel_axis)
    y = _rounded(_activated(y, activation, negative_slope), x.dtype)
    y = _into(out, y)
    return y


def batch_norm_backward(dy: FloatArray, x: FloatArray, gamma: OptionalArray, mean: FloatArray,
                        invstd: FloatArray, *, beta: OptionalArray = None,
                        activation: Activation = None, negative_slope: float = 0.01,
                        training: bool = True, param_grads: bool = True,
                        channel_axis: int = 1, out: FloatArray | None = None,
                        num_threads: int | None = None) -> Gradients:
    """Gradients of Batch Normalization (and of a fused activation), in float64.

    With ``xhat = (x - mean) * invstd`` and m the number of values per
    channel (Ioffe & Szegedy 2015, Section 3, simplified)::

        dbeta  = sum(dz)
        dgamma = sum(dz * xhat)
        dx     = gamma * invstd / m * (m * dz - dbeta - xhat * dgamma)

    or, with ``training=False`` (mean and invstd constants),
    ``dx = gamma * invstd * dz``. Without an activation ``dz = dy``; with
    one, dy is the gradient with respect to the activated output
    ``act(z)``, ``z = gamma * xhat + beta`` is recomputed from x and
    ``dz = dy * act'(z)``: act'(z) = 1 where z > 0, else 0 ("relu") or
    ``negative_slope`` ("leaky_relu"); a NaN z counts as not > 0. gamma and
    beta None mean 1 and 0.

    Returns
    -------
    dx : ndarray, shape and dtype of x
    dgamma, dbeta : ndarray, shape (C,), the parameter dtype of x, or None with
        ``param_grads=False``
    """
    del num_threads
    axes, channel_axis = _reduce_axes(x.ndim, channel_axis)
    x64 = np.asarray(x, dtype=np.float64)
    dy64 = np.asarray(dy, dtype=np.float64)
    m = x64.size // x64.shape[channel_axis]
    mean_b = _per_channel(mean, x.ndim, channel_axis)
    invstd_b = _per_channel(invstd, x.ndim, channel_axis)
    xhat = (x64 - mean_b) * invstd_b
    g = np.ones(x.shape[channel_axis]) if gamma is None else np.asarray(gamma, dtype=np.float64)
    g = _per_channel(g, x.ndim, channel_axis)
    b = 0.0 if beta is None else _per_channel(beta, x.ndim, channel_axis)
    dz = _activation_gradient(dy64, g * xhat + b, activation, negative_slope)
    dx, dgamma, dbeta = _backward_from_xhat(dz, xhat, g, invstd_b, axes, m, channel_axis,
                                            training)
    dx = _rounded(dx, x.dtype)
    dx = _into(out, dx)
    if not param_grads:
        return dx, None, None
    return dx, dgamma.astype(_parameters(x.dtype)), dbeta.astype(_parameters(x.dtype))


def batch_norm_backward_from_output(dy: FloatArray, y: FloatArray, gamma: OptionalArray,
                                    beta: OptionalArray, invstd: FloatArray, *,
                                    activation: Activation = None,
                                    negative_slope: float = 0.01, channel_axis: int = 1,
                                    out: FloatArray | None = None,
                                    num_threads: int | None = None) -> Triple:
    """Training-mode gradients of Batch Normalization from its output, in float64.

    In-Place Activated BatchNorm (Rota Bulo, Porzi & Kontschieder, CVPR
    2018, arXiv:1712.02616, Section 3.2): the backward needs the forward's
    output y, not its input x. The activation is inverted::

        z    = y                                   (activation None)
        z    = y where y > 0, else y / negative_slope   ("leaky_relu")
        xhat = (z - beta) / gamma
        dz   = dy where y > 0, else dy * negative_slope ("leaky_relu"; dy for None)

    and the training backward of :func:`batch_norm_backward` follows with dz:
    ``dbeta = sum(dz)``, ``dgamma = sum(dz * xhat)``, ``dx = gamma * invstd
    / m * (m * dz - dbeta - xhat * dgamma)``. gamma and beta None mean 1
    and 0. The division by gamma loses digits as ``|gamma|`` shrinks.

    Returns
    -------
    dx : ndarray, shape and dtype of y
    dgamma, dbeta : ndarray, shape (C,), the parameter dtype of y

    Raises
    ------
    ValueError
        activation "relu" (not invertible), "leaky_relu" with
        ``negative_slope <= 0``, or gamma 0 in some channel (its xhat is lost).
    """
    del num_threads
    if activation == "relu":
        raise ValueError("activation 'relu' cannot be inverted (every negative pre-activation "
                         "gives 0): use 'leaky_relu' with a negative_slope > 0, or "
                         "batch_norm_backward with x")
    if activation == "leaky_relu" and not negative_slope > 0:
        raise ValueError(f"negative_slope must be > 0 to invert leaky_relu, got "
                         f"{float(negative_slope)}")
    if gamma is not None and np.any(np.asarray(gamma) == 0):
        zeros = np.flatnonzero(np.asarray(gamma) == 0)
        shown = ", ".join(map(str, zeros[:10])) + (", ..." if zeros.size > 10 else "")
        raise ValueError(f"gamma is 0 in channel(s) {shown}: y carries no information on x "
                         f"there, so the backward from the output cannot recover it; use "
                         f"batch_norm_backward with x")
    axes, channel_axis = _reduce_axes(y.ndim, channel_axis)
    y64 = np.asarray(y, dtype=np.float64)
    dy64 = np.asarray(dy, dtype=np.float64)
    m = y64.size // y64.shape[channel_axis]
    if activation is None:
        z = y64
    elif activation == "leaky_relu":
        z = np.where(y64 > 0, y64, y64 / negative_slope)
    else:
        raise ValueError(f"activation must be None, 'relu' or 'leaky_relu', got {activation!r}")
    dz = _activation_gradient(dy64, y64, activation, negative_slope)
    g = np.ones(y.shape[channel_axis]) if gamma is None else np.asarray(gamma, dtype=np.float64)
    g = _per_channel(g, y.ndim, channel_axis)
    b = 0.0 if beta is None else _per_channel(beta, y.ndim, channel_axis)
    xhat = (z - b) / g
    invstd_b = _per_channel(invstd, y.ndim, channel_axis)
    dx, dgamma, dbeta = _backward_from_xhat(dz, xhat, g, invstd_b, axes, m, channel_axis, True)
    dx = _rounded(dx, y.dtype)
    dx = _into(out, dx)
    return dx, dgamma.astype(_parameters(y.dtype)), dbeta.astype(_parameters(y.dtype))



def _variant_forward(x: FloatArray, gamma: OptionalArray, beta: OptionalArray,
                     running_mean: OptionalArray, running_var: OptionalArray,
                     clip: tuple[float, float | None, float] | None, groups: int, eps: float,
                     momentum: float | None, num_batches_tracked: Counter, unbiased: bool,
                     activation: Activation, negative_slope: float,
                     channel_axis: int) -> tuple[FloatArray, ...]:
    """Batch Renormalization (clip = (rmax, rmin, dmax)) and Ghost Batch
    Normalization (groups virtual batches along axis 0), in float64: y and
    the (groups, C) mean, invstd and, with clip, r and d."""
    axes, channel_axis = _reduce_axes(x.ndim, channel_axis)
    pd = _parameters(x.dtype)
    parts = np.split(np.asarray(x, dtype=np.float64), groups, axis=0)
    m = parts[0].size // x.shape[channel_axis]
    g = np.ones(x.shape[channel_axis]) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros(x.shape[channel_axis]) if beta is None else np.asarray(beta, np.float64)
    mean = np.stack([p.mean(axis=axes) for p in parts])
    var = np.stack([((p - _per_channel(mu, x.ndim, channel_axis)) ** 2).mean(axis=axes)
                    for p, mu in zip(parts, mean)])
    invstd = 1.0 / np.sqrt(var + eps)
    r, d = np.ones_like(mean), np.zeros_like(mean)
    if clip is not None:
        assert running_mean is not None and running_var is not None
        rmax, rmin, dmax = clip
        sigma = np.sqrt(running_var.astype(np.float64) + eps)
        with np.errstate(invalid="ignore"):
            r = np.clip(np.sqrt(var + eps) / sigma, 1.0 / rmax if rmin is None else rmin, rmax)
            d = np.clip((mean - running_mean) / sigma, -dmax, dmax)
        r, d = r.astype(pd).astype(np.float64), d.astype(pd).astype(np.float64)
    ys = []
    for p, mu, istd, rj, dj in zip(parts, mean, invstd, r, d):
        xhat = (p - _per_channel(mu, x.ndim, channel_axis)) * _per_channel(istd, x.ndim,
                                                                             channel_axis)
        z = (_per_channel(g, x.ndim, channel_axis)
             * (xhat * _per_channel(rj, x.ndim, channel_axis)
                + _per_channel(dj, x.ndim, channel_axis)) + _per_channel(b, x.ndim, channel_axis))
        ys.append(_activated(z, activation, negative_slope))
    if running_mean is not None and running_var is not None:
        count = 0 if num_batches_tracked is None else int(num_batches_tracked) + 1
        if num_batches_tracked is not None:
            num_batches_tracked += 1
        factor = 1.0 / count if momentum is None else momentum
        batch_var = (var * m / (m - 1) if unbiased else var).mean(axis=0)
        running_mean[...] = (1.0 - factor) * running_mean.astype(np.float64) \
            + factor * mean.mean(axis=0)
        running_var[...] = (1.0 - factor) * running_var.astype(np.float64) + factor * batch_var
    largest = np.finfo(pd).max
    stats = [mean.astype(pd), np.minimum(invstd, largest).astype(pd)]
    if clip is not None:
        stats += [r.astype(pd), d.astype(pd)]
    return (_rounded(np.concatenate(ys), x.dtype), *stats)


def _variant_backward(dy: FloatArray, x: FloatArray, gamma: OptionalArray,
                      stats: tuple[FloatArray, ...], beta: OptionalArray,
                      activation: Activation, negative_slope: float,
                      channel_axis: int) -> Triple:
    """The backward of both variants in float64: stats (groups, C) or (C,),
    (mean, invstd) or (mean, invstd, r, d); per group the training backward
    with gamma * r, dgamma = r * sum(dz * xhat) + d * sum(dz)."""
    axes, channel_axis = _reduce_axes(x.ndim, channel_axis)
    c = x.shape[channel_axis]
    mean, invstd = (np.asarray(s, np.float64).reshape(-1, c) for s in stats[:2])
    r, d = ((np.asarray(s, np.float64).reshape(-1, c) for s in stats[2:]) if len(stats) == 4
            else (np.ones_like(mean), np.zeros_like(mean)))
    groups = mean.shape[0]
    xs = np.split(np.asarray(x, dtype=np.float64), groups, axis=0)
    dys = np.split(np.asarray(dy, dtype=np.float64), groups, axis=0)
    g = np.ones(c) if gamma is None else np.asarray(gamma, np.float64)
    b = np.zeros(c) if beta is None else np.asarray(beta, np.float64)
    m = xs[0].size // c
    dxs, dgamma, dbeta = [], np.zeros(c), np.zeros(c)
    pc = partial(_per_channel, ndim=x.ndim, channel_axis=channel_axis)
    for j in range(groups):
        xhat = (xs[j] - pc(mean[j])) * pc(invstd[j])
        dz = _activation_gradient(dys[j], pc(g) * (xhat * pc(r[j]) + pc(d[j])) + pc(b),
                                  activation, negative_slope)
        dx, sum_dz_xhat, sum_dz = _backward_from_xhat(dz, xhat, pc(g * r[j]), pc(invstd[j]),
                                                      axes, m, channel_axis, True)
        dxs.append(dx)
        dgamma += r[j] * sum_dz_xhat + d[j] * sum_dz
        dbeta += sum_dz
    p = _parameters(x.dtype)
    return _rounded(np.concatenate(dxs), x.dtype), dgamma.astype(p), dbeta.astype(p)


def batch_renorm_forward(x: FloatArray, gamma: OptionalArray, beta: OptionalArray,
                         running_mean: FloatArray, running_var: FloatArray, *,
                         rmax: float = 3.0, rmin: float | None = None, dmax: float = 5.0,
                         virtual_batch_size: int | None = None, eps: float = 1e-5,
                         momentum: float | None = 0.1, num_batches_tracked: Counter = None,
                         unbiased: bool = True, activation: Activation = None,
                         negative_slope: float = 0.01, channel_axis: int = 1,
                         out: FloatArray | None = None,
                         num_threads: int | None = None) -> Renormed:
    """Batch Renormalization in training mode (Ioffe 2017, Algorithm 1), in float64.

    With ``sigma = sqrt(running_var + eps)`` before the update,
    ``r = clip(sqrt(var + eps) / sigma, rmin, rmax)``, ``d = clip((mean -
    running_mean) / sigma, -dmax, dmax)`` (rounded to x's dtype) and
    ``y = act(gamma * (xhat * r + d) + beta)``; the running statistics
    update as in :func:`batch_norm_forward`. With ``virtual_batch_size``,
    per virtual batch as :func:`ghost_batch_norm_forward`.

    Returns
    -------
    y, mean, invstd, r, d
        y like x; the rest (C,), or (groups, C) with ``virtual_batch_size``.
    """
    del num_threads
    groups = 1 if virtual_batch_size is None else x.shape[0] // virtual_batch_size
    y, mean, invstd, r, d = _variant_forward(x, gamma, beta, running_mean, running_var,
                                             (rmax, rmin, dmax), groups, eps, momentum,
                                             num_batches_tracked, unbiased, activation,
                                             negative_slope, channel_axis)
    if virtual_batch_size is None:
        mean, invstd, r, d = mean[0], invstd[0], r[0], d[0]
    return _into(out, y), mean, invstd, r, d


def batch_renorm_backward(dy: FloatArray, x: FloatArray, gamma: OptionalArray,
                          mean: FloatArray, invstd: FloatArray, r: FloatArray, d: FloatArray,
                          *, beta: OptionalArray = None, activation: Activation = None,
                          negative_slope: float = 0.01, channel_axis: int = 1,
                          out: FloatArray | None = None,
                          num_threads: int | None = None) -> Triple:
    """Gradients of Batch Renormalization in float64: the training backward
    with ``gamma * r`` for gamma, ``dgamma = r * sum(dz * xhat) + d *
    sum(dz)``, ``dbeta = sum(dz)``; per group with (groups, C) statistics.
    Returns dx (like x), dgamma and dbeta (C,)."""
    del num_threads
    dx, dgamma, dbeta = _variant_backward(dy, x, gamma, (mean, invstd, r, d), beta, activation,
                                          negative_slope, channel_axis)
    return _into(out, dx), dgamma, dbeta


def ghost_batch_norm_forward(x: FloatArray, gamma: OptionalArray, beta: OptionalArray,
                             virtual_batch_size: int, *, eps: float = 1e-5,
                             running_mean: OptionalArray = None,
                             running_var: OptionalArray = None, momentum: float | None = 0.1,
                             num_batches_tracked: Counter = None, unbiased: bool = True,
                             activation: Activation = None, negative_slope: float = 0.01,
                             channel_axis: int = 1, out: FloatArray | None = None,
                             num_threads: int | None = None) -> Triple:
    """Ghost Batch Normalization in training mode (Hoffer et al. 2017), in float64.

    Each of the ``N / virtual_batch_size`` consecutive virtual batches is
    normalized by its own statistics; the running statistics update once
    with the average over the groups of their means and (unbiased per group
    when ``unbiased``) variances.

    Returns
    -------
    y : like x
    mean, invstd : (groups, C)
    """
    del num_threads
    y, mean, invstd = _variant_forward(x, gamma, beta, running_mean, running_var, None,
                                       x.shape[0] // virtual_batch_size, eps, momentum,
                                       num_batches_tracked, unbiased, activation,
                                       negative_slope, channel_axis)
    return _into(out, y), mean, invstd


def ghost_batch_norm_backward(dy: FloatArray, x: FloatArray, gamma: OptionalArray,
                              mean: FloatArray, invstd: FloatArray, *,
                              beta: OptionalArray = None, activation: Activation = None,
                              negative_slope: float = 0.01, channel_axis: int = 1,
                              out: FloatArray | None = None,
                              num_threads: int | None = None) -> Triple:
    """Gradients of Ghost Batch Normalization in float64: the training
    backward of each virtual batch with its (groups, C) statistics; dgamma
    and dbeta summed over the groups. Returns dx (like x), dgamma, dbeta (C,)."""
    del num_threads
    dx, dgamma, dbeta = _variant_backward(dy, x, gamma, (mean, invstd), beta, activation,
                                          negative_slope, channel_axis)
    return _into(out, dx), dgamma, dbeta
