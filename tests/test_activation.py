"""The activation fused into the training forward and the inference.

``activation="relu"`` gives exactly ``numpy.maximum(y, 0)`` of the plain
output; ``"leaky_relu"`` equals ``numpy.where(y < 0, negative_slope * y, y)``
to round-off (the fused one rounds once); both equal the oracle, on every
kernel schedule, with ``out=``, in place, for any thread count (same bits),
with NaN staying in its channel; the running statistics do not depend on
the activation.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (DTYPES, SCHEDULE_LAYOUTS, THREADS, assert_bitwise_equal, assert_close,
                     dtype_id, layout_id, make_inputs)

import fastbn
from fastbn import reference

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

layouts = pytest.mark.parametrize("shape, channel_axis",
                                  [pytest.param(s, ca, id=layout_id(s, ca)) for s, ca in SCHEDULE_LAYOUTS])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
ACTIVATIONS = [("relu", 0.01), ("leaky_relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.5)]
activations = pytest.mark.parametrize("activation, slope", ACTIVATIONS,
                                      ids=[f"{a}-{s}" for a, s in ACTIVATIONS])


def unfused(y, activation, slope):
    if activation == "relu":
        return np.maximum(y, 0)
    return np.where(y < 0, y * y.dtype.type(slope), y)


def call(func, a, channel_axis, **kw):
    if func == "forward":
        return fastbn.batch_norm_forward(a.x, a.gamma, a.beta, channel_axis=channel_axis,
                                         **kw)[0]
    return fastbn.batch_norm_inference(a.x, a.gamma, a.beta, a.running_mean, a.running_var,
                                       channel_axis=channel_axis, **kw)


functions = pytest.mark.parametrize("func", ["forward", "inference"])


@layouts
@dtypes
@functions
@activations
@pytest.mark.parametrize("out_mode", ["new", "out", "inplace"])
def test_fused_equals_the_unfused_composition_and_the_oracle(shape, channel_axis, dtype, func,
                                                            activation, slope, out_mode):
    a = make_inputs(shape, dtype, channel_axis)
    plain = call(func, a, channel_axis)
    x = a.x.copy()
    out = {"new": None, "out": np.empty_like(x), "inplace": x}[out_mode]
    b = make_inputs(shape, dtype, channel_axis)
    b.x = x
    fused = call(func, b, channel_axis, activation=activation, negative_slope=slope, out=out)
    if out is not None:
        assert fused is out
    expected = unfused(plain, activation, slope)
    if activation == "relu":
        assert_bitwise_equal(fused, expected)
    else:
        assert_close(fused, expected, dtype)
    if func == "forward":
        oracle = reference.batch_norm_forward(a.x, a.gamma, a.beta, activation=activation,
                                              negative_slope=slope,
                                              channel_axis=channel_axis)[0]
    else:
        oracle = reference.batch_norm_inference(a.x, a.gamma, a.beta, a.running_mean,
                                                a.running_var, activation=activation,
                                                negative_slope=slope,
                                                channel_axis=channel_axis)
    assert_close(fused, oracle, dtype)


@layouts
@functions
@activations
def test_fused_activation_has_the_same_bits_for_any_thread_count(shape, channel_axis, func,
                                                                 activation, slope):
    a = make_inputs(shape, np.float32, channel_axis)
    results = [call(func, a, channel_axis, activation=activation, negative_slope=slope,
                    num_threads=n) for n in THREADS]
    for other in results[1:]:
        assert_bitwise_equal(other, results[0])


@dtypes
def test_running_statistics_do_not_depend_on_the_activation(dtype):
    a = make_inputs((6, 3, 4, 5), dtype)
    stats = []
    for activation in (None, "relu", "leaky_relu"):
        rm, rv = a.running_mean.copy(), a.running_var.copy()
        _, mean, invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, running_mean=rm,
                                                    running_var=rv, activation=activation)
        stats.append((mean, invstd, rm, rv))
    for other in stats[1:]:
        for got, want in zip(other, stats[0]):
            assert_bitwise_equal(got, want)


def test_nan_stays_nan_and_in_its_channel():
    a = make_inputs((4, 3, 5, 6), np.float32)
    a.x[1, 2, 3, 4] = np.nan
    y = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, activation="relu")[0]
    assert np.isnan(y[:, 2]).all()          # the batch statistics of channel 2 are NaN
    assert not np.isnan(y[:, :2]).any() and (y[:, :2] >= 0).all()
    a.running_mean[0] = np.nan
    y = fastbn.batch_norm_inference(a.x, a.gamma, a.beta, a.running_mean, a.running_var,
                                    activation="leaky_relu")
    assert np.isnan(y[:, 0]).all() and np.isnan(y[1, 2, 3, 4])
    assert np.isnan(y).sum() == y[:, 0].size + 1


def test_matches_pytorch_batch_norm_then_relu():
    torch = pytest.importorskip("torch")
    a = make_inputs((8, 4, 6, 6), np.float32)
    ours = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, activation="leaky_relu",
                                     negative_slope=0.1)[0]
    y = torch.nn.functional.batch_norm(torch.from_numpy(a.x), None, None,
                                       torch.from_numpy(a.gamma), torch.from_numpy(a.beta),
                                       training=True, eps=1e-5)
    theirs = torch.nn.functional.leaky_relu(y, 0.1).numpy()
    assert_close(ours, theirs, np.float32)
