"""The backward with frozen statistics, and the two running-variance conventions.

- ``batch_norm_backward(training=False)``: mean and invstd are constants (an
  eval-mode forward, or frozen statistics), dx = gamma * invstd * dy in one
  kernel pass; with ``param_grads=False`` dgamma and dbeta are not computed
  and x is not read. Checked against the oracle, PyTorch's autograd through
  an eval-mode ``batch_norm`` and finite differences, on every kernel
  schedule, with ``out=``, in place and for any thread count (same bits).
- ``unbiased``: the running variance takes the unbiased batch variance
  (PyTorch) or the biased one (Keras, cs231n, numpy-ml), in the functions,
  the layers and SyncBatchNorm.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (DTYPES, SCHEDULE_LAYOUTS, THREADS, assert_bitwise_equal, assert_close,
                     dtype_id, layout_id, make_inputs, numeric_gradient)

import fastbn
from fastbn import reference
from fastbn.distributed import SyncBatchNorm

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

layouts = pytest.mark.parametrize("shape, channel_axis",
                                  [pytest.param(s, ca, id=layout_id(s, ca)) for s, ca in SCHEDULE_LAYOUTS])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


def frozen_inputs(shape, dtype, channel_axis):
    """Inputs with mean and invstd from running statistics (not x's own)."""
    a = make_inputs(shape, dtype, channel_axis)
    a.mean = a.running_mean
    a.invstd = (1.0 / np.sqrt(a.running_var.astype(np.float64) + 1e-5)).astype(dtype)
    return a


@layouts
@dtypes
@pytest.mark.parametrize("param_grads", [True, False], ids=["grads", "no-grads"])
@pytest.mark.parametrize("out_mode", ["new", "out", "inplace"])
def test_frozen_backward_equals_the_oracle(shape, channel_axis, dtype, param_grads, out_mode):
    a = frozen_inputs(shape, dtype, channel_axis)
    expected = reference.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd,
                                             training=False, channel_axis=channel_axis)
    dy = a.dy.copy()
    out = {"new": None, "out": np.empty_like(dy), "inplace": dy}[out_mode]
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, a.x, a.gamma, a.mean, a.invstd, training=False, param_grads=param_grads,
        channel_axis=channel_axis, out=out)
    if out is not None:
        assert dx is out
    assert_close(dx, expected[0], dtype, err_msg="dx")
    if param_grads:
        assert_close(dgamma, expected[1], dtype, err_msg="dgamma")
        assert_close(dbeta, expected[2], dtype, err_msg="dbeta")
    else:
        assert dgamma is None and dbeta is None


@layouts
@pytest.mark.parametrize("param_grads", [True, False], ids=["grads", "no-grads"])
def test_frozen_backward_has_the_same_bits_for_any_thread_count(shape, channel_axis,
                                                                param_grads):
    a = frozen_inputs(shape, np.float32, channel_axis)
    results = [fastbn.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd, training=False,
                                          param_grads=param_grads, channel_axis=channel_axis,
                                          num_threads=n) for n in THREADS]
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            if want is not None:
                assert_bitwise_equal(got, want)


def test_frozen_dx_does_not_read_x():
    """dx = gamma * invstd * dy: a NaN or Inf in x leaves dx alone (the
    parameter gradients, sums over x, do see it)."""
    a = frozen_inputs((4, 3, 5, 7), np.float64, 1)
    x = a.x.copy()
    x[0, 1, 0, 0] = np.nan
    x[1, 2, 3, 3] = np.inf
    clean = fastbn.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd, training=False)
    dirty = fastbn.batch_norm_backward(a.dy, x, a.gamma, a.mean, a.invstd, training=False)
    assert_bitwise_equal(dirty[0], clean[0])
    assert np.isnan(dirty[1][1]) and np.isfinite(dirty[1][0])
    none = fastbn.batch_norm_backward(a.dy, x, a.gamma, a.mean, a.invstd, training=False,
                                      param_grads=False)
    assert_bitwise_equal(none[0], clean[0])


def test_frozen_backward_matches_finite_differences():
    """The gradient of the eval-mode forward (running statistics fixed)."""
    rng = np.random.default_rng(3)
    a = frozen_inputs((3, 2, 4), np.float64, 1)
    w = rng.standard_normal(a.x.shape)

    x = a.x.copy()

    def loss():
        y = fastbn.batch_norm_inference(x, a.gamma, a.beta, a.running_mean, a.running_var)
        return float((y * w).sum())

    dx, _, _ = fastbn.batch_norm_backward(w, a.x, a.gamma, a.mean, a.invstd, training=False)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-6, atol=1e-8)


