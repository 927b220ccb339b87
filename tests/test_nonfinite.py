"""Non-finite data: a NaN or Inf in one channel spoils that channel only.

- the three functions on five layouts with the default thread count: the
  bad value first in its channel (the value the kernels shift their sums by)
  or in the middle; NaN in a per-channel parameter of the inference;
- every schedule of both kernel families, run on one thread and on several
  (planar by channel and by block, blocks of whole rows and pieces of rows;
  columnar by tile and by row block; channels last), both dtypes;
- the other arguments: NaN in gamma, beta or the running statistics of a
  training forward, in gamma, mean or invstd of a backward;
- the layers: a poisoned training step, the backward after it, the eval
  forward and backward with the poisoned running statistics;
- finite but extreme data (float32 near its largest and its subnormal
  values), which must give finite results equal to the oracle's.

"Spoils its channel only" is checked twice: the other channels equal the
oracle on the clean channels alone (to the dtype's tolerance) and equal, to
the bit, fastbn's own results on the same data without the bad value. The
bad channel of y (forward) is NaN throughout; of dx (backward) non-finite
throughout. Nothing crashes and nothing raises.
"""

import numpy as np
import pytest

import fastbn
from fastbn import BatchNorm1d, BatchNorm2d, reference

from helpers import (DTYPES, assert_bitwise_equal, assert_close, dtype_id, dx_scale,
                     layout_id, make_inputs)

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

BAD = 1   # the channel that gets the non-finite value


def _channel(a, c, channel_axis):
    """Channel c of a."""
    return np.take(a, c, axis=channel_axis)


def _poison(a, value, where, channel_axis):
    """A copy of a with ``value`` at the first element of channel BAD (the value the
    kernels shift their sums by) or at a middle one."""
    a = np.moveaxis(a.copy(), channel_axis, 0)
    flat = a[BAD].reshape(-1)
    flat[0 if where == "first" else flat.size // 2 + 1] = value
    a[BAD] = flat.reshape(a[BAD].shape)
    return np.ascontiguousarray(np.moveaxis(a, 0, channel_axis))


def _clean(a, channel_axis):
    """a without channel BAD (per-channel arrays: channel_axis 0)."""
    return np.delete(a, BAD, axis=channel_axis)


# (shape, channel_axis, num_threads): each runs a schedule of its own (see
# test_determinism.py for the schedule each shape takes).
SCHEDULES = [
    ((4, 3, 5, 7), 1, 1),        # planar by channel, whole rows per block
    ((64, 3, 1000), 1, 2),       # planar by block: blocks of 16 whole rows
    ((2, 3, 40000), 1, 2),       # planar by block: three pieces per row
    ((2, 3, 40000), 1, 3),       # planar by channel, pieces of rows
    ((2, 8, 20000), 1, 2),       # planar by channel with two threads
    ((100, 4096), 1, 2),         # columnar by tile
    ((8192, 3), 1, 2),           # columnar by row block
    ((4, 3), 1, 1),              # columnar, a single row block
    ((8, 16, 16, 48), -1, 2),    # channels last: row blocks
    ((64, 5, 1, 1), 1, 2),       # (N, C, 1, 1): columnar
]
SCHEDULE_IDS = [f"{layout_id(s, ca)}-t{t}" for s, ca, t in SCHEDULES]
VALUES = pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf],
                                 ids=["nan", "inf", "-inf"])


def _clean_ref_forward(x, a, channel_axis, **kw):
    return reference.batch_norm_forward(_clean(x, channel_axis), _clean(a.gamma, 0),
                                        _clean(a.beta, 0), channel_axis=channel_axis, **kw)


