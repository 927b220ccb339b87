"""The argument sets of fastbn's entry points, each checked as a whole.

The checks of single arguments are :mod:`fastbn._checks`' (with its
exception policy and messages); these combine them for one call of a
function or synchronized pass: the order in which the arguments are checked,
what each depends on, and the values the call then runs with. Every check
runs before anything is written, so a call that raises changes nothing.
"""

from __future__ import annotations

from typing import Any

from numpy.typing import NDArray

from fastbn._checks import (ACTIVATIONS, _error, array, axis, counter, disjoint, dtype_of, eps,
                            like, momentum, num_features, out, threads, vector, x,
                            zero_channels)

__all__ = ["backward_args", "fold_args", "forward_args", "from_output_args", "training_state"]


def training_state(x: NDArray[Any], gamma: Any, beta: Any, running_mean: Any, running_var: Any,
                   momentum: float | None, num_batches_tracked: Any, out_: Any,
                   num_features: int, *, who: str | None = None) -> tuple[Any, Any]:
    """The checks of a training forward's state, after x, gamma and beta:
    the running statistics (both or neither), ``num_batches_tracked``, and
    that nothing written in place (they and ``out``) shares memory with
    another argument. Returns the checked running statistics (C-contiguous
    views or copies; :func:`fastbn._running.commit` copies them
    back), or (None, None)."""
    if (running_mean is None) != (running_var is None):
        raise _error(ValueError, who, "running_mean and running_var must be given together, "
                                      "got only " + ("running_mean" if running_var is None
                                                     else "running_var"))
    if num_batches_tracked is not None:
        counter(num_batches_tracked, who=who)
    rm = rv = None
    if running_mean is not None:
        rm = vector("running_mean", running_mean, x.dtype, num_features, writeable=True,
                    who=who)
        rv = vector("running_var", running_var, x.dtype, num_features, writeable=True,
                    who=who)
        disjoint({"running_mean": running_mean, "running_var": running_var},
                 {"x": x, "gamma": gamma, "beta": beta}, who=who)
        if num_batches_tracked is not None:
            disjoint({"num_batches_tracked": num_batches_tracked},
                     {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean,
                      "running_var": running_var}, who=who)
        elif momentum is None:
            raise _error(ValueError, who, "momentum=None (cumulative average) needs "
                                          "num_batches_tracked, got None")
    if out_ is not None:
        out(out_, x, {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean,
                      "running_var": running_var, "num_batches_tracked": num_batches_tracked},
            in_place="x", who=who)
    return rm, rv


def forward_args(x: NDArray[Any], num_features: int, gamma: Any, beta: Any, eps_: Any,
                 momentum_: Any, num_threads_: Any, running_mean: Any, running_var: Any,
                 num_batches_tracked: Any, out_: Any) -> tuple[Any, ...]:
    """The checks of a training forward after x's own (single-process and
    synchronized). Returns (eps, momentum, num_threads resolved, gamma, beta,
    running_mean, running_var), the arrays as C-contiguous views or copies
    (None where not given)."""
    eps_ = eps(eps_)
    momentum_ = momentum(momentum_)
    nthreads = threads(num_threads_)
    g = None if gamma is None else vector("gamma", gamma, x.dtype, num_features)
    b = None if beta is None else vector("beta", beta, x.dtype, num_features)
    rm, rv = training_state(x, gamma, beta, running_mean, running_var, momentum_,
                            num_batches_tracked, out_, num_features)
    return eps_, momentum_, nthreads, g, b, rm, rv


def backward_args(dy: Any, x: NDArray[Any], num_features: int, gamma: Any, mean: Any,
                  invstd: Any, out_: Any, num_threads_: Any, *, source: str,
                  who: str | None = None, beta: Any = None) -> tuple[Any, ...]:
    """The checks of a backward after x's own (single-process and
    synchronized); ``source`` names the forward that gave mean and invstd.
    Returns (num_threads resolved, gamma, mean, invstd) as C-contiguous
    views or copies (beta, when given, is checked too)."""
    like("dy", dy, x, who=who, what="x")
    nthreads = threads(num_threads_)
    g = None if gamma is None else vector("gamma", gamma, x.dtype, num_features)
    if beta is not None:
        vector("beta", beta, x.dtype, num_features)
    if mean is None or invstd is None:
        raise _error(TypeError, who, f"mean and invstd (from {source}) are required, got "
                                     f"None")
    mu = vector("mean", mean, x.dtype, num_features)
    istd = vector("invstd", invstd, x.dtype, num_features)
    if out_ is not None:
        out(out_, x, {"dy": dy, "x": x, "gamma": gamma, "beta": beta, "mean": mean,
                      "invstd": invstd}, in_place="dy")
    return nthreads, g, mu, istd


