"""Batch Renormalization and Ghost Batch Normalization (fastbn.variants).

- a matrix over every kernel schedule x dtype x variant x activation, the
  thread count and ``out=`` varying pairwise: against the float64 oracle
  (fastbn.reference) at the dtype's tolerance, the running statistics
  included, and for the same bits at another thread count;
- the reductions to the plain layer, to the bit: ``rmax=1, dmax=0`` and
  ``virtual_batch_size = N``;
- finite differences for the gradients (r and d held constant by clipping);
- the layers' options (training against the oracle backend, state dict,
  pickle), and SyncBatchNorm's renorm over the global batch.

The bad inputs are rows of tests/test_hostile.py.
"""

from __future__ import annotations

import itertools
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import (DTYPES, assert_bitwise_equal, assert_close, dtype_id, layout_id,
                     make_inputs, numeric_gradient, per_channel, run_ranks, values)

import fastbn
from fastbn import reference
from fastbn.distributed import SyncBatchNorm

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

#: (shape, channel_axis, virtual_batch_size): one input per kernel schedule
#: (as helpers.SCHEDULE_LAYOUTS), with a batch size that groups divide
LAYOUTS = [
    ((6, 4, 5, 7), 1, 3),        # planar, by channel group
    ((4, 3, 40000), 1, 2),       # planar, by (channel, block)
    ((4, 3, 5, 2, 3), -1, 2),    # channels last, 5-D
    ((4096, 40), 1, 512),        # columnar, by row block
    ((4, 50021), 1, 2),          # columnar, by tile
    ((8, 3), 1, 2),              # columnar, tiny
]
VARIANTS = ("renorm", "ghost", "renorm+ghost")
ACTIVATIONS = (None, "relu", "leaky_relu")
SLOPE = 0.2
CLIP = dict(rmax=1.2, rmin=0.9, dmax=0.3)   # tight, so that some r and d clip
#: (num_threads, out=): every pair of values meets in some case
PAIRWISE = [(1, False), (2, True), (3, False), (1, True), (2, False), (3, True)]


def clear_of_the_kink(z, beta, channel_axis, margin=1e-5):
    """beta shifted per channel (by a few ``margin``) so that no
    pre-activation ``z + shift`` lies within ``margin`` of 0: a rounding of
    z there flips an activation's derivative between two correct results."""
    shift = np.zeros(beta.shape)
    for c in range(beta.size):
        zc = np.moveaxis(z, channel_axis, 0)[c]
        for k in (0, 1, -1, 2, -2, 3, -3, 4, -4):
            if (np.abs(zc + 3 * k * margin) >= 2 * margin).all():
                shift[c] = 3 * k * margin
                break
    return (beta.astype(np.float64) + shift).astype(beta.dtype)


def _cases():
    product = itertools.product(LAYOUTS, DTYPES, VARIANTS, ACTIVATIONS)
    for i, ((shape, ca, vbs), dtype, variant, act) in enumerate(product):
        threads, out = PAIRWISE[i % len(PAIRWISE)]
        case = SimpleNamespace(shape=shape, channel_axis=ca, dtype=np.dtype(dtype),
                               renorm="renorm" in variant,
                               vbs=vbs if "ghost" in variant else None, activation=act,
                               num_threads=threads, out=out)
        yield pytest.param(case, id="-".join([layout_id(shape, ca), dtype_id(dtype), variant,
                                              str(act), f"t{threads}",
                                              "out" if out else "new"]))


def forward(impl, case, a, rm, rv, num_threads=None, out=None, **extra):
    """The case's forward with impl (fastbn or fastbn.reference)."""
    common = dict(eps=1e-5, momentum=0.1, activation=case.activation, negative_slope=SLOPE,
                  channel_axis=case.channel_axis, num_threads=num_threads, out=out)
    if case.renorm:
        return impl.batch_renorm_forward(a.x, a.gamma, a.beta, rm, rv, **CLIP,
                                         virtual_batch_size=case.vbs, **common, **extra)
    return impl.ghost_batch_norm_forward(a.x, a.gamma, a.beta, case.vbs, running_mean=rm,
                                         running_var=rv, **common, **extra)


