"""Training step next to OpenBLAS: BatchNorm forward, a NumPy matmul, BatchNorm backward.

As a layer does, a matmul through NumPy's BLAS sits between the BatchNorm
forward and backward: the BLAS threads and the BatchNorm's threads take turns
on the same cores. The matmul is square, k×k float32 with k chosen once per
shape so that it costs about as much as fastbn's forward plus backward, and is
the same for every column. Three columns: fastbn (``out=``), PyTorch's BN
(where installed) and the NumPy formula (:mod:`numpy_formula`), each with its
library's default thread count, as a user runs it.

Reported per column: the step's time, the sum of its parts each timed alone
(BatchNorm forward, matmul, BatchNorm backward), and the step over that sum
(above 1: the thread pools get in each other's way). The issue's targets: at
most 1.1, and fastbn's step never slower than the other two columns.
"""

from __future__ import annotations

import numpy as np

import cases
import measure
from cases import Shape, make_call
from report import format_time

SHAPES = (Shape((32, 256, 14, 14)), Shape((64, 64, 28, 28)), Shape((4096, 1024)))


def columns():
    return ([cases.FASTBN_OUT] + ([cases.TORCH] if cases.torch is not None else [])
            + [cases.NUMPY])


def matmul_of_cost(seconds, target_seconds):
    """``(k, call)``: a k×k float32 matmul (k a multiple of 32) taking about ``seconds``,
    sized from the time of a 512×512 one."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512), dtype=np.float32)
    c = np.empty_like(a)
    t512 = measure.median_time(lambda i: np.matmul(a, a, out=c), 1, target_seconds)
    k = int(np.clip(512 * (seconds / t512) ** (1 / 3) // 32 * 32, 64, 4096))
    a = rng.standard_normal((k, k), dtype=np.float32)
    c = np.empty_like(a)
    return k, lambda i: np.matmul(a, a, out=c)


def step_cell(impl, w, matmul, target_seconds, rounds):
    """``(step, sum of parts)``: best of ``rounds`` medians each, seconds."""
    fwd = make_call(impl, "forward", w, None)
    bwd = make_call(impl, "backward", w, None)

    def step(i):
        fwd(i)
        matmul(i)
        bwd(i)

    best = {"fwd": float("inf"), "mm": float("inf"), "bwd": float("inf"),
            "step": float("inf")}
    for _ in range(rounds):
        for name, call in (("fwd", fwd), ("mm", matmul), ("bwd", bwd), ("step", step)):
            best[name] = min(best[name], measure.median_time(call, w.copies, target_seconds))
    return best["step"], best["fwd"] + best["mm"] + best["bwd"]


def run(quick, flush_bytes):
    """The training-step table as Markdown."""
    target, rounds = (0.03, 1) if quick else (0.15, 2)
    impls = columns()
    rows = []
    for w in cases.float32_workloads(SHAPES, flush_bytes, "training step"):
        bn = (measure.median_time(make_call(cases.FASTBN_OUT, "forward", w, None), w.copies,
                                  target)
              + measure.median_time(make_call(cases.FASTBN_OUT, "backward", w, None),
                                    w.copies, target))
        k, matmul = matmul_of_cost(bn, target)
        t_mm = measure.median_time(matmul, 1, target)
        cells = [w.shape.label, f"{k}×{k}: {format_time(t_mm)}"]
        for impl in impls:
            t_step, parts = step_cell(impl, w, matmul, target, rounds)
            cells.append(f"{format_time(t_step)} ({format_time(parts)}) · "
                         f"**{t_step / parts:.2f}**")
        rows.append("| " + " | ".join(cells) + " |")
    header = ["shape (float32)", "matmul alone"] + [impl.label for impl in impls]
    return "\n".join([
        "### Training step next to OpenBLAS (BatchNorm forward, matmul, BatchNorm backward)",
        "",
        "Each cell: the step's time (the sum of its three parts timed alone) · step / sum of "
        "parts. Default thread counts everywhere (fastbn `num_threads=None`, "
        + ("PyTorch's and " if cases.torch is not None else "")
        + "OpenBLAS's defaults); fastbn writes into `out=` buffers; the NumPy formula is the "
        "float32 formula a NumPy net writes (`benchmarks/numpy_formula.py`). Best of "
        f"{rounds} median{'s' if rounds > 1 else ''} per part and per step. The issue's "
        "targets: step / parts at most 1.1, and fastbn's step never slower than the other "
        "columns.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 1 else "--:" for i in range(len(header))) + "|",
        *rows,
    ])
