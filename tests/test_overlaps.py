"""Every entry point that writes refuses arrays that share memory, and changes nothing.

An array a call writes (the running statistics, ``num_batches_tracked``,
``out``) may share memory with no other argument, except ``out`` being the
input it replaces (x in the forwards, dy in the backwards). The synchronized
forward once checked less than the single-process one and wrote through
gamma; here every writing entry point gets the same cases: the functions,
the synchronized functions (one rank, its own records as the reduction) and
the layers, whose arrays can be made to alias by assignment.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_unchanged, snapshot

import fastbn
from fastbn.distributed import SyncBatchNorm, sync_batch_norm_backward, sync_batch_norm_forward

C = 3
SHAPE = (4, C, 5, 2)


def one_rank(records):
    """The reduction of one rank: its own records."""
    return records


def arrays():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(SHAPE)
    return dict(x=x, dy=rng.standard_normal(SHAPE), gamma=rng.uniform(0.5, 1.5, C),
                beta=rng.standard_normal(C), running_mean=np.zeros(C), running_var=np.ones(C),
                num_batches_tracked=np.zeros((), np.int64), mean=x.mean(axis=(0, 2, 3)),
                invstd=np.ones(C), out=None)


def shift_out_over(name):
    """An edit: ``name`` moves into a buffer one element longer and ``out`` starts
    one element into it (they overlap without being the same array)."""
    def edit(a):
        buf = np.empty(a[name].size + 1)
        buf[:-1] = a[name].reshape(-1)
        a[name] = buf[:-1].reshape(SHAPE)
        a["out"] = buf[1:].reshape(SHAPE)
    return edit


def inside_out(name):
    """An edit: the (C,) array ``name`` becomes the first C values of ``out``."""
    def edit(a):
        out = np.empty(SHAPE)
        out.reshape(-1)[:C] = a[name]
        a["out"] = out
        a[name] = out.reshape(-1)[:C]
    return edit


def alias(name, value):
    """An edit: ``name`` becomes a view of other arrays' memory (value(a))."""
    return lambda a: a.__setitem__(name, value(a))


TRAINING = {
    "running_mean is gamma": alias("running_mean", lambda a: a["gamma"]),
    "running_var is running_mean": alias("running_var", lambda a: a["running_mean"]),
    "running_var is beta reversed": alias("running_var", lambda a: a["beta"][::-1]),
    "running_mean inside x": alias("running_mean", lambda a: a["x"].reshape(-1)[5:5 + C]),
    "num_batches_tracked inside running_var": alias(
        "num_batches_tracked", lambda a: a["running_var"][:1].view(np.int64).reshape(())),
    "out shifted over x": shift_out_over("x"),
    "gamma inside out": inside_out("gamma"),
}
INFERENCE = {
    "out shifted over x": shift_out_over("x"),
    "running_var inside out": inside_out("running_var"),
}
BACKWARD = {
    "out is x": alias("out", lambda a: a["x"]),
    "out shifted over dy": shift_out_over("dy"),
    "invstd inside out": inside_out("invstd"),
}


def forward(a):
    return fastbn.batch_norm_forward(
        a["x"], a["gamma"], a["beta"], running_mean=a["running_mean"],
        running_var=a["running_var"], num_batches_tracked=a["num_batches_tracked"],
        out=a["out"])


def sync_forward(a):
    return sync_batch_norm_forward(
        a["x"], a["gamma"], a["beta"], allreduce=one_rank, num_features=C,
        running_mean=a["running_mean"], running_var=a["running_var"],
        num_batches_tracked=a["num_batches_tracked"], out=a["out"])


def inference(a):
    return fastbn.batch_norm_inference(a["x"], a["gamma"], a["beta"], a["running_mean"],
                                       a["running_var"], out=a["out"])


def backward(a):
    return fastbn.batch_norm_backward(a["dy"], a["x"], a["gamma"], a["mean"], a["invstd"],
                                      out=a["out"])


def sync_backward(a):
    return sync_batch_norm_backward(a["dy"], a["x"], a["gamma"], a["mean"], a["invstd"],
                                    allreduce=one_rank, num_features=C, out=a["out"])


CASES = [pytest.param(call, edit, id=f"{call.__name__}-{name}")
         for calls, cases in (((forward, sync_forward), TRAINING), ((inference,), INFERENCE),
                              ((backward, sync_backward), BACKWARD))
         for call in calls for name, edit in cases.items()]


@pytest.mark.parametrize("call, edit", CASES)
def test_functions_refuse_overlaps_and_change_nothing(call, edit):
    a = arrays()
    edit(a)
    before = snapshot(**a)
    with pytest.raises(ValueError, match="overlaps"):
        call(a)
    assert_unchanged(before)


@pytest.mark.parametrize("layer", [
    pytest.param(lambda: fastbn.BatchNorm2d(C, dtype=np.float64), id="BatchNorm2d"),
    pytest.param(lambda: SyncBatchNorm(C, dtype=np.float64, allreduce=one_rank),
                 id="SyncBatchNorm")])
@pytest.mark.parametrize("target", ["gamma", "beta"])
def test_layers_refuse_a_parameter_that_is_a_running_statistic(layer, target):
    """``bn.gamma = bn.running_mean`` is refused by the setter (the parameters
    need memory of their own); set behind its back, the training forward then
    refuses to write through it."""
    bn = layer()
    with pytest.raises(ValueError, match=f"{target} overlaps running_mean"):
        setattr(bn, target, bn.running_mean)
    setattr(bn, f"_{target}", bn.running_mean)
    x = arrays()["x"]
    before = snapshot(running_mean=bn.running_mean, running_var=bn.running_var,
                      count=bn.num_batches_tracked, other=bn.beta if target == "gamma"
                      else bn.gamma, x=x)
    with pytest.raises(ValueError, match=f"running_mean overlaps {target}"):
        bn(x)
    assert_unchanged(before)
