"""A layer against the functional pair: what the layer adds to the functions.

Per shape (float32, hot: the same arrays every call), one training step of
BatchNorm alone, timed as a whole: ``BatchNorm*d(C).forward(x)`` then
``.backward(dy)``, against the functions a NumPy net would call instead,
``batch_norm_forward(x, gamma, beta, running_mean=, running_var=)`` then
``batch_norm_backward(dy, x, gamma, mean, invstd)``. The layer keeps its
record for the backward (copies of gamma and beta), counts the batch and
checks its own constraints; the ratio says what that costs. Tiny shapes,
where the per-call cost is all there is, and one larger shape (whose fresh
outputs cost page faults in both).
"""

from __future__ import annotations

import numpy as np

import cases
import machine
from cases import Shape
from measure import median_time
from report import format_time

SHAPES = (Shape((8, 16, 8, 8)), Shape((64, 128)), Shape((32, 256, 14, 14)))
LAYERS = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def run(quick, flush_bytes):
    """The layer table as Markdown."""
    target = 0.1 if quick else 0.4
    threads = machine.available_cores()
    rows = []
    for w in cases.float32_workloads(SHAPES, 0, "layer against the functions"):
        x, dy, c = w.x[0], w.dy[0], w.shape.num_features
        layer = getattr(cases.fastbn, LAYERS[x.ndim])(c)
        layer.gamma[...], layer.beta[...] = w.gamma, w.beta
        gamma, beta = w.gamma, w.beta
        rm, rv = w.running_mean.copy(), w.running_var.copy()

        # y lives until the step ends in both, as in a net (the next layer reads it)
        def by_layer(i):
            y = layer.forward(x)
            return y, layer.backward(dy)

        def by_functions(i):
            y, mean, invstd = cases.fastbn.batch_norm_forward(x, gamma, beta, running_mean=rm,
                                                              running_var=rv)
            return y, cases.fastbn.batch_norm_backward(dy, x, gamma, mean, invstd)

        with cases.thread_limit(threads):
            t_layer = median_time(by_layer, 1, target)
            t_functions = median_time(by_functions, 1, target)
        rows.append(f"| {w.shape.label} | {format_time(t_functions)} | {format_time(t_layer)} | "
                    f"**{t_layer / t_functions:.2f}** |")
    return "\n".join([
        f"### A layer against the functional pair ({threads} threads)",
        "",
        "One training step of BatchNorm alone, hot (the same arrays every call), median: the "
        "layer's forward and backward against `batch_norm_forward` (running statistics "
        "updated) and `batch_norm_backward` on the same arrays.",
        "",
        "| shape (float32) | functions | layer | layer / functions |",
        "|---|--:|--:|--:|",
        *rows,
    ])
