"""One child of the PyTorch-beside-fastbn scenario (run by ``beside.py``, not by hand).

    python benchmarks/beside_child.py ORDER TARGET_SECONDS

ORDER is ``torch`` (PyTorch alone), ``fastbn-first`` (fastbn imported, then
PyTorch) or ``torch-first`` (PyTorch, then fastbn). When fastbn is imported it
is also used: one training forward on a (64, 64, 56, 56) float32 array with
its default thread count, before any timing. Then PyTorch's calls are timed
(median of individually timed calls, about TARGET_SECONDS each after warm-up),
and one JSON line goes to stdout: the medians, and the OpenMP runtimes loaded
(threadpoolctl, read after the timing).

Imports nothing of the benchmark suite (``cases`` imports both libraries):
the import order is the point.
"""

import json
import sys
import time

ORDER, TARGET = sys.argv[1], float(sys.argv[2])
if ORDER == "fastbn-first":
    import fastbn
    import torch
elif ORDER == "torch-first":
    import torch
    import fastbn
elif ORDER == "torch":
    import torch
else:
    raise SystemExit(f"unknown order {ORDER!r}")

if ORDER != "torch":
    import numpy as np

    big = np.random.default_rng(0).standard_normal((64, 64, 56, 56), dtype=np.float32)
    fastbn.batch_norm_forward(big, None, None, out=big)
    del big


def batch_norm(shape):
    x = torch.randn(shape)
    c = shape[1]
    weight, bias = torch.ones(c), torch.zeros(c)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    return lambda: torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                                  training=True)


def matmul(n):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: torch.mm(a, b)


CALLS = {"tiny BN (8, 16, 8, 8)": batch_norm((8, 16, 8, 8)),
         "large BN (64, 64, 56, 56)": batch_norm((64, 64, 56, 56)),
         "matmul 1024×1024": matmul(1024)}


def median_time(call):
    for _ in range(3):
        call()
    times = []
    deadline = time.perf_counter() + TARGET
    while len(times) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    times.sort()
    return times[len(times) // 2] * 1e-9


medians = {name: median_time(call) for name, call in CALLS.items()}

import threadpoolctl  # noqa: E402  (after the timing: it loads nothing, but stays out of it)

runtimes = [p["filepath"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "openmp"]
print(json.dumps({"order": ORDER, "medians": medians, "openmp": runtimes,
                  "torch_threads": torch.get_num_threads()}))