def backward(impl, case, a, stats, num_threads=None, out=None):
    common = dict(beta=a.beta, activation=case.activation, negative_slope=SLOPE,
                  channel_axis=case.channel_axis, num_threads=num_threads, out=out)
    if case.renorm:
        return impl.batch_renorm_backward(a.dy, a.x, a.gamma, *stats, **common)
    return impl.ghost_batch_norm_backward(a.dy, a.x, a.gamma, *stats, **common)


def inputs(case, rng):
    a = make_inputs(case.shape, case.dtype, case.channel_axis, rng)
    if case.activation is not None:  # the oracle's pre-activation, clear of the kink
        plain = SimpleNamespace(**{**vars(case), "activation": None})
        z = forward(reference, plain, a, a.running_mean.copy(), a.running_var.copy())[0]
        a.beta = clear_of_the_kink(z.astype(np.float64), a.beta, case.channel_axis)
    return a


@pytest.fixture(params=list(_cases()))
def case(request):
    return request.param


def test_against_the_oracle_and_the_same_bits_at_another_thread_count(case, rng):
    a = inputs(case, rng)
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    orm, orv = a.running_mean.copy(), a.running_var.copy()
    out = np.empty_like(a.x) if case.out else None
    got = forward(fastbn, case, a, rm, rv, case.num_threads, out)
    want = forward(reference, case, a, orm, orv)
    if out is not None:
        assert got[0] is out
    names = ("y", "mean", "invstd", "r", "d")
    for name, g, w in zip(names, got, want):
        assert g.dtype == case.dtype and g.shape == w.shape, name
        assert_close(g, w, case.dtype, err_msg=name)
    assert_close(rm, orm, case.dtype, err_msg="running_mean")
    assert_close(rv, orv, case.dtype, err_msg="running_var")

    stats = got[1:]
    dx_out = np.empty_like(a.x) if case.out else None
    grads = backward(fastbn, case, a, stats, case.num_threads, dx_out)
    expected = backward(reference, case, a, stats)
    g = np.ones(a.C) if a.gamma is None else np.abs(a.gamma.astype(np.float64))
    scale = (g.max() * np.abs(np.asarray(stats[1], np.float64)).max()
             * np.abs(a.dy.astype(np.float64)).max())
    assert_close(grads[0], expected[0], case.dtype, scale=scale, err_msg="dx")
    for name, gg, w in zip(("dgamma", "dbeta"), grads[1:], expected[1:]):
        assert gg.shape == (a.C,) and gg.dtype == case.dtype, name
        assert_close(gg, w, case.dtype, err_msg=name)

    other = 1 + case.num_threads % 3
    rm2, rv2 = a.running_mean.copy(), a.running_var.copy()
    again = forward(fastbn, case, a, rm2, rv2, other)
    for name, g1, g2 in zip(names + ("running_mean", "running_var"), got + (rm, rv),
                            again + (rm2, rv2)):
        assert_bitwise_equal(g1, g2, f"{name}, {case.num_threads} vs {other} threads")
    for name, g1, g2 in zip(("dx", "dgamma", "dbeta"), grads,
                            backward(fastbn, case, a, stats, other)):
        assert_bitwise_equal(g1, g2, f"{name}, {case.num_threads} vs {other} threads")


# ------------------------------------------------------ the plain layer ----

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, channel_axis, vbs", LAYOUTS,
                         ids=[layout_id(s, ca) for s, ca, _ in LAYOUTS])
