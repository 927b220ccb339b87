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

from conftest import assert_close, layout_id

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
    # The mean to within one float32 ulp of its magnitude.
    np.testing.assert_array_less(np.abs(mean.astype(np.float64) - true_mean),
                                 np.spacing(np.abs(true_mean).astype(np.float32)).astype(np.float64) + 1e-12)
    np.testing.assert_allclose(rm.astype(np.float64), true_mean, rtol=1e-7, atol=0)
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
    assert_close(dx, rdx, np.float32, err_msg="dx")
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
def test_constant_channel(dtype):
    """A constant channel has variance 0 exactly: invstd = 1/sqrt(eps), y = beta."""
    x = np.full((8, 2, 50), 1234.5, dtype=dtype)
    x[:, 1] = np.linspace(-1, 1, 400, dtype=dtype).reshape(8, 50)
    beta = np.array([0.25, 0.0], dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, beta, eps=1e-4)
    assert mean[0] == dtype(1234.5)
    assert invstd[0] == dtype(1 / np.sqrt(1e-4))
    assert np.all(y[:, 0] == dtype(0.25))
