"""Batch Normalization synchronized across processes (data-parallel training).

When each process holds a slice of the batch, Batch Normalization must
normalize with the statistics of the whole global batch. This module splits
each pass of fastbn's kernels at its reduction:

forward
    local per-channel shifted sums (``sums`` of :mod:`fastbn._planar` /
    :mod:`fastbn._columnar`, float64) -> the local (count, mean, biased
    variance) -> **one** all-reduce that merges them exactly (Chan, Golub &
    LeVeque's parallel formula, counts included, so unequal local batch
    sizes are exact) -> the affine map -> ``apply`` normalizes the local
    slice;
backward
    local ``(sum dy, sum dy * (x - mean))`` -> **one** all-reduce (a sum) ->
    dgamma, dbeta and the map that gives dx -> ``apply``.

The single-process functions of :mod:`fastbn.functional` run the same block
functions of the kernels (the same dispatched kernel modules), so there is
one implementation of the full-size arithmetic. The per-channel finishing
(statistics to coefficients, the formulas of ``fastbn/_stats.pxd``) is
written here again in NumPy, operation for operation: on one process the
results are the single-process ones to the bit with the baseline kernels,
and within an ulp of the float64 coefficients with the x86-64-v3 kernels,
whose compiler fuses multiply-adds in those formulas.

Three levels:

- :func:`merge_records`: the reduction operator, on float64 *records* of
  four values ``(tag, p0, p1, p2)``, commutative to the bit, so that an MPI
  all-reduce gives every rank the same bits (and the running statistics
  stay identical on every rank);
- :func:`sync_batch_norm_forward` and :func:`sync_batch_norm_backward`: the
  functional layer, taking any caller-supplied ``allreduce`` callable;
- :class:`SyncBatchNorm`: a :class:`fastbn.layers.BatchNorm` over an mpi4py
  communicator, built with :func:`mpi_allreduce`.

The reduction buffer
--------------------
One C-contiguous float64 array of shape ``(HEADER + C, 4)``, the same
length on every rank (C is ``num_features``, agreed on by every rank):

========  =============  ==========================================  ==========
record    tag            payload (p0, p1, p2)                        merge
========  =============  ==========================================  ==========
0         TAG_RANGE      failing rank (min), failing rank (max),      min, max,
                         failing ranks (count)                        sum
1         TAG_FIRST      failing rank, error code, exception kind     lowest rank
2         TAG_FIRST      failing rank, detail, detail                 lowest rank
3         TAG_RANGE      itemsize (min), itemsize (max), ranks        min, max,
                                                                      sum
4 + c     TAG_STATS      count, mean, biased variance of channel c    Chan
          (forward)
4 + c     TAG_SUM        sum dy, sum dy * (x - mean), count           sum
          (backward)
========  =============  ==========================================  ==========

A rank whose input fails the checks still joins the one all-reduce, with
its failure in the header and count 0 in the body; then every rank raises
(the failing rank its own error, the others a ``TypeError`` or
``ValueError`` naming the failing rank(s) and the problem), so no rank is
left waiting in a collective. A rank with an empty local batch (N = 0)
takes part with count 0.

References: Ioffe & Szegedy (2015), arXiv:1502.03167; Chan, Golub & LeVeque,
"Updating formulae and a pairwise algorithm for computing sample variances"
(1979) and "Algorithms for computing the sample variance" (1983);
``torch.nn.SyncBatchNorm``; ChainerMN's ``MultiNodeBatchNormalization``
(which averages the per-process means instead, wrong for unequal local
batch sizes).
"""

from __future__ import annotations

import numbers

import numpy as np

from fastbn import functional as _f
from fastbn.layers import BatchNorm

__all__ = [
    "SyncBatchNorm",
    "merge_records",
    "mpi_allreduce",
    "sync_batch_norm_backward",
    "sync_batch_norm_forward",
]

_F64 = np.dtype(np.float64)

# ----------------------------------------------------------- the records ----

RECORD = 4          #: float64 values per record: (tag, p0, p1, p2)
HEADER = 4          #: header records before the C channel records

TAG_STATS = 0.0     #: (count, mean, biased variance), merged with Chan's formula
TAG_SUM = 1.0       #: three sums
TAG_FIRST = 2.0     #: (rank, a, b): the record of the lowest rank is kept
TAG_RANGE = 3.0     #: (min, max, sum)
TAG_CONFLICT = -1.0  #: two different tags met: the ranks made different calls

# error codes (header record 1, p1) and exception kinds (p2)
_E_OTHER, _E_NOT_ARRAY, _E_DTYPE, _E_NDIM, _E_CHANNELS, _E_SHAPE = 1, 2, 3, 4, 5, 6
_KIND_TYPE, _KIND_VALUE, _KIND_OTHER = 1, 2, 3
_ARGS = ("x", "dy")


