"""Forked processes and the thread cap.

After a multi-threaded call in the parent, a child made by ``fork()`` has no
OpenMP workers; fastbn's at-fork handler makes it run on one thread instead
of waiting for them forever (the results are the same bits). The cap of four
threads per processor applies to the OpenMP default too, whatever
``OMP_NUM_THREADS`` says. Each child runs under a time limit, so a hang
fails the test instead of stalling the suite.
"""

import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import fastbn
from fastbn import _openmp

from helpers import assert_bitwise_equal, same_fastbn

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

SHAPE = (8, 64, 32, 32)  # 524288 values: two threads where OpenMP is on
LIMIT_S = 60


def _inputs():
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    return x, np.linspace(0.5, 1.5, SHAPE[1], dtype=np.float32)


def _forward(_=None):
    x, gamma = _inputs()
    y, _, _ = fastbn.batch_norm_forward(x, gamma, None)
    return y


def test_fork_after_threaded_call_does_not_hang():
    """os.fork: the child's first (multi-threaded) call returns, on one
    thread, with the parent's bits."""
    x, gamma = _inputs()
    expected = fastbn.batch_norm_forward(x, gamma, None, num_threads=2)[0]
    pid = os.fork()
    if pid == 0:  # the child: answer with its exit status, never return into pytest
        status = 1
        try:
            y = fastbn.batch_norm_forward(x, gamma, None, num_threads=2)[0]
            same = np.array_equal(y.view(np.uint32), expected.view(np.uint32))
            status = 3 if not _openmp.in_forked_child() else (0 if same else 2)
        finally:
            os._exit(status)
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail(f"the forked child hung for {LIMIT_S} s in its first call")
    code = os.waitstatus_to_exitcode(status)
    assert code != 3, "the child was not marked as forked"
    assert code != 2, "the child's result differs from the parent's"
    assert code == 0
    assert not _openmp.in_forked_child()


def test_fork_pool_after_threaded_call_does_not_hang():
    """A fork-context multiprocessing pool (a data loader, a grid search)
    started after a multi-threaded call."""
    expected = _forward()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map_async(_forward, range(4)).get(timeout=LIMIT_S)
    for y in results:
        assert_bitwise_equal(y, expected)


def test_default_thread_count_is_capped():
    """OMP_NUM_THREADS far above the processors: num_threads=None is capped
    at four threads per processor, and a call runs."""
    code = ("import fastbn, numpy as np, os\n"
            "from fastbn import _openmp\n"
            "n = _openmp.effective_num_threads(None)\n"
            "x = np.ones((8, 64, 32, 32), np.float32)\n"
            "fastbn.batch_norm_forward(x, None, None)\n"
            "print(n, os.cpu_count())\n")
    child = same_fastbn()
    child["env"]["OMP_NUM_THREADS"] = "5000"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=LIMIT_S, **child)
    assert result.returncode == 0, result.stderr
    n, cpus = map(int, result.stdout.split())
    assert 1 <= n <= 4 * cpus
