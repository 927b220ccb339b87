"""SyncBatchNorm and the synchronized functions of fastbn.distributed.

Two kinds of tests:

- in-process, everywhere (no MPI needed): the reduction operator
  :func:`merge_records`, and the synchronized passes run by K threads that
  stand for K ranks, joined by a fake all-reduce (a barrier and the merge
  operator). They check exactness against the single-process functions
  for uneven and empty slices, one reduction per pass, the errors every
  rank raises when one rank's input is bad, and the layer API;
- under MPI (skipped without ``mpirun`` or mpi4py): ``mpirun -n K`` of
  ``tests/mpi_worker_sync.py`` for K = 1, 2, 3, 4 (oversubscribed on small
  machines) and for K = 3 with each of Open MPI's allreduce algorithms
  forced, with a timeout so that a hang fails instead of blocking; the calls
  one layer makes on a wrapped communicator; the MPI example against the
  one-process training.
"""

import importlib.util
import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import FakeGroup, assert_bitwise_equal, run_ranks, values

import fastbn
from fastbn.distributed import (TAG_CONFLICT, TAG_FIRST, TAG_RANGE, TAG_STATS, TAG_SUM,
                                SyncBatchNorm, merge_records, sync_batch_norm_backward,
                                sync_batch_norm_backward_from_output, sync_batch_norm_forward)
from fastbn.layers import BatchNorm, BatchNorm2d

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "mpi_worker_sync.py"
EXAMPLE = HERE.parent / "examples" / "train_digits_mpi.py"
TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-13}

LAYOUTS = {  # global shape, channel axis
    "NCHW": ((13, 6, 5, 7), 1),
    "NCHW-3ch": ((13, 3, 40, 40), 1),
    "ND": ((13, 11), 1),
    "NHWC": ((13, 4, 3, 6), -1),
}
SPLITS = {1: [13], 2: [9, 4], 3: [6, 0, 7], 4: [1, 5, 0, 7]}


