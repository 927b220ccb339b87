"""Compare two builds of fastbn on one call, in interleaved fresh processes.

On the shared VMs the time of a cold call moves by up to 1.4x from one
process to the next (where its memory lands), so two builds timed in one
process each tell little. This runs the same call in ``--processes`` fresh
processes per build, alternating A, B, A, B, each timing the call on inputs
and ``out=`` buffers rotating through copies larger than the last-level
cache (the workloads, calls and timing of ``run.py``), and prints the
minimum and the median of the per-process medians (``out=``, float32
unless ``--dtype`` says otherwise). Run
it with the same build as A and B first: the ratio it prints then is the
noise (about 0.9-1.1 here).

    python benchmarks/ab.py --a /path/to/old/checkout --b . --op inference \\
        --threads 2 --shape 32,2048,7,7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

TARGET_SECONDS = 0.3            # of timed calls per process, as run.py's full suite


def child(op: str, threads: int, dims: tuple[int, ...], channels_last: bool,
          dtype_name: str) -> float:
    """The median time of the call, in seconds, in this process: fastbn with
    ``out=`` on run.py's workload of the shape and dtype (rotating copies
    twice the last-level cache) and run.py's call, timed by run.py's
    median_time."""
    import numpy as np

    import cases
    import machine
    import measure

    dtype = next((d for d in (np.dtype(np.float32), np.dtype(np.float64)) + cases.HALF_DTYPES
                  if d.name == dtype_name), None)
    if dtype is None:
        raise SystemExit(f"--dtype {dtype_name}: needs ml_dtypes (pip install ml_dtypes)")
    w = cases.Workload(cases.Shape(dims, channels_last), dtype,
                       2 * machine.last_level_cache_bytes())
    call = cases.make_call(cases.FASTBN_OUT, op, w, threads)
    return measure.median_time(call, w.copies, TARGET_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="checkout (built in place) of build A")
    parser.add_argument("--b", required=True, help="checkout (built in place) of build B")
    parser.add_argument("--op", default="forward",
                        help="an operation of run.py (cases.OPERATIONS, cases.VARIANT_OF)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", required=True, help="comma-separated, e.g. 64,64,56,56")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--dtype", default="float32",
                        choices=("float32", "float64", "float16", "bfloat16"),
                        help="bfloat16 needs ml_dtypes")
    parser.add_argument("--processes", type=int, default=6, help="per build")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    if args.child:
        print(child(args.op, args.threads, shape, args.channels_last, args.dtype))
        return
    medians: dict[str, list[float]] = {"A": [], "B": []}
    command = [sys.executable, os.path.abspath(__file__), "--child", "--a", "-", "--b", "-",
               "--op", args.op, "--threads", str(args.threads), "--shape", args.shape,
               "--dtype", args.dtype]
    command += ["--channels-last"] if args.channels_last else []
    for _ in range(args.processes):
        for name, path in (("A", args.a), ("B", args.b)):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
            result = subprocess.run(command, env=env, check=True, capture_output=True,
                                    text=True, cwd=os.path.abspath(path))
            medians[name].append(float(result.stdout))
    a, b = medians["A"], medians["B"]
    print(f"{args.op} {shape} {args.dtype}{' channels last' if args.channels_last else ''}, "
          f"{args.threads} thr, {args.processes} processes each: "
          f"A min {min(a) * 1e6:.0f} us, median {statistics.median(a) * 1e6:.0f} us | "
          f"B min {min(b) * 1e6:.0f} us, median {statistics.median(b) * 1e6:.0f} us | "
          f"B/A median {statistics.median(b) / statistics.median(a):.2f}, "
          f"min {min(b) / min(a):.2f}")


if __name__ == "__main__":
    main()
