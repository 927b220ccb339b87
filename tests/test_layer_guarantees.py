"""What a layer's methods promise (issue 20, docs/guide/layers.md).

- the backward differentiates the forward that ran: an optimizer step on
  gamma and beta between a forward and its backward changes nothing, in
  every mode (compared with a twin layer that took no step, and with the
  float64 oracle at the forward's parameters);
- every state change is all or nothing, and names the array that fails;
  read-only parameters are refused;
- flags are bools everywhere (the error is a TypeError and a ValueError);
  numbers that a float cannot hold are ValueErrors naming the argument; a
  count is an integer count;
- load_state_dict's type errors name the key and what was expected.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from helpers import assert_grads_close, assert_unchanged, call, snapshot, valid_args

import fastbn
from fastbn import BatchNorm1d, BatchNorm2d, reference
from fastbn.compat import cs231n, deepnet
from fastbn.distributed import (SyncBatchNorm, sync_batch_norm_backward,
                                sync_batch_norm_forward)

C = 3
RNG = np.random.default_rng(20)
X = RNG.standard_normal((6, C, 4, 3)).astype(np.float32)
DY = RNG.standard_normal(X.shape).astype(np.float32)
GAMMA = np.array([0.7, -1.3, 1.9], np.float32)
BETA = np.array([0.4, -0.2, 0.1], np.float32)


# ------------------------------------------------- 1. the forward that ran ----

MODES = {
    "default": dict(),
    "relu": dict(activation="relu"),
    "leaky_relu": dict(activation="leaky_relu", negative_slope=0.1),
    "memory_saving": dict(memory_saving=True),
    "memory_saving-leaky_relu": dict(memory_saving=True, activation="leaky_relu",
                                     negative_slope=0.1),
    "eval": dict(mode="eval"),
    "eval-leaky_relu": dict(mode="eval", activation="leaky_relu", negative_slope=0.1),
    "eval-no-running-stats": dict(mode="eval", track_running_stats=False),
    "reference-backend": dict(backend=reference, activation="leaky_relu", negative_slope=0.1),
    "sync-one-rank": dict(sync=True, activation="leaky_relu", negative_slope=0.1),
    "sync-one-rank-memory_saving": dict(sync=True, memory_saving=True),
}


def make_layer(config):
    config = dict(config)
    training = config.pop("mode", "train") == "train"
    if config.pop("sync", False):
        bn = SyncBatchNorm(C, allreduce=lambda records: records, **config)
    else:
        bn = BatchNorm2d(C, **config)
    bn.gamma[...] = GAMMA
    bn.beta[...] = BETA
    if bn.track_running_stats:
        bn.running_mean[...] = [0.1, -0.2, 0.3]
    return bn.train(training)


def expected_gradients(bn):
    """The float64 oracle's gradients at the forward's parameters (GAMMA, BETA)."""
    x, dy = X.astype(np.float64), DY.astype(np.float64)
    act = dict(activation=bn.activation, negative_slope=bn.negative_slope)
    g, b = GAMMA.astype(np.float64), BETA.astype(np.float64)
    if bn.training or not bn.track_running_stats:
        _, mean, invstd = reference.batch_norm_forward(x, g, b, eps=bn.eps)
        return reference.batch_norm_backward(dy, x, g, mean, invstd, beta=b, **act)
    mean = bn.running_mean.astype(np.float64)
    invstd = 1 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    return reference.batch_norm_backward(dy, x, g, mean, invstd, beta=b, training=False, **act)


@pytest.mark.parametrize("step", ["in place", "assigned"])
@pytest.mark.parametrize("mode", list(MODES))
def test_an_optimizer_step_between_forward_and_backward_changes_nothing(mode, step):
    bn, twin = make_layer(MODES[mode]), make_layer(MODES[mode])
    bn(X), twin(X)
    if step == "in place":      # SGD on the parameters, as solvers do
        bn.gamma -= 0.9 * np.sign(bn.gamma)
        bn.beta += 0.5
    else:
        bn.gamma = np.full(C, 5.0, np.float32)
        bn.beta = np.full(C, -3.0, np.float32)
    dx = bn.backward(DY)
    np.testing.assert_array_equal(dx, twin.backward(DY))
    np.testing.assert_array_equal(bn.dgamma, twin.dgamma)
    np.testing.assert_array_equal(bn.dbeta, twin.dbeta)
    want = expected_gradients(twin)
    invstd = 1 / np.sqrt(X.astype(np.float64).var(axis=(0, 2, 3)) + bn.eps)
    assert_grads_close((dx, bn.dgamma, bn.dbeta), want, np.float32, DY, GAMMA, invstd,
                       what=mode)


def test_the_step_would_have_mattered():
    """Control: with the new parameters at the forward, the gradient differs."""
    bn = make_layer(MODES["leaky_relu"])
    bn(X)
    first = bn.backward(DY)
    bn.gamma -= 0.9 * np.sign(bn.gamma)
    bn(X)
    assert not np.allclose(bn.backward(DY), first, rtol=0.05)


def test_the_adapters_differentiate_the_forward_that_ran():
    x = X.astype(np.float64)
    dy = DY.astype(np.float64)
    layer, twin = deepnet.Batchnorm((C, 4, 3)), deepnet.Batchnorm((C, 4, 3))
    layer.forward(x), twin.forward(x)
    for p in layer.params:
        p -= 0.7                                     # deepnet's solvers step in place
    dX, grads = layer.backward(dy)
    dX_twin, grads_twin = twin.backward(dy)
    np.testing.assert_array_equal(dX, dX_twin)
    np.testing.assert_array_equal(grads[0], grads_twin[0])
    gamma = GAMMA.astype(np.float64)
    _, cache = cs231n.spatial_batchnorm_forward(x, gamma, np.zeros(C), {"mode": "train"})
    want = cs231n.spatial_batchnorm_backward(dy, cache)
    gamma -= 0.9                                     # an in-place step on the caller's gamma
    for got, expected in zip(cs231n.spatial_batchnorm_backward(dy, cache), want):
        np.testing.assert_array_equal(got, expected)


# ---------------------------------------------- 2. all-or-nothing changes ----

def read_only(a):
    a.flags.writeable = False
    return a


def layer_state(bn):
    return {k: v.copy() for k, v in bn._state_arrays().items()}


def assert_state(bn, state):
    for key, value in state.items():
        np.testing.assert_array_equal(bn._state_arrays()[key], value, err_msg=key)


@pytest.mark.parametrize("frozen", ["running_mean", "running_var", "num_batches_tracked"])
@pytest.mark.parametrize("method", ["reset_running_stats", "reset_parameters"])
def test_a_reset_with_a_read_only_array_changes_nothing_and_names_it(method, frozen):
    bn = BatchNorm2d(C)
    bn.gamma[...] = GAMMA
    bn(X)
    read_only(getattr(bn, frozen))
    before = layer_state(bn)
    with pytest.raises(ValueError, match=f"BatchNorm2d.{method}: {frozen} is reset in place "
                                         f"and must be writeable"):
        getattr(bn, method)()
    assert_state(bn, before)


def test_reset_parameters_with_a_read_only_gamma_changes_nothing():
    bn = BatchNorm2d(C)
    bn(X)
    bn._gamma = read_only(GAMMA.copy())   # behind the setter's back
    before = layer_state(bn)
    with pytest.raises(ValueError, match="weight is reset in place"):
        bn.reset_parameters()
    assert_state(bn, before)


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var",
                                 "num_batches_tracked"])
def test_load_state_dict_into_a_read_only_array_changes_nothing_and_names_it(key):
    bn = BatchNorm2d(C)
    bn(X)
    new = {k: v + 1 for k, v in bn.state_dict().items()}
    target = bn._state_arrays()[key]
    if key in ("weight", "bias"):
        setattr(bn, "_gamma" if key == "weight" else "_beta", read_only(target.copy()))
    else:
        read_only(target)
    before = layer_state(bn)
    with pytest.raises(ValueError, match=f"load_state_dict: {key} is loaded in place and "
                                         f"must be writeable"):
        bn.load_state_dict(new)
    assert_state(bn, before)


def test_layer_arrays_that_share_memory_are_refused_before_loading():
    bn = BatchNorm1d(C)
    bn.running_var = bn.running_mean       # plain attributes: nothing stops this
    before = layer_state(bn)
    with pytest.raises(ValueError, match="running_var overlaps running_mean"):
        bn.load_state_dict({k: v + 1 for k, v in bn.state_dict().items()})
    assert_state(bn, before)


@pytest.mark.parametrize("name", ["gamma", "beta", "weight", "bias"])
def test_a_read_only_parameter_is_refused_not_copied(name, tmp_path):
    path = tmp_path / "gamma.npy"
    np.save(path, GAMMA)
    mapped = np.load(path, mmap_mode="r")
    bn = BatchNorm1d(C)
    old = getattr(bn, name)
    with pytest.raises(ValueError, match=f"BatchNorm1d.{name} is updated in place .* must be "
                                         f"writeable, got a read-only array"):
        setattr(bn, name, mapped)
    assert getattr(bn, name) is old
    fresh = np.array(mapped)                # a writeable copy is kept as it is
    setattr(bn, name, fresh)
    assert getattr(bn, name) is fresh


def test_a_parameter_sharing_memory_with_another_array_is_refused():
    bn = BatchNorm1d(C)
    with pytest.raises(ValueError, match="BatchNorm1d.beta overlaps weight"):
        bn.beta = bn.gamma
    with pytest.raises(ValueError, match="BatchNorm1d.gamma overlaps running_mean"):
        bn.gamma = bn.running_mean
    bn.gamma = bn.gamma                     # the array it replaces is not a rival
    np.testing.assert_array_equal(bn.beta, 0)


# ---------------------------------------------------- 3. flags and numbers ----

NOT_BOOLS = [1, 0, "True", "False", None, np.int64(1), 1.0]


def raises_flag_error(match):
    """The flag error is both a TypeError (fastbn's rule) and a ValueError (PyTorch's)."""
    class Both:
        def __enter__(self):
            self.ctx = pytest.raises(TypeError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            result = self.ctx.__exit__(*exc)
            assert isinstance(self.info.value, ValueError)
            return result
    return Both()


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
def test_train_mode_must_be_a_bool(value):
    bn = BatchNorm2d(C).eval()
    with raises_flag_error("BatchNorm2d.train: mode must be True or False"):
        bn.train(value)
    assert bn.training is False
    assert bn.train(np.bool_(True)).training is True


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
@pytest.mark.parametrize("flag", ["affine", "track_running_stats", "unbiased",
                                  "memory_saving"])
def test_layer_flags_must_be_bools(flag, value):
    with raises_flag_error(f"BatchNorm2d: {flag} must be True or False"):
        BatchNorm2d(C, **{flag: value})
    with raises_flag_error(f"SyncBatchNorm: {flag} must be True or False"):
        SyncBatchNorm(C, allreduce=lambda r: r, **{flag: value})


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
def test_load_state_dict_strict_must_be_a_bool(value):
    bn = BatchNorm1d(C)
    before = layer_state(bn)
    with raises_flag_error("load_state_dict: strict must be True or False"):
        bn.load_state_dict({k: v + 1 for k, v in bn.state_dict().items()}, strict=value)
    assert_state(bn, before)


@pytest.mark.parametrize("value", [1, None, "yes"], ids=repr)
@pytest.mark.parametrize("func, flag", [("forward", "unbiased"), ("backward", "training"),
                                        ("backward", "param_grads")])
def test_function_flags_raise_the_same_error(func, flag, value):
    args = valid_args(func)
    args[flag] = value
    snap = snapshot(**{k: v for k, v in args.items() if isinstance(v, np.ndarray)})
    with raises_flag_error(f"{flag} must be True or False"):
        call(func, args)
    assert_unchanged(snap)


HUGE = [10**400, -10**400]


@pytest.mark.parametrize("value", HUGE, ids=["1e400", "-1e400"])
@pytest.mark.parametrize("func", ["forward", "inference", "backward", "backward_from_output"])
def test_a_slope_a_float_cannot_hold_is_a_value_error_naming_it(func, value):
    args = valid_args(func)
    args["negative_slope"] = value
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        call(func, args)


@pytest.mark.parametrize("value", HUGE, ids=["1e400", "-1e400"])
def test_layers_and_sync_passes_name_a_slope_a_float_cannot_hold(value):
    with pytest.raises(ValueError, match="BatchNorm2d: negative_slope must be finite"):
        BatchNorm2d(C, activation="leaky_relu", negative_slope=value)
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        sync_batch_norm_forward(X, None, None, allreduce=lambda r: r, num_features=C,
                                activation="leaky_relu", negative_slope=value)
    mean, invstd = np.zeros(C, np.float32), np.ones(C, np.float32)
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        sync_batch_norm_backward(DY, X, None, mean, invstd, allreduce=lambda r: r,
                                 num_features=C, activation="leaky_relu", negative_slope=value)


@pytest.mark.parametrize("name, message", [("eps", "eps must be finite and > 0"),
                                           ("momentum", r"momentum must be in \[0, 1\]")])
@pytest.mark.parametrize("value", HUGE, ids=["1e400", "-1e400"])
def test_other_numbers_a_float_cannot_hold(name, message, value):
    with pytest.raises(ValueError, match=f"BatchNorm2d: {message}"):
        BatchNorm2d(C, **{name: value})
    args = valid_args("forward")
    args[name] = value
    with pytest.raises(ValueError, match=message):
        call("forward", args)


W = np.ones((C, 2), np.float32)
STATS = (np.zeros(C, np.float32), np.ones(C, np.float32))
HUGE_INTEGERS = {
    "num_features": lambda v: BatchNorm2d(v),
    "channel_axis": lambda v: BatchNorm2d(C, channel_axis=v),
    "num_threads": lambda v: BatchNorm2d(C, num_threads=-v),
    "X_dim": lambda v: deepnet.Batchnorm((v, 2)),
    "out_axis": lambda v: fastbn.fold_batch_norm(W, None, *STATS, None, None, out_axis=v),
    "eps": lambda v: fastbn.fold_batch_norm(W, None, *STATS, None, None, eps=v),
    "bn_param['momentum']": lambda v: cs231n.batchnorm_forward(
        X[:, :, 0, 0].astype(np.float64), np.ones(C), np.zeros(C),
        {"mode": "train", "momentum": v}),
}


@pytest.mark.parametrize("name", list(HUGE_INTEGERS))
def test_an_integer_too_large_for_anything_is_a_short_value_error_naming_it(name):
    with pytest.raises(ValueError) as info:
        HUGE_INTEGERS[name](10**400)
    message = str(info.value)
    assert name in message and len(message) < 300, message


def test_sync_num_features_too_large():
    with pytest.raises(ValueError, match="num_features must be small enough"):
        sync_batch_norm_forward(X, None, None, allreduce=lambda r: r, num_features=10**400)


@pytest.mark.parametrize("count, exc", [
    (3.0, TypeError), (np.float64(3), TypeError), (np.array(3.0), TypeError),
    (np.array([2.5]), TypeError), (True, TypeError), (2**63, ValueError),
    (10**30, ValueError), (-1, ValueError), (np.array(10**30, dtype=object), ValueError),
    (np.uint64(2**63), ValueError)], ids=repr)
def test_a_count_must_be_an_integer_count(count, exc):
    bn = BatchNorm2d(C)
    bn(X)
    before = layer_state(bn)
    with pytest.raises(exc, match="load_state_dict: num_batches_tracked must be an integer "
                                  "count"):
        bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": count})
    assert_state(bn, before)


@pytest.mark.parametrize("count", [np.array(3.0), np.array(2**63, np.uint64),
                                   np.array(1, np.int32)], ids=repr)
def test_the_functions_count_must_be_an_int64_integer_count(count):
    args = valid_args("forward")
    args["num_batches_tracked"] = count
    snap = snapshot(**{k: v for k, v in args.items() if isinstance(v, np.ndarray)})
    with pytest.raises(TypeError, match="num_batches_tracked must be an integer count of "
                                        "dtype int64"):
        call("forward", args)
    assert_unchanged(snap)


def test_an_integer_count_of_any_integer_type_loads():
    bn = BatchNorm2d(C)
    for count in (7, np.int32(8), np.array([9], np.uint8), np.array(2**62)):
        bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": count})
        assert int(bn.num_batches_tracked) == int(np.asarray(count).reshape(()))


# ------------------------------------------------- 4. load_state_dict types ----

@pytest.mark.parametrize("state", [[("weight", np.ones(C))], None, "weight", 3, np.ones(C)],
                         ids=["pairs", "None", "str", "int", "ndarray"])
def test_load_state_dict_needs_a_mapping(state):
    bn = BatchNorm1d(C)
    with pytest.raises(TypeError, match="load_state_dict: state_dict must be a mapping of str "
                                        "to arrays"):
        bn.load_state_dict(state)


BAD_VALUES = {
    "None": lambda: None,
    "str": lambda: "1.0",
    "bytes": lambda: b"\x00" * 12,
    "int64": lambda: np.ones(C, np.int64),
    "bool": lambda: np.ones(C, bool),
    "complex": lambda: np.ones(C, complex),
    "int16": lambda: np.ones(C, np.int16),
    "object": lambda: np.array([1.0, "a", None], dtype=object),
    "list of str": lambda: ["1", "2", "3"],
}


@pytest.mark.parametrize("kind", list(BAD_VALUES))
@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
def test_a_value_of_a_type_fastbn_does_not_take_names_the_key(key, kind):
    bn = BatchNorm2d(C)
    bn(X)
    before = layer_state(bn)
    state = {**bn.state_dict(), "weight": np.full(C, 7.0), key: BAD_VALUES[kind]()}
    with pytest.raises(TypeError, match=f"BatchNorm2d.load_state_dict: {key} must be float32, "
                                        f"float64, float16 or bfloat16 values"):
        bn.load_state_dict(state)
    assert_state(bn, before)


@pytest.mark.parametrize("kind", ["None", "str", "complex", "object"])
def test_a_count_of_a_type_fastbn_does_not_take_names_the_key(kind):
    bn = BatchNorm2d(C)
    with pytest.raises(TypeError, match="num_batches_tracked must be an integer count"):
        bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": BAD_VALUES[kind]()})


@pytest.mark.parametrize("value, message", [
    (np.array([1e300, 1.0, 1.0]), "running_var holds finite values too large for the layer's "
                                  "dtype float32"),
    ([[1.0, 2.0], [3.0]], r"running_var must be float32, float64, float16 or bfloat16 values .* "
                          r"of shape \(3,\)"),
], ids=["1e300 into float32", "ragged list"])
def test_values_the_layer_cannot_hold_are_value_errors_naming_the_key(value, message):
    bn = BatchNorm2d(C)
    before = layer_state(bn)
    with pytest.raises(ValueError, match=f"BatchNorm2d.load_state_dict: {message}"):
        bn.load_state_dict({**bn.state_dict(), "weight": np.full(C, 3.0), "running_var": value})
    assert_state(bn, before)
    bn.load_state_dict({**bn.state_dict(), "running_var": np.array([np.inf, np.nan, 3e38])})
    np.testing.assert_array_equal(bn.running_var, np.array([np.inf, np.nan, 3e38], np.float32))


def test_torch_tensors_of_dtypes_fastbn_does_not_take():
    torch = pytest.importorskip("torch")
    bn = BatchNorm2d(C)
    before = layer_state(bn)
    for dtype in (torch.complex64, torch.int32, torch.bool):
        state = {**bn.state_dict(), "running_var": torch.ones(C, dtype=dtype)}
        with pytest.raises(TypeError, match="running_var must be float32, float64, float16 or "
                                            "bfloat16 values"):
            bn.load_state_dict(state)
        assert_state(bn, before)
    state = {**bn.state_dict(), "num_batches_tracked": torch.tensor(2.0)}
    with pytest.raises(TypeError, match="num_batches_tracked must be an integer count"):
        bn.load_state_dict(state)
    # what it takes: float tensors (requiring grad too; a 16-bit model's: tests/test_half.py)
    # and an int64 count
    theirs = torch.nn.BatchNorm2d(C).double()
    with torch.no_grad():
        theirs.weight.fill_(2.5)
    bn.load_state_dict(theirs.state_dict())
    np.testing.assert_array_equal(bn.weight, np.full(C, 2.5, np.float32))


def test_a_deep_copy_of_a_layer_computes_as_the_layer():
    bn = make_layer(MODES["leaky_relu"])
    twin = copy.deepcopy(bn)
    np.testing.assert_array_equal(bn(X), twin(X))
    assert twin.gamma is not bn.gamma and math.isclose(twin.negative_slope, 0.1)
    assert fastbn.BatchNorm2d is type(twin)
