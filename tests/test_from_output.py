"""The backward from the output: ``batch_norm_backward_from_output(dy, y, gamma,
beta, invstd, *, activation=, negative_slope=)`` (In-Place Activated
BatchNorm, Rota Bulo, Porzi & Kontschieder, CVPR 2018).

The activation is inverted (``z = y`` where y > 0, else ``y / negative_slope``),
``xhat = (z - beta) / gamma``, ``dz = dy`` where y > 0, else ``dy *
negative_slope``, then the training backward. Checked on every kernel schedule,
both dtypes, with ``out=``, in place over dy and over y, 1 and 2 threads:

- against the oracle on the same y, against the backward from x
  (``batch_norm_backward(dy, x, ..., beta=, activation=)``, fastbn's and the
  oracle's) and against the unfused composition, on well-conditioned data;
- against PyTorch's autograd and against finite differences of the forward;
- the same bits for any thread count; gamma or beta None; non-contiguous
  inputs; inputs left unchanged;
- the accuracy as |gamma| shrinks: the error grows like |beta| / |gamma|, within
  a bound computed from the unit round-off (the functions' docstring);
- refused: relu, a slope <= 0, a zero in gamma (the message names the
  channels; nothing the caller passed changes); not refused: invstd 0, < 0 or
  inf (not checked specially).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import (DTYPES, SCHEDULE_LAYOUTS, STRIDED_LAYOUTS, THREADS, activated_case,
                     assert_bitwise_equal, assert_close, assert_grads_close, assert_unchanged,
                     away_from_the_kink, dtype_id, dx_scale, layout_id, make_inputs,
                     numeric_gradient, per_channel, snapshot, strided_vector)

import fastbn
from fastbn import reference

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

layouts = pytest.mark.parametrize("shape, channel_axis", [pytest.param(s, ca, id=layout_id(s, ca))
                                                         for s, ca in SCHEDULE_LAYOUTS])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
INVERTIBLE = [(None, 0.01), ("leaky_relu", 0.01), ("leaky_relu", 0.2)]
invertible = pytest.mark.parametrize("activation, slope", INVERTIBLE,
                                     ids=[f"{a}-{s}" for a, s in INVERTIBLE])


def from_output(a, channel_axis, activation, slope, **kw):
    return fastbn.batch_norm_backward_from_output(a.dy, a.y, a.gamma, a.beta, a.invstd,
                                                  activation=activation, negative_slope=slope,
                                                  channel_axis=channel_axis, **kw)


def from_x(impl, a, channel_axis, activation, slope):
    return impl.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd, beta=a.beta,
                                    activation=activation, negative_slope=slope,
                                    channel_axis=channel_axis)


# ------------------------------------------------------------ the results ----

@layouts
@dtypes
@invertible
@pytest.mark.parametrize("out_mode", ["new", "out", "out=dy", "out=y"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_equals_the_oracle_the_backward_from_x_and_the_unfused_composition(
        shape, channel_axis, dtype, activation, slope, out_mode, num_threads):
    a = activated_case(shape, dtype, channel_axis, activation, slope)
    oracle = reference.batch_norm_backward_from_output(
        a.dy, a.y, a.gamma, a.beta, a.invstd, activation=activation, negative_slope=slope,
        channel_axis=channel_axis)
    oracle_from_x = from_x(reference, a, channel_axis, activation, slope)
    fastbn_from_x = from_x(fastbn, a, channel_axis, activation, slope)
    dz = a.dy.astype(np.float64)
    if activation is not None:
        dz = np.where(a.y > 0, dz, slope * dz)
    unfused = reference.batch_norm_backward(dz, a.x, a.gamma, a.mean, a.invstd,
                                            channel_axis=channel_axis)
    dy_before = a.dy.copy()
    a.dy, a.y = a.dy.copy(), a.y.copy()
    out = {"new": None, "out": np.empty_like(a.dy), "out=dy": a.dy, "out=y": a.y}[out_mode]
    snap = snapshot(**{k: v for k, v in dict(dy=a.dy, y=a.y, gamma=a.gamma, beta=a.beta,
                                             invstd=a.invstd, x=a.x).items() if v is not out})

    got = from_output(a, channel_axis, activation, slope, out=out, num_threads=num_threads)

    assert_unchanged(snap)
    if out is not None:
        assert got[0] is out
    assert got[0].shape == shape and got[0].dtype == dtype
    assert got[1].shape == got[2].shape == (a.C,) and got[1].dtype == got[2].dtype == dtype
    for want, what in ((oracle, "oracle"), (oracle_from_x, "the oracle from x"),
                       (fastbn_from_x, "fastbn from x"), (unfused, "unfused from x")):
        assert_grads_close(got, want, dtype, dy_before, a.gamma, a.invstd, f"({what})")


@layouts
@pytest.mark.parametrize("activation, slope", [(None, 0.01), ("leaky_relu", 0.1)])
def test_same_bits_for_any_thread_count(shape, channel_axis, activation, slope):
    a = activated_case(shape, np.float32, channel_axis, activation, slope)
    results = [from_output(a, channel_axis, activation, slope, num_threads=n) for n in THREADS]
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert_bitwise_equal(got, want)


@pytest.mark.parametrize("shape, channel_axis", [((4, 3, 5, 7), 1), ((40, 3), 1),
                                                 ((4, 5, 3), -1)])
@pytest.mark.parametrize("activation, slope", [(None, 0.01), ("leaky_relu", 0.2)])
@pytest.mark.parametrize("affine", ["none", "gamma", "beta"])
def test_gamma_or_beta_none_mean_one_and_zero(shape, channel_axis, activation, slope, affine):
    a = make_inputs(shape, np.float64, channel_axis)
    gamma = a.gamma if affine == "gamma" else None
    beta = a.beta if affine == "beta" else None
    y, _, invstd = fastbn.batch_norm_forward(a.x, gamma, beta, activation=activation,
                                             negative_slope=slope, channel_axis=channel_axis)
    got = fastbn.batch_norm_backward_from_output(a.dy, y, gamma, beta, invstd,
                                                 activation=activation, negative_slope=slope,
                                                 channel_axis=channel_axis)
    want = fastbn.batch_norm_backward_from_output(
        a.dy, y, np.ones(a.C) if gamma is None else gamma,
        np.zeros(a.C) if beta is None else beta, invstd, activation=activation,
        negative_slope=slope, channel_axis=channel_axis)
    oracle = reference.batch_norm_backward_from_output(a.dy, y, gamma, beta, invstd,
                                                       activation=activation,
                                                       negative_slope=slope,
                                                       channel_axis=channel_axis)
    assert_grads_close(got, want, np.float64, a.dy, gamma, invstd, "(explicit 1 and 0)")
    assert_grads_close(got, oracle, np.float64, a.dy, gamma, invstd, "(oracle)")


@pytest.mark.parametrize("layout", list(STRIDED_LAYOUTS))
@pytest.mark.parametrize("shape, channel_axis", [((4, 3, 5, 7), 1), ((4, 5, 7, 3), -1),
                                                 ((9, 3), 1)])
def test_non_contiguous_inputs(layout, shape, channel_axis):
    """Non-contiguous dy, y and per-channel arrays: the oracle's results, inputs unchanged."""
    a = activated_case(shape, np.float64, channel_axis, "leaky_relu", 0.1)
    expected = reference.batch_norm_backward_from_output(
        a.dy, a.y, a.gamma, a.beta, a.invstd, activation="leaky_relu", negative_slope=0.1,
        channel_axis=channel_axis)
    args = {"dy": a.dy, "y": a.y, "gamma": a.gamma, "beta": a.beta, "invstd": a.invstd}
    args = {k: STRIDED_LAYOUTS[layout](v) if v.ndim > 1 else strided_vector(v)
            for k, v in args.items()}
    assert not any(v.flags.c_contiguous for v in args.values())
    snap = snapshot(**args)
    got = fastbn.batch_norm_backward_from_output(
        args["dy"], args["y"], args["gamma"], args["beta"], args["invstd"],
        activation="leaky_relu", negative_slope=0.1, channel_axis=channel_axis, num_threads=2)
    assert_unchanged(snap)
    assert_grads_close(got, expected, np.float64, a.dy, a.gamma, a.invstd)


