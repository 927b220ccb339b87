"""Accuracy on float32 data far from zero, for both kernel families.

Data: unit spread around offsets of 1e2, 1e4 and 1e6, rounded to float32.
The truth is float64 arithmetic on those very float32 values. A float32
E[x^2] - E[x]^2 loses every digit at 1e6; fastbn must keep the variance to
a relative 1e-5.

The variance is read two ways:

- ``running_var`` after one call with ``momentum=1`` is the unbiased batch
  variance rounded once to float32 (relative error <= 6e-8 from the rounding);
- ``1 / invstd**2 - eps`` with a tiny eps is the biased variance (invstd's
  float32 rounding adds a relative 1.2e-7).
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from helpers import assert_close, dx_scale, layout_id

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

EPS = 1e-12
VAR_RTOL = 1e-5

LAYOUTS = [
    pytest.param((16, 4, 32, 32), 1, id="planar-" + layout_id((16, 4, 32, 32), 1)),
    pytest.param((2, 1, 50000), 1, id="planar-blocks-" + layout_id((2, 1, 50000), 1)),
    pytest.param((4096, 8), 1, id="columnar-" + layout_id((4096, 8), 1)),
    pytest.param((65536, 4), 1, id="columnar-rowblocks-" + layout_id((65536, 4), 1)),
    pytest.param((16, 32, 32, 4), -1, id="channels-last-" + layout_id((16, 32, 32, 4), -1)),
    pytest.param((4096, 4, 1, 1), 1, id="columnar-S1-" + layout_id((4096, 4, 1, 1), 1)),
]


def offset_data(shape, channel_axis, offset, rng):
    """float32 values ~ offset + N(0, 1), with a per-channel shift of a few units."""
    ndim = len(shape)
    C = shape[channel_axis % ndim]
    bshape = [1] * ndim
    bshape[channel_axis % ndim] = C
    shift = rng.uniform(-3.0, 3.0, C).reshape(bshape)
    return (offset + shift + rng.standard_normal(shape)).astype(np.float32)


def reduce_axes(shape, channel_axis):
    return tuple(a for a in range(len(shape)) if a != channel_axis % len(shape))


@pytest.mark.parametrize("shape, channel_axis", LAYOUTS)
@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6], ids=lambda o: f"offset{o:.0e}")
def test_forward_variance_far_from_zero(shape, channel_axis, offset, rng):
    """Variance (from running_var and from invstd), mean and y stay accurate at large offsets."""
    x = offset_data(shape, channel_axis, offset, rng)
    axes = reduce_axes(shape, channel_axis)
    x64 = x.astype(np.float64)
    true_mean = x64.mean(axis=axes)
    true_var = x64.var(axis=axes)
    m = x.size // true_mean.size
    rm = np.zeros(true_mean.size, np.float32)
    rv = np.ones(true_mean.size, np.float32)

    y, mean, invstd = fastbn.batch_norm_forward(
        x, None, None, eps=EPS, running_mean=rm, running_var=rv, momentum=1.0,
        channel_axis=channel_axis)

    unbiased = true_var * m / (m - 1)
    np.testing.assert_allclose(rv.astype(np.float64), unbiased, rtol=VAR_RTOL, atol=0,
                               err_msg="running_var (unbiased variance)")
    var_from_invstd = 1.0 / invstd.astype(np.float64) ** 2 - EPS
    np.testing.assert_allclose(var_from_invstd, true_var, rtol=VAR_RTOL, atol=0,
                               err_msg="1/invstd**2 - eps (biased variance)")
    # The mean (and running_mean = mean) to within one float32 ulp.
    ulp = np.spacing(np.abs(true_mean).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(mean.astype(np.float64) - true_mean) <= ulp), "mean"
    assert np.all(np.abs(rm.astype(np.float64) - true_mean) <= ulp), "running_mean"
    # y is standardized data: compare with float64 arithmetic on the same values.
    ref_y, _, _ = reference.batch_norm_forward(x, None, None, eps=EPS,
                                               channel_axis=channel_axis)
    assert_close(y, ref_y, np.float32, err_msg="y")


@pytest.mark.parametrize("shape, channel_axis", LAYOUTS)
@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6], ids=lambda o: f"offset{o:.0e}")
def test_backward_far_from_zero(shape, channel_axis, offset, rng):
    """dx, dgamma and dbeta stay accurate for data far from zero."""
    x = offset_data(shape, channel_axis, offset, rng)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = x.shape[channel_axis % x.ndim]
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, None, channel_axis=channel_axis)

    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd,
                                                   channel_axis=channel_axis)

    rdx, rdgamma, rdbeta = reference.batch_norm_backward(dy, x, gamma, mean, invstd,
                                                         channel_axis=channel_axis)
    assert_close(dx, rdx, np.float32, scale=dx_scale(dy, gamma, invstd), err_msg="dx")
    assert_close(dgamma, rdgamma, np.float32, err_msg="dgamma")
    assert_close(dbeta, rdbeta, np.float32, err_msg="dbeta")


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6], ids=lambda o: f"offset{o:.0e}")
def test_inference_far_from_zero(offset, rng):
    """Inference subtracts the running mean before scaling, in float64."""
    x = offset_data((64, 3, 100), 1, offset, rng)
    rm = x.astype(np.float64).mean(axis=(0, 2)).astype(np.float32)
    rv = np.ones(3, np.float32)
    y = fastbn.batch_norm_inference(x, None, None, rm, rv, eps=EPS)
    assert_close(y, reference.batch_norm_inference(x, None, None, rm, rv, eps=EPS), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("eps", [1e-4, 1e-30, 1e-80])
def test_constant_channel(dtype, channel_axis, eps):
    """A constant channel has variance 0: y = beta exactly, in training and inference.

    With a tiny eps, 1/sqrt(eps) may not fit the dtype (1e40 for eps = 1e-80
    in float32): invstd saturates at the dtype's largest finite value,
    (x - mean) is still exactly 0, so y is still beta.
    """
    x = np.full((8, 2, 50), 1234.5, dtype=dtype)
    x[:, 1] = np.linspace(-1, 1, 400, dtype=dtype).reshape(8, 50)
    if channel_axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    beta = np.array([0.25, 0.0], dtype)
    constant = (slice(None), 0) if channel_axis == 1 else (Ellipsis, 0)

    y, mean, invstd = fastbn.batch_norm_forward(x, None, beta, eps=eps,
                                                channel_axis=channel_axis)

    assert mean[0] == dtype(1234.5)
    assert invstd[0] == dtype(min(1 / np.sqrt(eps), np.finfo(dtype).max))
    np.testing.assert_array_equal(y[constant], dtype(0.25), err_msg="training y")
    y = fastbn.batch_norm_inference(x, None, beta, mean, np.zeros(2, dtype), eps=eps,
                                    channel_axis=channel_axis)
    np.testing.assert_array_equal(y[constant], dtype(0.25), err_msg="inference y")


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("eps", [1e-80, 1e-300])
def test_constant_channel_with_an_eps_beyond_float32_has_a_backward_without_nan(
        channel_axis, eps, rng):
    """float32, a constant channel, 1/sqrt(eps) beyond float32's range: invstd
    saturates at FLT_MAX, so xhat = 0 * invstd = 0 and no NaN appears. dgamma
    is 0 and dbeta the sum of dy, as in float64; dx = gamma*invstd*(dy -
    mean(dy)) takes the saturated invstd (the oracle's dx with it), so it has
    float64's signs and a capped magnitude."""
    shape = (8, 2, 50) if channel_axis == 1 else (8, 50, 2)
    x = rng.standard_normal(shape)
    constant = (slice(None), 0) if channel_axis == 1 else (Ellipsis, 0)
    x[constant] = 3.0
    dy = rng.standard_normal(shape)
    results = {}
    for dtype in (np.float32, np.float64):
        xd, dyd = x.astype(dtype), dy.astype(dtype)
        y, mean, invstd = fastbn.batch_norm_forward(xd, None, None, eps=eps,
                                                    channel_axis=channel_axis)
        assert np.isfinite(invstd).all() and (y[constant] == 0).all()
        results[dtype] = fastbn.batch_norm_backward(dyd, xd, None, mean, invstd,
                                                    channel_axis=channel_axis)
        expected = reference.batch_norm_backward(dyd, xd, None, mean, invstd,
                                                 channel_axis=channel_axis)
        for name, got, want in zip(("dx", "dgamma", "dbeta"), results[dtype], expected):
            assert not np.isnan(got).any(), name
            assert_close(got, want, dtype, err_msg=name)
    (dx32, dgamma32, dbeta32), (dx64, dgamma64, dbeta64) = results.values()
    assert dgamma32[0] == 0 and dgamma64[0] == 0
    assert_close(dbeta32, dbeta64, np.float32)
    assert (np.sign(dx32[constant]) == np.sign(dx64[constant])).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape, channel_axis", [
    pytest.param((4, 3, 50), 1, id="planar"), pytest.param((4, 50, 3), -1, id="columnar")])