def merge_records(a, b):
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
        The records to merge into, updated in place.

    Returns
    -------
    b : ndarray
        ``b`` itself.
    """
    a = np.asarray(a, dtype=_F64).reshape(-1, RECORD)
    out = b.reshape(-1, RECORD)
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
    return b


def _canonical_nan(v):
    """NaN in one form: NaNs of other signs or payloads from two ranks would otherwise
    make a + b and b + a differ in their bits."""
    np.copyto(v, np.nan, where=np.isnan(v))


def _merge_stats(a, out):
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


def _merge_sum(a, out):
    total = a[:, 1:] + out[:, 1:]
    _canonical_nan(total)
    out[:, 1:] = total


def _merge_first(a, out):
    # header records only, a few: plain Python is quicker than NumPy here
    for i, (pa, pb) in enumerate(zip(a[:, 1:].tolist(), out[:, 1:].tolist())):
        if pa < pb:  # lexicographic
            out[i, 1:] = pa


def _merge_range(a, out):
    for i, ((a0, a1, a2), (b0, b1, b2)) in enumerate(zip(a[:, 1:].tolist(),
                                                          out[:, 1:].tolist())):
        out[i, 1:] = (min(a0, b0), max(a1, b1), a2 + b2)


_MERGE = {TAG_STATS: _merge_stats, TAG_SUM: _merge_sum, TAG_FIRST: _merge_first,
          TAG_RANGE: _merge_range}


# -------------------------------------------------------------- MPI glue ----

_MPI_HINT = ('fastbn.SyncBatchNorm needs mpi4py and an MPI library: pip install "fastbn[mpi]" '
             '(or pip install mpi4py) with an MPI implementation installed first, e.g. Open MPI '
             '(Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev; conda: conda install '
             '-c conda-forge mpi4py openmpi); then run the script with mpirun -n 2 python ...')

_mpi_cache = {}


def _import_mpi():
    """``mpi4py.MPI``, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as exc:  # mpi4py, or the MPI library it loads
        raise ImportError(f"{_MPI_HINT} ({type(exc).__name__}: {exc})") from exc
    return MPI


def _mpi_merge(inbuf, inoutbuf, datatype):
    """The MPI user function: ``inoutbuf = inbuf (+) inoutbuf`` over whole records."""
    merge_records(np.frombuffer(inbuf, dtype=_F64), np.frombuffer(inoutbuf, dtype=_F64))


def _mpi_objects(MPI):
    """The record datatype (4 contiguous doubles) and the merge operation, made once."""
    if "op" not in _mpi_cache:
        record = MPI.DOUBLE.Create_contiguous(RECORD).Commit()
        op = MPI.Op.Create(_mpi_merge, commute=True)
        _mpi_cache.update(record=record, op=op)

        def free():  # before mpi4py's own finalization (atexit runs last-registered first)
            try:
                if not MPI.Is_finalized():
                    _mpi_cache.pop("op").Free()
                    _mpi_cache.pop("record").Free()
            except Exception:  # noqa: BLE001 - never fail at exit
                pass

        import atexit
        atexit.register(free)
    return _mpi_cache["record"], _mpi_cache["op"]


def _check_comm(comm):
    """comm must be an intracommunicator (an mpi4py Comm, or an object that wraps one)."""
    missing = [name for name in ("Get_rank", "Get_size", "Allreduce", "allgather")
               if not callable(getattr(comm, name, None))]
    if missing:
        raise TypeError(f"comm must be an mpi4py.MPI.Comm (an intracommunicator such as "
                        f"MPI.COMM_WORLD), got {type(comm).__name__} without "
                        f"{', '.join(missing)}")
    is_inter = getattr(comm, "Is_inter", None)
    if callable(is_inter) and is_inter():
        raise TypeError("comm must be an intracommunicator; got an intercommunicator, whose "
                        "Allreduce reduces across its two groups")


class mpi_allreduce:  # noqa: N801 - used like a function: mpi_allreduce(comm)
    """The ``allreduce`` of the synchronized passes over an mpi4py communicator.

    ``mpi_allreduce(comm)(records)`` is one ``comm.Allreduce`` in place over
    the records, with a record datatype of four contiguous doubles (so an
    MPI library that splits the buffer never splits a record) and
    :func:`merge_records` as a commutative user-defined operation.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm
        Or any object with mpi4py's ``Get_rank``, ``Get_size`` and
        ``Allreduce`` that forwards to one (a wrapper that counts calls, say).

    Attributes
    ----------
    comm, rank, size
        The communicator, this process's rank in it and its size.

    Raises
    ------
    ImportError
        mpi4py is not installed (the message says how to install it).
    TypeError
        comm is not a communicator, or is an intercommunicator.
    """

    def __init__(self, comm):
        _check_comm(comm)
        MPI = _import_mpi()
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())
        self._record, self._op = _mpi_objects(MPI)
        self._in_place = MPI.IN_PLACE

    def __call__(self, records):
        self.comm.Allreduce(self._in_place, [records, self._record], op=self._op)
        return records

    def __repr__(self):
        return f"mpi_allreduce(rank {self.rank} of {self.size})"


# ------------------------------------------------------------- checking ----

def _coded(exc, code, d1=0, d2=0):
    """Attach the error code that the other ranks will be told to an exception."""
    exc._fastbn_code = (code, d1, d2)
    return exc


