"""The synchronized passes: Batch Normalization over the global batch of all ranks.

Each pass of fastbn's kernels is split at its reduction:

forward
    local per-channel shifted sums (``sums`` of the kernel modules, float64)
    -> the local (count, mean, biased variance) -> **one** reduction that
    merges them exactly (:func:`merge_records`) -> the affine maps ->
    ``apply`` normalizes the local slice;
backward
    local ``(sum dy, sum dy * (x - mean))`` -> **one** reduction (a sum) ->
    dgamma, dbeta and the maps that give dx -> ``apply``.

The arguments are checked by :mod:`fastbn._checks`, the local sums and the
full-size passes run in the dispatched kernel modules, and each channel is
finished by :mod:`fastbn._channels`, the functions the fused kernels
inline: nothing is computed here but the choice of what to call.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fastbn import _arguments, _channels, _checks, _dispatch, _dtypes, _front, _running
from fastbn.distributed._protocol import Collective
from fastbn.distributed._records import TAG_STATS, TAG_SUM
from fastbn._typing import Activation, Allreduce, Counter, FloatArray, OptionalArray, Triple

__all__ = ["sync_batch_norm_backward", "sync_batch_norm_backward_from_output",
           "sync_batch_norm_forward"]

# what a backward's second input is (the kernels' codes, fastbn/_call.pxd)
_GRAD_PLAIN, _GRAD_ACT, _GRAD_OUTPUT = (_front.GRADIENTS[k] for k in ("plain", "activated",
                                                                      "output"))

_SAME = " (the same on every rank)"
_ANY = (2, 3, 4, 5)
_ANY_INPUT = "2-D to 5-D input (N, C, ...)"


def _check_allreduce(allreduce: Any) -> None:
    if not callable(allreduce):
        raise TypeError(f"allreduce must be callable (e.g. fastbn.distributed.mpi_allreduce("
                        f"comm)), got {type(allreduce).__name__}")


def _view(x: NDArray[Any], ca: int) -> tuple[ModuleType, NDArray[Any], NDArray[Any], int]:
    """(kernel module, C-contiguous x, its kernel view, values per channel)."""
    xc = np.ascontiguousarray(x)
    kernel, view = _dispatch.kernel_for(x.shape, ca)
    xv = xc.reshape(view)
    return kernel, xc, xv, xc.size // x.shape[ca]


def _collective(who: str, allreduce: Allreduce, C: int, dtype: np.dtype[Any] | None,
                expected: str) -> Collective:
    """The pass's records and failure protocol (dtype None: any data dtype)."""
    return Collective(who, allreduce, C, _dtypes.DATA_NAMES if dtype is None else str(dtype),
                      expected)


def _first_values(xv: NDArray[Any]) -> NDArray[np.float64]:
    """Per channel, its first value: the shift of the kernels' sums of x."""
    return np.ascontiguousarray(xv[0, :, 0] if xv.ndim == 3 else xv[0, :], dtype=np.float64)


# ------------------------------------------------------------ forward ----