def from_output_args(dy: Any, y: NDArray[Any], num_features: int, gamma: Any, beta: Any,
                     invstd: Any, act: int, slope: float, out_: Any, num_threads_: Any,
                     *, who: str | None = None) -> tuple[Any, ...]:
    """The checks of a backward from the output after y's own: an invertible
    activation (none, or leaky_relu with a slope > 0) and no channel with
    gamma == 0. Returns (num_threads resolved, gamma, beta, invstd) as
    C-contiguous views or copies."""
    like("dy", dy, y, who=who, what="y", whose="y")
    nthreads = threads(num_threads_)
    if act == ACTIVATIONS["relu"]:
        raise _error(ValueError, who, "activation 'relu' cannot be inverted (every negative "
                                      "pre-activation gives 0): use 'leaky_relu' with a "
                                      "negative_slope > 0, or batch_norm_backward with x")
    if act == ACTIVATIONS["leaky_relu"] and not slope > 0:
        raise _error(ValueError, who, f"negative_slope must be > 0 to invert leaky_relu, got "
                                      f"{slope}")
    g = None if gamma is None else vector("gamma", gamma, y.dtype, num_features, whose="y")
    b = None if beta is None else vector("beta", beta, y.dtype, num_features, whose="y")
    if invstd is None:
        raise _error(TypeError, who, "invstd (from batch_norm_forward) is required, got None")
    istd = vector("invstd", invstd, y.dtype, num_features, whose="y")
    zeros = zero_channels(g)
    if zeros:
        raise _error(ValueError, who, f"gamma is 0 in channel(s) {zeros}: y carries no "
                                      f"information on x there, so the backward from the "
                                      f"output cannot recover it; use batch_norm_backward "
                                      f"with x")
    if out_ is not None:
        out(out_, y, {"dy": dy, "y": y, "gamma": gamma, "beta": beta, "invstd": invstd},
            in_place=("dy", "y"), whose="y")
    return nthreads, g, b, istd


def fold_args(weight: Any, bias: Any, running_mean: Any, running_var: Any, gamma: Any,
              beta: Any, eps_: Any, out_axis: Any, *, num_features: int | None = None,
              who: str | None = None) -> tuple[float, int]:
    """The checks of :func:`fastbn.fold_batch_norm` (and of a layer's
    ``fold_into``, which passes its ``num_features``): weight an ndarray of
    a data dtype (fastbn._dtypes) of 2 or more dimensions, none empty;
    out_axis one of its axes; the per-channel arrays (C,) of data dtypes
    (any mix), C being
    ``weight.shape[out_axis]``, the running statistics required and the rest
    optional. Returns (eps, out_axis as an int in [0, weight.ndim))."""
    array("weight", weight, who=who)
    dtype_of("weight", weight, None, who=who)
    if weight.ndim < 2:
        raise _error(ValueError, who, f"weight must have 2 or more dimensions ((O, I, ...) or "
                                      f"(I, O)), got shape {weight.shape}", "ndim", weight.ndim)
    if 0 in weight.shape:
        raise _error(ValueError, who, f"weight must not have a zero-size axis, got shape "
                                      f"{weight.shape}")
    ax = axis(out_axis, weight.ndim, who=who, name="out_axis", of="weight")
    size = weight.shape[ax]
    if num_features is not None and size != num_features:
        raise _error(ValueError, who, f"weight must have the layer's {num_features} channels "
                                      f"on out_axis {out_axis}, got shape {weight.shape}",
                     "channels", size)
    per = f"channel on out_axis {out_axis} of weight"
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        vector(name, v, None, size, who=who, what="a numpy.ndarray", per=per)
    for name, v in (("bias", bias), ("gamma", gamma), ("beta", beta)):
        if v is not None:
            vector(name, v, None, size, who=who, per=per)
    return eps(eps_, who=who), ax
