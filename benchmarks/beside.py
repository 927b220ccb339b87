"""PyTorch beside fastbn: PyTorch's own calls, alone and in a process that imported and used fastbn.

Each measurement is a fresh interpreter (``beside_child.py``): PyTorch alone;
fastbn imported first, then PyTorch; PyTorch first, then fastbn. When fastbn
is there it has run one training forward on a (64, 64, 56, 56) array before
PyTorch is timed. Timed: PyTorch's training ``batch_norm`` on a tiny and on a
large input, and ``torch.mm`` of two 1024×1024 matrices, at PyTorch's default
thread count. The three kinds of child take turns, ``rounds`` times; each
figure is the best of its medians.

Reported: each time and its ratio to PyTorch alone (above 1: fastbn's presence
slows PyTorch down, e.g. through a shared OpenMP runtime or threads that keep
spinning). The issue's target: at most 1.2. Also which OpenMP runtimes each
child had loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cases
from report import format_time

CHILD = Path(__file__).resolve().with_name("beside_child.py")
ORDERS = {"torch": "PyTorch alone", "fastbn-first": "fastbn imported first, used",
          "torch-first": "PyTorch imported first, fastbn used"}


def child(order, target_seconds):
    """The JSON report of one fresh child process."""
    done = subprocess.run([sys.executable, str(CHILD), order, str(target_seconds)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{CHILD.name} {order} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick, flush_bytes=None):
    """The PyTorch-beside-fastbn table as Markdown ('n/a' without PyTorch)."""
    title = "### PyTorch beside fastbn (fresh processes)"
    if cases.torch is None:
        return f"{title}\n\nPyTorch is not installed: nothing to measure."
    target, rounds = (0.05, 1) if quick else (0.3, 3)
    best, runtimes = {}, {}
    for r in range(rounds):
        for order in ORDERS:
            cases.log(f"PyTorch beside fastbn: {ORDERS[order]} ({r + 1}/{rounds})")
            report = child(order, target)
            runtimes[order] = report["openmp"]
            for name, t in report["medians"].items():
                best[order, name] = min(best.get((order, name), float("inf")), t)
            threads = report["torch_threads"]
    calls = [name for order, name in best if order == "torch"]
    rows = []
    for name in calls:
        alone = best["torch", name]
        cells = [name, format_time(alone)]
        for order in ("fastbn-first", "torch-first"):
            t = best[order, name]
            cells += [format_time(t), f"**{t / alone:.2f}**"]
        rows.append("| " + " | ".join(cells) + " |")
    header = ["PyTorch call", ORDERS["torch"]]
    for order in ("fastbn-first", "torch-first"):
        header += [ORDERS[order], "its / alone"]
    return "\n".join([
        title,
        "",
        f"PyTorch {cases.torch.__version__}, {threads} threads (its default); training "
        "`torch.nn.functional.batch_norm` and `torch.mm`, float32. Each time: the best of "
        f"{rounds} median{'s' if rounds > 1 else ''}, one fresh process per median. The "
        "issue's target for its / alone: at most 1.2. OpenMP runtimes loaded: "
        + "; ".join(f"{ORDERS[order]}: {', '.join(paths) or 'none'}"
                    for order, paths in runtimes.items()) + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 1 else "--:" for i in range(len(header))) + "|",
        *rows,
    ])
