"""fastbn.compat.cs231n against a plain NumPy implementation of the cs231n semantics,
numeric gradients, and the patch helper on a fake cs231n ``layers`` module."""

import types

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fastbn.compat import cs231n as fbn

TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}


# ------------------------------------------ the semantics, written plainly ----

def naive_batchnorm_forward(x, gamma, beta, bn_param):
    """The cs231n assignment's batchnorm_forward, step by step."""
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    n, d = x.shape
    running_mean = bn_param.get("running_mean", np.zeros(d, dtype=x.dtype))
    running_var = bn_param.get("running_var", np.zeros(d, dtype=x.dtype))
    if mode == "train":
        mu = x.mean(axis=0)
        var = x.var(axis=0)
        xhat = (x - mu) / np.sqrt(var + eps)
        out = gamma * xhat + beta
        cache = ("train", x, xhat, gamma, var + eps)
        running_mean = momentum * running_mean + (1 - momentum) * mu
        running_var = momentum * running_var + (1 - momentum) * var
    elif mode == "test":
        xhat = (x - running_mean) / np.sqrt(running_var + eps)
        out = gamma * xhat + beta
        cache = ("test", x, xhat, gamma, running_var + eps)
    else:
        raise ValueError(f"Invalid forward batchnorm mode {mode!r}")
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out, cache


def naive_batchnorm_backward(dout, cache):
    """The staged (computational graph) backward of the assignment."""
    mode, x, xhat, gamma, var_eps = cache
    n = x.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * gamma
    if mode == "test":
        return dxhat / np.sqrt(var_eps), dgamma, dbeta
    xmu = x - x.mean(axis=0)
    dvar = np.sum(dxhat * xmu, axis=0) * -0.5 * var_eps ** -1.5
    dmu = np.sum(-dxhat / np.sqrt(var_eps), axis=0) + dvar * np.mean(-2 * xmu, axis=0)
    dx = dxhat / np.sqrt(var_eps) + dvar * 2 * xmu / n + dmu / n
    return dx, dgamma, dbeta


def naive_spatial_forward(x, gamma, beta, bn_param):
    n, c, h, w = x.shape
    flat = x.transpose(0, 2, 3, 1).reshape(-1, c)
    out, cache = naive_batchnorm_forward(flat, gamma, beta, bn_param)
    return out.reshape(n, h, w, c).transpose(0, 3, 1, 2), (cache, x.shape)


def naive_spatial_backward(dout, cache):
    cache, (n, c, h, w) = cache
    dx, dgamma, dbeta = naive_batchnorm_backward(dout.transpose(0, 2, 3, 1).reshape(-1, c),
                                                 cache)
    return dx.reshape(n, h, w, c).transpose(0, 3, 1, 2), dgamma, dbeta


