"""BatchNorm layers with a fused activation, and in memory-saving mode.

- ``activation=`` / ``negative_slope=``: the layer gives the same bits as the
  functions it composes (forward with the activation, backward with beta and
  the activation, or the backward from the output), equals the layer on
  the reference backend, equals ``torch.nn.BatchNorm*d`` followed by
  ``torch.nn.ReLU`` / ``torch.nn.LeakyReLU`` (forward, autograd backward,
  running statistics, over SGD steps); finite differences are in
  ``test_layers.py``, with the other options;
- ``memory_saving=True``: the gradients equal the default mode's to 1e-5
  relative in float32 on well-conditioned data; the layer holds no
  reference to x after a training forward (a weak reference dies), and a
  small net of linear and BatchNorm layers keeps one activation-sized
  array less per BatchNorm between its forward and backward (tracemalloc);
  eval mode with running statistics keeps x, as documented; gamma and
  beta are those of the forward; ``SyncBatchNorm`` on one rank gives the
  layer's bits with both options;
- the options survive pickling, are not in the state dict, and show in repr.

Bad options at construction, and the backward of a memory-saving layer
whose gamma has a zero, are rows of the table in ``test_hostile.py``.
"""

from __future__ import annotations

import gc
import pickle
import tracemalloc
import types
import weakref

import numpy as np
import pytest
from helpers import TOLERANCE, assert_bitwise_equal, assert_close

import fastbn
from fastbn import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, reference

F = fastbn.functional

CASES = {  # a class, an input shape it accepts and the channel axis
    "1d-2D": (BatchNorm1d, (16, 5), 1),
    "1d-3D": (BatchNorm1d, (6, 5, 7), 1),
    "2d": (BatchNorm2d, (4, 5, 6, 3), 1),
    "2d-last": (BatchNorm2d, (4, 6, 3, 5), -1),
    "3d": (BatchNorm3d, (3, 5, 4, 3, 2), 1),
}
ACTIVATIONS = [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.01), ("leaky_relu", 0.2)]
INVERTIBLE = [a for a in ACTIVATIONS if a[0] != "relu"]
DTYPES = [np.float32, np.float64]


def act_id(act):
    return f"{act[0]}-{act[1]}" if act[0] == "leaky_relu" else str(act[0])


cases = pytest.mark.parametrize("case", CASES)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
invertible = pytest.mark.parametrize("act", INVERTIBLE, ids=act_id)
# every activation without memory saving, the invertible ones with it (ReLU with it is
# refused at construction: test_hostile)
with_modes = pytest.mark.parametrize(
    "act, memory_saving",
    [(a, False) for a in ACTIVATIONS] + [(a, True) for a in INVERTIBLE],
    ids=[act_id(a) for a in ACTIVATIONS] + [f"{act_id(a)}-memory-saving" for a in INVERTIBLE])


def make_layer(case, dtype, act, **options):
    """A layer of ``case`` with the activation ``act`` and well-conditioned
    parameters: |gamma| in [0.5, 1.5] with either sign, beta about N(0, 0.5)."""
    cls, shape, ca = CASES[case]
    c = shape[ca]
    layer = cls(c, dtype=dtype, channel_axis=ca, activation=act[0], negative_slope=act[1],
                **options)
    if layer.affine:
        rng = np.random.default_rng(100)
        layer.gamma[...] = rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c)
        layer.beta[...] = 0.5 * rng.standard_normal(c)
    return layer


def batches(case, dtype, count, seed=0):
    """Inputs and upstream gradients, off-centre and scaled differently per step."""
    _, shape, _ = CASES[case]
    rng = np.random.default_rng(seed)
    for k in range(count):
        x = (rng.standard_normal(shape) * (1.5 + k) + 3.0 - k).astype(dtype)
        yield x, rng.standard_normal(shape).astype(dtype)


def modes(layer, step, steps_train):
    """Train for ``steps_train`` steps, then eval."""
    layer.train(step < steps_train)


# ----------------------------------------------- the functions it composes ----

