"""The three public functions against the float64 oracle, over the full grid.

Grid: every layout (2-D to 5-D, channels first and last, with the equivalent
channel axes), both dtypes, 1 to 3 threads, a fresh result, a given ``out``
and in-place, with and without the affine parameters. Small shapes cover the
edge sizes (N = 2, C = 1, S = 1, odd and prime sizes); a few large ones span
several of the kernels' internal blocks and tiles.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from helpers import (DTYPES, THREADS, assert_close, dtype_id, dx_scale, layout_id,
                     make_inputs)

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

SMALL_LAYOUTS = [
    ((2, 1), 1),            # N = 2, C = 1
    ((2, 1), -1),
    ((5, 3), 1),
    ((7, 13), -1),
    ((2, 3, 1), 1),         # S = 1: columnar
    ((3, 5, 7), 1),
    ((3, 5, 7), -2),        # equivalent of 1
    ((2, 1, 37), 1),        # C = 1, S with a tail past the 8, 16 or 32 lanes
    ((1, 3, 2), 1),         # N = 1, two values per channel (planar)
    ((1, 2, 3, 1), 1),      # N = 1, planar
    ((3, 7, 2), -1),
    ((3, 7, 2), 2),         # equivalent of -1
    ((13, 11, 17), 1),      # primes
    ((2, 1, 1, 1), 1),      # N = 2, C = 1, S = 1
    ((2, 5, 1, 1), 1),      # (N, C, 1, 1): columnar
    ((3, 4, 5, 7), 1),
    ((3, 4, 5, 7), -3),     # equivalent of 1
    ((2, 5, 3, 4), -1),
    ((2, 5, 3, 4), 3),      # equivalent of -1
    ((2, 3, 2, 3, 5), 1),
    ((2, 3, 2, 3, 5), -4),  # equivalent of 1
    ((2, 1, 1, 1, 1), 1),
    ((2, 3, 5, 2, 3), -1),
    ((2, 3, 5, 2, 3), 4),   # equivalent of -1
]

LARGE_LAYOUTS = [
    ((2, 3, 40000), 1),     # S > 16384: three blocks per row, the last one short
    ((1, 2, 70000), 1),     # N = 1, five blocks per row
    ((41, 3, 997), 1),      # whole rows per block, a short last block
    ((4099, 40), 1),        # columnar: 64 row blocks, the last one short
    ((3, 20011, 2), -1),    # channels last, many rows, C = 2
    ((3, 2, 16385), 1),     # S = BLOCK + 1: a one-value block per row
    ((2, 1, 16384), 1),     # S = BLOCK
    ((3, 50021), 1),        # columnar, wide: several tiles, the last one short
]

LAYOUTS = [pytest.param(shape, ca, id=layout_id(shape, ca))
           for shape, ca in SMALL_LAYOUTS + LARGE_LAYOUTS]

OUT_MODES = ["new", "out", "inplace"]

grid = pytest.mark.parametrize
layouts = grid("shape, channel_axis", LAYOUTS)
dtypes = grid("dtype", DTYPES, ids=dtype_id)
threads = grid("num_threads", THREADS, ids=lambda n: f"t{n}")
out_modes = grid("out_mode", OUT_MODES)
affine = grid("affine", [True, False], ids=["affine", "plain"])


def _out_for(out_mode, a):
    """The ``out`` argument for ``out_mode`` when the result replaces ``a``."""
    if out_mode == "new":
        return None
    if out_mode == "out":
        return np.full_like(a, np.nan, order="C")
    return a


def _check_result(result, out, replaced, out_mode):
    """The result is ``out`` when given (``replaced`` itself in place)."""
    assert result.flags.c_contiguous
    if out_mode == "new":
        assert not np.may_share_memory(result, replaced)
    else:
        assert result is out


@layouts
@dtypes
@threads
@out_modes
@affine
def test_forward(shape, channel_axis, dtype, num_threads, out_mode, affine, rng):
    """y, mean, invstd and the running statistics (momentum 0.1) match the oracle."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    gamma, beta = (a.gamma, a.beta) if affine else (None, None)
    rm, rv, nbt = a.running_mean.copy(), a.running_var.copy(), np.array(3, dtype=np.int64)
    ref_rm, ref_rv, ref_nbt = rm.copy(), rv.copy(), nbt.copy()
    ref_y, ref_mean, ref_invstd = reference.batch_norm_forward(
        a.x.copy(), gamma, beta, running_mean=ref_rm, running_var=ref_rv, momentum=0.1,
        num_batches_tracked=ref_nbt, channel_axis=channel_axis)
    x = a.x
    out = _out_for(out_mode, x)

    y, mean, invstd = fastbn.batch_norm_forward(
        x, gamma, beta, running_mean=rm, running_var=rv, momentum=0.1,
        num_batches_tracked=nbt, channel_axis=channel_axis, out=out, num_threads=num_threads)

    _check_result(y, out, x, out_mode)
    assert y.shape == shape and y.dtype == dtype
    assert mean.shape == invstd.shape == (a.C,)
    assert mean.dtype == invstd.dtype == dtype
    assert_close(y, ref_y, dtype, err_msg="y")
    assert_close(mean, ref_mean, dtype, err_msg="mean")
    assert_close(invstd, ref_invstd, dtype, err_msg="invstd")
    assert_close(rm, ref_rm, dtype, err_msg="running_mean")
    assert_close(rv, ref_rv, dtype, err_msg="running_var")
    assert nbt.dtype == np.int64 and nbt.shape == () and nbt == ref_nbt == 4


