"""The compiled front (fastbn._front): well-formed calls take its fast path,
and the full path (fastbn._checks, then the same core unchecked) gives the
same bits for the same values."""

import numpy as np
import pytest

import fastbn
from fastbn import _front

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

# (shape, channel_axis, dtype): planar, columnar (N, D), channels last, S == 1
CASES = [((8, 3, 5, 5), 1, np.float32), ((16, 7), 1, np.float64),
         ((4, 5, 6, 3), -1, np.float32), ((6, 4, 1, 1), 1, np.float64)]


def _arrays(shape, ca, dtype):
    rng = np.random.default_rng(sum(shape))
    c = shape[ca]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (rng.random(c) + 0.5).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return x, dy, gamma, beta


def _strided(a):
    """The values of a in a view that is not C-contiguous: the full path."""
    wide = np.zeros(a.shape + (2,), a.dtype)
    wide[..., 1] = a
    return wide[..., 1]


@pytest.mark.parametrize("shape, ca, dtype", CASES)
def test_well_formed_calls_take_the_fast_path(shape, ca, dtype):
    x, dy, gamma, beta = _arrays(shape, ca, dtype)
    c = shape[ca]
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    count = np.zeros((), np.int64)
    forward = _front.forward(x, gamma, beta, 1e-5, rm, rv, None, count, True, "leaky_relu",
                             0.1, ca, None, None)
    assert forward is not None and int(count) == 1
    y, mean, invstd = forward
    assert _front.inference(x, gamma, beta, rm, rv, 1e-5, "relu", 0.01, ca, np.empty_like(x),
                            2) is not None
    assert _front.backward(dy, x, gamma, mean, invstd, beta, "leaky_relu", 0.1, True, True, ca,
                           dy.copy(), None) is not None
    assert _front.backward_from_output(dy, y, gamma, beta, invstd, "leaky_relu", 0.1, ca, None,
                                       1) is not None


@pytest.mark.parametrize("shape, ca, dtype", CASES)
def test_other_calls_take_the_full_path(shape, ca, dtype):
    x, dy, gamma, beta = _arrays(shape, ca, dtype)
    c = shape[ca]
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    args = dict(gamma=gamma, beta=beta, eps=1e-5, running_mean=rm, running_var=rv, momentum=0.1,
                num_batches_tracked=None, unbiased=True, activation=None, negative_slope=0.01,
                channel_axis=ca, out=None, num_threads=None)
    for name, value in [("eps", 1), ("momentum", 1), ("unbiased", np.True_), ("num_threads", 0),
                        ("gamma", _strided(gamma)), ("running_var", rm), ("out", x.T),
                        ("gamma", gamma.astype(np.float16)), ("activation", "tanh"),
                        ("channel_axis", 2 if len(shape) > 3 else 3)]:
        assert _front.forward(x, **{**args, name: value}) is None, name
    assert _front.forward(_strided(x), **args) is None
    assert _front.forward(x, **args, ndims=(len(shape) + 1,)) is None
    assert _front.forward(x, **args, num_features=c + 1) is None
    other = np.dtype(np.float64 if dtype == np.float32 else np.float32)
    assert _front.forward(x, **args, dtype=other) is None
    assert np.array_equal(rm, np.zeros(c, dtype)), "a refused call wrote the running mean"
    assert _front.forward(x, **args) is not None


@pytest.mark.parametrize("shape, ca, dtype", CASES)
def test_full_path_gives_the_bits_of_the_fast_path(shape, ca, dtype):
    x, dy, gamma, beta = _arrays(shape, ca, dtype)
    c = shape[ca]
    results = []
    for wrap in (lambda a: a, _strided):
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        count = np.zeros((), np.int64)
        running = (wrap(rm), wrap(rv))
        y, mean, invstd = fastbn.batch_norm_forward(
            wrap(x), wrap(gamma), wrap(beta), running_mean=running[0], running_var=running[1],
            momentum=None, num_batches_tracked=count, activation="leaky_relu",
            negative_slope=0.2, channel_axis=ca)
        inf = fastbn.batch_norm_inference(wrap(x), wrap(gamma), wrap(beta), running[0],
                                          running[1], activation="relu", channel_axis=ca)
        grads = fastbn.batch_norm_backward(wrap(dy), wrap(x), wrap(gamma), wrap(mean),
                                           wrap(invstd), beta=wrap(beta),
                                           activation="leaky_relu", negative_slope=0.2,
                                           channel_axis=ca)
        frozen = fastbn.batch_norm_backward(wrap(dy), wrap(x), wrap(gamma), wrap(mean),
                                            wrap(invstd), training=False, param_grads=False,
                                            channel_axis=ca)
        from_y = fastbn.batch_norm_backward_from_output(
            wrap(dy), wrap(y), wrap(gamma), wrap(beta), wrap(invstd),
            activation="leaky_relu", negative_slope=0.2, channel_axis=ca)
        assert int(count) == 1
        results.append([y, mean, invstd, np.asarray(running[0]), np.asarray(running[1]), inf,
                        *grads, frozen[0], *from_y])
    assert frozen[1] is None and frozen[2] is None
    for fast, full in zip(*results):
        np.testing.assert_array_equal(fast, full)


