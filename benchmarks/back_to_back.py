"""Back-to-back calls: many 2-thread calls in a row, timed as a block.

What a layer sees when the previous call has just finished: the threads of
the last call are still around (spinning or asleep, as the OpenMP runtime's
wait policy decides). Per shape and operation, blocks of ``calls`` calls
back to back (no timer between them) are timed whole, ``blocks`` times;
reported: the per-call time (block / calls), median and best over the
blocks, for fastbn (``out=``) and, where installed, PyTorch, both at two
threads (fewer where fewer cores). Meant for a quiet machine, to compare a
change of the threads policy before and after.
"""

from __future__ import annotations

import time

import numpy as np

import cases
import machine
from cases import Shape, make_call
from report import format_time

SHAPES = (Shape((32, 256, 14, 14)), Shape((8, 16, 8, 8)), Shape((64, 128)))
OPS = ("forward", "backward")


def per_call_times(call, copies, calls, blocks):
    """Per-call seconds of each of ``blocks`` blocks of ``calls`` calls in a row."""
    for i in range(min(calls, 50)):  # warm-up
        call(i % copies)
    result = []
    for _ in range(blocks):
        start = time.perf_counter_ns()
        for i in range(calls):
            call(i % copies)
        result.append((time.perf_counter_ns() - start) * 1e-9 / calls)
    return np.array(result)


def run(quick, flush_bytes):
    """The back-to-back table as Markdown."""
    threads = min(2, machine.available_cores())
    blocks = 5 if quick else 15
    rows = []
    for w in cases.float32_workloads(SHAPES, flush_bytes, "back-to-back calls"):
        calls = 1000 if w.nbytes < cases.COLD_MIN_BYTES else 20
        if quick:
            calls //= 4
        with cases.thread_limit(threads):
            for op in OPS:
                for impl in cases.fastbn_and_torch():
                    t = per_call_times(make_call(impl, op, w, threads), w.copies, calls, blocks)
                    rows.append(f"| {w.shape.label} | {'cold' if w.cold else 'hot'} | {op} | "
                                f"{impl.label} | {calls} | {format_time(np.median(t))} | "
                                f"{format_time(t.min())} |")
    return "\n".join([
        f"### Back-to-back calls ({threads} threads)",
        "",
        f"Blocks of calls in a row, timed whole, {blocks} blocks; per call = block time / "
        "calls. cold: the calls rotate through copies of the inputs larger than the "
        "last-level cache; hot: the same small arrays every call.",
        "",
        "| shape (float32) | data | operation | implementation | calls per block | "
        "per call, median | per call, best |",
        "|---|---|---|---|--:|--:|--:|",
        *rows,
    ])
