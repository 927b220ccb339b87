"""Half-precision storage: float16 and bfloat16 data with float32 parameters.

x, dy, y and out may be float16 or bfloat16 (ml_dtypes' dtype, skipped
without it); gamma, beta, the running statistics, mean, invstd, dgamma and
dbeta are float32, as in PyTorch. The kernels read the 16-bit values
exactly, accumulate as for float32 and round each output once: y and dx are
checked against the float64 oracle run on the same 16-bit inputs, within
one unit in the last place of the 16-bit result plus a float32 rounding of
the channel's scale (the float32 map that computes them); the float32
outputs as float32 outputs are.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_bitwise_equal, make_inputs, run_ranks, values

import fastbn
from fastbn import _dtypes, reference
from fastbn.distributed import sync_batch_norm_backward, sync_batch_norm_forward

try:
    import ml_dtypes
except ImportError:  # bfloat16 is an optional extra
    ml_dtypes = None

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

HALVES = [pytest.param(np.dtype(np.float16), id="float16"),
          pytest.param(np.dtype(ml_dtypes.bfloat16) if ml_dtypes else None, id="bfloat16",
                       marks=pytest.mark.skipif(ml_dtypes is None, reason="needs ml_dtypes"))]
# the relative spacing of each 16-bit type: 2**-10 (float16), 2**-7 (bfloat16)
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
#: (shape, channel_axis): planar NCHW and NCL, columnar (N, D), channels last, 5-D
LAYOUTS = {"nchw": ((4, 5, 6, 7), 1), "ncl": ((3, 4, 300), 1), "nd": ((64, 9), 1),
           "nhwc": ((3, 4, 5, 6), -1), "ncdhw": ((2, 3, 4, 3, 5), 1)}
F32 = np.dtype(np.float32)


def half_inputs(shape, ca, dtype, rng):
    """make_inputs with x and dy in the 16-bit dtype, the rest float32."""
    v = make_inputs(shape, np.float32, ca, rng)
    v.x = v.x.astype(dtype)
    v.dy = v.dy.astype(dtype)
    return v


def channel_scale(a, ca):
    """Per channel, the largest |value|, broadcast against a."""
    a = np.abs(a.astype(np.float64))
    axes = tuple(d for d in range(a.ndim) if d != ca % a.ndim)
    return np.max(a, axis=axes, keepdims=True)


def assert_half_close(got, want, ca, what):
    """got (16-bit) within one unit in the last place of want's value, plus
    a float32 rounding of the channel's scale; want the oracle's result
    (16-bit, rounded once from float64)."""
    assert got.dtype == want.dtype, what
    g, w = got.astype(np.float64), want.astype(np.float64)
    eps = EPS[got.dtype.name]
    bound = eps * np.abs(w) + 8 * 2.0**-24 * channel_scale(want, ca) + 1e-300
    err = np.abs(g - w)
    same_nan = np.isnan(g) == np.isnan(w)
    assert same_nan.all(), f"{what}: NaN where the oracle has none (or the reverse)"
    ok = (err <= bound) | np.isnan(w)
    assert ok.all(), (f"{what}: {np.count_nonzero(~ok)} values off by more than 1 ulp, worst "
                      f"{np.max(err / bound)} bounds")


def assert_stat_close(got, want, what):
    assert got.dtype == F32 and want.dtype == F32, what
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALVES)
def test_training_pass_matches_the_oracle(dtype, layout, rng):
    shape, ca = LAYOUTS[layout]
    v = half_inputs(shape, ca, dtype, rng)
    runs = []
    for impl in (fastbn, reference):
        rm, rv = v.running_mean.copy(), v.running_var.copy()
        y, mean, invstd = impl.batch_norm_forward(v.x, v.gamma, v.beta, running_mean=rm,
                                                  running_var=rv, channel_axis=ca)
        dx, dgamma, dbeta = impl.batch_norm_backward(v.dy, v.x, v.gamma, mean, invstd,
                                                     channel_axis=ca)
        runs.append((y, mean, invstd, rm, rv, dx, dgamma, dbeta))
    (y, mean, invstd, rm, rv, dx, dg, db), (yr, mr, ir, rmr, rvr, dxr, dgr, dbr) = runs
    assert_half_close(y, yr, ca, "y")
    assert_half_close(dx, dxr, ca, "dx")
    for name, a, b in (("mean", mean, mr), ("invstd", invstd, ir), ("running_mean", rm, rmr),
                       ("running_var", rv, rvr)):
        assert_stat_close(a, b, name)
    for name, a, b in (("dgamma", dg, dgr), ("dbeta", db, dbr)):
        assert a.dtype == F32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=name)


# every mode of a pass once per dtype and layout family (pairwise, not the product)
MODES = [("inference", None, "nchw"), ("inference", "relu", "nhwc"),
         ("frozen", None, "nd"), ("frozen", "leaky_relu", "nchw"),
         ("activated", "relu", "ncl"), ("activated", "leaky_relu", "nhwc"),
         ("from_output", None, "nchw"), ("from_output", "leaky_relu", "nd")]


@pytest.mark.parametrize("mode, activation, layout", MODES,
                         ids=[f"{m}-{a}-{layout}" for m, a, layout in MODES])
@pytest.mark.parametrize("dtype", HALVES)
def test_every_mode_matches_the_oracle(dtype, mode, activation, layout, rng):
    shape, ca = LAYOUTS[layout]
    v = half_inputs(shape, ca, dtype, rng)
    act = dict(activation=activation, negative_slope=0.2)
    results = []
    for impl in (fastbn, reference):
        if mode == "inference":
            results.append((impl.batch_norm_inference(v.x, v.gamma, v.beta, v.running_mean,
                                                      v.running_var, channel_axis=ca, **act),))
        elif mode == "frozen":
            results.append(impl.batch_norm_backward(v.dy, v.x, v.gamma, v.mean, v.invstd,
                                                    beta=v.beta, training=False,
                                                    channel_axis=ca, **act))
        elif mode == "activated":
            results.append(impl.batch_norm_backward(v.dy, v.x, v.gamma, v.mean, v.invstd,
                                                    beta=v.beta, channel_axis=ca, **act))
        else:
            y, _, invstd = fastbn.batch_norm_forward(v.x, v.gamma, v.beta, channel_axis=ca,
                                                     **act)
            results.append(impl.batch_norm_backward_from_output(v.dy, y, v.gamma, v.beta,
                                                                invstd, channel_axis=ca, **act))
    ours, want = results
    assert_half_close(ours[0], want[0], ca, mode)
    for a, b in zip(ours[1:], want[1:]):
        assert a.dtype == F32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("dtype", HALVES)
def test_variants_match_the_oracle(dtype, rng):
    shape, ca = LAYOUTS["nchw"]
    v = half_inputs(shape, ca, dtype, rng)
    for name in ("batch_renorm", "ghost_batch_norm"):
        outs = []
        for impl in (fastbn.variants, reference):
            fwd = getattr(impl, name + "_forward")
            bwd = getattr(impl, name + "_backward")
            rm, rv = v.running_mean.copy(), v.running_var.copy()
            if name == "batch_renorm":
                res = fwd(v.x, v.gamma, v.beta, rm, rv)
            else:
                res = fwd(v.x, v.gamma, v.beta, 2, running_mean=rm, running_var=rv)
            grads = bwd(v.dy, v.x, v.gamma, *res[1:])
            outs.append((res, grads, rm, rv))
        (res, grads, rm, rv), (rres, rgrads, rrm, rrv) = outs
        assert_half_close(res[0], rres[0], ca, name + " y")
        assert_half_close(grads[0], rgrads[0], ca, name + " dx")
        for a, b in zip((*res[1:], *grads[1:], rm, rv), (*rres[1:], *rgrads[1:], rrm, rrv)):
            assert a.dtype == F32
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", HALVES)
def test_the_same_bits_for_any_thread_count(dtype, layout, rng):
    shape, ca = (32, 16, 24, 24), 1
    if layout == "nhwc":
        shape, ca = (32, 24, 24, 16), -1
    v = half_inputs(shape, ca, dtype, rng)
    runs = []
    for threads in (1, 2, 3):
        y, mean, invstd = fastbn.batch_norm_forward(v.x, v.gamma, v.beta, channel_axis=ca,
                                                    num_threads=threads)
        runs.append((y, mean, invstd, *fastbn.batch_norm_backward(
            v.dy, v.x, v.gamma, mean, invstd, channel_axis=ca, num_threads=threads)))
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", HALVES)
def test_out_and_in_place(dtype, rng):
    v = half_inputs((4, 5, 6, 7), 1, dtype, rng)
    y = fastbn.batch_norm_forward(v.x, v.gamma, v.beta)[0]
    out = np.empty_like(v.x)
    got = fastbn.batch_norm_forward(v.x, v.gamma, v.beta, out=out)[0]
    assert got is out
    assert_bitwise_equal(out, y)
    x = v.x.copy()
    fastbn.batch_norm_forward(x, v.gamma, v.beta, out=x)
    assert_bitwise_equal(x, y)
    strided = np.repeat(v.x, 2, axis=0)[::2]   # the full checks' path, a copy
    assert_bitwise_equal(fastbn.batch_norm_forward(strided, v.gamma, v.beta)[0], y)


# ------------------------------------------------------------ bad input ----

@pytest.mark.parametrize("dtype", HALVES)
def test_mixed_dtypes_are_refused(dtype, rng):
    v = half_inputs((8, 3), 1, dtype, rng)
    x32 = v.x.astype(np.float32)
    with pytest.raises(TypeError, match=r"out must have the dtype of x \(float32\)"):
        fastbn.batch_norm_forward(x32, None, None, out=np.empty(x32.shape, dtype))
    other = np.float16 if dtype.name == "bfloat16" else np.float32
    with pytest.raises(TypeError, match=rf"dy must have the dtype of x \({dtype.name}\)"):
        fastbn.batch_norm_backward(v.dy.astype(other), v.x, v.gamma, v.mean, v.invstd)
    with pytest.raises(TypeError, match=rf"gamma must have dtype float32, the parameter "
                                        rf"dtype of {dtype.name} x, got {dtype.name}"):
        fastbn.batch_norm_forward(v.x, v.gamma.astype(dtype), None)
    with pytest.raises(TypeError, match=r"running_mean must have dtype float32"):
        fastbn.batch_norm_inference(v.x, None, None, v.running_mean.astype(np.float64),
                                    v.running_var)
    with pytest.raises(TypeError, match=rf"layer's dtype \(float64\), got {dtype.name}: for "
                                        rf"{dtype.name} input build the layer with "
                                        rf"BatchNorm1d\(3, dtype=np.float32\)"):
        fastbn.BatchNorm1d(3, dtype=np.float64).forward(v.x)
    with pytest.raises(TypeError, match=rf"dtype must be float32 or float64, got {dtype.name}: "
                                        rf"the parameters' dtype; a float32 layer takes"):
        fastbn.BatchNorm1d(3, dtype=dtype)


def test_float16_overflow_is_inf_and_nan_stays_nan(rng):
    """IEEE: a y beyond float16's range (65504) is inf; a NaN input makes
    its channel NaN, as for float32."""
    x = rng.standard_normal((16, 3)).astype(np.float16)
    gamma = np.array([1e5, 1.0, 1.0], np.float32)
    y = fastbn.batch_norm_forward(x, gamma, None)[0]
    y32 = fastbn.batch_norm_forward(x.astype(np.float32), gamma, None)[0]
    big = np.abs(y32[:, 0]) > 65520
    assert big.any()
    assert np.array_equal(np.isinf(y[:, 0]), big)
    assert np.array_equal(np.sign(y[big, 0]), np.sign(y32[big, 0]))
    x[3, 1] = np.nan
    y, mean, invstd = fastbn.batch_norm_forward(x, None, None)
    y32, mean32, _ = fastbn.batch_norm_forward(x.astype(np.float32), None, None)
    assert np.array_equal(np.isnan(y), np.isnan(y32))
    assert np.array_equal(np.isnan(mean), np.isnan(mean32))


def test_a_float16_nan_keeps_its_payload_at_every_kernel_level(rng):
    """The 16-bit store keeps a NaN's payload (quieted) as F16C does, so the
    portable kernels give the x86-64-v3/v4 bits; float32 keeps it too."""
    x = rng.standard_normal((13, 3)).astype(np.float16)
    bits = x.view(np.uint16)
    bits[4, 1] = 0x7D01          # a signaling NaN with a payload
    bits[7, 2] = 0xFE13
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    y = fastbn.batch_norm_inference(x, ones, zeros, zeros, ones, channel_axis=-1)
    got = y.view(np.uint16)
    assert got[4, 1] == 0x7F01 and got[7, 2] == 0xFE13


def test_the_oracle_rounds_bfloat16_once():
    """A float64 just above a bfloat16 midpoint rounds up (through float32
    rounded to nearest it would land on the midpoint and round to even)."""
    if ml_dtypes is None:
        pytest.skip("needs ml_dtypes")
    v = np.array([1 + 2.0**-8 + 2.0**-40, -(1 + 2.0**-8 + 2.0**-40), 1 + 2.0**-8])
    got = _dtypes.rounded(v, np.dtype(ml_dtypes.bfloat16)).astype(np.float64)
    assert got.tolist() == [1 + 2.0**-7, -(1 + 2.0**-7), 1.0]


# -------------------------------------------------- layers, sync, folding ----

@pytest.mark.parametrize("options", [{}, {"memory_saving": True}, {"activation": "relu"},
                                     {"renorm": True}, {"virtual_batch_size": 4}],
                         ids=["plain", "memory_saving", "relu", "renorm", "ghost"])
@pytest.mark.parametrize("dtype", HALVES)
def test_layer_takes_half_input_with_float32_parameters(dtype, options, rng):
    v = half_inputs((8, 5, 4, 4), 1, dtype, rng)
    layer = fastbn.BatchNorm2d(5, **options)
    twin = fastbn.BatchNorm2d(5, **options)
    y = layer.forward(v.x)
    dx = layer.backward(v.dy)
    y32 = twin.forward(v.x.astype(np.float32))
    twin.backward(v.dy.astype(np.float32))
    assert y.dtype == dx.dtype == dtype
    for name in ("gamma", "beta", "running_mean", "running_var", "dgamma", "dbeta"):
        a, b = getattr(layer, name), getattr(twin, name)
        assert a.dtype == F32, name
        # the same statistics as the float32 layer on the same (widened) values; the
        # backward from the output reads y, which holds 16 bits here
        rtol = 4 * EPS[dtype.name] if options.get("memory_saving") else 1e-5
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)
    assert_half_close(y, y32.astype(dtype), 1, "y against the float32 layer")
    layer.eval()
    assert layer.forward(v.x).dtype == dtype


@pytest.mark.parametrize("dtype", HALVES)
def test_sync_batch_norm_on_one_rank_is_the_single_process_bits(dtype, rng):
    shape, ca = LAYOUTS["nchw"]
    v = half_inputs(shape, ca, dtype, rng)
    common = dict(num_features=v.C, channel_axis=ca, num_threads=1)

    def work(rank, allreduce):
        y, mean, invstd = sync_batch_norm_forward(v.x, v.gamma, v.beta, allreduce=allreduce,
                                                  **common)
        return (y, mean, invstd, *sync_batch_norm_backward(v.dy, v.x, v.gamma, mean, invstd,
                                                           allreduce=allreduce, **common))
    (ours,) = values(run_ranks(1, work)[0])
    y, mean, invstd = fastbn.batch_norm_forward(v.x, v.gamma, v.beta, channel_axis=ca)
    single = (y, mean, invstd, *fastbn.batch_norm_backward(v.dy, v.x, v.gamma, mean, invstd,
                                                           channel_axis=ca))
    for a, b in zip(ours, single):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", HALVES)
def test_sync_batch_norm_layer_over_two_ranks(dtype, rng):
    """The layer on 16-bit input, its parameters float32: two ranks' halves
    of a batch give the single-process layer's y (within one 16-bit ulp:
    the ranks' sums merge in another order) and running statistics."""
    v = half_inputs((8, 5, 4, 4), 1, dtype, rng)

    def work(rank, allreduce):
        layer = fastbn.SyncBatchNorm(5, allreduce=allreduce)
        y = layer.forward(v.x[4 * rank:4 * rank + 4])
        return y, layer.running_mean, layer.running_var, layer.gamma.dtype
    results = values(run_ranks(2, work)[0])
    single = fastbn.BatchNorm2d(5)
    y = single.forward(v.x)
    assert results[0][3] == F32
    assert_half_close(np.concatenate([r[0] for r in results]), y, 1, "y")
    for r in results:
        np.testing.assert_allclose(r[1], single.running_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(r[2], single.running_var, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", HALVES)
def test_a_rank_with_16_bit_x_in_a_float64_layer_is_named_on_every_rank(dtype, rng):
    """Its dtype travels to the other ranks by name (bfloat16's type number
    differs between processes): every rank raises, saying which."""
    x = rng.standard_normal((4, 3, 5)).astype(np.float64)

    def work(rank, allreduce):
        layer = fastbn.SyncBatchNorm(3, dtype=np.float64, allreduce=allreduce)
        return layer.forward(x.astype(dtype) if rank == 1 else x)
    results, _ = run_ranks(2, work)
    for exc in results:
        assert isinstance(exc, TypeError), exc
        assert dtype.name in str(exc), str(exc)


def test_ranks_with_float16_and_bfloat16_disagree_on_the_dtype(rng):
    """The two 16-bit dtypes have the same size: the ranks tell them apart."""
    if ml_dtypes is None:
        pytest.skip("needs ml_dtypes")
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)

    def work(rank, allreduce):
        dtype = np.float16 if rank else ml_dtypes.bfloat16
        return sync_batch_norm_forward(x.astype(dtype), None, None, allreduce=allreduce,
                                       num_features=3)
    results, _ = run_ranks(2, work)
    for exc in results:
        assert isinstance(exc, TypeError), exc
        assert "disagree on the dtype of x: bfloat16 on some ranks, float16 on others" in str(exc)


@pytest.mark.parametrize("dtype", HALVES)
def test_folding_a_half_weight_gives_float32(dtype, rng):
    v = half_inputs((8, 4), 1, dtype, rng)
    weight = rng.standard_normal((4, 6)).astype(dtype)
    w, b = fastbn.fold_batch_norm(weight, None, v.running_mean, v.running_var, v.gamma, v.beta)
    w32, b32 = fastbn.fold_batch_norm(weight.astype(np.float32), None, v.running_mean,
                                      v.running_var, v.gamma, v.beta)
    assert w.dtype == b.dtype == F32
    assert_bitwise_equal(w, w32)
    assert_bitwise_equal(b, b32)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_a_half_pytorch_state_dict_loads(half):
    torch = pytest.importorskip("torch")
    model = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        model.running_var.copy_(torch.tensor([0.25, 4.0, 9.0]))
    model = model.half() if half == "float16" else model.bfloat16()
    layer = fastbn.BatchNorm2d(3)
    layer.load_state_dict(model.state_dict())
    assert layer.gamma.dtype == F32
    np.testing.assert_array_equal(layer.gamma, model.weight.float().detach().numpy())
    np.testing.assert_array_equal(layer.running_var, model.running_var.float().numpy())


def test_pytorch_parity_in_bfloat16(rng):
    """PyTorch's CPU BatchNorm on bfloat16 input with float32 weights (its
    mixed-type kernel): the same y and dx within one bfloat16 ulp."""
    torch = pytest.importorskip("torch")
    if ml_dtypes is None:
        pytest.skip("needs ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    v = half_inputs((8, 6, 10, 10), 1, bf16, rng)
    y, mean, invstd = fastbn.batch_norm_forward(v.x, v.gamma, v.beta)
    dx = fastbn.batch_norm_backward(v.dy, v.x, v.gamma, mean, invstd)[0]
    xt = torch.from_numpy(v.x.astype(np.float32)).bfloat16().requires_grad_()
    yt = torch.nn.functional.batch_norm(xt, None, None, torch.from_numpy(v.gamma),
                                        torch.from_numpy(v.beta), training=True)
    yt.backward(torch.from_numpy(v.dy.astype(np.float32)).bfloat16())
    assert yt.dtype == torch.bfloat16
    torch_y = yt.detach().float().numpy().astype(bf16)
    torch_dx = xt.grad.float().numpy().astype(bf16)
    assert_half_close(y, torch_y, 1, "y against PyTorch")
    assert_half_close(dx, torch_dx, 1, "dx against PyTorch")
