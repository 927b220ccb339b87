"""Compare two builds of fastbn on one call, in interleaved fresh processes.

On the shared VMs the time of a cold call moves by up to 1.4x from one
process to the next (where its memory lands), so two builds timed in one
process each tell little. This runs the same call in ``--processes`` fresh
processes per build, alternating A, B, A, B, each timing the call on inputs
and ``out=`` buffers rotating through copies larger than the last-level
cache, and prints the minimum and the median of the per-process medians
(float32, ``out=``). Run it with the same build as A and B first: the ratio
it prints then is the noise (about 0.9-1.1 here).

    python benchmarks/ab.py --a /path/to/old/checkout --b . --op inference \\
        --threads 2 --shape 32,2048,7,7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROTATE_BYTES = 96 * 2**20       # inputs and outputs of the rotating copies, at least


def child(op: str, threads: int, shape: tuple[int, ...], channels_last: bool) -> float:
    """The median time of the call, in seconds, in this process."""
    import numpy as np

    import fastbn

    axis = -1 if channels_last or len(shape) == 2 else 1
    rng = np.random.default_rng(0)
    nbytes = int(np.prod(shape)) * 4
    copies = max(2, -(-ROTATE_BYTES // (3 * nbytes)))
    xs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(copies)]
    dys = [rng.standard_normal(shape, dtype=np.float32) for _ in range(copies)]
    outs = [np.empty_like(xs[0]) for _ in range(copies)]
    C = shape[axis]
    gamma, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    running_mean, running_var = np.zeros(C, np.float32), np.ones(C, np.float32)
    _, mean, invstd = fastbn.batch_norm_forward(xs[0], gamma, beta, channel_axis=axis)

    def call(i: int) -> None:
        x, dy, out = xs[i % copies], dys[i % copies], outs[i % copies]
        if op == "forward":
            fastbn.batch_norm_forward(x, gamma, beta, channel_axis=axis, out=out,
                                      num_threads=threads)
        elif op == "inference":
            fastbn.batch_norm_inference(x, gamma, beta, running_mean, running_var,
                                        channel_axis=axis, out=out, num_threads=threads)
        else:
            fastbn.batch_norm_backward(dy, x, gamma, mean, invstd, channel_axis=axis, out=out,
                                       num_threads=threads)

    times = []
    for i in range(max(20, 4 * copies)):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times[copies:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="checkout (built in place) of build A")
    parser.add_argument("--b", required=True, help="checkout (built in place) of build B")
    parser.add_argument("--op", choices=["forward", "inference", "backward"], default="forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", required=True, help="comma-separated, e.g. 64,64,56,56")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--processes", type=int, default=6, help="per build")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    if args.child:
        print(child(args.op, args.threads, shape, args.channels_last))
        return
    medians: dict[str, list[float]] = {"A": [], "B": []}
    command = [sys.executable, os.path.abspath(__file__), "--child", "--a", "-", "--b", "-",
               "--op", args.op, "--threads", str(args.threads), "--shape", args.shape]
    command += ["--channels-last"] if args.channels_last else []
    for _ in range(args.processes):
        for name, path in (("A", args.a), ("B", args.b)):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
            result = subprocess.run(command, env=env, check=True, capture_output=True,
                                    text=True, cwd=os.path.abspath(path))
            medians[name].append(float(result.stdout))
    a, b = medians["A"], medians["B"]
    print(f"{args.op} {shape}{' channels last' if args.channels_last else ''}, "
          f"{args.threads} thr, {args.processes} processes each: "
          f"A min {min(a) * 1e6:.0f} us, median {statistics.median(a) * 1e6:.0f} us | "
          f"B min {min(b) * 1e6:.0f} us, median {statistics.median(b) * 1e6:.0f} us | "
          f"B/A median {statistics.median(b) / statistics.median(a):.2f}, "
          f"min {min(b) / min(a):.2f}")


if __name__ == "__main__":
    main()
