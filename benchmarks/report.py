"""Turning the measurements into the Markdown table, the targets, JSON and a chart.

A *record* is one implementation on one case (operation, shape, dtype,
threads), as a flat JSON-ready dict built by ``run.py``; every function here
reads records and writes nothing but its output.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections import defaultdict

import numpy as np

from cases import OPERATION_TITLES, OPERATIONS, TINY_SHAPES, VARIANT_OF
from machine import format_bytes

IMPL_ORDER = ("fastbn_out", "fastbn", "torch", "onednn", "jax", "onnxruntime", "reference")
IMPL_LABELS = {"fastbn_out": "fastbn (out=)", "fastbn": "fastbn", "torch": "PyTorch",
               "onednn": "oneDNN", "jax": "JAX/Flax", "onnxruntime": "ONNX Runtime",
               "reference": "reference"}
#: the other implementations a user might pick, each with a speedup column when it ran
PEERS = ("torch", "onednn", "jax", "onnxruntime")
FASTBN_VARIANTS = {"fastbn_out": "out=", "fastbn": "fresh"}

# The targets.
TARGET_COPY_FRACTION = 60.0    # percent of copy bandwidth ...
TARGET_MIN_BYTES = 4 * 2**20   # ... for x of at least 4 MiB, float32, all cores
TARGET_HALF_RATIO = 0.6        # 16-bit data: at most this share of the float32 time
TARGET_GEOMEAN_SPEEDUP = 2.0   # over PyTorch, forward and backward
TARGET_FLOOR_VS_TORCH = 0.95   # no case slower than this fraction of PyTorch's speed
TARGET_TINY_SECONDS = 5e-6     # one call on the tiny shapes

# Rows measured while other processes took this many cores or more are marked.
BUSY_CORES = 0.1


def format_time(seconds):
    """3 significant digits in µs, ms or s."""
    for scale, unit in ((1e-6, "µs"), (1e-3, "ms"), (1.0, "s")):
        if seconds < 1000 * scale or unit == "s":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def _case_key(r):
    return (r["operation"], r["shape_label"], r["dtype"], r["threads"])


def group_cases(records):
    """{case key: {implementation: record}} in the order the cases ran."""
    cases = {}
    for r in records:
        cases.setdefault(_case_key(r), {})[r["implementation"]] = r
    return cases


# ------------------------------------------------------------ Markdown ----

def _impl_cell(r):
    if r is None:
        return "—"
    return f"{format_time(r['median_s'])} · {r['gbps']:.3g} GB/s · {r['pct_copy']:.0f}%"


def _speedup_cell(impls, peer):
    values = [impls[v]["speedup"].get(peer) if v in impls else None for v in FASTBN_VARIANTS]
    if all(v is None for v in values):
        return "—"
    return " / ".join("—" if v is None else f"{v:.2f}×" for v in values)


def _memory_cell(impls, names):
    """Peak RSS growth of the implementations ``names``, in the header's order."""
    return " / ".join(format_bytes(impls[name]["peak_rss_bytes"]) if name in impls else "—"
                      for name in names)


