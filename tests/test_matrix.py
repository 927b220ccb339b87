"""The kernels' one test matrix: a single fixture, ``case``, spans every kernel
schedule (helpers.SCHEDULE_LAYOUTS) x dtype x pass x activation, and with them
every gradient kind (plain, through the activation, from the output); the
thread count, ``out=`` and affine vary pairwise over the cases (a covering
array of four rows: every pair of their values meets in some case) rather
than as a full product. Each case is checked against the float64 oracle
(:mod:`fastbn.reference`) at the dtype's tolerance, and for the same bits at
another thread count.

The tests of one feature (test_activation, test_from_output, ...) check what
the matrix does not: PyTorch, finite differences, hostile and strided
inputs, non-finite values.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import (DTYPES, SCHEDULE_LAYOUTS, activated_case, assert_bitwise_equal,
                     assert_close, assert_grads_close, dtype_id, layout_id)

import fastbn
from fastbn import reference

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

PASSES = ("forward", "inference", "backward", "frozen", "from_output")
ACTIVATIONS = (None, "relu", "leaky_relu")
SLOPE = 0.2
#: (num_threads, out=, affine): every pair of values of two of them is in a row
PAIRWISE = [(1, False, True), (1, True, False), (2, False, False), (2, True, True)]


def gradient_kind(pass_, activation):
    """The backward's gradient kind (fastbn._front.GRADIENTS), None for a forward."""
    if pass_ == "from_output":
        return "output"
    if pass_ in ("backward", "frozen"):
        return "plain" if activation is None else "activated"
    return None


def _cases():
    product = itertools.product(SCHEDULE_LAYOUTS, DTYPES, PASSES, ACTIVATIONS)
    for i, ((shape, ca), dtype, pass_, act) in enumerate(product):
        if pass_ == "from_output" and act == "relu":
            continue  # relu cannot be inverted: refused (test_from_output)
        threads, out, affine = PAIRWISE[i % len(PAIRWISE)]
        case = SimpleNamespace(shape=shape, channel_axis=ca, dtype=np.dtype(dtype), pass_=pass_,
                               activation=act, grad=gradient_kind(pass_, act),
                               num_threads=threads, out=out, affine=affine)
        yield pytest.param(case, id="-".join([layout_id(shape, ca), dtype_id(dtype), pass_,
                                              str(act), f"t{threads}", "out" if out else "new",
                                              "affine" if affine else "plain"]))


@pytest.fixture(params=list(_cases()))
def case(request):
    return request.param


def run(impl, case, a, num_threads):
    """The case's pass through ``impl`` (fastbn or the oracle): its outputs, in order."""
    g, b = (a.gamma, a.beta) if case.affine else (None, None)
    common = dict(channel_axis=case.channel_axis, num_threads=num_threads)
    if case.activation is not None:
        common.update(activation=case.activation, negative_slope=SLOPE)
    out = np.empty_like(a.x) if case.out and impl is fastbn else None
    if case.pass_ == "forward":
        rm, rv = a.running_mean.copy(), a.running_var.copy()
        y, mean, invstd = impl.batch_norm_forward(a.x, g, b, running_mean=rm, running_var=rv,
                                                  out=out, **common)
        result = [y, mean, invstd, rm, rv]
    elif case.pass_ == "inference":
        result = [impl.batch_norm_inference(a.x, g, b, a.running_mean, a.running_var, out=out,
                                            **common)]
    elif case.pass_ == "from_output":
        result = list(impl.batch_norm_backward_from_output(a.dy, a.y, g, b, a.invstd, out=out,
                                                           **common))
    else:
        result = list(impl.batch_norm_backward(a.dy, a.x, g, a.mean, a.invstd, beta=b,
                                               training=case.pass_ == "backward", out=out,
                                               **common))
    if out is not None:
        assert result[0] is out
    return result


def inputs(case):
    """The case's arrays: clear of the activation's kink, with mean and
    invstd and the output y of fastbn's forward (activated as the case is,
    and made with gamma and beta only when affine)."""
    act = case.activation
    a = activated_case(case.shape, case.dtype, case.channel_axis, act, SLOPE)
    if not case.affine:
        a.y = fastbn.batch_norm_forward(a.x, None, None, activation=act, negative_slope=SLOPE,
                                        channel_axis=case.channel_axis)[0]
    return a


def test_equals_the_oracle(case):
    a = inputs(case)
    got = run(fastbn, case, a, case.num_threads)
    want = run(reference, case, a, None)
    assert all(g.dtype == case.dtype for g in got)
    assert got[0].shape == case.shape
    if case.grad is None:
        for g, w, name in zip(got, want, ("y", "mean", "invstd", "running_mean", "running_var")):
            assert_close(g, w, case.dtype, err_msg=f"{name} ({case.pass_})")
    else:
        gamma = a.gamma if case.affine else None
        assert_grads_close(got, want, case.dtype, a.dy, gamma, a.invstd,
                           f"({case.pass_}, gradient kind {case.grad})")


def test_same_bits_for_another_thread_count(case):
    a = inputs(case)
    first = run(fastbn, case, a, case.num_threads)
    again = run(fastbn, case, a, 3 - case.num_threads)
    for g, w in zip(first, again):
        assert_bitwise_equal(g, w, err_msg=f"{case.pass_}: {case.num_threads} threads "
                                           f"against {3 - case.num_threads}")
