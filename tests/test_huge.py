"""Huge arrays: more than 2**31 elements, normalized in place (64-bit indexing).

One float32 buffer of 2,148,532,224 elements (8.6 GB, 2**31 + 1,048,576) is
viewed in turn as each kernel schedule's input, filled with a deterministic
pattern and normalized in place (``out=x``):

========================  =====================  ===========  ======================
view                      kernel, schedule       num_threads  past 2**31
========================  =====================  ===========  ======================
(683, 3, 1048576)         planar, by block       2            channel 2 of the last row
(683, 3, 1048576)         planar, by channel     3            the same
(174848, 3, 4096)         planar, whole rows     2            the last 512 rows
(33570816, 64)            columnar, row blocks   2            the last 16384 rows
(128, 16785408)           columnar, by tile      2            the end of the last row
========================  =====================  ===========  ======================

For each: the batch mean and invstd of every channel against float64 sums
taken chunk by chunk with NumPy; the running statistics; y on the first, a
middle and the last rows (those past element 2**31) against the float64
formula; then the inference in place on the result, checked the same way.
The backward in place (``out=dy``) needs a second buffer (17.2 GB for the
two) and runs on the planar and columnar row-block views when the memory is
there.

One more test runs first, in a child process: ``num_threads=10**6`` on 2**32
values must not kill the process (the count is capped at four threads per
processor; uncapped, libgomp failed to create the threads and exited).

Everything here is marked ``slow``: it runs with ``--run-slow`` (``.ci/run``
does) and is skipped, saying why, when MemAvailable in /proc/meminfo is
short: 11.6 GB for the forward tests, 8.6 + 2.5 GB more with the first
buffer alive for the backward's. About 5 minutes on 2 busy cores.

The data: ``x[r, c, s] = base[c] + scale[c] * (ripple[s] + drift(r))``, in
float32, where drift is not periodic (it grows with r), so a read or write
that wrapped at 2**31 would land on values of another row and channel and
change the statistics of the channel far beyond the tolerance.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastbn
from helpers import same_fastbn

pytestmark = pytest.mark.slow

TOTAL = 683 * 3 * 2**20          # 2,148,532,224 > 2**31
GB = 1e9
FORWARD_VIEWS = [
    pytest.param((683, 3, 2**20), 1, 2, id="planar-by-block"),
    pytest.param((683, 3, 2**20), 1, 3, id="planar-by-channel"),
    pytest.param((174848, 3, 4096), 1, 2, id="planar-whole-rows"),
    pytest.param((33570816, 64), 1, 2, id="columnar-row-blocks"),
    pytest.param((128, 16785408), 1, 2, id="columnar-by-tile"),
]
BACKWARD_VIEWS = [FORWARD_VIEWS[0], FORWARD_VIEWS[3]]
EPS = 1e-5
MOMENTUM = 0.1


def mem_available():
    """MemAvailable from /proc/meminfo, in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def require_memory(nbytes, what):
    have = mem_available()
    if have < nbytes:
        pytest.skip(f"{what} needs {nbytes / GB:.1f} GB of available memory; "
                    f"MemAvailable is {have / GB:.1f} GB")


# ------------------------------------------------------------- the pattern ----

class Pattern:
    """Deterministic float32 data for an (R, C, S) view, made row chunk by row chunk."""

    def __init__(self, R, C, S, seed):
        c = np.arange(C)
        self.R, self.C, self.S = R, C, S
        self.base = (((c * (37 + 2 * seed)) % 101) - 50).astype(np.float32)
        self.scale = (0.5 + (c % 7) * 0.25).astype(np.float32)
        self.ripple = (np.random.default_rng(seed).uniform(-1, 1, S).astype(np.float32)
                       if S > 1 else np.zeros(1, np.float32))
        self.mult = 7919 + 2 * seed

    def drift(self, r0, r1):
        r = np.arange(r0, r1, dtype=np.int64)
        return (((r * self.mult) % 10007) / 10007 - 0.5 + 0.25 * r / self.R).astype(np.float32)

    def fill(self, out, r0):
        """out (k, C, S): rows r0 .. r0 + k of the pattern."""
        np.add(self.ripple[None, None, :], self.drift(r0, r0 + len(out))[:, None, None],
               out=out)
        out *= self.scale[None, :, None]
        out += self.base[None, :, None]

    def rows(self, r0, r1):
        out = np.empty((r1 - r0, self.C, self.S), np.float32)
        self.fill(out, r0)
        return out