def global_batch(shape, ca, dtype, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    C = shape[ca % ndim]
    per = [1] * ndim
    per[ca % ndim] = C
    x = (offset + rng.uniform(-2, 2, C).reshape(per)
         + rng.uniform(0.5, 2, C).reshape(per) * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, dy, gamma, beta, C


def close(actual, expected, dtype, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    diff = float(np.abs(actual - expected).max(initial=0.0))
    assert diff <= TOL[np.dtype(dtype)] * scale, f"{what}: max abs diff {diff:.3g}, " \
                                                 f"scale {scale:.3g}"


# -------------------------------------------------------------- the merge ----

def stats_record(v):
    v = np.asarray(v, np.float64)
    return (TAG_STATS, v.size, v.mean() if v.size else 0.0, v.var() if v.size else 0.0)


def test_merge_is_commutative_to_the_bit():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a = np.empty((12, 4))
        b = np.empty((12, 4))
        for rec in (a, b):
            rec[:, 0] = rng.choice([TAG_STATS, TAG_SUM, TAG_FIRST, TAG_RANGE], 12)
            rec[:, 1] = rng.choice([0, 1, 2, 7, 1e6], 12)
            rec[:, 2:] = rng.standard_normal((12, 2)) * 10.0 ** rng.integers(-3, 7, (12, 1))
        b[:, 0] = np.where(rng.random(12) < 0.9, a[:, 0], b[:, 0])
        numeric = (a[:, 0] == TAG_STATS) | (a[:, 0] == TAG_SUM)  # NaN data reach these only
        a[numeric & (rng.random(12) < 0.1), 2] = np.nan
        b[numeric & (rng.random(12) < 0.1), 2] = -np.nan
        ab = merge_records(a, b.copy())
        ba = merge_records(b, a.copy())
        assert_bitwise_equal(ab, ba)


def test_merge_gives_the_statistics_of_the_union_whatever_the_order():
    rng = np.random.default_rng(2)
    for trial in range(20):
        sizes = rng.integers(0, 50, rng.integers(1, 9))
        sizes[0] += 2
        pieces = [1e4 + rng.standard_normal(n) * rng.uniform(0.1, 5) for n in sizes]
        whole = np.concatenate(pieces)
        records = [np.array([stats_record(p)]) for p in pieces]
        for order in ("sequential", "reversed", "tree"):
            merged = FakeGroup(len(records), order).merge(list(records))[0]
            assert merged[1] == whole.size
            assert abs(merged[2] - whole.mean()) <= 1e-15 * abs(whole.mean())
            assert abs(merged[3] - whole.var()) <= 1e-12 * whole.var()


def test_merge_with_an_empty_side_is_exact():
    a = np.array([[TAG_STATS, 7, 0.1 + 0.2, 1 / 3]])
    empty = np.array([[TAG_STATS, 0, 0, 0]])
    assert_bitwise_equal(merge_records(empty, a.copy()), a)
    assert_bitwise_equal(merge_records(a, empty.copy()), a)
    assert_bitwise_equal(merge_records(empty, empty.copy()), empty)


def test_merge_rules_of_the_header_tags():
    a = np.array([[TAG_SUM, 1, 2, 3], [TAG_FIRST, 2, 5, 6], [TAG_FIRST, np.inf, 0, 0],
                  [TAG_RANGE, 4, 4, 1], [TAG_STATS, 1, 0, 0]])
    b = np.array([[TAG_SUM, 10, 20, 30], [TAG_FIRST, 1, 9, 9], [TAG_FIRST, 3, 1, 1],
                  [TAG_RANGE, 8, 8, 1], [TAG_SUM, 1, 0, 0]])
    out = merge_records(a, b.copy())
    assert out[0].tolist() == [TAG_SUM, 11, 22, 33]
    assert out[1].tolist() == [TAG_FIRST, 1, 9, 9]
    assert out[2].tolist() == [TAG_FIRST, 3, 1, 1]
    assert out[3].tolist() == [TAG_RANGE, 4, 8, 2]
    assert out[4, 0] == TAG_CONFLICT and np.isnan(out[4, 1:]).all()
    with pytest.raises(ValueError, match="same number of records"):
        merge_records(a, b[:2].copy())


# ------------------------------------------------------- functional, exact ----

def sync_step(x, dy, gamma, beta, C, ca, bounds, order="sequential", activation=None,
              from_output=False, **kwargs):
    """Forward and backward of every rank's slice (with a fused activation,
    and from the output when ``from_output``).

    Per rank: (y, mean, invstd, dx, dgamma, dbeta, running_mean, running_var).
    """
    act = dict(activation=activation, negative_slope=0.2)

    def work(rank, allreduce):
        part = slice(bounds[rank], bounds[rank + 1])
        rm = np.zeros(C, x.dtype)
        rv = np.ones(C, x.dtype)
        common = dict(allreduce=allreduce, num_features=C, channel_axis=ca, num_threads=1)
        y, mean, invstd = sync_batch_norm_forward(
            x[part], gamma, beta, running_mean=rm, running_var=rv, **act, **common, **kwargs)
        if from_output:
            dx, dgamma, dbeta = sync_batch_norm_backward_from_output(
                dy[part], y, gamma, beta, invstd, **act, **common)
        else:
            dx, dgamma, dbeta = sync_batch_norm_backward(
                dy[part], x[part], gamma, mean, invstd, beta=beta, **act, **common)
        return y, mean, invstd, dx, dgamma, dbeta, rm, rv
    return run_ranks(len(bounds) - 1, work, order=order)


def single_step(x, dy, gamma, beta, C, ca, activation=None, from_output=False, **kwargs):
    act = dict(activation=activation, negative_slope=0.2)
    rm = np.zeros(C, x.dtype)
    rv = np.ones(C, x.dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, running_mean=rm,
                                                running_var=rv, channel_axis=ca, **act,
                                                **kwargs)
    if from_output:
        dx, dgamma, dbeta = fastbn.batch_norm_backward_from_output(dy, y, gamma, beta, invstd,
                                                                   channel_axis=ca, **act)
    else:
        dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, beta=beta,
                                                       channel_axis=ca, **act)
    return y, mean, invstd, dx, dgamma, dbeta, rm, rv


NAMES = ("y", "mean", "invstd", "dx", "dgamma", "dbeta", "running_mean", "running_var")


@pytest.fixture(params=["baseline", "v3", "v4"])
def kernels(request, monkeypatch):
    """Run fastbn.functional and fastbn.distributed on the kernel modules of one
    level (skipped when this CPU lacks the level or the build lacks it)."""
    from fastbn import _cpu, _dispatch, _front
    level = request.param
    if level != "baseline" and not _cpu.supports(int(level[1:])):
        pytest.skip(f"this CPU lacks x86-64-{level}")
    suffix = "" if level == "baseline" else "_" + level
    try:
        planar = importlib.import_module("fastbn._planar" + suffix)
        columnar = importlib.import_module("fastbn._columnar" + suffix)
    except ImportError:
        pytest.skip(f"fastbn was built without the {level} kernels")
    chosen = _dispatch.planar, _dispatch.columnar
    monkeypatch.setattr(_dispatch, "planar", planar)
    monkeypatch.setattr(_dispatch, "columnar", columnar)
    _front.select(planar, columnar)  # the entries the public functions call
    yield level
    _front.select(*chosen)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_rank_is_the_single_process_function(layout, dtype, affine, kernels):
    """To the bit on every kernel level: the local sums are the fused kernel's,
    and each channel is finished by the functions the fused kernel inlines."""
    shape, ca = LAYOUTS[layout]
    x, dy, gamma, beta, C = global_batch(shape, ca, dtype)
    if not affine:
        gamma = beta = None
    (ours,), group = sync_step(x, dy, gamma, beta, C, ca, [0, shape[0]])
    expected = single_step(x, dy, gamma, beta, C, ca)
    for name, a, e in zip(NAMES, values([ours])[0], expected):
        assert_bitwise_equal(a, e, f"{name} ({kernels})")
    assert group.calls == 2


@pytest.mark.parametrize("order", ["sequential", "reversed", "tree"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [2, 3, 4])
def test_uneven_slices_give_the_single_process_result(size, layout, dtype, order):
    shape, ca = LAYOUTS[layout]
    x, dy, gamma, beta, C = global_batch(shape, ca, dtype, seed=size)
    bounds = np.cumsum([0] + SPLITS[size])
    results, group = sync_step(x, dy, gamma, beta, C, ca, bounds, order=order)
    results = values(results)
    expected = single_step(x, dy, gamma, beta, C, ca)
    y = np.concatenate([r[0] for r in results])
    dx = np.concatenate([r[3] for r in results])
    close(y, expected[0], dtype, "y")
    close(dx, expected[3], dtype, "dx")
    for i in (1, 2, 4, 5, 6, 7):
        close(results[0][i], expected[i], dtype, NAMES[i])
        for r in results[1:]:  # the same bits on every rank
            assert_bitwise_equal(r[i], results[0][i], NAMES[i])
    assert group.calls == 2  # one reduction forward, one backward


MODES = {"relu": dict(activation="relu"), "leaky_relu": dict(activation="leaky_relu"),
         "from-output": dict(from_output=True),
         "from-output leaky_relu": dict(activation="leaky_relu", from_output=True)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_activation_and_from_output_on_one_rank_are_the_single_process_bits(mode, layout,
                                                                             dtype):
    shape, ca = LAYOUTS[layout]
    x, dy, gamma, beta, C = global_batch(shape, ca, dtype, offset=0.0)
    (ours,), group = sync_step(x, dy, gamma, beta, C, ca, [0, shape[0]], **MODES[mode])
    expected = single_step(x, dy, gamma, beta, C, ca, **MODES[mode])
    for name, a, e in zip(NAMES, values([ours])[0], expected):
        assert_bitwise_equal(a, e, f"{name} ({mode})")
    assert group.calls == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_activation_and_from_output_across_ranks(mode, layout, dtype):
    """Three uneven ranks (one empty) give the single-process result of the
    same mode, and the same parameter gradients on every rank."""
    shape, ca = LAYOUTS[layout]
    x, dy, gamma, beta, C = global_batch(shape, ca, dtype, seed=7, offset=0.0)
    bounds = np.cumsum([0] + SPLITS[3])
    results = values(sync_step(x, dy, gamma, beta, C, ca, bounds, **MODES[mode])[0])
    expected = single_step(x, dy, gamma, beta, C, ca, **MODES[mode])
    for i, name in ((0, "y"), (3, "dx")):
        close(np.concatenate([r[i] for r in results]), expected[i], dtype, name)
    for i in (4, 5):
        close(results[0][i], expected[i], dtype, NAMES[i])
        for r in results[1:]:
            assert_bitwise_equal(r[i], results[0][i], NAMES[i])


def test_from_output_refusals_reach_every_rank():
    """relu cannot be inverted, gamma with a zero neither: every rank raises,
    the failing rank its own ValueError."""
    shape, ca = LAYOUTS["NCHW"]
    x, dy, gamma, beta, C = global_batch(shape, ca, np.float64)
    zero = gamma.copy()
    zero[2] = 0.0

    def work(rank, allreduce):
        return sync_batch_norm_backward_from_output(
            dy[:6], x[:6], zero if rank == 1 else gamma, beta, np.ones(C), allreduce=allreduce,
            num_features=C)
    results, _ = run_ranks(2, work)
    assert isinstance(results[1], ValueError) and "channel(s) 2" in str(results[1])
    assert isinstance(results[0], ValueError) and "rank 1" in str(results[0])


def test_data_far_from_zero_keep_their_digits():
    shape, ca = (40, 5, 6, 6), 1
    x, dy, gamma, beta, C = global_batch(shape, ca, np.float64, offset=1e6)
    results, _ = sync_step(x, dy, gamma, beta, C, ca, [0, 3, 3, 25, 40])
    y = np.concatenate([r[0] for r in values(results)])
    expected, _, invstd = fastbn.reference.batch_norm_forward(x, gamma, beta)
    # the mean itself is known to half an ulp of 1e6 at best: y to a few of those
    ulp = np.spacing(1e6) * np.abs(gamma * invstd).max()
    assert np.abs(y - expected).max() <= 2 * ulp


def test_momentum_none_and_counter():
    shape, ca = (13, 6, 5, 7), 1
    x, dy, gamma, beta, C = global_batch(shape, ca, np.float64)
    counters = [np.zeros((), np.int64) for _ in range(3)]

    def work(rank, allreduce):
        part = slice(*[(0, 6), (6, 6), (6, 13)][rank])
        rm, rv = np.zeros(C), np.ones(C)
        for _ in range(2):
            sync_batch_norm_forward(x[part], gamma, beta, allreduce=allreduce, num_features=C,
                                    running_mean=rm, running_var=rv, momentum=None,
                                    num_batches_tracked=counters[rank])
        return rm, rv

    results = values(run_ranks(3, work)[0])
    rm, rv, count = np.zeros(C), np.ones(C), np.zeros((), np.int64)
    for _ in range(2):
        fastbn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                  momentum=None, num_batches_tracked=count)
    for got_rm, got_rv in results:
        close(got_rm, rm, np.float64, "running_mean")
        close(got_rv, rv, np.float64, "running_var")
    assert [int(c) for c in counters] == [2, 2, 2]


def test_out_and_in_place():
    shape, ca = (10, 4, 3, 3), 1
    x, dy, gamma, beta, C = global_batch(shape, ca, np.float32)
    expected = single_step(x, dy, gamma, beta, C, ca)

    def work(rank, allreduce):
        part = slice(0, 4) if rank == 0 else slice(4, 10)
        xl, dyl = x[part].copy(), dy[part].copy()
        y, mean, invstd = sync_batch_norm_forward(xl.copy(), gamma, beta, allreduce=allreduce,
                                                  num_features=C)
        out = np.empty_like(xl)
        y2, _, _ = sync_batch_norm_forward(xl, gamma, beta, allreduce=allreduce,
                                           num_features=C, out=out)
        assert y2 is out
        dx, _, _ = sync_batch_norm_backward(dyl, x[part], gamma, mean, invstd,
                                            allreduce=allreduce, num_features=C, out=dyl)
        assert dx is dyl
        return y2, dx

    results = values(run_ranks(2, work)[0])
    close(np.concatenate([r[0] for r in results]), expected[0], np.float32, "y")
    close(np.concatenate([r[1] for r in results]), expected[3], np.float32, "dx")


# -------------------------------------------------------------- errors ----

def bad_rank_case(size, bad, make_bad, action, **kwargs):
    """Rank ``bad`` passes make_bad(x) instead of x; every rank's exception."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)

    def work(rank, allreduce):
        xl = make_bad(x) if rank in bad else x
        return action(xl, allreduce)

    results, group = run_ranks(size, work)
    return results, group


def forward_action(xl, allreduce):
    return sync_batch_norm_forward(xl, None, None, allreduce=allreduce, num_features=3)


@pytest.mark.parametrize("case", ["channels", "dtype", "ndim", "not-an-array", "eps"])
def test_a_bad_rank_makes_every_rank_raise(case):
    make_bad, error, words = {
        "channels": (lambda x: np.concatenate([x, x[:, :1]], axis=1), ValueError,
                     ["rank 1", "4 channels"]),
        "dtype": (lambda x: x.astype(np.int64), TypeError, ["rank 1", "int64"]),
        "ndim": (lambda x: x[0, 0, 0], ValueError, ["rank 1", "1-D"]),
        "not-an-array": (lambda x: x.tolist(), TypeError, ["rank 1", "numpy.ndarray"]),
        "eps": (lambda x: x, ValueError, ["rank 1", "ValueError"]),
    }[case]
    bad_eps = case == "eps"

    def action(xl, allreduce):
        eps = -1.0 if (bad_eps and allreduce.rank == 1) else 1e-5
        return sync_batch_norm_forward(xl, None, None, allreduce=allreduce, num_features=3,
                                       eps=eps)

    results, group = bad_rank_case(3, {1}, make_bad, action)
    assert group.calls == 1
    for rank, exc in enumerate(results):
        assert isinstance(exc, error), (rank, exc)
        if rank == 1:
            assert "rank 1 of 3" in str(exc)  # its own message, with its rank
        else:
            for word in words:
                assert word in str(exc), (rank, str(exc))


def test_two_bad_ranks_are_both_named():
    results, _ = bad_rank_case(4, {0, 3}, lambda x: x.astype(np.int32),
                               forward_action)
    for exc in results:
        assert isinstance(exc, TypeError)
        assert "ranks 0 and 3" in str(exc)


def test_different_dtypes_on_the_ranks():
    results, _ = bad_rank_case(2, {0}, lambda x: x.astype(np.float64), forward_action)
    for exc in results:
        assert isinstance(exc, TypeError) and "disagree on the dtype" in str(exc)


@pytest.mark.parametrize("setting", ["eps", "momentum"])
def test_different_settings_on_the_ranks(setting):
    """The header carries eps and the running statistics' weight: ranks that
    disagree all raise, and nothing is updated."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)

    def work(rank, allreduce):
        value = {"eps": (1e-3, 1e-5), "momentum": (0.5, 0.1)}[setting][rank != 1]
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        try:
            sync_batch_norm_forward(x, None, None, allreduce=allreduce, num_features=3,
                                    running_mean=rm, running_var=rv, **{setting: value})
        except ValueError as exc:
            assert (rm == 0).all() and (rv == 1).all()
            return exc
        return None

    results, group = run_ranks(3, work)
    assert group.calls == 1
    for exc in results:
        assert isinstance(exc, ValueError), exc
        assert f"disagree on {setting}" in str(exc)


def test_ranks_that_disagree_on_unbiased_all_raise_and_change_nothing():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)

    def work(rank, allreduce):
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        try:
            sync_batch_norm_forward(x, None, None, allreduce=allreduce, num_features=3,
                                    running_mean=rm, running_var=rv, unbiased=rank != 1)
        except ValueError as exc:
            assert (rm == 0).all() and (rv == 1).all()
            return exc
        return None

    results, _ = run_ranks(3, work)
    for exc in results:
        assert isinstance(exc, ValueError) and "disagree on unbiased" in str(exc), exc


def test_a_bad_flag_on_one_rank_joins_the_reduction():
    """unbiased=1 (not a bool) on one rank: checked inside the pass, so that rank
    joins the reduction and every rank raises; nothing hangs."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)

    def work(rank, allreduce):
        return sync_batch_norm_forward(x, None, None, allreduce=allreduce, num_features=3,
                                       unbiased=1 if rank == 1 else True)

    results, group = run_ranks(2, work)
    assert group.calls == 1
    assert isinstance(results[1], TypeError) and "unbiased must be True or False" in str(
        results[1])
    assert isinstance(results[0], TypeError) and "rank 1" in str(results[0])


def test_a_bad_per_channel_argument_is_not_blamed_on_x():
    """The other ranks are told the exception type of a failing gamma, not a
    description of x."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float64)

    def work(rank, allreduce):
        gamma = np.ones(3, np.float32 if rank == 1 else np.float64)
        return sync_batch_norm_forward(x, gamma, None, allreduce=allreduce, num_features=3)

    results, _ = run_ranks(2, work)
    assert "gamma must have the dtype of x" in str(results[1])
    assert isinstance(results[0], TypeError)
    assert "x has dtype" not in str(results[0]) and "TypeError" in str(results[0])


def test_without_rank_numbers_two_failures_are_not_mixed():
    """An allreduce without rank and size: the detail of two failing ranks could
    mix, so the others are told the exception type only."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    group = FakeGroup(3)

    def work(rank):
        member = group.member(rank)
        xl = x[None, None, None] if rank == 0 else x[:, :2] if rank == 1 else x
        return sync_batch_norm_forward(xl, None, None, allreduce=lambda r: member(r),
                                       num_features=3)

    results = [None] * 3

    def target(rank):
        try:
            results[rank] = work(rank)
        except BaseException as exc:  # noqa: BLE001
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(results[2], ValueError), results[2]
    assert "2 ranks" in str(results[2]) and "failed the checks (ValueError" in str(results[2])


def test_an_interrupted_rank_still_joins_the_reduction():
    """A KeyboardInterrupt while one rank checks its arguments: that rank joins
    the reduction, then raises its KeyboardInterrupt; the others raise a
    RuntimeError that says so. Nothing hangs."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)

    class Interrupting(np.ndarray):
        @property
        def ndim(self):
            raise KeyboardInterrupt

    def work(rank, allreduce):
        xl = x.view(Interrupting) if rank == 1 else x
        return sync_batch_norm_forward(xl, None, None, allreduce=allreduce, num_features=3)

    results, group = run_ranks(3, work)
    assert group.calls == 1
    assert isinstance(results[1], KeyboardInterrupt)
    for rank in (0, 2):
        assert isinstance(results[rank], RuntimeError)
        assert "rank 1 of 3 was interrupted" in str(results[rank])


def test_bad_dy_in_the_backward():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)

    def work(rank, allreduce):
        y, mean, invstd = sync_batch_norm_forward(x, None, None, allreduce=allreduce,
                                                  num_features=3)
        dy = np.ones_like(x)[:3] if rank == 2 else np.ones_like(x)
        return sync_batch_norm_backward(dy, x, None, mean, invstd, allreduce=allreduce,
                                        num_features=3)

    results, group = run_ranks(3, work)
    assert group.calls == 2
    for exc in results:
        assert isinstance(exc, ValueError) and "rank 2" in str(exc) and "shape" in str(exc)


def test_a_forward_meeting_a_backward_is_an_error_on_every_rank():
    x = np.ones((4, 3), np.float32)
    mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)

    def work(rank, allreduce):
        if rank == 0:
            return sync_batch_norm_forward(x, None, None, allreduce=allreduce, num_features=3)
        return sync_batch_norm_backward(x, x, None, mean, invstd, allreduce=allreduce,
                                        num_features=3)

    for exc in run_ranks(2, work)[0]:
        assert isinstance(exc, RuntimeError) and "different calls" in str(exc)