# ---------------------------------------------- PyTorch, finite differences ----

@dtypes
@pytest.mark.parametrize("activation, slope", [(None, 0.01), ("leaky_relu", 0.1)])
@pytest.mark.parametrize("shape, channel_axis", [((8, 4, 6, 5), 1), ((64, 5), 1),
                                                 ((6, 5, 4, 3), -1)])
def test_matches_pytorch_autograd(dtype, activation, slope, shape, channel_axis):
    """The gradients of torch's training-mode batch_norm (then leaky_relu), from
    fastbn's y alone."""
    torch = pytest.importorskip("torch")
    a = activated_case(shape, dtype, channel_axis, activation, slope)
    to_torch = (lambda v: torch.tensor(np.moveaxis(v, -1, 1))) if channel_axis == -1 \
        else torch.tensor
    x = to_torch(a.x).requires_grad_(True)
    weight = torch.tensor(a.gamma, requires_grad=True)
    bias = torch.tensor(a.beta, requires_grad=True)
    y = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    if activation is not None:
        y = torch.nn.functional.leaky_relu(y, slope)
    y.backward(to_torch(a.dy))
    theirs_dx = x.grad.numpy()
    if channel_axis == -1:
        theirs_dx = np.moveaxis(theirs_dx, 1, -1)

    ours = from_output(a, channel_axis, activation, slope)

    assert_grads_close(ours, (theirs_dx, weight.grad.numpy(), bias.grad.numpy()), dtype,
                       a.dy, a.gamma, a.invstd, "(PyTorch)")


