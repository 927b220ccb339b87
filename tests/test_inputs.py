"""Argument rules: what is rejected (and how), what is accepted.

Every rejected call is checked twice: the exception type and a message that
names the argument, and that nothing the caller passed was modified (a byte
snapshot of every array argument: x, dy, the per-channel arrays, the running
statistics, num_batches_tracked and out).

Accepted: non-contiguous inputs (strided, Fortran order, transposed and
reversed views), read-only inputs (flags and read-only memory maps). NaN and
Inf in the data are accepted too: test_nonfinite.py.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from helpers import (FUNCTIONS, REFERENCE, SHAPE, STRIDED_LAYOUTS, C, assert_bitwise_equal,
                     assert_close, assert_unchanged, call, make_inputs, overlapping, read_only,
                     snapshot, strided_vector, strided_view, valid_args)


def assert_rejected(func, args, exc, match):
    """The call raises ``exc`` matching ``match`` and leaves every array as it was."""
    snap = snapshot(**args)
    with pytest.raises(exc, match=match):
        call(func, args)
    assert_unchanged(snap)


ALL = FUNCTIONS
BAD_DTYPES = [np.int32, np.int64, np.uint8, np.float16, np.complex64, np.complex128, np.bool_,
              np.object_]


# ------------------------------------------------------------- dtypes ----

@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_unsupported_dtype_of_x(func, dtype):
    """x of a dtype other than float32/float64 is a TypeError naming x."""
    args = valid_args(func)
    args["x"] = args["x"].astype(dtype)
    assert_rejected(func, args, TypeError, r"^x must have dtype float32 or float64, got ")


@pytest.mark.parametrize("func, name", [
    ("forward", "gamma"), ("forward", "beta"), ("forward", "running_mean"),
    ("forward", "running_var"),
    ("inference", "gamma"), ("inference", "beta"), ("inference", "running_mean"),
    ("inference", "running_var"),
    ("backward", "dy"), ("backward", "gamma"), ("backward", "mean"), ("backward", "invstd"),
])
@pytest.mark.parametrize("x_dtype, other_dtype", [(np.float32, np.float64),
                                                  (np.float64, np.float32),
                                                  (np.float32, np.float16)],
                         ids=["x32-other64", "x64-other32", "x32-other16"])
def test_mixed_dtypes(func, name, x_dtype, other_dtype):
    """An array of another dtype than x is a TypeError naming it."""
    args = valid_args(func, dtype=x_dtype)
    args[name] = args[name].astype(other_dtype)
    assert_rejected(func, args, TypeError,
                    rf"^{name} must have the dtype of x \({np.dtype(x_dtype).name}\), got "
                    rf"{np.dtype(other_dtype).name}")


@pytest.mark.parametrize("func, name", [(f, "x") for f in ALL] + [
    ("forward", "gamma"), ("inference", "running_var"), ("backward", "dy"),
    ("backward", "invstd")])
def test_not_an_ndarray(func, name):
    """A list where an array belongs is a TypeError naming the argument."""
    args = valid_args(func)
    args[name] = args[name].tolist()
    assert_rejected(func, args, TypeError, rf"^{name} must be a numpy\.ndarray")


# ------------------------------------------------------------- shapes ----

@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("shape", [(), (12,), (2, 3, 1, 1, 1, 2)], ids=["0d", "1d", "6d"])
def test_x_of_wrong_ndim(func, shape):
    """x of fewer than 2 or more than 5 dimensions is a ValueError naming x."""
    args = valid_args(func)
    args["x"] = np.ones(shape, np.float32)
    if func == "backward":
        args["dy"] = np.ones(shape, np.float32)
    assert_rejected(func, args, ValueError, r"^x must have 2 to 5 dimensions")


@pytest.mark.parametrize("func", ALL)
def test_x_with_zero_size_axis(func):
    """An empty x is a ValueError naming x."""
    args = valid_args(func)
    args["x"] = np.ones((0, 3, 5, 2), np.float32)
    if func == "backward":
        args["dy"] = args["x"].copy()
    assert_rejected(func, args, ValueError, r"^x must not have a zero-size axis")


@pytest.mark.parametrize("func, name", [
    ("forward", "gamma"), ("forward", "beta"), ("forward", "running_mean"),
    ("forward", "running_var"),
    ("inference", "gamma"), ("inference", "beta"), ("inference", "running_mean"),
    ("inference", "running_var"),
    ("backward", "gamma"), ("backward", "mean"), ("backward", "invstd"),
])
@pytest.mark.parametrize("shape", [(4,), (2,), (1,), (3, 1), (1, 3), ()])
def test_per_channel_array_of_wrong_shape(func, name, shape):
    """gamma, beta, running stats, mean, invstd must be (C,): ValueError naming them."""
    args = valid_args(func)
    args[name] = np.ones(shape, np.float32)
    assert_rejected(func, args, ValueError, rf"^{name} must have shape \(3,\)")


@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 3, 2, 5), (3, 3, 5, 2), (40, 3)])
def test_dy_of_wrong_shape(shape):
    """dy must be shaped like x."""
    args = valid_args("backward")
    args["dy"] = np.ones(shape, np.float32)
    assert_rejected("backward", args, ValueError, r"^dy must have the shape of x")


# ---------------------------------------------------------------- out ----

@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("case, exc, match", [
    ("shape", ValueError, r"^out must have the shape of x"),
    ("shape-transposed", ValueError, r"^out must have the shape of x"),
    ("dtype-float64", ValueError, r"^out must have the dtype of x \(float32\), got float64"),
    ("dtype-int32", ValueError, r"^out must have the dtype of x \(float32\), got int32"),
    ("strided", ValueError, r"^out must be C-contiguous"),
    ("fortran", ValueError, r"^out must be C-contiguous"),
    ("read-only", ValueError, r"^out must be writeable"),
    ("list", TypeError, r"^out must be a numpy\.ndarray"),
])
def test_bad_out(func, case, exc, match):
    """out of the wrong shape, dtype or layout, or read-only, is rejected."""
    args = valid_args(func)
    out = {
        "shape": lambda: np.empty((4, 3, 5, 3), np.float32),
        "shape-transposed": lambda: np.empty((4, 3, 2, 5), np.float32),
        "dtype-float64": lambda: np.empty(SHAPE, np.float64),
        "dtype-int32": lambda: np.empty(SHAPE, np.int32),
        "strided": lambda: np.empty((4, 3, 5, 4), np.float32)[..., ::2],
        "fortran": lambda: np.empty(SHAPE, np.float32, order="F"),
        "read-only": lambda: read_only(np.empty(SHAPE, np.float32)),
        "list": lambda: np.empty(SHAPE, np.float32).tolist(),
    }[case]()
    args["out"] = out
    assert_rejected(func, args, exc, match)


@pytest.mark.parametrize("func, name", [
    ("forward", "x"), ("inference", "x"), ("backward", "x"), ("backward", "dy")])
@pytest.mark.parametrize("shift", [1, 7, -1, -29])
def test_out_partially_overlapping_an_input(func, name, shift):
    """out sharing part of an input's memory is a ValueError naming that input."""
    args = valid_args(func)
    args[name], args["out"] = overlapping(args[name], shift)
    assert_rejected(func, args, ValueError, rf"^out overlaps {name}")


