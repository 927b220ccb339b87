"""pytest's own configuration for the fastbn test suite.

- the ``rng`` fixture: a fresh, seeded random generator per test;
- the hypothesis profile ``fastbn`` (registered and loaded here);
- the ``--run-slow`` option and the ``slow`` marker; the ``kernels`` marker (.ci/run's
  run at another kernel level selects its tests with it).

The helpers that test modules share are in ``helpers.py``
(``from helpers import ...``), not here.
"""

from __future__ import annotations

import os

import numpy as np
import pytest


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
    config.addinivalue_line("markers", "kernels: the tests of the kernels' results, run again "
                                       "at every kernel level in CI")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

