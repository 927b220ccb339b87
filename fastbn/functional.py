"""The public Batch Normalization functions.

Each function first tries the compiled front (:mod:`fastbn._front`), which
checks a well-formed call in C and runs it; any other call gets the full
checks of :mod:`fastbn._checks` (which name what is wrong, or make the
contiguous copies the call needs) and then the same compiled core. The core
views the input as one of the two kernel layouts, allocates the outputs and
calls the kernel of that layout:

- planar ``(N, C, S)``: channel axis 1 with spatial size S > 1 (NCHW and its
  1-D and 3-D relatives), in :mod:`fastbn._planar`;
- columnar ``(M, C)``: 2-D input, channels-last input, and channel axis 1
  with S == 1, in :mod:`fastbn._columnar`.

Batch Renormalization and Ghost Batch Normalization are
:mod:`fastbn.variants`' (here too, so that this module is the layers'
whole backend).

Dtypes. The data (x, dy, y, ``out``) are float32, float64, float16 or
bfloat16 (``ml_dtypes.bfloat16``, JAX's NumPy dtype; ``pip install
"fastbn[bfloat16]"``). Every per-channel array (gamma, beta, the running
statistics, mean, invstd, dgamma, dbeta) has x's *parameter dtype*: float64
for float64 x, float32 for float32, float16 and bfloat16 x (PyTorch's rule
for its CPU BatchNorm). 16-bit data is read exactly, summed in float64
lanes as float32 data is, and each output value is computed in float32 and
rounded once to the 16-bit dtype (to nearest even): y and dx are within one
unit in the last place of the float64 oracle's result on the same inputs,
plus a float32 rounding of the channel's scale. A float16 result beyond
float16's range (65504) is +-inf, as IEEE 754 rounds it (a large gamma or
beta can do it); NaN propagates as in float32.

The formulas are those of Ioffe & Szegedy (2015), "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift",
arXiv:1502.03167; the running statistics follow PyTorch's ``BatchNorm``.
Every check runs before anything is written, so a call that raises leaves
every array the caller passed as it was.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from fastbn import _arguments, _checks, _front, _running
from fastbn._typing import Activation, Counter, FloatArray, Gradients, OptionalArray, Triple
from fastbn.variants import (batch_renorm_backward, batch_renorm_forward,
                             ghost_batch_norm_backward, ghost_batch_norm_forward)

__all__ = ["batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "batch_norm_backward_from_output", "batch_renorm_forward", "batch_renorm_backward",
           "ghost_batch_norm_forward", "ghost_batch_norm_backward"]

# ---------------------------------------------------------- public API ----

def batch_norm_forward(x: FloatArray, gamma: OptionalArray, beta: OptionalArray, *,
                       eps: float = 1e-5, running_mean: OptionalArray = None,
                       running_var: OptionalArray = None, momentum: float | None = 0.1,
                       num_batches_tracked: Counter = None, unbiased: bool = True,
                       activation: Activation = None, negative_slope: float = 0.01,
                       channel_axis: int = 1, out: FloatArray | None = None,
                       num_threads: int | None = None) -> Triple:
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
    x : ndarray of float32, float64, float16 or bfloat16
        (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) with
        ``channel_axis=1``; the channel axis last with ``channel_axis=-1``.
        Read-only input is fine; non-contiguous input is copied first.
    gamma, beta : ndarray, shape (C,), x's parameter dtype, or None
        Scale and shift. None means 1 and 0 (no affine transform).
    eps : float, default 1e-5
        Added to the variance, in float64; finite and > 0. It need not be
        representable in x's dtype (scaled data take a scaled eps).
    running_mean, running_var : ndarray, shape (C,), x's parameter dtype, or None
        Running statistics, both or neither, one value per channel (a
        zero-stride view is refused), updated in place as in PyTorch:
        ``running = (1 - f) * running + f * batch`` with ``f = momentum``;
        the running variance takes the unbiased batch variance
        ``var * m / (m - 1)`` (or the biased one, see ``unbiased``).
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch. None is a cumulative average, with
        ``f = 1 / num_batches_tracked`` after the increment; it needs
        ``num_batches_tracked``.
    num_batches_tracked : ndarray holding one int64 >= 0, or None
        Batches seen so far (PyTorch's buffer of that name, and its dtype: a
        narrower integer would wrap). When given with the running statistics
        it is incremented in place; a count that cannot grow is refused.
    unbiased : bool, default True
        The running variance takes the unbiased batch variance
        ``var * m / (m - 1)`` (PyTorch), or with False the biased ``var``
        that normalizes the batch (Keras, cs231n, numpy-ml).
    activation : {None, "relu", "leaky_relu"}, default None
        Fused into the same sweep: y = act(normalized), computed in float64
        (or float32 where fastbn's float32 path applies) before the one
        rounding. "relu": max(v, 0) (NaN stays NaN, as numpy.maximum);
        "leaky_relu": v for v >= 0, ``negative_slope * v`` below.
    negative_slope : float, default 0.01
        The slope of "leaky_relu" for negative values (PyTorch's name and
        default); finite.
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
    mean : ndarray, shape (C,), x's parameter dtype
        The batch mean, to pass to :func:`batch_norm_backward`.
    invstd : ndarray, shape (C,), x's parameter dtype
        ``1 / sqrt(var + eps)``, to pass to :func:`batch_norm_backward`.
        Saturated at the dtype's largest finite value when it exceeds it
        (float32, a constant channel and eps below about 1e-76): it stays
        finite, y is still beta on that channel, and the backward, which
        takes it, gives no NaN (dgamma 0 and dx with float64's signs, its
        magnitude capped by the saturated invstd).

    Raises
    ------
    TypeError
        An argument of the wrong type or dtype (the policy of
        :mod:`fastbn._checks`): not an ndarray (or a masked array, whose
        mask would be ignored), x not float32, float64, float16 or bfloat16,
        dy or ``out`` not of x's dtype, a per-channel array not of x's
        parameter dtype (float32 for 16-bit x), ``num_batches_tracked`` not
        int64, a number argument that is not a number.
    ValueError
        x with fewer than 2 or more than 5 dimensions or a zero-size axis;
        only one value per channel (as PyTorch: "Expected more than 1 value
        per channel when training, got input size ..."); a per-channel array
        not of shape (C,); only one of the running statistics; a read-only
        or zero-stride array that is written; arrays written in place that
        share memory with another argument; momentum None with running
        statistics but no ``num_batches_tracked``; a count that cannot grow;
        a bad ``out`` shape or layout, ``eps``, ``momentum``,
        ``channel_axis`` or ``num_threads``.
    """
    fast = _front.forward(x, gamma, beta, eps, running_mean, running_var, momentum,
                          num_batches_tracked, unbiased, activation, negative_slope,
                          channel_axis, out, num_threads)
    if fast is not None:
        return fast
    _checks.x("x", x)
    ca = _checks.channel_axis(channel_axis, x.ndim)
    num_features = x.shape[ca]
    if x.size // num_features <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {x.shape}")
    eps, momentum, nthreads, g, b, rm, rv = _arguments.forward_args(
        x, num_features, gamma, beta, eps, momentum, num_threads, running_mean, running_var,
        num_batches_tracked, out)
    unbiased = _checks.flag(unbiased, "unbiased")
    act, slope = _checks.activation(activation, negative_slope)
    result: Triple = _front.forward_unchecked(
        np.ascontiguousarray(x), g, b, rm, rv, momentum, num_batches_tracked, eps, unbiased,
        act, slope, ca, out, nthreads)
    if rm is not None:
        _running.commit(running_mean, rm, running_var, rv, None)
    return result