@cases
@dtypes
@with_modes
@pytest.mark.parametrize("running", [True, False], ids=["running", "no-running"])
def test_layer_gives_the_bits_of_the_functions(case, dtype, act, memory_saving, running):
    layer = make_layer(case, dtype, act, memory_saving=memory_saving,
                       track_running_stats=running)
    ca = layer.channel_axis
    kw = dict(activation=act[0], negative_slope=act[1], channel_axis=ca)
    for step, (x, dy) in enumerate(batches(case, dtype, 5)):
        modes(layer, step, 3)
        g, b = layer.gamma.copy(), layer.beta.copy()
        rm = rv = count = None
        if running:
            rm, rv = layer.running_mean.copy(), layer.running_var.copy()
            count = layer.num_batches_tracked.copy()
        y, dx = layer(x), layer.backward(dy)
        if layer.training or not running:
            tracking = dict(running_mean=rm, running_var=rv, num_batches_tracked=count) \
                if layer.training else {}
            ey, mean, invstd = F.batch_norm_forward(x, g, b, **tracking, **kw)
            if memory_saving:
                edx, edg, edb = F.batch_norm_backward_from_output(dy, ey, g, b, invstd, **kw)
            else:
                edx, edg, edb = F.batch_norm_backward(dy, x, g, mean, invstd, beta=b, **kw)
        else:
            ey = F.batch_norm_inference(x, g, b, rm, rv, **kw)
            invstd = 1 / np.sqrt(rv.astype(np.float64) + layer.eps)
            invstd = np.minimum(invstd, np.finfo(dtype).max).astype(dtype)
            edx, edg, edb = F.batch_norm_backward(dy, x, g, rm, invstd, beta=b, training=False,
                                                  **kw)
        where = f"step {step}, training={layer.training}"
        assert_bitwise_equal(y, ey, where)
        assert_bitwise_equal(dx, edx, where)
        assert_bitwise_equal(layer.dgamma, edg, where)
        assert_bitwise_equal(layer.dbeta, edb, where)
        if running and layer.training:
            assert_bitwise_equal(layer.running_mean, rm, where)
            assert_bitwise_equal(layer.running_var, rv, where)
            assert int(layer.num_batches_tracked) == int(count)
        layer.gamma -= dtype(0.1) * layer.dgamma   # an SGD step between the batches
        layer.beta -= dtype(0.1) * layer.dbeta


def test_without_affine_the_layer_passes_no_gamma_or_beta():
    layer = BatchNorm2d(5, affine=False, activation="leaky_relu", negative_slope=0.1,
                        memory_saving=True)
    x, dy = next(batches("2d", np.float32, 1))
    y = layer(x)
    dx = layer.backward(dy)
    ey, _, invstd = F.batch_norm_forward(x, None, None, activation="leaky_relu",
                                         negative_slope=0.1)
    assert_bitwise_equal(y, ey)
    assert_bitwise_equal(dx, F.batch_norm_backward_from_output(
        dy, ey, None, None, invstd, activation="leaky_relu", negative_slope=0.1)[0])
    assert layer.dgamma is None and layer.grads == []


# ---------------------------------------------------- the reference backend ----

@cases
@dtypes
@with_modes
def test_reference_backend_gives_the_same_layer(case, dtype, act, memory_saving):
    fast = make_layer(case, dtype, act, memory_saving=memory_saving, momentum=None)
    slow = make_layer(case, dtype, act, memory_saving=memory_saving, momentum=None,
                      backend=reference)
    for step, (x, dy) in enumerate(batches(case, dtype, 5)):
        for layer in (fast, slow):
            modes(layer, step, 3)
        y_fast, y_slow = fast(x), slow(x)
        assert_close(y_fast, y_slow, dtype)
        dx_fast, dx_slow = fast.backward(dy), slow.backward(dy)
        rtol = 10 * TOLERANCE[np.dtype(dtype)]
        assert_close(dx_fast, dx_slow, dtype, rtol=rtol)
        assert_close(fast.dgamma, slow.dgamma, dtype, rtol=rtol)
        assert_close(fast.dbeta, slow.dbeta, dtype)
        assert_close(fast.running_var, slow.running_var, dtype)


# ------------------------------------------------------------------ torch ----

