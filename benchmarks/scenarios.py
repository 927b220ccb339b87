"""Three scenarios beside the suite: a busy neighbour, a training step, a fused ReLU.

    python benchmarks/scenarios.py          # both, printed as Markdown
    python benchmarks/scenarios.py --quick  # shorter timings

- **Busy neighbour.** One other process spins on one core (pinned to the
  first core of this process's affinity set) while fastbn and PyTorch run
  the training forward and the backward with 1 and with 2 threads, back to
  back, alternating, on inputs that stay in memory. Reported: each time and
  the ratio 2-thread / 1-thread (above 1: the second thread costs more than
  it gives). The same ratios on a quiet machine come first.
- **Training step.** A NumPy matmul of about the cost of one BatchNorm
  forward and backward sits between them, as a layer does: BLAS threads and
  OpenMP threads take turns. Reported: the step's time over the sum of its
  parts timed alone (above 1: the thread pools get in each other's way),
  for fastbn and PyTorch, each with all cores.
- **Fused ReLU.** The training forward with ``activation="relu"`` against
  the plain forward, and against the plain forward followed by
  ``np.maximum(y, 0, out=y)`` (fastbn) or ``relu_`` (PyTorch's
  ``native_batch_norm``), with all cores, on inputs larger than the cache.
  Then the backward: ``batch_norm_backward(..., beta=, activation="relu")``
  against the plain backward, and against the separate composition,
  ``np.multiply(dy, y > 0, out=dz)`` and the plain backward of dz in place
  (PyTorch: ``threshold_backward`` and ``native_batch_norm_backward``); and
  ``batch_norm_backward_from_output`` (no activation) against the plain
  backward from x.

Both use the inputs of ``cases.Workload`` and the calls of ``cases.make_call``
(fastbn with ``out=``: the fastest of its two ways on large inputs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

import numpy as np

import cases
import measure
from cases import Shape, Workload, make_call
from report import format_time

BUSY_SHAPES = (Shape((64, 64, 56, 56)), Shape((32, 256, 14, 14)), Shape((4096, 1024)))
STEP_SHAPES = (Shape((32, 256, 14, 14)), Shape((4096, 1024)))
OPS = ("forward", "backward")


def log(message):
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def spinner():
    """One process spinning on the first core this process may use."""
    core = min(os.sched_getaffinity(0))
    proc = subprocess.Popen([sys.executable, "-c",
                             f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    time.sleep(0.3)
    try:
        yield core
    finally:
        proc.kill()
        proc.wait()


def median_time(call, copies, target_seconds):
    times, _ = measure.time_calls(call, copies, warmup_calls=2, max_reps=2000, min_reps=5,
                                  target_seconds=target_seconds)
    return float(np.median(times))


def impls():
    return [cases.FASTBN_OUT] + ([cases.TORCH] if cases.torch is not None else [])


def thread_ratios(w, target_seconds, rounds=3):
    """{(impl, op): (t1, t2)}: best of ``rounds`` alternating 1- and 2-thread medians."""
    result = {}
    for impl in impls():
        for op in OPS:
            best = {1: float("inf"), 2: float("inf")}
            for _ in range(rounds):
                for n in (1, 2):
                    with cases.thread_limit(n):
                        t = median_time(make_call(impl, op, w, n), w.copies, target_seconds)
                    best[n] = min(best[n], t)
            result[impl.label, op] = (best[1], best[2])
    return result


def workloads(shapes, flush_bytes, scenario):
    """The float32 Workload of each shape in turn, released after its rows."""
    for shape in shapes:
        w = Workload(shape, np.float32, flush_bytes)
        log(f"{scenario}: {w.label}")
        yield w
        w.release()


def busy_neighbour(target_seconds, flush_bytes):
    rows = []
    for w in workloads(BUSY_SHAPES, flush_bytes, "busy neighbour"):
        shape = w.shape
        quiet = thread_ratios(w, target_seconds)
        with spinner():
            busy = thread_ratios(w, target_seconds)
        for key, (t1, t2) in busy.items():
            q1, q2 = quiet[key]
            rows.append(f"| {shape.label} | {key[1]} | {key[0]} | {q2 / q1:.2f} | "
                        f"{format_time(t1)} | {format_time(t2)} | **{t2 / t1:.2f}** |")
    return "\n".join([
        "### Busy neighbour (one other process spinning on one core)",
        "",
        "| shape | operation | implementation | 2 thr / 1 thr, quiet | 1 thread, busy | "
        "2 threads, busy | 2 thr / 1 thr, busy |",
        "|---|---|---|--:|--:|--:|--:|",
        *rows,
    ])


def training_step(target_seconds, flush_bytes):
    rows = []
    n_cores = len(os.sched_getaffinity(0))
    for w in workloads(STEP_SHAPES, flush_bytes, "training step"):
        shape = w.shape
        with cases.thread_limit(n_cores):
            for impl in impls():
                fwd = make_call(impl, "forward", w, n_cores)
                bwd = make_call(impl, "backward", w, n_cores)
                t_bn = (median_time(fwd, w.copies, target_seconds)
                        + median_time(bwd, w.copies, target_seconds))
                # a square matmul of about the BatchNorm's cost
                k = 64
                while 2 * (2 * k) ** 3 / 50e9 < t_bn and k < 4096:
                    k *= 2
                a = np.random.default_rng(0).standard_normal((k, k), dtype=np.float32)
                c = np.empty_like(a)
                t_mm = median_time(lambda i: np.matmul(a, a, out=c), 1, target_seconds)

                def step(i):
                    fwd(i)
                    np.matmul(a, a, out=c)
                    bwd(i)
                t_step = median_time(step, w.copies, target_seconds)
                rows.append(f"| {shape.label} | {impl.label} | {format_time(t_bn)} | "
                            f"{k}×{k}: {format_time(t_mm)} | {format_time(t_step)} | "
                            f"**{t_step / (t_bn + t_mm):.2f}** |")
    return "\n".join([
        f"### Training step (BatchNorm forward, matmul, BatchNorm backward; {n_cores} threads)",
        "",
        "| shape | implementation | BatchNorm fwd + bwd alone | matmul alone | step | "
        "step / sum of parts |",
        "|---|---|--:|--:|--:|--:|",
        *rows,
    ])


FUSED_SHAPES = (Shape((64, 64, 56, 56)), Shape((32, 256, 14, 14)), Shape((4096, 1024)),
                Shape((16, 56, 56, 64), channels_last=True))


def fused_relu(target_seconds, flush_bytes):
    rows, backward_rows = [], []
    n_cores = len(os.sched_getaffinity(0))
    for w in workloads(FUSED_SHAPES, flush_bytes, "fused relu"):
        shape = w.shape
        kw = dict(channel_axis=shape.channel_axis, num_threads=n_cores, eps=cases.EPS)
        rm, rv = w.running_mean.copy(), w.running_var.copy()

        def forward(i, **extra):
            return cases.fastbn.batch_norm_forward(w.x[i], w.gamma, w.beta, running_mean=rm,
                                                   running_var=rv, out=w.out[i], **kw,
                                                   **extra)[0]

        def separate(i):
            np.maximum(forward(i), 0, out=w.out[i])

        with cases.thread_limit(n_cores):
            plain = median_time(forward, w.copies, target_seconds)
            fused = median_time(lambda i: forward(i, activation="relu"), w.copies,
                                target_seconds)
            apart = median_time(separate, w.copies, target_seconds)
            torch_text = "n/a"
            if cases.torch is not None:
                torch_fwd = make_call(cases.TORCH, "forward", w, n_cores)
                torch_relu = median_time(lambda i: cases.torch.relu_(torch_fwd(i)), w.copies,
                                         target_seconds)
                torch_text = f"{format_time(torch_relu)} ({torch_relu / fused:.2f}×)"
        rows.append(f"| {shape.label} | {format_time(plain)} | {format_time(fused)} | "
                    f"**{fused / plain:.2f}** | {format_time(apart)} | **{apart / fused:.2f}** | "
                    f"{torch_text} |")
        backward_rows.append(fused_relu_backward_row(w, n_cores, target_seconds))
    return "\n\n".join(["\n".join([
        f"### Fused ReLU (training forward, float32, out=, {n_cores} threads)",
        "",
        "| shape | forward | forward, relu fused | fused / plain | forward + np.maximum | "
        "separate / fused | PyTorch forward + relu_ (its / fused) |",
        "|---|--:|--:|--:|--:|--:|--:|",
        *rows,
    ]), "\n".join([
        f"### Fused ReLU, backward; backward from the output (float32, out=, {n_cores} threads)",
        "",
        "| shape | backward | backward, relu fused | fused / plain | np.multiply(dy, y > 0) "
        "+ backward | separate / fused | PyTorch threshold_backward + backward (its / fused) "
        "| backward from y | from y / from x |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        *backward_rows,
    ])])


def fused_relu_backward_row(w, n_cores, target_seconds):
    """One shape's backward row: the plain backward (from x), the fused-ReLU
    backward, the separate mask-then-backward, PyTorch's composition, and
    the backward from the output y.

    y is the forward's output before the ReLU (``Workload.y``): y > 0 is the
    mask relu(y) > 0 gives. The separate composition writes dz into the
    ``out=`` buffer and runs the plain backward on it in place (``out=dy``).
    """
    kw = dict(channel_axis=w.shape.channel_axis, num_threads=n_cores)
    plain_call = make_call(cases.FASTBN_OUT, "backward", w, n_cores)
    y = w.y

    def separate(i):
        dz = np.multiply(w.dy[i], y[i] > 0, out=w.out[i])
        cases.fastbn.batch_norm_backward(dz, w.x[i], w.gamma, w.mean, w.invstd, out=dz, **kw)

    with cases.thread_limit(n_cores):
        plain = median_time(plain_call, w.copies, target_seconds)
        fused = median_time(make_call(cases.FASTBN_OUT, "backward_relu", w, n_cores), w.copies,
                            target_seconds)
        apart = median_time(separate, w.copies, target_seconds)
        from_y = median_time(make_call(cases.FASTBN_OUT, "from_output", w, n_cores), w.copies,
                             target_seconds)
        torch_text = "n/a"
        if cases.torch is not None:
            theirs = median_time(make_call(cases.TORCH, "backward_relu", w, n_cores), w.copies,
                                 target_seconds)
            torch_text = f"{format_time(theirs)} ({theirs / fused:.2f}×)"
    return (f"| {w.shape.label} | {format_time(plain)} | {format_time(fused)} | "
            f"**{fused / plain:.2f}** | {format_time(apart)} | **{apart / fused:.2f}** | "
            f"{torch_text} | {format_time(from_y)} | **{from_y / plain:.2f}** |")


def run(quick, flush_bytes):
    """The scenarios as Markdown."""
    target = 0.05 if quick else 0.2
    return "\n\n".join([busy_neighbour(target, flush_bytes), training_step(target, flush_bytes),
                        fused_relu(target, flush_bytes)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    args = parser.parse_args(argv)
    import machine
    print(run(args.quick, 2 * machine.last_level_cache_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
