"""Choose the compiled kernel modules for this CPU, once, at import.

On x86-64 the build makes each kernel module three times: the portable
baseline (``_planar``, ``_columnar``), a copy compiled for x86-64-v3
(AVX2, FMA; ``_planar_v3``, ``_columnar_v3``) and one for x86-64-v4
(AVX-512; ``_planar_v4``, ``_columnar_v4``), as PyTorch and NumPy pick
their kernels at run time. The newest level whose every feature the CPU
has (:func:`fastbn._cpu.supports`, the compiler's own check) is used.
``FASTBN_KERNELS`` in the environment forces a level: ``baseline``,
``v3`` or ``v4`` (for testing the older ones on a newer CPU; a level the
CPU lacks is an ImportError). The variants compute the same formulas in the
same order and fuse no multiply-add (``-ffp-contract=off``): they give the
same bits, for any thread count.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

from fastbn import _cpu

__all__ = ["columnar", "planar", "level", "kernel_for"]

_LEVELS = {"v4": "x86-64-v4 (AVX-512)", "v3": "x86-64-v3 (AVX2, FMA)"}


def _variant(name: str) -> tuple[ModuleType, ModuleType] | None:
    """(planar, columnar) of level ``name``, or None when it was not built."""
    try:
        return (importlib.import_module(f"fastbn._planar_{name}"),
                importlib.import_module(f"fastbn._columnar_{name}"))
    except ImportError:  # built without it (native build, non-x86, old compiler)
        return None


def _select() -> tuple[ModuleType, ModuleType, str]:
    choice = os.environ.get("FASTBN_KERNELS", "auto")
    if choice not in ("auto", "baseline", *_LEVELS):
        raise ImportError(f"FASTBN_KERNELS must be 'auto', 'baseline', 'v3' or 'v4', "
                          f"got {choice!r}")
    for name, label in _LEVELS.items():
        if choice not in ("auto", name):
            continue
        if not _cpu.supports(int(name[1:])):
            if choice == name:
                raise ImportError(f"FASTBN_KERNELS={name}, but this CPU lacks features "
                                  f"of {label}")
            continue
        modules = _variant(name)
        if modules is not None:
            return (*modules, label)
        if choice == name:
            raise ImportError(f"FASTBN_KERNELS={name}, but fastbn was built without "
                              f"the {label} kernels")
    from fastbn import _columnar, _planar
    return _planar, _columnar, "baseline"


planar, columnar, level = _select()


def kernel_for(shape: tuple[int, ...], channel_axis: int) -> tuple[ModuleType, tuple[int, ...]]:
    """(module, view_shape): the kernel family for an input of ``shape`` with
    its channels on ``channel_axis`` (>= 0), and the shape to view it as.

    Channels last (and 2-D) inputs are columnar (M, C); channels first
    inputs are planar (N, C, S), or columnar (N, C) when S == 1. The views
    of a C-contiguous array share its memory.
    """
    if channel_axis == len(shape) - 1:
        return columnar, (-1, shape[-1])
    spatial = math.prod(shape[2:])
    if spatial == 1:
        return columnar, shape[:2]
    return planar, (shape[0], shape[1], spatial)
