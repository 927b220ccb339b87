"""Choose the compiled kernel modules for this CPU, once, at import.

On x86-64 the build makes each kernel module twice: the portable baseline
(``_planar``, ``_columnar``) and a copy compiled for x86-64-v3, with AVX2
and FMA (``_planar_v3``, ``_columnar_v3``), as PyTorch and NumPy pick their
kernels at run time. The v3 copy is used when the CPU has AVX2 and FMA.
``FASTBN_KERNELS=baseline`` in the environment forces the portable modules
(for testing them on a newer CPU). Both compute the same formulas; their
last bits can differ (wider vectors add in another order, FMA rounds once),
while each is bitwise reproducible for any thread count.
"""

import os

import numpy as np

from fastbn import _columnar, _planar

__all__ = ["columnar", "planar", "level"]


def _cpu_has_v3():
    """AVX2 and FMA, as NumPy's own CPU dispatch detected them."""
    try:
        features = np._core._multiarray_umath.__cpu_features__
    except AttributeError:  # NumPy < 2
        features = np.core._multiarray_umath.__cpu_features__
    return bool(features.get("AVX2") and features.get("FMA3"))


def _select():
    choice = os.environ.get("FASTBN_KERNELS", "auto")
    if choice not in ("auto", "baseline"):
        raise ImportError(f"FASTBN_KERNELS must be 'auto' or 'baseline', got {choice!r}")
    if choice == "auto" and _cpu_has_v3():
        try:
            from fastbn import _columnar_v3, _planar_v3
        except ImportError:  # built without the variants (native, non-x86, old compiler)
            pass
        else:
            return _planar_v3, _columnar_v3, "x86-64-v3 (AVX2, FMA)"
    return _planar, _columnar, "baseline"


planar, columnar, level = _select()
