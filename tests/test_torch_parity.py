"""Parity with PyTorch's CPU batch norm (skipped when torch is not installed).

- training: ``torch.ops.aten.native_batch_norm`` (output, save_mean,
  save_invstd, running statistics updated in place);
- backward: ``torch.ops.aten.native_batch_norm_backward`` (grad_input,
  grad_weight, grad_bias);
- inference: ``torch.nn.functional.batch_norm`` with ``training=False``.

Channels-last inputs are given to torch as NCHW views (permute). Torch
computes float32 in float32, so float32 is compared at float32 tolerance.
"""

import numpy as np
import pytest

import fastbn

from helpers import DTYPES, assert_close, dtype_id, dx_scale, layout_id, make_inputs

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

torch = pytest.importorskip("torch")

EPS = 1e-5
MOMENTUM = 0.1

LAYOUTS = [
    pytest.param(s, ca, id=layout_id(s, ca))
    for s, ca in [((16, 5), 1), ((2, 7), 1), ((4, 3, 9), 1), ((4, 3, 5, 7), 1),
                  ((8, 16, 6, 6), 1), ((2, 3, 2, 3, 4), 1), ((3, 4, 1, 1), 1),
                  ((4, 9, 3), -1), ((4, 5, 7, 3), -1), ((2, 2, 3, 4, 3), -1)]
]


def to_torch(a, channel_axis):
    """A channels-first torch tensor sharing a's memory (a permuted view if channels last)."""
    t = torch.from_numpy(a)
    if channel_axis % a.ndim != 1:
        t = t.movedim(-1, 1)
    return t


def from_torch(t, channel_axis):
    """Back to fastbn's layout, as a NumPy array."""
    if channel_axis % t.ndim != 1:
        t = t.movedim(1, -1)
    return t.contiguous().numpy()


def optional(a):
    return None if a is None else torch.from_numpy(a.copy())


affine = pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])


@pytest.mark.parametrize("shape, channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@affine
def test_training_forward(shape, channel_axis, dtype, affine, rng):
    """y, mean, invstd and the running statistics equal native_batch_norm's."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    gamma, beta = (a.gamma, a.beta) if affine else (None, None)
    t_rm, t_rv = torch.from_numpy(a.running_mean.copy()), torch.from_numpy(a.running_var.copy())
    t_y, t_mean, t_invstd = torch.ops.aten.native_batch_norm(
        to_torch(a.x, channel_axis), optional(gamma), optional(beta), t_rm, t_rv,
        True, MOMENTUM, EPS)

    rm, rv = a.running_mean.copy(), a.running_var.copy()
    y, mean, invstd = fastbn.batch_norm_forward(
        a.x, gamma, beta, eps=EPS, running_mean=rm, running_var=rv, momentum=MOMENTUM,
        channel_axis=channel_axis)

    assert_close(y, from_torch(t_y, channel_axis), dtype, err_msg="y")
    assert_close(mean, t_mean.numpy(), dtype, err_msg="mean")
    assert_close(invstd, t_invstd.numpy(), dtype, err_msg="invstd")
    assert_close(rm, t_rm.numpy(), dtype, err_msg="running_mean")
    assert_close(rv, t_rv.numpy(), dtype, err_msg="running_var")


@pytest.mark.parametrize("shape, channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@affine
def test_backward(shape, channel_axis, dtype, affine, rng):
    """dx, dgamma and dbeta equal native_batch_norm_backward's (same saved statistics)."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    gamma = a.gamma if affine else None
    _, mean, invstd = fastbn.batch_norm_forward(a.x, gamma, None, eps=EPS,
                                                channel_axis=channel_axis)
    t_dx, t_dgamma, t_dbeta = torch.ops.aten.native_batch_norm_backward(
        to_torch(a.dy, channel_axis), to_torch(a.x, channel_axis), optional(gamma), None, None,
        torch.from_numpy(mean), torch.from_numpy(invstd), True, EPS, [True, True, True])

    dx, dgamma, dbeta = fastbn.batch_norm_backward(a.dy, a.x, gamma, mean, invstd,
                                                   channel_axis=channel_axis)

    # Torch's float32 rounding of dx is relative to the terms it is made of.
    assert_close(dx, from_torch(t_dx, channel_axis), dtype, scale=dx_scale(a.dy, gamma, invstd),
                 err_msg="dx")
    assert_close(dgamma, t_dgamma.numpy(), dtype, err_msg="dgamma")
    assert_close(dbeta, t_dbeta.numpy(), dtype, err_msg="dbeta")


@pytest.mark.parametrize("shape, channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@affine
def test_inference(shape, channel_axis, dtype, affine, rng):
    """y equals torch.nn.functional.batch_norm in eval mode."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    gamma, beta = (a.gamma, a.beta) if affine else (None, None)
    t_y = torch.nn.functional.batch_norm(
        to_torch(a.x, channel_axis), torch.from_numpy(a.running_mean),
        torch.from_numpy(a.running_var), optional(gamma), optional(beta), training=False,
        eps=EPS)

    y = fastbn.batch_norm_inference(a.x, gamma, beta, a.running_mean, a.running_var, eps=EPS,
                                    channel_axis=channel_axis)

    assert_close(y, from_torch(t_y, channel_axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_batchnorm2d_module_over_steps(dtype, rng):
    """Three training steps and an eval step track torch.nn.BatchNorm2d's buffers."""
    C = 4
    bn = torch.nn.BatchNorm2d(C, momentum=None, dtype=torch.float64 if dtype == np.float64
                              else torch.float32)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    nbt = np.array(0, dtype=np.int64)
    for step in range(3):
        x = make_inputs((5, C, 3, 6), dtype, 1, np.random.default_rng(step)).x
        t_y = bn(torch.from_numpy(x))
        y, _, _ = fastbn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv,
                                            momentum=None, num_batches_tracked=nbt)
        assert_close(y, t_y.detach().numpy(), dtype, err_msg=f"y, step {step}")
    assert nbt == bn.num_batches_tracked.item() == 3
    assert_close(rm, bn.running_mean.numpy(), dtype, err_msg="running_mean")
    assert_close(rv, bn.running_var.numpy(), dtype, err_msg="running_var")
    bn.eval()
    x = make_inputs((5, C, 3, 6), dtype, 1, rng).x
    assert_close(fastbn.batch_norm_inference(x, None, None, rm, rv),
                 bn(torch.from_numpy(x)).detach().numpy(), dtype, err_msg="eval")