@layouts
@dtypes
@threads
@out_modes
@affine
def test_inference(shape, channel_axis, dtype, num_threads, out_mode, affine, rng):
    """y from the running statistics matches the oracle; they stay unchanged."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    gamma, beta = (a.gamma, a.beta) if affine else (None, None)
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    expected = reference.batch_norm_inference(a.x.copy(), gamma, beta, rm, rv,
                                              channel_axis=channel_axis)
    x = a.x
    out = _out_for(out_mode, x)

    y = fastbn.batch_norm_inference(x, gamma, beta, rm, rv, channel_axis=channel_axis,
                                    out=out, num_threads=num_threads)

    _check_result(y, out, x, out_mode)
    assert y.shape == shape and y.dtype == dtype
    assert_close(y, expected, dtype)
    np.testing.assert_array_equal(rm, a.running_mean)
    np.testing.assert_array_equal(rv, a.running_var)


@layouts
@dtypes
@threads
@out_modes
@affine
def test_backward(shape, channel_axis, dtype, num_threads, out_mode, affine, rng):
    """dx, dgamma and dbeta match the oracle (out=dy computes in place)."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    gamma = a.gamma if affine else None
    ref_dx, ref_dgamma, ref_dbeta = reference.batch_norm_backward(
        a.dy.copy(), a.x, gamma, a.mean, a.invstd, channel_axis=channel_axis)
    x_before, dy_before = a.x.copy(), a.dy.copy()
    dy = a.dy
    out = _out_for(out_mode, dy)

    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, a.x, gamma, a.mean, a.invstd, channel_axis=channel_axis, out=out,
        num_threads=num_threads)

    _check_result(dx, out, dy, out_mode)
    assert dx.shape == shape and dx.dtype == dtype
    assert dgamma.shape == dbeta.shape == (a.C,)
    assert dgamma.dtype == dbeta.dtype == dtype
    assert_close(dx, ref_dx, dtype, scale=dx_scale(dy_before, gamma, a.invstd), err_msg="dx")
    assert_close(dgamma, ref_dgamma, dtype, err_msg="dgamma")
    assert_close(dbeta, ref_dbeta, dtype, err_msg="dbeta")
    np.testing.assert_array_equal(a.x, x_before)


# ------------------------------------------------------ running stats ----

STATS_MODES = {
    # id: (momentum, num_batches_tracked before the call or None)
    "momentum": (0.1, None),
    "momentum-counted": (0.25, 7),
    "momentum-0": (0.0, 2),
    "momentum-1": (1.0, 2),
    "cumulative-first": (None, 0),
    "cumulative": (None, 3),
}


@grid("shape, channel_axis", [
    pytest.param(s, ca, id=layout_id(s, ca))
    for s, ca in [((5, 3), 1), ((3, 5, 7), 1), ((2, 5, 1, 1), 1), ((2, 5, 3, 4), -1),
                  ((2, 3, 40000), 1)]])
@dtypes
@grid("mode", list(STATS_MODES))
def test_forward_running_stats(shape, channel_axis, dtype, mode, rng):
    """The running statistics follow PyTorch's update (momentum or cumulative)."""
    momentum, count = STATS_MODES[mode]
    a = make_inputs(shape, dtype, channel_axis, rng)
    nbt = None if count is None else np.array(count, dtype=np.int64)
    rm, rv = a.running_mean.copy(), a.running_var.copy()

    fastbn.batch_norm_forward(a.x, a.gamma, a.beta, running_mean=rm, running_var=rv,
                              momentum=momentum, num_batches_tracked=nbt,
                              channel_axis=channel_axis)

    # The update spelled out, in float64 from the float64 batch statistics.
    axes = tuple(i for i in range(len(shape)) if i != channel_axis % len(shape))
    x64 = a.x.astype(np.float64)
    m = x64.size // a.C
    factor = momentum if momentum is not None else 1.0 / (count + 1)
    expected_rm = (1 - factor) * a.running_mean.astype(np.float64) + factor * x64.mean(axes)
    expected_rv = ((1 - factor) * a.running_var.astype(np.float64)
                   + factor * x64.var(axes) * m / (m - 1))
    assert_close(rm, expected_rm, dtype, err_msg="running_mean")
    assert_close(rv, expected_rv, dtype, err_msg="running_var")
    if count is not None:
        assert nbt.shape == () and nbt.dtype == np.int64 and nbt == count + 1


