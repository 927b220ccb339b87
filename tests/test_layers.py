"""BatchNorm1d/2d/3d layers: against torch.nn.BatchNorm*d, against fastbn.reference,
finite differences, state dicts, and the errors of bad use."""

import pickle
import pydoc

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import fastbn
from fastbn import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, reference

from helpers import numeric_gradient

SHAPES = {  # a class and an input shape it accepts (channels on axis 1)
    "1d-2D": (BatchNorm1d, (16, 5)),
    "1d-3D": (BatchNorm1d, (6, 5, 7)),
    "2d": (BatchNorm2d, (4, 5, 6, 3)),
    "3d": (BatchNorm3d, (3, 5, 4, 3, 2)),
}
TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def batches(shape, dtype, count, seed=0):
    """Inputs and upstream gradients, off-centre and scaled differently per step."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        x = (rng.standard_normal(shape) * (1.5 + k) + 3.0 - k).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        yield x, dy


def close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype]
    assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


# ------------------------------------------------------------------ torch ----

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", [
    dict(),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("case", SHAPES)
def test_matches_torch_train_then_eval(case, config, dtype):
    torch = pytest.importorskip("torch")
    cls, shape = SHAPES[case]
    c = shape[1]
    ours = cls(c, dtype=dtype, **config)
    theirs = getattr(torch.nn, cls.__name__)(c, dtype=getattr(torch, np.dtype(dtype).name),
                                             **config)
    lr = 0.1
    for step, (x, dy) in enumerate(batches(shape, dtype, 7)):
        if step == 4:  # three more batches in eval mode
            assert ours.eval() is ours
            theirs.eval()
        assert ours.training == theirs.training
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.tensor(dy))
        y = ours(x)
        dx = ours.backward(dy)
        assert y.dtype == dx.dtype == dtype
        close(y, yt.detach().numpy(), dtype)
        close(dx, xt.grad.numpy(), dtype, scale=10)
        if config.get("affine", True):
            close(ours.dgamma, theirs.weight.grad.numpy(), dtype, scale=100)
            close(ours.dbeta, theirs.bias.grad.numpy(), dtype, scale=100)
            # one SGD step on both, ours in place through `params`
            for p, g in zip(ours.params, ours.grads):
                p -= dtype(lr) * g
            with torch.no_grad():
                for p in (theirs.weight, theirs.bias):
                    p -= lr * p.grad
                    p.grad = None
        else:
            assert ours.params == ours.grads == []
            assert ours.dgamma is None and ours.dbeta is None
        if config.get("track_running_stats", True):
            close(ours.running_mean, theirs.running_mean.numpy(), dtype)
            close(ours.running_var, theirs.running_var.numpy(), dtype)
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
        else:
            assert ours.running_mean is None and theirs.running_mean is None


@pytest.mark.parametrize("case", SHAPES)
def test_channels_last_matches_torch(case):
    torch = pytest.importorskip("torch")
    cls, shape = SHAPES[case]
    c = shape[1]
    ours = cls(c, channel_axis=-1, momentum=None)
    theirs = getattr(torch.nn, cls.__name__)(c, momentum=None)
    for step, (x, dy) in enumerate(batches(shape, np.float32, 5)):
        if step == 3:
            ours.eval()
            theirs.eval()
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.tensor(dy))
        last = np.moveaxis(x, 1, -1)   # a non-contiguous channels-last view
        y = ours(last)
        dx = ours.backward(np.moveaxis(dy, 1, -1))
        close(np.moveaxis(y, -1, 1), yt.detach().numpy(), np.float32)
        close(np.moveaxis(dx, -1, 1), xt.grad.numpy(), np.float32, scale=10)
        close(ours.dgamma, theirs.weight.grad.numpy(), np.float32, scale=100)
        theirs.zero_grad()
    close(ours.running_var, theirs.running_var.numpy(), np.float32)


def test_state_dict_from_torch_loads_and_gives_same_outputs():
    torch = pytest.importorskip("torch")
    theirs = torch.nn.BatchNorm2d(5, momentum=None)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2.0)
        theirs.bias.uniform_(-1.0, 1.0)
    data = list(batches((4, 5, 6, 3), np.float32, 6))
    for x, _ in data[:3]:
        theirs(torch.tensor(x))
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    assert list(state) == ["weight", "bias", "running_mean", "running_var",
                           "num_batches_tracked"]
    ours = BatchNorm2d(5, momentum=None)
    gamma = ours.gamma
    ours.load_state_dict(state)
    assert ours.gamma is gamma            # loaded in place: optimizers keep their arrays
    assert int(ours.num_batches_tracked) == 3
    # train mode continues the cumulative average exactly where torch is
    for x, _ in data[3:5]:
        close(ours(x), theirs(torch.tensor(x)).detach().numpy(), np.float32)
    ours.eval()
    theirs.eval()
    x = data[5][0]
    close(ours(x), theirs(torch.tensor(x)).detach().numpy(), np.float32)
    # and the way back: our state into a fresh torch layer
    fresh = torch.nn.BatchNorm2d(5, momentum=None).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    close(ours(x), fresh(torch.tensor(x)).detach().numpy(), np.float32)


def test_load_state_dict_accepts_torch_tensors_directly():
    torch = pytest.importorskip("torch")
    theirs = torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        theirs.weight.fill_(3.0)   # a parameter that requires grad
    ours = BatchNorm1d(4)
    ours.load_state_dict(theirs.state_dict())
    assert_array_equal(ours.weight, np.full(4, 3.0, np.float32))


# -------------------------------------------------------------- reference ----

def oracle_run(shape, dtype, config, steps_train, steps_eval):
    """The layer's semantics driven by hand with fastbn.reference and NumPy."""
    c = shape[1]
    momentum = config.get("momentum", 0.1)
    eps = config.get("eps", 1e-5)
    gamma, beta = np.ones(c, dtype), np.zeros(c, dtype)
    rm, rv, count = np.zeros(c, dtype), np.ones(c, dtype), np.zeros((), np.int64)
    axes = (0,) + tuple(range(2, len(shape)))
    bshape = (1, c) + (1,) * (len(shape) - 2)
    out = []
    for step, (x, dy) in enumerate(batches(shape, dtype, steps_train + steps_eval)):
        if step < steps_train:
            y, mean, invstd = reference.batch_norm_forward(
                x, gamma, beta, eps=eps, running_mean=rm, running_var=rv, momentum=momentum,
                num_batches_tracked=count)
            dx, dgamma, dbeta = reference.batch_norm_backward(dy, x, gamma, mean, invstd)
        else:
            x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
            invstd = 1 / np.sqrt(rv.astype(np.float64) + eps)
            xhat = (x64 - rm.reshape(bshape)) * invstd.reshape(bshape)
            y = (xhat * gamma.reshape(bshape) + beta.reshape(bshape)).astype(dtype)
            dx = (dy64 * (gamma * invstd).reshape(bshape)).astype(dtype)
            dgamma, dbeta = (dy64 * xhat).sum(axis=axes), dy64.sum(axis=axes)
        out.append((y, dx, dgamma, dbeta, rm.copy(), rv.copy(), int(count)))
        gamma = gamma - dtype(0.1) * dgamma.astype(dtype)
        beta = beta - dtype(0.1) * dbeta.astype(dtype)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", [dict(), dict(momentum=None, eps=1e-3)],
                         ids=["defaults", "cumulative"])