def data(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    gamma = rng.uniform(0.5, 2.0, c).astype(dtype)
    beta = rng.uniform(-1, 1, c).astype(dtype)
    return x, dout, gamma, beta


def close(actual, expected, dtype, scale=1.0):
    assert_allclose(actual, expected, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


# -------------------------------------------------- forward and backward ----

CASES = {
    "batchnorm": ((fbn.batchnorm_forward, fbn.batchnorm_backward),
                  (naive_batchnorm_forward, naive_batchnorm_backward), (32, 7)),
    "batchnorm_alt": ((fbn.batchnorm_forward, fbn.batchnorm_backward_alt),
                      (naive_batchnorm_forward, naive_batchnorm_backward), (32, 7)),
    "spatial": ((fbn.spatial_batchnorm_forward, fbn.spatial_batchnorm_backward),
                (naive_spatial_forward, naive_spatial_backward), (6, 4, 5, 3)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [{}, {"momentum": 0.7, "eps": 1e-3}],
                         ids=["defaults", "momentum-eps"])
@pytest.mark.parametrize("case", CASES)
def test_train_steps_then_test_step_match_naive(case, options, dtype):
    (forward, backward), (nforward, nbackward), shape = CASES[case]
    ours, theirs = {"mode": "train", **options}, {"mode": "train", **options}
    for step in range(5):
        if step == 4:
            ours["mode"] = theirs["mode"] = "test"
        x, dout, gamma, beta = data(shape, dtype, step)
        out, cache = forward(x, gamma, beta, ours)
        nout, ncache = nforward(x.astype(np.float64), gamma.astype(np.float64),
                                beta.astype(np.float64), theirs)
        assert out.dtype == dtype and out.shape == shape
        close(out, nout, dtype)
        assert ours["running_mean"].dtype == dtype
        close(ours["running_mean"], theirs["running_mean"], dtype)
        close(ours["running_var"], theirs["running_var"], dtype, scale=10)
        dx, dgamma, dbeta = backward(dout, cache)
        ndx, ndgamma, ndbeta = nbackward(dout.astype(np.float64), ncache)
        assert dgamma.shape == dbeta.shape == (shape[1],)
        close(dx, ndx, dtype, scale=10)
        close(dgamma, ndgamma, dtype, scale=100)
        close(dbeta, ndbeta, dtype, scale=100)


def test_running_statistics_follow_cs231n_not_pytorch():
    # momentum weights the old value and the variance is biased
    x = np.array([[0.0], [2.0], [4.0], [6.0]])
    bn_param = {"mode": "train", "momentum": 0.75, "running_mean": np.array([8.0]),
                "running_var": np.array([1.0])}
    fbn.batchnorm_forward(x, np.ones(1), np.zeros(1), bn_param)
    assert_allclose(bn_param["running_mean"], [0.75 * 8 + 0.25 * 3])
    assert_allclose(bn_param["running_var"], [0.75 * 1 + 0.25 * 5])   # biased: var = 5


def test_running_statistics_are_created_as_zeros_of_x_dtype():
    bn_param = {"mode": "test"}
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    out, _ = fbn.batchnorm_forward(x, np.ones(2), np.zeros(2), bn_param)
    for key in ("running_mean", "running_var"):
        assert bn_param[key].dtype == np.float32
        assert_array_equal(bn_param[key], np.zeros(2))
    close(out, x / np.sqrt(1e-5), np.float32)


def test_lenient_dtypes_like_the_numpy_reference():
    # float64 x with float32 gamma (student code does this) and integer x
    x, dout, gamma, beta = data((10, 3), np.float64, 0)
    out, cache = fbn.batchnorm_forward(x, gamma.astype(np.float32), beta.astype(np.float32),
                                       {"mode": "train"})
    nout, _ = naive_batchnorm_forward(x, gamma.astype(np.float32), beta.astype(np.float32),
                                      {"mode": "train"})
    assert out.dtype == np.float64
    close(out, nout, np.float64)
    dx, _, _ = fbn.batchnorm_backward(dout.astype(np.float32), cache)
    assert dx.dtype == np.float64
    xi = np.arange(12).reshape(4, 3)
    out, _ = fbn.batchnorm_forward(xi, np.ones(3), np.zeros(3), {"mode": "train"})
    close(out, naive_batchnorm_forward(xi.astype(float), np.ones(3), np.zeros(3),
                                       {"mode": "train"})[0], np.float64)


# --------------------------------------------------- numeric gradients ----

def numeric_gradient(f, a, dout, h=1e-5):
    """The assignment's eval_numerical_gradient_array: sum(dout * df/da)."""
    grad = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        up = f().copy()
        a[i] = old - h
        down = f().copy()
        a[i] = old
        grad[i] = np.sum((up - down) * dout) / (2 * h)
    return grad


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_numeric_gradients(case, mode):
    (forward, backward), _, shape = CASES[case]
    x, dout, gamma, beta = data(shape, np.float64, 3)
    rng = np.random.default_rng(4)
    c = shape[1]
    stats = {"running_mean": rng.standard_normal(c), "running_var": rng.uniform(1, 3, c)}

    def f():
        return forward(x, gamma, beta, {"mode": mode, **stats})[0]

    _, cache = forward(x, gamma, beta, {"mode": mode, **stats})
    dx, dgamma, dbeta = backward(dout, cache)
    assert_allclose(dx, numeric_gradient(f, x, dout), rtol=1e-6, atol=1e-8)
    assert_allclose(dgamma, numeric_gradient(f, gamma, dout), rtol=1e-6, atol=1e-8)
    assert_allclose(dbeta, numeric_gradient(f, beta, dout), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- errors ----

@pytest.mark.parametrize("bn_param, message", [
    ({"mode": "eval"}, r"bn_param\['mode'\] must be 'train' or 'test', got 'eval'"),
    ({}, r"got None \(no 'mode' key\)"),
    ({"mode": "train", "momentum": 2.0}, r"momentum'\] must be in \[0, 1\], got 2.0"),
])
def test_bad_bn_param(bn_param, message):
    with pytest.raises(ValueError, match=message):
        fbn.batchnorm_forward(np.ones((4, 2)), np.ones(2), np.zeros(2), bn_param)


def test_bad_shapes_and_caches():
    with pytest.raises(ValueError, match=r"batchnorm_forward: x must be 2-D \(N, D\), "
                                         r"got shape \(4, 2, 3\)"):
        fbn.batchnorm_forward(np.ones((4, 2, 3)), np.ones(2), np.zeros(2), {"mode": "train"})
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\), got shape \(4, 2\)"):
        fbn.spatial_batchnorm_forward(np.ones((4, 2)), np.ones(2), np.zeros(2),
                                      {"mode": "train"})
    with pytest.raises(ValueError, match=r"gamma must have shape \(2,\), got \(3,\)"):
        fbn.batchnorm_forward(np.ones((4, 2)), np.ones(3), np.zeros(2), {"mode": "train"})
    with pytest.raises(TypeError, match="bn_param must be a dict, got NoneType"):
        fbn.batchnorm_forward(np.ones((4, 2)), np.ones(2), np.zeros(2), None)
    _, cache = fbn.batchnorm_forward(np.arange(8.0).reshape(4, 2), np.ones(2), np.zeros(2),
                                     {"mode": "train"})
    with pytest.raises(ValueError, match=r"dout must have the shape of x \(4, 2\), got \(2, 4\)"):
        fbn.batchnorm_backward(np.ones((2, 4)), cache)
    with pytest.raises(TypeError, match="cache must be the cache returned by the fastbn forward"):
        fbn.batchnorm_backward(np.ones((4, 2)), (None, None))


# ----------------------------------------------------------------- patch ----

def fake_cs231n():
    """A stand-in for cs231n's ``layers`` module and a net that uses it.

    ``layers`` holds the plain NumPy implementation; ``fc_net`` looks the
    functions up as attributes of ``layers`` at call time, as the
    assignment's layer_utils does.
    """
    layers = types.ModuleType("cs231n.layers")
    layers.batchnorm_forward = naive_batchnorm_forward
    layers.batchnorm_backward = naive_batchnorm_backward
    layers.batchnorm_backward_alt = naive_batchnorm_backward
    layers.spatial_batchnorm_forward = naive_spatial_forward
    layers.spatial_batchnorm_backward = naive_spatial_backward
    layers.affine_forward = lambda x, w, b: (x @ w + b, (x, w))

    def loss(x, params, bn_param):
        """affine -> batchnorm -> spatial batchnorm on a reshape; loss = sum(out**2)/2."""
        h, _ = layers.affine_forward(x, params["W"], params["b"])
        h, cache1 = layers.batchnorm_forward(h, params["gamma1"], params["beta1"], bn_param[0])
        h4 = h.reshape(len(x), 2, 3, 2)
        out, cache2 = layers.spatial_batchnorm_forward(h4, params["gamma2"], params["beta2"],
                                                       bn_param[1])
        dh4, dgamma2, dbeta2 = layers.spatial_batchnorm_backward(out, cache2)
        dh, dgamma1, dbeta1 = layers.batchnorm_backward(dh4.reshape(len(x), -1), cache1)
        return 0.5 * float(np.sum(out ** 2)), {"gamma1": dgamma1, "beta1": dbeta1,
                                               "gamma2": dgamma2, "beta2": dbeta2, "dh": dh}

    fc_net = types.SimpleNamespace(loss=loss)
    return layers, fc_net


def run_net(fc_net, steps=3):
    rng = np.random.default_rng(7)
    params = {"W": rng.standard_normal((5, 12)), "b": rng.standard_normal(12),
              "gamma1": rng.uniform(0.5, 2, 12), "beta1": rng.standard_normal(12),
              "gamma2": rng.uniform(0.5, 2, 2), "beta2": rng.standard_normal(2)}
    bn_param = [{"mode": "train"}, {"mode": "train", "momentum": 0.5}]
    results = []
    for step in range(steps):
        if step == steps - 1:
            for p in bn_param:
                p["mode"] = "test"
        x = rng.standard_normal((8, 5)) * 2 + 1
        results.append(fc_net.loss(x, params, bn_param))
    return results, bn_param


def test_patch_runs_an_existing_net_on_fastbn_and_undoes():
    layers, fc_net = fake_cs231n()
    expected, expected_bn = run_net(fc_net)
    originals = {name: getattr(layers, name) for name in fbn._NAMES}

    patched = fbn.patch(layers)
    for name in fbn._NAMES:
        assert getattr(layers, name) is getattr(fbn, name)
    assert patched.originals[0][1] == originals
    got, got_bn = run_net(fc_net)
    for (loss, grads), (eloss, egrads) in zip(got, expected):
        assert_allclose(loss, eloss, rtol=1e-9)
        for key in egrads:
            assert_allclose(grads[key], egrads[key], rtol=1e-8, atol=1e-10)
    for p, e in zip(got_bn, expected_bn):
        assert_allclose(p["running_var"], e["running_var"], rtol=1e-9)

    patched.undo()
    for name in fbn._NAMES:
        assert getattr(layers, name) is originals[name]
    assert layers.affine_forward is not None      # other names untouched


def test_patch_as_context_manager_and_twice():
    layers, _ = fake_cs231n()
    original = layers.batchnorm_forward
    second = types.SimpleNamespace(batchnorm_forward=original)   # a star-importing module
    with fbn.patch(layers, second):
        assert layers.batchnorm_forward is fbn.batchnorm_forward
        assert second.batchnorm_forward is fbn.batchnorm_forward
        inner = fbn.patch(layers)        # patching again, then undoing in order
        inner.undo()
        assert layers.batchnorm_forward is fbn.batchnorm_forward
    assert layers.batchnorm_forward is original and second.batchnorm_forward is original


def test_patch_refuses_modules_without_the_names():
    layers, _ = fake_cs231n()
    with pytest.raises(ValueError, match="defines none of batchnorm_forward"):
        fbn.patch(layers, types.ModuleType("numpy_like"))
    assert layers.batchnorm_forward is naive_batchnorm_forward   # nothing patched
    with pytest.raises(ValueError, match="at least one module"):
        fbn.patch()