def markdown_tables(records):
    """One Markdown table per operation; rows are shape, dtype, threads."""
    cases = group_cases(records)
    ran = {name for impls in cases.values() for name in impls}
    impls_shown = [n for n in IMPL_ORDER if n in ran]
    peers = [n for n in PEERS if n in ran]
    header = (["shape", "dtype", "x size", "threads", "data"]
              + [IMPL_LABELS[n] for n in impls_shown]
              + [f"speedup vs {IMPL_LABELS[n]} (out= / fresh)" for n in peers]
              + ["speedup vs reference (out= / fresh)",
                 "peak RSS growth (" + " / ".join(IMPL_LABELS[n] for n in impls_shown) + ")"])
    blocks = []
    for op in OPERATIONS:
        rows = [impls for (o, *_), impls in cases.items() if o == op]
        if not rows:
            continue
        lines = [f"### {OPERATION_TITLES[op]}", "",
                 "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i < 5 else "--:" for i in range(len(header))) + "|"]
        for impls in rows:
            first = next(iter(impls.values()))
            busy = _busy(first)
            cells = [first["shape_label"], first["dtype"], format_bytes(first["nbytes"]),
                     str(first["threads"]), first["data"] + (" †" if busy else "")]
            cells += [_impl_cell(impls.get(n)) for n in impls_shown]
            cells += [_speedup_cell(impls, n) for n in peers]
            cells.append(_speedup_cell(impls, "reference"))
            cells.append(_memory_cell(impls, impls_shown))
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def readme_table(records, threads):
    """The README's summary: float32 at ``threads`` threads, one row per
    operation and shape, fastbn's better of fresh and ``out=`` against
    PyTorch (when it ran) and the oracle."""
    has_torch = any(r["implementation"] == "torch" for r in records)
    header = (["operation", "shape (float32)", "x", "fastbn fresh", "fastbn out=",
               "best, % of copy bw"] + (["PyTorch"] if has_torch else [])
              + ["NumPy reference"] + (["speedup vs PyTorch"] if has_torch else []))
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 3 else "--:" for i in range(len(header))) + "|"]
    best = {_case_key(r): r for r in best_of_fastbn(records)}
    for key, impls in group_cases(records).items():
        op, label, dtype, t = key
        if dtype != "float32" or t != threads:
            continue
        b = best[key]
        torch, ref = impls.get("torch"), impls.get("reference")
        cells = [OPERATION_TITLES[op], label, format_bytes(b["nbytes"]),
                 format_time(impls["fastbn"]["median_s"]),
                 format_time(impls["fastbn_out"]["median_s"]),
                 f"{b['pct_copy']:.0f}% ({FASTBN_VARIANTS[b['implementation']]})"]
        if has_torch:
            cells.append(format_time(torch["median_s"]) if torch else "—")
        cells.append(format_time(ref["median_s"]) if ref else "—")
        if has_torch:
            cells.append(f"{b['speedup']['torch']:.2f}×" if torch else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_line(settings):
    """How busy the machine was with other work, before and during the run."""
    before = settings.get("background_cores_before_start")
    during = settings.get("background_cores_during_run")
    if before is None or during is None:
        return "Load of other processes: unknown (no /proc/stat)."
    return (f"Load of other processes: {before:.2f} cores before the start, {during:.2f} "
            f"on average during the run (rows marked † had >= {BUSY_CORES:g}).")


def legend(settings, copy_bandwidth):
    bw = ", ".join(f"{t} thread{'s' if t > 1 else ''}: {v['gbps']:.1f} GB/s"
                   for t, v in sorted(copy_bandwidth.items()))
    return "\n".join([
        "Each cell: median time per call · effective bandwidth at the minimal traffic "
        "(forward and inference: x read + y written = 2 × x bytes; backward: x and dy read "
        "+ dx written = 3 × x bytes, from the output y in place of x, and the frozen backward "
        "without parameter gradients dy read + dx written = 2 × x bytes; 1 GB = 1e9 bytes) · "
        "that bandwidth as a percentage of "
        f"the copy bandwidth measured in the same run at the same thread count ({bw}: "
        "a parallel `np.copyto` of "
        f"{format_bytes(copy_bandwidth[min(copy_bandwidth)]['nbytes'])} by as many Python "
        "threads, counted as read + write; sampled at the start, the end and (unless "
        "--quick) before every shape; the best sample's median counts, as other processes "
        "can only slow a copy down).",
        "",
        f"Medians over at least {settings['min_reps']} individually timed calls "
        "(`time.perf_counter_ns`, garbage collector off) after warm-up calls, about "
        f"{settings['target_seconds']:g} s per cell; the reference is capped at "
        f"{settings['reference_max_reps']} calls. All implementations run in the same "
        "process at the same thread count (threadpoolctl limits for OpenMP and BLAS, "
        "`num_threads=` for fastbn, `torch.set_num_threads` for PyTorch).",
        "",
        "data: **cold** = the timed loop rotates through identical copies of x, dy and the "
        f"`out=` buffers whose working set is at least {format_bytes(settings['flush_bytes'])} "
        "(2 × the last-level cache), so every call reads its inputs from main memory; "
        f"**hot** = inputs under {format_bytes(settings['cold_min_bytes'])}, not flushed: the "
        "same arrays every call, in cache, as when the previous layer has just written them. "
        f"†: other processes took >= {BUSY_CORES:g} core on average while the row was "
        "measured (machine-wide busy time from /proc/stat minus this process's CPU time); "
        "its figures are less reliable.",
        "",
        "fastbn (out=): results written into preallocated, already-touched buffers; "
        "fastbn: a fresh output per call (as PyTorch, which allocates its output); "
        "PyTorch: `torch.ops.aten.native_batch_norm` (training forward), "
        "`torch.nn.functional.batch_norm` with `training=False` (inference), "
        "`torch.ops.aten.native_batch_norm_backward` (backward; the frozen rows with "
        "`train=False` and its output mask); NHWC rows give PyTorch "
        "a channels_last tensor; reference: `fastbn.reference` (NumPy, float64 "
        "accumulation). Forward calls update running statistics. The other peers "
        "(benchmarks/peers.py, when installed): oneDNN through PyTorch's mkldnn tensors "
        "(4-D float32 training, 4-D and 5-D inference, its own layout converted before "
        "timing), ONNX Runtime's BatchNormalization (inference, not channels last, "
        "`intra_op_num_threads` = the row's threads), JAX/Flax's `linen.BatchNorm` under "
        "`jax.jit` (forward, inference, and the backward as `jax.vjp`; all cores only, as "
        "XLA fixes its thread pool at import); — where a peer lacks the case.",
        "",
        "Backward through a fused ReLU: fastbn's `batch_norm_backward(..., beta=beta, "
        "activation=\"relu\")`, one pass that recomputes the pre-activation z from x, against "
        "what PyTorch's autograd runs for `relu(batch_norm(x))`: "
        "`aten.threshold_backward(dy, y, 0)` then `aten.native_batch_norm_backward` (two "
        "passes and a temporary); the reference runs its own fused backward. Backward from "
        "the output: fastbn's `batch_norm_backward_from_output` (no activation) reads the "
        "forward's output y in place of x; PyTorch has no from-output kernel, so its column "
        "is the standard backward from x (the reference's is its own from-output backward). "
        "y is the forward's output before any activation, "
        "computed in float64 and rounded, so that y > 0 is the fused backward's own mask "
        "(PyTorch's threshold_backward reads it in place of relu(y): the same mask, the same "
        "cost). These two rows run on the float32 shapes only.",
        "",
        "speedup = peer's median / fastbn's median, for fastbn with `out=` and with fresh "
        "outputs. peak RSS growth: how far the process's resident set rises during one call "
        "above its level before it (kernel high-water mark VmHWM, reset through "
        "`/proc/self/clear_refs`, after `malloc_trim`), result included, page-granular; "
        "measured the same way for every implementation, PyTorch included.",
    ])


# ------------------------------------------------------------- targets ----

def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _where(r):
    return f"{r['operation']} {r['shape_label']} {r['dtype']} {r['threads']} thr"


def _busy(r):
    return (r.get("background_cores") or 0.0) >= BUSY_CORES


def _judged(rows):
    """(rows to judge on, note): the quiet rows when any, else all of them."""
    quiet = [r for r in rows if not _busy(r)]
    if not rows or len(quiet) == len(rows):
        return rows, "", False
    if quiet:
        return quiet, f" [{len(rows) - len(quiet)} cases under load † left out]", False
    return rows, " [all cases under load †]", True


def _target(name, rows, verdict, detail, **extra):
    """One target: ``verdict(rows)`` and ``detail(rows)`` on the rows it is judged on."""
    rows, note, noisy = _judged(rows)
    if not rows:
        return {"name": name, "passed": None, "detail": "not measured", **extra}
    return {"name": name, "passed": verdict(rows), "detail": detail(rows) + note,
            "noisy": noisy, **extra}


def best_of_fastbn(records):
    """Per case, the faster of fastbn's two records (fresh output or out=):
    the issue judges the better of the two, and the detail says which."""
    best = {}
    for r in records:
        if r["implementation"] in FASTBN_VARIANTS:
            key = _case_key(r)
            if key not in best or r["median_s"] < best[key]["median_s"]:
                best[key] = r
    return list(best.values())


def _which(rows):
    n_out = sum(r["implementation"] == "fastbn_out" for r in rows)
    return f"best of fresh/out=: out= on {n_out}, fresh on {len(rows) - n_out}"


def evaluate_targets(records, all_cores):
    """The issue's targets, each a dict with ``passed`` (None: not measured).

    Each is judged per case on the better of fastbn's fresh and ``out=``
    records, on the cases measured while the machine was quiet when there
    are any (``noisy`` when there were none).
    """
    best = best_of_fastbn(records)
    targets = []

    def pct_detail(rows):
        worst = min(rows, key=lambda r: r["pct_copy"])
        passing = sum(r["pct_copy"] >= TARGET_COPY_FRACTION for r in rows)
        return (f"{passing}/{len(rows)} shapes pass; worst {worst['pct_copy']:.0f}% on "
                f"{worst['shape_label']} ({_which(rows)})")

    for op in OPERATIONS:
        rows = [r for r in best if r["operation"] == op and r["dtype"] == "float32"
                and r["threads"] == all_cores and r["nbytes"] >= TARGET_MIN_BYTES]
        targets.append(_target(
            f"{op} >= {TARGET_COPY_FRACTION:.0f}% of copy bandwidth "
            f"(float32, {all_cores} threads, x >= 4 MiB)", rows,
            lambda rows: all(r["pct_copy"] >= TARGET_COPY_FRACTION for r in rows), pct_detail))

    def geomean_vs_torch(rows):
        return _geomean([r["speedup"]["torch"] for r in rows])

    for op in OPERATIONS:
        rows = [r for r in best if r["operation"] == op and "torch" in r["speedup"]]
        targets.append(_target(
            f"{op} geomean speedup vs PyTorch >= {TARGET_GEOMEAN_SPEEDUP:g}× "
            f"(all shapes, dtypes, thread counts)", rows,
            lambda rows: geomean_vs_torch(rows) >= TARGET_GEOMEAN_SPEEDUP,
            lambda rows: f"{geomean_vs_torch(rows):.2f}× over {len(rows)} cases",
            informational=op not in ("forward", "backward")))

    def slower(rows):
        return sorted((r for r in rows if r["speedup"]["torch"] < TARGET_FLOOR_VS_TORCH),
                      key=lambda r: r["speedup"]["torch"])

    def slower_detail(rows):
        found = slower(rows)
        shown = "; ".join(f"{_where(r)} ({r['speedup']['torch']:.2f}×)" for r in found[:5])
        return (f"below on {len(found)}/{len(rows)}" + (f", worst: {shown}" if found else "")
                + (f"; {len(found) - 5} more in the JSON" if len(found) > 5 else ""))

    rows = [r for r in best if "torch" in r["speedup"]]
    target = _target(f"no case below {TARGET_FLOOR_VS_TORCH:g}× PyTorch", rows,
                     lambda rows: not slower(rows), slower_detail)
    target["slower_cases"] = [_where(r) for r in slower(_judged(rows)[0])]
    targets.append(target)

    def ratios(variant, plain):
        """(fastbn's time of the variant / of the plain operation, the case) per
        case: the ratio of the two timed in alternation (run.py: out= against
        out=) where the run has it, else of the two records."""
        times = {(r["shape_label"], r["dtype"], r["threads"]): r for r in best
                 if r["operation"] == plain}
        paired = {(r["shape_label"], r["dtype"], r["threads"]): r["paired_ratio"]
                  for r in records if r["operation"] == variant and "paired_ratio" in r}
        return [(paired.get(k, r["median_s"] / times[k]["median_s"]), r) for r in best
                if r["operation"] == variant
                and (k := (r["shape_label"], r["dtype"], r["threads"])) in times]

    samples = max((len(r.get("paired_samples", [0])) for r in records if "paired_ratio" in r),
                  default=1)
    for op, (plain, limit) in VARIANT_OF.items():
        pairs = ratios(op, plain)
        rows = [dict(r, ratio=q) for q, r in pairs]

        def ratio_detail(rows, limit=limit, plain=plain):
            worst = max(rows, key=lambda r: r["ratio"])
            passing = sum(r["ratio"] <= limit for r in rows)
            each = (f"each the median of {samples} samples" if samples > 1
                    else "each one sample")
            return (f"{passing}/{len(rows)} cases pass ({each} timed in alternation with "
                    f"{plain}); geomean "
                    f"{_geomean([r['ratio'] for r in rows]):.2f}×, worst {worst['ratio']:.2f}× "
                    f"({_where(worst)})")
        targets.append(_target(
            f"{op} <= {limit:g}× fastbn's {plain} (x >= 4 MiB)",
            [r for r in rows if r["nbytes"] >= TARGET_MIN_BYTES],
            lambda rows, limit=limit: all(r["ratio"] <= limit for r in rows), ratio_detail))

    # 16-bit data (issue 19): fastbn's time against its own float32 time on the same shape
    f32 = {(r["operation"], r["shape_label"], r["threads"]): r for r in best
           if r["dtype"] == "float32"}
    half_rows = [dict(r, ratio=r["median_s"] / f32[k]["median_s"]) for r in best
                 if r["dtype"] in ("float16", "bfloat16")
                 and r["operation"] in ("forward", "inference", "backward")
                 and (k := (r["operation"], r["shape_label"], r["threads"])) in f32
                 and f32[k]["nbytes"] >= TARGET_MIN_BYTES]

    def half_detail(rows):
        worst = max(rows, key=lambda r: r["ratio"])
        passing = sum(r["ratio"] <= TARGET_HALF_RATIO for r in rows)
        return (f"{passing}/{len(rows)} cases pass; geomean "
                f"{_geomean([r['ratio'] for r in rows]):.2f}×, worst {worst['ratio']:.2f}× "
                f"({_where(worst)})")
    if half_rows:
        targets.append(_target(
            f"float16/bfloat16 forward, inference, backward <= {TARGET_HALF_RATIO:g}× "
            f"fastbn's float32 time (float32 x >= 4 MiB)", half_rows,
            lambda rows: all(r["ratio"] <= TARGET_HALF_RATIO for r in rows), half_detail))

    tiny_labels = {s.label for s in TINY_SHAPES}

    def tiny_detail(rows):
        worst = max(rows, key=lambda r: r["median_s"])
        passing = sum(r["median_s"] <= TARGET_TINY_SECONDS for r in rows)
        return (f"{passing}/{len(rows)} calls pass; worst {format_time(worst['median_s'])} "
                f"({_where(worst)})")

    rows = [r for r in records if r["implementation"] == "fastbn_out"
            and r["shape_label"] in tiny_labels and r["operation"] != "inference"]
    targets.append(_target(
        f"tiny forward and backward <= {TARGET_TINY_SECONDS * 1e6:g} µs "
        f"({', '.join(sorted(tiny_labels))}; out=)", rows,
        lambda rows: all(r["median_s"] <= TARGET_TINY_SECONDS for r in rows), tiny_detail))
    return targets


def targets_text(targets, records):
    lines = ["Targets (judged on the cases measured on a quiet machine where there are any):"]
    for t in targets:
        status = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        if t.get("informational"):
            status = "info"
        if t.get("noisy"):
            status += "?"
        lines.append(f"  [{status}] {t['name']}: {t['detail']}")
    cases = group_cases(records).values()
    busy = sum(_busy(next(iter(c.values()))) for c in cases)
    if busy:
        lines.append(f"  {busy} of {len(cases)} cases were measured while other processes took "
                     f">= {BUSY_CORES:g} core (†); a verdict marked ? rests on such cases only.")
    return "\n".join(lines)


# ---------------------------------------------------------------- JSON ----

def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(path, document):
    path.write_text(json.dumps(document, indent=1, default=_plain) + "\n")


# --------------------------------------------------------------- chart ----

def write_chart(path, records, copy_bandwidth, title):
    """Grouped bars of GB/s: one panel per operation and thread count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = group_cases(records)
    threads = sorted({r["threads"] for r in records})
    ops = [op for op in OPERATIONS if any(k[0] == op for k in cases)]
    impls = [n for n in IMPL_ORDER if any(r["implementation"] == n for r in records)]
    colors = dict(zip(IMPL_ORDER, ("tab:blue", "tab:cyan", "tab:orange", "tab:red",
                                   "tab:green", "tab:purple", "tab:gray")))
    width = 0.8 / len(impls)

    fig, axes = plt.subplots(len(ops), len(threads), squeeze=False, sharey=True,
                             figsize=(7 * len(threads), 4 * len(ops)), layout="constrained")
    for row, op in enumerate(ops):
        for col, t in enumerate(threads):
            ax = axes[row][col]
            keys = [k for k in cases if k[0] == op and k[3] == t]
            xs = np.arange(len(keys))
            by_impl = defaultdict(list)
            for k in keys:
                for n in impls:
                    by_impl[n].append(cases[k][n]["gbps"] if n in cases[k] else 0.0)
            for j, n in enumerate(impls):
                ax.bar(xs + (j - (len(impls) - 1) / 2) * width, by_impl[n], width,
                       label=IMPL_LABELS[n], color=colors[n])
            ax.axhline(copy_bandwidth[t]["gbps"], color="k", linestyle="--", linewidth=1,
                       label="copy bandwidth")
            ax.set_xticks(xs, [f"{k[1]} {'f64' if k[2] == 'float64' else 'f32'}"
                               + (" (hot)" if next(iter(cases[k].values()))["data"] == "hot"
                                  else "")
                               for k in keys], rotation=60, ha="right", fontsize=7)
            ax.set_title("\n".join(textwrap.wrap(
                f"{OPERATION_TITLES[op]}, {t} thread{'s' if t > 1 else ''}", 64)))
            if col == 0:
                ax.set_ylabel("GB/s at minimal traffic")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("\n".join(textwrap.wrap(title, 150 * len(threads) // 2)), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
