"""The busy neighbours: another process on one core while the scenarios time.

Each is a context manager that starts a single-threaded Python process pinned
to the first core of this process's affinity set, waits until it is at work,
and kills it on exit. This process stays unpinned: a 1-thread call has the
other core to itself, a 2-thread call has to share one core with the
neighbour.

- :func:`spinner`: a pure-CPU loop (no memory traffic), as a compiler job.
- :func:`streamer`: a loop copying a NumPy array far larger than the
  last-level cache back and forth (``np.copyto``, one thread): it takes a core
  and a share of the memory bandwidth, as a data loader or another training
  job does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

STREAM_BYTES = 256 * 2**20

_SPIN = "print('ready', flush=True)\nwhile True: pass"
_STREAM = """import numpy as np
a = np.ones({n}, dtype=np.uint8)
b = np.zeros_like(a)
print('ready', flush=True)
while True:
    np.copyto(b, a)
    np.copyto(a, b)
"""


def _first_core():
    return min(os.sched_getaffinity(0))


@contextlib.contextmanager
def _pinned_process(code):
    """A Python process running ``code`` on the first core; yields the core."""
    core = _first_core()
    # One thread in the neighbour whatever its libraries would start.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{core}}})\n{code}"],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the busy neighbour did not start (exit code {proc.poll()})")
        yield core
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def spinner():
    """One process spinning on the first core this process may use."""
    return _pinned_process(_SPIN)


def streamer(nbytes=STREAM_BYTES):
    """One process on the first core copying ``nbytes`` back and forth."""
    return _pinned_process(_STREAM.format(n=nbytes))


NEIGHBOURS = {"spinner": spinner, "memory streamer": streamer}
DESCRIPTIONS = {
    "spinner": "a Python process spinning (`while True: pass`)",
    "memory streamer": f"a Python process copying a {STREAM_BYTES // 2**20} MiB NumPy array "
                       "back and forth (`np.copyto`, one thread)",
}