@pytest.mark.parametrize("exponent", [-70, -40, 40, 75])
def test_data_far_from_unit_scale(dtype, shape, channel_axis, exponent, rng):
    """Data of magnitude 2**exponent (eps scaled by its square) keep full accuracy.

    Every value involved stays a normal number of the dtype (x and invstd near
    2**exponent and 2**-exponent, dx near 2**-exponent), so the oracle's
    results are representable and fastbn must match them.
    """
    scale = 2.0 ** exponent
    x = (scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    eps = 1e-5 * scale**2
    C = shape[channel_axis]
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)

    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, None, eps=eps,
                                                channel_axis=channel_axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd,
                                                   channel_axis=channel_axis)

    ry, rmean, rinvstd = reference.batch_norm_forward(x, gamma, None, eps=eps,
                                                      channel_axis=channel_axis)
    rdx, rdgamma, rdbeta = reference.batch_norm_backward(dy, x, gamma, mean, invstd,
                                                         channel_axis=channel_axis)
    assert_close(y, ry, dtype, err_msg="y")
    assert_close(mean, rmean, dtype, err_msg="mean")
    assert_close(invstd, rinvstd, dtype, err_msg="invstd")
    assert_close(dx, rdx, dtype, scale=dx_scale(dy, gamma, invstd), err_msg="dx")
    assert_close(dgamma, rdgamma, dtype, err_msg="dgamma")
    assert_close(dbeta, rdbeta, dtype, err_msg="dbeta")
