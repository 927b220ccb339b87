"""Benchmark fastbn against PyTorch's CPU kernels and the NumPy reference.

    python benchmarks/run.py            # the full suite (several minutes)
    python benchmarks/run.py --quick    # a subset with shorter timings (see --help)

Prints progress on stderr, then on stdout the Markdown tables (with the
machine line and the command, ready for the README). ``--check`` adds the
team's internal targets (share of copy bandwidth, speedup over PyTorch, tiny
calls) as a summary after the tables and in the JSON; they are never part of
``benchmark.md``. Writes ``benchmark.json`` (every figure and the machine
description), ``benchmark.md`` and ``benchmark.png`` (GB/s per case and implementation) to
``--out`` (default ``benchmarks/results/``; ``benchmark-quick.*`` with --quick).

Then the scenarios of ``scenarios.py`` (busy neighbour, training step next
to OpenBLAS, PyTorch beside fastbn, back-to-back calls, fused ReLU, the main
job), into the same Markdown; ``--no-scenarios`` skips them.

Layout: ``cases.py`` (shapes, inputs, the calls), ``numpy_formula.py`` (the
float32 NumPy formula), ``measure.py`` (timing and peak memory),
``machine.py`` (machine description, OpenMP runtimes, copy bandwidth),
``report.py`` (tables, targets, JSON, chart), ``scenarios.py`` (runs the
scenarios, one module each: ``busy.py`` with ``neighbours.py``, ``step.py``,
``beside.py`` with ``beside_child.py``, ``back_to_back.py``, ``fused.py``,
``main_job.py``).

``ab.py`` compares two builds on one call in interleaved fresh processes:
the way to tell a kernel change from this VM's noise.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import cases
import machine
import measure
import report
import scenarios
from cases import TRAFFIC_FACTOR, Workload, as_array, log, make_call
from report import format_time

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# the largest difference from the oracle, relative to max |y|, that is no warning:
# a few units in the last place of each dtype (float64: 1e-9)
TOLERANCE = {"float32": 1e-3, "float16": 4e-3, "bfloat16": 3e-2}
COPY_MIN_BYTES = 256 * 2**20


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes and shorter timings: about a minute for the "
                             "tables on a quiet 2-core machine, then the --quick scenarios "
                             "(about 1.5 minutes more; --no-scenarios skips them)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")],
                        default=None,
                        help="comma-separated thread counts (default: 1 and all cores)")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=None,
                        help="comma-separated dtypes to time (default: float32, float64, "
                             "float16 and, with ml_dtypes, bfloat16)")
    parser.add_argument("--half-shapes", action="store_true",
                        help="time every dtype on the float16/bfloat16 shapes only (their "
                             "float32 rows are what --check compares them with)")
    parser.add_argument("--no-scenarios", action="store_true",
                        help="skip the scenarios (busy neighbour, training step, PyTorch beside "
                             "fastbn, back-to-back calls, fused ReLU, main job)")
    parser.add_argument("--check", action="store_true",
                        help="for the team: also judge the results against the project's "
                             "internal targets and print that summary")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="on a shared machine: before a case, wait while other processes "
                             "are busy, spending at most SECONDS in total (default: 0)")
    return parser.parse_args(argv)


def run_case(op, w, threads, settings):
    """Time every implementation on one case; returns their records."""
    records = []
    oracle = None
    index = 0  # rotation continues across implementations: each starts on cold copies
    for impl in cases.implementations():
        call = make_call(impl, op, w, threads)
        if call is None:  # a peer without this case
            continue
        times, index = measure.time_calls(
            call, w.copies, warmup_calls=impl.warmup_calls, max_reps=impl.max_reps,
            min_reps=settings["min_reps"], target_seconds=settings["target_seconds"],
            start=index)
        peak, result = measure.peak_rss_growth(call, index % w.copies)
        index += 1
        y = np.asarray(as_array(result, w.shape), dtype=np.float64)
        if oracle is None:  # the reference runs first
            oracle = y
        scale = max(1.0, float(np.max(np.abs(oracle))))
        error = float(np.max(np.abs(y - oracle))) / scale
        tolerance = TOLERANCE.get(w.dtype.name, 1e-9)
        if not error <= tolerance:
            log(f"  WARNING: {impl.label} differs from the reference by {error:.3g} "
                f"(relative to max |y|) on {op} {w.label}")
        stats = measure.summarize(times)
        traffic = TRAFFIC_FACTOR[op] * w.nbytes
        gbps = traffic / stats["median_s"] / 1e9
        records.append({
            "operation": op, "shape": list(w.shape.dims), "shape_label": w.shape.label,
            "channels_last": w.shape.channels_last, "dtype": w.dtype.name,
            "threads": threads, "implementation": impl.name, "label": impl.label,
            "nbytes": w.nbytes, "traffic_bytes": traffic,
            "data": "cold" if w.cold else "hot", "copies": w.copies,
            **stats, "gbps": gbps,
            "peak_rss_bytes": peak, "max_rel_error": error, "matches_reference": error <= tolerance,
        })
        del result, y
    medians = {r["implementation"]: r["median_s"] for r in records}
    for r in records:
        r["speedup"] = {peer: t / r["median_s"] for peer, t in medians.items()
                        if peer != r["implementation"]}
    if op in cases.VARIANT_OF and records:  # against the plain operation, in alternation
        ratio, samples = measure.paired_ratio(
            make_call(cases.FASTBN_OUT, op, w, threads),
            make_call(cases.FASTBN_OUT, cases.VARIANT_OF[op][0], w, threads),
            w.copies, settings["target_seconds"], samples=settings["paired_samples"])
        for r in records:
            if r["implementation"] == cases.FASTBN_OUT.name:
                r["paired_ratio"] = ratio
                r["paired_samples"] = samples
    return records


class QuietWaiter:
    """On a shared machine: wait while other processes are busy, within a budget.

    ``before()`` waits only when the previous measurement ran under load (or
    at the start), so a quiet machine pays nothing.
    """

    def __init__(self, budget_seconds, load_now):
        self.budget = self.total = budget_seconds
        self.last_load = load_now

    def before(self):
        if self.budget > 0 and (self.last_load or 0.0) >= report.BUSY_CORES:
            log(f"  other processes busy ({self.last_load:.1f} cores): waiting "
                f"(at most {self.budget:.0f} s left)")
            self.budget -= machine.wait_until_quiet(self.budget, report.BUSY_CORES)
        return machine.BackgroundLoad()

    def after(self, load):
        self.last_load = load.cores()
        return self.last_load

    @property
    def waited(self):
        return self.total - self.budget


def sample_copy_bandwidth(copy, threads_list, waiter):
    """One copy-bandwidth sample at every thread count."""
    for t in threads_list:
        load = waiter.before()
        with cases.thread_limit(t):
            gbps = copy.sample(t)
        background = waiter.after(load)
        log(f"copy bandwidth, {t} thread(s), {machine.format_bytes(copy.nbytes)}: "
            f"{gbps:.1f} GB/s (read + write)"
            + (f"  († load {background:.1f})" if (background or 0.0) >= report.BUSY_CORES
               else ""))


def run_suite(suite, threads_list, settings, copy, waiter, started):
    """Every (shape, dtype) x threads x operation of that dtype; returns the records.

    The copy bandwidth is sampled at the start and the end and, unless
    quick, before every workload, so that its best sample comes from a quiet
    moment on a shared machine.
    """
    total = len(threads_list) * sum(len(cases.operations(dtype)) for _, dtype in suite)
    records = []
    for k, (shape, dtype) in enumerate(suite):
        if k == 0 or not settings["quick"]:
            sample_copy_bandwidth(copy, threads_list, waiter)
        w = Workload(shape, dtype, settings["flush_bytes"])
        log(f"{w.label}: x {machine.format_bytes(w.nbytes)}, "
            + (f"{w.copies} rotating copies ({machine.format_bytes(w.pool_bytes)} of x, dy, out)"
               if w.cold else "hot (not flushed)"))
        for t in threads_list:
            with cases.thread_limit(t):
                for op in cases.operations(dtype):
                    load = waiter.before()
                    rows = run_case(op, w, t, settings)
                    background = waiter.after(load)
                    for r in rows:
                        r["background_cores"] = background
                    records += rows
                    if not rows:  # no implementation has the case (ghost BN, N not a multiple of 8)
                        continue
                    done = len(records) // len(rows)
                    log(f"[{done:3d}/{total}] {time.perf_counter() - started:5.0f} s  "
                        f"{op:<13} {w.label:<30} {t} thr: "
                        + " | ".join(f"{r['label']} {format_time(r['median_s'])}" for r in rows)
                        + (f"  († load {background:.1f})"
                           if (background or 0.0) >= report.BUSY_CORES else ""))
        w.release()
    sample_copy_bandwidth(copy, threads_list, waiter)
    return records


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    all_cores = machine.available_cores()
    threads_list = args.threads or sorted({1, all_cores})
    llc = machine.last_level_cache_bytes()
    settings = {
        "quick": args.quick,
        "threads": threads_list,
        "target_seconds": 0.05 if args.quick else 0.3,
        "paired_samples": 1 if args.quick else 5,   # variants against the plain operation
        "min_reps": 5,
        "reference_max_reps": cases.REFERENCE.max_reps,
        "last_level_cache_bytes": llc,
        "flush_bytes": 2 * llc,
        "cold_min_bytes": cases.COLD_MIN_BYTES,
        "eps": cases.EPS,
        "momentum": cases.MOMENTUM,
        "peak_memory_method": "peak RSS growth during one call (VmHWM reset via "
                              "/proc/self/clear_refs, after malloc_trim)",
    }
    command = shlex.join(["python", "benchmarks/run.py", *argv])
    log(f"{command}: threads {threads_list}, last-level cache {machine.format_bytes(llc)}, "
        f"PyTorch {'not installed' if cases.torch is None else cases.torch.__version__}")
    if not measure.peak_rss_available():
        log("peak memory: /proc/self/clear_refs not available, reported as n/a")
    idle_load = machine.idle_check()
    if idle_load is not None and idle_load >= report.BUSY_CORES:
        log(f"WARNING: other processes are using {idle_load:.1f} cores; the figures will be "
            "noisy (rows measured under load are marked †; see --wait-quiet)")

    run_load = machine.BackgroundLoad()
    waiter = QuietWaiter(args.wait_quiet, idle_load)
    machine_info = machine.describe(cases.torch)
    copy = machine.CopyBandwidth(max(settings["flush_bytes"], COPY_MIN_BYTES))
    records = run_suite(cases.suite(args.quick, args.dtypes, args.half_shapes), threads_list,
                        settings, copy, waiter, started)
    copy.close()
    copy_bandwidth = {t: copy.result(t) for t in threads_list}
    for r in records:
        r["pct_copy"] = 100 * r["gbps"] / copy_bandwidth[r["threads"]]["gbps"]
    runtime = time.perf_counter() - started
    settings["background_cores_before_start"] = idle_load
    settings["background_cores_during_run"] = run_load.cores()
    settings["waited_for_quiet_s"] = waiter.waited

    date = datetime.date.today().isoformat()
    machine_line = machine.summary_line(machine_info)
    bandwidth_line = ", ".join(
        f"{t} thread{'s' if t > 1 else ''} {v['gbps']:.1f} GB/s (median of its "
        f"{len(v['samples_gbps'])} samples {np.median(v['samples_gbps']):.1f})"
        for t, v in copy_bandwidth.items())
    header = "\n".join([
        f"Machine: {machine_line}.",
        f"Copy bandwidth (read + write): {bandwidth_line}.",
        report.load_line(settings),
        f"Command: `{command}` ({date}, {runtime / 60:.1f} min).",
    ])
    sections = [header, report.markdown_tables(records), report.legend(settings, copy_bandwidth)]
    if not args.no_scenarios:
        sections.append(scenarios.run(args.quick, settings["flush_bytes"]))
    markdown = "\n\n".join(sections)
    targets = report.evaluate_targets(records, max(threads_list)) if args.check else None

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "benchmark-quick" if args.quick else "benchmark"
    report.write_json(args.out / f"{stem}.json", {
        "command": command, "date": date, "runtime_s": runtime, "settings": settings,
        "machine": machine_info, "machine_line": machine_line,
        "copy_bandwidth": {str(t): v for t, v in copy_bandwidth.items()},
        "results": records, **({"targets": targets} if args.check else {}),
    })
    (args.out / f"{stem}.md").write_text(markdown + "\n")
    (args.out / f"{stem}-readme.md").write_text(
        report.readme_table(records, max(threads_list)) + "\n")
    report.write_chart(args.out / f"{stem}.png", records, copy_bandwidth,
                       f"{machine_line}. Copy bandwidth: {bandwidth_line}.")

    print(markdown)
    if args.check:
        print()
        print(report.targets_text(targets, records))
    log(f"done in {runtime:.0f} s; wrote {args.out / stem}.json, .md, .png, -readme.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