@cases
@dtypes
@with_modes
def test_matches_torch_batchnorm_then_activation(case, dtype, act, memory_saving):
    """nn.BatchNorm*d followed by nn.ReLU or nn.LeakyReLU: outputs, autograd
    gradients and running statistics over SGD steps, then eval mode."""
    torch = pytest.importorskip("torch")
    ours = make_layer(case, dtype, act, memory_saving=memory_saving)
    cls, shape, ca = CASES[case]
    c = shape[ca]
    bn = getattr(torch.nn, cls.__name__)(c, dtype=getattr(torch, np.dtype(dtype).name))
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(ours.gamma))
        bn.bias.copy_(torch.from_numpy(ours.beta))
    layers = {None: [], "relu": [torch.nn.ReLU()],
              "leaky_relu": [torch.nn.LeakyReLU(act[1])]}[act[0]]
    theirs = torch.nn.Sequential(bn, *layers)
    first = (lambda a: np.moveaxis(a, -1, 1)) if ca == -1 else (lambda a: a)
    rtol = TOLERANCE[np.dtype(dtype)]
    for step, (x, dy) in enumerate(batches(case, dtype, 7)):
        if step == 4:
            ours.eval()
            theirs.eval()
        xt = torch.tensor(first(x), requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.tensor(first(dy)))
        y = ours(x)
        dx = ours.backward(dy)
        assert_close(first(y), yt.detach().numpy(), dtype, rtol=2 * rtol)
        assert_close(first(dx), xt.grad.numpy(), dtype, rtol=10 * rtol)
        assert_close(ours.dgamma, bn.weight.grad.numpy(), dtype, rtol=10 * rtol)
        assert_close(ours.dbeta, bn.bias.grad.numpy(), dtype, rtol=10 * rtol)
        assert_close(ours.running_mean, bn.running_mean.numpy(), dtype)
        assert_close(ours.running_var, bn.running_var.numpy(), dtype)
        for p, g in zip(ours.params, ours.grads):
            p -= dtype(0.1) * g
        with torch.no_grad():
            for p in (bn.weight, bn.bias):
                p -= 0.1 * p.grad
                p.grad = None


# ------------------------------------------------------------ memory saving ----

@cases
@dtypes
@invertible
@pytest.mark.parametrize("running", [True, False], ids=["running", "no-running"])
def test_memory_saving_gives_the_default_gradients(case, dtype, act, running):
    """From y instead of x: the same gradients to 1e-5 relative in float32
    (1e-10 in float64), in training mode and in eval mode, with |gamma| in
    [0.5, 1.5] and |beta| about 0.5 (no SGD step: one could take a gamma
    near 0, where the inversion loses digits like |beta| / |gamma|)."""
    plain = make_layer(case, dtype, act, track_running_stats=running)
    saving = make_layer(case, dtype, act, track_running_stats=running, memory_saving=True)
    for step, (x, dy) in enumerate(batches(case, dtype, 6)):
        for layer in (plain, saving):
            modes(layer, step, 4)
        assert_bitwise_equal(saving(x), plain(x))
        dx = saving.backward(dy)
        where = f"step {step}, training={plain.training}"
        assert_close(dx, plain.backward(dy), dtype, err_msg=where)
        assert_close(saving.dgamma, plain.dgamma, dtype, err_msg=where)
        assert_close(saving.dbeta, plain.dbeta, dtype, err_msg=where)


@pytest.mark.parametrize("memory_saving, mode, running, freed", [
    (True, "train", True, True),
    (True, "eval", False, True),     # eval without running statistics: batch statistics
    (True, "eval", True, False),     # eval with running statistics keeps x (documented)
    (False, "train", True, False),   # control: the default layer keeps x
])
def test_memory_saving_layer_holds_no_reference_to_x(memory_saving, mode, running, freed):
    layer = BatchNorm2d(5, activation="leaky_relu", memory_saving=memory_saving,
                        track_running_stats=running).train(mode == "train")
    x, dy = next(batches("2d", np.float32, 1))
    alive = weakref.ref(x)
    y = layer(x)
    del x
    gc.collect()
    assert (alive() is None) == freed
    assert layer.backward(dy).shape == y.shape   # the backward needs nothing more


class Linear:
    """``x @ weight``, keeping x for the weight's gradient as any linear layer does."""

    def __init__(self, weight):
        self.weight = weight

    def __call__(self, x):
        self.x = x
        return x @ self.weight

    def backward(self, dy):
        self.dweight = self.x.T @ dy
        return dy @ self.weight.T