def test_one_value_per_channel_in_the_global_batch():
    def work(rank, allreduce):
        x = np.ones((1 if rank == 1 else 0, 5), np.float64)
        return sync_batch_norm_forward(x, None, None, allreduce=allreduce, num_features=5)

    for exc in run_ranks(3, work)[0]:
        assert isinstance(exc, ValueError)
        assert "Expected more than 1 value per channel when training" in str(exc)


def test_a_call_that_fails_changes_nothing():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)

    def work(rank, allreduce):
        xl = x.copy() if rank == 0 else x[:, :2].copy()
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        count = np.zeros((), np.int64)
        before = xl.copy()
        with pytest.raises(ValueError):
            sync_batch_norm_forward(xl, None, None, allreduce=allreduce, num_features=3,
                                    running_mean=rm, running_var=rv, num_batches_tracked=count,
                                    out=xl if rank == 0 else None)
        assert_bitwise_equal(xl, before)
        assert (rm == 0).all() and (rv == 1).all() and int(count) == 0

    values(run_ranks(2, work)[0])


def test_functional_argument_errors():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="allreduce must be callable"):
        sync_batch_norm_forward(x, None, None, allreduce=None, num_features=3)
    with pytest.raises(TypeError, match="num_features"):
        sync_batch_norm_forward(x, None, None, allreduce=lambda r: r, num_features=3.0)
    with pytest.raises(ValueError, match="num_features"):
        sync_batch_norm_backward(x, x, None, x[0], x[0], allreduce=lambda r: r, num_features=0)


