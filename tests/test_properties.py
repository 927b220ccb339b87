"""Property tests (hypothesis): random layouts against the oracle and themselves.

Drawn per example: a shape of 2 to 5 axes (sizes 1, 2 and primes, now and
then one long axis, so that several OpenMP threads and several kernel blocks
take part), the dtype, the channel axis (first or last), the data's offset
and spread, with or without gamma and beta, the memory layout of every input
(C-contiguous, strided, Fortran order, transposed, reversed, read-only) and
the result mode (new array, ``out=`` buffer, in place). Properties:

- forward, inference and backward equal ``fastbn.reference`` to the dtype's
  tolerance (running statistics included);
- every result is the same to the bit for 1, 2 and 3 threads and the default,
  and in every result mode;
- in float64, the backward of the forward equals central finite differences
  of ``sum(forward(x) * w)`` with respect to x, gamma and beta.

The examples come from the ``fastbn`` hypothesis profile of conftest.py:
derandomized, so every run and every machine tries the same ones.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastbn  # noqa: E402
from fastbn import reference  # noqa: E402

from helpers import (STRIDED_LAYOUTS, assert_bitwise_equal, assert_close,  # noqa: E402
                     dx_scale, make_inputs, numeric_gradient, strided_vector)

SIZES = st.sampled_from([1, 2, 2, 3, 5, 7, 11, 13])
LONG = st.sampled_from([2053, 16411, 40009])          # primes: ragged blocks and tiles
MAX_ELEMENTS = 300_000
LAYOUT_NAMES = ["contiguous", "read-only", *STRIDED_LAYOUTS]
THREAD_COUNTS = (1, 2, 3, None)


@st.composite
def problems(draw, *, training):
    """A shape, channel axis, dtype, data and the way to pass them."""
    ndim = draw(st.integers(2, 5))
    if draw(st.integers(0, 3)) == 0:                  # one long axis, now and then
        shape = [draw(st.sampled_from([1, 2, 3])) for _ in range(ndim)]
        shape[draw(st.integers(0, ndim - 1))] = draw(LONG)
    else:
        shape = [draw(SIZES) for _ in range(ndim)]
    shape = tuple(shape)
    assume(np.prod(shape) <= MAX_ELEMENTS)
    channel_axis = draw(st.sampled_from([1, -1]))
    C = shape[channel_axis]
    if training:
        assume(np.prod(shape) // C > 1)
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    spread = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    offset = draw(st.sampled_from([0.0, 1.0, -30.0])) * spread
    seed = draw(st.integers(0, 2**32 - 1))
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(seed), offset=offset,
                    spread=spread)
    if not draw(st.booleans()):
        a.gamma = a.beta = None
    return dict(a=a, shape=shape, channel_axis=channel_axis, dtype=dtype,
                layout=draw(st.sampled_from(LAYOUT_NAMES)),
                out_mode=draw(st.sampled_from(["new", "out", "in-place"])))


def passed(value, layout, writeable=False):
    """``value`` as the caller passes it: in ``layout``, a copy either way."""
    if value is None:
        return None
    if layout == "contiguous":
        return value.copy()
    if layout == "read-only":
        v = value.copy()
        v.flags.writeable = writeable
        return v
    if value.ndim == 1:
        return strided_vector(value) if not writeable else value.copy()
    return STRIDED_LAYOUTS[layout](value)


def out_for(p, replaced):
    """out, and the array the result must be: None, a buffer, or the replaced input."""
    if p["out_mode"] == "new":
        return None
    if p["out_mode"] == "out":
        return np.full(p["shape"], np.nan, p["dtype"])
    return replaced


def in_place_input(p, value):
    """The input that the result replaces: C-contiguous and writeable in place."""
    return value.copy() if p["out_mode"] == "in-place" else passed(value, p["layout"])


def check_same_bits(results):
    first = results[0]
    for other in results[1:]:
        for got, want in zip(other, first):
            assert_bitwise_equal(got, want)


@given(problems(training=True))
def test_forward(p):
    a, ca, layout = p["a"], p["channel_axis"], p["layout"]
    rm_ref, rv_ref = a.running_mean.copy(), a.running_var.copy()
    expected = reference.batch_norm_forward(a.x, a.gamma, a.beta, running_mean=rm_ref,
                                            running_var=rv_ref, channel_axis=ca)
    results = []
    for num_threads in THREAD_COUNTS:
        x = in_place_input(p, a.x)
        out = out_for(p, x)
        rm = passed(a.running_mean, layout, writeable=True)
        rv = passed(a.running_var, layout, writeable=True)
        y, mean, invstd = fastbn.batch_norm_forward(
            x, passed(a.gamma, layout), passed(a.beta, layout), running_mean=rm,
            running_var=rv, channel_axis=ca, out=out, num_threads=num_threads)
        if out is not None:
            assert y is out
        assert y.flags.c_contiguous and y.dtype == p["dtype"]
        results.append((y, mean, invstd, rm, rv))
    check_same_bits(results)
    y, mean, invstd, rm, rv = results[0]
    for got, want in zip((y, mean, invstd, rm, rv), (*expected, rm_ref, rv_ref)):
        assert_close(got, want, p["dtype"])


@given(problems(training=False))
def test_inference(p):
    a, ca, layout = p["a"], p["channel_axis"], p["layout"]
    expected = reference.batch_norm_inference(a.x, a.gamma, a.beta, a.running_mean,
                                              a.running_var, channel_axis=ca)
    results = []
    for num_threads in THREAD_COUNTS:
        x = in_place_input(p, a.x)
        out = out_for(p, x)
        y = fastbn.batch_norm_inference(
            x, passed(a.gamma, layout), passed(a.beta, layout),
            passed(a.running_mean, layout), passed(a.running_var, layout), channel_axis=ca,
            out=out, num_threads=num_threads)
        if out is not None:
            assert y is out
        results.append((y,))
    check_same_bits(results)
    assert_close(results[0][0], expected, p["dtype"])


@given(problems(training=False))
def test_backward(p):
    a, ca, layout = p["a"], p["channel_axis"], p["layout"]
    expected = reference.batch_norm_backward(a.dy, a.x, a.gamma, a.mean, a.invstd,
                                             channel_axis=ca)
    results = []
    for num_threads in THREAD_COUNTS:
        dy = in_place_input(p, a.dy)
        out = out_for(p, dy)
        got = fastbn.batch_norm_backward(
            dy, passed(a.x, layout), passed(a.gamma, layout), passed(a.mean, layout),
            passed(a.invstd, layout), channel_axis=ca, out=out, num_threads=num_threads)
        if out is not None:
            assert got[0] is out
        results.append(got)
    check_same_bits(results)
    dx, dgamma, dbeta = results[0]
    assert_close(dx, expected[0], p["dtype"], scale=dx_scale(a.dy, a.gamma, a.invstd))
    assert_close(dgamma, expected[1], p["dtype"])
    assert_close(dbeta, expected[2], p["dtype"])


@st.composite
def small_problems(draw):
    """float64 problems small enough for finite differences (<= 36 values)."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(ndim))
    channel_axis = draw(st.sampled_from([1, -1]))
    C = shape[channel_axis]
    assume(np.prod(shape) // C > 1)
    seed = draw(st.integers(0, 2**32 - 1))
    a = make_inputs(shape, np.float64, channel_axis, np.random.default_rng(seed),
                    offset=draw(st.sampled_from([0.0, 3.0])))
    return a, channel_axis, draw(st.booleans())


@given(small_problems())
def test_backward_of_forward_matches_finite_differences(problem):
    a, ca, affine = problem
    x = a.x.copy()
    gamma = a.gamma.copy() if affine else np.ones(a.C)
    beta = a.beta.copy() if affine else np.zeros(a.C)
    w = a.dy

    def loss():   # explicit gamma = 1 and beta = 0 without affine: their gradients
        y, _, _ = fastbn.batch_norm_forward(x, gamma, beta, channel_axis=ca)
        return float(np.sum(y * w))

    _, mean, invstd = fastbn.batch_norm_forward(x, gamma if affine else None,
                                                beta if affine else None, channel_axis=ca)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(w, x, gamma if affine else None, mean,
                                                   invstd, channel_axis=ca)
    # The gradient's own size sets the absolute tolerance: a channel whose values
    # nearly coincide has var ~ eps and gradients up to 1/sqrt(eps) ~ 300.
    for name, got, wrt in (("dx", dx, x), ("dgamma", dgamma, gamma), ("dbeta", dbeta, beta)):
        numeric = numeric_gradient(loss, wrt)
        np.testing.assert_allclose(got, numeric, rtol=1e-5,
                                   atol=1e-6 * max(1.0, np.abs(numeric).max()), err_msg=name)
