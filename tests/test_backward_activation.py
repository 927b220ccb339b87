"""The backward of the fused activation: ``batch_norm_backward(..., beta=,
activation=, negative_slope=)``.

dy is the gradient with respect to the activated output ``act(z)``, ``z =
gamma * xhat + beta``; the backward recomputes z from x and uses ``dz = dy *
act'(z)`` (1 where z > 0, else 0 for ReLU or ``negative_slope``; z = 0 and a
NaN z count as not > 0). Checked on every kernel schedule, both dtypes, with
``out=``, in place and for 1 and 2 threads, in training and frozen mode:

- against the oracle, and against the unfused composition (the plain
  backward fed ``np.where(y > 0, dy, negative_slope * dy)`` from the forward's
  y, as the README told users to do before the fused backward existed);
- against PyTorch's autograd through ``batch_norm`` and ``relu`` /
  ``leaky_relu``, and against finite differences of the fused forward;
- the same bits for any thread count; ``param_grads=False``; activation=None
  ignores beta; non-contiguous inputs; inputs left unchanged.

The inputs are moved clear of the kink (:func:`helpers.away_from_the_kink`):
where z is within rounding of 0, two correct implementations may disagree on
the gradient of that element.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from helpers import (DTYPES, SCHEDULE_LAYOUTS, STRIDED_LAYOUTS, THREADS, activated_case,
                     assert_bitwise_equal, assert_close, assert_grads_close, assert_unchanged,
                     away_from_the_kink, dtype_id, layout_id, make_inputs, numeric_gradient,
                     per_channel, snapshot, strided_vector)

import fastbn
from fastbn import reference

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

layouts = pytest.mark.parametrize("shape, channel_axis", [pytest.param(s, ca, id=layout_id(s, ca))
                                                         for s, ca in SCHEDULE_LAYOUTS])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
ACTIVATIONS = [("relu", 0.01), ("leaky_relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.5)]
activations = pytest.mark.parametrize("activation, slope", ACTIVATIONS,
                                      ids=[f"{a}-{s}" for a, s in ACTIVATIONS])
training_modes = pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])


def unfused_dz(dy, y, activation, slope):
    """dz from the activated output y, in float64, as the README said before the
    fused backward: y > 0 exactly where z > 0 (for ReLU and a slope >= 0; with a
    negative slope y is >= 0 on both sides and this does not work)."""
    dy = dy.astype(np.float64)
    return np.where(y > 0, dy, 0.0 if activation == "relu" else slope * dy)


def fused(a, channel_axis, activation, slope, **kw):
    return fastbn.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd, beta=a.beta,
                                      activation=activation, negative_slope=slope,
                                      channel_axis=channel_axis, **kw)


# ------------------------------------------------------- oracle, unfused ----

@layouts
@dtypes
@activations
@training_modes
@pytest.mark.parametrize("out_mode", ["new", "out", "inplace"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_fused_backward_equals_the_oracle_and_the_unfused_composition(
        shape, channel_axis, dtype, activation, slope, training, out_mode, num_threads):
    a = activated_case(shape, dtype, channel_axis, activation, slope)
    oracle = reference.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd, beta=a.beta,
                                           activation=activation, negative_slope=slope,
                                           training=training, channel_axis=channel_axis)
    unfused = None if slope < 0 else reference.batch_norm_backward(
        unfused_dz(a.dy, a.y, activation, slope), a.x, a.gamma, a.mean, a.invstd,
        training=training, channel_axis=channel_axis)
    dy_before = a.dy.copy()
    a.dy = a.dy.copy()
    out = {"new": None, "out": np.empty_like(a.dy), "inplace": a.dy}[out_mode]
    snap = snapshot(x=a.x, gamma=a.gamma, beta=a.beta, mean=a.mean, invstd=a.invstd,
                    **({} if out_mode == "inplace" else {"dy": a.dy}))

    got = fused(a, channel_axis, activation, slope, training=training, out=out,
                num_threads=num_threads)

    assert_unchanged(snap)
    if out is not None:
        assert got[0] is out
    assert got[0].shape == shape and got[0].dtype == dtype
    assert_grads_close(got, oracle, dtype, dy_before, a.gamma, a.invstd, "(oracle)")
    if unfused is not None:
        assert_grads_close(got, unfused, dtype, dy_before, a.gamma, a.invstd, "(unfused)")


@layouts
@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.2)])
@training_modes
@pytest.mark.parametrize("param_grads", [True, False], ids=["grads", "no-grads"])
def test_fused_backward_has_the_same_bits_for_any_thread_count(shape, channel_axis, activation,
                                                               slope, training, param_grads):
    a = activated_case(shape, np.float32, channel_axis, activation, slope)
    results = [fused(a, channel_axis, activation, slope, training=training,
                     param_grads=param_grads, num_threads=n) for n in THREADS]
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            if want is None:
                assert got is None
            else:
                assert_bitwise_equal(got, want)


# --------------------------------------------------- flags and arguments ----

@layouts
@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.2)])
@training_modes
def test_param_grads_false_gives_the_same_dx(shape, channel_axis, activation, slope, training):
    a = activated_case(shape, np.float64, channel_axis, activation, slope)
    full = fused(a, channel_axis, activation, slope, training=training)
    dx, dgamma, dbeta = fused(a, channel_axis, activation, slope, training=training,
                              param_grads=False)
    assert dgamma is None and dbeta is None
    assert_bitwise_equal(dx, full[0])


@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.2)])
def test_frozen_without_param_grads_still_reads_x_for_the_mask(activation, slope):
    """training=False, param_grads=False: without an activation dx = gamma *
    invstd * dy does not read x; with one, the mask act'(z) comes from x, so
    where z <= 0 dx is scaled by slope (0 for ReLU) and a NaN in x counts
    as not > 0."""
    a = activated_case((4, 3, 5, 7), np.float64, 1, activation, slope)
    x = a.x.copy()
    x[0, 1, 2, 3] = np.nan
    plain = fastbn.batch_norm_backward(a.dy, x, a.gamma, a.mean, a.invstd, training=False,
                                       param_grads=False)[0]
    dx = fastbn.batch_norm_backward(a.dy, x, a.gamma, a.mean, a.invstd, beta=a.beta,
                                    activation=activation, negative_slope=slope,
                                    training=False, param_grads=False)[0]
    z = a.gamma[:, None, None] * (x - a.mean[:, None, None]) * a.invstd[:, None, None] \
        + a.beta[:, None, None]
    derivative = np.where(z > 0, 1.0, 0.0 if activation == "relu" else slope)
    assert 0 < (z > 0).mean() < 1
    np.testing.assert_allclose(dx, plain * derivative, rtol=1e-14, atol=0)
    assert dx[0, 1, 2, 3] == plain[0, 1, 2, 3] * derivative[0, 1, 2, 3]
    assert not np.isnan(dx).any()
    # flipping x about the mean flips the mask: x is read
    flipped = 2 * a.mean[:, None, None] - x
    other = fastbn.batch_norm_backward(a.dy, flipped, a.gamma, a.mean, a.invstd, beta=a.beta,
                                       activation=activation, negative_slope=slope,
                                       training=False, param_grads=False)[0]
    assert not np.array_equal(other, dx)


@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.3)])
@dtypes
def test_z_zero_and_nan_count_as_not_positive(activation, slope, dtype):
    """Frozen mode, beta 0 and x equal to the mean: z is exactly 0 there, and
    the element gets slope * dy (0 for ReLU); a NaN z likewise; elsewhere dy."""
    a = make_inputs((6, 3, 4), dtype)
    a.beta[...] = 0
    x = a.x.copy()
    x[0, :, 0] = a.mean
    x[1, 2, 1] = np.nan
    dx, dgamma, dbeta = fastbn.batch_norm_backward(a.dy, x, a.gamma, a.mean, a.invstd,
                                                   beta=a.beta, activation=activation,
                                                   negative_slope=slope, training=False)
    s = 0.0 if activation == "relu" else slope
    expected = reference.batch_norm_backward(a.dy, x, a.gamma, a.mean, a.invstd, beta=a.beta,
                                             activation=activation, negative_slope=slope,
                                             training=False)
    gi = (a.gamma.astype(np.float64) * a.invstd)
    assert_close(dx[0, :, 0], gi * s * a.dy[0, :, 0].astype(np.float64), dtype)
    assert_close(dx[1, 2, 1], gi[2] * s * a.dy[1, 2, 1], dtype)
    assert_close(dx, expected[0], dtype)
    assert_close(dbeta, expected[2], dtype)
    assert np.isnan(dgamma[2]) and np.isnan(expected[1][2])   # NaN xhat in the sum
    assert_close(dgamma[:2], expected[1][:2], dtype)


@dtypes
@training_modes
def test_activation_none_ignores_beta(dtype, training):
    """Without an activation beta does not enter the backward: the plain backward's bits."""
    a = make_inputs((4, 3, 5, 7), dtype)
    plain = fastbn.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd, training=training)
    for beta in (a.beta, None):
        got = fastbn.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd, beta=beta,
                                         activation=None, negative_slope=0.3,
                                         training=training)
        for g, w in zip(got, plain):
            assert_bitwise_equal(g, w)


