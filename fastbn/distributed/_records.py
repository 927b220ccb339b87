"""The reduction records of the synchronized passes and their merge.

One C-contiguous float64 array of shape ``(HEADER + C, RECORD)``, the same
length on every rank (C is ``num_features``, agreed on by every rank):

========  =============  ==========================================  ==========
record    tag            payload (p0, p1, p2)                        merge
========  =============  ==========================================  ==========
0         TAG_RANGE      failing rank (min), failing rank (max),      min, max,
                         failing ranks (count)                        sum
1         TAG_FIRST      failing rank, error code, exception kind     lowest rank
2         TAG_FIRST      failing rank, detail, detail                 lowest rank
3         TAG_RANGE      itemsize of x (min, max, ranks)              min, max,
                                                                      sum
4         TAG_RANGE      num_features (min, max, ranks)               "
5         TAG_RANGE      eps (min, max, ranks); 0 in the backward     "
6         TAG_RANGE      running-statistics weight (min, max,         "
                         ranks); -1 without running statistics
7         TAG_RANGE      unbiased: 1 or 0 (min, max, ranks); 1 in     "
                         the backward
8         TAG_RANGE      activation code: 0 none, 1 relu, 2 leaky     "
                         relu (min, max, ranks)
9         TAG_RANGE      negative_slope with leaky relu, else 0       "
                         (min, max, ranks)
10 + c    TAG_STATS      count, mean, biased variance of channel c    Chan
          (forward)
10 + c    TAG_SUM        sum dy, sum dy * (x - mean), count           sum
          (backward)
========  =============  ==========================================  ==========

A failing rank leaves its ranges empty (+inf, -inf) and its body neutral
(count 0), so what it could not check does not spoil the others' ranges.

References: Chan, Golub & LeVeque, "Updating formulae and a pairwise
algorithm for computing sample variances" (1979) and "Algorithms for
computing the sample variance" (1983).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fastbn import _checks

__all__ = ["merge_records"]

_F64 = np.dtype(np.float64)

RECORD = 4          #: float64 values per record: (tag, p0, p1, p2)

TAG_STATS = 0.0     #: (count, mean, biased variance), merged with Chan's formula
TAG_SUM = 1.0       #: three sums
TAG_FIRST = 2.0     #: (rank, a, b): the record of the lowest rank is kept
TAG_RANGE = 3.0     #: (min, max, sum)
TAG_CONFLICT = -1.0  #: two different tags met: the ranks made different calls

# The header: what every rank must agree on, and the failure of any rank.
FAILED = 0          #: TAG_RANGE: failing ranks (min, max, count)
FIRST = 1           #: TAG_FIRST: (rank, error code, exception kind) of the lowest failing rank
DETAIL = 2          #: TAG_FIRST: (rank, detail, detail) of the lowest failing rank
DTYPE = 3           #: TAG_RANGE: x's dtype, as _protocol._dtype_code (min, max, ranks)
FEATURES = 4        #: TAG_RANGE: num_features (min, max, ranks)
EPS = 5             #: TAG_RANGE: eps (min, max, ranks); 0 in the backward
FACTOR = 6          #: TAG_RANGE: the running statistics' weight (min, max, ranks); -1: none
UNBIASED = 7        #: TAG_RANGE: 1 for the unbiased running variance, 0 for the biased one
ACTIVATION = 8      #: TAG_RANGE: the fused activation's code (min, max, ranks)
SLOPE = 9           #: TAG_RANGE: negative_slope with leaky_relu, else 0 (min, max, ranks)
HEADER = 10         #: header records before the C channel records


def merge_records(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Merge the records of ``a`` into ``b`` in place: ``b = a (+) b``.

    The reduction operator of the synchronized passes (the ``function`` of
    an MPI user-defined operation: ``a`` is the incoming buffer, ``b`` the
    in-out buffer). Records are rows of four float64 values
    ``(tag, p0, p1, p2)``, merged row by row according to their tag:

    - ``TAG_STATS``: ``(n, mean, var)`` of two disjoint sets of values,
      merged exactly (Chan et al.)::

          n    = na + nb
          mean = m0 + (m1 - m0) * (n1 / n)
          var  = ((na*va + nb*vb) + (ma - mb)**2 * (na*nb) / n) / n

      where side 0 is the side with more values (with as many, the one
      with the smaller mean) and side 1 the other: the mean, as
      ``(na*ma + nb*mb) / n``, is a weighted average of the two, but this
      form stays within an ulp of it when the data sit far from zero. An
      empty side (n = 0) gives the other side unchanged;
    - ``TAG_SUM``: the three values added;
    - ``TAG_FIRST``: the record with the lexicographically smaller
      ``(p0, p1, p2)`` (p0 is a rank, +inf for none);
    - ``TAG_RANGE``: ``(min(p0), max(p1), p2 + p2)``;
    - different tags: ``(TAG_CONFLICT, nan, nan, nan)``.

    Every rule is written so that ``merge(a, b)`` and ``merge(b, a)`` give
    the same bits: the result of an all-reduce is then the same on every
    rank, whatever pairs the MPI library combines in which order.

    Parameters
    ----------
    a : array_like of float64, shape (R, 4) or (4 * R,)
        The incoming records. Not modified.
    b : ndarray of float64, same number of values, writeable
        The records to merge into, updated in place (any layout: a
        non-contiguous ``b`` is merged through a contiguous copy that is
        written back).

    Returns
    -------
    b : ndarray
        ``b`` itself.

    Raises
    ------
    TypeError
        ``b`` not a float64 ndarray.
    ValueError
        ``b`` read-only, or with a zero stride; a and b of different lengths.
    """
    _checks.array("b", b, who="merge_records", what="a numpy.ndarray of float64 (updated in "
                                                    "place)")
    if b.dtype != _F64:
        raise TypeError(f"merge_records: b must have dtype float64, got "
                        f"{_checks.dtype_name(b.dtype)}")
    _checks.in_place("b", b, who="merge_records")
    a = np.asarray(a, dtype=_F64).reshape(-1, RECORD)
    copied = not b.flags.c_contiguous
    out = np.ascontiguousarray(b).reshape(-1, RECORD)  # b itself, or a copy written back
    if out.shape != a.shape:
        raise ValueError(f"merge_records: a and b must hold the same number of records, "
                         f"got {a.shape[0]} and {out.shape[0]}")
    ta, tb = a[:, 0], out[:, 0]
    # runs of records with one tag on both sides (the header's few, then the body)
    cuts = (np.flatnonzero((ta[1:] != ta[:-1]) | (tb[1:] != tb[:-1])) + 1).tolist()
    with np.errstate(all="ignore"):
        for i, j in zip([0, *cuts], [*cuts, len(ta)]):
            tag = float(ta[i])
            merge = _MERGE.get(tag) if tag == tb[i] else None
            if merge is None:
                out[i:j, 0] = TAG_CONFLICT
                out[i:j, 1:] = np.nan
            else:
                merge(a[i:j], out[i:j])
    if copied:
        b[...] = out.reshape(b.shape)
    return b


