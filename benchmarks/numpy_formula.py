"""Batch Normalization as a NumPy net writes it without fastbn: the formula in x's dtype.

The training-step scenario's third column. Unlike :mod:`fastbn.reference` (the
oracle: float64 throughout, written for clarity), this is what a cs231n-style
NumPy layer runs: ``x.mean``, ``x.var``-like arithmetic and the fused backward
formula, in float32 for float32 inputs, one NumPy operation per term, with
the temporaries that implies. The signatures are those of
:mod:`fastbn.functional` (the subset the benchmarks use), so
``cases.make_call`` calls it as it calls fastbn and the reference.
"""

from __future__ import annotations

import numpy as np


def _axes_and_shape(ndim, channel_axis):
    """The axes reduced over and the shape a (C,) vector broadcasts with."""
    channel_axis %= ndim
    shape = [1] * ndim
    shape[channel_axis] = -1
    return tuple(a for a in range(ndim) if a != channel_axis), shape


def batch_norm_forward(x, gamma, beta, *, eps=1e-5, running_mean=None, running_var=None,
                       momentum=0.1, channel_axis=1, out=None, num_threads=None):
    """``(y, mean, invstd)``; running statistics updated in place (PyTorch's rule)."""
    del num_threads
    axes, shape = _axes_and_shape(x.ndim, channel_axis)
    m = x.size // x.shape[channel_axis]
    mean = x.mean(axis=axes)
    xc = x - mean.reshape(shape)
    var = np.square(xc).mean(axis=axes)
    invstd = 1 / np.sqrt(var + x.dtype.type(eps))
    y = np.multiply(xc, (gamma * invstd).reshape(shape), out=out)
    y += beta.reshape(shape)
    if running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += (momentum * m / (m - 1)) * var
    return y, mean, invstd


def batch_norm_backward(dy, x, gamma, mean, invstd, *, channel_axis=1, out=None,
                        num_threads=None):
    """``(dx, dgamma, dbeta)``: ``dx = gamma·invstd/m · (m·dy - dbeta - xhat·dgamma)``."""
    del num_threads
    axes, shape = _axes_and_shape(x.ndim, channel_axis)
    m = x.size // x.shape[channel_axis]
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dx = np.multiply(dy, x.dtype.type(m), out=out)
    dx -= dbeta.reshape(shape)
    xhat *= dgamma.reshape(shape)
    dx -= xhat
    dx *= (gamma * invstd / x.dtype.type(m)).reshape(shape)
    return dx, dgamma, dbeta
