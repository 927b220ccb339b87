"""Results are bitwise identical for any thread count and on repeated calls.

The shapes are chosen to run each schedule of each kernel family with more
than one thread (more than 2 * 131072 elements, MIN_ELEMENTS_PER_THREAD in
fastbn/_openmp.pxd), and some to switch schedule with the thread count:

- planar, by block: C = 1, and C = 3 (by block with 2 threads, by channel
  group with 3), with blocks that cut rows and blocks of whole rows;
- planar, by channel group: C = 64 (one channel per group);
- planar, switching: (64, 128, 7, 7) makes four groups of up to 41 channels
  (slabs of 7x7 maps), run by group on 1, 2 and 4 threads and by block on 3;
- columnar, by tile: (100, 16384) and (128, 3072), tiles of whole pages per
  row over all rows;
- columnar, by row block: (65536, 16), few columns, and (4096, 1024), rows
  too many for a tile; channels last and (N, C, 1, 1) inputs;
- columnar, few rows: (8, 40000), chunks of columns, one thread each.
"""

import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

try:
    import ml_dtypes
except ImportError:  # bfloat16 is an optional extra
    ml_dtypes = None

import fastbn

from helpers import DTYPES, assert_bitwise_equal, dtype_id, layout_id, make_inputs, same_fastbn

pytestmark = pytest.mark.kernels  # run again at every kernel level (.ci/run)

SHAPES = [
    ((8, 1, 40000), 1),       # planar by block, blocks cut rows
    ((64, 3, 1000), 1),       # planar, C = 3: by block or by channel; whole-row blocks
    ((4, 3, 50000), 1),       # planar, C = 3, blocks cut rows
    ((4, 64, 33, 33), 1),     # planar by channel
    ((64, 128, 7, 7), 1),     # planar, groups of channels: by group or by block
    ((100, 16384), 1),        # columnar, many columns: by tile
    ((4096, 1024), 1),        # columnar, many columns and rows
    ((65536, 16), 1),         # columnar, few columns: by row block
    ((4096, 64), 1),          # columnar
    ((128, 3072), 1),         # columnar, 3 tiles
    ((8, 40000), 1),          # columnar, few rows: chunks shared out to the threads
    ((16, 32, 32, 48), -1),   # channels last: columnar by row block
    ((65536, 8, 1, 1), 1),    # (N, C, 1, 1): columnar by row block
]

THREAD_COUNTS = (1, 2, 3, 4)


def run_all(a, channel_axis, num_threads):
    """Every output of the three functions for one thread count."""
    rm, rv = a.running_mean.copy(), a.running_var.copy()
    y, mean, invstd = fastbn.batch_norm_forward(
        a.x, a.gamma, a.beta, running_mean=rm, running_var=rv, channel_axis=channel_axis,
        num_threads=num_threads)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        a.dy, a.x, a.gamma, mean, invstd, channel_axis=channel_axis, num_threads=num_threads)
    y_inf = fastbn.batch_norm_inference(
        a.x, a.gamma, a.beta, a.running_mean, a.running_var, channel_axis=channel_axis,
        num_threads=num_threads)
    return {"y": y, "mean": mean, "invstd": invstd, "running_mean": rm, "running_var": rv,
            "dx": dx, "dgamma": dgamma, "dbeta": dbeta, "inference y": y_inf}


def assert_same(results, expected, what):
    for name, value in expected.items():
        assert_bitwise_equal(results[name], value, err_msg=f"{name}, {what}")