def _check_array(who, name, a, index, dtype):
    """a is an ndarray of dtype (or of float32/float64 when dtype is None)."""
    if not isinstance(a, np.ndarray):
        raise _coded(TypeError(f"{who}: {name} must be a numpy.ndarray, got "
                               f"{type(a).__name__}"), _E_NOT_ARRAY, index)
    if dtype is None:
        if a.dtype not in _f._FLOAT_DTYPES:
            raise _coded(TypeError(f"{who}: {name} must have dtype float32 or float64, got "
                                   f"{a.dtype}"), _E_DTYPE, index, a.dtype.num)
    elif a.dtype != dtype:
        whose = "the layer's dtype" if index == 0 else "the dtype of x"
        raise _coded(TypeError(f"{who}: {name} must have {whose} ({dtype}), got "
                               f"{a.dtype}"), _E_DTYPE, index, a.dtype.num)


def _check_input(who, x, num_features, channel_axis, dtype, ndims, expected):
    """The checks whose failure the other ranks are told in detail; returns the channel axis."""
    _check_array(who, "x", x, 0, dtype)
    if x.ndim not in ndims:
        raise _coded(ValueError(f"{who} expects {expected}, got {x.ndim}-D input of shape "
                                f"{x.shape}"), _E_NDIM, x.ndim)
    ca = _f._check_channel_axis(channel_axis, x.ndim)
    if x.shape[ca] != num_features:
        raise _coded(ValueError(f"{who} expects {num_features} channels on axis "
                                f"{channel_axis}, got input of shape {x.shape}"),
                     _E_CHANNELS, x.shape[ca])
    return ca


def _check_num_features(num_features):
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be an int (the same on every rank), got "
                        f"{type(num_features).__name__}")
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")
    return int(num_features)


def _check_allreduce(allreduce):
    if not callable(allreduce):
        raise TypeError(f"allreduce must be callable (e.g. fastbn.distributed.mpi_allreduce("
                        f"comm)), got {type(allreduce).__name__}")


def _dtype_name(num):
    for t in set(np.sctypeDict.values()):
        try:
            if np.dtype(t).num == num:
                return np.dtype(t).name
        except TypeError:
            continue
    return f"of type number {num}"


# ------------------------------------------------- the collective protocol ----

class _Call:
    """One synchronized pass on one rank: the buffer, the local failure, the reduction."""

    def __init__(self, who, allreduce, num_features, expected_dtype, expected_input):
        self.who = who
        self.expected_input = expected_input
        self.allreduce = allreduce
        self.rank = getattr(allreduce, "rank", None)
        self.size = getattr(allreduce, "size", None)
        self.C = num_features
        self.expected_dtype = expected_dtype
        self.failure = None
        rec = np.zeros((HEADER + num_features, RECORD))
        rec[0] = (TAG_RANGE, np.inf, -np.inf, 0.0)
        rec[1] = (TAG_FIRST, np.inf, 0.0, 0.0)
        rec[2] = (TAG_FIRST, np.inf, 0.0, 0.0)
        rec[3] = (TAG_RANGE, np.inf, -np.inf, 1.0)
        self.records = rec

    @property
    def body(self):
        return self.records[HEADER:]

    def itemsize(self, dtype):
        self.records[3, 1:3] = dtype.itemsize

    def fail(self, exc, body):
        """Record a local failure; the body becomes neutral (count 0)."""
        self.failure = exc
        code, d1, d2 = getattr(exc, "_fastbn_code", (_E_OTHER, 0, 0))
        kind = (_KIND_TYPE if isinstance(exc, TypeError)
                else _KIND_VALUE if isinstance(exc, ValueError) else _KIND_OTHER)
        r = float(self.rank) if self.rank is not None else 0.0
        rec = self.records
        rec[0, 1:] = (r, r, 1.0)
        rec[1, 1:] = (r, code, kind)
        rec[2, 1:] = (r, d1, d2)
        rec[3, 1:3] = (np.inf, -np.inf)
        rec[HEADER:] = body

    def reduce(self, tag):
        """The one collective; then raise on every rank if any rank failed."""
        result = self.allreduce(self.records)
        if result is not None and result is not self.records:
            result = np.asarray(result, dtype=_F64).reshape(self.records.shape)
            self.records[...] = result
        rec = self.records
        expected = np.array([TAG_RANGE, TAG_FIRST, TAG_FIRST, TAG_RANGE] + [tag] * self.C)
        if not np.array_equal(rec[:, 0], expected):
            raise RuntimeError(f"{self.who}: the ranks made different calls in the same "
                               f"collective (say a forward on some ranks and a backward on "
                               f"others); every rank must run the same sequence of "
                               f"training-mode forwards and backwards")
        n_bad = int(rec[0, 3])
        if n_bad:
            self._raise(n_bad)
        lo, hi = rec[3, 1], rec[3, 2]
        if lo != hi:  # only the functional form can get here: a layer fixes its dtype
            raise TypeError(f"{self.who}: the ranks disagree on the dtype of x: "
                            f"{_itemsize_name(lo)} on some ranks, {_itemsize_name(hi)} on "
                            f"others; every rank must pass the same dtype")
        return rec

    def _ranks(self, n_bad):
        first, last = int(self.records[0, 1]), int(self.records[0, 2])
        if self.rank is None:
            return "one rank" if n_bad == 1 else f"{n_bad} ranks"
        if n_bad == 1:
            return f"rank {first}"
        if n_bad == 2:
            return f"ranks {first} and {last}"
        return f"{n_bad} ranks ({first} to {last})"

    def _describe(self):
        """What went wrong on the lowest failing rank, from the header alone."""
        code, kind = int(self.records[1, 2]), int(self.records[1, 3])
        d1, d2 = int(self.records[2, 2]), int(self.records[2, 3])
        if code == _E_NOT_ARRAY:
            return f"{_ARGS[d1]} is not a numpy.ndarray"
        if code == _E_DTYPE and d1 == 1:
            return f"dy has dtype {_dtype_name(d2)}, not the dtype of x"
        if code == _E_DTYPE:
            return f"x has dtype {_dtype_name(d2)}, expected {self.expected_dtype}"
        if code == _E_NDIM:
            return f"x is {d1}-D, expected {self.expected_input}"
        if code == _E_CHANNELS:
            return f"x has {d1} channels, expected {self.C}"
        if code == _E_SHAPE:
            return "dy does not have the shape of x"
        name = {_KIND_TYPE: "TypeError", _KIND_VALUE: "ValueError"}.get(kind, "an error")
        return f"its arguments failed the checks ({name}; the message is on that rank)"

    def _raise(self, n_bad):
        of = f" of {self.size}" if self.size is not None else ""
        ranks = self._ranks(n_bad)
        note = "every rank raises an error for this call"
        if self.failure is not None:
            exc = self.failure
            where = f"rank {self.rank}{of}" if self.rank is not None else "this rank"
            also = "" if n_bad == 1 else f"; {ranks}{of} failed"
            message = f"{exc} [{where}{also}; {note}]"
            try:
                new = type(exc)(message)
            except Exception:  # noqa: BLE001 - an exception type with another signature
                raise exc
            raise new from exc
        kind = int(self.records[1, 3])
        cls = {_KIND_TYPE: TypeError, _KIND_VALUE: ValueError}.get(kind, RuntimeError)
        raise cls(f"{self.who}: bad input on {ranks}{of}: {self._describe()} [{note}]")