def forward(x: Any, gamma: Any, beta: Any, *, allreduce: Allreduce, num_features: int,
            eps: Any, running_mean: Any, running_var: Any, momentum: Any,
            num_batches_tracked: Any, channel_axis: Any, out: Any, num_threads: Any,
            unbiased: Any = True, activation: Any = None, negative_slope: Any = 0.01,
            dtype: np.dtype[Any] | None = None, ndims: tuple[int, ...] = _ANY,
            expected: str = _ANY_INPUT, who: str = "sync_batch_norm_forward",
            renorm: tuple[float, float, float] | None = None) -> Any:
    """:func:`sync_batch_norm_forward` after its own checks; a layer passes its
    dtype, the input it accepts and its name (``who``), and with ``renorm``
    (rmax, rmin, dmax, checked) Batch Renormalization over the global batch:
    (y, mean, invstd, r, d), r and d from the global statistics and the
    running ones (fastbn.variants.batch_renorm_forward)."""
    C = num_features
    call = _collective(who, allreduce, C, dtype, expected)
    try:
        ca = _checks.layer_input(x, who=who, num_features=C, channel_axis=channel_axis,
                                 dtype=dtype, ndims=ndims, expected=expected)
        eps, momentum, nthreads, g, b, rm, rv = _arguments.forward_args(
            x, C, gamma, beta, eps, momentum, num_threads, running_mean, running_var,
            num_batches_tracked, out)
        unbiased = _checks.flag(unbiased, "unbiased")
        act, slope = _checks.activation(activation, negative_slope)
        tracking = rm is not None
        factor = _running.factor(momentum, num_batches_tracked) if tracking else -1.0
        call.settings(x.dtype, eps, factor, unbiased, act, slope)
        kernel, xc, xv, n = _view(x, ca)
        body = call.body
        body[:, 0] = TAG_STATS
        if n:  # local statistics as the fused kernel finishes them
            sums = np.empty((C, 2))
            kernel.sums(xv, None, sums, nthreads)   # around each channel's first value
            body[:, 1] = n
            _channels.moments(sums, _first_values(xv), n, body[:, 2:4])
    except BaseException as exc:  # noqa: BLE001 - told to every rank, raised after the collective
        call.fail(exc, (TAG_STATS, 0.0, 0.0, 0.0))
    call.reduce(TAG_STATS)
    body = call.body

    m = body[0, 1]
    if m <= 1:
        where = f" on rank {call.rank}" if call.rank is not None else ""
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {x.shape}{where} and {int(m)} value(s) per channel over all "
                         f"ranks")
    p = _dtypes.parameters(x.dtype)
    mean = np.empty(C, p)
    invstd = np.empty(C, p)
    coef = np.empty((C, 4))
    rd = (np.empty(C, p), np.empty(C, p)) if renorm else ()
    with np.errstate(all="ignore"):
        _channels.forward_map(body[:, 2:4], m, eps, mean, invstd, g, b, rm, rv,
                              factor if tracking else 0.0, unbiased, coef, *rd, *(renorm or ()))
    y = np.empty_like(xc, order="C") if out is None else out
    if n:
        kernel.apply(xv, None, y.reshape(xv.shape), coef, act, slope, nthreads, out is not None)
    if tracking:
        _running.commit(running_mean, rm, running_var, rv, num_batches_tracked)
    return (y, mean, invstd, *rd)


