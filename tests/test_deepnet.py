"""fastbn.compat.deepnet.Batchnorm against a NumPy implementation of deepnet's layer."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fastbn.compat.deepnet import Batchnorm


class NumpyBatchnorm:
    """deepnet's Batchnorm layer, with dgamma summed over the batch (see the module doc)."""

    def __init__(self, X_dim):
        d = int(np.prod(X_dim))
        self.gamma = np.ones((1, d))
        self.beta = np.zeros((1, d))
        self.params = [self.gamma, self.beta]

    def forward(self, X):
        self.n_X = X.shape[0]
        self.X_shape = X.shape
        self.X_flat = X.ravel().reshape(self.n_X, -1)
        self.mu = np.mean(self.X_flat, axis=0)
        self.var = np.var(self.X_flat, axis=0)
        self.X_norm = (self.X_flat - self.mu) / np.sqrt(self.var + 1e-8)
        out = self.gamma * self.X_norm + self.beta
        return out.reshape(self.X_shape)

    def backward(self, dout):
        dout = dout.ravel().reshape(dout.shape[0], -1)
        X_mu = self.X_flat - self.mu
        var_inv = 1.0 / np.sqrt(self.var + 1e-8)
        dbeta = np.sum(dout, axis=0, keepdims=True)
        dgamma = np.sum(dout * self.X_norm, axis=0, keepdims=True)
        dX_norm = dout * self.gamma
        dvar = np.sum(dX_norm * X_mu, axis=0) * -0.5 * (self.var + 1e-8) ** (-3 / 2)
        dmu = np.sum(dX_norm * -var_inv, axis=0) + dvar * np.mean(-2.0 * X_mu, axis=0)
        dX = dX_norm * var_inv + dmu / self.n_X + dvar * 2 / self.n_X * X_mu
        return dX.reshape(self.X_shape), [dgamma, dbeta]


def batch(shape, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal(shape) * 2 + 3).astype(dtype),
            rng.standard_normal(shape).astype(dtype))


def test_layout_follows_deepnet():
    layer = Batchnorm((3, 4, 5))
    assert (layer.d_X, layer.h_X, layer.w_X) == (3, 4, 5)
    assert layer.gamma.shape == layer.beta.shape == (1, 60)
    assert layer.gamma.dtype == np.float64
    assert layer.params[0] is layer.gamma and layer.params[1] is layer.beta
    assert layer.eps == 1e-8
    assert not hasattr(layer, "W")     # deepnet's L2 regularization skips the layer


@pytest.mark.parametrize("X_dim, n", [((3, 4, 5), 16), ((2, 3, 3), 2), ((10,), 9)])
def test_sgd_steps_match_numpy_layer(X_dim, n):
    ours, theirs = Batchnorm(X_dim), NumpyBatchnorm(X_dim)
    lr = 0.1
    for step in range(5):
        X, dout = batch((n,) + X_dim, step)
        out = ours.forward(X)
        expected = theirs.forward(X)
        assert out.shape == X.shape
        assert_allclose(out, expected, rtol=1e-9, atol=1e-10)
        dX, grads = ours.backward(dout)
        edX, egrads = theirs.backward(dout)
        assert dX.shape == X.shape
        assert_allclose(dX, edX, rtol=1e-7, atol=1e-9)
        for g, e in zip(grads, egrads):
            assert g.shape == (1, ours.D)
            assert_allclose(g, e, rtol=1e-9, atol=1e-10)
        # deepnet's vanilla_update: in place on the items of the params list
        for layer, layer_grads in ((ours, grads), (theirs, egrads)):
            param = layer.params
            for i in range(len(layer_grads)):
                param[i] += -lr * layer_grads[i]
    assert_allclose(ours.gamma, theirs.gamma, rtol=1e-9)
    assert not np.allclose(ours.gamma, 1.0)     # the updates reached the layer


def test_float32_input_keeps_float64_parameters():
    ours, theirs = Batchnorm((2, 3, 3)), NumpyBatchnorm((2, 3, 3))
    X, dout = batch((8, 2, 3, 3), 1, np.float32)
    out = ours.forward(X)
    assert out.dtype == np.float32
    assert_allclose(out, theirs.forward(X.astype(np.float64)), rtol=1e-5, atol=1e-5)
    dX, grads = ours.backward(dout)
    assert dX.dtype == np.float32 and grads[0].dtype == np.float64
    assert_allclose(grads[0], theirs.backward(dout.astype(np.float64))[1][0],
                    rtol=1e-4, atol=1e-4)


def test_single_sample_gives_beta_like_deepnet():
    ours, theirs = Batchnorm((2, 2, 2)), NumpyBatchnorm((2, 2, 2))
    for layer in (ours, theirs):
        layer.beta += np.arange(8.0)
    X, dout = batch((1, 2, 2, 2), 0)
    assert_array_equal(ours.forward(X), theirs.forward(X))
    dX, (dgamma, dbeta) = ours.backward(dout)
    edX, (edgamma, edbeta) = theirs.backward(dout)
    assert_array_equal(dX, np.zeros_like(X))
    assert_allclose(dX, edX, atol=1e-12)
    assert_allclose(dgamma, edgamma, atol=1e-12)
    assert_array_equal(dbeta, edbeta)


def test_gradients_match_finite_differences():
    layer = Batchnorm((2, 2, 3))
    rng = np.random.default_rng(5)
    layer.gamma[...] = rng.uniform(0.5, 2, layer.gamma.shape)
    X, dout = batch((5, 2, 2, 3), 2)
    layer.forward(X)
    dX, (dgamma, _) = layer.backward(dout)
    h = 1e-6
    for index in [(0, 0, 0, 0), (3, 1, 1, 2), (4, 0, 1, 1)]:
        up, down = X.copy(), X.copy()
        up[index] += h
        down[index] -= h
        numeric = np.sum((layer.forward(up) - layer.forward(down)) * dout) / (2 * h)
        assert_allclose(dX[index], numeric, rtol=1e-5, atol=1e-8)
    for j in (0, 7):
        old = layer.gamma[0, j]
        layer.gamma[0, j] = old + h
        up = layer.forward(X)
        layer.gamma[0, j] = old - h
        down = layer.forward(X)
        layer.gamma[0, j] = old
        assert_allclose(dgamma[0, j], np.sum((up - down) * dout) / (2 * h), rtol=1e-5)


def test_errors():
    layer = Batchnorm((2, 3, 3))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.zeros((4, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"X must have shape \(N, 2, 3, 3\) or hold 18 values "
                                         r"per sample, got shape \(4, 2, 3, 4\)"):
        layer.forward(np.zeros((4, 2, 3, 4)))
    with pytest.raises(TypeError, match="X must have dtype float32 or float64, got int64"):
        layer.forward(np.zeros((4, 2, 3, 3), dtype=np.int64))
    layer.forward(np.random.default_rng(0).standard_normal((4, 18)))   # flattened is fine
    with pytest.raises(ValueError, match=r"dout must have the shape of X \(4, 18\)"):
        layer.backward(np.zeros((4, 2, 3, 3)))
    with pytest.raises(TypeError, match="X_dim must be a tuple of ints"):
        Batchnorm((2.0, 3))
    with pytest.raises(ValueError, match="X_dim entries must be >= 1"):
        Batchnorm((0, 3, 3))