def _itemsize_name(itemsize):
    return {4: "float32", 8: "float64"}.get(int(itemsize), f"itemsize {itemsize}")


def _view(x, ca):
    """(kernel module, C-contiguous x, its kernel view, values per channel)."""
    xc = np.ascontiguousarray(x)
    kernel, view = _f._kernel_view(x.shape, ca)
    xv = xc.reshape(view)
    return kernel, xc, xv, xc.size // x.shape[ca]


def _first_values(xv):
    """Per channel, its first value: the shift of the sums (as the fused kernels take it)."""
    return np.ascontiguousarray(xv[0, :, 0] if xv.ndim == 3 else xv[0, :], dtype=_F64)


# ------------------------------------------------------------ forward ----

def _forward(x, gamma, beta, *, allreduce, num_features, eps, running_mean, running_var,
             momentum, num_batches_tracked, channel_axis, out, num_threads, dtype=None,
             ndims=(2, 3, 4, 5), expected="2-D to 5-D input (N, C, ...)",
             who="sync_batch_norm_forward"):
    C = num_features
    call = _Call(who, allreduce, C, "float32 or float64" if dtype is None else str(dtype),
                 expected)
    try:
        ca = _check_input(who, x, C, channel_axis, dtype, ndims, expected)
        call.itemsize(x.dtype)
        eps = _f._check_eps(eps)
        momentum = _f._check_momentum(momentum)
        nthreads = _f._check_num_threads(num_threads)
        g = None if gamma is None else _f._check_vector("gamma", gamma, x.dtype, C)
        b = None if beta is None else _f._check_vector("beta", beta, x.dtype, C)
        rm, rv = _f._check_training_state(x, gamma, beta, running_mean, running_var,
                                          momentum, num_batches_tracked, out, C)
        tracking = rm is not None
        kernel, xc, xv, n = _view(x, ca)
        # Local statistics as the fused kernel finishes them (fastbn._stats.forward_coef):
        # one rank alone gets the single-process bits.
        body = call.body
        body[:, 0] = TAG_STATS
        if n:
            center = _first_values(xv)
            sq = np.empty((C, 2))
            kernel.sums(xv, None, center, sq, nthreads)
            mu = sq[:, 0] / n
            var = sq[:, 1] / n - mu * mu
            body[:, 1] = n
            body[:, 2] = center + mu
            body[:, 3] = np.where(var < 0.0, 0.0, var)  # rounding only; NaN stays NaN
    except Exception as exc:  # noqa: BLE001 - told to every rank, raised after the collective
        call.fail(exc, (TAG_STATS, 0.0, 0.0, 0.0))
    rec = call.reduce(TAG_STATS)

    body = rec[HEADER:]
    m = body[0, 1]
    if m <= 1:
        where = f" on rank {call.rank}" if call.rank is not None else ""
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {x.shape}{where} and {int(m)} value(s) per channel over all "
                         f"ranks")
    mean = body[:, 2].copy()
    var = body[:, 3].copy()
    with np.errstate(all="ignore"):
        invstd = 1.0 / np.sqrt(var + eps)
        coef = np.zeros((C, 4))
        coef[:, 0] = mean
        coef[:, 1] = invstd if g is None else invstd * g.astype(_F64)
        if b is not None:
            coef[:, 3] = b
        if tracking:
            factor = _f._running_factor(momentum, num_batches_tracked)
            rm[...] = (1.0 - factor) * rm.astype(_F64) + factor * mean
            rv[...] = (1.0 - factor) * rv.astype(_F64) + factor * var * m / (m - 1.0)
    y = np.empty_like(xc, order="C") if out is None else out
    if n:
        kernel.apply(xv, None, y.reshape(xv.shape), coef, nthreads, out is not None)
    if tracking:
        _f._commit_running(running_mean, rm, running_var, rv, num_batches_tracked)
    return y, mean.astype(x.dtype), invstd.astype(x.dtype)


