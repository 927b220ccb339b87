"""SyncBatchNorm: the layer of :mod:`fastbn.layers` over the synchronized passes."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from fastbn import _checks
from fastbn.distributed._mpi import _import_mpi, is_world, mpi_allreduce, refuse_to_pickle
from fastbn.distributed._passes import _check_allreduce, backward, forward
from fastbn._saved import Saved, for_batch
from fastbn.layers import BatchNorm
from fastbn._typing import Activation, Allreduce, FloatArray

__all__ = ["SyncBatchNorm"]

_SETTINGS = ("num_features", "dtype", "channel_axis", "eps", "momentum", "affine",
             "track_running_stats", "unbiased", "activation", "negative_slope", "memory_saving",
             "renorm", "renorm_clipping", "virtual_batch_size")


class SyncBatchNorm(BatchNorm):
    """Batch Normalization with the statistics of the batch of all processes.

    For data-parallel training with MPI: every process (rank of ``comm``)
    holds a slice of the global batch, and in training mode each channel is
    normalized with the mean and variance of the global batch, as
    ``torch.nn.SyncBatchNorm`` does. Each training forward makes one
    ``Allreduce`` of one float64 buffer of ``4 * (10 + C)`` values, and each
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
    eps, momentum, affine, track_running_stats, dtype, channel_axis, num_threads, unbiased
        As in :class:`fastbn.layers.BatchNorm`; the same on every rank
        (checked at construction).
    activation, negative_slope, memory_saving : keyword-only
        As in :class:`fastbn.layers.BatchNorm`; the same on every rank
        (checked at construction). The training-mode passes fuse the
        activation (:func:`sync_batch_norm_forward`,
        :func:`sync_batch_norm_backward`); with ``memory_saving`` the
        layer keeps this rank's y instead of x and its training backward
        is :func:`sync_batch_norm_backward_from_output`, which raises on
        every rank when gamma has a zero.
    renorm, renorm_clipping, virtual_batch_size : keyword-only
        As in :class:`fastbn.layers.BatchNorm`; the same on every rank
        (checked at construction). ``renorm`` runs over the global batch:
        r and d come from the global statistics and the running ones (one
        ``Allreduce`` per pass, as without it). Ghost groups stay per
        rank: with ``virtual_batch_size`` each rank normalizes the virtual
        batches of its own slice by their own statistics, without
        communication, and updates its running statistics from them alone
        (the ranks' running statistics then differ, as their slices do).
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
        dtype, channel_axis, eps, momentum, affine, track_running_stats,
        unbiased, activation, negative_slope, memory_saving).

    Notes
    -----
    Construction is a collective operation (one ``allgather`` of the
    settings), and so are the training-mode :meth:`forward` and
    :meth:`backward`: every rank must call them in the same order. A rank
    whose input fails the checks (wrong channel count, dtype, number of
    dimensions, a ``dy`` of the wrong shape) still takes part, then every
    rank raises, naming the failing rank(s): no rank hangs. Ranks that are
    in different modes (training on some, eval on others) do hang, as in
    PyTorch.

    Copies keep the communicator or are refused, never rebound to another
    group: ``copy.copy`` and ``copy.deepcopy`` keep ``comm`` (and an
    ``allreduce``) as they are, so the copy synchronizes over the same
    ranks (its arrays are copies, as for :class:`fastbn.layers.BatchNorm`).
    Pickling keeps a layer on ``MPI.COMM_WORLD`` (the unpickled layer
    synchronizes over the COMM_WORLD of the process that loads it) and a
    layer with an ``allreduce`` that pickles; a layer on any other
    communicator (a ``comm.Split`` group, a ``Dup``, a wrapper) raises
    ``TypeError`` when pickled: pickle its :meth:`state_dict` and build the
    layer on the communicator again.

    Examples
    --------
    Run with ``mpirun -n 2 python -m mpi4py script.py`` (``-m mpi4py`` makes an
    uncaught exception on one rank abort every rank instead of leaving the
    others waiting in a collective)::

        from mpi4py import MPI
        import numpy as np
        from fastbn import SyncBatchNorm

        comm = MPI.COMM_WORLD
        bn = SyncBatchNorm(16, comm=comm)
        x = np.random.default_rng(comm.rank).standard_normal((8, 16, 5, 5), np.float32)
        y = bn(x)                          # normalized with the global statistics
        dx = bn.backward(np.ones_like(y))  # bn.dgamma, bn.dbeta: global, same on every rank
    """

    #: the communicator (None with a caller's ``allreduce``) and the reduction
    comm: Any
    _allreduce: Any

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 dtype: DTypeLike = np.float32, channel_axis: int = 1,
                 num_threads: int | None = None, *, unbiased: bool = True,
                 activation: Activation = None, negative_slope: float = 0.01,
                 memory_saving: bool = False, renorm: bool = False,
                 renorm_clipping: dict[str, float] | None = None,
                 virtual_batch_size: int | None = None, comm: Any = None,
                 allreduce: Allreduce | None = None) -> None:
        """Build the layer (collective); the parameters are those of the class."""
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype,
                         channel_axis, num_threads, unbiased=unbiased, activation=activation,
                         negative_slope=negative_slope, memory_saving=memory_saving,
                         renorm=renorm, renorm_clipping=renorm_clipping,
                         virtual_batch_size=virtual_batch_size)
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

    def _agree(self) -> None:
        """Every rank built the layer with the same settings (one allgather)."""
        mine = tuple(str(v) if k == "dtype" else tuple(v.items()) if isinstance(v, dict) else v
                     for k, v in ((k, getattr(self, k)) for k in _SETTINGS))
        everyone = self.comm.allgather(mine)
        bad = []
        for i, key in enumerate(_SETTINGS):
            values: dict[Any, list[int]] = {}
            for rank, theirs in enumerate(everyone):
                values.setdefault(theirs[i], []).append(rank)
            if len(values) > 1:
                bad.append(f"{key}: " + "; ".join(
                    f"{v!r} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                    for v, r in values.items()))
        if bad:
            raise ValueError(f"{type(self).__name__}: every rank must build the layer with the "
                             f"same settings, got " + " | ".join(bad))

    def _reduction(self) -> Any:
        if self._allreduce is None:  # unpickled: the default communicator
            self.comm = _import_mpi().COMM_WORLD
            self._allreduce = mpi_allreduce(self.comm)
        return self._allreduce

    @classmethod
    def from_batch_norm(cls, layer: BatchNorm, comm: Any = None, *,
                        allreduce: Allreduce | None = None) -> SyncBatchNorm:
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
                  layer.num_threads, unbiased=layer.unbiased, activation=layer.activation,
                  negative_slope=layer.negative_slope, memory_saving=layer.memory_saving,
                  renorm=layer.renorm, renorm_clipping=layer.renorm_clipping,
                  virtual_batch_size=layer.virtual_batch_size, comm=comm, allreduce=allreduce)
        new._share_arrays(layer)
        return new

    def _common(self) -> dict[str, Any]:
        return dict(allreduce=self._reduction(), num_features=self.num_features,
                    channel_axis=self.channel_axis, num_threads=self.num_threads,
                    dtype=self.dtype, ndims=self._ndims, expected=self._expected,
                    who=f"{type(self).__name__}({self.num_features})")

    def forward(self, x: FloatArray) -> FloatArray:
        """Normalize x; in training mode with the global batch statistics (collective).

        Training mode: one ``Allreduce``; the running statistics are
        updated with the global statistics; the layer's ``activation`` is
        fused into y; with ``renorm``, Batch Renormalization over the global
        batch. With ``virtual_batch_size``, training mode is the rank's own
        Ghost Batch Normalization, with no communication. Eval mode: as :meth:`fastbn.layers.BatchNorm.forward`,
        with no communication.

        Parameters
        ----------
        x : ndarray, the layer's dtype (a float32 layer: float16 and bfloat16 too)
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
        if not self.training or self.virtual_batch_size is not None:  # no communication
            if isinstance(x, np.ndarray) and x.size == 0 and not self.training:  # empty slice
                self._check_input(x)
                self._saved = Saved(x, None, None, batch=False)
                return np.empty_like(x, order="C")
            return super().forward(x)
        tracking = self.track_running_stats
        clip = self.renorm_clipping
        y: FloatArray
        y, mean, invstd, *rd = forward(
            x, self._gamma, self._beta, eps=self.eps,
            running_mean=self.running_mean if tracking else None,
            running_var=self.running_var if tracking else None, momentum=self.momentum,
            unbiased=self.unbiased,
            num_batches_tracked=self.num_batches_tracked if tracking else None, out=None,
            activation=self.activation, negative_slope=self.negative_slope,
            renorm=(clip["rmax"], clip["rmin"], clip["dmax"]) if clip else None,
            **self._common())
        self._saved = for_batch(self, x, y, mean, invstd, synced=True)  # memory_saving: y
        if rd:
            self._saved = self._saved._replace(r=rd[0], d=rd[1])
        return y

    __call__ = forward

    def backward(self, dy: FloatArray) -> FloatArray:
        """Gradient with respect to this rank's input; stores the global dgamma, dbeta.

        After a training-mode forward: one ``Allreduce`` (collective), with
        the layer's ``activation`` (:func:`sync_batch_norm_backward`), or
        from this rank's y with ``memory_saving``
        (:func:`sync_batch_norm_backward_from_output`). After an eval-mode
        forward: as :meth:`fastbn.layers.BatchNorm.backward`.

        Parameters
        ----------
        dy : ndarray
            Gradient with respect to this rank's output of the last forward.

        Returns
        -------
        dx : ndarray, shape and dtype of this rank's x

        Raises
        ------
        TypeError, ValueError
            After a training-mode forward, on every rank when the dy of any
            rank fails the checks, or with ``memory_saving`` when gamma has
            a zero; otherwise as :meth:`fastbn.layers.BatchNorm.backward`.
        """
        saved = self._saved
        if saved is None or not saved.synced:
            if saved is not None and saved.array.size == 0:  # eval, empty slice
                _checks.like("dy", dy, saved.array, who=f"{type(self).__name__}.backward")
                if self.affine:
                    self.dgamma = np.zeros(self.num_features, self.dtype)
                    self.dbeta = np.zeros(self.num_features, self.dtype)
                return np.empty_like(saved.array, order="C")
            return super().backward(dy)
        act: dict[str, Any] = dict(activation=saved.activation,
                                   negative_slope=saved.negative_slope, out=None)
        if saved.x is None:  # memory saving: from this rank's y
            dx, dgamma, dbeta = backward(dy, saved.y, saved.gamma, None, saved.invstd,
                                         beta=saved.beta, from_output=True, **act,
                                         **self._common())
        else:
            dx, dgamma, dbeta = backward(dy, saved.x, saved.gamma, saved.mean, saved.invstd,
                                         beta=saved.beta, r=saved.r, d=saved.d, **act,
                                         **self._common())
        if self.affine:
            self.dgamma, self.dbeta = dgamma, dbeta
        return dx

    def __repr__(self) -> str:
        text = super().__repr__()
        if self.comm is not None and self._allreduce is not None:
            text = text[:-1] + f", rank {self._allreduce.rank} of {self._allreduce.size})"
        return text

    def __getstate__(self) -> dict[str, Any]:
        # A communicator does not pickle. COMM_WORLD is found again by name (an
        # unpickled layer binds it on first use); any other is refused rather
        # than silently replaced by COMM_WORLD. An allreduce pickles as it can.
        state = super().__getstate__()
        if self.comm is not None:
            if not is_world(self.comm):
                raise refuse_to_pickle(f"{type(self).__name__}({self.num_features})")
            state["comm"] = None
            state["_allreduce"] = None
        return state

    def __copy__(self) -> SyncBatchNorm:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._saved = None
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> SyncBatchNorm:
        # the communicator (and the transport) are shared, never copied or rebound
        shared = {k: self.__dict__[k] for k in ("comm", "_allreduce", "backend")}
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: v if k in shared else copy.deepcopy(v, memo)
                             for k, v in self.__dict__.items()})
        new._saved = None
        return new