@pytest.mark.parametrize("shape, channel_axis",
                         [pytest.param(s, ca, id=layout_id(s, ca)) for s, ca in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bitwise_identical_across_threads_and_calls(shape, channel_axis, dtype, rng):
    """Every output is the same to the bit for 1 to 4 threads and on a second call."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    expected = run_all(a, channel_axis, 1)
    for num_threads in THREAD_COUNTS:
        for call in range(2):
            assert_same(run_all(a, channel_axis, num_threads), expected,
                        f"num_threads={num_threads}, call {call + 1}")


@pytest.mark.parametrize("shape, channel_axis", [((8, 1, 40000), 1), ((4096, 64), 1)])
def test_default_threads_follow_threadpoolctl(shape, channel_axis, rng):
    """num_threads=None under a threadpoolctl limit gives the same bits."""
    a = make_inputs(shape, np.float32, channel_axis, rng)
    expected = run_all(a, channel_axis, 1)
    for limit in (1, 2, 3):
        with threadpool_limits(limits=limit, user_api="openmp"):
            assert_same(run_all(a, channel_axis, None), expected, f"threadpoolctl limit {limit}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_in_place_equals_out_of_place(dtype, rng):
    """out=x and out=dy give the same bits as fresh results."""
    for shape, channel_axis in [((8, 1, 40000), 1), ((4096, 64), 1), ((4, 64, 33, 33), 1)]:
        a = make_inputs(shape, dtype, channel_axis, rng)
        expected = run_all(a, channel_axis, 2)
        x, dy = a.x.copy(), a.dy.copy()
        fastbn.batch_norm_forward(x, a.gamma, a.beta, channel_axis=channel_axis, out=x)
        fastbn.batch_norm_backward(dy, a.x, a.gamma, expected["mean"], expected["invstd"],
                                   channel_axis=channel_axis, out=dy)
        assert_bitwise_equal(x, expected["y"], err_msg=f"y in place, {shape}")
        assert_bitwise_equal(dy, expected["dx"], err_msg=f"dx in place, {shape}")
        x = a.x.copy()
        fastbn.batch_norm_inference(x, a.gamma, a.beta, a.running_mean, a.running_var,
                                    channel_axis=channel_axis, out=x)
        assert_bitwise_equal(x, expected["inference y"], err_msg=f"inference in place, {shape}")


STREAMED = [
    ((8, 64, 56, 56), 1, np.float32),    # planar, one channel per group, long rows
    ((128, 256, 7, 7), 1, np.float32),   # planar, groups of 41 channels: slabs streamed whole;
                                         # inference, frozen dx: pieces across rows of 49 values
    ((96, 128, 7, 7), 1, np.float64),    # the same in float64 (pieces end on lines: 8 values)
    ((4, 3, 300, 300), 1, np.float32),   # planar by block
    ((4096, 512), 1, np.float32),        # columnar by row block, several rows per streamed piece
    ((1024, 600), 1, np.float64),        # columnar, rows longer than a streamed piece, float64
    ((256, 8192), 1, np.float32),        # columnar by tile, rows longer than a streamed piece
    ((64, 16500), 1, np.float32),        # columnar tiles of 2048 columns (forward) and 1024
                                         # (backward) streamed by pieces of 512
                                         # (TILE_PIECE_COLUMNS), the last tile narrower
    ((16, 32, 32, 64), -1, np.float32),  # channels last
    ((8, 64, 64, 64), 1, np.float16),    # 16-bit planar: pieces of float blocks, streamed
    ((8, 3, 300, 300), 1, "bfloat16"),   # 16-bit planar by block
    ((4096, 600), 1, np.float16),        # 16-bit columnar, rows longer than a float block
    ((16, 32, 32, 128), -1, "bfloat16"), # 16-bit channels last, several rows per float block
]


def streamed_param(shape, channel_axis, dtype):
    """A STREAMED row as a test parameter; bfloat16 rows skipped without ml_dtypes."""
    if dtype != "bfloat16":
        return pytest.param(shape, channel_axis, np.dtype(dtype),
                            id=f"{layout_id(shape, channel_axis)}-{np.dtype(dtype).name}")
    return pytest.param(shape, channel_axis, np.dtype(ml_dtypes.bfloat16) if ml_dtypes else None,
                        id=f"{layout_id(shape, channel_axis)}-bfloat16",
                        marks=pytest.mark.skipif(ml_dtypes is None, reason="needs ml_dtypes"))


@pytest.mark.parametrize("shape, channel_axis, dtype",
                         [streamed_param(s, ca, dt) for s, ca, dt in STREAMED])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_streamed_out_equals_fresh(shape, channel_axis, dtype, offset, rng):
    """Outputs of 4 MiB and more written to an ``out=`` buffer go through
    streaming stores, in pieces that end on cache lines; they equal the
    fresh (normally stored) results to the bit, with the buffer aligned to
    a cache line or one value off it, and nothing around it is written."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    assert a.x.nbytes >= 4 * 2**20
    expected = run_all(a, channel_axis, 2)
    size = np.dtype(dtype).itemsize
    pool = np.full(a.x.size + 64 // size * 2, np.nan, dtype)
    base = (-pool.ctypes.data % 64) // size + offset
    out = pool[base:base + a.x.size].reshape(shape)
    _, mean, invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, channel_axis=channel_axis,
                                                out=out, num_threads=2)
    assert_bitwise_equal(out, expected["y"], err_msg="y")
    fastbn.batch_norm_backward(a.dy, a.x, a.gamma, mean, invstd, channel_axis=channel_axis,
                               out=out, num_threads=2)
    assert_bitwise_equal(out, expected["dx"], err_msg="dx")
    fastbn.batch_norm_inference(a.x, a.gamma, a.beta, a.running_mean, a.running_var,
                                channel_axis=channel_axis, out=out, num_threads=2)
    assert_bitwise_equal(out, expected["inference y"], err_msg="inference y")
    for activation in (None, "relu", "leaky_relu"):   # the apply alone, from dy and x
        fresh = fastbn.batch_norm_backward(a.dy, a.x, a.gamma, mean, invstd, beta=a.beta,
                                           activation=activation, training=False,
                                           param_grads=False, channel_axis=channel_axis,
                                           num_threads=2)[0]
        fastbn.batch_norm_backward(a.dy, a.x, a.gamma, mean, invstd, beta=a.beta,
                                   activation=activation, training=False, param_grads=False,
                                   channel_axis=channel_axis, out=out, num_threads=2)
        assert_bitwise_equal(out, fresh, err_msg=f"frozen dx, activation {activation}")
    assert np.isnan(pool[:base]).all() and np.isnan(pool[base + a.x.size:]).all()


LEVEL_SCRIPT = """
import hashlib, sys
import numpy as np
import fastbn
from fastbn import _dispatch
print(_dispatch.level)
rng = np.random.default_rng(7)
digest = hashlib.sha256()
for shape, ca in [((8, 3, 40000), 1), ((16, 64, 7, 7), 1), ((4096, 64), 1), ((100, 3000), 1),
                  ((8, 10, 10, 24), -1)]:
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal(shape) * 3 + 1e3).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[ca]
        g, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        y, mean, invstd = fastbn.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv,
                                                    channel_axis=ca)
        dx, dg, db = fastbn.batch_norm_backward(dy, x, g, mean, invstd, channel_axis=ca)
        yi = fastbn.batch_norm_inference(x, g, b, rm, rv, channel_axis=ca)
        for a in (y, mean, invstd, rm, rv, dx, dg, db, yi):
            digest.update(a.tobytes())
print(digest.hexdigest())
"""


def test_every_kernel_level_gives_the_same_bits():
    """The baseline, x86-64-v3 and x86-64-v4 kernels (those this CPU runs)
    add in the same order and fuse no multiply-add: the same bits."""
    levels = ["baseline"] + [f"v{n}" for n in (3, 4) if fastbn._cpu.supports(n)]
    digests = {}
    for level in levels:
        child = same_fastbn()
        child["env"]["FASTBN_KERNELS"] = level
        done = subprocess.run([sys.executable, "-c", LEVEL_SCRIPT], capture_output=True,
                              text=True, timeout=300, **child)
        assert done.returncode == 0, done.stderr
        chosen, digest = done.stdout.splitlines()[-2:]
        digests[f"{level} ({chosen})"] = digest
    assert len(set(digests.values())) == 1, digests
