"""The main job: ``examples/train_digits.py`` with fastbn and with the NumPy reference.

In a fresh process with default settings (fastbn's default thread count, the
environment as it is), the example's :func:`train` runs with fastbn's
BatchNorm and then with :mod:`fastbn.reference`'s, same seed, as
``--bn both`` does. Reported: the time inside BatchNorm and the whole run's
time (training and evaluation, data loading excluded) both ways, and the two
speedups. The issue's target: a BatchNorm speedup of at least 5x.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from machine import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "train_digits.py"

_CHILD = """import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("train_digits", sys.argv[1])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
runs = {bn: example.train(bn=bn, epochs=int(sys.argv[2]), log=None)
        for bn in ("fastbn", "reference")}
print(json.dumps({bn: {"bn_time": r.bn_time, "total_time": r.total_time,
                       "test_accuracy": r.test_accuracy[-1]} for bn, r in runs.items()}))
"""


def run(quick, flush_bytes=None):
    """The main job's two speedups as Markdown."""
    title = "### The main job: `examples/train_digits.py`, fastbn against the NumPy reference"
    epochs = 2 if quick else 12
    # find_spec, not import: scikit-learn would load its own OpenMP runtime here.
    if importlib.util.find_spec("sklearn") is None:
        return f"{title}\n\nscikit-learn is not installed (`pip install fastbn[examples]`)."
    done = subprocess.run([sys.executable, "-c", _CHILD, str(EXAMPLE), str(epochs)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the main job failed:\n{done.stderr}")
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    fast, ref = runs["fastbn"], runs["reference"]
    return "\n".join([
        title,
        "",
        f"Default settings ({epochs} epochs), fastbn first, then the reference, same seed, "
        "in one fresh process. The issue's target for the BatchNorm speedup: at least 5x.",
        "",
        "| | fastbn | NumPy reference | speedup |",
        "|---|--:|--:|--:|",
        f"| time inside BatchNorm | {fast['bn_time']:.3f} s | {ref['bn_time']:.3f} s | "
        f"**{ref['bn_time'] / fast['bn_time']:.1f}x** |",
        f"| whole run (training and evaluation) | {fast['total_time']:.2f} s | "
        f"{ref['total_time']:.2f} s | **{ref['total_time'] / fast['total_time']:.2f}x** |",
        f"| test accuracy | {100 * fast['test_accuracy']:.1f}% | "
        f"{100 * ref['test_accuracy']:.1f}% | |",
    ])