def test_layer_fast_path_matches_the_reference():
    x, dy, _, _ = _arrays((8, 3, 5, 5), 1, np.float64)
    layer = fastbn.BatchNorm2d(3, dtype=np.float64, activation="relu")
    oracle = fastbn.BatchNorm2d(3, dtype=np.float64, activation="relu",
                                backend=fastbn.reference)
    for bn in (layer, oracle):
        bn.gamma[...] = np.linspace(0.5, 2, 3)
    np.testing.assert_allclose(layer(x), oracle(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.backward(dy), oracle.backward(dy), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.dgamma, oracle.dgamma, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(layer.num_batches_tracked, oracle.num_batches_tracked)
    np.testing.assert_allclose(layer.running_var, oracle.running_var, rtol=1e-12)
    with pytest.raises(ValueError, match="BatchNorm2d expects 4-D input"):
        layer(x[0])


def test_out_with_other_strides_on_a_unit_axis_is_not_in_place():
    """out with x's data and shape but another stride on an axis of length 1
    is not x itself (fastbn._checks' rule): refused on both paths."""
    a = np.random.default_rng(0).random((4, 3, 5))
    x, out = a.reshape(4, 3, 1, 5), a[:, :, None, :]
    assert out.flags.c_contiguous and out.strides != x.strides
    assert _front.forward(x, None, None, 1e-5, None, None, 0.1, None, True, None, 0.01, 1, out,
                          None) is None
    with pytest.raises(ValueError, match="out overlaps x"):
        fastbn.batch_norm_forward(x, None, None, out=out)


def test_an_unaligned_count_is_counted():
    """The full path takes a num_batches_tracked that is not aligned; the
    core reads and increments it bytewise (a cumulative average: weight 1)."""
    x, _, gamma, beta = _arrays((8, 3, 5, 5), 1, np.float64)
    count = np.frombuffer(bytearray(9), np.int64, offset=1)
    assert not count.flags.aligned
    rm, rv = np.full(3, 7.0), np.full(3, 7.0)
    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                                momentum=None, num_batches_tracked=count)
    assert int(count[0]) == 1
    np.testing.assert_array_equal(rm, mean)


# Batch Renormalization (clip), Ghost BN (virtual_batch_size) and both
VARIANTS = [((3.0, None, 5.0), None), (None, 2), ((2.0, 0.25, 0.5), 2)]


@pytest.mark.parametrize("clip, virtual_batch_size", VARIANTS)
@pytest.mark.parametrize("shape, ca, dtype", CASES)
def test_variants_fast_and_full_paths(shape, ca, dtype, clip, virtual_batch_size):
    """Well-formed variant calls take the fast path, other ones the full
    path, and the full path gives the fast path's bits."""
    x, dy, gamma, beta = _arrays(shape, ca, dtype)
    c = shape[ca]
    results = []
    for wrap in (lambda a: a, _strided):
        rm, rv = wrap(np.full(c, 2.5, dtype)), wrap(np.full(c, 3.0, dtype))
        args = (wrap(gamma), wrap(beta), rm, rv, 0.1, None, 1e-5, True, "relu", 0.01, ca, None,
                None)
        fast = _front.variant_forward(wrap(x), *args, clip, virtual_batch_size)
        assert (fast is None) == (wrap is _strided)
        forward = fast or fastbn.variants._forward(
            wrap(x), wrap(gamma), wrap(beta), rm, rv, clip, virtual_batch_size, 1e-5, 0.1,
            None, True, "relu", 0.01, ca, None, None)
        stats = [wrap(s) for s in forward[1:]]
        r, d = stats[2:] if clip else (None, None)
        fast = _front.variant_backward(wrap(dy), wrap(x), wrap(gamma), stats[0], stats[1], r,
                                       d, wrap(beta), "relu", 0.01, ca, None, 1, clip is not None,
                                       None)
        assert (fast is None) == (wrap is _strided)
        grads = fast or fastbn.variants._backward(
            wrap(dy), wrap(x), wrap(gamma), tuple(stats), None, wrap(beta), "relu", 0.01, ca,
            None, 1)
        results.append([*forward, np.asarray(rm), np.asarray(rv), *grads])
    for fast, full in zip(*results):
        np.testing.assert_array_equal(fast, full)
    rm = np.zeros(c, dtype)
    args = dict(gamma=gamma, beta=beta, running_mean=rm, running_var=np.ones(c, dtype),
                momentum=0.1, num_batches_tracked=None, eps=1e-5, unbiased=True,
                activation=None, negative_slope=0.01, channel_axis=ca, out=None,
                num_threads=None, clip=clip, virtual_batch_size=virtual_batch_size)
    refused = [("eps", 1), ("running_var", rm)]
    if clip:
        refused += [("clip", (3, None, 5.0)), ("clip", (0.5, None, 5.0)),
                    ("clip", (3.0, 1.5, 5.0)), ("clip", (3.0, None, -1.0)),
                    ("clip", (float("nan"), None, 5.0)), ("running_mean", None)]
    if virtual_batch_size:
        refused += [("virtual_batch_size", v) for v in (shape[0] - 1, 0, 2.0, True, shape[0] * 2)]
    for name, value in refused:
        assert _front.variant_forward(x, **{**args, name: value}) is None, (name, value)
    assert np.array_equal(rm, np.zeros(c, dtype)), "a refused call wrote the running mean"
    stats = results[0][1:5 if clip else 3]
    grouped = virtual_batch_size is not None
    for bad in ([np.concatenate([s, s[:1]]) for s in stats] if grouped  # G + 1 groups
                else [s[None] for s in stats],
                [stats[0], stats[1].astype(np.float16), *stats[2:]]):
        assert _front.variant_backward(dy, x, gamma, *bad[:2], *(bad[2:] or (None, None)),
                                       beta, None, 0.01, ca, None, None, clip is not None,
                                       grouped) is None
