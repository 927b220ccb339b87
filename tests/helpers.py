"""The shared helpers of the fastbn test suite (not a test module).

Test modules import them with ``from helpers import ...``: pytest puts the
directory of the test files (and of conftest.py) on ``sys.path``, from the
repository root and from a copy of ``tests/`` run alone alike. Test modules
never import each other; a helper that more than one of them needs lives here.

- :data:`DTYPES`, :data:`TOLERANCE`, :data:`THREADS` and the test ids
  :func:`dtype_id`, :func:`layout_id`;
- :func:`make_inputs`: reproducible arrays for one call of every function;
  :func:`away_from_the_kink`: beta moved so that no activation input is near 0,
  :func:`activated_case`: such inputs with the activated output y;
- :func:`assert_close`, :func:`dx_scale`, :func:`assert_grads_close`:
  dtype-aware comparison with the float64 oracle; :func:`assert_bitwise_equal`;
- :func:`snapshot` / :func:`assert_unchanged`: byte copies of the caller's
  arrays, to check that a call modified nothing it should not have;
- :func:`valid_args` / :func:`call`: a valid call of each function (of
  :data:`FUNCTIONS`, and ``"backward_from_output"``) with every argument
  given by name, to change one argument at a time; :func:`read_only`;
- :data:`STRIDED_LAYOUTS`, :func:`strided_vector`: the same values in
  non-contiguous views;
- :func:`numeric_gradient` (central differences), :func:`peak_bytes`
  (tracemalloc), :func:`same_fastbn` (a child Python that imports this fastbn);
- :class:`FakeGroup`, :func:`run_ranks`, :func:`values`: K threads standing for
  K ranks of the synchronized passes, joined by a fake all-reduce.
"""

from __future__ import annotations

import os
import pathlib
import threading
import tracemalloc
from types import SimpleNamespace

import numpy as np

import fastbn
from fastbn import reference
from fastbn.distributed import merge_records

DTYPES = (np.float32, np.float64)

# Relative tolerance per dtype, also used as the absolute tolerance relative
# to the largest magnitude of the expected values.
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}

THREADS = (1, 2, 3)

#: (shape, channel_axis): one input per kernel schedule, for the tests of a
#: feature that every schedule carries
SCHEDULE_LAYOUTS = [
    ((3, 4, 5, 7), 1),       # planar, by channel group
    ((2, 3, 40000), 1),      # planar, by (channel, block)
    ((2, 3, 5, 2, 3), -1),   # channels last, 5-D
    ((4099, 40), 1),         # columnar, by row block
    ((3, 90001), 1),         # columnar, few rows: chunks of one tile, shared out to threads
    ((5, 3), 1),             # columnar, tiny
]


def under_asan():
    """AddressSanitizer is loaded in this process (scripts/sanitize.sh, and
    so in its children): its allocator keeps freed memory in quarantine, so
    resident sizes and page faults do not measure fastbn there."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


def dtype_id(dtype):
    """A short test id for a dtype: 'float32' or 'float64'."""
    return np.dtype(dtype).name


def layout_id(shape, channel_axis):
    """A short test id for a layout, e.g. '2x3x5-ca1'."""
    return "x".join(map(str, shape)) + f"-ca{channel_axis}"


# ------------------------------------------------------------------ inputs ----

def per_channel(v, ndim, channel_axis):
    """View a (C,) vector so that it broadcasts along ``channel_axis``."""
    shape = [1] * ndim
    shape[channel_axis % ndim] = -1
    return np.asarray(v).reshape(shape)


def make_inputs(shape, dtype, channel_axis=1, rng=None, *, offset=0.0, spread=1.0):
    """Arrays for one call of each function, all C-contiguous: x and dy of
    ``dtype``, the per-channel arrays of its parameter dtype (float32 for
    float16 and bfloat16).

    Every channel gets its own mean (about ``offset``) and standard deviation
    (about ``spread``), so that per-channel mistakes show. Returns a
    namespace with x, dy, gamma, beta, running_mean, running_var (positive),
    mean and invstd (x's batch statistics from the reference, for the
    backward) and C.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    dtype = np.dtype(dtype)
    ndim = len(shape)
    C = shape[channel_axis % ndim]
    centers = offset + rng.uniform(-2.0, 2.0, C)
    scales = spread * rng.uniform(0.5, 2.0, C)
    x = (per_channel(centers, ndim, channel_axis)
         + per_channel(scales, ndim, channel_axis) * rng.standard_normal(shape))
    x = np.ascontiguousarray(x, dtype=dtype)
    axes = tuple(a for a in range(ndim) if a != channel_axis % ndim)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes)
    var = x64.var(axis=axes)
    p = np.dtype(np.float64 if dtype == np.float64 else np.float32)  # float32 for 16-bit x
    return SimpleNamespace(
        C=C,
        x=x,
        dy=np.ascontiguousarray(rng.standard_normal(shape), dtype=dtype),
        gamma=rng.uniform(0.5, 1.5, C).astype(p) * rng.choice([-1, 1], C).astype(p),
        beta=rng.standard_normal(C).astype(p),
        running_mean=(offset + rng.standard_normal(C)).astype(p),
        running_var=rng.uniform(0.5, 2.0, C).astype(p) * spread**2,
        mean=mean.astype(p),
        invstd=(1.0 / np.sqrt(var + 1e-5)).astype(p),
    )