def batch_norm_inference(x: FloatArray, gamma: OptionalArray, beta: OptionalArray,
                         running_mean: FloatArray, running_var: FloatArray, *,
                         eps: float = 1e-5, activation: Activation = None,
                         negative_slope: float = 0.01, channel_axis: int = 1,
                         out: FloatArray | None = None,
                         num_threads: int | None = None) -> FloatArray:
    """Batch Normalization in inference mode: normalize with running statistics.

    For every channel c::

        y[..c..] = (x[..c..] - running_mean[c]) / sqrt(running_var[c] + eps)
                   * gamma[c] + beta[c]

    computed in float64 and rounded once to x's dtype (Ioffe & Szegedy 2015,
    arXiv:1502.03167, Algorithm 2, step 11).

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        (N, C, ...) with ``channel_axis=1`` or (N, ..., C) with
        ``channel_axis=-1``, 2 to 5 dimensions. Non-contiguous input is
        copied first.
    gamma, beta : ndarray, shape (C,), x's parameter dtype, or None
        Scale and shift; None means 1 and 0.
    running_mean, running_var : ndarray, shape (C,), x's parameter dtype
        The statistics to normalize with. Not modified.
    eps : float, default 1e-5
        Added to the variance; finite and > 0.
    activation : {None, "relu", "leaky_relu"}, default None
    negative_slope : float, default 0.01
        A fused activation, as in :func:`batch_norm_forward`.
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
        Non-ndarray or masked-array arguments, unsupported or mixed dtypes
        (``out`` included), a number argument that is not a number.
    ValueError
        Bad shapes, ``out`` shape or layout, ``eps``, ``channel_axis`` or
        ``num_threads``.
    """
    fast = _front.inference(x, gamma, beta, running_mean, running_var, eps, activation,
                            negative_slope, channel_axis, out, num_threads)
    if fast is not None:
        return fast
    _checks.x("x", x)
    ca = _checks.channel_axis(channel_axis, x.ndim)
    num_features = x.shape[ca]
    eps = _checks.eps(eps)
    nthreads = _checks.threads(num_threads)
    g = None if gamma is None else _checks.vector("gamma", gamma, x.dtype, num_features)
    b = None if beta is None else _checks.vector("beta", beta, x.dtype, num_features)
    if running_mean is None or running_var is None:
        raise TypeError("running_mean and running_var are required in inference, got None")
    rm = _checks.vector("running_mean", running_mean, x.dtype, num_features)
    rv = _checks.vector("running_var", running_var, x.dtype, num_features)
    act, slope = _checks.activation(activation, negative_slope)
    if out is not None:
        _checks.out(out, x, {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean,
                            "running_var": running_var}, in_place="x")
    y: FloatArray = _front.inference_unchecked(np.ascontiguousarray(x), g, b, rm, rv, eps, act,
                                               slope, ca, out, nthreads)
    return y


