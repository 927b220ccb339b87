"""Huge C with tiny N: many channels, a few values each.

Per shape (float32, (N, C) with N of 2 to 8 and C in the hundreds of
thousands: a wide linear layer on a tiny batch, or statistics per pixel),
the training forward, inference and backward by fastbn (``out=``) and
PyTorch's CPU kernels, cold (rotating copies), on the default threads. Here
the per-channel work (statistics, maps, parameters) outweighs the values:
each channel has a handful.
"""

from __future__ import annotations

import cases
import machine
from cases import Shape
from measure import median_time
from report import format_time

SHAPES = (Shape((2, 1_000_000)), Shape((8, 262_144)))
QUICK_SHAPES = (Shape((2, 1_000_000)),)
OPERATIONS = ("forward", "inference", "backward")


def run(quick, flush_bytes):
    """The wide-shape table as Markdown."""
    target = 0.1 if quick else 0.3
    threads = machine.available_cores()
    impls = cases.fastbn_and_torch()
    rows = []
    for w in cases.float32_workloads(QUICK_SHAPES if quick else SHAPES, flush_bytes,
                                     "huge C, tiny N"):
        for op in OPERATIONS:
            with cases.thread_limit(threads):
                times = [median_time(cases.make_call(impl, op, w, threads), w.copies, target)
                         for impl in impls]
            cells = " | ".join(format_time(t) for t in times)
            ratio = f"**{times[1] / times[0]:.2f}×**" if len(times) > 1 else "—"
            rows.append(f"| {w.shape.label} | {op} | {cells} | {ratio} |")
    torch_head = " PyTorch |" if len(impls) > 1 else ""
    torch_rule = "--:|" if len(impls) > 1 else ""
    return "\n".join([
        f"### Huge C, tiny N ({threads} threads)",
        "",
        "Many channels of a few values each, float32, inputs cold, median: fastbn (`out=`) "
        "against PyTorch's CPU kernels; speedup = PyTorch's time over fastbn's.",
        "",
        f"| shape | operation | fastbn (out=) |{torch_head} speedup |",
        f"|---|---|--:|{torch_rule}--:|",
        *rows,
    ])