@dtypes
def test_frozen_backward_matches_pytorch_eval_mode(dtype):
    torch = pytest.importorskip("torch")
    a = frozen_inputs((4, 3, 6, 5), dtype, 1)
    x = torch.tensor(a.x, requires_grad=True)
    weight = torch.tensor(a.gamma, requires_grad=True)
    bias = torch.tensor(a.beta, requires_grad=True)
    y = torch.nn.functional.batch_norm(x, torch.tensor(a.running_mean),
                                       torch.tensor(a.running_var), weight, bias,
                                       training=False, eps=1e-5)
    y.backward(torch.tensor(a.dy))
    dx, dgamma, dbeta = fastbn.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd,
                                                   training=False)
    assert_close(dx, x.grad.numpy(), dtype, err_msg="dx")
    assert_close(dgamma, weight.grad.numpy(), dtype, err_msg="dgamma")
    assert_close(dbeta, bias.grad.numpy(), dtype, err_msg="dbeta")


def test_eval_mode_layer_backward_is_the_frozen_backward():
    bn = fastbn.BatchNorm2d(3, dtype=np.float64)
    a = make_inputs((4, 3, 5, 2), np.float64)
    bn.running_mean[...] = a.running_mean
    bn.running_var[...] = a.running_var
    bn.gamma[...] = a.gamma
    bn.eval()
    bn(a.x)
    dx = bn.backward(a.dy)
    invstd = (1.0 / np.sqrt(a.running_var + bn.eps))
    expected = reference.batch_norm_backward(a.dy, a.x, a.gamma, a.running_mean, invstd,
                                             training=False)
    for got, want in zip((dx, bn.dgamma, bn.dbeta), expected):
        assert_close(got, want, np.float64)


# --------------------------------------------------- running variance ----

@pytest.mark.parametrize("shape, channel_axis", [((6, 3, 4, 5), 1), ((40, 7), 1),
                                                 ((5, 4, 3), -1)])
@dtypes
@pytest.mark.parametrize("unbiased", [True, False])
def test_running_variance_convention(shape, channel_axis, dtype, unbiased):
    a = make_inputs(shape, dtype, channel_axis)
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    rrm, rrv = a.running_mean.astype(np.float64), a.running_var.astype(np.float64)
    fastbn.batch_norm_forward(a.x, a.gamma, a.beta, running_mean=rm, running_var=rv,
                              momentum=0.3, unbiased=unbiased, channel_axis=channel_axis)
    reference.batch_norm_forward(a.x, a.gamma, a.beta, running_mean=rrm, running_var=rrv,
                                 momentum=0.3, unbiased=unbiased, channel_axis=channel_axis)
    assert_close(rm, rrm, dtype)
    assert_close(rv, rrv, dtype)


def test_keras_style_moving_variance_with_the_core_api():
    """Keras' BatchNormalization: moving = moving * momentum + batch * (1 -
    momentum) with the biased batch variance; fastbn's momentum is 1 - Keras'."""
    rng = np.random.default_rng(5)
    keras_momentum = 0.99
    moving_mean, moving_var = np.zeros(4), np.ones(4)
    rm, rv = np.zeros(4), np.ones(4)
    for _ in range(5):
        x = rng.standard_normal((32, 4)) * 3 + 1
        moving_mean = moving_mean * keras_momentum + x.mean(axis=0) * (1 - keras_momentum)
        moving_var = moving_var * keras_momentum + x.var(axis=0) * (1 - keras_momentum)
        fastbn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv,
                                  momentum=1 - keras_momentum, unbiased=False)
    np.testing.assert_allclose(rm, moving_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rv, moving_var, rtol=1e-12)


@pytest.mark.parametrize("unbiased", [True, False])
def test_layers_follow_the_convention(unbiased):
    x = make_inputs((8, 3, 4, 4), np.float64).x
    bn = fastbn.BatchNorm2d(3, dtype=np.float64, unbiased=unbiased, momentum=1.0)
    sync = SyncBatchNorm(3, dtype=np.float64, unbiased=unbiased, momentum=1.0,
                         allreduce=lambda records: records)
    bn(x)
    sync(x)
    var = x.var(axis=(0, 2, 3))
    expected = var * x[:, 0].size / (x[:, 0].size - 1) if unbiased else var
    np.testing.assert_allclose(bn.running_var, expected, rtol=1e-12)
    assert_bitwise_equal(sync.running_var, bn.running_var)
    assert ("unbiased=False" in repr(bn)) == (not unbiased)


def test_eval_mode_layer_saturates_invstd_as_the_kernels_do():
    """float32, running_var 0 and eps = 1e-80: 1/sqrt(eps) is beyond float32, and
    the eval-mode layer keeps FLT_MAX (as a training forward does), so its
    backward has no 0 * inf NaN."""
    bn = fastbn.BatchNorm1d(2, eps=1e-80)
    bn.running_var[...] = 0
    bn.eval()
    x = np.zeros((4, 2), np.float32)
    dy = np.array([[0, 1], [1, 0], [0, 0], [2, -1]], np.float32)
    bn(x)
    dx = bn.backward(dy)
    assert bn._saved.invstd.max() == np.finfo(np.float32).max
    assert not np.isnan(dx).any() and not np.isnan(bn.dgamma).any()
    assert (dx[dy == 0] == 0).all()