@pytest.mark.parametrize("shape, channel_axis", [((4, 3, 5, 7), 1), ((40, 3), 1),
                                                 ((4, 5, 3), -1)])
@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.2)])
@pytest.mark.parametrize("affine", ["none", "gamma", "beta"])
def test_gamma_or_beta_none_mean_one_and_zero(shape, channel_axis, activation, slope, affine):
    a = activated_case(shape, np.float64, channel_axis, activation, slope)
    ones, zeros = np.ones(a.C), np.zeros(a.C)
    gamma = a.gamma if affine == "gamma" else None
    beta = a.beta if affine == "beta" else None
    got = fastbn.batch_norm_backward(a.dy, a.x, gamma, a.mean, a.invstd, beta=beta,
                                     activation=activation, negative_slope=slope,
                                     channel_axis=channel_axis)
    want = fastbn.batch_norm_backward(a.dy, a.x, ones if gamma is None else gamma, a.mean,
                                      a.invstd, beta=zeros if beta is None else beta,
                                      activation=activation, negative_slope=slope,
                                      channel_axis=channel_axis)
    oracle = reference.batch_norm_backward(a.dy, a.x, gamma, a.mean, a.invstd, beta=beta,
                                           activation=activation, negative_slope=slope,
                                           channel_axis=channel_axis)
    assert_grads_close(got, want, np.float64, a.dy, gamma, a.invstd, "(explicit 1 and 0)")
    assert_grads_close(got, oracle, np.float64, a.dy, gamma, a.invstd, "(oracle)")