@pytest.mark.parametrize("case", SHAPES)
def test_matches_reference_oracle(case, config, dtype):
    cls, shape = SHAPES[case]
    expected = oracle_run(shape, dtype, config, steps_train=4, steps_eval=2)
    layer = cls(shape[1], dtype=dtype, **config)
    for step, (x, dy) in enumerate(batches(shape, dtype, 6)):
        layer.train(step < 4)
        y = layer(x)
        dx = layer.backward(dy)
        ey, edx, edgamma, edbeta, erm, erv, ecount = expected[step]
        close(y, ey, dtype)
        close(dx, edx, dtype, scale=10)
        close(layer.dgamma, edgamma, dtype, scale=100)
        close(layer.dbeta, edbeta, dtype, scale=100)
        close(layer.running_mean, erm, dtype)
        close(layer.running_var, erv, dtype)
        assert int(layer.num_batches_tracked) == ecount
        layer.gamma -= dtype(0.1) * layer.dgamma      # in place, as an optimizer would
        layer.beta = layer.beta - dtype(0.1) * layer.dbeta  # or by assignment


@pytest.mark.parametrize("case", SHAPES)
def test_backend_reference_gives_the_same_layer(case):
    cls, shape = SHAPES[case]
    fast = cls(shape[1], momentum=None)
    slow = cls(shape[1], momentum=None, backend=reference)
    assert slow.backend is reference and fast.backend is fastbn.functional
    for step, (x, dy) in enumerate(batches(shape, np.float32, 5)):
        for layer in (fast, slow):
            layer.train(step < 3)
        close(fast(x), slow(x), np.float32)
        close(fast.backward(dy), slow.backward(dy), np.float32, scale=10)
        close(fast.dgamma, slow.dgamma, np.float32, scale=100)
        close(fast.running_var, slow.running_var, np.float32)