def row_chunks(R, row_elements, target=2**23):
    k = max(1, target // row_elements)
    return [(r0, min(R, r0 + k)) for r0 in range(0, R, k)]


def for_chunks(view3, work, combine=None):
    """work(r0, r1) over row chunks of an (R, C, S) view on 2 threads; results are
    combined in chunk order (so the sums do not depend on the timing)."""
    chunks = row_chunks(view3.shape[0], view3.shape[1] * view3.shape[2])
    total = None
    with ThreadPoolExecutor(2) as pool:
        for i in range(0, len(chunks), 2):
            results = list(pool.map(lambda rr: work(*rr), chunks[i:i + 2]))
            if combine is not None:
                for r in results:
                    total = r if total is None else combine(total, r)
    return total


def fill(view3, pattern):
    for_chunks(view3, lambda r0, r1: pattern.fill(view3[r0:r1], r0))


def channel_stats(view3, pattern):
    """float64 mean and biased variance of every channel, summed chunk by chunk
    around the pattern's base (so the sums keep their digits)."""
    base = pattern.base.astype(np.float64)[None, :, None]

    def work(r0, r1):
        d = view3[r0:r1].astype(np.float64)
        d -= base
        return np.stack([d.sum(axis=(0, 2)), np.einsum("kcs,kcs->c", d, d)])

    s = for_chunks(view3, work, np.add)
    m = view3.shape[0] * view3.shape[2]
    mean = s[0] / m
    return pattern.base + mean, s[1] / m - mean**2, m


def spot_rows(R):
    """The rows the spot checks look at: first, middle and the last ones."""
    k = 2 if R < 1000 else 64
    return [(0, k), (R // 2, R // 2 + k), (R - k, R)]


def per_channel(v):
    return np.asarray(v, np.float64)[None, :, None]


def assert_within(got, want, rtol, atol, what):
    """|got - want| <= rtol * |want| + atol elementwise (atol may be per element)."""
    err = np.abs(np.asarray(got, np.float64) - want)
    bad = err > rtol * np.abs(want) + atol
    assert not bad.any(), (f"{what}: {np.count_nonzero(bad)} values off, the first at "
                           f"{np.argwhere(bad)[0]}: {np.asarray(got)[bad][0]} != {want[bad][0]}")


def assert_y(got, x, center, scale, offset, what):
    """float32 y against (x - center) * scale + offset in float64."""
    want = (x.astype(np.float64) - per_channel(center)) * per_channel(scale) + per_channel(
        offset)
    err = np.abs(got.astype(np.float64) - want)
    bound = 4e-7 * np.abs(want) + 2e-6 * np.abs(per_channel(scale)) * per_channel(
        np.maximum(np.abs(center), 1))
    assert (err <= bound).all(), (
        f"{what}: max error {err.max()} at {np.unravel_index(err.argmax(), err.shape)}")


CRASH_SCRIPT = """
import os, threading, time
import numpy as np
import fastbn

def watchdog():    # once the kernel writes 2 GB it runs: stop there, successfully
    while True:
        if int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") > 2e9:
            print("the kernel is running", flush=True)
            os._exit(3)
        time.sleep(0.01)

try:
    x = np.zeros((2**15, 1, 2**17), np.float32)      # 2**32 values, not yet touched
except MemoryError:
    os._exit(4)
threading.Thread(target=watchdog, daemon=True).start()
rm, rv = np.zeros(1, np.float32), np.ones(1, np.float32)
fastbn.batch_norm_inference(x, None, None, rm, rv, num_threads=10**6, out=x)
print("returned", flush=True)
os._exit(3)
"""


@pytest.mark.skipif(not fastbn._openmp.openmp_enabled(),
                    reason="a serial build (FASTBN_OPENMP=0) starts no threads")
def test_a_huge_num_threads_on_a_huge_array_does_not_kill_the_process():
    """num_threads=10**6 (accepted: it is a cap) on 2**32 float32 values, in a child
    process. The array is calloc'd and untouched, so it costs memory only as the
    kernel writes it; a watchdog ends the child successfully once the kernel has
    written 2 GB. First in the module, before the 8.6 GB buffers exist."""
    require_memory(3 * GB, "the child's first 2 GB")
    done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT], capture_output=True,
                          text=True, timeout=600, **same_fastbn())
    if done.returncode == 4:
        pytest.skip("the system would not reserve 17 GB of address space")
    assert done.returncode == 3, f"exit status {done.returncode}: {done.stderr.strip()}"


# ---------------------------------------------------------------- fixtures ----

@pytest.fixture(scope="module")
def buffer():
    """The 8.6 GB float32 buffer, shared by every test of the module."""
    require_memory(TOTAL * 4 + 3 * GB, "a float32 array of 2**31 + 2**20 elements")
    buf = np.empty(TOTAL, np.float32)
    yield buf
    del buf


@pytest.fixture(scope="module")
def second_buffer(buffer):
    """A second 8.6 GB buffer, for dy in the backward."""
    require_memory(TOTAL * 4 + 2.5 * GB, "the backward's second array (17.2 GB for both)")
    buf = np.empty(TOTAL, np.float32)
    yield buf
    del buf


def as3(shape):
    """The (R, C, S) form of a view shape (columnar views have S = 1)."""
    return shape if len(shape) == 3 else (shape[0], shape[1], 1)


# ------------------------------------------------------------------- tests ----

@pytest.mark.parametrize("shape, channel_axis, num_threads", FORWARD_VIEWS)
def test_forward_then_inference_in_place(buffer, shape, channel_axis, num_threads):
    R, C, S = as3(shape)
    x = buffer.reshape(shape)
    x3 = buffer.reshape(R, C, S)
    pattern = Pattern(R, C, S, seed=1)
    fill(x3, pattern)
    mean64, var64, m = channel_stats(x3, pattern)
    invstd64 = 1 / np.sqrt(var64 + EPS)

    gamma = (1 + (np.arange(C) % 5) * 0.5).astype(np.float32)
    beta = ((np.arange(C) % 3) - 1).astype(np.float32)
    running_mean = np.full(C, 0.5, np.float32)
    running_var = np.full(C, 2.0, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(
        x, gamma, beta, eps=EPS, running_mean=running_mean, running_var=running_var,
        momentum=MOMENTUM, channel_axis=channel_axis, out=x, num_threads=num_threads)
    assert y is x

    assert_within(mean, mean64, 2e-7, 1e-6 * np.sqrt(var64), "mean")
    np.testing.assert_allclose(invstd, invstd64, rtol=1e-6, err_msg="invstd")
    np.testing.assert_allclose(running_mean, 0.9 * 0.5 + MOMENTUM * mean64, rtol=1e-6,
                               atol=1e-6, err_msg="running_mean")
    np.testing.assert_allclose(running_var, 0.9 * 2.0 + MOMENTUM * var64 * m / (m - 1),
                               rtol=1e-6, err_msg="running_var")

    saved = {}
    for r0, r1 in spot_rows(R):
        assert_y(x3[r0:r1], pattern.rows(r0, r1), mean64, invstd64 * gamma, beta,
                 f"y rows {r0}:{r1}")
        saved[r0] = x3[r0:r1].copy()

    fastbn.batch_norm_inference(x, gamma, beta, running_mean, running_var, eps=EPS,
                                channel_axis=channel_axis, out=x, num_threads=num_threads)
    scale = gamma / np.sqrt(running_var.astype(np.float64) + EPS)
    for r0, r1 in spot_rows(R):
        assert_y(x3[r0:r1], saved[r0], running_mean, scale, beta,
                 f"inference y rows {r0}:{r1}")


@pytest.mark.parametrize("shape, channel_axis, num_threads", BACKWARD_VIEWS)
def test_backward_in_place(buffer, second_buffer, shape, channel_axis, num_threads):
    R, C, S = as3(shape)
    x = buffer.reshape(shape)
    dy = second_buffer.reshape(shape)
    x3, dy3 = buffer.reshape(R, C, S), second_buffer.reshape(R, C, S)
    px, pdy = Pattern(R, C, S, seed=1), Pattern(R, C, S, seed=2)
    fill(x3, px)
    fill(dy3, pdy)
    mean64, var64, m = channel_stats(x3, px)
    mean = mean64.astype(np.float32)
    invstd = (1 / np.sqrt(var64 + EPS)).astype(np.float32)
    gamma = (1 + (np.arange(C) % 5) * 0.5).astype(np.float32)

    center = per_channel(mean)

    def work(r0, r1):
        g = dy3[r0:r1].astype(np.float64)
        return np.stack([g.sum(axis=(0, 2)),
                         np.einsum("kcs,kcs->c", g, x3[r0:r1].astype(np.float64) - center)])

    sums = for_chunks(dy3, work, np.add)
    dbeta64 = sums[0]
    dgamma64 = invstd.astype(np.float64) * sums[1]

    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, x, gamma, mean, invstd, channel_axis=channel_axis, out=dy, num_threads=num_threads)
    assert dx is dy
    sd = np.sqrt(m)          # sums of m terms of order 1: their rounding scale
    np.testing.assert_allclose(dbeta, dbeta64, rtol=1e-6, atol=1e-6 * sd, err_msg="dbeta")
    np.testing.assert_allclose(dgamma, dgamma64, rtol=1e-6, atol=1e-6 * sd, err_msg="dgamma")

    # dx = a*dy - b*(x - mean) - c, a = gamma*invstd, b = a*invstd*dgamma/m, c = a*dbeta/m
    a = gamma.astype(np.float64) * invstd
    b = a * invstd.astype(np.float64) * dgamma64 / m
    c = a * dbeta64 / m
    for r0, r1 in spot_rows(R):
        want = (per_channel(a) * pdy.rows(r0, r1)
                - per_channel(b) * (px.rows(r0, r1) - center) - per_channel(c))
        dyr, xr = pdy.rows(r0, r1), px.rows(r0, r1)
        terms = (per_channel(np.abs(a)) * np.abs(dyr)
                 + per_channel(np.abs(b)) * np.abs(xr - center) + per_channel(np.abs(c)))
        err = np.abs(dy3[r0:r1] - want)
        bound = 1e-6 * terms
        assert (err <= bound).all(), f"dx rows {r0}:{r1}: max error {err.max()}"
