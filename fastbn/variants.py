"""Batch Renormalization and Ghost Batch Normalization, in the compiled kernels.

- Batch Renormalization (S. Ioffe, "Batch Renormalization: Towards Reducing
  Minibatch Dependence in Batch-Normalized Models", NIPS 2017,
  arXiv:1702.03275, Algorithm 1) corrects the batch statistics towards the
  running ones, for small or non-i.i.d. minibatches: Keras'
  ``BatchNormalization(renorm=True, renorm_clipping=...)``.
- Ghost Batch Normalization (E. Hoffer, I. Hubara and D. Soudry, "Train
  longer, generalize better", NIPS 2017, arXiv:1705.08741, Algorithm 1)
  normalizes each virtual batch of ``virtual_batch_size`` consecutive
  samples by its own statistics, for large-batch training: Keras'
  ``BatchNormalization(virtual_batch_size=...)``.

Both run in the kernels of :mod:`fastbn.functional` (every layout, dtype,
kernel level and activation; the same bits for any ``num_threads``; all or
nothing on bad input): renormalization changes each channel's affine map
(``gamma * r`` for gamma, ``beta + gamma * d`` for beta) and its gradient
coefficients, and the ghost groups are one call that runs the kernels'
pass on each group in turn. The two combine: Batch Renormalization with a
``virtual_batch_size`` gives each group its own r and d. The layers take
them as options (:class:`fastbn.BatchNorm2d` ``renorm``,
``renorm_clipping``, ``virtual_batch_size``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastbn import _arguments, _checks, _front, _running, _variant_args
from fastbn._typing import Activation, Counter, FloatArray, OptionalArray, Renormed, Triple

__all__ = ["batch_renorm_forward", "batch_renorm_backward", "ghost_batch_norm_forward",
           "ghost_batch_norm_backward"]


def _forward(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
             clip: tuple[Any, Any, Any] | None, virtual_batch_size: Any, eps: Any,
             momentum: Any, num_batches_tracked: Any, unbiased: Any, activation: Any,
             negative_slope: Any, channel_axis: Any, out: Any, num_threads: Any) -> Any:
    """The forward of both variants: Batch Renormalization when ``clip`` is
    (rmax, rmin, dmax), virtual batches when ``virtual_batch_size``."""
    fast = _front.variant_forward(x, gamma, beta, running_mean, running_var, momentum,
                                  num_batches_tracked, eps, unbiased, activation,
                                  negative_slope, channel_axis, out, num_threads, clip,
                                  virtual_batch_size)
    if fast is not None:
        return fast
    _checks.x("x", x)
    ca = _checks.channel_axis(channel_axis, x.ndim)
    num_features = x.shape[ca]
    if x.size // num_features <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {x.shape}")
    if clip is not None and (running_mean is None or running_var is None):
        raise TypeError("running_mean and running_var are required by Batch "
                        "Renormalization (r and d compare the batch with them), got None")
    rmax, rmin, dmax = (1.0, 1.0, 0.0) if clip is None else _variant_args.clipping(*clip)
    groups = 1 if virtual_batch_size is None else _variant_args.groups(virtual_batch_size, x,
                                                                       ca)
    eps, momentum, nthreads, g, b, rm, rv = _arguments.forward_args(
        x, num_features, gamma, beta, eps, momentum, num_threads, running_mean, running_var,
        num_batches_tracked, out)
    unbiased = _checks.flag(unbiased, "unbiased")
    act, slope = _checks.activation(activation, negative_slope)
    result = _front.variant_forward_unchecked(
        np.ascontiguousarray(x), g, b, rm, rv, momentum, num_batches_tracked, eps, unbiased,
        act, slope, ca, out, nthreads, clip is not None, rmax, rmin, dmax, groups,
        virtual_batch_size is not None)
    if rm is not None:
        _running.commit(running_mean, rm, running_var, rv, None)
    return result


def _backward(dy: Any, x: Any, gamma: Any, stats: tuple[Any, ...], grouped: bool | None,
              beta: Any, activation: Any, negative_slope: Any, channel_axis: Any, out: Any,
              num_threads: Any) -> Triple:
    """The backward of both variants: stats is (mean, invstd) or (mean,
    invstd, r, d); grouped None takes (groups, C) statistics when mean has
    2 dimensions."""
    r, d = stats[2:] if len(stats) == 4 else (None, None)
    fast = _front.variant_backward(dy, x, gamma, stats[0], stats[1], r, d, beta, activation,
                                   negative_slope, channel_axis, out, num_threads,
                                   len(stats) == 4, grouped)
    if fast is not None:
        return fast
    _checks.x("x", x)
    ca = _checks.channel_axis(channel_axis, x.ndim)
    num_features = x.shape[ca]
    _checks.like("dy", dy, x, what="x")
    nthreads = _checks.threads(num_threads)
    g = None if gamma is None else _checks.vector("gamma", gamma, x.dtype, num_features)
    b = None if beta is None else _checks.vector("beta", beta, x.dtype, num_features)
    act, slope = _checks.activation(activation, negative_slope)
    names = ("mean", "invstd", "r", "d")[:len(stats)]
    if grouped is None:
        grouped = isinstance(stats[0], np.ndarray) and stats[0].ndim == 2
    groups, checked = _variant_args.statistics(names, stats, x, num_features, grouped=grouped)
    if out is not None:
        _checks.out(out, x, {"dy": dy, "x": x, "gamma": gamma, "beta": beta,
                             **dict(zip(names, stats))}, in_place="dy")
    if len(checked) == 4:
        r, d = checked[2], checked[3]
    result: Triple = _front.variant_backward_unchecked(
        np.ascontiguousarray(dy), np.ascontiguousarray(x), g, b if act else None, checked[0],
        checked[1], r, d, act, slope, ca, out, nthreads, groups)
    return result


def batch_renorm_forward(x: FloatArray, gamma: OptionalArray, beta: OptionalArray,
                         running_mean: FloatArray, running_var: FloatArray, *,
                         rmax: float = 3.0, rmin: float | None = None, dmax: float = 5.0,
                         virtual_batch_size: int | None = None, eps: float = 1e-5,
                         momentum: float | None = 0.1, num_batches_tracked: Counter = None,
                         unbiased: bool = True, activation: Activation = None,
                         negative_slope: float = 0.01, channel_axis: int = 1,
                         out: FloatArray | None = None, num_threads: int | None = None,
                         ) -> Renormed:
    """Batch Renormalization in training mode (Ioffe 2017, Algorithm 1).

    For every channel, with the batch mean and biased variance ``mean``,
    ``var`` over its m values (as :func:`fastbn.batch_norm_forward`), and
    the running statistics as they are before this call updates them::

        sigma  = sqrt(running_var + eps)
        r      = clip(sqrt(var + eps) / sigma, rmin, rmax)
        d      = clip((mean - running_mean) / sigma, -dmax, dmax)
        y      = act(gamma * ((x - mean) * invstd * r + d) + beta)

    r and d are rounded to x's parameter dtype and y uses the rounded values; they
    are constants for the gradient (:func:`batch_renorm_backward`). The
    running statistics are then updated as in :func:`fastbn.batch_norm_forward`
    (``momentum``, ``unbiased``). ``rmax=1, dmax=0`` is the plain forward,
    to the bit. A NaN r or d (a NaN statistic) stays NaN (as numpy.clip).

    Parameters
    ----------
    x, gamma, beta
        As in :func:`fastbn.batch_norm_forward`.
    running_mean, running_var : ndarray, shape (C,), x's parameter dtype
        Required: r and d compare the batch with them. Updated in place.
    rmax : float >= 1, default 3
    rmin : float in [0, 1] or None, default None (1 / rmax)
    dmax : float >= 0, default 5
        The clipping of r to [rmin, rmax] and d to [-dmax, dmax] (Keras'
        ``renorm_clipping`` and defaults); rmax and dmax may be inf.
    virtual_batch_size : int or None
        With an int, each virtual batch of that many consecutive samples
        is renormalized by its own statistics, r and d, as in
        :func:`ghost_batch_norm_forward`; the statistics are then (groups, C).
    eps, momentum, num_batches_tracked, unbiased, activation, negative_slope, channel_axis, out, num_threads
        As in :func:`fastbn.batch_norm_forward`.

    Returns
    -------
    y : ndarray, shape and dtype of x (``out`` when given)
    mean, invstd, r, d : ndarray, x's parameter dtype, shape (C,), or (groups, C)
        with ``virtual_batch_size``: the batch statistics and the
        corrections, for :func:`batch_renorm_backward`.

    Raises
    ------
    TypeError
        As :func:`fastbn.batch_norm_forward`; running_mean or running_var
        None; a clipping bound that is not a real number.
    ValueError
        As :func:`fastbn.batch_norm_forward`; rmax < 1, rmin outside [0, 1],
        dmax < 0 or a NaN bound; a ``virtual_batch_size`` as in
        :func:`ghost_batch_norm_forward`.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y, mean, invstd, r, d = fastbn.batch_renorm_forward(x, None, None, rm, rv)
    >>> dx, dgamma, dbeta = fastbn.batch_renorm_backward(np.ones_like(y), x, None, mean,
    ...                                                  invstd, r, d)
    >>> dx.shape, r.shape
    ((4, 3, 5, 5), (3,))
    """
    result: Renormed = _forward(
        x, gamma, beta, running_mean, running_var, (rmax, rmin, dmax), virtual_batch_size,
        eps, momentum, num_batches_tracked, unbiased, activation, negative_slope, channel_axis,
        out, num_threads)
    return result


def batch_renorm_backward(dy: FloatArray, x: FloatArray, gamma: OptionalArray,
                          mean: FloatArray, invstd: FloatArray, r: FloatArray, d: FloatArray,
                          *, beta: OptionalArray = None, activation: Activation = None,
                          negative_slope: float = 0.01, channel_axis: int = 1,
                          out: FloatArray | None = None, num_threads: int | None = None,
                          ) -> Triple:
    """Gradients of Batch Renormalization (Ioffe 2017, Section 3), one pass over dy and x.

    r and d are constants, so with ``xhat = (x - mean) * invstd`` and m the
    values per channel (per virtual batch with (groups, C) statistics, each
    group with its own; dgamma and dbeta summed over the groups)::

        dbeta  = sum(dz)
        dgamma = r * sum(dz * xhat) + d * sum(dz)
        dx     = gamma * r * invstd / m * (m * dz - sum(dz) - xhat * sum(dz * xhat))

    the training backward of :func:`fastbn.batch_norm_backward` with ``gamma
    * r`` for gamma; dz is dy through the activation's derivative at the
    recomputed pre-activation ``gamma * (xhat * r + d) + beta``.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y; shape and dtype of x.
    x : ndarray of float32, float64, float16 or bfloat16
        The forward's input.
    gamma : ndarray, shape (C,), x's parameter dtype, or None
    mean, invstd, r, d : ndarray, x's parameter dtype
        As :func:`batch_renorm_forward` returned them: (C,), or (groups, C)
        after a forward with ``virtual_batch_size``.
    beta, activation, negative_slope, channel_axis, out, num_threads
        As in :func:`fastbn.batch_norm_backward`.

    Returns
    -------
    dx : ndarray, shape and dtype of x (``out`` when given)
    dgamma, dbeta : ndarray, shape (C,), x's parameter dtype

    Raises
    ------
    TypeError
        As :func:`fastbn.batch_norm_backward`; a statistic None.
    ValueError
        As :func:`fastbn.batch_norm_backward`; statistics of different
        shapes, or groups that do not divide the batch size.
    """
    return _backward(dy, x, gamma, (mean, invstd, r, d), None, beta, activation,
                     negative_slope, channel_axis, out, num_threads)


def ghost_batch_norm_forward(x: FloatArray, gamma: OptionalArray, beta: OptionalArray,
                             virtual_batch_size: int, *, eps: float = 1e-5,
                             running_mean: OptionalArray = None,
                             running_var: OptionalArray = None, momentum: float | None = 0.1,
                             num_batches_tracked: Counter = None, unbiased: bool = True,
                             activation: Activation = None, negative_slope: float = 0.01,
                             channel_axis: int = 1, out: FloatArray | None = None,
                             num_threads: int | None = None) -> Triple:
    """Ghost Batch Normalization in training mode (Hoffer et al. 2017, Algorithm 1).

    The N samples form ``groups = N / virtual_batch_size`` consecutive
    virtual batches along the batch axis (axis 0, in either channel
    layout); each is normalized as :func:`fastbn.batch_norm_forward`
    normalizes a batch, by its own mean and invstd, in one call. The
    running statistics update once, with the average over the groups of
    their means and of their variances (Keras' rule), each group's
    variance unbiased (over its own m values) when ``unbiased``.
    ``virtual_batch_size = N`` is the plain forward, to the bit.

    Parameters
    ----------
    x, gamma, beta
        As in :func:`fastbn.batch_norm_forward`.
    virtual_batch_size : int
        Samples per virtual batch: > 0, dividing N, and giving each group
        more than one value per channel.
    eps, running_mean, running_var, momentum, num_batches_tracked, unbiased, activation, negative_slope, channel_axis, out, num_threads
        As in :func:`fastbn.batch_norm_forward`.

    Returns
    -------
    y : ndarray, shape and dtype of x (``out`` when given)
    mean, invstd : ndarray, shape (groups, C), x's parameter dtype
        Each group's statistics, for :func:`ghost_batch_norm_backward`.

    Raises
    ------
    TypeError
        As :func:`fastbn.batch_norm_forward`; ``virtual_batch_size`` not an
        int.
    ValueError
        As :func:`fastbn.batch_norm_forward`; a ``virtual_batch_size`` that
        is not > 0, does not divide N, or leaves a group one value per
        channel (the message names both).
    """
    result: Triple = _forward(x, gamma, beta, running_mean, running_var, None,
                              virtual_batch_size, eps, momentum, num_batches_tracked, unbiased,
                              activation, negative_slope, channel_axis, out, num_threads)
    return result


def ghost_batch_norm_backward(dy: FloatArray, x: FloatArray, gamma: OptionalArray,
                              mean: FloatArray, invstd: FloatArray, *,
                              beta: OptionalArray = None, activation: Activation = None,
                              negative_slope: float = 0.01, channel_axis: int = 1,
                              out: FloatArray | None = None,
                              num_threads: int | None = None) -> Triple:
    """Gradients of Ghost Batch Normalization: the training backward per virtual batch.

    Each group of ``N / groups`` consecutive samples (groups =
    ``mean.shape[0]``) takes the backward of :func:`fastbn.batch_norm_backward`
    with its own mean and invstd; dgamma and dbeta are the sums over the
    groups (in float64, rounded once), in one call.

    Parameters
    ----------
    dy, x, gamma
        As in :func:`fastbn.batch_norm_backward`.
    mean, invstd : ndarray, shape (groups, C), x's parameter dtype
        As :func:`ghost_batch_norm_forward` returned them.
    beta, activation, negative_slope, channel_axis, out, num_threads
        As in :func:`fastbn.batch_norm_backward`.

    Returns
    -------
    dx : ndarray, shape and dtype of x (``out`` when given)
    dgamma, dbeta : ndarray, shape (C,), x's parameter dtype

    Raises
    ------
    TypeError
        As :func:`fastbn.batch_norm_backward`.
    ValueError
        As :func:`fastbn.batch_norm_backward`; mean and invstd not (groups,
        C) alike, or groups that do not divide N.
    """
    return _backward(dy, x, gamma, (mean, invstd), True, beta, activation, negative_slope,
                     channel_axis, out, num_threads)
