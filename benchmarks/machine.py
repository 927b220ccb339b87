"""What the benchmark ran on, and the memory bandwidth it is judged against.

- :func:`describe` gathers the CPU model, core count, caches (from
  ``/sys/devices/system/cpu``), memory, software versions and fastbn's build
  configuration into one JSON-ready dict; :func:`summary_line` turns it into
  the one line that goes above the README table.
- :class:`CopyBandwidth` times a parallel copy of a buffer larger than the
  last-level cache: the ceiling a memory-bound kernel is measured against.
- :class:`BackgroundLoad` tells how much CPU other processes took while we
  measured, so that figures from a busy machine are marked as such.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import threadpoolctl

import fastbn
from fastbn import _dispatch, _openmp

_CPU_SYSFS = Path("/sys/devices/system/cpu")
REPO_ROOT = Path(__file__).resolve().parent.parent


def available_cores():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ------------------------------------------------------------- caches ----

def _parse_size(text):
    """'48K' / '2048K' / '300M' (sysfs cache sizes) -> bytes."""
    text = text.strip()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def caches():
    """The caches of CPU 0 as dicts: level, type, size_bytes, shared_cpu_list.

    Empty when the OS has no ``/sys/devices/system/cpu`` (not Linux).
    """
    found = []
    for index in sorted(_CPU_SYSFS.glob("cpu0/cache/index*")):
        try:
            found.append({
                "level": int((index / "level").read_text()),
                "type": (index / "type").read_text().strip(),
                "size_bytes": _parse_size((index / "size").read_text()),
                "shared_cpu_list": (index / "shared_cpu_list").read_text().strip(),
            })
        except (OSError, ValueError):
            continue
    return found


def last_level_cache_bytes(default=32 * 2**20):
    """Size of the largest (last-level) cache; ``default`` when unknown."""
    sizes = [c["size_bytes"] for c in caches() if c["type"] in ("Unified", "Data")]
    return max(sizes, default=default)


# ------------------------------------------------------ description ----

def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lscpu():
    """``lscpu`` as a {field: value} dict, or {} where lscpu is missing."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("Vulnerability") and key.strip() != "Flags":
            fields[key.strip()] = value.strip()
    return fields


def _memory_bytes():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_revision():
    """The repository's commit, with '+dirty' when the tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def describe(torch=None):
    """Everything about the machine and the software that shapes the figures."""
    import matplotlib

    lscpu = _lscpu()
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "fastbn": fastbn.__version__,
        "threadpoolctl": threadpoolctl.__version__,
        "matplotlib": matplotlib.__version__,
    }
    return {
        "cpu_model": lscpu.get("Model name") or _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "available_cores": available_cores(),
        "threads_per_core": lscpu.get("Thread(s) per core"),
        "caches": caches(),
        "memory_bytes": _memory_bytes(),
        "platform": platform.platform(),
        "lscpu": lscpu,
        "versions": versions,
        "fastbn_config": {
            "openmp": _openmp.openmp_enabled(),
            "kernels": _dispatch.level,
            "compile_args": _dispatch.planar.compile_args(),
            "default_num_threads": _openmp.effective_num_threads(None),
            "git_revision": _git_revision(),
        },
        "torch_num_threads_default": None if torch is None else torch.get_num_threads(),
        "threadpools": threadpoolctl.threadpool_info(),
    }


def runtime_lines():
    """What runs fastbn's kernels here, as Markdown list items: fastbn's own
    ``show_config()``, every OpenMP runtime loaded in this process
    (threadpoolctl) and the OpenMP wait settings of the environment."""
    config = io.StringIO()
    with contextlib.redirect_stdout(config):
        fastbn.show_config()
    first, *rest = config.getvalue().strip().splitlines()
    settings = "; ".join(" ".join(line.split()) for line in rest)
    runtimes = [f"{p['prefix']} {p.get('version') or ''} ({p['filepath']}, "
                f"{p['num_threads']} threads)".replace("  ", " ")
                for p in threadpoolctl.threadpool_info() if p["user_api"] == "openmp"]
    wait = ", ".join(f"{name}={os.environ[name]}" if name in os.environ else f"{name} unset"
                     for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                  "OMP_NUM_THREADS"))
    return [f"- {first}: {settings}",
            "- OpenMP runtimes in this process: " + ("; ".join(runtimes) or "none"),
            f"- environment: {wait}"]


def format_bytes(n):
    """1536 -> '1.5 KiB'; binary units, at most 3 significant digits."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary_line(machine):
    """One line: CPU, cores, caches, versions, fastbn build."""
    cache_text = ", ".join(
        f"L{c['level']}{'d' if c['type'] == 'Data' else ''} {format_bytes(c['size_bytes'])}"
        + (f" (shared by CPUs {c['shared_cpu_list']})" if "," in c["shared_cpu_list"]
           or "-" in c["shared_cpu_list"] else "")
        for c in machine["caches"] if c["type"] != "Instruction")
    v = machine["versions"]
    cfg = machine["fastbn_config"]
    build = (f"OpenMP, {cfg['kernels']} kernels, {cfg['compile_args']}" if cfg["openmp"]
             else "serial build, no OpenMP")
    memory = machine["memory_bytes"]
    parts = [
        f"{machine['cpu_model']}, {machine['available_cores']} cores",
        cache_text,
        f"{memory / 2**30:.0f} GiB RAM" if memory else None,
        f"Python {v['python']}, NumPy {v['numpy']}, "
        + (f"PyTorch {v['torch']}, " if v["torch"] else "PyTorch not installed, ")
        + f"fastbn {v['fastbn']}"
        + (f" ({cfg['git_revision']})" if cfg["git_revision"] else "")
        + f" built with {build}",
    ]
    return "; ".join(p for p in parts if p)