@dtypes
def test_forward_without_running_stats(dtype, rng):
    """Without running statistics a counter is left alone and y is unchanged."""
    a = make_inputs((4, 3, 5), dtype, 1, rng)
    nbt = np.array(5, dtype=np.int64)
    y, mean, invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, num_batches_tracked=nbt)
    ref_y, ref_mean, ref_invstd = reference.batch_norm_forward(a.x, a.gamma, a.beta)
    assert nbt == 5
    assert_close(y, ref_y, dtype)
    assert_close(mean, ref_mean, dtype)
    assert_close(invstd, ref_invstd, dtype)


@dtypes
def test_cumulative_average_over_batches(dtype, rng):
    """momentum=None over k batches gives the plain average of their statistics."""
    batches = [make_inputs((6, 3, 4), dtype, 1, np.random.default_rng(i)).x for i in range(4)]
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    nbt = np.array(0, dtype=np.int64)
    for x in batches:
        fastbn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv,
                                  momentum=None, num_batches_tracked=nbt)
    assert nbt == len(batches)
    x64 = [b.astype(np.float64) for b in batches]
    assert_close(rm, np.mean([b.mean(axis=(0, 2)) for b in x64], axis=0), dtype)
    assert_close(rv, np.mean([b.var(axis=(0, 2), ddof=1) for b in x64], axis=0), dtype)


@dtypes
@grid("eps", [1e-5, 1e-3, 0.5])
def test_eps(dtype, eps, rng):
    """eps enters invstd, y (forward and inference) as in the oracle."""
    a = make_inputs((4, 3, 6), dtype, 1, rng)
    y, mean, invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, eps=eps)
    ref_y, _, ref_invstd = reference.batch_norm_forward(a.x, a.gamma, a.beta, eps=eps)
    assert_close(y, ref_y, dtype)
    assert_close(invstd, ref_invstd, dtype)
    y = fastbn.batch_norm_inference(a.x, a.gamma, a.beta, a.running_mean, a.running_var,
                                    eps=eps)
    assert_close(y, reference.batch_norm_inference(a.x, a.gamma, a.beta, a.running_mean,
                                                   a.running_var, eps=eps), dtype)


@dtypes
@grid("shape, channel_axis", [((3, 4, 5, 7), 1), ((3, 5, 7, 4), -1)])
def test_forward_then_backward(shape, channel_axis, dtype, rng):
    """The backward fed with the forward's own mean and invstd matches the oracle's chain."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    _, mean, invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, channel_axis=channel_axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(a.dy, a.x, a.gamma, mean, invstd,
                                                   channel_axis=channel_axis)
    _, rmean, rinvstd = reference.batch_norm_forward(a.x, a.gamma, a.beta,
                                                     channel_axis=channel_axis)
    rdx, rdgamma, rdbeta = reference.batch_norm_backward(a.dy, a.x, a.gamma, rmean, rinvstd,
                                                         channel_axis=channel_axis)
    assert_close(dx, rdx, dtype)
    assert_close(dgamma, rdgamma, dtype)
    assert_close(dbeta, rdbeta, dtype)


def test_public_names():
    """The package exposes the three functions and the oracle."""
    assert set(fastbn.__all__) >= {"batch_norm_forward", "batch_norm_inference",
                                   "batch_norm_backward", "reference"}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_interleaved_running_statistics_share_no_element(dtype, rng):
    """running_mean and running_var as the two columns of one (C, 2) array
    interleave without sharing an element: accepted (overlap is judged on
    the elements, not on the byte ranges) and updated like separate arrays."""
    a = make_inputs((16, 6, 5, 5), dtype, 1, rng)
    stats = np.stack([a.running_mean, a.running_var], axis=1)
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    fastbn.batch_norm_forward(a.x, a.gamma, a.beta, running_mean=stats[:, 0],
                              running_var=stats[:, 1])
    fastbn.batch_norm_forward(a.x, a.gamma, a.beta, running_mean=rm, running_var=rv)
    assert_close(stats[:, 0], rm, dtype)
    assert_close(stats[:, 1], rv, dtype)
    with pytest.raises(ValueError, match="running_var overlaps running_mean"):
        fastbn.batch_norm_forward(a.x, a.gamma, a.beta, running_mean=stats[:, 0],
                                  running_var=stats.reshape(-1)[:6])
