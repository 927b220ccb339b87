"""What the functions accept: the valid calls next to the argument rules.

The rejected calls (bad dtypes, shapes, out buffers, eps, momentum,
num_threads, channel_axis, running statistics, ...) are the table of
``test_hostile.py``. This module checks the unusual calls that must work,
against the oracle and against fastbn's own results:

- non-contiguous inputs (strided, Fortran order, transposed and reversed
  views of every array argument), with and without ``out``, and read-only
  inputs (flags, strided read-only views and read-only memory maps): the
  oracle's results, and the inputs left as they were;
- the equivalent channel axes (3 and -3 for 4-D input) give the bits of
  -1 and 1;
- any positive num_threads (above the core count, 2**40, a NumPy int32)
  gives the single-thread bits;
- a single value per channel outside training (inference, backward);
  momentum=None without running statistics.

NaN and Inf in the data are accepted too: ``test_nonfinite.py``.
"""

import numpy as np
import pytest

import fastbn
from fastbn import reference

from helpers import (FUNCTIONS, REFERENCE, SHAPE, STRIDED_LAYOUTS, assert_bitwise_equal,
                     assert_close, assert_unchanged, call, make_inputs, read_only, snapshot,
                     strided_vector, strided_view, valid_args)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


# ------------------------------------------------------------ arguments ----

@pytest.mark.parametrize("func", FUNCTIONS)
@pytest.mark.parametrize("first, same_as", [(3, -1), (-3, 1), (np.int64(3), -1)])
def test_equivalent_channel_axes(func, first, same_as):
    """For 4-D input, channel_axis 3 means -1 and -3 means 1: the same bits."""
    args = valid_args(func, channel_axis=same_as)
    args["out"] = None
    expected = call(func, dict(args))
    args["channel_axis"] = first
    for got, want in zip(_as_tuple(call(func, dict(args))), _as_tuple(expected)):
        assert_bitwise_equal(got, want)


@pytest.mark.parametrize("func", FUNCTIONS)
@pytest.mark.parametrize("num_threads", [1000, 2**40, np.int32(7)], ids=["1000", "2^40", "int32"])
def test_num_threads_above_the_core_count(func, num_threads):
    """Any positive int is accepted and gives the single-thread bits."""
    args = valid_args(func, shape=(8, 1, 40000))
    args["out"] = None
    expected = _as_tuple(call(func, dict(args, num_threads=1)))
    got = _as_tuple(call(func, dict(args, num_threads=num_threads)))
    for g, e in zip(got, expected):
        assert_bitwise_equal(g, e)


@pytest.mark.parametrize("func", ["inference", "backward"])
def test_one_value_per_channel_outside_training(func):
    """Inference and backward accept a single value per channel."""
    args = valid_args(func, shape=(1, 3, 1, 1))
    args["out"] = None
    got = _as_tuple(call(func, args))
    expected = _as_tuple(call(func, args, impl=REFERENCE))
    for g, e in zip(got, expected):
        assert_close(g, e, np.float32)


def test_momentum_none_without_running_stats():
    """momentum=None needs no counter when there are no running statistics."""
    a = make_inputs(SHAPE, np.float32, 1, np.random.default_rng(0))
    y, _, _ = fastbn.batch_norm_forward(a.x, None, None, momentum=None)
    assert_close(y, reference.batch_norm_forward(a.x, None, None)[0], np.float32)


# ------------------------------------------ non-contiguous, read-only ----

@pytest.mark.parametrize("func", FUNCTIONS)
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


@pytest.mark.parametrize("func", FUNCTIONS)
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