# --------------------------------------------------------------- layer ----

def layer_work(shape, ca, dtype, bounds, steps=2, **config):
    """SyncBatchNorm over fake ranks and BatchNorm on the whole batch, step by step."""
    C = shape[ca % len(shape)]
    batches = [global_batch(shape, ca, dtype, seed=s)[:2] for s in range(steps + 1)]

    def work(rank, allreduce):
        part = slice(bounds[rank], bounds[rank + 1])
        bn = SyncBatchNorm(C, dtype=dtype, channel_axis=ca, num_threads=1,
                           allreduce=allreduce, **config)
        out = []
        for x, dy in batches[:steps]:
            y = bn(x[part])
            dx = bn.backward(dy[part])
            out.append((y, dx, bn.dgamma, bn.dbeta))
        out.append((bn.eval()(batches[-1][0][part]),))
        return bn, out

    results, group = run_ranks(len(bounds) - 1, work)
    ref = BatchNorm(C, dtype=dtype, channel_axis=ca, **config)
    expected = []
    for x, dy in batches[:steps]:
        expected.append((ref(x), ref.backward(dy), ref.dgamma, ref.dbeta))
    expected.append((ref.eval()(batches[-1][0]),))
    return values(results), expected, ref, group


@pytest.mark.parametrize("config", [dict(), dict(momentum=None), dict(affine=False),
                                    dict(track_running_stats=False), dict(activation="relu"),
                                    dict(activation="leaky_relu", negative_slope=0.2,
                                         memory_saving=True)],
                         ids=["default", "momentum=None", "affine=False", "no-running-stats",
                              "relu", "leaky-memory-saving"])
