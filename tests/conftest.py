"""Shared helpers for the fastbn test suite.

Test modules import the helpers with ``from conftest import ...`` (pytest puts
this directory on ``sys.path``); the fixtures are found by pytest itself.

- :func:`make_inputs`: reproducible arrays for one call of every function;
- :func:`assert_close`: dtype-aware comparison with the float64 oracle;
- :func:`snapshot` / :func:`assert_unchanged`: byte copies of the caller's
  arrays, to check that a call modified nothing it should not have;
- the hypothesis profile ``fastbn`` (loaded here) and the ``--run-slow``
  option for the tests marked ``slow``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

DTYPES = (np.float32, np.float64)

# Relative tolerance per dtype, also used as the absolute tolerance relative
# to the largest magnitude of the expected values.
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}

THREADS = (1, 2, 3)


def dtype_id(dtype):
    """A short test id for a dtype: 'float32' or 'float64'."""
    return np.dtype(dtype).name


def layout_id(shape, channel_axis):
    """A short test id for a layout, e.g. '2x3x5-ca1'."""
    return "x".join(map(str, shape)) + f"-ca{channel_axis}"


def per_channel(v, ndim, channel_axis):
    """View a (C,) vector so that it broadcasts along ``channel_axis``."""
    shape = [1] * ndim
    shape[channel_axis % ndim] = -1
    return np.asarray(v).reshape(shape)


def make_inputs(shape, dtype, channel_axis=1, rng=None, *, offset=0.0, spread=1.0):
    """Arrays for one call of each function, all C-contiguous and of ``dtype``.

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
    return SimpleNamespace(
        C=C,
        x=x,
        dy=np.ascontiguousarray(rng.standard_normal(shape), dtype=dtype),
        gamma=rng.uniform(0.5, 1.5, C).astype(dtype) * rng.choice([-1, 1], C).astype(dtype),
        beta=rng.standard_normal(C).astype(dtype),
        running_mean=(offset + rng.standard_normal(C)).astype(dtype),
        running_var=rng.uniform(0.5, 2.0, C).astype(dtype) * spread**2,
        mean=mean.astype(dtype),
        invstd=(1.0 / np.sqrt(var + 1e-5)).astype(dtype),
    )


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


@pytest.fixture
def rng():
    """A fresh, seeded random generator per test."""
    return np.random.default_rng(20150211)  # arXiv:1502.03167, Feb 2015


# ------------------------------------------------------- hypothesis profile ----
#
# tests/test_properties.py runs under a fixed profile: derandomized (the
# examples are a function of the test's source, the same on every machine and
# every run), a modest number of examples, no deadline (CI machines are shared
# and the kernels' first calls pay for page faults) and no example database.
# FASTBN_HYPOTHESIS_PROFILE=fastbn-thorough runs many more random examples.

try:
    from hypothesis import HealthCheck
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # hypothesis is a test extra; test_properties.py skips without it
    pass
else:
    _hypothesis_settings.register_profile(
        "fastbn", derandomize=True, max_examples=100, deadline=None, database=None,
        print_blob=True, suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])
    _hypothesis_settings.register_profile(
        "fastbn-thorough", parent=_hypothesis_settings.get_profile("fastbn"),
        derandomize=False, max_examples=1000)
    _hypothesis_settings.load_profile(os.environ.get("FASTBN_HYPOTHESIS_PROFILE", "fastbn"))


# --------------------------------------------------------------- slow tests ----
#
# Tests marked ``slow`` (tests/test_huge.py: arrays of more than 2**31
# elements) run only with ``--run-slow``; otherwise they are skipped and say so.

def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (huge arrays, minutes, ~20 GB)")


def pytest_configure(config):
    # Registered here too, so that the suite runs without the repository's
    # pyproject.toml (scripts/check_artifacts.sh runs a copy of tests/ alone).
    config.addinivalue_line("markers", "slow: long-running or memory-hungry tests "
                                       "(run with --run-slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def same_fastbn():
    """subprocess.run arguments that make a child Python import the very fastbn
    this process imported (an installed wheel or an in-place build), never a
    source tree that happens to be the working directory."""
    import pathlib

    import fastbn

    here = pathlib.Path(__file__).parent
    home = str(pathlib.Path(fastbn.__file__).resolve().parents[1])
    return {"cwd": here, "env": {**os.environ, "PYTHONPATH": home}}
