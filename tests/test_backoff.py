"""The busy-core back-off (fastbn/_openmp.pxd): a call judges its threads'
lateness against the team the runtime gave it, not the count it asked for.

With ``OMP_THREAD_LIMIT=1`` the runtime gives every region one thread
whatever ``num_threads`` asks; that thread takes every unit, which is its
whole share, not lateness: no back-off may follow. Each case runs in a child
process, whose environment is the test's own.
"""

import json
import subprocess
import sys

import pytest

import fastbn

from helpers import same_fastbn

if not fastbn._openmp.openmp_enabled():
    pytest.skip("fastbn is built without OpenMP (FASTBN_OPENMP=0)", allow_module_level=True)

CHILD = r"""
import json
import numpy as np
import fastbn

# 2**19 values in 8 units of two channels: two threads asked for, eight units to judge
x = np.random.default_rng(0).standard_normal((32, 16, 32, 32), dtype=np.float32)
y = np.empty_like(x)
for _ in range(20):
    fastbn.batch_norm_forward(x, None, None, num_threads=2, out=y)
    fastbn.batch_norm_backward(x, x, None, np.zeros(16, np.float32), np.ones(16, np.float32),
                               num_threads=2, out=y)
print(json.dumps({"left": fastbn._openmp.busy_backoff()[0]}))
"""


def run_child(env):
    kwargs = same_fastbn()
    kwargs["env"].update(env)
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=120, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_team_smaller_than_asked_is_not_late():
    assert run_child({"OMP_THREAD_LIMIT": "1"})["left"] == 0.0
