"""The MPI transport of the synchronized passes (mpi4py, imported on first use).

:class:`mpi_allreduce` makes one ``Allreduce`` of the records with a record
datatype (four contiguous doubles, so that an MPI library that splits the
buffer never splits a record) and :func:`merge_records` as a commutative
user-defined operation. Nothing here knows Batch Normalization.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fastbn import _checks
from fastbn.distributed._records import HEADER, RECORD, merge_records

__all__ = ["mpi_allreduce"]

_F64 = np.dtype(np.float64)
_MPI_HINT = ('fastbn.SyncBatchNorm needs mpi4py and an MPI library: pip install "fastbn[mpi]" '
             '(or pip install mpi4py) with an MPI implementation installed first, e.g. Open MPI '
             '(Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev; conda: conda install '
             '-c conda-forge mpi4py openmpi); then run the script with mpirun -n 2 python -m mpi4py ...')

_mpi_cache: dict[str, Any] = {}


def _import_mpi() -> Any:
    """``mpi4py.MPI``, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI  # type: ignore[import-not-found,unused-ignore]  # optional
    except (ImportError, RuntimeError, OSError) as exc:  # mpi4py, or the MPI library it loads
        raise ImportError(f"{_MPI_HINT} ({type(exc).__name__}: {exc})") from exc
    return MPI


def _mpi_merge(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
    """The MPI user function: ``inoutbuf = inbuf (+) inoutbuf`` over whole records."""
    merge_records(np.frombuffer(inbuf, dtype=_F64), np.frombuffer(inoutbuf, dtype=_F64))


def _mpi_objects(MPI: Any) -> tuple[Any, Any]:
    """The record datatype (4 contiguous doubles) and the merge operation, made once."""
    if "op" not in _mpi_cache:
        record = MPI.DOUBLE.Create_contiguous(RECORD).Commit()
        op = MPI.Op.Create(_mpi_merge, commute=True)
        _mpi_cache.update(record=record, op=op)

        def free() -> None:  # before mpi4py's own finalization (atexit runs last-registered first)
            try:
                if not MPI.Is_finalized():
                    _mpi_cache.pop("op").Free()
                    _mpi_cache.pop("record").Free()
            except Exception:  # noqa: BLE001 - never fail at exit
                pass

        import atexit
        atexit.register(free)
    return _mpi_cache["record"], _mpi_cache["op"]


def is_world(comm: object) -> bool:
    """comm is ``MPI.COMM_WORLD`` itself (the same handle), the one
    communicator a new process can find again by name. (An mpi4py
    communicator means mpi4py.MPI is loaded: this never initializes MPI.)"""
    MPI = sys.modules.get("mpi4py.MPI")
    return MPI is not None and isinstance(comm, MPI.Comm) and comm == MPI.COMM_WORLD


def _world_allreduce() -> mpi_allreduce:
    """An unpickled :class:`mpi_allreduce` of ``MPI.COMM_WORLD``."""
    return mpi_allreduce(_import_mpi().COMM_WORLD)


def refuse_to_pickle(who: str) -> TypeError:
    """The error of pickling something bound to a communicator other than
    ``MPI.COMM_WORLD``: a communicator cannot be sent to another process, and
    binding the copy to COMM_WORLD would synchronize it over other ranks."""
    return TypeError(f"{who} is bound to a communicator other than MPI.COMM_WORLD, which "
                     f"cannot be pickled (a copy bound to COMM_WORLD would synchronize over "
                     f"other ranks); copy.deepcopy keeps the communicator in this process, "
                     f"and state_dict() pickles the state for a layer built on the "
                     f"communicator again")


def _check_comm(comm: object) -> None:
    """comm must be an intracommunicator (an mpi4py Comm, or an object that wraps one)."""
    missing = [name for name in ("Get_rank", "Get_size", "Allreduce", "allgather")
               if not callable(getattr(comm, name, None))]
    if missing:
        raise TypeError(f"comm must be an mpi4py.MPI.Comm (an intracommunicator such as "
                        f"MPI.COMM_WORLD), got {type(comm).__name__} without "
                        f"{', '.join(missing)}")


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
    ValueError
        comm is ``MPI.COMM_NULL``; or, from a call, another rank's buffer is
        longer (the ranks passed different ``num_features``), or the
        records are not a writeable C-contiguous float64 array (they are
        reduced in place; TypeError for another type or dtype).

    Notes
    -----
    A copy (``copy.copy``, ``copy.deepcopy``) keeps the communicator. It
    pickles only when the communicator is ``MPI.COMM_WORLD`` (the unpickled
    one is bound to the COMM_WORLD of the process that loads it); otherwise
    pickling raises ``TypeError``.
    """

    def __init__(self, comm: Any) -> None:
        _check_comm(comm)
        MPI = _import_mpi()
        if isinstance(comm, MPI.Comm) and comm == MPI.COMM_NULL:
            raise ValueError("comm must be a communicator that includes this process (such "
                             "as MPI.COMM_WORLD), got MPI.COMM_NULL")
        is_inter = getattr(comm, "Is_inter", None)
        if callable(is_inter) and is_inter():
            raise TypeError("comm must be an intracommunicator; got an intercommunicator, "
                            "whose Allreduce reduces across its two groups")
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())
        self._record, self._op = _mpi_objects(MPI)
        self._in_place = MPI.IN_PLACE
        self._mpi_error, self._truncate = MPI.Exception, MPI.ERR_TRUNCATE

    def __call__(self, records: NDArray[np.float64]) -> NDArray[np.float64]:
        who = "mpi_allreduce"
        _checks.array("records", records, who=who, what="a numpy.ndarray of float64 (reduced "
                                                        "in place)")
        if records.dtype != _F64:
            raise TypeError(f"{who}: records must have dtype float64, got "
                            f"{_checks.dtype_name(records.dtype)}")
        if not records.flags.c_contiguous or records.size % RECORD:
            raise ValueError(f"{who}: records are reduced in place and must be one C-contiguous "
                             f"buffer of whole records ({RECORD} values each), got shape "
                             f"{records.shape} with strides {records.strides}")
        _checks.in_place("records", records, who=who, what="are reduced in place")
        try:
            self.comm.Allreduce(self._in_place, [records, self._record], op=self._op)
        except self._mpi_error as exc:
            if exc.Get_error_class() != self._truncate:
                raise
            # A longer buffer came from another rank: its num_features is larger.
            raise ValueError(f"the ranks disagree on num_features (this rank: "
                             f"{len(records) - HEADER}; another rank's is larger, so its "
                             f"reduction buffer was too long for this one's): every rank must "
                             f"pass the same [MPI: {exc}]") from None
        return records

    def __repr__(self) -> str:
        return f"mpi_allreduce(rank {self.rank} of {self.size})"

    def __copy__(self) -> mpi_allreduce:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> mpi_allreduce:
        return self  # the same communicator: a deep copy must not leave its group

    def __reduce__(self) -> tuple[Any, ...]:
        if not is_world(self.comm):
            raise refuse_to_pickle("an mpi_allreduce")
        return (_world_allreduce, ())