def test_layer_matches_the_single_process_layer(config):
    shape, ca, dtype = (13, 6, 5, 7), 1, np.float64
    bounds = [0, 6, 6, 13]
    results, expected, ref, group = layer_work(shape, ca, dtype, bounds, **config)
    assert group.calls == 4  # two training steps, one reduction each way; eval: none
    for step, want in enumerate(expected):
        for k, w in enumerate(want):
            if w is None:
                continue
            if k in (0, 1):  # y, dx: per rank slices
                got = np.concatenate([r[1][step][k] for r in results])
                if step == len(expected) - 1 and not ref.track_running_stats:
                    continue  # eval without running stats: local batch statistics
                close(got, w, dtype, f"step {step} output {k}")
            else:
                for r in results:
                    close(r[1][step][k], w, dtype, f"step {step} output {k}")
    for bn, _ in results:
        for key, value in ref.state_dict().items():
            close(bn.state_dict()[key], value, dtype, key)


def test_layer_eval_communicates_nothing_and_takes_empty_slices():
    shape, ca = (8, 3, 4, 4), 1
    x, dy, *_ = global_batch(shape, ca, np.float32)

    def work(rank, allreduce):
        bn = SyncBatchNorm(3, num_threads=1, allreduce=allreduce)
        part = slice(0, 8) if rank == 0 else slice(8, 8)  # rank 1: empty
        bn(x[part])
        dx = bn.backward(dy[part])
        bn.eval()
        y = bn(x[part])
        dx_eval = bn.backward(dy[part])
        return dx.shape, y.shape, dx_eval.shape, bn.dgamma

    results, group = run_ranks(2, work)
    results = values(results)
    assert group.calls == 2
    assert results[1][:3] == ((0, 3, 4, 4),) * 3