@pytest.mark.parametrize("shape, channel_axis, num_threads", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@VALUES
@pytest.mark.parametrize("where", ["first", "middle"])
def test_forward_every_schedule(shape, channel_axis, num_threads, dtype, value, where):
    """y, mean, invstd and the running statistics of the other channels are exact;
    the bad channel's y and invstd are NaN."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(5))
    x = _poison(a.x, value, where, channel_axis)
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    y, mean, invstd = fastbn.batch_norm_forward(
        x, a.gamma, a.beta, running_mean=rm, running_var=rv, channel_axis=channel_axis,
        num_threads=num_threads)

    assert np.isnan(_channel(y, BAD, channel_axis)).all()
    assert np.isnan(invstd[BAD]) and not np.isfinite(mean[BAD])
    assert not np.isfinite(rv[BAD])

    crm, crv = _clean(a.running_mean, 0), _clean(a.running_var, 0)
    ry, rmean, rinvstd = _clean_ref_forward(x, a, channel_axis, running_mean=crm,
                                            running_var=crv)
    assert_close(_clean(y, channel_axis), ry, dtype)
    assert_close(_clean(mean, 0), rmean, dtype)
    assert_close(_clean(invstd, 0), rinvstd, dtype)
    assert_close(_clean(rm, 0), crm, dtype)
    assert_close(_clean(rv, 0), crv, dtype)

    rm_ok, rv_ok = a.running_mean.copy(), a.running_var.copy()
    y_ok, mean_ok, invstd_ok = fastbn.batch_norm_forward(
        _poison(a.x, 0.0, where, channel_axis), a.gamma, a.beta, running_mean=rm_ok,
        running_var=rv_ok, channel_axis=channel_axis, num_threads=num_threads)
    for got, want in ((y, y_ok), (mean, mean_ok), (invstd, invstd_ok), (rm, rm_ok),
                      (rv, rv_ok)):
        axis = channel_axis if got.ndim > 1 else 0
        assert_bitwise_equal(_clean(got, axis), _clean(want, axis))


@pytest.mark.parametrize("shape, channel_axis, num_threads", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@VALUES
@pytest.mark.parametrize("poisoned", ["dy", "x"])
def test_backward_every_schedule(shape, channel_axis, num_threads, dtype, value, poisoned):
    """dx, dgamma, dbeta of the other channels are exact; the bad channel's dx is
    non-finite throughout."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(6))
    arrays = {"dy": a.dy, "x": a.x}
    arrays[poisoned] = _poison(arrays[poisoned], value, "middle", channel_axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        arrays["dy"], arrays["x"], a.gamma, a.mean, a.invstd, channel_axis=channel_axis,
        num_threads=num_threads)

    assert not np.isfinite(_channel(dx, BAD, channel_axis)).any()
    assert not np.isfinite(dgamma[BAD])

    cdy, cx = _clean(arrays["dy"], channel_axis), _clean(arrays["x"], channel_axis)
    rdx, rdgamma, rdbeta = reference.batch_norm_backward(
        cdy, cx, _clean(a.gamma, 0), _clean(a.mean, 0), _clean(a.invstd, 0),
        channel_axis=channel_axis)
    assert_close(_clean(dx, channel_axis), rdx, dtype,
                 scale=dx_scale(cdy, _clean(a.gamma, 0), _clean(a.invstd, 0)))
    assert_close(_clean(dgamma, 0), rdgamma, dtype)
    assert_close(_clean(dbeta, 0), rdbeta, dtype)

    arrays[poisoned] = _poison(arrays[poisoned], 0.0, "middle", channel_axis)
    ok = fastbn.batch_norm_backward(arrays["dy"], arrays["x"], a.gamma, a.mean, a.invstd,
                                    channel_axis=channel_axis, num_threads=num_threads)
    for got, want in zip((dx, dgamma, dbeta), ok):
        axis = channel_axis if got.ndim > 1 else 0
        assert_bitwise_equal(_clean(got, axis), _clean(want, axis))


@pytest.mark.parametrize("shape, channel_axis, num_threads",
                         [SCHEDULES[0], SCHEDULES[2], SCHEDULES[5], SCHEDULES[6]],
                         ids=[SCHEDULE_IDS[i] for i in (0, 2, 5, 6)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var"])
def test_nan_parameter_of_a_training_forward(shape, channel_axis, num_threads, dtype, name):
    """NaN in gamma or beta spoils that channel of y; NaN in a running statistic
    spoils that statistic only (y does not use it in training)."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(7))
    p = {k: getattr(a, k).copy() for k in ("gamma", "beta", "running_mean", "running_var")}
    p[name][BAD] = np.nan
    y, mean, invstd = fastbn.batch_norm_forward(
        a.x, p["gamma"], p["beta"], running_mean=p["running_mean"],
        running_var=p["running_var"], channel_axis=channel_axis, num_threads=num_threads)
    q = {k: getattr(a, k).copy() for k in ("gamma", "beta", "running_mean", "running_var")}
    y_ok, mean_ok, invstd_ok = fastbn.batch_norm_forward(
        a.x, q["gamma"], q["beta"], running_mean=q["running_mean"],
        running_var=q["running_var"], channel_axis=channel_axis, num_threads=num_threads)

    assert_bitwise_equal(mean, mean_ok)
    assert_bitwise_equal(invstd, invstd_ok)
    if name in ("gamma", "beta"):
        assert np.isnan(_channel(y, BAD, channel_axis)).all()
        assert_bitwise_equal(_clean(y, channel_axis), _clean(y_ok, channel_axis))
    else:
        assert_bitwise_equal(y, y_ok)
    for k in ("running_mean", "running_var"):
        assert np.isnan(p[k][BAD]) == (k == name)
        assert_bitwise_equal(_clean(p[k], 0), _clean(q[k], 0))


@pytest.mark.parametrize("shape, channel_axis, num_threads",
                         [SCHEDULES[0], SCHEDULES[2], SCHEDULES[5], SCHEDULES[6]],
                         ids=[SCHEDULE_IDS[i] for i in (0, 2, 5, 6)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", ["gamma", "mean", "invstd"])
def test_nan_parameter_of_a_backward(shape, channel_axis, num_threads, dtype, name):
    """NaN in gamma spoils that channel of dx only (dgamma, dbeta do not use gamma);
    NaN in mean or invstd spoils that channel's dx and dgamma."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(8))
    p = {k: getattr(a, k).copy() for k in ("gamma", "mean", "invstd")}
    p[name][BAD] = np.nan
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        a.dy, a.x, p["gamma"], p["mean"], p["invstd"], channel_axis=channel_axis,
        num_threads=num_threads)
    dx_ok, dgamma_ok, dbeta_ok = fastbn.batch_norm_backward(
        a.dy, a.x, a.gamma, a.mean, a.invstd, channel_axis=channel_axis,
        num_threads=num_threads)

    assert np.isnan(_channel(dx, BAD, channel_axis)).all()
    assert_bitwise_equal(_clean(dx, channel_axis), _clean(dx_ok, channel_axis))
    assert_bitwise_equal(dbeta, dbeta_ok)
    if name == "gamma":
        assert_bitwise_equal(dgamma, dgamma_ok)
    else:
        assert np.isnan(dgamma[BAD])
        assert_bitwise_equal(_clean(dgamma, 0), _clean(dgamma_ok, 0))


# ------------------------------------------- default thread count ----

NAN_LAYOUTS = [((4, 3, 5, 7), 1), ((40, 3), 1), ((4, 5, 7, 3), -1), ((2, 3, 40000), 1),
               ((4096, 3), 1)]

def nan_grid(test):
    """Parametrize a test over layouts, the bad value, its place and the dtype."""
    for mark in (
        pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"]),
        pytest.mark.parametrize("where", ["first", "middle"]),
        pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"]),
        pytest.mark.parametrize("shape, channel_axis", NAN_LAYOUTS),
    ):
        test = mark(test)
    return test


@nan_grid
def test_non_finite_forward_stays_in_its_channel(shape, channel_axis, value, where, dtype):
    """A NaN/Inf in x spoils its channel's y, mean, invstd, running stats only."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(3))
    x = _poison(a.x, value, where, channel_axis)
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    y, mean, invstd = fastbn.batch_norm_forward(x, a.gamma, a.beta, running_mean=rm,
                                                running_var=rv, channel_axis=channel_axis)

    assert not np.isfinite(_channel(y, BAD, channel_axis)).any()
    assert not np.isfinite(mean[BAD]) and not np.isfinite(invstd[BAD])
    assert not np.isfinite(rm[BAD]) or not np.isfinite(rv[BAD])

    # The other channels: as the reference on the clean channels alone ...
    crm, crv = _clean(a.running_mean, 0), _clean(a.running_var, 0)
    ry, rmean, rinvstd = reference.batch_norm_forward(
        _clean(x, channel_axis), _clean(a.gamma, 0), _clean(a.beta, 0), running_mean=crm,
        running_var=crv, channel_axis=channel_axis)
    assert_close(_clean(y, channel_axis), ry, dtype)
    assert_close(_clean(mean, 0), rmean, dtype)
    assert_close(_clean(invstd, 0), rinvstd, dtype)
    assert_close(_clean(rm, 0), crm, dtype)
    assert_close(_clean(rv, 0), crv, dtype)
    # ... and to the bit as fastbn on the same data without the bad value.
    y_ok, mean_ok, invstd_ok = fastbn.batch_norm_forward(
        _poison(a.x, 0.0, where, channel_axis), a.gamma, a.beta, channel_axis=channel_axis)
    assert_bitwise_equal(_clean(y, channel_axis), _clean(y_ok, channel_axis))
    assert_bitwise_equal(_clean(mean, 0), _clean(mean_ok, 0))
    assert_bitwise_equal(_clean(invstd, 0), _clean(invstd_ok, 0))


@nan_grid
def test_non_finite_inference_stays_in_its_element(shape, channel_axis, value, where, dtype):
    """Inference is elementwise: a NaN/Inf in x spoils that element of y only."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(3))
    x = _poison(a.x, value, where, channel_axis)
    y = fastbn.batch_norm_inference(x, a.gamma, a.beta, a.running_mean, a.running_var,
                                    channel_axis=channel_axis)
    assert np.count_nonzero(~np.isfinite(y)) == 1
    assert_close(y, reference.batch_norm_inference(x, a.gamma, a.beta, a.running_mean,
                                                   a.running_var, channel_axis=channel_axis),
                 dtype)


@nan_grid
@pytest.mark.parametrize("poisoned", ["dy", "x"])
def test_non_finite_backward_stays_in_its_channel(shape, channel_axis, value, where, dtype,
                                                  poisoned):
    """A NaN/Inf in dy or x spoils its channel's dx and dgamma only."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(3))
    arrays = {"dy": a.dy, "x": a.x}
    arrays[poisoned] = _poison(arrays[poisoned], value, where, channel_axis)
    dy, x = arrays["dy"], arrays["x"]
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, a.gamma, a.mean, a.invstd,
                                                   channel_axis=channel_axis)

    assert not np.isfinite(_channel(dx, BAD, channel_axis)).any()
    assert not np.isfinite(dgamma[BAD])
    assert np.isfinite(dbeta[BAD]) == (poisoned == "x")

    rdx, rdgamma, rdbeta = reference.batch_norm_backward(
        _clean(dy, channel_axis), _clean(x, channel_axis), _clean(a.gamma, 0),
        _clean(a.mean, 0), _clean(a.invstd, 0), channel_axis=channel_axis)
    assert_close(_clean(dx, channel_axis), rdx, dtype,
                 scale=dx_scale(_clean(dy, channel_axis), _clean(a.gamma, 0), _clean(a.invstd, 0)))
    assert_close(_clean(dgamma, 0), rdgamma, dtype)
    assert_close(_clean(dbeta, 0), rdbeta, dtype)
    arrays[poisoned] = _poison(arrays[poisoned], 0.0, where, channel_axis)
    dx_ok, dgamma_ok, dbeta_ok = fastbn.batch_norm_backward(
        arrays["dy"], arrays["x"], a.gamma, a.mean, a.invstd, channel_axis=channel_axis)
    assert_bitwise_equal(_clean(dx, channel_axis), _clean(dx_ok, channel_axis))
    assert_bitwise_equal(_clean(dgamma, 0), _clean(dgamma_ok, 0))
    assert_bitwise_equal(_clean(dbeta, 0), _clean(dbeta_ok, 0))


@pytest.mark.parametrize("name", ["running_mean", "running_var", "gamma", "beta"])
@pytest.mark.parametrize("shape, channel_axis", [((4, 3, 5, 7), 1), ((40, 3), 1),
                                                 ((4, 5, 7, 3), -1)])
def test_non_finite_parameter_stays_in_its_channel(name, shape, channel_axis):
    """A NaN in a per-channel parameter of the inference spoils that channel only."""
    a = make_inputs(shape, np.float32, channel_axis, np.random.default_rng(3))
    params = {k: getattr(a, k).copy() for k in ("gamma", "beta", "running_mean",
                                                "running_var")}
    params[name][BAD] = np.nan
    y = fastbn.batch_norm_inference(a.x, params["gamma"], params["beta"],
                                    params["running_mean"], params["running_var"],
                                    channel_axis=channel_axis)
    assert np.isnan(_channel(y, BAD, channel_axis)).all()
    assert np.isfinite(_clean(y, channel_axis)).all()
    assert_close(y, reference.batch_norm_inference(a.x, params["gamma"], params["beta"],
                                                   params["running_mean"],
                                                   params["running_var"],
                                                   channel_axis=channel_axis), np.float32)


# ------------------------------------------------------------------ layers ----

LAYERS = [
    (BatchNorm2d, (4, 3, 6, 5), 1),       # planar
    (BatchNorm2d, (4, 6, 5, 3), -1),      # channels last
    (BatchNorm1d, (64, 3), 1),            # columnar
    (BatchNorm1d, (16, 3, 40), 1),        # planar, 1-D
]


@pytest.mark.parametrize("cls, shape, channel_axis", LAYERS,
                         ids=[f"{c.__name__}-{layout_id(s, ca)}" for c, s, ca in LAYERS])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@VALUES
def test_layer_train_step_then_eval(cls, shape, channel_axis, dtype, value):
    """A poisoned batch spoils its channel of y, dx and dgamma, that channel's
    running statistics and so its eval output; every other channel of every
    result equals the clean run to the bit and the oracle layer on the clean
    channels alone to the tolerance."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(9))
    x = _poison(a.x, value, "middle", channel_axis)
    x_ok = _poison(a.x, 0.0, "middle", channel_axis)
    C = a.C
    bad, ok = cls(C, dtype=dtype, channel_axis=channel_axis), cls(C, dtype=dtype,
                                                                   channel_axis=channel_axis)
    oracle = cls(C - 1, dtype=dtype, channel_axis=channel_axis, backend=reference)
    runs = {}
    for name, bn, xx in (("bad", bad, x), ("ok", ok, x_ok),
                         ("oracle", oracle, _clean(x, channel_axis))):
        dy = a.dy if name != "oracle" else _clean(a.dy, channel_axis)
        y = bn(xx)
        dx = bn.backward(dy)
        dgamma = bn.dgamma.copy()
        bn.eval()
        y_eval = bn(xx)
        dx_eval = bn.backward(dy)
        runs[name] = dict(y=y, dx=dx, dgamma=dgamma, y_eval=y_eval, dx_eval=dx_eval,
                          running_mean=bn.running_mean, running_var=bn.running_var)

    got, want, ref = runs["bad"], runs["ok"], runs["oracle"]
    assert np.isnan(_channel(got["y"], BAD, channel_axis)).all()
    assert not np.isfinite(_channel(got["dx"], BAD, channel_axis)).any()
    assert not np.isfinite(got["dgamma"][BAD])
    assert not np.isfinite(got["running_var"][BAD])
    assert np.isnan(_channel(got["y_eval"], BAD, channel_axis)).all()
    assert int(bad.num_batches_tracked) == 1
    for key, v in got.items():
        axis = channel_axis if v.ndim > 1 else 0
        assert_bitwise_equal(_clean(v, axis), _clean(want[key], axis), err_msg=key)
        scale = None
        if key.startswith("dx"):
            scale = dx_scale(_clean(a.dy, channel_axis), None, 1.0 / np.sqrt(
                _clean(runs["ok"]["running_var"], 0).astype(np.float64)))
            scale = max(scale, np.abs(ref[key]).max())
        assert_close(_clean(v, axis), ref[key], dtype, scale=scale, err_msg=key)


# ------------------------------------------------------- extreme finite data ----

@pytest.mark.parametrize("shape, channel_axis, num_threads",
                         [SCHEDULES[0], SCHEDULES[2], SCHEDULES[5], SCHEDULES[6]],
                         ids=[SCHEDULE_IDS[i] for i in (0, 2, 5, 6)])
@pytest.mark.parametrize("magnitude, eps", [(3e38, 1e-5), (1e30, 1e-5), (1e-30, 1e-70),
                                            (1e-41, 1e-95)],
                         ids=["near-max", "1e30", "1e-30", "subnormal"])
def test_extreme_float32_data_gives_finite_exact_results(shape, channel_axis, num_threads,
                                                         magnitude, eps):
    """float32 data near FLT_MAX or among the subnormals (with an eps small enough
    to matter) normalize to finite values equal to the float64 oracle's: the sums
    run in double, where nothing overflows."""
    rng = np.random.default_rng(10)
    x = np.clip(rng.standard_normal(shape) * magnitude / 3, -3.4e38, 3.4e38).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None, eps=eps,
                                                channel_axis=channel_axis,
                                                num_threads=num_threads)
    ry, rmean, rinvstd = reference.batch_norm_forward(x, None, None, eps=eps,
                                                      channel_axis=channel_axis)
    assert np.isfinite(y).all() and np.isfinite(mean).all()
    assert_close(y, ry, np.float32)
    assert_close(mean, rmean, np.float32)
    if (rinvstd < np.finfo(np.float32).max).all():  # subnormal data: 1/sqrt(var) saturates
        assert_close(invstd, rinvstd, np.float32)
        dx, _, _ = fastbn.batch_norm_backward(dy, x, None, mean, invstd,
                                              channel_axis=channel_axis,
                                              num_threads=num_threads)
        rdx, _, _ = reference.batch_norm_backward(dy, x, None, mean, invstd,
                                                  channel_axis=channel_axis)
        assert np.isfinite(dx).all()
        assert_close(dx, rdx, np.float32, scale=dx_scale(dy, None, invstd))
    else:
        assert_bitwise_equal(invstd, rinvstd)