def sync_batch_norm_forward(x: FloatArray, gamma: OptionalArray, beta: OptionalArray, *,
                            allreduce: Allreduce, num_features: int, eps: float = 1e-5,
                            running_mean: OptionalArray = None,
                            running_var: OptionalArray = None, momentum: float | None = 0.1,
                            num_batches_tracked: Counter = None, unbiased: bool = True,
                            activation: Activation = None, negative_slope: float = 0.01,
                            channel_axis: int = 1, out: FloatArray | None = None,
                            num_threads: int | None = None) -> Triple:
    """Training-mode Batch Normalization with the statistics of the global batch.

    Every process (rank) passes its own slice ``x`` of the global batch;
    each channel is normalized with the mean and biased variance over the
    m values of that channel on all ranks together::

        mean[c]   = sum over ranks and values of x / m
        var[c]    = sum over ranks and values of (x - mean[c])**2 / m
        invstd[c] = 1 / sqrt(var[c] + eps)
        y         = (x - mean[c]) * invstd[c] * gamma[c] + beta[c]

    The local sums run in the kernels of :func:`fastbn.batch_norm_forward`
    (float64, shifted by a value of the channel); the per-rank (count, mean,
    variance) are merged exactly by ``allreduce`` (one call, see
    :func:`merge_records`), so unequal local batch sizes, and ranks with an
    empty slice, are exact. On one rank the result is that of
    :func:`fastbn.batch_norm_forward` to the bit, with every kernel level:
    the local sums are the fused kernel's, and each channel is finished by
    the same compiled functions (:mod:`fastbn._channels`).

    Every rank must make this call together. A rank whose arguments fail
    the checks (or that is interrupted while checking them) still takes
    part in the reduction, then every rank raises. The ranks must agree on
    the dtype, ``num_features``, ``eps``, the running statistics'
    weight (momentum, or the count for ``momentum=None``), ``unbiased``,
    ``activation`` and ``negative_slope``; the reduction carries them, and
    every rank raises when they differ.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16
        This rank's slice: (N, C), (N, C, L), (N, C, H, W) or
        (N, C, D, H, W) with ``channel_axis=1``, channels last with
        ``channel_axis=-1``. N (or any axis but the channels) may be 0. The
        same dtype on every rank.
    gamma, beta : ndarray, shape (C,), x's parameter dtype, or None
        Scale and shift; None means 1 and 0. The same on every rank.
    allreduce : callable
        ``allreduce(records)`` with ``records`` a C-contiguous float64 array
        of shape ``(10 + C, 4)``: replaces it in place (or returns an array
        of that shape) with the combination of every rank's array under
        :func:`merge_records`, the same bits on every rank.
        ``mpi_allreduce(comm)`` is that for an mpi4py communicator. Its
        attributes ``rank`` and ``size``, when it has them, name the ranks
        in error messages.
    num_features : int
        C, the same on every rank: it sizes the reduction buffer, so that a
        rank whose x has another channel count still joins the reduction.
    eps : float, default 1e-5
    running_mean, running_var : ndarray, shape (C,), x's parameter dtype, or None
        Updated in place as in :func:`fastbn.batch_norm_forward`, with the
        global statistics and the unbiased variance ``var * m / (m - 1)``;
        given identical on every rank, they stay identical to the bit.
    momentum : float in [0, 1] or None, default 0.1
    num_batches_tracked : ndarray holding one integer, or None
    unbiased : bool, default True
        As in :func:`fastbn.batch_norm_forward`; the same on every rank.
    activation : {None, "relu", "leaky_relu"}, default None
    negative_slope : float, default 0.01
        The activation fused into y, as in :func:`fastbn.batch_norm_forward`;
        the same on every rank: the reduction carries them (the slope only
        with "leaky_relu"), and every rank raises when they differ.
    channel_axis : {1, -1}, default 1
    out : ndarray or None
        As in :func:`fastbn.batch_norm_forward`; ``out=x`` works in place.
    num_threads : int > 0 or None
        OpenMP threads of this rank's kernels.

    Returns
    -------
    y : ndarray, shape and dtype of x (``out`` when given)
    mean, invstd : ndarray, shape (C,), x's parameter dtype
        The global batch statistics, the same on every rank, for
        :func:`sync_batch_norm_backward`.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.batch_norm_forward`, on every rank when any rank's
        arguments fail (the failing rank raises its own error with its rank
        added; the others name the failing rank(s) and the problem). Also
        ``TypeError`` when the ranks pass different dtypes, ``ValueError``
        when they pass a different ``num_features``, ``eps``, momentum,
        ``unbiased``, ``activation`` or ``negative_slope``, and
        ``ValueError("Expected more than 1 value per channel when training,
        ...")`` when the global batch has at most one value per channel.
    RuntimeError
        The ranks made different collective calls (a forward on some, a
        backward on others).
    """
    _check_allreduce(allreduce)
    result: Triple = forward(
        x, gamma, beta, allreduce=allreduce,
        num_features=_checks.num_features(num_features, note=_SAME), eps=eps,
        running_mean=running_mean, running_var=running_var, momentum=momentum,
        num_batches_tracked=num_batches_tracked, channel_axis=channel_axis, out=out,
        num_threads=num_threads, unbiased=unbiased, activation=activation,
        negative_slope=negative_slope)
    return result


# ----------------------------------------------------------- backward ----

