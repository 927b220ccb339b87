"""Batch Normalization layers with PyTorch's semantics, on NumPy arrays.

:class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d` and the
rank-agnostic :class:`BatchNorm` are ``torch.nn.BatchNorm*d`` (Ioffe &
Szegedy 2015, arXiv:1502.03167; the running statistics as PyTorch keeps
them) computing through :mod:`fastbn.functional`, or any module with its
signatures (``backend=``, e.g. :mod:`fastbn.reference`): the layer itself
computes nothing of full size. It may fuse a ReLU or leaky ReLU into its
output and, saving memory, keep its output for the backward (In-Place ABN;
the record is :mod:`fastbn._saved`'s). Its parameters, mode, state dict and
pickling are :mod:`fastbn._layer_state`'s.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from fastbn import _checks, _front
from fastbn import folding as _folding
from fastbn import functional as _functional
from fastbn import _layer_variants as _variants
from fastbn._layer_state import LayerState, check_backend
from fastbn._layer_variants import backend_functions, check_options
from fastbn._saved import Saved, for_batch, forward_params, gradients, running_invstd
from fastbn._typing import Activation, FloatArray

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]



class BatchNorm(LayerState):
    """Batch Normalization over the channel axis of 2-D to 5-D input.

    In training mode the input is normalized with the statistics of the batch
    and the running statistics are updated; in eval mode it is normalized with
    the running statistics (Ioffe & Szegedy 2015, arXiv:1502.03167,
    Algorithms 1 and 2)::

        y = act((x - mean) / sqrt(var + eps) * gamma + beta)

    where mean and the biased var are taken per channel over every other
    axis and act is the identity unless ``activation`` is given. Semantics,
    defaults and ``state_dict`` keys are those of ``torch.nn.BatchNorm2d``
    (with an activation: followed by ``torch.nn.ReLU`` or
    ``torch.nn.LeakyReLU``); :class:`BatchNorm1d`, :class:`BatchNorm2d` and
    :class:`BatchNorm3d` differ from this class only in the number of
    dimensions they accept.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance; finite and > 0.
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running statistics:
        ``running = (1 - momentum) * running + momentum * batch``. None makes
        them the cumulative average over the ``num_batches_tracked`` batches.
    affine : bool, default True
        Learn a scale ``gamma`` (initialized to 1) and a shift ``beta``
        (initialized to 0). Without it, ``gamma``, ``beta``, ``dgamma`` and
        ``dbeta`` are None and ``params``/``grads`` are empty.
    track_running_stats : bool, default True
        Keep ``running_mean`` (initialized to 0), ``running_var``
        (initialized to 1) and ``num_batches_tracked``. Without them, eval
        mode normalizes with the batch statistics, as PyTorch does.
    dtype : {numpy.float32, numpy.float64}, default numpy.float32
        dtype of the parameters and statistics. A float32 layer takes
        float32, float16 and bfloat16 input (16-bit activations with float32
        parameters, as PyTorch's mixed precision); a float64 layer takes
        float64 input. A float64 net (NumPy's default dtype, as in cs231n)
        builds its layers with ``dtype=np.float64``; input of another dtype
        raises a ``TypeError`` that says so.
    channel_axis : {1, -1}, default 1
        1 for channels first (NCHW and relatives), -1 for channels last.
    num_threads : int > 0 or None, default None
        OpenMP threads for the kernels; None uses the OpenMP default.
    unbiased : bool, keyword-only, default True
        The running variance takes the unbiased batch variance (PyTorch), or
        with False the biased one (Keras, cs231n, numpy-ml).
    backend : module or None, keyword-only, default None
        Where the arithmetic is done: anything providing
        ``batch_norm_forward``, ``batch_norm_inference`` and
        ``batch_norm_backward`` with the signatures of
        :mod:`fastbn.functional`. None is :mod:`fastbn.functional`;
        :mod:`fastbn.reference` runs the same layer on the NumPy oracle.
        With ``memory_saving`` it must provide
        ``batch_norm_backward_from_output`` too.
    activation : {None, "relu", "leaky_relu"}, keyword-only, default None
        An activation fused into the output, computed in the same sweep
        (:func:`fastbn.batch_norm_forward`, :func:`fastbn.batch_norm_inference`):
        "relu" is ``max(z, 0)``, "leaky_relu" is z for z >= 0 and
        ``negative_slope * z`` below, where ``z = (x - mean) * invstd *
        gamma + beta``. :meth:`backward` then takes the gradient with respect
        to the activated output and applies the activation's derivative in
        its own pass (:func:`fastbn.batch_norm_backward` recomputes z from x).
        Configuration, not state: it is not in :meth:`state_dict`.
    negative_slope : float, keyword-only, default 0.01
        The slope of "leaky_relu" below 0 (PyTorch's name and default);
        finite. Not used by the other activations.
    memory_saving : bool, keyword-only, default False
        Keep the output instead of the input for :meth:`backward` when
        normalizing with batch statistics (training mode, or eval mode
        without running statistics): the idea of In-Place ABN (Rota Bulò,
        Porzi & Kontschieder, CVPR 2018, arXiv:1712.02616). The output is
        returned to the caller anyway, so the layer then holds no array of
        its own: x can be freed as soon as the caller drops it, which saves
        one input-sized array per layer between a forward and its backward.
        The backward inverts the activation and the affine map on y,
        ``xhat = (act^-1(y) - beta) / gamma``, and applies
        :func:`fastbn.batch_norm_backward_from_output`. It needs an
        invertible activation: None, or "leaky_relu" with
        ``negative_slope > 0``. Eval mode with running statistics keeps x,
        as without it. See the Notes for what the caller must not do.
        Not with ``renorm`` or ``virtual_batch_size``.
    renorm : bool, keyword-only, default False
        Batch Renormalization in training mode (Ioffe 2017,
        arXiv:1702.03275; Keras' option of that name): the batch statistics
        corrected towards the running ones by ``r`` and ``d``
        (:func:`fastbn.batch_renorm_forward`), for small or non-i.i.d.
        batches. Needs ``track_running_stats``. Eval mode is unchanged.
    renorm_clipping : dict or None, keyword-only, default None
        With ``renorm``: the keys "rmax" (default 3), "rmin" (default 1 /
        rmax) and "dmax" (default 5), Keras' names and defaults; r is
        clipped to [rmin, rmax] and d to [-dmax, dmax].
    virtual_batch_size : int or None, keyword-only, default None
        Ghost Batch Normalization in training mode (Hoffer et al. 2017,
        arXiv:1705.08741; Keras' option of that name): each virtual batch
        of that many consecutive samples is normalized by its own
        statistics (:func:`fastbn.ghost_batch_norm_forward`); it must divide
        every training batch's size. With ``renorm`` too, each virtual
        batch is renormalized. Eval mode is unchanged.

    Attributes
    ----------
    gamma, beta : ndarray, shape (C,), or None
        Scale and shift, also reachable as ``weight`` and ``bias``. Plain
        arrays that an optimizer may update in place or replace by another
        (C,) array of the layer's dtype. The array assigned is kept itself,
        so it must be writeable and share no memory with the layer's other
        arrays: a read-only one (``np.load(..., mmap_mode="r")``) is refused
        with ``ValueError``, not copied; assign ``np.array(a)`` for a copy.
    dgamma, dbeta : ndarray, shape (C,), or None
        Gradients with respect to ``gamma`` and ``beta`` from the last
        :meth:`backward` (None before it, or without ``affine``).
    params, grads : list of ndarray
        ``[gamma, beta]`` and ``[dgamma, dbeta]`` in that fixed order (empty
        without ``affine``), for solvers that walk the layers of a net.
    running_mean, running_var : ndarray, shape (C,), or None
        Running statistics, updated in place by training-mode forwards.
    num_batches_tracked : ndarray of int64, shape (), or None
        Training-mode forwards seen since the last reset, updated in place.
    training : bool
        True after :meth:`train` (the initial state), False after
        :meth:`eval`.
    activation, negative_slope, memory_saving
        As given (negative_slope as a float): configuration, not state.

    Raises
    ------
    TypeError
        A non-integer ``num_features``, a ``dtype`` other than float32 or
        float64, an ``activation`` that is not None or a string, a
        ``negative_slope`` that is not a real number, an ``affine``,
        ``track_running_stats``, ``unbiased``, ``memory_saving`` or
        ``renorm`` that is not a bool, a ``renorm_clipping`` that is not a
        dict or a ``virtual_batch_size`` that is not an int (an error that is a ValueError too, as PyTorch's
        ``train(mode)`` raises), or a ``backend`` without the functions the
        layer calls.
    ValueError
        ``num_features`` < 1, a bad ``eps``, ``momentum``, ``channel_axis``
        or ``num_threads``; an ``activation`` other than None, "relu" and
        "leaky_relu"; a non-finite ``negative_slope`` (or one too large for
        a float, such as ``10**400``); ``memory_saving``
        with "relu", or with "leaky_relu" and ``negative_slope <= 0`` (the
        output does not determine the input); ``renorm_clipping`` without
        ``renorm``, a bad clipping bound (rmax < 1, rmin outside [0, 1],
        dmax < 0, NaN, an unknown key), ``renorm`` without
        ``track_running_stats``, a ``virtual_batch_size`` < 1, and
        ``memory_saving`` with ``renorm`` or ``virtual_batch_size``.

    See Also
    --------
    fastbn.batch_norm_forward, fastbn.batch_norm_inference,
    fastbn.batch_norm_backward : the functions the layer calls.
    fastbn.batch_renorm_forward, fastbn.ghost_batch_norm_forward : and with
        ``renorm`` or ``virtual_batch_size``, in training mode.

    Notes
    -----
    The layer keeps a reference to the last input (not a copy) for
    :meth:`backward`: modifying that array in place between the forward and
    the backward changes the gradient. The gamma and beta of the forward,
    on the contrary, are copied at the forward (C values each) in every
    mode: an optimizer step on the parameters between the forward and the
    backward does not change the gradient, which is that of the forward as
    it ran (the activation's mask included).

    Every method that changes the layer's state (``load_state_dict``,
    ``reset_running_stats``, ``reset_parameters``, ``train``, the parameter
    setters) checks all it would write before writing anything, and names
    the array that fails.

    With ``memory_saving`` and batch statistics it keeps a reference to the
    last output y instead, the very array the forward returned. The caller
    must not modify y in place between the forward and the backward (no
    ``y += residual``, no in-place activation after the layer): the backward
    would read the modified values and return a wrong gradient, without an
    error. It inverts the map ``x -> y`` on each channel, so a channel whose
    ``gamma`` is 0 (its output is the constant ``act(beta)``, which says
    nothing of x) makes :meth:`backward` raise ``ValueError`` naming the
    channels; initialize gamma away from 0, or use the default mode. The
    gamma and beta y was made with are copied at the forward (C values
    each, as in every mode), so an optimizer step between the forward and
    the backward does not corrupt the inversion. The gradients equal the
    default mode's to round-off: y is rounded to the layer's dtype before
    it is inverted,
    which costs about 1e-6 relative in float32 with ``|gamma|`` and
    ``|beta|`` of order 1, growing like ``|beta| / |gamma|``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import BatchNorm2d
    >>> bn = BatchNorm2d(16)
    >>> x = np.random.default_rng(0).standard_normal((8, 16, 5, 5), dtype=np.float32)
    >>> y = bn(x)                       # training mode: batch statistics
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.dgamma.shape
    (16,)
    >>> y_eval = bn.eval()(x)           # eval mode: running statistics
    """

    #: numbers of dimensions the layer accepts, and how to say it in an error
    _ndims: tuple[int, ...] = (2, 3, 4, 5)
    _expected = "2-D to 5-D input (N, C, ...)"
    dgamma: NDArray[Any] | None
    dbeta: NDArray[Any] | None
    _saved: Saved | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 dtype: DTypeLike = np.float32, channel_axis: int = 1,
                 num_threads: int | None = None, *, unbiased: bool = True,
                 backend: ModuleType | None = None, activation: Activation = None,
                 negative_slope: float = 0.01, memory_saving: bool = False,
                 renorm: bool = False, renorm_clipping: dict[str, float] | None = None,
                 virtual_batch_size: int | None = None) -> None:
        """Build the layer; the parameters are those of the class (``help(type(self))``)."""
        who = type(self).__name__
        # The functions check eps, momentum and num_threads again at every call;
        # checking them here makes a bad layer fail at construction.
        num_features = _checks.num_features(num_features, who=who)
        dtype = _checks.float_dtype(dtype, who=who)
        channel_axis = _checks.channel_axis(channel_axis, who=who)
        eps = _checks.eps(eps, who=who)
        momentum = _checks.momentum(momentum, who=who)
        _checks.num_threads(num_threads, who=who)

        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = _checks.flag(affine, "affine", who=who)
        self.track_running_stats = _checks.flag(track_running_stats, "track_running_stats",
                                                who=who)
        self.dtype = dtype
        self.channel_axis = channel_axis
        self.num_threads = num_threads
        self.unbiased = _checks.flag(unbiased, "unbiased", who=who)
        _, self.negative_slope = _checks.activation(activation, negative_slope, who=who)
        self.activation = activation
        self.memory_saving = _checks.memory_saving(memory_saving, activation,
                                                   self.negative_slope, who=who)
        self.renorm, self.renorm_clipping, self.virtual_batch_size = check_options(
            renorm, renorm_clipping, virtual_batch_size,
            track_running_stats=self.track_running_stats, memory_saving=self.memory_saving,
            who=who)
        self.backend = check_backend(backend, self.memory_saving,
                                     backend_functions(self.renorm, self.virtual_batch_size))
        self.training = True

        self._new_state()
        self._saved = None  # what the last forward left for the backward (Saved)

    # -------------------------------------------------------------- compute

    def forward(self, x: FloatArray) -> FloatArray:
        """Normalize x and apply the activation; in training mode update the running statistics.

        Training mode, or eval mode without running statistics: normalize
        with the batch statistics (:func:`fastbn.batch_norm_forward`); in
        training mode with ``track_running_stats`` the running statistics are
        updated in place and ``num_batches_tracked`` is incremented. Eval
        mode with running statistics: :func:`fastbn.batch_norm_inference`.
        The layer's ``activation`` is fused into either.

        Parameters
        ----------
        x : ndarray, the layer's dtype (a float32 layer: float16 and bfloat16 too)
            (N, C, ...) with ``channel_axis=1``, (N, ..., C) with
            ``channel_axis=-1``; the number of dimensions the class accepts.
            A reference to it (not a copy) is kept for :meth:`backward`,
            except with ``memory_saving`` and batch statistics.

        Returns
        -------
        y : ndarray, shape and dtype of x
            A new array. With ``memory_saving`` and batch statistics the
            layer keeps a reference to it for :meth:`backward`: do not
            modify it in place before then.

        Raises
        ------
        TypeError
            x not an ndarray or not of a dtype the layer takes.
        ValueError
            x with a number of dimensions the class does not accept (the
            message names the class and the shape), or not C channels on
            the channel axis; training with one value per channel; in
            training mode, a batch size that ``virtual_batch_size`` does not
            divide.
        """
        batch = self.training or not self.track_running_stats
        tracking = self.training and self.track_running_stats
        y: FloatArray
        if self.training and (self.renorm or self.virtual_batch_size is not None):
            y = _variants.forward(self, x, tracking)
            return y
        if batch and self.backend is _functional:  # checked once, in the compiled front
            fast = _front.forward(x, self._gamma, self._beta, self.eps,
                                  self.running_mean if tracking else None,
                                  self.running_var if tracking else None, self.momentum,
                                  self.num_batches_tracked if tracking else None, self.unbiased,
                                  self.activation, self.negative_slope, self.channel_axis, None,
                                  self.num_threads, self._ndims, self.num_features, self.dtype)
            if fast is not None:
                y, mean, invstd = fast
                self._saved = for_batch(self, x, y, mean, invstd)
                return y
        self._check_input(x)
        f = self.backend
        common: dict[str, Any] = dict(channel_axis=self.channel_axis,
                                      num_threads=self.num_threads)
        if self.activation is not None:  # a backend without the keywords serves the rest
            common.update(activation=self.activation, negative_slope=self.negative_slope)
        if batch:
            y, mean, invstd = f.batch_norm_forward(
                x, self._gamma, self._beta, eps=self.eps,
                running_mean=self.running_mean if tracking else None,
                running_var=self.running_var if tracking else None,
                momentum=self.momentum, unbiased=self.unbiased,
                num_batches_tracked=self.num_batches_tracked if tracking else None,
                **common)
            self._saved = for_batch(self, x, y, mean, invstd)  # with memory_saving: y
        else:
            y = f.batch_norm_inference(x, self._gamma, self._beta, self.running_mean,
                                       self.running_var, eps=self.eps, **common)
            self._saved = Saved(x, self.running_mean.copy(),
                                running_invstd(self.running_var, self.eps, self.dtype),
                                batch=False, activation=self.activation,
                                negative_slope=self.negative_slope, **forward_params(self))
        return y

    __call__ = forward

    def backward(self, dy: FloatArray) -> FloatArray:
        """Gradient with respect to the input of the last forward; stores dgamma, dbeta.

        dy is the gradient with respect to the layer's output, the activated
        one with an ``activation``; with ``z = gamma * xhat + beta`` the
        output before the activation, the backward first takes the gradient
        with respect to z, ``dz = dy * act'(z)`` (1 without an activation;
        for ReLU 1 where z > 0 and 0 elsewhere; for leaky ReLU 1 where z >
        0 and ``negative_slope`` elsewhere), in the same pass as the rest.

        After a forward with batch statistics (training mode, or eval mode
        without running statistics) this is the Batch Normalization backward
        of :func:`fastbn.batch_norm_backward`, with m values per channel and
        ``xhat = (x - mean) * invstd``::

            dbeta  = sum(dz)
            dgamma = sum(dz * xhat)
            dx     = gamma * invstd / m * (m * dz - dbeta - xhat * dgamma)

        With ``memory_saving`` the same gradients come from the output y
        instead of x (:func:`fastbn.batch_norm_backward_from_output`, In-Place
        ABN, Rota Bulò et al. 2018, arXiv:1712.02616): ``xhat = (act^-1(y) -
        beta) / gamma`` with the gamma and beta of that forward, and act'
        read from the sign of y.

        After an eval-mode forward with running statistics (as they were
        then) the map is affine: dbeta and dgamma as above with ``xhat = (x
        - running_mean) * invstd``, ``invstd = 1 / sqrt(running_var + eps)``,
        and ``dx = dz * gamma * invstd`` (:func:`fastbn.batch_norm_backward`
        with ``training=False``; without ``affine`` no dgamma and dbeta, and
        without an activation too only dy is read).

        Parameters
        ----------
        dy : ndarray
            Gradient of the loss with respect to the output; shape and dtype
            of the last forward's input.

        Returns
        -------
        dx : ndarray, shape and dtype of x

        Raises
        ------
        RuntimeError
            No forward has been run yet.
        TypeError
            dy not an ndarray, or of another dtype than x.
        ValueError
            dy not shaped like the last forward's input; with
            ``memory_saving``, a channel whose gamma was 0 at the forward
            (the message names the channels). Nothing is stored then.
        """
        saved = self._saved
        if (saved is not None and self.backend is _functional and saved.r is None
                and not saved.grouped):  # the plain layer's compiled front
            if saved.x is not None:
                fast = _front.backward(dy, saved.x, saved.gamma, saved.mean, saved.invstd,
                                       saved.beta, saved.activation, saved.negative_slope,
                                       saved.batch, self.affine, self.channel_axis, None,
                                       self.num_threads)
            else:
                fast = _front.backward_from_output(dy, saved.y, saved.gamma, saved.beta,
                                                   saved.invstd, saved.activation,
                                                   saved.negative_slope, self.channel_axis,
                                                   None, self.num_threads)
            if fast is not None:
                if self.affine:
                    self.dgamma, self.dbeta = fast[1], fast[2]
                return fast[0]
        who = f"{type(self).__name__}.backward"
        if saved is None:
            raise RuntimeError(f"{who} called before forward: there is no input to take the "
                               f"gradient at")
        _checks.like("dy", dy, saved.array, who=who)
        if saved.x is None:  # memory saving: the backward divides by the forward's gamma
            _checks.saved_gamma(saved.gamma, who=who)
        # after an eval-mode forward the running statistics are constants
        dx: FloatArray
        dx, dgamma, dbeta = gradients(self.backend, saved, dy, param_grads=self.affine,
                                      channel_axis=self.channel_axis,
                                      num_threads=self.num_threads)
        if self.affine:
            self.dgamma, self.dbeta = dgamma, dbeta
        return dx

    # --------------------------------------------------------------- state

    fold_into = _folding.fold_into


class BatchNorm1d(BatchNorm):
    """Batch Normalization over (N, C) or (N, C, L) input, as ``torch.nn.BatchNorm1d``.

    With ``channel_axis=-1`` the input is (N, C) or (N, L, C). Everything else
    is as in :class:`BatchNorm`; a 1-, 4- or 5-D input raises ``ValueError``
    naming the class and the shape.
    """

    _ndims = (2, 3)
    _expected = "2-D or 3-D input (N, C) or (N, C, L)"


class BatchNorm2d(BatchNorm):
    """Batch Normalization over (N, C, H, W) input, as ``torch.nn.BatchNorm2d``.

    With ``channel_axis=-1`` the input is (N, H, W, C). Everything else is as
    in :class:`BatchNorm`; input that is not 4-D raises ``ValueError`` naming
    the class and the shape.
    """

    _ndims = (4,)
    _expected = "4-D input (N, C, H, W)"


class BatchNorm3d(BatchNorm):
    """Batch Normalization over (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``.

    With ``channel_axis=-1`` the input is (N, D, H, W, C). Everything else is
    as in :class:`BatchNorm`; input that is not 5-D raises ``ValueError``
    naming the class and the shape.
    """

    _ndims = (5,)
    _expected = "5-D input (N, C, D, H, W)"