def retained_bytes(net, make_input):
    """Bytes still allocated after a forward through ``net`` (a list of
    layers) of an input it makes: what the net keeps for its backward, and
    the output."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = make_input()
        for layer in net:
            out = layer(out)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return kept, out


def test_memory_saving_keeps_one_array_less_per_layer():
    """A net of 4 blocks (Linear, BatchNorm1d with leaky ReLU) on (4096, 256)
    float32 activations (4 MiB each), measured with tracemalloc between the
    forward and the backward. Each Linear keeps its input (the previous
    block's y); a default BatchNorm keeps its x (the Linear's output) too, a
    memory-saving one keeps y, which the next Linear (or the caller) holds
    anyway: 9 arrays against 5."""
    n, d, blocks = 4096, 256, 4
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
               for _ in range(blocks)]

    def make_input():
        return rng.standard_normal((n, d), dtype=np.float32)

    size = n * d * 4
    kept = {}
    for saving in (False, True):
        net = []
        for w in weights:
            net += [Linear(w), BatchNorm1d(d, activation="leaky_relu", negative_slope=0.1,
                                           memory_saving=saving)]
        kept[saving], out = retained_bytes(net, make_input)
        dy = np.ones_like(out)
        for layer in reversed(net):   # the backward runs from what was kept
            dy = layer.backward(dy)
    # the input, and for each block x and y (default) or y alone; O(C) vectors beside
    assert kept[False] >= (2 * blocks + 1) * size
    assert kept[True] < (blocks + 1.1) * size
    assert kept[False] - kept[True] >= (blocks - 0.1) * size


def test_memory_saving_backward_uses_the_forwards_gamma_and_beta():
    layer = make_layer("2d", np.float32, ("leaky_relu", 0.1), memory_saving=True)
    x, dy = next(batches("2d", np.float32, 1))
    g, b = layer.gamma.copy(), layer.beta.copy()
    y = layer(x)
    invstd = layer._saved.invstd
    layer.gamma *= 2          # an optimizer step between the forward and the backward
    layer.beta += 1
    dx = layer.backward(dy)
    expected = F.batch_norm_backward_from_output(dy, y, g, b, invstd, activation="leaky_relu",
                                                 negative_slope=0.1)
    assert_bitwise_equal(dx, expected[0])
    assert_bitwise_equal(layer.dgamma, expected[1])


def test_memory_saving_gradient_reads_y_as_documented():
    """The caller must not modify y in place: the backward reads it."""
    layer = make_layer("2d", np.float64, (None, 0.01), memory_saving=True)
    x, dy = next(batches("2d", np.float64, 1))
    y = layer(x)
    dx = layer.backward(dy)
    y += 1.0                 # what a residual `y += skip` would do
    assert not np.allclose(layer.backward(dy), dx)


# ----------------------------------------------------------- SyncBatchNorm ----

@pytest.mark.parametrize("options", [
    dict(activation="relu"),
    dict(activation="leaky_relu", negative_slope=0.2, memory_saving=True),
    dict(memory_saving=True, track_running_stats=False),
], ids=["relu", "leaky-memory-saving", "memory-saving-no-running"])
def test_sync_batch_norm_on_one_rank_gives_the_layers_bits(options):
    """One rank (the identity for its all-reduce): the synchronized passes with
    the activation, and from the output, give the layer's bits; train, then
    eval. Several uneven ranks: test_sync.py."""
    from fastbn.distributed import SyncBatchNorm
    sync = SyncBatchNorm(5, allreduce=lambda records: records, **options)
    plain = BatchNorm2d(5, **options)
    assert repr(sync) == repr(plain).replace("BatchNorm2d", "SyncBatchNorm")
    for step, (x, dy) in enumerate(batches("2d", np.float32, 5)):
        for layer in (sync, plain):
            modes(layer, step, 3)
        assert_bitwise_equal(sync(x), plain(x), f"step {step}")
        batch = sync.training or not sync.track_running_stats
        assert (sync._saved.x is None) == (sync.memory_saving and batch)  # y kept, not x
        assert_bitwise_equal(sync.backward(dy), plain.backward(dy), f"step {step}")
        assert_bitwise_equal(sync.dgamma, plain.dgamma)
    assert SyncBatchNorm.from_batch_norm(plain, allreduce=lambda r: r).memory_saving == \
        plain.memory_saving


# ------------------------------------------------------- state and options ----

def test_repr_shows_the_options_that_are_not_defaults():
    assert repr(BatchNorm2d(3, activation="relu")) == (
        "BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, "
        "activation='relu')")
    assert repr(BatchNorm1d(3, activation="leaky_relu", negative_slope=0.2,
                            memory_saving=True)).endswith(
        "activation='leaky_relu', negative_slope=0.2, memory_saving=True)")
    assert repr(BatchNorm(3, memory_saving=True)).endswith(
        "track_running_stats=True, memory_saving=True)")
    plain = BatchNorm2d(3)
    assert (plain.activation, plain.negative_slope, plain.memory_saving) == (None, 0.01, False)


def test_options_survive_pickling_and_the_copy_computes_the_same_bits():
    layer = make_layer("2d", np.float32, ("leaky_relu", 0.2), memory_saving=True)
    data = list(batches("2d", np.float32, 2))
    layer(data[0][0])
    copy = pickle.loads(pickle.dumps(layer))
    assert repr(copy) == repr(layer)
    assert (copy.activation, copy.negative_slope, copy.memory_saving) == (
        "leaky_relu", 0.2, True)
    assert copy._saved is None                    # y is not pickled
    x, dy = data[1]
    assert_bitwise_equal(copy(x), layer(x))
    assert_bitwise_equal(copy.backward(dy), layer.backward(dy))
    assert_bitwise_equal(copy.dgamma, layer.dgamma)


def test_a_layer_pickled_before_the_options_loads_with_their_defaults():
    layer = BatchNorm2d(3)
    state = layer.__getstate__()
    for name in ("activation", "negative_slope", "memory_saving"):
        del state[name]
    old = BatchNorm2d.__new__(BatchNorm2d)
    old.__setstate__(state)
    assert (old.activation, old.negative_slope, old.memory_saving) == (None, 0.01, False)
    x, dy = next(batches("2d", np.float32, 1))
    x = x[:, :3]
    assert_bitwise_equal(old(x), BatchNorm2d(3)(x))


def test_state_dict_keys_are_pytorchs_whatever_the_options():
    keys = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    acting = make_layer("2d", np.float32, ("leaky_relu", 0.2), memory_saving=True)
    for x, _ in batches("2d", np.float32, 2):
        acting(x)
    state = acting.state_dict()
    assert list(state) == keys
    plain = BatchNorm2d(5)                # the state moves to a layer without the options
    plain.load_state_dict(state)
    acting.eval()
    plain.eval()
    x = next(batches("2d", np.float32, 1, seed=3))[0]
    assert_bitwise_equal(acting(x), F.batch_norm_inference(
        x, plain.gamma, plain.beta, plain.running_mean, plain.running_var,
        activation="leaky_relu", negative_slope=0.2))
    back = BatchNorm2d(5, activation="relu")   # and back, into other options
    back.load_state_dict(plain.state_dict())
    assert list(back.state_dict()) == keys


def test_a_backend_without_the_activation_keywords_still_serves_a_plain_layer():
    """The layer passes activation= and beta= only with an activation, so a
    backend written against the earlier signatures keeps working."""
    def forward(x, gamma, beta, *, eps, running_mean, running_var, momentum,
                num_batches_tracked, unbiased, channel_axis, num_threads):
        return F.batch_norm_forward(x, gamma, beta, eps=eps, running_mean=running_mean,
                                    running_var=running_var, momentum=momentum,
                                    num_batches_tracked=num_batches_tracked,
                                    unbiased=unbiased, channel_axis=channel_axis,
                                    num_threads=num_threads)

    def inference(x, gamma, beta, running_mean, running_var, *, eps, channel_axis,
                  num_threads):
        return F.batch_norm_inference(x, gamma, beta, running_mean, running_var, eps=eps,
                                      channel_axis=channel_axis, num_threads=num_threads)

    def backward(dy, x, gamma, mean, invstd, *, training, param_grads, channel_axis,
                 num_threads):
        return F.batch_norm_backward(dy, x, gamma, mean, invstd, training=training,
                                     param_grads=param_grads, channel_axis=channel_axis,
                                     num_threads=num_threads)

    old = types.SimpleNamespace(batch_norm_forward=forward, batch_norm_inference=inference,
                                batch_norm_backward=backward)
    layer, plain = BatchNorm2d(5, backend=old), BatchNorm2d(5)
    for step, (x, dy) in enumerate(batches("2d", np.float32, 3)):
        for bn in (layer, plain):
            modes(bn, step, 2)
        assert_bitwise_equal(layer(x), plain(x))
        assert_bitwise_equal(layer.backward(dy), plain.backward(dy))