def away_from_the_kink(a, channel_axis, margin=1e-5):
    """Shift ``a.beta`` (by a few ``margin`` per channel) so that no ``z = gamma *
    (x - mean) * invstd + beta``, the input of a fused activation, lies within
    ``margin`` of 0. x, mean and invstd are left as they are. Returns ``a``.

    The activation's derivative jumps at z = 0, so a rounding of z there flips
    the gradient of one element between two correct implementations; tests that
    compare gradients at a tolerance use inputs clear of it.
    """
    ndim = a.x.ndim
    axes = tuple(i for i in range(ndim) if i != channel_axis % ndim)
    v = ((a.x.astype(np.float64) - per_channel(a.mean.astype(np.float64), ndim, channel_axis))
         * per_channel(a.invstd.astype(np.float64) * a.gamma, ndim, channel_axis))
    beta = a.beta.astype(np.float64)
    unresolved = np.ones(a.C, bool)
    for k in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6, 7, -7, 8, -8):
        candidate = beta + 3 * k * margin
        clear = (np.abs(v + per_channel(candidate, ndim, channel_axis)) >= 2 * margin).all(
            axis=axes)
        beta = np.where(unresolved & clear, candidate, beta)
        unresolved &= ~clear
    a.beta = beta.astype(a.beta.dtype)
    z = v + per_channel(a.beta.astype(np.float64), ndim, channel_axis)
    assert not unresolved.any() and np.abs(z).min() >= margin, "no beta clear of the kink"
    return a


def activated_case(shape, dtype, channel_axis, activation, slope, rng=None):
    """:func:`make_inputs` clear of the kink (:func:`away_from_the_kink`), with
    mean and invstd from fastbn's forward and ``y``, that forward's output
    with the fused ``activation``: inputs for the backward of an activation."""
    a = make_inputs(shape, dtype, channel_axis, rng)
    _, a.mean, a.invstd = fastbn.batch_norm_forward(a.x, a.gamma, a.beta,
                                                    channel_axis=channel_axis)
    away_from_the_kink(a, channel_axis)
    a.y = fastbn.batch_norm_forward(a.x, a.gamma, a.beta, activation=activation,
                                    negative_slope=slope, channel_axis=channel_axis)[0]
    return a


# -------------------------------------------------------------- comparing ----