def test_memory_saving_layer_with_a_zero_gamma_raises_on_every_rank():
    x, dy, *_ = global_batch((8, 3, 4, 4), 1, np.float32)

    def work(rank, allreduce):
        bn = SyncBatchNorm(3, num_threads=1, allreduce=allreduce, memory_saving=True)
        bn.gamma[1] = 0
        part = slice(0, 5) if rank == 0 else slice(5, 8)
        bn(x[part])
        return bn.backward(dy[part])

    for exc in run_ranks(2, work)[0]:
        assert isinstance(exc, ValueError) and "gamma is 0 in channel(s) 1" in str(exc)


def test_layer_bad_input_on_one_rank():
    x = np.ones((4, 3, 2, 2), np.float32)

    def work(rank, allreduce):
        bn = BatchNorm2d(3)
        sync = SyncBatchNorm.from_batch_norm(bn, allreduce=allreduce)
        return sync(x[:, :, 0] if rank == 0 else x)

    for exc in run_ranks(2, work)[0]:
        assert isinstance(exc, ValueError) and "rank 0" in str(exc)
        assert "4-D" in str(exc)


def test_from_batch_norm_shares_the_arrays_and_the_mode():
    bn = BatchNorm2d(5, momentum=0.3, dtype=np.float64).eval()
    sync = SyncBatchNorm.from_batch_norm(bn, allreduce=lambda r: r)
    assert sync.gamma is bn.gamma and sync.beta is bn.beta
    assert sync.running_mean is bn.running_mean and sync.running_var is bn.running_var
    assert sync.num_batches_tracked is bn.num_batches_tracked
    assert not sync.training and sync.momentum == 0.3 and sync.dtype == np.float64
    assert sync._ndims == (4,)
    with pytest.raises(TypeError, match="BatchNorm layer"):
        SyncBatchNorm.from_batch_norm(object(), allreduce=lambda r: r)


def test_layer_state_pickles_and_loads_into_a_new_layer():
    bn = SyncBatchNorm(4, allreduce=lambda r: r).eval()
    bn.running_mean[...] = 2.0
    copy = pickle.loads(pickle.dumps(bn.state_dict()))
    again = SyncBatchNorm(4, allreduce=lambda r: r)
    again.load_state_dict(copy)
    assert (again.running_mean == 2.0).all()


def test_layer_constructor_errors():
    with pytest.raises(ValueError, match="not both"):
        SyncBatchNorm(4, comm=object(), allreduce=lambda r: r)
    with pytest.raises(TypeError, match="allreduce must be callable"):
        SyncBatchNorm(4, allreduce=3)
    with pytest.raises(TypeError, match="mpi4py.MPI.Comm"):
        SyncBatchNorm(4, comm=object())
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0, allreduce=lambda r: r)