@pytest.mark.parametrize("shape, channel_axis", [((4, 3), 1), ((3, 2, 5), 1), ((3, 5, 2), -1),
                                                 ((2, 2, 3, 3), 1)])
@pytest.mark.parametrize("activation, slope", [(None, 0.01), ("leaky_relu", 0.2)])
def test_matches_finite_differences(shape, channel_axis, activation, slope, rng):
    """dx, dgamma, dbeta from y alone are the numeric gradients of sum(y * w)."""
    a = make_inputs(shape, np.float64, channel_axis, rng)
    away_from_the_kink(a, channel_axis, margin=1e-3)
    x, gamma, beta, w = a.x.copy(), a.gamma.copy(), a.beta.copy(), a.dy

    def loss():
        y = fastbn.batch_norm_forward(x, gamma, beta, activation=activation,
                                      negative_slope=slope, channel_axis=channel_axis)[0]
        return float(np.sum(y * w))

    y, _, invstd = fastbn.batch_norm_forward(x, gamma, beta, activation=activation,
                                             negative_slope=slope, channel_axis=channel_axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward_from_output(
        w, y, gamma, beta, invstd, activation=activation, negative_slope=slope,
        channel_axis=channel_axis)
    for got, wrt, name in ((dx, x, "dx"), (dgamma, gamma, "dgamma"), (dbeta, beta, "dbeta")):
        np.testing.assert_allclose(got, numeric_gradient(loss, wrt), rtol=1e-6, atol=1e-7,
                                   err_msg=name)


# --------------------------------------------------- accuracy and |gamma| ----

@dtypes
@pytest.mark.parametrize("beta_value", [1.0, 0.0])
def test_error_grows_like_beta_over_gamma(dtype, beta_value):
    """The README's accuracy note. Every channel holds the same x and dy; gamma
    falls from 1 to 1e-4 (signs alternating), beta is 1 or 0. y carries the
    forward's rounding, about u*|z| (u the unit round-off), which the inversion
    turns into an error of xhat of about u*(|z| + |beta|)/|gamma|: the errors
    of dgamma and of dx (relative to the size of its terms) stay within a bound
    computed from it. With beta 1 the bound grows like 1/|gamma| and the
    measured error does grow; with beta 0 (|z|/|gamma| = |xhat|) neither does."""
    u = np.finfo(dtype).eps
    rng = np.random.default_rng(11)
    gammas = np.array([1.0, -1e-1, 1e-2, -1e-3, 1e-4])
    C, m = gammas.size, 64 * 16
    x = np.repeat(1.5 + rng.standard_normal((64, 1, 16)), C, axis=1).astype(dtype)
    dy = np.repeat(rng.standard_normal((64, 1, 16)), C, axis=1).astype(dtype)
    gamma, beta = gammas.astype(dtype), np.full(C, beta_value, dtype)
    slope = 0.1
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, activation="leaky_relu",
                                                negative_slope=slope)
    got = fastbn.batch_norm_backward_from_output(dy, y, gamma, beta, invstd,
                                                 activation="leaky_relu", negative_slope=slope)
    exact = reference.batch_norm_backward(dy, x, gamma, mean, invstd, beta=beta,
                                          activation="leaky_relu", negative_slope=slope)

    axes = (0, 2)
    g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
    xhat = (x - mean[:, None].astype(np.float64)) * invstd[:, None]
    z = g64[:, None] * xhat + b64[:, None]
    dz = np.where(z > 0, dy, slope * dy.astype(np.float64))
    assert (z > 0).any() and (z < 0).any()
    # error of xhat: y's rounding and the inversion's, divided by |gamma|, plus
    # the difference between the forward's statistics and their rounding
    dxhat = 4 * u * ((np.abs(z).max(axis=axes) + np.abs(b64)) / np.abs(g64)
                     + np.abs(xhat).max(axis=axes) + np.abs(mean * invstd.astype(np.float64)))
    dgamma_bound = (np.abs(dz).sum(axis=axes) * dxhat
                    + 4 * u * np.abs(dz * xhat).sum(axis=axes))
    dgamma_err = np.abs(got[1] - exact[1].astype(np.float64))
    assert (dgamma_err <= dgamma_bound).all(), (dgamma_err, dgamma_bound)

    terms = np.abs(g64 * invstd) * np.abs(dz).max(axis=axes)        # the size of dx's terms
    dx_bound = (np.abs(g64 * invstd) / m * (dxhat * np.abs(exact[1])
                                          + np.abs(xhat).max(axis=axes) * dgamma_bound)
                + 4 * u * terms * (2 + np.abs(xhat).max(axis=axes) ** 2))
    dx_err = np.abs(got[0] - exact[0].astype(np.float64)).max(axis=axes)
    assert (dx_err <= dx_bound).all(), (dx_err, dx_bound)
    assert_close(got[2], exact[2], dtype)                    # dbeta: no division by gamma

    if beta_value == 0:
        # no growth: the bound is that of gamma = 1, and so is the error at gamma = 1e-4
        for bound in (dgamma_bound, dx_bound / terms):
            assert (np.abs(bound / bound[0] - 1) < 0.5).all(), bound
        assert dgamma_err[-1] <= dgamma_bound[0]
        assert dx_err[-1] / terms[-1] <= dx_bound[0] / terms[0]
        return
    # the bound scales like 1/|gamma| (relative to dx's terms for dx) ...
    for bound in (dgamma_bound, dx_bound / terms):
        ratio = bound[1:] / bound[:-1]
        assert (ratio > 1).all() and (ratio[-2:] > 5).all() and (ratio < 20).all(), ratio
    # ... and the error does grow (gamma 10**4 smaller; the measured errors are
    # random sums, far below the worst-case bound): dgamma's by 100x or more,
    # dx's relative error by 10x or more, above the round-off of gamma = 1
    assert dgamma_err[-1] > 100 * max(dgamma_err[0], u * np.abs(exact[1][0])), dgamma_err
    assert dx_err[-1] / terms[-1] > 10 * max(dx_err[0] / terms[0], u), dx_err / terms