def test_the_reductions_to_the_plain_layer_are_its_bits(shape, channel_axis, vbs, dtype,
                                                         activation, rng):
    """rmax = 1 and dmax = 0 (r = 1, d = 0), and one virtual batch of all N
    samples, give the plain layer's bits: y, statistics, running statistics,
    dx, dgamma and dbeta."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    act = dict(activation=activation, negative_slope=SLOPE, channel_axis=channel_axis)
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    y, mean, invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, running_mean=rm,
                                                running_var=rv, **act)
    plain = (y, mean, invstd, rm, rv) + fastbn.batch_norm_backward(
        a.dy, a.x, a.gamma, mean, invstd, beta=a.beta, **act)

    rm1, rv1 = a.running_mean.copy(), a.running_var.copy()
    y1, m1, i1, r, d = fastbn.batch_renorm_forward(a.x, a.gamma, a.beta, rm1, rv1, rmax=1.0,
                                                   dmax=0.0, **act)
    assert (r == 1).all() and (d == 0).all()
    renormed = (y1, m1, i1, rm1, rv1) + fastbn.batch_renorm_backward(
        a.dy, a.x, a.gamma, m1, i1, r, d, beta=a.beta, **act)

    rm2, rv2 = a.running_mean.copy(), a.running_var.copy()
    y2, m2, i2 = fastbn.ghost_batch_norm_forward(a.x, a.gamma, a.beta, shape[0],
                                                 running_mean=rm2, running_var=rv2, **act)
    assert m2.shape == i2.shape == (1, a.C)
    ghost = (y2, m2[0], i2[0], rm2, rv2) + fastbn.ghost_batch_norm_backward(
        a.dy, a.x, a.gamma, m2, i2, beta=a.beta, **act)
    names = ("y", "mean", "invstd", "running_mean", "running_var", "dx", "dgamma", "dbeta")
    for name, p, q, g in zip(names, plain, renormed, ghost):
        assert_bitwise_equal(q, p, f"renorm {name}")
        assert_bitwise_equal(g, p, f"ghost {name}")


@pytest.mark.parametrize("shape, dtype, vbs, num_threads", [
    ((12, 5, 3, 3), np.float64, 4, None),
    # 6 MiB of float32, groups of 4 samples: the batch is cold, so its groups
    # take channel groups sized to the L1 cache (fastbn._planar.l1_sized),
    # where the slices alone, cached, take the usual ones
    ((32, 256, 14, 14), np.float32, 4, 1),
    ((32, 256, 14, 14), np.float32, 4, 2),
], ids=["small", "cold-1thread", "cold-2threads"])
def test_ghost_groups_are_plain_batches(shape, dtype, vbs, num_threads, rng):
    """Each virtual batch's y and statistics are the plain forward of that
    slice, to the bit; the running statistics take the groups' average."""
    a = make_inputs(shape, dtype, 1, rng)
    G = shape[0] // vbs
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    y, mean, invstd = fastbn.ghost_batch_norm_forward(
        a.x, a.gamma, a.beta, vbs, running_mean=rm, running_var=rv, momentum=0.5,
        num_threads=num_threads)
    for j in range(G):
        part = slice(vbs * j, vbs * j + vbs)
        yj, mj, ij = fastbn.batch_norm_forward(a.x[part], a.gamma, a.beta,
                                               num_threads=num_threads)
        assert_bitwise_equal(y[part], yj)
        assert_bitwise_equal(mean[j], mj)
        assert_bitwise_equal(invstd[j], ij)
    groups = a.x.astype(np.float64).reshape(G, vbs, shape[1], -1)
    var = groups.var(axis=(1, 3), ddof=1).mean(axis=0)
    mean_of_means = groups.mean(axis=(1, 3)).mean(axis=0)
    assert_close(rm, 0.5 * a.running_mean + 0.5 * mean_of_means)
    assert_close(rv, 0.5 * a.running_var + 0.5 * var)


# ------------------------------------------------ finite differences ----