def test_cumulative_average_is_the_mean_of_batch_statistics():
    layer = BatchNorm1d(3, momentum=None, dtype=np.float64)
    means, variances = [], []
    for x, _ in batches((10, 3), np.float64, 5):
        layer(x)
        means.append(x.mean(axis=0))
        variances.append(x.var(axis=0, ddof=1))
    assert layer.num_batches_tracked.dtype == np.int64 and layer.num_batches_tracked.shape == ()
    assert int(layer.num_batches_tracked) == 5
    assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-12)
    assert_allclose(layer.running_var, np.mean(variances, axis=0), rtol=1e-12)


def test_momentum_counts_batches_too_and_eval_does_not():
    layer = BatchNorm2d(5)
    data = list(batches((4, 5, 3, 3), np.float32, 3))
    layer(data[0][0])
    layer(data[1][0])
    assert int(layer.num_batches_tracked) == 2
    rm = layer.running_mean.copy()
    layer.eval()(data[2][0])
    assert int(layer.num_batches_tracked) == 2
    assert_array_equal(layer.running_mean, rm)


def test_without_running_stats_eval_uses_batch_statistics():
    layer = BatchNorm2d(5, track_running_stats=False)
    x, dy = next(batches((4, 5, 3, 3), np.float32, 1))
    y_train, dx_train = layer(x), layer.backward(dy)
    layer.eval()
    assert_array_equal(layer(x), y_train)
    assert_array_equal(layer.backward(dy), dx_train)
    assert layer.state_dict().keys() == {"weight", "bias"}


# ------------------------------------------------------ finite differences ----