def test_well_conditioned_float32_matches_the_backward_from_x_to_1e_6():
    """The README's and the docstring's claim: gamma and beta of order 1,
    float32: about 1e-6 relative to the backward from x (held here at 2e-6)."""
    a = activated_case((16, 8, 12, 12), np.float32, 1, "leaky_relu", 0.1)
    got = from_output(a, 1, "leaky_relu", 0.1)
    want = from_x(reference, a, 1, "leaky_relu", 0.1)
    assert_close(got[0], want[0], rtol=2e-6, scale=dx_scale(a.dy, a.gamma, a.invstd))
    assert_close(got[1], want[1], rtol=2e-6)
    assert_close(got[2], want[2], rtol=2e-6)


# --------------------------------------------------------------- refused ----

def refused_case(out_mode):
    a = activated_case((4, 7, 3, 2), np.float32, 1, "leaky_relu", 0.1)
    a.out = {"new": None, "out": np.zeros_like(a.y), "out=dy": a.dy, "out=y": a.y}[out_mode]
    return a


def call_refused(a, **kw):
    args = dict(activation="leaky_relu", negative_slope=0.1, out=a.out)
    args.update(kw)
    snap = snapshot(dy=a.dy, y=a.y, gamma=a.gamma, beta=a.beta, invstd=a.invstd,
                    **({} if a.out is None else {"out": a.out}))
    with pytest.raises(ValueError) as info:
        fastbn.batch_norm_backward_from_output(a.dy, a.y, a.gamma, a.beta, a.invstd, **args)
    assert_unchanged(snap)
    with pytest.raises(ValueError) as oracle_info:
        reference.batch_norm_backward_from_output(a.dy, a.y, a.gamma, a.beta, a.invstd, **args)
    assert str(oracle_info.value) == str(info.value)
    return str(info.value)