def assert_close(actual, expected, dtype=None, *, rtol=None, scale=None, err_msg=""):
    """``actual`` equals ``expected`` to the tolerance of ``dtype``.

    The tolerance is relative (``rtol``, by default :data:`TOLERANCE` of
    the dtype) and absolute at ``rtol * scale``, where ``scale`` defaults to
    the largest finite magnitude of ``expected`` (at least the smallest
    normal number). NaN must be where NaN is expected; shapes must agree.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = np.dtype(actual.dtype if dtype is None else dtype)
    assert actual.shape == expected.shape, (
        f"shape {actual.shape} != expected {expected.shape}. {err_msg}")
    rtol = TOLERANCE[dtype] if rtol is None else rtol
    if scale is None:
        finite = np.abs(expected[np.isfinite(expected)].astype(np.float64))
        scale = max(finite.max(initial=0.0), np.finfo(dtype).tiny)
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                               rtol=rtol, atol=rtol * scale, equal_nan=True,
                               err_msg=err_msg)


def dx_scale(dy, gamma, invstd):
    """The magnitude of the terms that make up dx: max|gamma * invstd| * max|dy|.

    dx = gamma*invstd/m * (m*dy - dbeta - xhat*dgamma) is a difference of
    terms of this size, which cancel entirely when a channel has two values;
    its rounding error is relative to them, not to dx.
    """
    g = np.ones_like(invstd) if gamma is None else gamma
    gi = np.abs(np.asarray(g, np.float64) * np.asarray(invstd, np.float64))
    dy = np.abs(np.asarray(dy, np.float64))
    return gi[np.isfinite(gi)].max(initial=0.0) * dy[np.isfinite(dy)].max(initial=0.0)


def assert_grads_close(got, want, dtype, dy, gamma, invstd, what=""):
    """A backward's (dx, dgamma, dbeta) equal ``want`` to the tolerance of dtype:
    dx at the scale of its terms (:func:`dx_scale`), dgamma and dbeta at their
    own, with shape (C,) and the dtype; None where ``want`` has None."""
    assert_close(got[0], want[0], dtype, scale=dx_scale(dy, gamma, invstd), err_msg=f"dx {what}")
    for g, w, name in zip(got[1:], want[1:], ("dgamma", "dbeta")):
        if w is None:
            assert g is None, name
        else:
            assert g.shape == w.shape and g.dtype == np.dtype(dtype), name
            assert_close(g, w, dtype, err_msg=f"{name} {what}")


def assert_bitwise_equal(actual, expected, err_msg=""):
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{actual.dtype} != {expected.dtype}. {err_msg}"
    assert actual.shape == expected.shape, f"{actual.shape} != {expected.shape}. {err_msg}"
    if actual.tobytes() != expected.tobytes():
        differ = np.count_nonzero(actual.view(np.uint8) != expected.view(np.uint8))
        raise AssertionError(f"not bitwise equal ({differ} bytes differ). {err_msg}\n"
                             f"actual:   {actual.ravel()[:8]}\nexpected: {expected.ravel()[:8]}")


def snapshot(**arrays):
    """Byte copies of every ndarray among ``arrays`` (name -> value)."""
    return {name: (a, a.dtype, a.shape, a.tobytes()) for name, a in arrays.items()
            if isinstance(a, np.ndarray)}


def assert_unchanged(snap):
    """Every array of ``snapshot`` still holds exactly the bytes it held."""
    for name, (a, dtype, shape, data) in snap.items():
        assert a.dtype == dtype and a.shape == shape, f"{name} changed dtype or shape"
        assert a.tobytes() == data, f"{name} was modified"


# ---------------------------------------- one call, every argument by name ----

SHAPE = (4, 3, 5, 2)   # 4-D, so that channel_axis = 2 is wrong; C = 3
C = 3

FUNCTIONS = ("forward", "inference", "backward")
FASTBN = {
    "forward": fastbn.batch_norm_forward,
    "inference": fastbn.batch_norm_inference,
    "backward": fastbn.batch_norm_backward,
    "backward_from_output": fastbn.batch_norm_backward_from_output,
}
REFERENCE = {
    "forward": reference.batch_norm_forward,
    "inference": reference.batch_norm_inference,
    "backward": reference.batch_norm_backward,
    "backward_from_output": reference.batch_norm_backward_from_output,
}
POSITIONAL = {
    "forward": ("x", "gamma", "beta"),
    "inference": ("x", "gamma", "beta", "running_mean", "running_var"),
    "backward": ("dy", "x", "gamma", "mean", "invstd"),
    "backward_from_output": ("dy", "y", "gamma", "beta", "invstd"),
}


def valid_args(func, shape=SHAPE, dtype=np.float32, channel_axis=1):
    """Every argument of a valid call of ``func`` (by name), with an out buffer.

    ``"backward_from_output"`` gets y from a forward with leaky_relu (slope 0.1)."""
    a = make_inputs(shape, dtype, channel_axis, np.random.default_rng(0))
    common = dict(channel_axis=channel_axis, out=np.empty_like(a.x), num_threads=2)
    if func == "forward":
        return dict(x=a.x, gamma=a.gamma, beta=a.beta, eps=1e-5, running_mean=a.running_mean,
                    running_var=a.running_var, momentum=0.1,
                    num_batches_tracked=np.array(0, dtype=np.int64), **common)
    if func == "inference":
        return dict(x=a.x, gamma=a.gamma, beta=a.beta, running_mean=a.running_mean,
                    running_var=a.running_var, eps=1e-5, **common)
    if func == "backward_from_output":
        y = reference.batch_norm_forward(a.x, a.gamma, a.beta, activation="leaky_relu",
                                         negative_slope=0.1, channel_axis=channel_axis)[0]
        return dict(dy=a.dy, y=y, gamma=a.gamma, beta=a.beta, invstd=a.invstd,
                    activation="leaky_relu", negative_slope=0.1, **common)
    return dict(dy=a.dy, x=a.x, gamma=a.gamma, mean=a.mean, invstd=a.invstd, **common)


def call(func, args, impl=FASTBN):
    """Call ``func`` (fastbn's or the reference's) with the arguments by name."""
    positional = [args[name] for name in POSITIONAL[func]]
    keywords = {k: v for k, v in args.items() if k not in POSITIONAL[func]}
    return impl[func](*positional, **keywords)


def read_only(a):
    """A read-only copy of a."""
    a = a.copy()
    a.flags.writeable = False
    return a


# ----------------------------------------------------- non-contiguous views ----

def strided_view(a):
    """a's values in a view with a step of 2 along the last axis."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    return wide[..., ::2]