def batch_norm_backward(dy: FloatArray, x: FloatArray, gamma: OptionalArray, mean: FloatArray,
                        invstd: FloatArray, *, beta: OptionalArray = None,
                        activation: Activation = None, negative_slope: float = 0.01,
                        training: bool = True, param_grads: bool = True,
                        channel_axis: int = 1, out: FloatArray | None = None,
                        num_threads: int | None = None) -> Gradients:
    """Gradients of Batch Normalization, fused in one pass over dy and x.

    With ``xhat = (x - mean) * invstd`` recomputed from x (never stored) and
    m the number of values per channel (Ioffe & Szegedy 2015,
    arXiv:1502.03167, Section 3, gathered into one expression), in training
    mode (mean and invstd are the batch's, functions of x)::

        dbeta[c]  = sum(dy[..c..])
        dgamma[c] = sum(dy[..c..] * xhat[..c..])
        dx[..c..] = gamma[c] * invstd[c] / m
                    * (m * dy[..c..] - dbeta[c] - xhat[..c..] * dgamma[c])

    With ``training=False`` mean and invstd are constants (the running
    statistics of an eval-mode forward, or frozen ones: ``invstd = 1 /
    sqrt(running_var + eps)``), the normalization is an affine map, and::

        dx[..c..] = gamma[c] * invstd[c] * dy[..c..]

    with dbeta and dgamma as above; with ``param_grads=False`` too, they
    are not computed and the pass reads dy alone (2 x nbytes of traffic,
    as inference), for a frozen layer whose gamma and beta do not learn.

    With an ``activation`` (the forward's fused one), dy is the gradient
    with respect to the activated output ``act(z)``, ``z = gamma * xhat +
    beta``. The pass recomputes z from x and uses, in place of dy::

        dz = dy * act'(z),   act'(z) = 1 where z > 0, else 0 ("relu") or
                             negative_slope ("leaky_relu")

    (NaN z counts as not > 0, as in PyTorch's ``leaky_relu_backward``; its
    ReLU backward lets dy through where the output is NaN), in the same
    pass: the result equals the plain backward of dz to round-off. z is recomputed from the given mean and
    invstd, so where the forward's z was within round-off of 0 the mask
    may differ from ``y > 0``.

    The sums run in float64; dx is the same to the bit for any
    ``num_threads``.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y; shape and dtype of x.
    x : ndarray of float32, float64, float16 or bfloat16
        The forward's input, 2 to 5 dimensions.
    gamma : ndarray, shape (C,), x's parameter dtype, or None
        None means a scale of 1 (no affine); dgamma and dbeta are still
        returned, as the gradients of an implicit gamma = 1 and beta = 0.
    mean, invstd : ndarray, shape (C,), x's parameter dtype
        As returned by :func:`batch_norm_forward` (training), or the
        running mean and ``1 / sqrt(running_var + eps)`` (``training=False``).
    beta : ndarray, shape (C,), x's parameter dtype, or None, keyword-only
        The forward's shift, needed for the pre-activation z with an
        ``activation``; None means 0. Ignored without an activation.
    activation : {None, "relu", "leaky_relu"}, default None
        The activation the forward fused (see :func:`batch_norm_forward`).
    negative_slope : float, default 0.01
        Slope of "leaky_relu" for z <= 0 (PyTorch's name and default).
    training : bool, default True
        False: mean and invstd are constants (eval mode, frozen statistics).
    param_grads : bool, default True
        False: return None for dgamma and dbeta; with ``training=False`` they
        are then not computed and x is not read (unless an activation needs
        its mask). (In training mode dx needs the two sums anyway.)
    channel_axis : {1, -1}, default 1
    out : ndarray or None
        C-contiguous, writeable, x's shape and dtype, for dx. ``out=dy``
        computes in place; any other overlap is an error.
    num_threads : int > 0 or None

    Returns
    -------
    dx : ndarray, shape and dtype of x (``out`` when given)
    dgamma, dbeta : ndarray, shape (C,), x's parameter dtype, or None
        None with ``param_grads=False``.

    Raises
    ------
    TypeError
        Non-ndarray or masked-array arguments, unsupported or mixed dtypes
        (``out`` included), a number argument that is not a number.
    ValueError
        dy not shaped like x; per-channel arrays not of shape (C,); a bad
        ``out`` shape or layout, ``channel_axis``, ``num_threads``,
        ``activation`` or ``negative_slope``.
    """
    fast = _front.backward(dy, x, gamma, mean, invstd, beta, activation, negative_slope,
                           training, param_grads, channel_axis, out, num_threads)
    if fast is not None:
        return fast
    _checks.x("x", x)
    ca = _checks.channel_axis(channel_axis, x.ndim)
    num_features = x.shape[ca]
    nthreads, g, mu, istd = _arguments.backward_args(dy, x, num_features, gamma, mean, invstd, out,
                                                  num_threads, source="batch_norm_forward",
                                                  beta=beta)
    act, slope = _checks.activation(activation, negative_slope)
    b = None if beta is None or not act else np.ascontiguousarray(beta)
    training = _checks.flag(training, "training")
    param_grads = _checks.flag(param_grads, "param_grads")
    dyc = np.ascontiguousarray(dy)
    xc = np.ascontiguousarray(x) if training or param_grads or act else dyc  # x not read
    result: Gradients = _front.backward_unchecked(dyc, xc, g, b, mu, istd, act, slope, training,
                                                  param_grads, False, ca, out, nthreads)
    return result