def backward(dy: Any, x: Any, gamma: Any, mean: Any, invstd: Any, *, allreduce: Allreduce,
             num_features: int, channel_axis: Any, out: Any, num_threads: Any,
             beta: Any = None, activation: Any = None, negative_slope: Any = 0.01,
             from_output: bool = False, dtype: np.dtype[Any] | None = None,
             ndims: tuple[int, ...] = _ANY, expected: str = _ANY_INPUT,
             who: str = "sync_batch_norm_backward", r: Any = None, d: Any = None) -> Triple:
    """:func:`sync_batch_norm_backward` after its own checks (see
    :func:`forward`); ``from_output``: x is the forward's output y and mean is
    not used (:func:`sync_batch_norm_backward_from_output`); r and d: the
    backward of Batch Renormalization (a layer's record, as the forward
    returned them)."""
    C = num_features
    call = _collective(who, allreduce, C, dtype, expected)
    try:
        ca = _checks.layer_input(x, who=who, num_features=C, channel_axis=channel_axis,
                                 dtype=dtype, ndims=ndims, expected=expected)
        act, slope = _checks.activation(activation, negative_slope, who=who)
        if from_output:
            nthreads, g, b, istd = _arguments.from_output_args(dy, x, C, gamma, beta, invstd, act,
                                                            slope, out, num_threads, who=who)
            mu = None  # no mean: the second input is xhat itself
            grad = _GRAD_OUTPUT
        else:
            nthreads, g, mu, istd = _arguments.backward_args(
                dy, x, C, gamma, mean, invstd, out, num_threads,
                source="sync_batch_norm_forward", who=who, beta=beta)
            b = None if beta is None else np.ascontiguousarray(beta)
            grad = _GRAD_ACT if act else _GRAD_PLAIN
        transform = (g, b, mu, istd, r, d)  # what grad needs
        call.settings(x.dtype, act=act, slope=slope)
        kernel, xc, xv, n = _view(x, ca)
        dyv = np.ascontiguousarray(dy).reshape(xv.shape)
        body = call.body
        body[:, 0] = TAG_SUM
        body[:, 3] = n
        if n:
            sums = np.empty((C, 2))
            kernel.sums(dyv, xv, sums, nthreads, grad, act, slope, *transform)
            body[:, 1:3] = sums
    except BaseException as exc:  # noqa: BLE001 - told to every rank, raised after the collective
        call.fail(exc, (TAG_SUM, 0.0, 0.0, 0.0))
    call.reduce(TAG_SUM)
    body = call.body

    dgamma = np.empty(C, _dtypes.parameters(x.dtype))
    dbeta = np.empty(C, _dtypes.parameters(x.dtype))
    coef = np.empty((C, 4))
    with np.errstate(all="ignore"):
        _channels.backward_map(body[:, 1:3], body[0, 3], istd, mu, g, dgamma, dbeta, coef, r, d)
    dx = np.empty_like(xc, order="C") if out is None else out
    if n:
        kernel.apply(dyv, xv, dx.reshape(xv.shape), coef, act, slope, nthreads,
                     out is not None, grad, *transform)
    return dx, dgamma, dbeta


def sync_batch_norm_backward(dy: FloatArray, x: FloatArray, gamma: OptionalArray,
                             mean: FloatArray, invstd: FloatArray, *, allreduce: Allreduce,
                             num_features: int, beta: OptionalArray = None,
                             activation: Activation = None, negative_slope: float = 0.01,
                             channel_axis: int = 1, out: FloatArray | None = None,
                             num_threads: int | None = None) -> Triple:
    """Gradients of :func:`sync_batch_norm_forward`, with one reduction.

    With m the global number of values per channel and the global sums of
    every rank's slice (one ``allreduce`` of ``(sum dy, sum dy*(x - mean),
    count)`` per channel)::

        dbeta[c]  = sum(dy)
        dgamma[c] = invstd[c] * sum(dy * (x - mean[c]))
        dx        = gamma*invstd * dy - gamma*invstd**2*dgamma/m * (x - mean)
                    - gamma*invstd*dbeta/m

    which is the single-process :func:`fastbn.batch_norm_backward` on the
    concatenated batch. With an ``activation`` (the forward's), dy is the
    gradient of the activated output and ``dy * act'(z)`` takes its place,
    as in :func:`fastbn.batch_norm_backward`. ``dgamma`` and ``dbeta`` are the gradients of the
    sum over the ranks of the losses whose gradients ``dy`` are: the same on
    every rank and already complete; exclude them from a gradient
    all-reduce (and divide them by the number of ranks if the other
    gradients are averaged rather than summed).

    Parameters
    ----------
    dy : ndarray
        Gradient with respect to this rank's y; shape and dtype of x.
    x : ndarray
        This rank's input of the forward.
    gamma : ndarray, shape (C,), or None
    mean, invstd : ndarray, shape (C,), x's parameter dtype
        As returned by :func:`sync_batch_norm_forward`.
    allreduce : callable
        As in :func:`sync_batch_norm_forward`.
    num_features : int
        C, the same on every rank.
    beta : ndarray, shape (C,), or None
    activation : {None, "relu", "leaky_relu"}, default None
    negative_slope : float, default 0.01
        The forward's shift and fused activation, as in
        :func:`fastbn.batch_norm_backward`; the same on every rank (the
        activation and the slope are compared: every rank raises
        ``ValueError`` when they differ).
    channel_axis : {1, -1}, default 1
    out : ndarray or None
        For dx; ``out=dy`` works in place.
    num_threads : int > 0 or None

    Returns
    -------
    dx : ndarray, shape and dtype of x
    dgamma, dbeta : ndarray, shape (C,), x's parameter dtype
        The same on every rank.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.batch_norm_backward`, on every rank when any
        rank's arguments fail.
    RuntimeError
        The ranks made different collective calls.
    """
    _check_allreduce(allreduce)
    return backward(dy, x, gamma, mean, invstd, allreduce=allreduce,
                    num_features=_checks.num_features(num_features, note=_SAME),
                    channel_axis=channel_axis, out=out, num_threads=num_threads, beta=beta,
                    activation=activation, negative_slope=negative_slope)


