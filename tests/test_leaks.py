"""Leaks: many calls grow neither the process's memory nor any reference count.

Each public entry point (the three functions with fresh outputs and with
``out=``, in place, on non-contiguous input, and failing; the layers in train
and eval mode; the cs231n and deepnet adapters) is called 20,000 times on
small arrays after a warm-up, and the resident set size of the process
(``/proc/self/statm``) must grow by less than 2 MB. A leaked result of one
call (the arrays are about 2.4 kB, or 0.5 kB in the columnar case) would add
10 to 50 MB; a leaked work space of O(C) doubles, a leaked memoryview or an
exception object kept alive per call at least as much.

A leaked reference to an argument would not grow the memory (the argument
is the same object every time), so the reference counts of every argument
are checked too.

Under AddressSanitizer (``scripts/sanitize.sh``) freed memory sits in a
quarantine, so the memory checks are skipped there; the reference-count
checks still run.
"""

from __future__ import annotations

import gc
import os
import sys

import numpy as np
import pytest

import fastbn
from fastbn import BatchNorm1d, BatchNorm2d
from fastbn.compat import cs231n, deepnet

from helpers import make_inputs, under_asan

CALLS = 20_000
WARM_UP = 2_000
LIMIT = 2 * 2**20


def rss():
    """The resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


needs_statm = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                 reason="needs Linux /proc/self/statm")
not_under_asan = pytest.mark.skipif(under_asan(), reason="AddressSanitizer keeps freed "
                                    "memory in quarantine: RSS is not a leak measure there")


def workload(name, shape, channel_axis, dtype):
    """(call, arguments): one call of the named kind, and every array it uses."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(0))
    ca = channel_axis
    out = np.empty_like(a.x)
    xs = np.empty_like(a.x)
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    strided = np.repeat(a.x, 2, axis=-1)[..., ::2]
    calls = {
        "forward": lambda: fastbn.batch_norm_forward(
            a.x, a.gamma, a.beta, running_mean=rm, running_var=rv, channel_axis=ca),
        "forward-out": lambda: fastbn.batch_norm_forward(
            a.x, a.gamma, a.beta, running_mean=rm, running_var=rv, channel_axis=ca, out=out),
        "forward-in-place": lambda: (np.copyto(xs, a.x), fastbn.batch_norm_forward(
            xs, a.gamma, a.beta, channel_axis=ca, out=xs)),
        "forward-strided": lambda: fastbn.batch_norm_forward(
            strided, a.gamma, a.beta, channel_axis=ca),
        "inference": lambda: fastbn.batch_norm_inference(
            a.x, a.gamma, a.beta, a.running_mean, a.running_var, channel_axis=ca),
        "inference-out": lambda: fastbn.batch_norm_inference(
            a.x, a.gamma, a.beta, a.running_mean, a.running_var, channel_axis=ca, out=out),
        "backward": lambda: fastbn.batch_norm_backward(
            a.dy, a.x, a.gamma, a.mean, a.invstd, channel_axis=ca),
        "backward-out": lambda: fastbn.batch_norm_backward(
            a.dy, a.x, a.gamma, a.mean, a.invstd, channel_axis=ca, out=out),
        "backward-strided": lambda: fastbn.batch_norm_backward(
            strided, strided, None, a.mean, a.invstd, channel_axis=ca),
        "rejected-value": lambda: _raises(ValueError, lambda: fastbn.batch_norm_forward(
            a.x, a.gamma, a.beta, channel_axis=ca, out=out[..., :1])),
        "rejected-type": lambda: _raises(TypeError, lambda: fastbn.batch_norm_backward(
            a.dy, a.x, a.gamma.astype(np.float16), a.mean, a.invstd, channel_axis=ca)),
    }
    return calls[name], dict(a.__dict__, out=out, xs=xs, rm=rm, rv=rv, strided=strided)


def _raises(exc, call):
    try:
        call()
    except exc:
        return
    raise AssertionError(f"expected {exc.__name__}")


def layer_workload(name, dtype=np.float32):
    rng = np.random.default_rng(1)
    if name.startswith("BatchNorm2d"):
        bn = BatchNorm2d(3, dtype=dtype)
        x = rng.standard_normal((4, 3, 5, 5)).astype(dtype)
    else:
        bn = BatchNorm1d(8, dtype=dtype)
        x = rng.standard_normal((16, 8)).astype(dtype)
    dy = np.ones_like(x)
    if name.endswith("eval"):
        bn.eval()

    def step():
        bn(x)
        bn.backward(dy)
    return step, dict(x=x, dy=dy, gamma=bn.gamma, beta=bn.beta,
                      running_mean=bn.running_mean, running_var=bn.running_var)