def batch_norm_backward_from_output(dy: FloatArray, y: FloatArray, gamma: OptionalArray,
                                    beta: OptionalArray, invstd: FloatArray, *,
                                    activation: Activation = None,
                                    negative_slope: float = 0.01, channel_axis: int = 1,
                                    out: FloatArray | None = None,
                                    num_threads: int | None = None) -> Triple:
    """Gradients of training-mode Batch Normalization from its output y, without x.

    In-Place Activated BatchNorm (Rota Bulò, Porzi & Kontschieder, "In-Place
    Activated BatchNorm for Memory-Optimized Training of DNNs", CVPR 2018,
    Section 3): the output ``y = act(z)``, ``z = gamma * xhat + beta``, is
    inverted, so a net may drop x after the forward (or write y over it)::

        z     = act^-1(y)    (y; "leaky_relu": y where y > 0, y / negative_slope
                              elsewhere)
        xhat  = (z - beta) / gamma
        dz    = dy * act'(z) (dy; "leaky_relu": dy where y > 0, else
                              dy * negative_slope)

    and then the training backward of :func:`batch_norm_backward` with dz
    and xhat, in one pass over dy and y::

        dbeta[c]  = sum(dz[..c..])
        dgamma[c] = sum(dz[..c..] * xhat[..c..])
        dx[..c..] = gamma[c] * invstd[c] / m
                    * (m * dz[..c..] - dbeta[c] - xhat[..c..] * dgamma[c])

    Accuracy: the pre-activation z = act^-1(y) carries the rounding of the
    forward, about ``u * (|z| + |beta|)`` with u the unit round-off of y's
    dtype; dividing by gamma turns it into an error of about ``u * (|gamma *
    xhat| + |beta|) / |gamma|`` in xhat. With gamma and beta of order 1 the
    result matches :func:`batch_norm_backward` (from x) to about 1e-6
    relative in float32; as ``|gamma|`` shrinks relative to ``|beta|`` the
    error of dgamma and dx grows like ``|beta| / |gamma|``; a channel with gamma == 0
    cannot be inverted and is refused. invstd only scales dx (dgamma and
    dbeta do not use it); it must be finite and > 0, as the forward returns
    it.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y; shape and dtype of y.
    y : ndarray of float32, float64, float16 or bfloat16
        The output of :func:`batch_norm_forward` (training mode, the same
        ``activation`` and ``negative_slope``), 2 to 5 dimensions.
    gamma, beta : ndarray, shape (C,), y's parameter dtype, or None
        The forward's scale and shift; None means 1 and 0. gamma must have
        no zero.
    invstd : ndarray, shape (C,), y's parameter dtype
        As returned by :func:`batch_norm_forward`.
    activation : {None, "leaky_relu"}, default None
        The forward's fused activation; it must be invertible: "relu" is
        refused.
    negative_slope : float > 0, default 0.01
        Slope of "leaky_relu" for z <= 0.
    channel_axis : {1, -1}, default 1
    out : ndarray or None
        C-contiguous, writeable, y's shape and dtype, for dx. ``out=dy`` or
        ``out=y`` computes in place; any other overlap is an error.
    num_threads : int > 0 or None

    Returns
    -------
    dx : ndarray, shape and dtype of y (``out`` when given)
    dgamma, dbeta : ndarray, shape (C,), y's parameter dtype

    Raises
    ------
    TypeError
        Non-ndarray or masked-array arguments, unsupported or mixed dtypes
        (``out`` included), invstd None, a number argument that is not a
        number.
    ValueError
        ``activation="relu"`` (not invertible), a ``negative_slope`` that is
        not > 0 with "leaky_relu", a zero in gamma (the message names the
        channels); dy not shaped like y; per-channel arrays not of shape
        (C,); a bad ``out`` shape or layout, ``channel_axis`` or
        ``num_threads``.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    >>> gamma, beta = np.full(3, 1.5, np.float32), np.full(3, 0.5, np.float32)
    >>> y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, activation="leaky_relu")
    >>> dy = np.ones_like(y)
    >>> dx, dgamma, dbeta = fastbn.batch_norm_backward_from_output(
    ...     dy, y, gamma, beta, invstd, activation="leaky_relu")
    >>> ref = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, beta=beta,
    ...                                  activation="leaky_relu")
    >>> bool(np.allclose(dx, ref[0], atol=1e-5))
    True
    """
    fast = _front.backward_from_output(dy, y, gamma, beta, invstd, activation, negative_slope,
                                       channel_axis, out, num_threads)
    if fast is not None:
        return fast
    _checks.x("y", y)
    ca = _checks.channel_axis(channel_axis, y.ndim)
    num_features = y.shape[ca]
    act, slope = _checks.activation(activation, negative_slope)
    nthreads, g, b, istd = _arguments.from_output_args(dy, y, num_features, gamma, beta, invstd,
                                                    act, slope, out, num_threads)
    result = _front.backward_unchecked(np.ascontiguousarray(dy), np.ascontiguousarray(y), g, b,
                                       None, istd, act, slope, True, True, True, ca, out,
                                       nthreads)
    return cast(Triple, result)  # with param_grads, dgamma and dbeta are arrays