def _canonical_nan(v: NDArray[np.float64]) -> None:
    """NaN in one form: NaNs of other signs or payloads from two ranks would otherwise
    make a + b and b + a differ in their bits."""
    np.copyto(v, np.nan, where=np.isnan(v))


def _merge_stats(a: NDArray[np.float64], out: NDArray[np.float64]) -> None:
    na, ma, va = a[:, 1], a[:, 2], a[:, 3]
    nb, mb, vb = out[:, 1].copy(), out[:, 2].copy(), out[:, 3].copy()
    n = na + nb
    # The mean moves from the larger side's (ties: the smaller mean) towards the other's:
    # a symmetric choice, so merge(a, b) and merge(b, a) agree to the bit.
    base_a = (na > nb) | ((na == nb) & (ma <= mb))
    m0 = np.where(base_a, ma, mb)
    m1 = np.where(base_a, mb, ma)
    n1 = np.where(base_a, nb, na)
    mean = m0 + (m1 - m0) * (n1 / n)
    d = ma - mb
    var = ((na * va + nb * vb) + (d * d) * (na * nb) / n) / n
    if not (na.all() and nb.all()):  # an empty side leaves the other as it was (x*n/n != x)
        mean = np.where(na == 0, mb, np.where(nb == 0, ma, mean))
        var = np.where(na == 0, vb, np.where(nb == 0, va, var))
        mean[n == 0] = 0.0
        var[n == 0] = 0.0
    _canonical_nan(mean)
    _canonical_nan(var)
    out[:, 1] = n
    out[:, 2] = mean
    out[:, 3] = var


def _merge_sum(a: NDArray[np.float64], out: NDArray[np.float64]) -> None:
    total = a[:, 1:] + out[:, 1:]
    _canonical_nan(total)
    out[:, 1:] = total


def _merge_first(a: NDArray[np.float64], out: NDArray[np.float64]) -> None:
    # header records only, a few: plain Python is quicker than NumPy here
    for i, (pa, pb) in enumerate(zip(a[:, 1:].tolist(), out[:, 1:].tolist())):
        if pa < pb:  # lexicographic
            out[i, 1:] = pa


def _merge_range(a: NDArray[np.float64], out: NDArray[np.float64]) -> None:
    for i, ((a0, a1, a2), (b0, b1, b2)) in enumerate(zip(a[:, 1:].tolist(),
                                                          out[:, 1:].tolist())):
        out[i, 1:] = (min(a0, b0), max(a1, b1), a2 + b2)


_MERGE = {TAG_STATS: _merge_stats, TAG_SUM: _merge_sum, TAG_FIRST: _merge_first,
          TAG_RANGE: _merge_range}