# ---------------------------------------------------- copy bandwidth ----

class CopyBandwidth:
    """Bandwidth of a parallel copy of ``nbytes``, sampled repeatedly over a run.

    Each of ``num_threads`` Python threads copies one contiguous slice with
    :func:`numpy.copyto` (which releases the GIL), so the copy runs on
    ``num_threads`` cores. Both buffers are written once beforehand, so no
    page fault is timed. Bandwidth counts read + write: ``2 * nbytes / time``
    (1e9 bytes/s).

    A sample is the median of several copies. Other processes can only slow
    a copy down, so on a shared machine the run's figure is the best sample
    (:meth:`result`), and sampling throughout the run makes it robust.
    """

    def __init__(self, nbytes):
        self.nbytes = nbytes
        self._src = np.empty(nbytes, dtype=np.uint8)
        self._dst = np.empty_like(self._src)
        self._src.fill(1)
        self._dst.fill(0)
        self.samples = {}

    def sample(self, num_threads, *, min_reps=5, target_seconds=0.3):
        """Time copies at ``num_threads``; returns and records the sample's GB/s."""
        page = 4096
        bounds = [(self.nbytes * k // num_threads) // page * page
                  for k in range(num_threads)] + [self.nbytes]
        slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            def copy():
                for future in [pool.submit(np.copyto, self._dst[s], self._src[s])
                               for s in slices]:
                    future.result()

            copy()  # warm-up: threads started, TLB entries loaded
            times = []
            deadline = time.perf_counter() + target_seconds
            while len(times) < min_reps or (time.perf_counter() < deadline and len(times) < 50):
                start = time.perf_counter_ns()
                copy()
                times.append((time.perf_counter_ns() - start) * 1e-9)
        gbps = 2 * self.nbytes / statistics.median(times) / 1e9
        self.samples.setdefault(num_threads, []).append(gbps)
        return gbps

    def result(self, num_threads):
        """{gbps: best sample, samples, nbytes, threads} for ``num_threads``."""
        samples = self.samples[num_threads]
        return {"gbps": max(samples), "samples_gbps": samples, "nbytes": self.nbytes,
                "threads": num_threads}

    def close(self):
        self._src = self._dst = None


# --------------------------------------------------- background load ----

def _cpu_sample():
    """(wall s, busy CPU s of the whole machine, CPU s of this process), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    own = os.times()
    return (time.perf_counter(), (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system)


class BackgroundLoad:
    """CPU time taken by other processes since creation, in cores on average.

    Machine-wide busy time (``/proc/stat``) minus this process's CPU time
    (``os.times``), over the wall time; ``None`` where /proc/stat is missing.
    Resolution is the kernel's clock tick (10 ms).
    """

    def __init__(self):
        self._start = _cpu_sample()

    def cores(self):
        now = _cpu_sample()
        if self._start is None or now is None or now[0] <= self._start[0]:
            return None
        wall, busy, own = (b - a for a, b in zip(self._start, now))
        return max(0.0, (busy - own) / wall)


def idle_check(seconds=1.0):
    """Load of other processes over ``seconds`` while this one sleeps (cores)."""
    meter = BackgroundLoad()
    time.sleep(seconds)
    return meter.cores()


def wait_until_quiet(budget_seconds, threshold, window=0.25):
    """Sleep while other processes take ``threshold`` cores or more.

    Gives up after ``budget_seconds``; returns the seconds spent waiting.
    """
    waited = 0.0
    while waited < budget_seconds:
        load = idle_check(window)
        waited += window
        if load is None or load < threshold:
            break
    return waited
