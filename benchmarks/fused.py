"""Fused ReLU: the forward and backward with the ReLU fused, against the separate composition.

- Forward: ``activation="relu"`` against the plain forward, and against the
  plain forward followed by ``np.maximum(y, 0, out=y)`` (fastbn) or ``relu_``
  (PyTorch's ``native_batch_norm``), with all cores, on inputs larger than
  the cache.
- Backward: ``batch_norm_backward(..., beta=, activation="relu")`` against the
  plain backward, and against the separate composition,
  ``np.multiply(dy, y > 0, out=dz)`` and the plain backward of dz in place
  (PyTorch: ``threshold_backward`` and ``native_batch_norm_backward``); and
  ``batch_norm_backward_from_output`` (no activation) against the plain
  backward from x.
"""

from __future__ import annotations

import numpy as np

import cases
import machine
from cases import Shape, make_call
from measure import median_time
from report import format_time

SHAPES = (Shape((64, 64, 56, 56)), Shape((32, 256, 14, 14)), Shape((4096, 1024)),
          Shape((16, 56, 56, 64), channels_last=True))


def tables(target_seconds, flush_bytes):
    rows, backward_rows = [], []
    n_cores = machine.available_cores()
    for w in cases.float32_workloads(SHAPES, flush_bytes, "fused relu"):
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
        backward_rows.append(backward_row(w, n_cores, target_seconds))
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


def backward_row(w, n_cores, target_seconds):
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
    """The fused-ReLU tables as Markdown."""
    return tables(0.05 if quick else 0.2, flush_bytes)
