"""Timing and peak memory of one call.

- :func:`time_calls`: warm-up, then an adaptive number of individually timed
  calls (``time.perf_counter_ns``, garbage collector off), rotating through
  the workload's input copies.
- :func:`median_time`: the median of :func:`time_calls`, as the scenarios use it.
- :func:`paired_ratio`: two calls' median times, as a ratio, timed in
  alternation (a BatchNorm variant against the plain operation), the median
  of several such samples.
- :func:`peak_rss_growth`: how far the process's resident set rises above its
  level before one call, read from the kernel's high-water mark (VmHWM)
  after resetting it through ``/proc/self/clear_refs``. Unlike tracemalloc it
  sees every allocator (NumPy's, PyTorch's, the C library's) alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time

import numpy as np


def time_calls(call, copies, *, warmup_calls, max_reps, min_reps=5, target_seconds=0.3,
               start=0):
    """Per-call wall times, in seconds, of ``call(i)`` for i rotating over copies.

    Warm-up: at least ``warmup_calls`` calls and a tenth of ``target_seconds``.
    Then ``target_seconds / (typical warm-up call)`` repetitions, clipped to
    ``[min_reps, max_reps]``. Returns ``(times, next_index)``.
    """
    index = start
    warm = []
    deadline = time.perf_counter_ns() + int(0.1 * target_seconds * 1e9)
    while len(warm) < warmup_calls or time.perf_counter_ns() < deadline:
        t0 = time.perf_counter_ns()
        call(index % copies)
        warm.append(time.perf_counter_ns() - t0)
        index += 1
    typical = float(np.median(warm[1:] if len(warm) > 1 else warm)) * 1e-9
    reps = int(min(max(target_seconds / max(typical, 1e-9), min_reps), max_reps))

    times = np.empty(reps, dtype=np.int64)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            i = index % copies
            t0 = time.perf_counter_ns()
            call(i)
            times[r] = time.perf_counter_ns() - t0
            index += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return times * 1e-9, index


def paired_ratio(call, base, copies, target_seconds, samples=1, seed=0):
    """median(time of ``call``) / median(time of ``base``), the two timed in
    alternation, call by call, on the same rotating copies (each after two
    warm-up calls), for about ``target_seconds`` in all: a slow spell of a
    shared machine slows both alike, where two medians taken seconds apart
    can differ by 1.5x on their own. Which of the two goes first is drawn
    at random for each pair, so that neither always runs after the other
    nor always on the same copies (with an even number of copies, the
    variant used to take the even ones and the plain call the odd ones; in
    a long run whose copies may differ, say in huge pages, that read
    Batch Renormalization's forward of (16, 3, 224, 224) 1.10-1.15x the
    plain one in all five samples, where a fresh process read 1.02-1.05).

    With ``samples`` > 1, the median of that many such ratios, each over
    ``target_seconds``: on a 2-core VM one sample of 0.3 s spread over
    about +-0.1 (Ghost BN's forward against the plain forward read
    0.87-1.24 within a minute), where the median of five varied by a few
    hundredths. Returns ``(median ratio, the samples)``."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(samples):
        for i in range(2):
            call(i % copies)
            base(i % copies)
        t0 = time.perf_counter_ns()
        call(0)
        typical = (time.perf_counter_ns() - t0) * 1e-9
        reps = int(min(max(target_seconds / 2 / max(typical, 1e-9), 5), 2000))
        times = np.empty((2, reps), dtype=np.int64)
        first = rng.integers(0, 2, reps)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for r in range(reps):
                # the copies go in turn whichever call runs: each call finds a copy
                # the other did not warm, and both take the even and the odd copies
                for k, j in enumerate((first[r], 1 - first[r])):
                    f = base if j else call
                    t0 = time.perf_counter_ns()
                    f((2 * r + k) % copies)
                    times[j, r] = time.perf_counter_ns() - t0
        finally:
            if gc_was_enabled:
                gc.enable()
        ratios.append(float(np.median(times[0]) / np.median(times[1])))
    return float(np.median(ratios)), ratios


def median_time(call, copies, target_seconds, *, max_reps=2000):
    """Median wall time (seconds) of ``call(i)``: two warm-up calls, then
    about ``target_seconds`` of individually timed calls (at least 5)."""
    times, _ = time_calls(call, copies, warmup_calls=2, max_reps=max_reps, min_reps=5,
                          target_seconds=target_seconds)
    return float(np.median(times))


def summarize(times):
    """Order statistics of a sample of times (seconds)."""
    q = np.percentile(times, [0, 25, 50, 75, 100])
    return {"reps": int(len(times)), "min_s": q[0], "q1_s": q[1], "median_s": q[2],
            "q3_s": q[3], "max_s": q[4], "mean_s": float(np.mean(times))}


# ------------------------------------------------------------ peak RSS ----

def _load_libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _load_libc()


def _memory_status():
    """(VmRSS, VmHWM) of this process in bytes, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def peak_rss_available():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _memory_status()
    except (OSError, KeyError):
        return False
    return True


def peak_rss_growth(call, i):
    """``(bytes, result)``: peak resident-set growth during ``call(i)``, and its result.

    Free heap memory is returned to the OS first (``malloc_trim``), so that an
    allocation cannot reuse pages already resident and go unseen. The figure
    includes the result (a fresh output), page-granular, and None where
    ``/proc/self/clear_refs`` is not available (not Linux).
    """
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
        rss_before, _ = _memory_status()
    except (OSError, KeyError):
        return None, call(i)
    result = call(i)
    _, hwm = _memory_status()
    return max(0, hwm - rss_before), result
