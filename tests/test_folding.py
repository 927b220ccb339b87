"""Folding eval-mode Batch Normalization into the layer before it
(:func:`fastbn.fold_batch_norm`, :meth:`fastbn.BatchNorm.fold_into`).

- a convolution (NumPy, and PyTorch's ``conv2d`` and ``conv_transpose2d``
  where torch is installed) and a fully connected layer ((O, I) with
  ``out_axis=0``, (I, O) with ``out_axis=-1``) with the folded weight and
  bias give what :func:`fastbn.batch_norm_inference` gives after the
  original layer: relative 1e-5 in float32, 1e-13 in float64 (to the largest
  output; about 1e-15 was measured), with and without a bias, with gamma and
  beta or None;
- the folded arrays equal PyTorch's ``fuse_conv_bn_weights`` and
  ``fuse_linear_bn_weights`` (where torch is installed);
- the layer method gives the bits of the function, and the layer's own
  eval-mode output after the original layer;
- nothing passed is modified and the results are new arrays; equivalent
  out_axis values, non-contiguous and read-only arrays and mixed dtypes give
  the same bits;
- the docstring examples run (the guide's example: tests/test_readme.py).

The bad calls are rows of tests/test_hostile.py.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import fastbn
from fastbn import BatchNorm1d, BatchNorm2d, fold_batch_norm

from helpers import (DTYPES, assert_bitwise_equal, assert_close, assert_unchanged, dtype_id,
                     make_inputs, read_only, snapshot, strided_vector, transposed_view)

try:
    import torch
except ImportError:  # the PyTorch cases are skipped
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

N, I, O, HW, K = 4, 3, 5, 9, 3     # batch, in and out channels, image side, kernel side

# Relative tolerance (to the largest value) of the folded results: the
# suite's in float32; in float64 tighter than the suite's 1e-10, since both
# sides are a few roundings of float64 from the exact values.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-13}


def assert_folded_close(actual, expected, dtype):
    assert_close(actual, expected, dtype, rtol=RTOL[np.dtype(dtype)])

bias_cases = pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
affine_cases = pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


def bn_arrays(c, dtype, rng, affine=True):
    """gamma, beta, running_mean, running_var for c channels (gamma, beta None
    without ``affine``); per channel, like those of the rest of the suite."""
    a = make_inputs((2, c), dtype, 1, rng)
    if not affine:
        return None, None, a.running_mean, a.running_var
    return a.gamma, a.beta, a.running_mean, a.running_var


def layer_arrays(shape, dtype, rng, with_bias, out_axis=0):
    """A weight of ``shape`` scaled by 1/sqrt(fan-in) (outputs of about unit
    size) and a bias for its output axis, or None."""
    fan_in = int(np.prod(shape)) // shape[out_axis]
    weight = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
    bias = rng.standard_normal(shape[out_axis]).astype(dtype) if with_bias else None
    return weight, bias


# ------------------------------------------------------------ the layers ----

def conv2d_numpy(x, weight, bias):
    """A stride-1, unpadded 2-D convolution (cross-correlation, as PyTorch's)
    of x (N, I, H, W) with weight (O, I, kh, kw), in their dtype."""
    kh, kw = weight.shape[2:]
    patches = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    y = np.einsum("nihwkl,oikl->nohw", patches, weight)
    return y if bias is None else y + bias[:, None, None]


def conv2d_torch(x, weight, bias):
    b = None if bias is None else torch.from_numpy(bias)
    return torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), b).numpy()


CONVS = [pytest.param(conv2d_numpy, id="numpy-conv"),
         pytest.param("torch", id="torch-conv", marks=needs_torch)]


def conv_impl(conv):
    return conv2d_torch if conv == "torch" else conv


def linear_oi(x, weight, bias):
    """PyTorch's Linear: weight (O, I), ``x @ weight.T + bias``."""
    y = x @ weight.T
    return y if bias is None else y + bias


def linear_io(x, weight, bias):
    """A NumPy net's affine layer: weight (I, O), ``x @ weight + bias``."""
    y = x @ weight
    return y if bias is None else y + bias


LINEARS = [pytest.param(linear_oi, (O, I), 0, id="OI-axis0"),
           pytest.param(linear_io, (I, O), -1, id="IO-axis-1")]


# -------------------------------------------- folded equals layer then BN ----

@pytest.mark.parametrize("conv", CONVS)
@dtypes
@bias_cases
@affine_cases
def test_conv_folded_equals_conv_then_eval_batch_norm(conv, dtype, with_bias, affine, rng):
    conv = conv_impl(conv)
    x = rng.standard_normal((N, I, HW, HW)).astype(dtype)
    weight, bias = layer_arrays((O, I, K, K), dtype, rng, with_bias)
    gamma, beta, rm, rv = bn_arrays(O, dtype, rng, affine)
    given = snapshot(weight=weight, bias=bias, gamma=gamma, beta=beta, rm=rm, rv=rv)

    expected = fastbn.batch_norm_inference(conv(x, weight, bias), gamma, beta, rm, rv)
    folded_weight, folded_bias = fold_batch_norm(weight, bias, rm, rv, gamma, beta)

    assert folded_weight.dtype == folded_bias.dtype == dtype
    assert folded_weight.shape == weight.shape and folded_bias.shape == (O,)
    assert_folded_close(conv(x, folded_weight, folded_bias), expected, dtype)
    assert_unchanged(given)


@pytest.mark.parametrize("linear, shape, out_axis", LINEARS)
@dtypes
@bias_cases
@affine_cases
def test_linear_folded_equals_linear_then_eval_batch_norm(linear, shape, out_axis, dtype,
                                                          with_bias, affine, rng):
    x = rng.standard_normal((16, I)).astype(dtype)
    weight, bias = layer_arrays(shape, dtype, rng, with_bias, out_axis)
    gamma, beta, rm, rv = bn_arrays(O, dtype, rng, affine)
    given = snapshot(weight=weight, bias=bias, gamma=gamma, beta=beta, rm=rm, rv=rv)

    expected = fastbn.batch_norm_inference(linear(x, weight, bias), gamma, beta, rm, rv)
    folded_weight, folded_bias = fold_batch_norm(weight, bias, rm, rv, gamma, beta,
                                                 out_axis=out_axis)

    assert folded_weight.dtype == folded_bias.dtype == dtype
    assert_folded_close(linear(x, folded_weight, folded_bias), expected, dtype)
    assert_unchanged(given)


@dtypes
def test_eps_is_the_batch_norms(dtype, rng):
    """A large eps, given to both, still folds to the same output."""
    x = rng.standard_normal((16, I)).astype(dtype)
    weight, bias = layer_arrays((O, I), dtype, rng, True)
    gamma, beta, rm, rv = bn_arrays(O, dtype, rng)
    expected = fastbn.batch_norm_inference(linear_oi(x, weight, bias), gamma, beta, rm, rv,
                                           eps=0.5)
    folded = fold_batch_norm(weight, bias, rm, rv, gamma, beta, eps=0.5)
    assert_folded_close(linear_oi(x, *folded), expected, dtype)


# ------------------------------------------------------------- PyTorch ----

def tensor(a):
    return None if a is None else torch.from_numpy(a.copy())


@needs_torch
@dtypes
@bias_cases
@affine_cases
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv-transpose"])
def test_conv_matches_torch_fuse_conv_bn_weights(dtype, with_bias, affine, transpose, rng):
    """A convolution's (O, I, kh, kw) weight with out_axis=0, a transposed
    convolution's (I, O, kh, kw) with out_axis=1 (``transpose=True``)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    out_axis = 1 if transpose else 0
    shape = (I, O, K, K) if transpose else (O, I, K, K)
    weight, bias = layer_arrays(shape, dtype, rng, with_bias, out_axis)
    gamma, beta, rm, rv = bn_arrays(O, dtype, rng, affine)

    ours = fold_batch_norm(weight, bias, rm, rv, gamma, beta, out_axis=out_axis)
    with torch.no_grad():
        theirs = fuse_conv_bn_weights(tensor(weight), tensor(bias), tensor(rm), tensor(rv), 1e-5,
                                      tensor(gamma), tensor(beta), transpose=transpose)
    for mine, their in zip(ours, theirs):
        assert_folded_close(mine, their.detach().numpy(), dtype)


@needs_torch
@dtypes
@bias_cases
def test_linear_matches_torch_fuse_linear_bn_weights(dtype, with_bias, rng):
    from torch.nn.utils.fusion import fuse_linear_bn_weights

    weight, bias = layer_arrays((O, I), dtype, rng, with_bias)
    gamma, beta, rm, rv = bn_arrays(O, dtype, rng)
    ours = fold_batch_norm(weight, bias, rm, rv, gamma, beta)
    with torch.no_grad():
        theirs = fuse_linear_bn_weights(tensor(weight), tensor(bias), tensor(rm), tensor(rv),
                                        1e-5, tensor(gamma), tensor(beta))
    for mine, their in zip(ours, theirs):
        assert_folded_close(mine, their.detach().numpy(), dtype)


@needs_torch
@dtypes
def test_conv_transpose_folded_equals_torch_conv_transpose_then_eval_batch_norm(dtype, rng):
    conv_t = torch.nn.functional.conv_transpose2d
    x = rng.standard_normal((N, I, HW, HW)).astype(dtype)
    weight, bias = layer_arrays((I, O, K, K), dtype, rng, True, out_axis=1)
    gamma, beta, rm, rv = bn_arrays(O, dtype, rng)
    z = conv_t(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)).numpy()
    expected = fastbn.batch_norm_inference(z, gamma, beta, rm, rv)
    folded_weight, folded_bias = fold_batch_norm(weight, bias, rm, rv, gamma, beta, out_axis=1)
    y = conv_t(torch.from_numpy(x), torch.from_numpy(folded_weight),
               torch.from_numpy(folded_bias)).numpy()
    assert_folded_close(y, expected, dtype)


# --------------------------------------------------------------- layers ----

def trained_layer(cls, c, dtype, rng, affine=True):
    """A ``cls(c)`` in eval mode with per-channel statistics and parameters of its own."""
    bn = cls(c, affine=affine, dtype=dtype)
    gamma, beta, rm, rv = bn_arrays(c, dtype, rng)
    state = {"running_mean": rm, "running_var": rv}
    if affine:
        state.update(weight=gamma, bias=beta)
    bn.load_state_dict(state)
    return bn.eval()


@dtypes
@bias_cases
@affine_cases
def test_layer_method_gives_the_function_bits(dtype, with_bias, affine, rng):
    bn = trained_layer(BatchNorm2d, O, dtype, rng, affine)
    bn.eps = 1e-3
    weight, bias = layer_arrays((O, I, K, K), dtype, rng, with_bias)
    layer_state = snapshot(**bn.state_dict(), **{f"own_{k}": v for k, v in vars(bn).items()})
    given = snapshot(weight=weight, bias=bias)

    ours = bn.fold_into(weight, bias)
    expected = fold_batch_norm(weight, bias, bn.running_mean, bn.running_var, bn.gamma,
                               bn.beta, eps=1e-3)
    for mine, theirs in zip(ours, expected):
        assert_bitwise_equal(mine, theirs)
    assert_unchanged(given)
    assert_unchanged(layer_state)


@dtypes
@pytest.mark.parametrize("linear, shape, out_axis", LINEARS)
def test_layer_folded_equals_linear_then_the_layer(linear, shape, out_axis, dtype, rng):
    """The layer's own eval-mode output after the original layer."""
    bn = trained_layer(BatchNorm1d, O, dtype, rng)
    x = rng.standard_normal((16, I)).astype(dtype)
    weight, bias = layer_arrays(shape, dtype, rng, True, out_axis)
    expected = bn(linear(x, weight, bias))
    folded = bn.fold_into(weight, bias, out_axis=out_axis)
    assert_folded_close(linear(x, *folded), expected, dtype)


def test_layer_in_training_mode_folds_its_running_statistics(rng):
    """The mode does not matter: folding is for the eval-mode map."""
    bn = trained_layer(BatchNorm2d, O, np.float32, rng)
    weight, bias = layer_arrays((O, I, K, K), np.float32, rng, True)
    folded_eval = bn.fold_into(weight, bias)
    folded_train = bn.train().fold_into(weight, bias)
    for a, b in zip(folded_eval, folded_train):
        assert_bitwise_equal(a, b)


def test_layer_of_another_dtype_than_the_weight(rng):
    """A float32 layer folds into a float64 weight: the result is float64, the
    fold of the layer's float32 values widened exactly."""
    bn = trained_layer(BatchNorm2d, O, np.float32, rng)
    weight, bias = layer_arrays((O, I, K, K), np.float64, rng, True)
    ours = bn.fold_into(weight, bias)
    wide = [v.astype(np.float64) for v in (bn.running_mean, bn.running_var, bn.gamma, bn.beta)]
    expected = fold_batch_norm(weight, bias, *wide, eps=bn.eps)
    for mine, theirs in zip(ours, expected):
        assert mine.dtype == np.float64
        assert_bitwise_equal(mine, theirs)


# ------------------------------------------------- what the function takes ----

@dtypes
def test_results_are_new_arrays(dtype, rng):
    weight, bias = layer_arrays((O, I), dtype, rng, True)
    gamma, beta, rm, rv = bn_arrays(O, dtype, rng)
    for result in fold_batch_norm(weight, bias, rm, rv, gamma, beta):
        for given in (weight, bias, gamma, beta, rm, rv):
            assert not np.shares_memory(result, given)


def test_equivalent_out_axes_give_the_same_bits(rng):
    """(I, O) with out_axis -1 or 1 is (O, I) with out_axis 0, transposed; a
    4-D weight's channels on axis 1 or -3 are those moved to axis 0."""
    weight, bias = layer_arrays((O, I), np.float32, rng, True)
    gamma, beta, rm, rv = bn_arrays(O, np.float32, rng)
    w0, b0 = fold_batch_norm(weight, bias, rm, rv, gamma, beta, out_axis=0)
    for axis in (-1, 1):
        w1, b1 = fold_batch_norm(weight.T, bias, rm, rv, gamma, beta, out_axis=axis)
        assert_bitwise_equal(w1.T, w0)
        assert_bitwise_equal(b1, b0)
    assert_bitwise_equal(fold_batch_norm(weight, bias, rm, rv, gamma, beta, out_axis=-2)[0], w0)

    conv, _ = layer_arrays((O, I, K, K), np.float32, rng, False)
    c0 = fold_batch_norm(conv, None, rm, rv, gamma, beta)[0]
    moved = np.moveaxis(conv, 0, 1)
    for axis in (1, -3, np.int64(1)):
        c1 = fold_batch_norm(moved, None, rm, rv, gamma, beta, out_axis=axis)[0]
        assert_bitwise_equal(np.ascontiguousarray(np.moveaxis(c1, 1, 0)), c0)


def test_no_gamma_or_beta_is_a_gamma_of_one_and_a_beta_of_zero(rng):
    weight, bias = layer_arrays((O, I, K, K), np.float32, rng, True)
    _, _, rm, rv = bn_arrays(O, np.float32, rng)
    ones, zeros = np.ones(O, np.float32), np.zeros(O, np.float32)
    for mine, theirs in zip(fold_batch_norm(weight, bias, rm, rv, None, None),
                            fold_batch_norm(weight, bias, rm, rv, ones, zeros)):
        assert_bitwise_equal(mine, theirs)
    for mine, theirs in zip(fold_batch_norm(weight, None, rm, rv, None, None),
                            fold_batch_norm(weight, zeros, rm, rv, None, None)):
        assert_bitwise_equal(mine, theirs)


@dtypes
def test_non_contiguous_and_read_only_arrays_give_the_same_bits(dtype, rng):
    weight, bias = layer_arrays((O, I, K, K), dtype, rng, True)
    gamma, beta, rm, rv = bn_arrays(O, dtype, rng)
    expected = fold_batch_norm(weight, bias, rm, rv, gamma, beta)
    for w, vector in [(transposed_view(weight), strided_vector),
                      (np.asfortranarray(weight), read_only),
                      (read_only(weight), lambda v: v[::-1].copy()[::-1])]:
        ours = fold_batch_norm(w, *(vector(v) for v in (bias, rm, rv, gamma, beta)))
        for mine, theirs in zip(ours, expected):
            assert_bitwise_equal(mine, theirs)


def test_mixed_dtypes_fold_in_float64_and_return_the_weights(rng):
    """float32 statistics with a float64 weight (and the reverse): the fold of
    the values widened to float64, rounded to the weight's dtype."""
    weight, bias = layer_arrays((O, I), np.float64, rng, True)
    gamma, beta, rm, rv = bn_arrays(O, np.float32, rng)
    wide = [v.astype(np.float64) for v in (rm, rv, gamma, beta)]
    for mine, theirs in zip(fold_batch_norm(weight, bias, rm, rv, gamma, beta),
                            fold_batch_norm(weight, bias, *wide)):
        assert_bitwise_equal(mine, theirs)
    narrow = weight.astype(np.float32)
    for mine, theirs in zip(fold_batch_norm(narrow, bias, *wide),
                            fold_batch_norm(narrow.astype(np.float64), bias, *wide)):
        assert_bitwise_equal(mine, theirs.astype(np.float32))


# ------------------------------------------------------------------ docs ----

@pytest.mark.parametrize("obj", [fastbn.folding, BatchNorm2d.fold_into],
                         ids=["fold_batch_norm", "fold_into"])
def test_docstring_examples_run(obj):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = doctest.DocTestFinder().find(obj, getattr(obj, "__qualname__", obj.__name__))
    assert sum(len(t.examples) for t in tests) >= 3
    for t in tests:
        runner.run(t)
    assert runner.failures == 0

