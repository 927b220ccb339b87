"""Two OpenMP runtimes in one process: fastbn's and PyTorch's.

fastbn's binary wheel carries its own libgomp (``fastbn.libs/``), as
scikit-learn's wheels do; PyTorch's wheel carries another
(``torch/lib/libgomp.so.1``) and loads it into the process's global symbol
scope. Imported first, a wheel's fastbn runs on its own runtime beside
PyTorch's: two thread pools. Imported after PyTorch, its OpenMP calls bind to
PyTorch's runtime, as do those of a build from source in either order (the
dynamic loader shares the system's ``libgomp.so.1`` with PyTorch's). Either
way both libraries must compute what they should, threadpoolctl must list
the runtime each one runs on, and ``threadpool_limits(1, user_api="openmp")``
must bring both to one thread.

Each case runs in a child process, so the import order is the test's own.
"""

import json
import subprocess
import sys

import pytest

import fastbn

from helpers import same_fastbn

pytest.importorskip("torch")
pytest.importorskip("threadpoolctl")
if not fastbn._openmp.openmp_enabled():
    pytest.skip("fastbn is built without OpenMP (FASTBN_OPENMP=0)", allow_module_level=True)

# The thread count the child's runtimes start with: more than the limit of 1,
# whatever the machine (fastbn caps counts at four threads per processor).
THREADS = 3

CHILD = r"""
import importlib, json, sys

for name in sys.argv[1].split(","):
    importlib.import_module(name)

import numpy as np
import threadpoolctl
import torch

import fastbn
from fastbn import reference

# PyTorch sets its runtime's thread count when it is imported (to the cores
# it sees); start both libraries at the same count, more than 1.
torch.set_num_threads(int(sys.argv[2]))


def thread_counts():
    return [fastbn._openmp.effective_num_threads(None), torch.get_num_threads()]


def max_error(y, expected):
    return float(np.max(np.abs(np.asarray(y, np.float64) - expected)))


# 2**19 values: enough for fastbn to use every thread it is given.
x = np.random.default_rng(0).standard_normal((32, 16, 32, 32), dtype=np.float32)
expected = reference.batch_norm_forward(x, None, None)[0]


def both():
    y = fastbn.batch_norm_forward(x, None, None)[0]
    ty = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True).numpy()
    return y, ty


report = {"before": thread_counts()}
y, ty = both()
with threadpoolctl.threadpool_limits(1, user_api="openmp"):
    report["inside"] = thread_counts()
    y1, ty1 = both()
report["after"] = thread_counts()
y2, ty2 = both()

# Which listed runtime each library runs on: the one whose limit it obeys.
# (Which one that is is the dynamic loader's choice: PyTorch loads its
# libgomp into the global scope, so a library loaded after it binds there.)
report.update(listed=[], fastbn_runs_on=[], torch_runs_on=[])
for info in threadpoolctl.threadpool_info():
    if info["user_api"] == "openmp":
        report["listed"].append(info["filepath"])
        controller = threadpoolctl.ThreadpoolController().select(filepath=info["filepath"])
        with controller.limit(limits=1):
            fastbn_count, torch_count = thread_counts()
        if fastbn_count == 1:
            report["fastbn_runs_on"].append(info["filepath"])
        if torch_count == 1:
            report["torch_runs_on"].append(info["filepath"])
report.update(
    fastbn_error=max(max_error(v, expected) for v in (y, y1, y2)),
    torch_error=max(max_error(v, expected) for v in (ty, ty1, ty2)),
    fastbn_same_bits=bool(np.array_equal(y, y1) and np.array_equal(y, y2)),
)
print(json.dumps(report))
"""


@pytest.fixture(scope="module", params=["torch,fastbn", "fastbn,torch"],
                ids=["torch-first", "fastbn-first"])
def child_report(request):
    """Run CHILD with the modules imported in the order given; its report."""
    kwargs = same_fastbn()
    kwargs["env"]["OMP_NUM_THREADS"] = str(THREADS)
    done = subprocess.run([sys.executable, "-c", CHILD, request.param, str(THREADS)],
                          capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_threadpoolctl_sees_and_limits_the_runtime_of_each(child_report):
    # Each library runs on exactly one of the runtimes threadpoolctl lists.
    assert len(child_report["fastbn_runs_on"]) == 1
    assert len(child_report["torch_runs_on"]) == 1
    assert child_report["before"] == [THREADS, THREADS]
    assert child_report["inside"] == [1, 1]
    assert child_report["after"] == [THREADS, THREADS]


def test_both_libraries_compute_correctly(child_report):
    # The oracle's y has unit spread: absolute errors are relative ones.
    assert child_report["fastbn_error"] < 1e-5
    assert child_report["torch_error"] < 1e-4
    assert child_report["fastbn_same_bits"]


def test_the_wheel_runs_on_its_own_runtime_when_imported_first(request, child_report):
    """A wheel's fastbn, imported before PyTorch, runs on the libgomp it
    carries: two runtimes, each with its own threads, both listed above."""
    vendored = [path for path in child_report["listed"] if "/fastbn.libs/libgomp" in path]
    if not vendored:
        pytest.skip("fastbn is built from source: it links the system's OpenMP runtime")
    if request.node.callspec.id != "fastbn-first":
        pytest.skip("imported after PyTorch, fastbn binds to PyTorch's global libgomp")
    assert child_report["fastbn_runs_on"] == vendored
    assert child_report["torch_runs_on"] != vendored