OUT_MODES = ["new", "out", "out=dy", "out=y"]


@pytest.mark.parametrize("zeros", [[5], [3, 6], [0, 1, 2, 3, 4, 5, 6]], ids=str)
@pytest.mark.parametrize("negative", [False, True], ids=["0", "-0"])
@pytest.mark.parametrize("out_mode", OUT_MODES)
def test_a_zero_in_gamma_is_refused_and_named(zeros, negative, out_mode):
    a = refused_case(out_mode)
    a.gamma[zeros] = -0.0 if negative else 0.0
    message = call_refused(a)
    named = {int(n) for n in re.findall(r"\d+", message.split("channel", 1)[1].split(":")[0])}
    assert named == set(zeros), message
    assert "batch_norm_backward" in message


@pytest.mark.parametrize("out_mode", OUT_MODES)
def test_relu_is_refused(out_mode):
    message = call_refused(refused_case(out_mode), activation="relu")
    assert "relu" in message and "leaky_relu" in message and "> 0" in message
    assert "batch_norm_backward with x" in message


@pytest.mark.parametrize("slope", [0.0, -0.0, -0.1, -1e-300])
@pytest.mark.parametrize("out_mode", ["new", "out=y"])
def test_a_slope_that_is_not_positive_is_refused(slope, out_mode):
    message = call_refused(refused_case(out_mode), negative_slope=slope)
    assert message.startswith("negative_slope must be > 0"), message


@pytest.mark.parametrize("invstd", [[-1.3, 2.0, -0.5], [0.0, -1.3, np.inf]],
                         ids=["negative", "zero-inf"])
def test_invstd_is_not_checked_specially(invstd):
    """invstd 0, negative or inf is the caller's business: no error. dgamma
    and dbeta do not use invstd and are the oracle's; dx scales with it: the
    oracle's where invstd is finite (0, or a flipped sign), no finite value
    where it is inf (inf * 0 is NaN in the fused map where the oracle's
    factored form gives inf)."""
    a = activated_case((6, 3, 4, 5), np.float64, 1, "leaky_relu", 0.1)
    invstd = np.array(invstd)
    kw = dict(activation="leaky_relu", negative_slope=0.1)
    with np.errstate(all="ignore"):
        got = fastbn.batch_norm_backward_from_output(a.dy, a.y, a.gamma, a.beta, invstd, **kw)
        want = reference.batch_norm_backward_from_output(a.dy, a.y, a.gamma, a.beta, invstd,
                                                         **kw)
    finite = np.isfinite(invstd)
    assert_close(got[0][:, finite], want[0][:, finite], np.float64, rtol=1e-9, err_msg="dx")
    assert not np.isfinite(got[0][:, ~finite]).any()
    for ours, theirs, name in zip(got[1:], want[1:], ("dgamma", "dbeta")):
        assert_close(ours, theirs, np.float64, rtol=1e-9, err_msg=name)


def test_a_negative_invstd_gives_the_formula():
    a = activated_case((6, 3, 4, 5), np.float64, 1, "leaky_relu", 0.1)
    invstd = np.array([-1.3, 2.0, -0.5])
    got = fastbn.batch_norm_backward_from_output(a.dy, a.y, a.gamma, a.beta, invstd,
                                                 activation="leaky_relu", negative_slope=0.1)
    want = reference.batch_norm_backward_from_output(a.dy, a.y, a.gamma, a.beta, invstd,
                                                     activation="leaky_relu",
                                                     negative_slope=0.1)
    assert_grads_close(got, want, np.float64, a.dy, a.gamma, invstd)


