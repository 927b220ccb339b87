"""The failure protocol of a synchronized pass: no rank is ever left waiting.

Every rank checks its arguments, then joins the one reduction whatever
happened: a rank whose checks raised (anything, ``KeyboardInterrupt``
included) writes its failure into the header and a neutral body (count 0).
After the reduction every rank looks at the header and raises when any
rank failed or when the ranks disagree on what they must share (the dtype,
``num_features``, ``eps``, the running statistics' weight, ``unbiased``, the
fused activation and its ``negative_slope``):

- the failing rank raises its own error, its rank added to the message
  (an exception that is not an ``Exception``, such as ``KeyboardInterrupt``,
  is raised again as it was);
- the others raise a ``TypeError`` or ``ValueError`` (``RuntimeError`` for
  the rest) that names the failing rank(s) and, from the header alone, the
  problem.

The header's records are laid out in :mod:`fastbn.distributed._records`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from fastbn.distributed._records import (ACTIVATION, DETAIL, EPS, FACTOR, FAILED, FEATURES,
                                         FIRST, HEADER, DTYPE, RECORD, SLOPE, TAG_FIRST,
                                         TAG_RANGE, UNBIASED)
from fastbn import _dtypes
from fastbn._typing import Allreduce

_F64 = np.dtype(np.float64)

# error codes (header record FIRST, p1), from the ``problem`` of fastbn._checks
_E_OTHER, _E_NOT_ARRAY, _E_DTYPE, _E_NDIM, _E_CHANNELS, _E_SHAPE = 1, 2, 3, 4, 5, 6
_CODES = {"other": _E_OTHER, "not_array": _E_NOT_ARRAY, "dtype": _E_DTYPE, "ndim": _E_NDIM,
          "channels": _E_CHANNELS, "shape": _E_SHAPE}
# exception kinds (header record FIRST, p2)
_KIND_TYPE, _KIND_VALUE, _KIND_OTHER, _KIND_BASE = 1, 2, 3, 4
_ARGS = ("x", "dy")
_RANGES = (DTYPE, FEATURES, EPS, FACTOR, UNBIASED, ACTIVATION, SLOPE)
#: the ranges a rank sets from its arguments (left empty when its checks fail)
_SETTINGS = (DTYPE, EPS, FACTOR, UNBIASED, ACTIVATION, SLOPE)
_ACTIVATION_NAMES = {0: "None", 1: "'relu'", 2: "'leaky_relu'"}


# bfloat16's code: ml_dtypes registers it at a type number that depends on the process
_BFLOAT16_CODE = -2


def _dtype_name(code: float) -> str:
    """The dtype a code of :func:`_dtype_code` stands for, as a message shows it."""
    if int(code) == _BFLOAT16_CODE:
        return "bfloat16"
    num, swapped = divmod(int(code), 2)
    for t in set(np.sctypeDict.values()):
        try:
            dtype = np.dtype(t)
        except TypeError:
            continue
        if dtype.num == num:
            other = "big" if sys.byteorder == "little" else "little"
            return dtype.name + (f" ({other}-endian, not this machine's byte order)"
                                 if swapped else "")
    return f"of type number {num}"


def _dtype_code(dtype_str: str) -> int:
    """A dtype (its ``str``, '>f4') as one float: its number and its byte order
    (bfloat16, whose ``str`` is '<V2', is told by its name)."""
    if dtype_str == "bfloat16":
        return _BFLOAT16_CODE
    dtype = np.dtype(dtype_str)
    return 2 * dtype.num + (0 if dtype.isnative else 1)


class Collective:
    """One synchronized pass on one rank: the records, the local failure, the reduction.

    Parameters
    ----------
    who : str
        The function or layer, for messages.
    allreduce : callable
        The reduction; its ``rank`` and ``size`` attributes, when it has
        them, name the ranks in messages.
    num_features : int
        C, the body's length (agreed on in the header).
    expected_dtype, expected_input : str
        What the input should be, for messages about another rank's input.
    """

    def __init__(self, who: str, allreduce: Allreduce, num_features: int, expected_dtype: str,
                 expected_input: str) -> None:
        self.who = who
        self.expected_input = expected_input
        self.expected_dtype = expected_dtype
        self.allreduce = allreduce
        self.rank = getattr(allreduce, "rank", None)
        self.size = getattr(allreduce, "size", None)
        self.C = num_features
        self.failure: BaseException | None = None
        rec = np.zeros((HEADER + num_features, RECORD))
        rec[FAILED] = (TAG_RANGE, np.inf, -np.inf, 0.0)
        rec[FIRST] = (TAG_FIRST, np.inf, 0.0, 0.0)
        rec[DETAIL] = (TAG_FIRST, np.inf, 0.0, 0.0)
        for i in _RANGES:
            rec[i] = (TAG_RANGE, np.inf, -np.inf, 1.0)
        rec[FEATURES, 1:3] = num_features
        self.records = rec

    @property
    def body(self) -> NDArray[np.float64]:
        """The C channel records (a view)."""
        return self.records[HEADER:]

    def settings(self, dtype: np.dtype[Any], eps: float = 0.0, factor: float = -1.0,
                 unbiased: bool = True, act: int = 0, slope: float = 0.0) -> None:
        """This rank's dtype of x, eps, running-statistics weight,
        running-variance convention and fused activation (its kernel code,
        and its slope, compared only for leaky_relu)."""
        rec = self.records
        rec[DTYPE, 1:3] = _dtype_code(_dtypes.tag(dtype))
        rec[EPS, 1:3] = eps
        rec[FACTOR, 1:3] = factor
        rec[UNBIASED, 1:3] = float(unbiased)
        rec[ACTIVATION, 1:3] = act
        rec[SLOPE, 1:3] = slope if act == 2 else 0.0

    def fail(self, exc: BaseException, body: tuple[float, ...]) -> None:
        """Record a local failure (any BaseException); the body becomes ``body``
        (a neutral record), the settings this rank could not check empty."""
        self.failure = exc
        kind, *detail = getattr(exc, "problem", ("other",))
        code = _CODES.get(kind, _E_OTHER)
        d1 = d2 = 0
        if kind in ("not_array", "dtype", "shape"):
            if detail and detail[0] in _ARGS:
                d1 = _ARGS.index(detail[0])
                if kind == "dtype":
                    d2 = _dtype_code(detail[1])
            else:  # another argument: the other ranks are told its exception type only
                code = _E_OTHER
        elif kind in ("ndim", "channels"):
            d1 = detail[0]
        exc_kind = (_KIND_TYPE if isinstance(exc, TypeError)
                    else _KIND_VALUE if isinstance(exc, ValueError)
                    else _KIND_OTHER if isinstance(exc, Exception) else _KIND_BASE)
        r = float(self.rank) if self.rank is not None else 0.0
        rec = self.records
        rec[FAILED, 1:] = (r, r, 1.0)
        rec[FIRST, 1:] = (r, code, exc_kind)
        rec[DETAIL, 1:] = (r, d1, d2)
        for i in _SETTINGS:
            rec[i, 1:3] = (np.inf, -np.inf)
        rec[HEADER:] = body

    def reduce(self, tag: float) -> NDArray[np.float64]:
        """The one collective; then raise on every rank if any rank failed or
        the ranks disagree. Returns the reduced records."""
        result = self.allreduce(self.records)
        if result is not None and result is not self.records:
            result = np.asarray(result, dtype=_F64).reshape(self.records.shape)
            self.records[...] = result
        rec = self.records
        expected = np.array([TAG_RANGE, TAG_FIRST, TAG_FIRST] + [TAG_RANGE] * len(_RANGES)
                            + [tag] * self.C)
        lo, hi = rec[FEATURES, 1], rec[FEATURES, 2]
        if lo != hi:  # a shorter buffer than ours merged into the front of ours
            raise ValueError(f"{self.who}: the ranks disagree on num_features: "
                             f"{lo:g} on some ranks, {hi:g} on others (this rank: {self.C}); "
                             f"every rank must pass the same")
        if not np.array_equal(rec[:, 0], expected):
            raise RuntimeError(f"{self.who}: the ranks made different calls in the same "
                               f"collective (say a forward on some ranks and a backward on "
                               f"others); every rank must run the same sequence of "
                               f"training-mode forwards and backwards")
        n_bad = int(rec[FAILED, 3])
        if n_bad:
            self._raise(n_bad)
        self._agree(DTYPE, "the dtype of x", _dtype_name, TypeError)
        self._agree(EPS, "eps", lambda v: f"{v:g}", ValueError)
        self._agree(FACTOR, "momentum (the running statistics' weight this batch, -1 for "
                            "none)", lambda v: f"{v:g}", ValueError)
        self._agree(UNBIASED, "unbiased", lambda v: str(bool(v)), ValueError)
        self._agree(ACTIVATION, "activation", lambda v: _ACTIVATION_NAMES.get(int(v), f"{v:g}"),
                    ValueError)
        self._agree(SLOPE, "negative_slope (of activation 'leaky_relu')", lambda v: f"{v:g}",
                    ValueError)
        return rec

    def _agree(self, index: int, what: str, show: Callable[[float], str],
               cls: type[Exception]) -> None:
        lo, hi = self.records[index, 1], self.records[index, 2]
        if lo != hi:
            raise cls(f"{self.who}: the ranks disagree on {what}: {show(lo)} on some ranks, "
                      f"{show(hi)} on others; every rank must pass the same")

    def _ranks(self, n_bad: int) -> str:
        first, last = int(self.records[FAILED, 1]), int(self.records[FAILED, 2])
        if self.rank is None:
            return "one rank" if n_bad == 1 else f"{n_bad} ranks"
        if n_bad == 1:
            return f"rank {first}"
        if n_bad == 2:
            return f"ranks {first} and {last}"
        return f"{n_bad} ranks ({first} to {last})"

    def _describe(self, n_bad: int) -> str:
        """What went wrong on the lowest failing rank, from the header alone
        (FIRST and DETAIL are merged apart, so without rank numbers two failing
        ranks may mix: then only the exception type is said)."""
        code, kind = int(self.records[FIRST, 2]), int(self.records[FIRST, 3])
        if self.rank is None and n_bad > 1:
            code = _E_OTHER
        d1, d2 = int(self.records[DETAIL, 2]), int(self.records[DETAIL, 3])
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

    def _raise(self, n_bad: int) -> NoReturn:
        of = f" of {self.size}" if self.size is not None else ""
        ranks = self._ranks(n_bad)
        note = "every rank raises an error for this call"
        if self.failure is not None:
            exc = self.failure
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: as they were
                raise exc
            where = f"rank {self.rank}{of}" if self.rank is not None else "this rank"
            also = "" if n_bad == 1 else f"; {ranks}{of} failed"
            message = f"{exc} [{where}{also}; {note}]"
            try:
                new = type(exc)(message)
            except Exception:  # noqa: BLE001 - an exception type with another signature
                raise exc from None
            raise new from exc
        kind = int(self.records[FIRST, 3])
        if kind == _KIND_BASE:
            raise RuntimeError(f"{self.who}: {ranks}{of} was interrupted while checking its "
                               f"arguments (KeyboardInterrupt or another BaseException, "
                               f"raised again on that rank) [{note}]")
        cls = {_KIND_TYPE: TypeError, _KIND_VALUE: ValueError}.get(kind, RuntimeError)
        raise cls(f"{self.who}: bad input on {ranks}{of}: {self._describe(n_bad)} [{note}]")
