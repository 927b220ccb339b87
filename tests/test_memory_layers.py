"""The layers and adapters allocate their result and nothing else of full size.

``test_memory.py`` shows that the functions with ``out=`` allocate O(C).
The layers and adapters have no ``out=``: each forward and backward returns
a new array, and must allocate that one array only (no copy of x kept for
the backward, no full-size temporary), in training and in eval mode. The
measure is the same: the peak of the allocations tracemalloc sees during a
call, after a warm-up call, must stay under the result's size plus 1% of it
plus a few per-channel vectors (mean, invstd, dgamma, dbeta: O(C), which for
deepnet's per-activation normalization is one value per activation of a
sample).
"""

import numpy as np
import pytest

from fastbn import BatchNorm1d, BatchNorm2d
from fastbn.compat import cs231n, deepnet

from helpers import peak_bytes

SHAPE = (16, 32, 64, 64)          # 8 MB in float32, 16 MB in float64


def limit(a, channels=SHAPE[1]):
    """The result's size, 1% of it, and four per-channel vectors."""
    return a.nbytes + a.nbytes // 100 + 4 * channels * a.itemsize


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(4)
    return {dt: (rng.standard_normal(SHAPE).astype(dt), rng.standard_normal(SHAPE).astype(dt))
            for dt in (np.float32, np.float64)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("channels", ["first", "last"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(activation="relu"),
    dict(activation="leaky_relu", memory_saving=True),   # the backward from the output
], ids=["plain", "relu", "leaky-memory-saving"])
def test_layer_forward_and_backward_allocate_only_the_result(data, dtype, mode, channels,
                                                             options):
    x, dy = data[dtype]
    ca = 1
    if channels == "last":
        x, dy, ca = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), np.ascontiguousarray(
            dy.transpose(0, 2, 3, 1)), -1
    bn = BatchNorm2d(SHAPE[1], dtype=dtype, channel_axis=ca, **options).train(mode == "train")
    assert peak_bytes(lambda: bn(x)) < limit(x)
    assert peak_bytes(lambda: bn.backward(dy)) < limit(x)


def test_batchnorm1d_columnar(data):
    x, dy = (a.reshape(-1, 64) for a in data[np.float32])
    bn = BatchNorm1d(64)
    assert peak_bytes(lambda: bn(x)) < limit(x)
    assert peak_bytes(lambda: bn.backward(dy)) < limit(x)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_cs231n_adapter_allocates_only_the_result(data, mode):
    x, dy = data[np.float64]
    gamma, beta = np.ones(SHAPE[1]), np.zeros(SHAPE[1])
    param = {"mode": "train"}
    cs231n.spatial_batchnorm_forward(x, gamma, beta, param)
    param["mode"] = mode
    holder = {}

    def forward():
        holder["out"], holder["cache"] = cs231n.spatial_batchnorm_forward(x, gamma, beta, param)

    assert peak_bytes(forward) < limit(x)
    assert peak_bytes(lambda: cs231n.spatial_batchnorm_backward(dy, holder["cache"])) < limit(x)


def test_deepnet_adapter_allocates_only_the_result(data):
    x, dy = data[np.float64]
    bn = deepnet.Batchnorm(SHAPE[1:])
    D = x[0].size                 # deepnet normalizes every activation: C = D
    assert peak_bytes(lambda: bn.forward(x)) < limit(x, D)
    assert peak_bytes(lambda: bn.backward(dy)) < limit(x, D)


def test_the_measurement_sees_a_copy(data):
    """Control: a forward that also copied its input would be seen."""
    x, _ = data[np.float32]
    bn = BatchNorm2d(SHAPE[1])
    assert peak_bytes(lambda: (bn(x), x.copy())) >= limit(x)