def test_import_fastbn_does_not_import_mpi4py():
    code = ("import sys, fastbn, fastbn.distributed; fastbn.SyncBatchNorm; "
            "print('mpi4py' in sys.modules, 'SyncBatchNorm' in fastbn.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=60, check=True, cwd=HERE).stdout.split()
    assert out == ["False", "True"]


def test_missing_mpi4py_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r'pip install "fastbn\[mpi\]"') as info:
        SyncBatchNorm(4)
    assert "Open MPI" in str(info.value) and "mpirun" in str(info.value)


def test_missing_mpi_library_says_how_to_install_it():
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip('no mpi4py (pip install "fastbn[mpi]")')
    env = subprocess_env()
    env["MPI4PY_LIBMPI"] = "/nonexistent/libmpi.so"  # mpi4py >= 4 loads the library at import
    code = ("import fastbn\n"
            "try:\n    fastbn.SyncBatchNorm(4)\n"
            "except ImportError as exc:\n    print('ImportError', exc)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, cwd=HERE)
    if "ImportError" not in run.stdout and run.returncode == 0:
        pytest.skip("this mpi4py found an MPI library anyway")
    assert 'pip install "fastbn[mpi]"' in run.stdout, run.stdout + run.stderr


class CountingComm:
    """Wraps an mpi4py communicator and counts every call but rank/size queries."""

    LOCAL = {"Get_rank", "Get_size", "Is_inter", "Is_intra"}

    def __init__(self, comm):
        self._comm = comm
        self.calls = {}

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if not callable(attr) or name in self.LOCAL:
            return attr

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)
        return counted


def test_single_process_mpi_layer_counts_one_allreduce_per_pass():
    require_mpi()
    # mpi4py initializes MPI in this process (a singleton, no mpirun needed)
    run = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); import numpy as np;"
         "from mpi4py import MPI; from test_sync import CountingComm, check_counts;"
         "check_counts(CountingComm(MPI.COMM_WORLD))", str(HERE)],
        capture_output=True, text=True, env=subprocess_env(), timeout=120, cwd=HERE)
    if run.returncode != 0 and "mpirun" in run.stderr + run.stdout and "singleton" in (
            run.stderr + run.stdout).lower():
        pytest.skip("this MPI cannot start a process without mpirun")
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        "construction": {"allgather": 1}, "forward": {"Allreduce": 1},
        "backward": {"Allreduce": 1}, "eval": {}}


def check_counts(comm):
    """Run in a subprocess by the test above: calls per construction, forward, backward."""
    counts = {}
    bn = SyncBatchNorm(3, comm=comm, num_threads=1)
    counts["construction"], comm.calls = comm.calls, {}
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    y = bn(x)
    counts["forward"], comm.calls = comm.calls, {}
    bn.backward(np.ones_like(y))
    counts["backward"], comm.calls = comm.calls, {}
    bn.eval()(x)
    counts["eval"] = comm.calls
    np.testing.assert_allclose(y, BatchNorm(3)(x), rtol=1e-6, atol=1e-6)
    print(json.dumps(counts))


# ------------------------------------------------------------------ MPI ----

