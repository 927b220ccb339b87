"""Folding an inference-mode Batch Normalization into the layer before it.

In inference, Batch Normalization is a fixed affine map per channel
(Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", arXiv:1502.03167,
Algorithm 2, step 11). After a convolution or a fully connected layer whose
output channel o is the index ``o`` of its weight along ``out_axis``, that
map can be multiplied into the layer's weight and bias, and the
normalization disappears from the inference graph: "batch normalization
folding" (Jacob et al. 2018, "Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference", CVPR, arXiv:1712.05877,
Section 3.2; PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_weights`` and
``fuse_linear_bn_weights``).

The per-channel map is computed by the compiled function that finishes
every channel of the other passes (:func:`fastbn._channels.forward_map`,
from ``fastbn/_stats.pxd``), given the running statistics: its scale and
offset are those eval-mode Batch Normalization applies, in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from fastbn import _arguments, _channels, _dtypes
from fastbn._typing import FloatArray, OptionalArray

__all__ = ["fold_batch_norm"]


def fold_batch_norm(weight: FloatArray, bias: OptionalArray, running_mean: FloatArray,
                    running_var: FloatArray, gamma: OptionalArray, beta: OptionalArray, *,
                    eps: float = 1e-5, out_axis: int = 0) -> tuple[FloatArray, FloatArray]:
    """Fold eval-mode Batch Normalization into the weight and bias of the layer before it.

    For a layer ``z = W x + b`` (a convolution, a fully connected layer)
    followed by Batch Normalization with its running statistics, per output
    channel o (Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 2; Jacob
    et al. 2018, arXiv:1712.05877, Section 3.2)::

        s[o]             = gamma[o] / sqrt(running_var[o] + eps)
        folded_weight[o] = weight[o] * s[o]                  (o indexes out_axis)
        folded_bias[o]   = (bias[o] - running_mean[o]) * s[o] + beta[o]

    so that the layer with ``folded_weight`` and ``folded_bias`` gives what
    :func:`fastbn.batch_norm_inference` gives after the original layer. This
    is PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_weights`` (and
    ``fuse_linear_bn_weights``) for NumPy arrays and any output axis.

    Everything is computed in float64 (s by the compiled function that gives
    eval-mode Batch Normalization its scale) and rounded once to the
    weight's dtype.

    Parameters
    ----------
    weight : ndarray of float32, float64, float16 or bfloat16, 2 or more dimensions
        The layer's weight, with its C output channels on ``out_axis``: a
        convolution's (O, I, kh, kw) or a linear layer's (O, I) with
        ``out_axis=0`` (PyTorch's layouts), a NumPy net's (I, O) matrix
        (``y = x @ W``) with ``out_axis=-1``. No axis may be of size 0.
    bias : ndarray, shape (C,), float32, float64, float16 or bfloat16, or None
        The layer's bias; None for a layer without one (a bias of 0).
    running_mean, running_var : ndarray, shape (C,), float32, float64, float16 or bfloat16
        The Batch Normalization's running statistics (its mean and its
        variance, in the units of the layer's output and their square).
    gamma, beta : ndarray, shape (C,), float32, float64, float16 or bfloat16, or None
        Its scale and shift; None means 1 and 0 (``affine=False``).
    eps : float, default 1e-5
        Added to the variance, as in the Batch Normalization; finite and > 0.
    out_axis : int, default 0
        The axis of ``weight`` that indexes the output channels: 0 for
        PyTorch's convolution and linear weights, -1 for an (I, O) matrix,
        1 for a transposed convolution's (I, O, kh, kw); any axis of
        ``weight`` (negative counts from the end).

    The per-channel arrays need not have the weight's dtype, nor each
    other's.

    Returns
    -------
    folded_weight : ndarray, shape of weight, its dtype (float32 for a 16-bit weight)
        A new array.
    folded_bias : ndarray, shape (C,), folded_weight's dtype
        A new array (also when ``bias`` is None).

    Raises
    ------
    TypeError
        weight or a per-channel array not an ndarray (or a masked array),
        or of none of those dtypes; out_axis not an int, eps not a number.
    ValueError
        weight with fewer than 2 dimensions or a zero-size axis; out_axis
        not an axis of weight; a per-channel array not of shape (C,) with
        C = ``weight.shape[out_axis]``; eps not finite and > 0.

    Nothing passed is modified, whether the call succeeds or raises.

    See Also
    --------
    fastbn.BatchNorm.fold_into : the same from a layer's own arrays.
    fastbn.batch_norm_inference : the normalization folded away.

    Examples
    --------
    A fully connected layer ``z = x @ W.T + b`` (PyTorch's (O, I) weight)
    followed by eval-mode Batch Normalization, and the one layer that
    replaces both:

    >>> import numpy as np
    >>> import fastbn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((8, 5))
    >>> W, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    >>> gamma, beta = rng.uniform(0.5, 2.0, 3), rng.standard_normal(3)
    >>> mean, var = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    >>> y = fastbn.batch_norm_inference(x @ W.T + b, gamma, beta, mean, var)
    >>> W_f, b_f = fastbn.fold_batch_norm(W, b, mean, var, gamma, beta)
    >>> np.allclose(x @ W_f.T + b_f, y, rtol=1e-12, atol=1e-12)
    True

    The same with the (I, O) matrix of a NumPy net (``z = x @ W``):

    >>> W_f, b_f = fastbn.fold_batch_norm(W.T, b, mean, var, gamma, beta, out_axis=-1)
    >>> np.allclose(x @ W_f + b_f, y, rtol=1e-12, atol=1e-12)
    True
    """
    return _fold(weight, bias, running_mean, running_var, gamma, beta, eps, out_axis)


def fold_into(self: Any, weight: NDArray[Any], bias: NDArray[Any] | None = None, *,
              out_axis: int = 0) -> tuple[NDArray[Any], NDArray[Any]]:
    """Fold this layer's eval-mode normalization into the layer before it.

    :func:`fastbn.fold_batch_norm` with this layer's ``running_mean``,
    ``running_var``, ``gamma``, ``beta`` and ``eps``: the layer with the
    returned weight and bias gives, alone, what it followed by this
    layer in eval mode gives (the layer's mode does not matter). A
    layer's ``activation`` is not folded: apply it after the folded
    layer.

    Parameters
    ----------
    weight : ndarray of float32, float64, float16 or bfloat16, 2 or more dimensions
        The weight of the layer before, with this layer's C channels on
        ``out_axis``: (O, I, kh, kw) or (O, I) with ``out_axis=0``, an
        (I, O) matrix with ``out_axis=-1``. Its dtype need not be the
        layer's.
    bias : ndarray, shape (C,), float32, float64, float16 or bfloat16, or None
        Its bias; None for none.
    out_axis : int, default 0
        The axis of ``weight`` that indexes the output channels.

    Returns
    -------
    folded_weight : ndarray, shape of weight, its dtype (float32 for a 16-bit weight)
    folded_bias : ndarray, shape (C,), folded_weight's dtype
        New arrays; neither the layer nor the arguments are modified.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.fold_batch_norm`, the message starting with
        ``"<class>.fold_into: "``; also ValueError when the weight does
        not have C channels on ``out_axis``, or when the layer keeps no
        running statistics (``track_running_stats=False``: it normalizes
        with each batch's statistics, which no fixed weight reproduces).

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import BatchNorm1d
    >>> bn = BatchNorm1d(3)
    >>> W = np.ones((3, 5), np.float32)   # a linear layer's (O, I) weight
    >>> W_f, b_f = bn.fold_into(W)        # fresh statistics: scale 1/sqrt(1 + 1e-5)
    >>> W_f.shape, b_f.dtype
    ((3, 5), dtype('float32'))
    """
    who = f"{type(self).__name__}.fold_into"
    if not self.track_running_stats:
        raise ValueError(f"{who}: the layer has no running statistics to fold "
                         f"(track_running_stats=False normalizes with each batch's "
                         f"statistics, also in eval mode)")
    return _fold(weight, bias, self.running_mean, self.running_var, self._gamma, self._beta,
                 self.eps, out_axis, num_features=self.num_features, who=who)


def _fold(weight: NDArray[Any], bias: NDArray[Any] | None, running_mean: NDArray[Any],
          running_var: NDArray[Any], gamma: NDArray[Any] | None, beta: NDArray[Any] | None,
          eps: float, out_axis: int, *, num_features: int | None = None,
          who: str | None = None) -> tuple[NDArray[Any], NDArray[Any]]:
    """:func:`fold_batch_norm`, its messages prefixed with ``who`` (a layer's
    ``fold_into``, which checks that the weight has its ``num_features``)."""
    eps, axis = _arguments.fold_args(weight, bias, running_mean, running_var, gamma, beta, eps,
                                     out_axis, num_features=num_features, who=who)
    size = weight.shape[axis]

    # float32 widens exactly, so the map is that of the arrays as given
    def f64(v: NDArray[Any] | None) -> Any:  # an ndarray, or None for None
        return None if v is None else np.ascontiguousarray(v, dtype=np.float64)

    # The eval-mode map per channel, y = (z - center) * scale + offset, from
    # (mean, var) = the running statistics; nothing is updated (no running
    # statistics passed, m unused), mean and invstd are scratch.
    stats = np.stack([f64(running_mean), f64(running_var)], axis=1)
    coef = np.empty((size, 4), dtype=np.float64)
    _channels.forward_map(stats, 2.0, eps, np.empty(size), np.empty(size), f64(gamma),
                          f64(beta), None, None, 0.0, False, coef)
    center, scale, offset = coef[:, 0], coef[:, 1], coef[:, 3]

    shape = [1] * weight.ndim
    shape[axis] = size
    folded_weight = np.multiply(weight, scale.reshape(shape), dtype=np.float64)
    z0 = np.zeros(size) if bias is None else f64(bias)
    folded_bias = (z0 - center) * scale + offset
    dtype = _dtypes.parameters(weight.dtype)  # float32 for a 16-bit weight
    return folded_weight.astype(dtype, copy=False), folded_bias.astype(dtype, copy=False)