def test_out_is_x_in_backward():
    """In the backward only out=dy is in place; out=x is an overlap."""
    args = valid_args("backward")
    args["out"] = args["x"]
    assert_rejected("backward", args, ValueError, r"^out overlaps x")


@pytest.mark.parametrize("func, name", [
    ("forward", "gamma"), ("forward", "beta"), ("forward", "running_mean"),
    ("forward", "running_var"),
    ("inference", "gamma"), ("inference", "beta"), ("inference", "running_mean"),
    ("inference", "running_var"),
    ("backward", "gamma"), ("backward", "mean"), ("backward", "invstd"),
])
def test_out_overlapping_a_per_channel_array(func, name):
    """A per-channel array that lives inside out is an overlap naming it."""
    args = valid_args(func)
    inside = args["out"].reshape(-1)[10:10 + C]
    inside[...] = np.abs(args[name]) + 0.5
    args[name] = inside
    assert_rejected(func, args, ValueError, rf"^out overlaps {name}")


# ------------------------------------------------------------- values ----

@pytest.mark.parametrize("func", ["forward", "inference"])
@pytest.mark.parametrize("eps", [0.0, -0.0, -1e-5, np.nan, np.inf, -np.inf])
def test_bad_eps(func, eps):
    """eps must be finite and > 0."""
    args = valid_args(func)
    args["eps"] = eps
    assert_rejected(func, args, ValueError, r"^eps must be finite and > 0")