@pytest.mark.parametrize("options", [
    dict(),
    dict(activation="relu"),
    dict(activation="leaky_relu", negative_slope=0.2),
    dict(memory_saving=True),
    dict(activation="leaky_relu", negative_slope=0.2, memory_saving=True),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", SHAPES)
def test_gradients_match_finite_differences(case, training, options):
    cls, shape = SHAPES[case]
    rng = np.random.default_rng(1)
    layer = cls(shape[1], dtype=np.float64, momentum=0.5, **options)
    for x, _ in batches(shape, np.float64, 2):   # non-trivial running statistics
        layer(x)
    layer.gamma[...] = rng.uniform(0.5, 2.0, shape[1])
    layer.beta[...] = rng.uniform(-1.0, 1.0, shape[1])
    layer.train(training)
    x = rng.standard_normal(shape) * 2 + 1
    w = rng.standard_normal(shape)        # loss = sum(w * y): dy = w
    frozen = {k: v for k, v in layer.state_dict().items() if k not in ("weight", "bias")}

    def loss():
        layer.load_state_dict(frozen, strict=False)  # a training forward moves them
        return float(np.sum(w * layer(x)))

    loss()
    dx = layer.backward(w)
    dgamma, dbeta = layer.dgamma, layer.dbeta
    assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-5, atol=1e-7)
    assert_allclose(dgamma, numeric_gradient(loss, layer.gamma), rtol=1e-5, atol=1e-7)
    assert_allclose(dbeta, numeric_gradient(loss, layer.beta), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------- interface ----

def test_defaults_follow_pytorch():
    layer = BatchNorm2d(7)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (
        1e-5, 0.1, True, True)
    assert layer.dtype == np.float32 and layer.channel_axis == 1 and layer.training
    assert_array_equal(layer.weight, np.ones(7))
    assert_array_equal(layer.bias, np.zeros(7))
    assert_array_equal(layer.running_mean, np.zeros(7))
    assert_array_equal(layer.running_var, np.ones(7))
    assert layer.weight is layer.gamma and layer.bias is layer.beta
    assert layer.params[0] is layer.gamma and layer.params[1] is layer.beta
    assert layer.grads == [None, None]
    assert repr(layer) == ("BatchNorm2d(7, eps=1e-05, momentum=0.1, affine=True, "
                           "track_running_stats=True)")


def test_in_place_parameter_update_changes_the_output():
    layer = BatchNorm1d(4)
    x, _ = next(batches((8, 4), np.float32, 1))
    y0 = layer(x)
    gamma, beta = layer.params
    gamma *= 2
    beta += 1
    close(layer(x), 2 * y0 + 1, np.float32)


def test_general_batchnorm_takes_2_to_5_dimensions():
    for ndim in range(2, 6):
        x, dy = next(batches((4, 3) + (2,) * (ndim - 2), np.float32, 1))
        layer = BatchNorm(3)
        assert layer(x).shape == x.shape
        assert layer.backward(dy).shape == x.shape
    assert isinstance(BatchNorm2d(3), BatchNorm)


@pytest.mark.parametrize("cls, shape", [
    (BatchNorm1d, (4, 3, 2, 2)), (BatchNorm1d, (3,)),
    (BatchNorm2d, (4, 3)), (BatchNorm2d, (4, 3, 2)), (BatchNorm2d, (4, 3, 2, 2, 2)),
    (BatchNorm3d, (4, 3, 2, 2)), (BatchNorm, (4, 3, 2, 2, 2, 2)),
])
def test_wrong_ndim_names_the_class_and_the_shape(cls, shape):
    layer = cls(3)
    with pytest.raises(ValueError, match=rf"{cls.__name__} expects .*{tuple(shape)}".replace(
            "(", r"\(").replace(")", r"\)")):
        layer(np.zeros(shape, np.float32))


@pytest.mark.parametrize("layer_dtype, x_dtype", [(np.float32, np.float64),
                                                  (np.float64, np.float32)])
def test_dtype_mismatch_names_the_fix(layer_dtype, x_dtype):
    """Input of the other float dtype: the message says how to build the layer for it."""
    layer = BatchNorm1d(4, dtype=layer_dtype)
    want, have = np.dtype(layer_dtype).name, np.dtype(x_dtype).name
    with pytest.raises(TypeError) as raised:
        layer(np.zeros((5, 4), x_dtype))
    assert str(raised.value) == (
        f"BatchNorm1d: x must have the layer's dtype ({want}), got {have}: for {have} input "
        f"build the layer with BatchNorm1d(4, dtype=np.{have}), or pass x.astype(np.{want})")
    BatchNorm1d(4, dtype=x_dtype)(np.zeros((5, 4), x_dtype))  # the fix it names works


def test_input_errors():
    layer = BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"BatchNorm2d expects 3 channels.*\(2, 4, 5, 5\)"):
        layer(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.raises(TypeError, match="layer's dtype \\(float32\\), got float64"):
        layer(np.zeros((2, 3, 5, 5)))
    with pytest.raises(TypeError, match="numpy.ndarray, got list"):
        layer([[1.0]])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNorm1d(3)(np.ones((1, 3), np.float32))
    # eval mode needs no batch statistics: one sample is fine
    single = BatchNorm1d(3).eval()
    assert_array_equal(single(np.zeros((1, 3), np.float32)), np.zeros((1, 3)))


def test_backward_errors():
    layer = BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="BatchNorm2d.backward called before forward"):
        layer.backward(np.zeros((2, 3, 4, 4), np.float32))
    layer(np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape of the last forward's input \(2, 3, 4, 4\), "
                                         r"got \(2, 3, 4, 5\)"):
        layer.backward(np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        layer.backward(np.zeros((2, 3, 4, 4)))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_features=0), ValueError, "num_features must be >= 1, got 0"),
    (dict(num_features=2.0), TypeError, "num_features must be an int, got float"),
    (dict(num_features=2, eps=0.0), ValueError, "eps must be finite and > 0, got 0.0"),
    (dict(num_features=2, momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(num_features=2, dtype=np.int32), TypeError, "dtype must be float32 or float64"),
    (dict(num_features=2, channel_axis=2), ValueError, "channel_axis must be 1 .* got 2"),
    (dict(num_features=2, num_threads=0), ValueError, "num_threads must be a positive int"),
    (dict(num_features=2, backend=np), TypeError, "backend must provide"),
])
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        BatchNorm2d(**kwargs)