def transposed_view(a):
    """a's values in a view of memory laid out with the axes reversed."""
    return np.ascontiguousarray(a.T).T


def reversed_view(a):
    """a's values in a view with a negative stride along axis 0."""
    return np.ascontiguousarray(a[::-1])[::-1]


def strided_vector(v):
    """v's values (1-D) in a view with a step of 2."""
    wide = np.zeros(2 * v.size, v.dtype)
    wide[::2] = v
    return wide[::2]


# Non-contiguous views of arrays of 2 or more dimensions, by name.
STRIDED_LAYOUTS = {
    "strided": strided_view,
    "fortran": np.asfortranarray,
    "transposed": transposed_view,
    "reversed": reversed_view,
}


# ------------------------------------------------------------------ other ----

NUMERIC_STEP = 1e-6    # central-difference step, relative to the input's magnitude


def numeric_gradient(loss, a):
    """Central differences of ``loss()`` with respect to every element of ``a``."""
    grad = np.empty_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        h = NUMERIC_STEP * max(1.0, abs(orig))
        flat[i] = orig + h
        plus = loss()
        flat[i] = orig - h
        minus = loss()
        flat[i] = orig
        gflat[i] = (plus - minus) / (2 * h)
    return grad


def peak_bytes(thunk):
    """The peak of traced allocations while ``thunk()`` runs (after a warm-up call)."""
    thunk()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        thunk()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def same_fastbn():
    """subprocess.run arguments that make a child Python import the very fastbn
    this process imported (an installed wheel or an in-place build), never a
    source tree that happens to be the working directory."""
    here = pathlib.Path(__file__).parent
    home = str(pathlib.Path(fastbn.__file__).resolve().parents[1])
    return {"cwd": here, "env": {**os.environ, "PYTHONPATH": home}}


# ------------------------------------------------------------- fake ranks ----

class FakeGroup:
    """K ranks as threads; ``member(rank)`` is that rank's allreduce callable.

    Each call deposits the rank's records, waits for every rank, lets rank 0
    merge them in the group's order (sequential, reversed or pairwise tree)
    and hands every rank the result. A rank that never arrives breaks the
    barrier after ``timeout`` seconds, so a hang fails the test.
    """

    def __init__(self, size, order="sequential", timeout=30):
        self.size = size
        self.order = order
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots = [None] * size
        self.calls = 0
        self.result = None

    def merge(self, records):
        if self.order == "reversed":
            records = records[::-1]
        if self.order == "tree":
            while len(records) > 1:
                pairs = [merge_records(records[i], records[i + 1].copy())
                         for i in range(0, len(records) - 1, 2)]
                records = pairs + ([records[-1]] if len(records) % 2 else [])
            return records[0]
        acc = records[0].copy()
        for other in records[1:]:
            merge_records(other, acc)
        return acc

    def member(self, rank):
        group = self

        class Allreduce:
            def __init__(self):
                self.rank, self.size = rank, group.size

            def __call__(self, records):
                group.slots[rank] = records.copy()
                group.barrier.wait()
                if rank == 0:
                    group.result = group.merge(list(group.slots))
                    group.calls += 1
                group.barrier.wait()
                records[...] = group.result
                group.barrier.wait()

        return Allreduce()


def run_ranks(size, work, order="sequential"):
    """work(rank, allreduce) on ``size`` threads; the results (or exceptions) by rank."""
    group = FakeGroup(size, order)
    results = [None] * size

    def target(rank):
        try:
            results[rank] = work(rank, group.member(rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return results, group


def values(results):
    for r, result in enumerate(results):
        if isinstance(result, BaseException):
            raise AssertionError(f"rank {r} raised {result!r}") from result
    return results