@pytest.mark.parametrize("activation", [None, "leaky_relu"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_finite_differences(variant, activation, rng):
    """The backward is the gradient of the forward: of y with respect to x
    (r and d clipped, so constant, as the paper treats them), gamma and
    beta, for a loss sum(w * y)."""
    shape, vbs = (6, 3, 2, 2), 3
    a = make_inputs(shape, np.float64, 1, rng)
    a.beta = a.beta + 0.05  # the leaky ReLU's kink away from the data
    w = rng.standard_normal(shape)
    case = SimpleNamespace(renorm="renorm" in variant, vbs=vbs if "ghost" in variant else None,
                           activation=activation, channel_axis=1)
    # running statistics far from the batch's: r and d clip, locally constant
    rm0 = np.full(a.C, 30.0)
    rv0 = np.full(a.C, 1e-4)

    def loss():
        return float((w * forward(fastbn, case, a, rm0.copy(), rv0.copy())[0]).sum())

    y, *stats = forward(fastbn, case, a, rm0.copy(), rv0.copy())
    if case.renorm:
        assert (stats[2] == CLIP["rmax"]).all() and (np.abs(stats[3]) == CLIP["dmax"]).all()
    a.dy = w
    dx, dgamma, dbeta = backward(fastbn, case, a, stats)
    for name, got, wrt in (("dx", dx, a.x), ("dgamma", dgamma, a.gamma),
                           ("dbeta", dbeta, a.beta)):
        assert_close(got, numeric_gradient(loss, wrt), rtol=1e-6, err_msg=name)


def test_renorm_gradient_holds_r_and_d_constant(rng):
    """Without clipping r and d depend on x, and the backward leaves that
    out (the paper's rule): dx differs from the finite differences of the
    whole function, and equals those of the function with r, d frozen."""
    a = make_inputs((8, 3, 2, 2), np.float64, 1, rng)
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    y, mean, invstd, r, d = fastbn.batch_renorm_forward(a.x, a.gamma, a.beta, rm.copy(),
                                                        rv.copy(), rmax=10.0, dmax=10.0)
    assert ((r > 0.1) & (r < 10)).all() and (np.abs(d) < 10).all()  # nothing clipped
    w = rng.standard_normal(a.x.shape)
    dx = fastbn.batch_renorm_backward(w, a.x, a.gamma, mean, invstd, r, d)[0]

    def frozen():  # y with this call's r and d
        yp, m, i = fastbn.batch_norm_forward(a.x, None, None)
        z = yp * per_channel(r, 4, 1) + per_channel(d, 4, 1)
        return float((w * (z * per_channel(a.gamma, 4, 1) + per_channel(a.beta, 4, 1))).sum())

    def whole():
        return float((w * fastbn.batch_renorm_forward(a.x, a.gamma, a.beta, rm.copy(),
                                                      rv.copy(), rmax=10.0,
                                                      dmax=10.0)[0]).sum())
    assert_close(dx, numeric_gradient(frozen, a.x), rtol=1e-6)
    assert not np.allclose(dx, numeric_gradient(whole, a.x), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------- layers ----

LAYER_OPTIONS = [dict(renorm=True), dict(virtual_batch_size=4),
                 dict(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5},
                      virtual_batch_size=8, activation="leaky_relu", negative_slope=SLOPE),
                 dict(virtual_batch_size=2, activation="relu", channel_axis=-1)]


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: "-".join(map(str, o)))
def test_layer_trains_as_on_the_oracle(options, rng):
    """Three training steps and an eval forward: the layer on fastbn and on
    the oracle backend agree (y, dx, dgamma, dbeta, running statistics)."""
    shape = (16, 5, 3, 3) if options.get("channel_axis", 1) == 1 else (16, 3, 3, 5)
    ours = fastbn.BatchNorm2d(5, **options)
    oracle = fastbn.BatchNorm2d(5, backend=reference, **options)
    for step in range(3):
        x = (rng.standard_normal(shape) * (1 + step) + step).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        assert_close(ours(x), oracle(x), np.float32, err_msg=f"y, step {step}")
        assert_close(ours.backward(dy), oracle.backward(dy), np.float32, rtol=1e-4,
                     err_msg=f"dx, step {step}")
        for name in ("dgamma", "dbeta", "running_mean", "running_var"):
            assert_close(getattr(ours, name), getattr(oracle, name), np.float32, rtol=1e-4,
                         err_msg=f"{name}, step {step}")
        for layer in (ours, oracle):  # a step of SGD
            for p, g in zip(layer.params, layer.grads):
                p -= 0.1 * g
    ours.eval()
    oracle.eval()
    assert_close(ours(x), oracle(x), np.float32, rtol=1e-4)
    assert ours.num_batches_tracked == 3


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: "-".join(map(str, o)))
def test_state_dict_and_pickle_carry_the_options(options, rng):
    bn = fastbn.BatchNorm2d(5, **options)
    x = rng.standard_normal((16, 5, 3, 3) if options.get("channel_axis", 1) == 1
                            else (16, 3, 3, 5)).astype(np.float32)
    bn(x)
    state = bn.state_dict()
    assert ("renorm_clipping" in state) == bn.renorm
    assert ("virtual_batch_size" in state) == (bn.virtual_batch_size is not None)
    fresh = fastbn.BatchNorm2d(5, channel_axis=bn.channel_axis, activation=bn.activation,
                               negative_slope=bn.negative_slope)
    fresh.load_state_dict(state)
    assert repr(fresh) == repr(bn)
    saved = pickle.dumps(bn)
    for copy in (fresh, pickle.loads(saved)):
        assert copy.renorm == bn.renorm and copy.renorm_clipping == bn.renorm_clipping
        assert copy.virtual_batch_size == bn.virtual_batch_size
        assert_bitwise_equal(copy(x), pickle.loads(saved)(x))