def test_parameter_assignment_is_checked():
    layer = BatchNorm1d(3)
    layer.gamma = np.full(3, 2.0, np.float32)
    assert layer.params[0] is layer.gamma
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\), got \(4,\)"):
        layer.gamma = np.ones(4, np.float32)
    with pytest.raises(TypeError, match=r"bias must have the layer's dtype \(float32\)"):
        layer.bias = np.ones(3)
    with pytest.raises(ValueError, match="affine=False"):
        BatchNorm1d(3, affine=False).weight = np.ones(3, np.float32)


def test_load_state_dict_errors_leave_the_layer_unchanged():
    layer = BatchNorm1d(3)
    good = {"weight": np.full(3, 2.0), "bias": np.ones(3), "running_mean": np.ones(3),
            "running_var": np.full(3, 4.0), "num_batches_tracked": np.array(9)}
    with pytest.raises(KeyError, match=r"missing keys \['bias'\], unexpected keys \['extra'\]"):
        layer.load_state_dict({**{k: v for k, v in good.items() if k != "bias"},
                               "extra": np.ones(3)})
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\), got \(4,\)"):
        layer.load_state_dict({**good, "running_var": np.ones(4)})
    assert_array_equal(layer.weight, np.ones(3))
    assert int(layer.num_batches_tracked) == 0
    # as in PyTorch, an old state without num_batches_tracked keeps the count
    layer.num_batches_tracked[...] = 5
    layer.load_state_dict({k: v for k, v in good.items() if k != "num_batches_tracked"})
    assert int(layer.num_batches_tracked) == 5
    assert layer.weight.dtype == np.float32 and layer.weight[0] == 2.0
    layer.load_state_dict({"running_mean": np.zeros(3)}, strict=False)
    assert_array_equal(layer.running_mean, np.zeros(3))


def test_state_dict_is_a_copy():
    layer = BatchNorm1d(3)
    state = layer.state_dict()
    layer(next(batches((8, 3), np.float32, 1))[0])
    assert_array_equal(state["running_mean"], np.zeros(3))
    assert int(state["num_batches_tracked"]) == 0


def test_reset_and_pickle():
    layer = BatchNorm1d(3, backend=reference)
    x, dy = next(batches((8, 3), np.float32, 1))
    layer(x)
    layer.backward(dy)
    copy = pickle.loads(pickle.dumps(layer))
    assert copy.backend is reference and copy.training
    assert_array_equal(copy.running_var, layer.running_var)
    with pytest.raises(RuntimeError):      # the cached input is not pickled
        copy.backward(dy)
    layer.gamma[...] = 3
    layer.reset_parameters()
    assert_array_equal(layer.gamma, np.ones(3))
    assert_array_equal(layer.running_var, np.ones(3))
    assert int(layer.num_batches_tracked) == 0


def test_layer_keeps_no_copy_of_its_input():
    # documented: the backward reads the very array given to the forward
    layer = BatchNorm2d(3, dtype=np.float64)
    x, dy = next(batches((4, 3, 5, 5), np.float64, 1))
    invstd = 1 / np.sqrt(x.var(axis=(0, 2, 3)) + layer.eps)
    layer(x)
    layer.backward(dy)
    dgamma = layer.dgamma
    x += 1.0            # xhat = (x - mean) * invstd grows by invstd
    layer.backward(dy)
    assert_allclose(layer.dgamma - dgamma, dy.sum(axis=(0, 2, 3)) * invstd, rtol=1e-9)


@pytest.mark.parametrize("cls", [BatchNorm1d, BatchNorm2d, BatchNorm3d])
def test_help_shows_the_signature(cls):
    """help() shows the constructor's parameters with their types, not object's
    "Initialize self. See help(type(self))"."""
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "Initialize self" not in text
    assert "__init__(self, num_features: 'int', eps: 'float' = 1e-05" in text
    assert "dtype: 'DTypeLike' = <class 'numpy.float32'>" in text