def adapter_workload(name):
    rng = np.random.default_rng(2)
    if name == "cs231n":
        x = rng.standard_normal((16, 8))
        xs = rng.standard_normal((4, 3, 5, 5))
        gamma, beta, gs, bs = np.ones(8), np.zeros(8), np.ones(3), np.zeros(3)
        param, sparam = {"mode": "train"}, {"mode": "train"}

        def step():
            out, cache = cs231n.batchnorm_forward(x, gamma, beta, param)
            cs231n.batchnorm_backward(out, cache)
            out, cache = cs231n.spatial_batchnorm_forward(xs, gs, bs, sparam)
            cs231n.spatial_batchnorm_backward(out, cache)
        return step, dict(x=x, xs=xs, gamma=gamma, beta=beta, gs=gs, bs=bs)
    bn = deepnet.Batchnorm((3, 5, 5))
    X = rng.standard_normal((4, 3, 5, 5))

    def step():
        out = bn.forward(X)
        bn.backward(out)
    return step, dict(X=X, gamma=bn.gamma, beta=bn.beta)


FUNCTION_CASES = ["forward", "forward-out", "forward-in-place", "forward-strided", "inference",
                  "inference-out", "backward", "backward-out", "backward-strided",
                  "rejected-value", "rejected-type"]
LAYOUTS = {"planar": ((4, 3, 5, 5), 1, np.float64), "columnar": ((16, 8), 1, np.float32),
           "channels-last": ((4, 5, 5, 3), -1, np.float64)}
ALL_CASES = ([(f"{n}-{k}", lambda n=n, k=k: workload(n, *LAYOUTS[k]))
              for n in FUNCTION_CASES for k in LAYOUTS]
             + [(n, lambda n=n: layer_workload(n)) for n in ("BatchNorm2d-train",
                                                            "BatchNorm2d-eval",
                                                            "BatchNorm1d-train",
                                                            "BatchNorm1d-eval")]
             + [(n, lambda n=n: adapter_workload(n)) for n in ("cs231n", "deepnet")])


def growth(step, calls):
    """RSS growth over ``calls`` calls, after a warm-up."""
    for _ in range(WARM_UP):
        step()
    gc.collect()
    before = rss()
    for _ in range(calls):
        step()
    gc.collect()
    return rss() - before


@needs_statm
@not_under_asan
@pytest.mark.parametrize("make", [m for _, m in ALL_CASES], ids=[n for n, _ in ALL_CASES])
def test_twenty_thousand_calls_do_not_grow_memory(make):
    """Less than 2 MB over 20,000 calls. CPython's allocator maps and unmaps 1 MB
    arenas as small objects come and go, so the resident size steps up and down
    by a megabyte or two without any leak: a window over the limit is measured
    again (up to three windows); a leak grows every window."""
    step, _ = make()
    windows = []
    for _ in range(3):
        windows.append(growth(step, CALLS))
        if windows[-1] < LIMIT:
            break
    assert min(windows) < LIMIT, (
        f"resident memory grew by {[f'{w / 2**20:.2f}' for w in windows]} MB "
        f"over windows of {CALLS} calls")


@needs_statm
@not_under_asan
def test_the_measurement_sees_a_leak():
    """Control: keeping each call's result (what a leak would do) is seen."""
    step, _ = workload("forward", *LAYOUTS["planar"])
    kept = []
    grown = growth(lambda: kept.append(step()), CALLS)
    assert grown > LIMIT, f"only {grown} bytes for {CALLS} kept results"


@pytest.mark.parametrize("make", [m for _, m in ALL_CASES], ids=[n for n, _ in ALL_CASES])
def test_reference_counts_of_the_arguments_do_not_grow(make):
    step, arrays = make()
    step()
    gc.collect()
    before = {k: sys.getrefcount(v) for k, v in arrays.items()}
    for _ in range(1000):
        step()
    gc.collect()
    after = {k: sys.getrefcount(v) for k, v in arrays.items()}
    assert after == before