def test_a_plain_state_keeps_the_options_and_loads_in_torch_without_strict():
    bn = fastbn.BatchNorm2d(3, renorm=True, virtual_batch_size=2)
    bn.load_state_dict(fastbn.BatchNorm2d(3).state_dict())
    assert bn.renorm and bn.virtual_batch_size == 2
    torch = pytest.importorskip("torch")
    t = torch.nn.BatchNorm2d(3)
    result = t.load_state_dict({k: torch.as_tensor(v) for k, v in bn.state_dict().items()},
                               strict=False)
    assert sorted(result.unexpected_keys) == ["renorm_clipping", "virtual_batch_size"]


def test_eval_mode_is_the_plain_inference(rng):
    x = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)
    bn = fastbn.BatchNorm2d(3, renorm=True, virtual_batch_size=4)
    bn(x)
    bn.eval()
    assert_bitwise_equal(bn(x), fastbn.batch_norm_inference(x, bn.gamma, bn.beta,
                                                            bn.running_mean, bn.running_var))


# --------------------------------------------------------- SyncBatchNorm ----

@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sync_renorm_runs_over_the_global_batch(size, dtype, rng):
    """SyncBatchNorm(renorm=True): one rank gives the single-process layer's
    bits; three uneven ranks give its result over the concatenated batch."""
    x = (rng.standard_normal((10, 4, 3, 3)) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    bounds = [0, 10] if size == 1 else [0, 2, 7, 10]
    options = dict(dtype=dtype, renorm=True, renorm_clipping=CLIP, activation="leaky_relu",
                   negative_slope=SLOPE)

    def work(rank, allreduce):
        bn = SyncBatchNorm(4, allreduce=allreduce, **options)
        part = slice(bounds[rank], bounds[rank + 1])
        y = bn(x[part])
        return y, bn.backward(dy[part]), bn.dgamma, bn.dbeta, bn.running_mean, bn.running_var

    results = values(run_ranks(size, work)[0])
    single = fastbn.BatchNorm2d(4, **options)
    expected = (single(x), single.backward(dy), single.dgamma, single.dbeta,
                single.running_mean, single.running_var)
    got = [np.concatenate([r[i] for r in results]) for i in (0, 1)] + list(results[0][2:])
    for name, g, e in zip(("y", "dx", "dgamma", "dbeta", "running_mean", "running_var"), got,
                          expected):
        if size == 1:
            assert_bitwise_equal(g, e, name)
        else:
            assert_close(g, e, dtype, rtol=1e-4 if dtype == np.float32 else 1e-9, err_msg=name)


def test_sync_ghost_groups_stay_per_rank(rng):
    """With virtual_batch_size each rank normalizes its own groups, as a
    BatchNorm of its slice would, without a reduction."""
    x = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)

    def work(rank, allreduce):
        bn = SyncBatchNorm(3, allreduce=allreduce, virtual_batch_size=2)
        return bn(x[4 * rank:4 * rank + 4]), bn.running_mean

    results, group = run_ranks(2, work)
    for rank, (y, rm) in enumerate(values(results)):
        local = fastbn.BatchNorm2d(3, virtual_batch_size=2)
        assert_bitwise_equal(y, local(x[4 * rank:4 * rank + 4]))
        assert_bitwise_equal(rm, local.running_mean)
    assert group.calls == 0