@pytest.mark.parametrize("layout", list(STRIDED_LAYOUTS))
@pytest.mark.parametrize("shape, channel_axis", [((4, 3, 5, 7), 1), ((4, 5, 7, 3), -1),
                                                 ((9, 3), 1)])
@training_modes
def test_non_contiguous_inputs(layout, shape, channel_axis, training):
    """Non-contiguous dy, x and per-channel arrays: the oracle's results, inputs unchanged."""
    a = activated_case(shape, np.float64, channel_axis, "leaky_relu", 0.1)
    expected = reference.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd,
                                             beta=a.beta, activation="leaky_relu",
                                             negative_slope=0.1, training=training,
                                             channel_axis=channel_axis)
    args = {"dy": a.dy, "x": a.x, "gamma": a.gamma, "mean": a.mean, "invstd": a.invstd,
            "beta": a.beta}
    args = {k: STRIDED_LAYOUTS[layout](v) if v.ndim > 1 else strided_vector(v)
            for k, v in args.items()}
    assert not any(v.flags.c_contiguous for v in args.values())
    snap = snapshot(**args)
    got = fastbn.batch_norm_backward(args["dy"], args["x"], args["gamma"], args["mean"],
                                     args["invstd"], beta=args["beta"], activation="leaky_relu",
                                     negative_slope=0.1, training=training,
                                     channel_axis=channel_axis, num_threads=2)
    assert_unchanged(snap)
    assert_grads_close(got, expected, np.float64, a.dy, a.gamma, a.invstd)


# ---------------------------------------------- PyTorch, finite differences ----

@dtypes
@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.1)])
@training_modes
@pytest.mark.parametrize("shape, channel_axis", [((8, 4, 6, 5), 1), ((64, 5), 1),
                                                 ((6, 5, 4, 3), -1)])
def test_matches_pytorch_autograd(dtype, activation, slope, training, shape, channel_axis):
    torch = pytest.importorskip("torch")
    a = activated_case(shape, dtype, channel_axis, activation, slope)
    a.running_mean = a.mean                       # frozen: the statistics are constants
    a.running_var = (1.0 / a.invstd.astype(np.float64) ** 2 - 1e-5).astype(dtype)
    # torch wants the channels on axis 1
    to_torch = (lambda v: torch.tensor(np.moveaxis(v, -1, 1))) if channel_axis == -1 \
        else torch.tensor
    x = to_torch(a.x).requires_grad_(True)
    weight = torch.tensor(a.gamma, requires_grad=True)
    bias = torch.tensor(a.beta, requires_grad=True)
    y = torch.nn.functional.batch_norm(
        x, None if training else torch.tensor(a.running_mean),
        None if training else torch.tensor(a.running_var), weight, bias, training=training,
        eps=1e-5)
    y = torch.relu(y) if activation == "relu" else torch.nn.functional.leaky_relu(y, slope)
    y.backward(to_torch(a.dy))
    theirs_dx = x.grad.numpy()
    if channel_axis == -1:
        theirs_dx = np.moveaxis(theirs_dx, 1, -1)

    ours = fused(a, channel_axis, activation, slope, training=training)

    assert_grads_close(ours, (theirs_dx, weight.grad.numpy(), bias.grad.numpy()), dtype,
                       a.dy, a.gamma, a.invstd, "(PyTorch)")