@pytest.mark.parametrize("func", ["forward", "inference"])
@pytest.mark.parametrize("eps", ["1e-5", None, True, np.array([1e-5, 1e-5])],
                         ids=["str", "None", "bool", "array"])
def test_eps_of_wrong_type(func, eps):
    """eps must be a real number."""
    args = valid_args(func)
    args["eps"] = eps
    assert_rejected(func, args, TypeError, r"^eps must be a real number")


@pytest.mark.parametrize("momentum", [-0.1, -1e-300, 1.0000001, 2.0, np.nan, np.inf])
def test_bad_momentum(momentum):
    """momentum must lie in [0, 1]."""
    args = valid_args("forward")
    args["momentum"] = momentum
    assert_rejected("forward", args, ValueError, r"^momentum must be in \[0, 1\]")


@pytest.mark.parametrize("momentum", ["0.1", True, [0.1]], ids=["str", "bool", "list"])
def test_momentum_of_wrong_type(momentum):
    """momentum must be a real number or None."""
    args = valid_args("forward")
    args["momentum"] = momentum
    assert_rejected("forward", args, TypeError, r"^momentum must be a real number or None")


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("num_threads", [0, -1, -4, np.int64(0)])
def test_num_threads_not_positive(func, num_threads):
    """num_threads = 0 or negative is a ValueError."""
    args = valid_args(func)
    args["num_threads"] = num_threads
    assert_rejected(func, args, ValueError, r"^num_threads must be a positive int or None")


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("num_threads", [1.5, 2.0, "2", True], ids=["1.5", "2.0", "str", "bool"])
def test_num_threads_not_an_int(func, num_threads):
    """A num_threads that is not an int is a TypeError."""
    args = valid_args(func)
    args["num_threads"] = num_threads
    assert_rejected(func, args, TypeError, r"^num_threads must be a positive int or None")


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("num_threads", [1000, 2**40, np.int32(7)], ids=["1000", "2^40", "int32"])
def test_num_threads_above_the_core_count(func, num_threads):
    """Any positive int is accepted and gives the single-thread bits."""
    args = valid_args(func, shape=(8, 1, 40000))
    args["out"] = None
    expected = _as_tuple(call(func, dict(args, num_threads=1)))
    got = _as_tuple(call(func, dict(args, num_threads=num_threads)))
    for g, e in zip(got, expected):
        assert_bitwise_equal(g, e)


