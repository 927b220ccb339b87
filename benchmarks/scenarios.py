"""The scenarios: fastbn where users run it, beside other work.

    python benchmarks/scenarios.py                  # all of them, printed as Markdown
    python benchmarks/scenarios.py --quick          # shorter timings, fewer shapes
    python benchmarks/scenarios.py --busy --step    # only those (any combination)

One module each; ``run.py`` runs them all after its tables (into
``benchmark.md``, hence ``RESULTS.md``):

- ``--busy`` (:mod:`busy`): the default thread count against one thread,
  quiet and beside a busy neighbour (a spinner, a memory streamer:
  :mod:`neighbours`), on every float32 benchmark shape of 4 MiB or more.
- ``--step`` (:mod:`step`): a training step next to OpenBLAS (BatchNorm
  forward, matmul, BatchNorm backward) against its parts timed alone, for
  fastbn, PyTorch and the NumPy formula.
- ``--beside`` (:mod:`beside`): PyTorch's own calls in fresh processes, alone
  and with fastbn imported (before or after it) and used.
- ``--back-to-back`` (:mod:`back_to_back`): many 2-thread calls in a row,
  per-call time.
- ``--fused`` (:mod:`fused`): the forward and backward with a fused ReLU
  against the separate composition.
- ``--layer`` (:mod:`layer`): a layer's forward and backward against the
  functional pair on the same arrays.
- ``--wide`` (:mod:`wide`): huge C with tiny N ((2, 10**6), (8, 262144)),
  fastbn against PyTorch.
- ``--main-job`` (:mod:`main_job`): ``examples/train_digits.py`` with fastbn
  and with the NumPy reference in a fresh process: the BatchNorm speedup and
  the whole run's.

Progress goes to stderr, the Markdown to stdout. First comes what ran: the
kernel level, the OpenMP runtimes loaded and the wait settings of the
environment. The full run is sized for about 4 minutes on a quiet 2-core
machine and --quick for about 1.5 (a busy machine takes longer: --quick took
4.5 minutes beside other engineers' builds).
"""

from __future__ import annotations

import argparse
import sys

import back_to_back
import beside
import busy
import cases
import fused
import layer
import machine
import main_job
import step
import wide

# flag -> (module, title); the order in which they run and print.
SCENARIOS = {
    "busy": (busy, "busy neighbour (spinner, memory streamer)"),
    "step": (step, "training step next to OpenBLAS"),
    "beside": (beside, "PyTorch beside fastbn"),
    "back_to_back": (back_to_back, "back-to-back calls"),
    "fused": (fused, "fused ReLU"),
    "layer": (layer, "layer against the functional pair"),
    "wide": (wide, "huge C, tiny N"),
    "main_job": (main_job, "main job (examples/train_digits.py)"),
}


def run(quick, flush_bytes, names=None):
    """The scenarios ``names`` (default: all), in order, as Markdown."""
    names = list(SCENARIOS) if not names else names
    sections = ["### What ran the scenarios\n\n" + "\n".join(machine.runtime_lines())]
    for name in names:
        module, title = SCENARIOS[name]
        cases.log(f"scenario: {title}")
        sections.append(module.run(quick, flush_bytes))
    return "\n\n".join(sections)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="With no scenario flag, all of them run.")
    parser.add_argument("--quick", action="store_true",
                        help="shorter timings and fewer shapes (a check that they run)")
    for name, (_, title) in SCENARIOS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true",
                            help=f"run the {title} scenario")
    args = parser.parse_args(argv)
    names = [name for name in SCENARIOS if getattr(args, name)]
    print(run(args.quick, 2 * machine.last_level_cache_bytes(), names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