@pytest.mark.parametrize("shape, channel_axis", [((4, 3), 1), ((3, 2, 5), 1), ((3, 5, 2), -1),
                                                 ((2, 2, 3, 3), 1)])
@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.2),
                                               ("leaky_relu", -0.5)])
@training_modes
def test_matches_finite_differences(shape, channel_axis, activation, slope, training, rng):
    """dx, dgamma, dbeta are the numeric gradients of sum(act(BN(x)) * w), with
    the batch statistics (training) or fixed running statistics (frozen)."""
    a = make_inputs(shape, np.float64, channel_axis, rng)
    away_from_the_kink(a, channel_axis, margin=1e-3)
    x, gamma, beta, w = a.x.copy(), a.gamma.copy(), a.beta.copy(), a.dy
    running_var = 1.0 / a.invstd**2 - 1e-5

    def loss():
        if training:
            y = fastbn.batch_norm_forward(x, gamma, beta, activation=activation,
                                          negative_slope=slope, channel_axis=channel_axis)[0]
        else:
            y = fastbn.batch_norm_inference(x, gamma, beta, a.mean, running_var,
                                            activation=activation, negative_slope=slope,
                                            channel_axis=channel_axis)
        return float(np.sum(y * w))

    mean, invstd = a.mean, a.invstd
    if training:
        _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, channel_axis=channel_axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(w, x, gamma, mean, invstd, beta=beta,
                                                   activation=activation, negative_slope=slope,
                                                   training=training,
                                                   channel_axis=channel_axis)
    for got, wrt, name in ((dx, x, "dx"), (dgamma, gamma, "dgamma"), (dbeta, beta, "dbeta")):
        np.testing.assert_allclose(got, numeric_gradient(loss, wrt), rtol=1e-6, atol=1e-7,
                                   err_msg=name)


def test_fused_backward_can_tell_the_activation_apart():
    """Control: the gradients of ReLU, leaky ReLU and no activation differ (the
    comparisons above would not see an activation that is ignored)."""
    a = activated_case((4, 3, 5, 7), np.float64, 1, "relu", 0.0)
    results = [fused(a, 1, act, 0.2)[0] for act in (None, "relu", "leaky_relu")]
    assert not np.allclose(results[0], results[1])
    assert not np.allclose(results[1], results[2])
    assert not np.allclose(results[0], results[2])
    z = per_channel(a.gamma, 4, 1) * (a.x - per_channel(a.mean, 4, 1)) \
        * per_channel(a.invstd, 4, 1) + per_channel(a.beta, 4, 1)
    assert 0.2 < (z > 0).mean() < 0.8


@pytest.mark.parametrize("name", fastbn.functional.__all__)
def test_the_oracle_has_the_signatures_of_the_functions(name):
    """reference stands in for functional (``backend=fastbn.reference``): the
    same names, parameters, kinds and defaults, the new backward keywords too."""
    assert name in reference.__all__
    assert (inspect.signature(getattr(reference, name))
            == inspect.signature(getattr(fastbn.functional, name)))


@pytest.mark.parametrize("shape, channel_axis", [((4, 3, 5, 7), 1), ((40, 3), 1),
                                                 ((4, 5, 3), -1)])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_nan_in_x_stays_in_its_channel(shape, channel_axis, activation):
    """Training mode: a NaN in x spoils its channel's dgamma and dx, not the other
    channels: their bits are those of the clean call."""
    a = activated_case(shape, np.float32, channel_axis, activation, 0.1)
    clean = fused(a, channel_axis, activation, 0.1)
    x = a.x.copy()
    x[tuple(1 if axis == channel_axis % x.ndim else n // 2
            for axis, n in enumerate(x.shape))] = np.nan
    a.x = x
    dirty = fused(a, channel_axis, activation, 0.1)
    assert np.isnan(dirty[1][1]) and np.isnan(np.moveaxis(dirty[0], channel_axis, 0)[1]).all()
    for got, want, axis in zip(dirty, clean, (channel_axis, 0, 0)):
        for c in (0, 2):
            assert_bitwise_equal(np.take(got, c, axis=axis), np.take(want, c, axis=axis))