def test_momentum_none_without_running_stats():
    """momentum=None needs no counter when there are no running statistics."""
    a = make_inputs(SHAPE, np.float32, 1, np.random.default_rng(0))
    y, _, _ = fastbn.batch_norm_forward(a.x, None, None, momentum=None)
    assert_close(y, reference.batch_norm_forward(a.x, None, None)[0], np.float32)


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("channel_axis", [0, 2, -2, 4, -4, -5, 100])
def test_bad_channel_axis(func, channel_axis):
    """Only 1, -1 and their equivalents (3 and -3 for 4-D) are channel axes."""
    args = valid_args(func)
    args["channel_axis"] = channel_axis
    assert_rejected(func, args, ValueError,
                    rf"^channel_axis must be 1 \(channels first\) or -1 \(channels last\), "
                    rf"got {channel_axis} for an input of 4 dimensions")


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("channel_axis", [1.0, "1", True, None], ids=["float", "str", "bool",
                                                                      "None"])
def test_channel_axis_not_an_int(func, channel_axis):
    """A channel_axis that is not an int is a TypeError."""
    args = valid_args(func)
    args["channel_axis"] = channel_axis
    assert_rejected(func, args, TypeError, r"^channel_axis must be an int")


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("first, same_as", [(3, -1), (-3, 1), (np.int64(3), -1)])
def test_equivalent_channel_axes(func, first, same_as):
    """For 4-D input, channel_axis 3 means -1 and -3 means 1: the same bits."""
    args = valid_args(func, channel_axis=same_as)
    args["out"] = None
    expected = call(func, dict(args))
    args["channel_axis"] = first
    for got, want in zip(_as_tuple(call(func, dict(args))), _as_tuple(expected)):
        assert_bitwise_equal(got, want)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


# ----------------------------------------------------- one value each ----

@pytest.mark.parametrize("shape, channel_axis", [
    ((1, 3), 1), ((1, 1), 1), ((1, 3), -1), ((1, 3, 1), 1), ((1, 3, 1, 1), 1),
    ((1, 1, 1, 3), -1), ((1, 3, 1, 1, 1), 1), ((1, 1, 1, 1, 3), -1)])
def test_training_needs_more_than_one_value_per_channel(shape, channel_axis):
    """As PyTorch: 'Expected more than 1 value per channel when training, ...'."""
    args = valid_args("forward", shape=shape, channel_axis=channel_axis)
    assert_rejected("forward", args, ValueError,
                    r"^Expected more than 1 value per channel when training, got input size")


@pytest.mark.parametrize("func", ["inference", "backward"])
def test_one_value_per_channel_outside_training(func):
    """Inference and backward accept a single value per channel."""
    args = valid_args(func, shape=(1, 3, 1, 1))
    args["out"] = None
    got = _as_tuple(call(func, args))
    expected = _as_tuple(call(func, args, impl=REFERENCE))
    for g, e in zip(got, expected):
        assert_close(g, e, np.float32)


# ------------------------------------------------------ running stats ----

@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_running_stats_come_together(missing):
    args = valid_args("forward")
    args[missing] = None
    assert_rejected("forward", args, ValueError,
                    r"^running_mean and running_var must be given together")


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stats_must_be_writeable_in_training(name):
    args = valid_args("forward")
    args[name] = read_only(args[name])
    assert_rejected("forward", args, ValueError, rf"^{name} is updated in place and must be "
                                                 r"writeable")


def test_cumulative_average_needs_a_counter():
    args = valid_args("forward")
    args["momentum"] = None
    args["num_batches_tracked"] = None
    assert_rejected("forward", args, ValueError,
                    r"^momentum=None \(cumulative average\) needs num_batches_tracked")


@pytest.mark.parametrize("counter, exc, match", [
    (np.array(0.0), ValueError, r"^num_batches_tracked must hold one integer"),
    (np.zeros(2, np.int64), ValueError, r"^num_batches_tracked must hold one integer"),
    (np.array(True), ValueError, r"^num_batches_tracked must hold one integer"),
    (read_only(np.array(0, np.int64)), ValueError,
     r"^num_batches_tracked is updated in place and must be writeable"),
    (0, TypeError, r"^num_batches_tracked must be a numpy\.ndarray"),
], ids=["float", "two-values", "bool", "read-only", "int"])
def test_bad_num_batches_tracked(counter, exc, match):
    args = valid_args("forward")
    args["momentum"] = None
    args["num_batches_tracked"] = counter
    assert_rejected("forward", args, exc, match)


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_inference_needs_running_stats(missing):
    args = valid_args("inference")
    args[missing] = None
    assert_rejected("inference", args, ValueError,
                    r"^running_mean and running_var are required in inference")