def sync_batch_norm_forward(x, gamma, beta, *, allreduce, num_features, eps=1e-5,
                            running_mean=None, running_var=None, momentum=0.1,
                            num_batches_tracked=None, channel_axis=1, out=None,
                            num_threads=None):
    """Training-mode Batch Normalization with the statistics of the global batch.

    Every process (rank) passes its own slice ``x`` of the global batch;
    each channel is normalized with the mean and biased variance over the
    m values of that channel on all ranks together::

        mean[c]   = sum over ranks and values of x / m
        var[c]    = sum over ranks and values of (x - mean[c])**2 / m
        invstd[c] = 1 / sqrt(var[c] + eps)
        y         = (x - mean[c]) * invstd[c] * gamma[c] + beta[c]

    The local sums run in the kernels of :func:`fastbn.batch_norm_forward`
    (float64, shifted by a value of the channel); the per-rank (count, mean,
    variance) are merged exactly by ``allreduce`` (one call, see
    :func:`merge_records`), so unequal local batch sizes, and ranks with an
    empty slice, are exact. On one rank the result is that of
    :func:`fastbn.batch_norm_forward` (to the bit with the baseline
    kernels, to an ulp of the per-channel coefficients with the x86-64-v3
    ones).

    Every rank must make this call together. A rank whose arguments fail
    the checks still takes part in the reduction, then every rank raises.

    Parameters
    ----------
    x : ndarray of float32 or float64
        This rank's slice: (N, C), (N, C, L), (N, C, H, W) or
        (N, C, D, H, W) with ``channel_axis=1``, channels last with
        ``channel_axis=-1``. N (or any axis but the channels) may be 0. The
        same dtype on every rank.
    gamma, beta : ndarray, shape (C,), dtype of x, or None
        Scale and shift; None means 1 and 0. The same on every rank.
    allreduce : callable
        ``allreduce(records)`` with ``records`` a C-contiguous float64 array
        of shape ``(4 + C, 4)``: replaces it in place (or returns an array
        of that shape) with the combination of every rank's array under
        :func:`merge_records`, the same bits on every rank.
        ``mpi_allreduce(comm)`` is that for an mpi4py communicator. Its
        attributes ``rank`` and ``size``, when it has them, name the ranks
        in error messages.
    num_features : int
        C, the same on every rank: it sizes the reduction buffer, so that a
        rank whose x has another channel count still joins the reduction.
    eps : float, default 1e-5
    running_mean, running_var : ndarray, shape (C,), dtype of x, or None
        Updated in place as in :func:`fastbn.batch_norm_forward`, with the
        global statistics and the unbiased variance ``var * m / (m - 1)``;
        given identical on every rank, they stay identical to the bit.
    momentum : float in [0, 1] or None, default 0.1
    num_batches_tracked : ndarray holding one integer, or None
    channel_axis : {1, -1}, default 1
    out : ndarray or None
        As in :func:`fastbn.batch_norm_forward`; ``out=x`` works in place.
    num_threads : int > 0 or None
        OpenMP threads of this rank's kernels.

    Returns
    -------
    y : ndarray, shape and dtype of x (``out`` when given)
    mean, invstd : ndarray, shape (C,), dtype of x
        The global batch statistics, the same on every rank, for
        :func:`sync_batch_norm_backward`.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.batch_norm_forward`, on every rank when any rank's
        arguments fail (the failing rank raises its own error with its rank
        added; the others name the failing rank(s) and the problem). Also
        ``TypeError`` when the ranks pass different dtypes, and
        ``ValueError("Expected more than 1 value per channel when training,
        ...")`` when the global batch has at most one value per channel.
    RuntimeError
        The ranks made different collective calls (a forward on some, a
        backward on others).
    """
    _check_allreduce(allreduce)
    return _forward(x, gamma, beta, allreduce=allreduce,
                    num_features=_check_num_features(num_features), eps=eps,
                    running_mean=running_mean, running_var=running_var, momentum=momentum,
                    num_batches_tracked=num_batches_tracked, channel_axis=channel_axis,
                    out=out, num_threads=num_threads)


