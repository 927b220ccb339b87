"""What fastbn.distributed promises beyond the arithmetic (issue 20).

- arrays documented as updated in place are updated in place or refused
  (:func:`merge_records`'s ``b``; ``mpi_allreduce``'s records are checked
  under MPI by ``tests/mpi_worker_sync.py``);
- the synchronized functions compare the fused activation and its slope
  across the ranks, as the layer compares its settings at construction;
- copies of a SyncBatchNorm keep its transport (a sub-communicator under
  MPI: ``tests/mpi_worker_sync.py``), pickling keeps it or refuses.

The ranks are threads joined by a fake all-reduce (helpers.FakeGroup).
"""

from __future__ import annotations

import copy
import pickle
import re

import numpy as np
import pytest
from helpers import assert_bitwise_equal, run_ranks, values

from fastbn.distributed import (HEADER, RECORD, TAG_STATS, TAG_SUM, SyncBatchNorm,
                                merge_records, sync_batch_norm_backward,
                                sync_batch_norm_backward_from_output, sync_batch_norm_forward)

C = 3


def records(seed, tag=TAG_STATS):
    rng = np.random.default_rng(seed)
    r = np.zeros((HEADER + C, RECORD))
    r[:, 0] = tag
    r[:, 1] = rng.integers(1, 9, len(r))
    r[:, 2] = rng.standard_normal(len(r))
    r[:, 3] = rng.uniform(0.5, 2, len(r))
    return r


# ------------------------------------------------ 5. in place means in place ----

