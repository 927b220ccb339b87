"""Two OpenMP runtimes in one process: fastbn's and PyTorch's.

fastbn carries a private copy of libgomp (``fastbn/_libs/libgomp-fastbn.so.1``,
its own soname; ``fastbn/_runtime.py``), in the wheel and in a build from
source; PyTorch's wheel carries another (``torch/lib/libgomp.so.1``) and
loads it into the process's global symbol scope. fastbn's parallel modules
load with RTLD_DEEPBIND, so in either import order fastbn runs on its own
runtime beside PyTorch's: two thread pools, each with its own wait policy.
Both libraries must compute what they should, threadpoolctl must list the
runtime each one runs on, ``threadpool_limits(1, user_api="openmp")`` must
bring both to one thread, and fastbn's short spin must stay its own.

Each case runs in a child process, so the import order is the test's own.
"""

import json
import re
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
report.update(listed=[], fastbn_runs_on=[], torch_runs_on=[],
              private_runtime=fastbn._runtime.private_runtime())
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


def test_fastbn_runs_on_its_own_runtime_in_either_order(child_report):
    """fastbn's parallel modules bind to its private libgomp (loaded with
    RTLD_DEEPBIND), also after PyTorch put its libgomp.so.1 into the global
    symbol scope; PyTorch stays on its own."""
    own = child_report["private_runtime"]
    if own is None:
        pytest.skip("fastbn is built without a private OpenMP runtime (no patchelf at build "
                    "time, or not libgomp): it runs on the process's shared one")
    assert own in child_report["listed"]
    assert child_report["fastbn_runs_on"] == [own]
    assert child_report["torch_runs_on"] != [own]


DISPLAY = r"""
import importlib, json, os, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
import fastbn
print(json.dumps({"policy": fastbn._runtime.describe()[1],
                  "left": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}}))
"""


def runtime_settings(order, **env):
    """Each libgomp's spin count as it printed it at load (OMP_DISPLAY_ENV),
    in load order, and the child's report: fastbn's policy and the
    environment it left."""
    kwargs = same_fastbn()
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        kwargs["env"].pop(name, None)
    kwargs["env"].update(OMP_DISPLAY_ENV="verbose", **env)
    done = subprocess.run([sys.executable, "-c", DISPLAY, order], capture_output=True,
                          text=True, timeout=300, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr)
    return [int(c) for c in counts], json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("order", ["fastbn,torch", "torch,fastbn"])
def test_the_short_spin_is_fastbns_runtime_alone(order):
    """fastbn's runtime gets a spin count of about 50 us; PyTorch's runtime,
    loaded before or after it, reads the environment as the user left it
    (libgomp's default), and the environment is restored after the load."""
    if fastbn._runtime.private_runtime() is None:
        pytest.skip("fastbn is built without a private OpenMP runtime")
    counts, report = runtime_settings(order)
    fastbn_count = int(re.search(r"GOMP_SPINCOUNT=(\d+)", report["policy"]).group(1))
    assert len(counts) == 2
    ours = 0 if order.startswith("fastbn") else 1
    assert counts[ours] == fastbn_count
    assert counts[1 - ours] == 300000  # libgomp's default without OMP_WAIT_POLICY
    assert fastbn_count < 300000
    assert report["left"] == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None}


@pytest.mark.parametrize("variable, value, count", [("GOMP_SPINCOUNT", "12345", 12345),
                                                    ("OMP_WAIT_POLICY", "passive", 0)])
def test_a_user_setting_keeps_control(variable, value, count):
    """With OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user, fastbn sets
    nothing: both runtimes read the user's value."""
    if fastbn._runtime.private_runtime() is None:
        pytest.skip("fastbn is built without a private OpenMP runtime")
    counts, report = runtime_settings("fastbn,torch", **{variable: value})
    assert counts == [count, count]
    assert report["policy"] == f"from the environment: {variable}={value}"
    assert report["left"][variable] == value


def test_spin_count_follows_the_measured_cost_of_a_spin():
    """The count converts time to iterations with this CPU's measured cost."""
    per_iteration = fastbn._cpu.spin_seconds(2000) / 2000
    assert per_iteration > 0
    count = fastbn._runtime.spin_count(1e-3)
    assert count == pytest.approx(1e-3 / per_iteration, rel=0.9)
    assert fastbn._runtime.spin_count(2e-3) > count / 2