# ----------------------------------------------------------- backward ----

def _backward(dy, x, gamma, mean, invstd, *, allreduce, num_features, channel_axis, out,
              num_threads, dtype=None, ndims=(2, 3, 4, 5),
              expected="2-D to 5-D input (N, C, ...)", who="sync_batch_norm_backward"):
    C = num_features
    call = _Call(who, allreduce, C, "float32 or float64" if dtype is None else str(dtype),
                 expected)
    try:
        ca = _check_input(who, x, C, channel_axis, dtype, ndims, expected)
        call.itemsize(x.dtype)
        _check_array(who, "dy", dy, 1, x.dtype)
        if dy.shape != x.shape:
            raise _coded(ValueError(f"{who}: dy must have the shape of x {x.shape}, got "
                                    f"{dy.shape}"), _E_SHAPE)
        nthreads = _f._check_num_threads(num_threads)
        g = None if gamma is None else _f._check_vector("gamma", gamma, x.dtype, C)
        if mean is None or invstd is None:
            raise ValueError("mean and invstd (from sync_batch_norm_forward) are required, "
                             "got None")
        mu = _f._check_vector("mean", mean, x.dtype, C)
        istd = _f._check_vector("invstd", invstd, x.dtype, C)
        if out is not None:
            _f._check_out(out, x, {"dy": dy, "x": x, "gamma": gamma, "mean": mean,
                                   "invstd": invstd}, in_place="dy")
        kernel, xc, xv, n = _view(x, ca)
        dyv = np.ascontiguousarray(dy).reshape(xv.shape)
        body = call.body
        body[:, 0] = TAG_SUM
        body[:, 3] = n
        if n:
            sums = np.empty((C, 2))
            kernel.sums(dyv, xv, mu.astype(_F64), sums, nthreads)
            body[:, 1:3] = sums
    except Exception as exc:  # noqa: BLE001 - told to every rank, raised after the collective
        call.fail(exc, (TAG_SUM, 0.0, 0.0, 0.0))
    rec = call.reduce(TAG_SUM)

    body = rec[HEADER:]
    sdy, sdyc, m = body[:, 1], body[:, 2], body[0, 3]
    # the map of fastbn._stats.backward_coef, with the global sums and count
    with np.errstate(all="ignore"):
        i64 = istd.astype(_F64)
        dgamma = i64 * sdyc
        a = i64 * (g.astype(_F64) if g is not None else 1.0)
        coef = np.empty((C, 4))
        coef[:, 0] = mu
        coef[:, 1] = a
        coef[:, 2] = a * i64 * dgamma / m
        coef[:, 3] = a * sdy / m
    dx = np.empty_like(xc, order="C") if out is None else out
    if n:
        kernel.apply(dyv, xv, dx.reshape(xv.shape), coef, nthreads, out is not None)
    return dx, dgamma.astype(x.dtype), sdy.astype(x.dtype)


def sync_batch_norm_backward(dy, x, gamma, mean, invstd, *, allreduce, num_features,
                             channel_axis=1, out=None, num_threads=None):
    """Gradients of :func:`sync_batch_norm_forward`, with one reduction.

    With m the global number of values per channel and the global sums of
    every rank's slice (one ``allreduce`` of ``(sum dy, sum dy*(x - mean),
    count)`` per channel)::

        dbeta[c]  = sum(dy)
        dgamma[c] = invstd[c] * sum(dy * (x - mean[c]))
        dx        = gamma*invstd * dy - gamma*invstd**2*dgamma/m * (x - mean)
                    - gamma*invstd*dbeta/m

    which is the single-process :func:`fastbn.batch_norm_backward` on the
    concatenated batch. ``dgamma`` and ``dbeta`` are the gradients of the
    sum over the ranks of the losses whose gradients ``dy`` are: the same on
    every rank and already complete; exclude them from a gradient
    all-reduce (and divide them by the number of ranks if the other
    gradients are averaged rather than summed).

    Parameters
    ----------
    dy : ndarray
        Gradient with respect to this rank's y; shape and dtype of x.
    x : ndarray
        This rank's input of the forward.
    gamma : ndarray, shape (C,), or None
    mean, invstd : ndarray, shape (C,), dtype of x
        As returned by :func:`sync_batch_norm_forward`.
    allreduce : callable
        As in :func:`sync_batch_norm_forward`.
    num_features : int
        C, the same on every rank.
    channel_axis : {1, -1}, default 1
    out : ndarray or None
        For dx; ``out=dy`` works in place.
    num_threads : int > 0 or None

    Returns
    -------
    dx : ndarray, shape and dtype of x
    dgamma, dbeta : ndarray, shape (C,), dtype of x
        The same on every rank.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.batch_norm_backward`, on every rank when any
        rank's arguments fail.
    RuntimeError
        The ranks made different collective calls.
    """
    _check_allreduce(allreduce)
    return _backward(dy, x, gamma, mean, invstd, allreduce=allreduce,
                     num_features=_check_num_features(num_features),
                     channel_axis=channel_axis, out=out, num_threads=num_threads)