def test_invstd_zero_or_inf_gives_the_formula():
    """dgamma and dbeta do not use invstd (the oracle's exactly); dx is gamma *
    invstd times a finite sum: 0 where invstd is 0."""
    a = activated_case((6, 3, 4, 5), np.float64, 1, "leaky_relu", 0.1)
    invstd = np.array([0.0, 1.0, np.inf])
    dx, dgamma, dbeta = fastbn.batch_norm_backward_from_output(
        a.dy, a.y, a.gamma, a.beta, invstd, activation="leaky_relu", negative_slope=0.1)
    rdx, rdgamma, rdbeta = reference.batch_norm_backward_from_output(
        a.dy, a.y, a.gamma, a.beta, invstd, activation="leaky_relu", negative_slope=0.1)
    assert_close(dbeta, rdbeta, np.float64)
    assert_close(dgamma, rdgamma, np.float64)
    assert (dx[:, 0] == 0).all()
    assert_close(dx[:, 1], rdx[:, 1], np.float64)


def test_the_activation_matters():
    """Control: the same y read as leaky_relu output or as plain output gives
    other gradients (the comparisons above would not see an ignored activation)."""
    a = activated_case((4, 3, 5, 7), np.float64, 1, "leaky_relu", 0.2)
    assert 0.2 < (a.y > 0).mean() < 0.8
    leaky = from_output(a, 1, "leaky_relu", 0.2)
    plain = from_output(a, 1, None, 0.2)
    other_slope = from_output(a, 1, "leaky_relu", 0.3)
    for other in (plain, other_slope):
        assert not np.allclose(leaky[0], other[0])
        assert not np.allclose(leaky[1], other[1])
    z = per_channel(a.gamma, 4, 1) * (a.x - per_channel(a.mean, 4, 1)) \
        * per_channel(a.invstd, 4, 1) + per_channel(a.beta, 4, 1)
    assert_close(np.where(a.y > 0, a.y, a.y / 0.2), z, np.float64)


@pytest.mark.parametrize("shape, channel_axis", [((4, 3, 5, 7), 1), ((40, 3), 1),
                                                 ((4, 5, 3), -1)])
def test_nan_in_y_stays_in_its_channel(shape, channel_axis):
    """A NaN in y spoils its channel's dgamma and dx (xhat is NaN there), not the
    other channels: their bits are those of the clean call."""
    a = activated_case(shape, np.float32, channel_axis, "leaky_relu", 0.1)
    clean = from_output(a, channel_axis, "leaky_relu", 0.1)
    y = a.y.copy()
    y[tuple(1 if axis == channel_axis % y.ndim else n // 2
            for axis, n in enumerate(y.shape))] = np.nan
    a.y = y
    dirty = from_output(a, channel_axis, "leaky_relu", 0.1)
    assert np.isnan(dirty[1][1]) and np.isnan(np.moveaxis(dirty[0], channel_axis, 0)[1]).all()
    for got, want, axis in zip(dirty, clean, (channel_axis, 0, 0)):
        for c in (0, 2):
            assert_bitwise_equal(np.take(got, c, axis=axis), np.take(want, c, axis=axis))


@pytest.mark.parametrize("shape, channel_axis", [((4, 3, 5, 7), 1), ((4099, 40), 1),
                                                 ((2, 3, 5, 2, 3), -1)])
def test_one_buffer_for_x_y_and_dx(shape, channel_axis):
    """The README's memory pattern: the forward writes y over x (out=x) and the
    backward writes dx over y (out=y); the bits of separate buffers."""
    a = make_inputs(shape, np.float32, channel_axis)
    y, _, invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, activation="leaky_relu",
                                             channel_axis=channel_axis)
    want = fastbn.batch_norm_backward_from_output(a.dy, y, a.gamma, a.beta, invstd,
                                                  activation="leaky_relu",
                                                  channel_axis=channel_axis)
    buffer = a.x.copy()
    y_inplace, _, _ = fastbn.batch_norm_forward(buffer, a.gamma, a.beta, activation="leaky_relu",
                                                channel_axis=channel_axis, out=buffer)
    got = fastbn.batch_norm_backward_from_output(a.dy, y_inplace, a.gamma, a.beta, invstd,
                                                 activation="leaky_relu",
                                                 channel_axis=channel_axis, out=y_inplace)
    assert y_inplace is buffer and got[0] is buffer
    for g, w in zip(got, want):
        assert_bitwise_equal(g, w)