LAYOUTS = {
    "strided rows": lambda r: np.repeat(r, 2, axis=0)[::2],
    "fortran": lambda r: np.asfortranarray(r),
    "strided flat": lambda r: np.repeat(r.reshape(-1), 2)[::2],
    "columns of a wider array": lambda r: np.concatenate([r, r], axis=1)[:, :RECORD],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tag", [TAG_STATS, TAG_SUM])
def test_merge_records_updates_a_non_contiguous_b_in_place(layout, tag):
    a, b = records(1, tag), records(2, tag)
    want = merge_records(a, b.copy())
    view = LAYOUTS[layout](b.copy())
    assert not view.flags.c_contiguous
    assert merge_records(a, view) is view
    assert_bitwise_equal(view.reshape(want.shape), want)


@pytest.mark.parametrize("b, exc, message", [
    (lambda r: r.astype(np.float32), TypeError, "b must have dtype float64, got float32"),
    (lambda r: r.tolist(), TypeError, "b must be a numpy.ndarray of float64"),
    (lambda r: np.frombuffer(r.tobytes()), ValueError,
     "b is updated in place and must be writeable"),
    (lambda r: np.broadcast_to(r[:1], r.shape), ValueError,
     "b is updated in place and must be writeable"),
], ids=["float32", "list", "read-only", "zero-stride"])
def test_merge_records_refuses_a_b_it_cannot_update_in_place(b, exc, message):
    a = records(1)
    target = b(records(2))
    before = np.array(target, dtype=object, copy=True)
    with pytest.raises(exc, match=f"merge_records: {message}"):
        merge_records(a, target)
    assert (np.array(target, dtype=object) == before).all()


# --------------------------------------- 6. activation agreed by the ranks ----

def rank_inputs(rank):
    rng = np.random.default_rng(30 + rank)
    x = rng.standard_normal((4, C, 5)).astype(np.float32)
    return x, rng.standard_normal(x.shape).astype(np.float32)


@pytest.mark.parametrize("activations, message", [
    ((None, "relu"), "disagree on activation: None on some ranks, 'relu' on others"),
    (("relu", "leaky_relu"), "disagree on activation: 'relu' on some ranks, 'leaky_relu'"),
    ((("leaky_relu", 0.1), ("leaky_relu", 0.2)),
     r"disagree on negative_slope \(of activation 'leaky_relu'\): 0.1 on some ranks, 0.2"),
])
def test_forward_ranks_that_disagree_on_the_activation_all_raise_and_change_nothing(
        activations, message):
    def work(rank, allreduce):
        act = activations[rank]
        act, slope = act if isinstance(act, tuple) else (act, 0.01)
        x, _ = rank_inputs(rank)
        rm, rv, count = np.zeros(C, np.float32), np.ones(C, np.float32), np.zeros((), np.int64)
        try:
            sync_batch_norm_forward(x, None, None, allreduce=allreduce, num_features=C,
                                    running_mean=rm, running_var=rv, num_batches_tracked=count,
                                    activation=act, negative_slope=slope)
        except ValueError as exc:
            assert (rm == 0).all() and (rv == 1).all() and count == 0
            return str(exc)
        return None

    for text in values(run_ranks(2, work)[0]):
        assert text is not None, "a rank did not raise"
        assert re.search(message, text), text


@pytest.mark.parametrize("from_output", [False, True])
def test_backward_ranks_that_disagree_on_the_slope_all_raise(from_output):
    def work(rank, allreduce):
        x, dy = rank_inputs(rank)
        ones, gamma = np.ones(C, np.float32), np.full(C, 1.5, np.float32)
        kwargs = dict(allreduce=allreduce, num_features=C, activation="leaky_relu",
                      negative_slope=0.1 if rank else 0.3)
        try:
            if from_output:
                sync_batch_norm_backward_from_output(dy, x, gamma, ones, ones, **kwargs)
            else:
                sync_batch_norm_backward(dy, x, gamma, np.zeros(C, np.float32), ones, **kwargs)
        except ValueError as exc:
            return str(exc)
        return None

    for text in values(run_ranks(2, work)[0]):
        assert text is not None and "disagree on negative_slope" in text, text


def test_a_slope_without_leaky_relu_is_not_compared():
    def work(rank, allreduce):
        x, _ = rank_inputs(rank)
        return sync_batch_norm_forward(x, None, None, allreduce=allreduce, num_features=C,
                                       activation="relu", negative_slope=0.1 * (rank + 1))[0]

    ys = values(run_ranks(2, work)[0])
    assert all((y >= 0).all() for y in ys)


# ----------------------------------------------------------- 6. copies ----

class Loopback:
    """A picklable one-rank transport that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, records):
        self.calls += 1
        return records


@pytest.mark.parametrize("how", ["deepcopy", "copy"])
def test_copies_keep_the_transport(how):
    transport = Loopback()
    bn = SyncBatchNorm(C, allreduce=transport, activation="leaky_relu")
    x = rank_inputs(0)[0][:, :, :, None]
    bn(x)
    twin = getattr(copy, how)(bn)
    assert twin._allreduce is transport and twin.comm is None
    assert twin._saved is None
    if how == "deepcopy":
        assert twin.running_mean is not bn.running_mean
        assert_bitwise_equal(twin.running_mean, bn.running_mean)
    calls = transport.calls
    assert_bitwise_equal(twin(x), bn(x))
    assert transport.calls == calls + 2


def test_copies_across_ranks_synchronize_over_the_same_group():
    def work(rank, allreduce):
        x, dy = rank_inputs(rank)
        bn = SyncBatchNorm(C, allreduce=allreduce)
        twin = copy.deepcopy(bn)
        y, y_twin = bn(x), twin(x)
        return y, y_twin, bn.backward(dy), twin.backward(dy)

    for y, y_twin, dx, dx_twin in values(run_ranks(2, work)[0]):
        assert_bitwise_equal(y_twin, y)
        assert_bitwise_equal(dx_twin, dx)


def test_pickling_keeps_a_transport_that_pickles():
    bn = SyncBatchNorm(C, allreduce=Loopback(), momentum=0.3)
    x = rank_inputs(0)[0]
    bn(x)
    again = pickle.loads(pickle.dumps(bn))
    assert isinstance(again._allreduce, Loopback) and again.comm is None
    assert_bitwise_equal(again(x), bn(x))
    assert_bitwise_equal(again.running_var, bn.running_var)


def test_pickling_a_transport_that_does_not_pickle_fails_there():
    bn = SyncBatchNorm(C, allreduce=lambda r: r)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(bn)