# -------------------------------------------------------------- layer ----

_SETTINGS = ("num_features", "dtype", "channel_axis", "eps", "momentum", "affine",
             "track_running_stats")


class SyncBatchNorm(BatchNorm):
    """Batch Normalization with the statistics of the batch of all processes.

    For data-parallel training with MPI: every process (rank of ``comm``)
    holds a slice of the global batch, and in training mode each channel is
    normalized with the mean and variance of the global batch, as
    ``torch.nn.SyncBatchNorm`` does. Each training forward makes one
    ``Allreduce`` of one float64 buffer of ``4 * (4 + C)`` values, and each
    backward one more; the per-rank counts, means and variances are merged
    exactly (:func:`merge_records`), so the local batch sizes may differ and
    may be 0. The running statistics are updated with the global statistics
    and stay the same to the bit on every rank. Eval mode, as in PyTorch,
    communicates nothing: it normalizes with the running statistics (or,
    without them, with the local batch's statistics).

    Apart from ``comm`` and ``allreduce`` the parameters, attributes and
    methods are those of :class:`fastbn.layers.BatchNorm` (PyTorch's
    ``BatchNorm*d`` semantics and ``state_dict`` keys); the layer accepts
    2-D to 5-D input, or what the layer it was made from accepts
    (:meth:`from_batch_norm`).

    Parameters
    ----------
    num_features : int
        C, the same on every rank.
    eps, momentum, affine, track_running_stats, dtype, channel_axis, num_threads
        As in :class:`fastbn.layers.BatchNorm`; the same on every rank
        (checked at construction).
    comm : mpi4py.MPI.Intracomm or None, keyword-only
        The processes to synchronize over; None is ``MPI.COMM_WORLD``. Any
        intracommunicator works (``comm.Split`` for groups of ranks). Or an
        object that forwards mpi4py's ``Get_rank``, ``Get_size``,
        ``Allreduce`` and ``allgather`` to one.
    allreduce : callable or None, keyword-only
        Instead of ``comm``: the reduction of :func:`sync_batch_norm_forward`
        (for a transport other than MPI); then nothing is checked at
        construction and mpi4py is not needed.

    Attributes
    ----------
    comm : the communicator (None with ``allreduce``)
    dgamma, dbeta : ndarray, shape (C,), or None
        After a training-mode backward: the gradients of the sum over the
        ranks of the losses whose gradients ``dy`` are, the same on every
        rank and already complete. Leave them out of the gradient
        all-reduce of the other parameters (if that averages rather than
        sums, divide them by ``comm.Get_size()``).

    Raises
    ------
    ImportError
        mpi4py is missing (the message says ``pip install "fastbn[mpi]"``
        and how to get Open MPI).
    TypeError, ValueError
        As :class:`fastbn.layers.BatchNorm`; ``comm`` not a communicator;
        both ``comm`` and ``allreduce``. ``ValueError`` on every rank when
        the ranks construct the layer with different settings (num_features,
        dtype, channel_axis, eps, momentum, affine, track_running_stats).

    Notes
    -----
    Construction is a collective operation (one ``allgather`` of the
    settings), and so are the training-mode :meth:`forward` and
    :meth:`backward`: every rank must call them in the same order. A rank
    whose input fails the checks (wrong channel count, dtype, number of
    dimensions, a ``dy`` of the wrong shape) still takes part, then every
    rank raises, naming the failing rank(s): no rank hangs. Ranks that are
    in different modes (training on some, eval on others) do hang, as in
    PyTorch. A pickled (or deep-copied) layer leaves its communicator
    behind: the copy synchronizes over ``MPI.COMM_WORLD``.

    Examples
    --------
    Run with ``mpirun -n 2 python script.py``::

        from mpi4py import MPI
        import numpy as np
        from fastbn import SyncBatchNorm

        comm = MPI.COMM_WORLD
        bn = SyncBatchNorm(16, comm=comm)
        x = np.random.default_rng(comm.rank).standard_normal((8, 16, 5, 5), np.float32)
        y = bn(x)                          # normalized with the global statistics
        dx = bn.backward(np.ones_like(y))  # bn.dgamma, bn.dbeta: global, same on every rank
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, channel_axis=1,
                 num_threads=None, *, comm=None, allreduce=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype,
                         channel_axis, num_threads)
        cls = type(self).__name__
        if allreduce is not None:
            if comm is not None:
                raise ValueError(f"{cls}: give comm or allreduce, not both")
            _check_allreduce(allreduce)
            self.comm = None
            self._allreduce = allreduce
        else:
            if comm is None:
                comm = _import_mpi().COMM_WORLD
            self._allreduce = mpi_allreduce(comm)
            self.comm = comm
            self._agree()
        self._synced = False  # the last forward was a synchronized one

    def _agree(self):
        """Every rank built the layer with the same settings (one allgather)."""
        mine = tuple(str(getattr(self, k)) if k == "dtype" else getattr(self, k)
                     for k in _SETTINGS)
        everyone = self.comm.allgather(mine)
        bad = []
        for i, key in enumerate(_SETTINGS):
            values = {}
            for rank, theirs in enumerate(everyone):
                values.setdefault(theirs[i], []).append(rank)
            if len(values) > 1:
                bad.append(f"{key}: " + "; ".join(
                    f"{v!r} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                    for v, r in values.items()))
        if bad:
            raise ValueError(f"{type(self).__name__}: every rank must build the layer with the "
                             f"same settings, got " + " | ".join(bad))

    def _reduction(self):
        if self._allreduce is None:  # unpickled: the default communicator
            self.comm = _import_mpi().COMM_WORLD
            self._allreduce = mpi_allreduce(self.comm)
        return self._allreduce

    @classmethod
    def from_batch_norm(cls, layer, comm=None, *, allreduce=None):
        """A SyncBatchNorm with the settings, arrays and mode of a BatchNorm layer.

        The counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
        for one layer: the new layer shares ``layer``'s parameter and
        running-statistics arrays (an optimizer holding them keeps working)
        and accepts the input ``layer`` accepts (a BatchNorm2d's 4-D only).
        Collective, like the constructor.

        Parameters
        ----------
        layer : fastbn.layers.BatchNorm
        comm, allreduce
            As in :class:`SyncBatchNorm`.

        Returns
        -------
        SyncBatchNorm
        """
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"layer must be a fastbn BatchNorm layer, got "
                            f"{type(layer).__name__}")
        new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
                  layer.track_running_stats, layer.dtype, layer.channel_axis,
                  layer.num_threads, comm=comm, allreduce=allreduce)
        new._ndims, new._expected = layer._ndims, layer._expected
        new._gamma, new._beta = layer._gamma, layer._beta
        new.running_mean, new.running_var = layer.running_mean, layer.running_var
        new.num_batches_tracked = layer.num_batches_tracked
        new.training = layer.training
        return new

    def _common(self):
        return dict(allreduce=self._reduction(), num_features=self.num_features,
                    channel_axis=self.channel_axis, num_threads=self.num_threads,
                    dtype=self.dtype, ndims=self._ndims, expected=self._expected,
                    who=f"{type(self).__name__}({self.num_features})")

    def forward(self, x):
        """Normalize x; in training mode with the global batch statistics (collective).

        Training mode: one ``Allreduce``; the running statistics are
        updated with the global statistics. Eval mode: as
        :meth:`fastbn.layers.BatchNorm.forward`, with no communication.

        Parameters
        ----------
        x : ndarray, the layer's dtype
            This rank's slice of the batch; its N may be 0.

        Returns
        -------
        y : ndarray, shape and dtype of x

        Raises
        ------
        TypeError, ValueError
            On every rank, when the input of any rank fails the checks;
            ``ValueError`` when the global batch has one value per channel.
        """
        if not self.training:
            self._synced = False
            if isinstance(x, np.ndarray) and x.size == 0:  # an empty slice: nothing to do
                self._check_input(x)
                self._cache = (x, None, None, False)
                return np.empty_like(x, order="C")
            return super().forward(x)
        tracking = self.track_running_stats
        y, mean, invstd = _forward(
            x, self._gamma, self._beta, eps=self.eps,
            running_mean=self.running_mean if tracking else None,
            running_var=self.running_var if tracking else None, momentum=self.momentum,
            num_batches_tracked=self.num_batches_tracked if tracking else None, out=None,
            **self._common())
        self._cache = (x, mean, invstd, True)
        self._synced = True
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient with respect to this rank's input; stores the global dgamma, dbeta.

        After a training-mode forward: one ``Allreduce`` (collective). After
        an eval-mode forward: as :meth:`fastbn.layers.BatchNorm.backward`.

        Parameters
        ----------
        dy : ndarray
            Gradient with respect to this rank's output of the last forward.

        Returns
        -------
        dx : ndarray, shape and dtype of this rank's x
        """
        if not self._synced:
            if self._cache is not None and self._cache[0].size == 0:  # eval, empty slice
                x = self._cache[0]
                if not isinstance(dy, np.ndarray) or dy.shape != x.shape:
                    raise ValueError(f"{type(self).__name__}.backward: dy must be an ndarray "
                                     f"of the shape of the last forward's input {x.shape}")
                if self.affine:
                    self.dgamma = np.zeros(self.num_features, self.dtype)
                    self.dbeta = np.zeros(self.num_features, self.dtype)
                return np.empty_like(x, order="C")
            return super().backward(dy)
        x, mean, invstd, _ = self._cache
        dx, dgamma, dbeta = _backward(dy, x, self._gamma, mean, invstd, out=None,
                                      **self._common())
        if self.affine:
            self.dgamma, self.dbeta = dgamma, dbeta
        return dx

    def __repr__(self):
        text = super().__repr__()
        if self.comm is not None and self._allreduce is not None:
            text = text[:-1] + f", rank {self._allreduce.rank} of {self._allreduce.size})"
        return text

    def __getstate__(self):
        # A communicator does not pickle: an unpickled layer uses MPI.COMM_WORLD.
        state = super().__getstate__()
        state["comm"] = None
        state["_allreduce"] = None
        state["_synced"] = False
        return state