def subprocess_env():
    """The environment of a child: this fastbn importable, one OpenMP thread, root allowed."""
    env = dict(os.environ)
    package_root = str(pathlib.Path(fastbn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"          # Open MPI refuses root without these
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"  # more ranks than cores
    return env


def require_mpi():
    """mpirun's path; skips the test without an MPI installation or without mpi4py.

    (This process never imports mpi4py.MPI: that would initialize MPI here.)
    """
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        pytest.skip("no mpirun (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip('no mpi4py (pip install "fastbn[mpi]")')
    return mpirun


def mpirun_command(size):
    mpirun = require_mpi()
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    flags = ["--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    return [mpirun, *flags, "-n", str(size)]


def run_mpi(size, args, timeout, env=()):
    """The RESULT line of a run that must succeed."""
    returncode, stdout, stderr = mpirun(size, args, timeout, env)
    assert returncode == 0, f"exit code {returncode}\n{stdout}\n{stderr}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout + stderr
    return json.loads(lines[0][len("RESULT "):])


def mpirun(size, args, timeout, env=()):
    """(exit code, stdout, stderr) of ``mpirun -n size python -m mpi4py args``;
    the test fails if it does not end within ``timeout`` seconds."""
    command = mpirun_command(size) + [sys.executable, "-m", "mpi4py", *map(str, args)]
    # a session of its own, so that a hang is ended with every process mpirun started
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**subprocess_env(), **dict(env)}, cwd=HERE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpirun -n {size} hung: no result in {timeout} s\n{stdout}\n{stderr}")
    return proc.returncode, stdout, stderr


UNCAUGHT = {
    # the functional form, num_features 5 on the last rank and 4 on the others: the
    # reduction buffers differ in length; some rank raises (from the header or from
    # MPI_ERR_TRUNCATE), and others may be left inside the reduction by the MPI library
    "num_features": """
x = np.ones((3, C, 2), np.float32)
sync_batch_norm_forward(x, None, None, allreduce=mpi_allreduce(comm), num_features=C)
""",
    # an error between a forward and its backward on one rank: the others wait in the
    # backward's reduction
    "between forward and backward": """
bn = SyncBatchNorm(4, comm=comm)
y = bn(np.ones((3, 4, 2), np.float32) + comm.rank)
if comm.rank == comm.size - 1:
    raise ValueError("an error in the user's code between forward and backward")
bn.backward(y)
""",
}


@pytest.mark.parametrize("case", UNCAUGHT)
def test_an_uncaught_error_on_one_rank_ends_the_run(case, tmp_path):
    """Under ``python -m mpi4py`` (how the README, the example and the
    docstrings run MPI scripts) an uncaught exception on one rank aborts every
    rank: the run ends with an error, it does not hang."""
    script = tmp_path / "uncaught.py"
    script.write_text("import numpy as np\n"
                      "from mpi4py import MPI\n"
                      "from fastbn.distributed import (SyncBatchNorm, mpi_allreduce,\n"
                      "                                sync_batch_norm_forward)\n"
                      "comm = MPI.COMM_WORLD\n"
                      "C = 5 if comm.rank == comm.size - 1 else 4\n" + UNCAUGHT[case])
    returncode, stdout, stderr = mpirun(3, [script], timeout=120)
    assert returncode != 0, stdout + stderr
    assert ("num_features" if case == "num_features" else "between forward") in stdout + stderr


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_mpi_ranks_match_one_process(size):
    # one rank: with the baseline kernels, the worker checks the single-process bits
    result = run_mpi(size, [WORKER], timeout=300,
                     env={"FASTBN_KERNELS": "baseline"} if size == 1 else {})
    assert result["failures"] == []
    assert result["size"] == size and sum(result["splits"]) == 13
    assert len(result["cases"]) >= 14
    assert result["calls"]["forward"] == ['{"Allreduce": 1}']
    assert result["calls"]["backward"] == ['{"Allreduce": 1}']
    assert result["calls"]["eval forward"] == ["{}"]
    if size > 1:
        expected = {"channels", "dtype", "ndim", "backward dy shape", "construction",
                    "functional dtypes", "mixed calls", "functional eps", "big-endian",
                    "interrupt", "COMM_NULL"} | ({"functional num_features"} if size == 2
                                                 else set())
        assert expected <= set(result["errors"])
        for per_rank in result["errors"].values():
            assert len(per_rank) == size and all(kind is not None for _, kind, _ in per_rank)


@pytest.mark.parametrize("algorithm", range(1, 7))
def test_every_open_mpi_allreduce_algorithm_gives_every_rank_the_same_bits(algorithm):
    """Open MPI's tuned allreduce: 1 linear, 2 reduce + bcast, 3 recursive doubling, 4 ring,
    5 segmented ring, 6 Rabenseifner; the worker checks the statistics, running statistics
    and gradients to be the same bits on every rank and to match one process."""
    version = subprocess.run([require_mpi(), "--version"], capture_output=True,
                             text=True).stdout
    if "Open MPI" not in version and "OpenRTE" not in version:
        pytest.skip("Open MPI's algorithm switches")
    result = run_mpi(3, [WORKER], timeout=300,
                     env={"OMPI_MCA_coll_tuned_use_dynamic_rules": "1",
                          "OMPI_MCA_coll_tuned_allreduce_algorithm": str(algorithm)})
    assert result["failures"] == []


def test_mpi_example_matches_one_process():
    pytest.importorskip("sklearn")
    if not EXAMPLE.exists():
        pytest.skip("no examples/ beside tests/ (a copy of the tests alone)")
    result = run_mpi(2, [EXAMPLE, "--epochs", "2", "--channels", "8", "--hidden", "32",
                         "--compare", "--json"], timeout=600)
    assert result["same_params"]
    np.testing.assert_allclose(result["loss"], result["one_loss"], rtol=1e-4)
    assert abs(result["test_accuracy"][-1] - result["one_test_accuracy"][-1]) <= 0.01
    assert result["test_accuracy"][-1] > 0.85
    assert result["step_peak_bytes"] > 0  # the summary's peak memory is measured, not 0.00 MiB


@pytest.mark.parametrize("case", ["running_mean is gamma", "running_var is running_mean",
                                  "num_batches_tracked inside running_var"])
def test_sync_forward_refuses_what_the_single_process_forward_refuses(case):
    """The synchronized forward runs the single-process overlap checks: an
    array it writes may share memory with no other argument, and a refused
    call changes nothing (on one rank, as on every rank)."""
    shape, ca = (6, 3, 2, 2), 1
    x, _, gamma, beta, C = global_batch(shape, ca, np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    counter = np.zeros(1, np.int64)
    if case == "running_mean is gamma":
        rm = gamma
    elif case == "running_var is running_mean":
        rv = rm
    else:
        counter = rv[:1].view(np.int64)
    before = [a.copy() for a in (gamma, rm, rv, counter)]

    def work(rank, allreduce):
        return sync_batch_norm_forward(x, gamma, beta, allreduce=allreduce, num_features=C,
                                       running_mean=rm, running_var=rv,
                                       num_batches_tracked=counter)

    (result,), _ = run_ranks(1, work)
    assert isinstance(result, ValueError) and "overlaps" in str(result), repr(result)
    for a, b in zip((gamma, rm, rv, counter), before):
        np.testing.assert_array_equal(a, b)
