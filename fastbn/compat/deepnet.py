"""Drop-in ``Batchnorm`` layer for deepnet-style NumPy nets.

deepnet (https://github.com/parasdahal/deepnet) builds nets from layer
objects with ``params`` (a list of arrays that its solvers update in place),
``forward(X)`` and ``backward(dout) -> (dX, grads)``. Its ``Batchnorm(X_dim)``
flattens the input to (N, C*H*W) and normalizes every column over the batch
with eps = 1e-8, keeping no running statistics (prediction also uses the
statistics of the batch it is given). :class:`Batchnorm` here does the same
through :func:`fastbn.batch_norm_forward` and
:func:`fastbn.batch_norm_backward`, and can replace it in a layer list.

Differences from deepnet's own class, all deliberate:

- ``dgamma`` is summed over the batch and shaped (1, D) like gamma (deepnet
  returns the per-sample products of shape (N, D), which its in-place
  ``param += -lr * grad`` update cannot apply for N > 1), and ``dbeta`` is
  shaped (1, D) rather than (D,);
- a batch of one sample gives ``beta`` (every xhat is 0, as in deepnet's
  arithmetic) instead of going through the kernels, which refuse one value
  per channel in training mode;
- bad input raises a ``ValueError``/``TypeError`` naming the argument;
- X may be float32 (gamma and beta are then cast for the call; the
  gradients keep gamma's dtype), and ``X_dim`` may have any number of
  dimensions (e.g. ``(D,)`` after a fully connected layer).

Formulas: Ioffe & Szegedy (2015), arXiv:1502.03167, Algorithm 1 and
Section 3.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from fastbn import _checks, _dtypes
from fastbn import functional as _functional
from fastbn._typing import FloatArray

__all__ = ["Batchnorm"]


class Batchnorm:
    """Per-activation Batch Normalization over the flattened input, deepnet API.

    For X of shape (N, C, H, W), flattened to (N, D) with D = C*H*W, and every
    column j (Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 1)::

        mu[j]  = mean(X_flat[:, j])
        var[j] = mean((X_flat[:, j] - mu[j])**2)              (biased)
        out    = gamma * (X_flat - mu) / sqrt(var + eps) + beta

    reshaped back to X's shape.

    Parameters
    ----------
    X_dim : tuple of int
        Shape of one sample, (C, H, W) in deepnet; any tuple of positive
        ints (or one int) is accepted, D being their product.
    eps : float, keyword-only, default 1e-8
        deepnet's constant.
    dtype : {numpy.float64, numpy.float32}, keyword-only, default numpy.float64
        dtype of gamma and beta (deepnet uses float64).
    num_threads : int > 0 or None, keyword-only
        OpenMP threads for the kernels; None uses the OpenMP default.

    Attributes
    ----------
    gamma, beta : ndarray, shape (1, D)
        Scale (ones) and shift (zeros).
    params : list of ndarray
        ``[gamma, beta]``: the very arrays, so that deepnet's solvers update
        the layer by updating the list's items in place.
    d_X, h_X, w_X : int
        The three entries of a 3-tuple ``X_dim``, as deepnet stores them.

    Raises
    ------
    TypeError
        X_dim not made of ints; a dtype other than float32 or float64.
    ValueError
        Non-positive entries of X_dim, or more values per sample than
        memory holds; a bad eps.
    """

    def __init__(self, X_dim: int | tuple[int, ...], *, eps: float = 1e-8,
                 dtype: DTypeLike = np.float64, num_threads: int | None = None) -> None:
        """Build the layer; the parameters are those of the class (``help(Batchnorm)``)."""
        who = "Batchnorm"
        if _checks.is_int(X_dim):
            dims: tuple[Any, ...] = (X_dim,)
        elif isinstance(X_dim, (tuple, list)) and X_dim and all(map(_checks.is_int, X_dim)):
            dims = tuple(X_dim)
        else:
            raise TypeError(f"{who}: X_dim must be a tuple of ints such as (C, H, W), got "
                            f"{type(X_dim).__name__} {X_dim!r}")
        if any(d < 1 for d in dims):
            raise ValueError(f"{who}: X_dim entries must be >= 1, got {X_dim!r}")
        if math.prod(dims) > np.iinfo(np.intp).max // 8:
            raise ValueError(f"{who}: X_dim must hold few enough values per sample for gamma "
                             f"and beta to fit in memory, got {len(dims)} entries whose "
                             f"product has {len(str(math.prod(dims)))} digits")
        dtype = _checks.float_dtype(dtype, who=who)
        eps = _checks.eps(eps, who=who)
        _checks.num_threads(num_threads, who=who)
        self.X_dim = tuple(int(d) for d in dims)
        if len(self.X_dim) == 3:
            self.d_X, self.h_X, self.w_X = self.X_dim
        self.D = math.prod(self.X_dim)
        self.eps = float(eps)
        self.num_threads = num_threads
        self.gamma = np.ones((1, self.D), dtype=dtype)
        self.beta = np.zeros((1, self.D), dtype=dtype)
        self.params = [self.gamma, self.beta]
        # (X_flat, X.shape, mean, invstd, gamma): no copy of X; a copy of the (D,)
        # gamma of the forward, so that a solver's in-place step before the
        # backward does not change the gradient
        self._cache: tuple[Any, ...] | None = None

    def _vectors(self, dtype: np.dtype[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        """gamma and beta as (D,) arrays of the input's dtype (views when it is theirs)."""
        return (self.gamma.reshape(-1).astype(dtype, copy=False),
                self.beta.reshape(-1).astype(dtype, copy=False))

    def forward(self, X: FloatArray) -> FloatArray:
        """Normalize every activation over the batch.

        Parameters
        ----------
        X : ndarray of float32 or float64, shape ``(N, *X_dim)``
            Any shape (N, ...) with D values per sample is accepted, as
            deepnet flattens it. A reference (not a copy) is kept for
            :meth:`backward`.

        Returns
        -------
        out : ndarray, shape and dtype of X

        Raises
        ------
        TypeError
            X not a float32/float64 ndarray.
        ValueError
            X without D = prod(X_dim) values per sample.
        """
        _checks.array("X", X, who="Batchnorm")
        if X.ndim < 1 or X.shape[0] < 1 or X.size != X.shape[0] * self.D:
            raise ValueError(f"Batchnorm: X must have shape (N, {', '.join(map(str, self.X_dim))})"
                             f" or hold {self.D} values per sample, got shape {X.shape}")
        if X.dtype not in _dtypes.PARAMETER_DTYPES:  # deepnet's nets are float32 or float64
            raise TypeError(f"Batchnorm: X must have dtype float32 or float64, got "
                            f"{_checks.dtype_name(X.dtype)}")
        X_flat = X.reshape(X.shape[0], self.D)
        gamma, beta = self._vectors(X.dtype)
        if X.shape[0] == 1:
            # One sample: mean = x, var = 0, xhat = 0 exactly, so out = beta.
            self._cache = (X_flat, X.shape, None, None, None)
            return np.broadcast_to(beta, X_flat.shape).reshape(X.shape).copy()
        out, mean, invstd = _functional.batch_norm_forward(
            X_flat, gamma, beta, eps=self.eps, num_threads=self.num_threads)
        self._cache = (X_flat, X.shape, mean, invstd, gamma.copy())
        return out.reshape(X.shape)

    def backward(self, dout: FloatArray) -> tuple[FloatArray, list[FloatArray]]:
        """Gradients of the last forward.

        With xhat = (X_flat - mu) / sqrt(var + eps) (fused form of Ioffe &
        Szegedy 2015, Section 3)::

            dbeta  = sum(dout, axis=0)
            dgamma = sum(dout * xhat, axis=0)
            dX     = gamma / sqrt(var + eps) / N * (N * dout - dbeta - xhat * dgamma)

        with the gamma of that forward (copied then): a solver's step on
        :attr:`params` between the forward and the backward does not change
        the gradient.

        Parameters
        ----------
        dout : ndarray, shape of the last X
            Cast to X's dtype if it differs.

        Returns
        -------
        dX : ndarray, shape and dtype of the last X
        grads : list of ndarray
            ``[dgamma, dbeta]``, each shaped (1, D) like gamma and beta and
            of their dtype, in the order of :attr:`params`.

        Raises
        ------
        RuntimeError
            No forward has been run.
        TypeError
            dout not of a real dtype (complex, object, strings).
        ValueError
            dout not shaped like the last X.
        """
        if self._cache is None:
            raise RuntimeError("Batchnorm.backward called before forward")
        X_flat, shape, mean, invstd, gamma = self._cache
        dout = np.asarray(dout)
        if dout.dtype.kind not in "fiub" and not _dtypes.is_half(dout.dtype):
            raise TypeError(f"Batchnorm.backward: dout must hold real numbers, got dtype "
                            f"{dout.dtype}")
        if dout.shape != shape:
            raise ValueError(f"Batchnorm.backward: dout must have the shape of X {shape}, "
                             f"got {dout.shape}")
        dout_flat = dout.reshape(X_flat.shape).astype(X_flat.dtype, copy=False)
        dgamma: Any  # (D,) arrays on either branch
        dbeta: Any
        if mean is None:  # one sample: xhat = 0
            dX = np.zeros(shape, dtype=X_flat.dtype)
            dgamma = np.zeros(self.D, dtype=X_flat.dtype)
            dbeta = dout_flat[0].copy()
        else:
            dX, dgamma, dbeta = _functional.batch_norm_backward(
                dout_flat, X_flat, gamma, mean, invstd, num_threads=self.num_threads)
            dX = dX.reshape(shape)
        grads = [dgamma.reshape(1, self.D).astype(self.gamma.dtype, copy=False),
                 dbeta.reshape(1, self.D).astype(self.beta.dtype, copy=False)]
        return dX, grads

    def __repr__(self) -> str:
        return f"Batchnorm({self.X_dim}, eps={self.eps:g})"