@pytest.mark.parametrize("missing", ["mean", "invstd"])
def test_backward_needs_saved_stats(missing):
    args = valid_args("backward")
    args[missing] = None
    assert_rejected("backward", args, ValueError, r"^mean and invstd .* are required")


# ------------------------------------------ non-contiguous, read-only ----

@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("layout", list(STRIDED_LAYOUTS))
@pytest.mark.parametrize("shape, channel_axis", [((4, 3, 5, 7), 1), ((4, 5, 7, 3), -1),
                                                 ((9, 3), 1), ((6, 3, 1, 1), 1)])
@pytest.mark.parametrize("with_out", [False, True], ids=["new", "out"])
def test_non_contiguous_inputs(func, layout, shape, channel_axis, with_out):
    """Non-contiguous arrays (every array argument) give the reference's results."""
    args = valid_args(func, shape=shape, dtype=np.float64, channel_axis=channel_axis)
    args["out"] = np.empty(shape) if with_out else None
    expected_args = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    expected = _as_tuple(call(func, expected_args, impl=REFERENCE))
    for name, value in list(args.items()):
        if name == "out" or not isinstance(value, np.ndarray) or value.ndim == 0:
            continue
        args[name] = STRIDED_LAYOUTS[layout](value) if value.ndim > 1 else strided_vector(value)
        assert not args[name].flags.c_contiguous
    snap = snapshot(**{k: v for k, v in args.items()
                       if k not in ("out", "running_mean", "running_var",
                                    "num_batches_tracked")})

    got = _as_tuple(call(func, args))

    assert_unchanged(snap)
    for g, e in zip(got, expected):
        assert_close(g, e, np.float64)
    if with_out:
        assert got[0] is args["out"]
    if func == "forward":
        assert_close(args["running_mean"], expected_args["running_mean"], np.float64)
        assert_close(args["running_var"], expected_args["running_var"], np.float64)
        assert args["num_batches_tracked"] == expected_args["num_batches_tracked"] == 1


@pytest.mark.parametrize("func", ALL)
@pytest.mark.parametrize("kind", ["flag", "flag-strided", "memmap"])
@pytest.mark.parametrize("with_out", [False, True], ids=["new", "out"])
def test_read_only_inputs(func, kind, with_out, tmp_path):
    """Read-only arrays are accepted wherever the function does not write."""
    args = valid_args(func)
    args["out"] = np.empty(SHAPE, np.float32) if with_out else None
    expected_args = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    expected = _as_tuple(call(func, expected_args, impl=REFERENCE))
    updated = ("out", "num_batches_tracked") + (
        ("running_mean", "running_var") if func == "forward" else ())
    for name, value in list(args.items()):
        if name in updated or not isinstance(value, np.ndarray):
            continue
        if kind == "memmap":
            path = tmp_path / f"{name}.npy"
            np.save(path, value)
            args[name] = np.load(path, mmap_mode="r")
        else:
            args[name] = read_only(strided_view(value) if kind == "flag-strided" and value.ndim > 1
                                   else value)
        assert not args[name].flags.writeable
    snap = snapshot(**args)

    got = _as_tuple(call(func, args))

    for g, e in zip(got, expected):
        assert_close(g, e, np.float32)
    if func == "forward":
        assert_close(args["running_mean"], expected_args["running_mean"], np.float32)
        assert_close(args["running_var"], expected_args["running_var"], np.float32)
    assert_unchanged({k: v for k, v in snap.items() if k not in updated})