def sync_batch_norm_backward_from_output(dy: FloatArray, y: FloatArray, gamma: OptionalArray,
                                         beta: OptionalArray, invstd: FloatArray, *,
                                         allreduce: Allreduce, num_features: int,
                                         activation: Activation = None,
                                         negative_slope: float = 0.01, channel_axis: int = 1,
                                         out: FloatArray | None = None,
                                         num_threads: int | None = None) -> Triple:
    """Gradients of :func:`sync_batch_norm_forward` from its output y, with one reduction.

    :func:`fastbn.batch_norm_backward_from_output` over the global batch
    (In-Place Activated BatchNorm, Rota Bulò, Porzi & Kontschieder, CVPR
    2018): every rank inverts its own y, ``xhat = (act^-1(y) - beta) /
    gamma``, and the ranks add their ``(sum dz, sum dz * (x - mean),
    count)`` in one ``allreduce``, as :func:`sync_batch_norm_backward` does.

    Parameters
    ----------
    dy : ndarray
        Gradient with respect to this rank's y; shape and dtype of y.
    y : ndarray
        This rank's output of :func:`sync_batch_norm_forward`.
    gamma, beta : ndarray, shape (C,), or None
        The forward's; gamma must have no zero.
    invstd : ndarray, shape (C,), y's parameter dtype
        As returned by :func:`sync_batch_norm_forward`.
    allreduce : callable
        As in :func:`sync_batch_norm_forward`.
    num_features : int
        C, the same on every rank.
    activation : {None, "leaky_relu"}, default None
    negative_slope : float > 0, default 0.01
        The forward's activation, which must be invertible; the same on
        every rank (compared, as in :func:`sync_batch_norm_backward`).
    channel_axis : {1, -1}, default 1
    out : ndarray or None
        For dx; ``out=dy`` or ``out=y`` works in place.
    num_threads : int > 0 or None

    Returns
    -------
    dx : ndarray, shape and dtype of y
    dgamma, dbeta : ndarray, shape (C,), y's parameter dtype
        The same on every rank.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.batch_norm_backward_from_output`, on every rank
        when any rank's arguments fail.
    RuntimeError
        The ranks made different collective calls.
    """
    _check_allreduce(allreduce)
    return backward(dy, y, gamma, None, invstd, allreduce=allreduce,
                    num_features=_checks.num_features(num_features, note=_SAME),
                    channel_axis=channel_axis, out=out, num_threads=num_threads, beta=beta,
                    activation=activation, negative_slope=negative_slope, from_output=True,
                    who="sync_batch_norm_backward_from_output")
