"""Hostile input: the table of bad calls across the whole public surface.

This module owns the argument rules: every rejected call of the suite is a
row of :data:`TABLE`. A row is one bad call of a public function, a layer
class or an adapter, or a family of calls that break one rule the same way
(every bad dtype of x in each function, every per-channel argument of a wrong
shape, ...), with the exception it must raise and the start of its message
(which names the argument). The test of each call makes it on fresh,
otherwise valid arguments and checks

- the exception type and that the message starts with the given text;
- that nothing it was given changed: a byte snapshot of every array reachable
  from the arguments (x, dy, the per-channel arrays, the running statistics,
  ``num_batches_tracked``, ``out``, the arrays inside a layer, a ``bn_param``
  dict or an adapter's cache) and the identity of every attribute of a layer
  and every entry of a dict.

The table is the documentation too: ``docs/hostile_inputs.md`` is generated
from it (``python tests/test_hostile.py > docs/hostile_inputs.md``) and a test
checks that the file is up to date. Rows with ``bug`` set are known gaps: the
call does not yet behave as the row says; the test is an xfail (strict, so it
turns red when the gap is fixed and the mark should go) and the docs say so.

What the functions accept (non-contiguous and read-only inputs, equivalent
channel axes, any positive num_threads) is tested in ``test_accepted_inputs.py``.
"""

from __future__ import annotations

import itertools
import math
import os
import pathlib
import pickle
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import fastbn
from fastbn import BatchNorm1d, BatchNorm2d
from fastbn.compat import cs231n, deepnet
from fastbn.distributed import SyncBatchNorm, _records, merge_records, sync_batch_norm_forward

from helpers import (FUNCTIONS, REFERENCE, SHAPE, C, assert_close, call, read_only, same_fastbn,
                     valid_args)

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "hostile_inputs.md"


@dataclass(frozen=True)
class Bad:
    """One bad call, or a family of bad calls: where, what is wrong, and what it
    must raise.

    A family row stands for one call per variant (a dict of keyword values for
    ``make``); its ``message`` is a template whose ``{fields}`` each variant
    fills in (``<field>`` in the docs). A row of one call has the one variant
    ``{}`` and a literal message."""

    api: str                  # the function(s), layer or adapter called
    bad: str                  # what is wrong with the call(s)
    exc: type                 # the exception it raises
    message: str              # the start of the message
    make: Callable            # (**variant) -> (the call, {name: every object it was given})
    variants: tuple = ({},)   # a family: the keyword values of each of its calls
    bug: str | None = None    # a known gap: how the call behaves today instead

    def expected(self, variant):
        """The start of the message of the call made with ``variant``."""
        return self.message.format(**variant) if variant else self.message


# ----------------------------------------------------- building the calls ----

def function_call(func, *edits, valid=None, **changes):
    """(the call, its arguments): fastbn.batch_norm_<func> on valid arguments
    (``helpers.valid_args(func, **valid)``) with ``changes`` (a value, or a
    function of the arguments) and ``edits`` (functions that modify the
    argument dict) applied."""
    args = valid_args(func, **(valid or {}))
    for name, value in changes.items():
        args[name] = value(args) if callable(value) else value
    for edit in edits:
        edit(args)
    return (lambda: call(func, args)), args


def fn(func, *edits, **changes):
    """A row of one call: :func:`function_call` made afresh for each run."""
    return lambda: function_call(func, *edits, **changes)


def family(bad, exc, message, make, variants):
    """A row for a family of calls of the functions: ``make(**variant)`` for
    each variant (each names its ``func``); the api column lists the functions."""
    called = [f for f in ENTRY_POINTS if any(v["func"] == f for v in variants)]
    return Bad(", ".join(f"batch_norm_{f}" for f in called), bad, exc, message, make,
               tuple(variants))


def grid(*choices, **axes):
    """The variants of a family: every combination of one dict of each of
    ``choices`` (lists of dicts) and one value of each of ``axes`` (name ->
    values), merged into one dict, in that order."""
    lists = [list(c) for c in choices] + [[{k: v} for v in vs] for k, vs in axes.items()]
    return [{k: v for part in combo for k, v in part.items()}
            for combo in itertools.product(*lists)]


def typed(name, values):
    """Variants ``{name: value, "type": its type's name}``, for messages that name the type."""
    return [{name: v, "type": type(v).__name__} for v in values]


# The functions of the table: FUNCTIONS (which every family of EVERY_FUNCTION
# calls) and the backward from the output, whose rows name it.
ENTRY_POINTS = FUNCTIONS + ("backward_from_output",)
EVERY_FUNCTION = [dict(func=f) for f in FUNCTIONS]
TRAINING = [dict(func="forward")]
INFERENCE = [dict(func="inference")]
BACKWARD = [dict(func="backward")]
FROM_OUTPUT = [dict(func="backward_from_output")]
# The two backwards of an activation; the fused backward is called with
# activation='leaky_relu' (valid_args gives the backward from the output one).
ACTIVATED_BACKWARDS = [dict(func="backward", activation="leaky_relu"),
                       dict(func="backward_from_output", activation="leaky_relu")]
TRAINING_AND_INFERENCE = TRAINING + INFERENCE
# Every per-channel array argument of every function.
PER_CHANNEL = [dict(func=f, name=n) for f, names in (
    ("forward", ("gamma", "beta", "running_mean", "running_var")),
    ("inference", ("gamma", "beta", "running_mean", "running_var")),
    ("backward", ("gamma", "mean", "invstd"))) for n in names]
BAD_DTYPES = ("int32", "int64", "uint8", "complex64", "complex128", "bool", "object")


def _bfloat16():
    """ml_dtypes' bfloat16 (in the test extra), imported where a row uses it;
    the row is skipped without it (scripts/sanitize.sh's environment)."""
    return pytest.importorskip("ml_dtypes").bfloat16


def overlapping(a, shift):
    """(copy of a, other): two C-contiguous arrays shaped like ``a`` in one buffer,
    ``shift`` items apart, so that they share all but ``abs(shift)`` items."""
    buf = np.empty(a.size + abs(shift), dtype=a.dtype)
    if shift >= 0:
        first, second = buf[:a.size], buf[shift:]
    else:
        first, second = buf[-shift:], buf[:a.size]
    second[...] = 0
    first[...] = a.reshape(-1)
    return first.reshape(a.shape), second.reshape(a.shape)


def overlap(name, shift):
    """An edit: ``name`` and ``out`` in one buffer, ``shift`` items apart."""
    def edit(args):
        args[name], args["out"] = overlapping(args[name], shift)
    return edit


def inside_out(name):
    """An edit: ``name`` (valid values) stored in items 10 to 12 of ``out``."""
    def edit(args):
        inside = args["out"].reshape(-1)[10:10 + C]
        inside[...] = np.abs(args[name]) + 0.5
        args[name] = inside
    return edit


def ones_x(shape):
    """An edit: x (and dy, in the backward) replaced by float32 ones of ``shape``."""
    def edit(args):
        for name in ("x", "dy"):
            if name in args:
                args[name] = np.ones(shape, np.float32)
    return edit


# Arrays that are not C-contiguous, for out.
NOT_C_CONTIGUOUS = {
    "strided": lambda: np.empty((4, 3, 5, 4), np.float32)[..., ::2],
    "fortran": lambda: np.empty(SHAPE, np.float32, order="F"),
}


def image(n=4, c=3, dtype=np.float32):
    """An (n, c, 5, 2) input, as the layers take it."""
    return np.random.default_rng(1).standard_normal((n, c, 5, 2)).astype(dtype)


def layer(cls, action, *, trained=False, mode="train", setup=None, then=None, **kwargs):
    """A call ``action(layer, x)`` on a fresh ``cls(3, **kwargs)``; ``trained``
    runs one valid forward first (in ``mode``), so that backward has a cache;
    ``setup(layer)`` runs before that forward and ``then(layer)`` after it,
    both before the snapshot."""
    def make():
        bn = cls(C, **kwargs)
        x = image()
        if setup is not None:
            setup(bn)
        if trained:
            bn.train(mode == "train")
            bn(x)
            bn.eval() if mode == "eval" else bn.train()
        if then is not None:
            then(bn)
        return (lambda: action(bn, x)), {"layer": bn, "x": x}
    return make


def variant(func, **changes):
    """A row's call of fastbn.<func> (a BatchNorm variant, fastbn.variants)
    on valid float32 arguments with ``changes``: x (4, 3, 5, 2), and for the
    backwards the statistics of a valid forward (renorm: as (C,); ghost:
    two virtual batches)."""
    def make():
        rng = np.random.default_rng(3)
        x = rng.standard_normal(SHAPE).astype(np.float32)
        args = dict(x=x, gamma=np.ones(C, np.float32), beta=np.zeros(C, np.float32))
        if func == "batch_renorm_forward":
            args.update(running_mean=np.zeros(C, np.float32), running_var=np.ones(C, np.float32))
        elif func == "ghost_batch_norm_forward":
            args.update(virtual_batch_size=2)
        else:
            args["dy"] = rng.standard_normal(SHAPE).astype(np.float32)
            if func == "batch_renorm_backward":
                stats = fastbn.batch_renorm_forward(x, args["gamma"], args["beta"],
                                                    np.zeros(C, np.float32),
                                                    np.ones(C, np.float32))[1:]
                args.update(zip(("mean", "invstd", "r", "d"), stats))
            else:
                stats = fastbn.ghost_batch_norm_forward(x, args["gamma"], args["beta"], 2)[1:]
                args.update(zip(("mean", "invstd"), stats))
        for name, value in changes.items():
            args[name] = value(args) if callable(value) else value
        if func.endswith("backward"):
            positional = [args.pop(k) for k in ("dy", "x", "gamma", "mean", "invstd")]
            if func == "batch_renorm_backward":
                positional += [args.pop("r"), args.pop("d")]
            everything = dict(args, dy=positional[0], x=positional[1], mean=positional[3],
                              invstd=positional[4])
            return (lambda: getattr(fastbn, func)(*positional, **args)), everything
        return (lambda: getattr(fastbn, func)(**args)), dict(args)
    return make


def construct(cls, **kwargs):
    """A constructor call with bad arguments."""
    def make():
        return (lambda: cls(**kwargs)), dict(kwargs)
    return make


def assign(name, value):
    """``layer.<name> = value`` on a BatchNorm1d(3)."""
    def make():
        bn = BatchNorm1d(C)
        v = value()
        return (lambda: setattr(bn, name, v)), {"layer": bn, "value": v}
    return make


def load(**entries):
    """``layer.load_state_dict(state)`` on a BatchNorm2d(3) that has trained a
    step, with ``entries`` replacing those of its own state dict."""
    def make():
        bn = BatchNorm2d(C)
        bn(image())
        state = bn.state_dict()
        state["weight"] = np.full(C, 7.0, np.float32)     # a valid change, listed first
        state.update({k: v() for k, v in entries.items()})
        return (lambda: bn.load_state_dict(state)), {"layer": bn, "state": state}
    return make


def frozen(cls, action, name, **kwargs):
    """``action(layer)`` on a ``cls(3, **kwargs)`` that has trained a step and
    whose array ``name`` (a state-dict key) is then made read-only."""
    def then(bn):
        bn._state_arrays()[name].flags.writeable = False
    return layer(cls, lambda bn, x: action(bn), trained=True, then=then, **kwargs)


def other_rank(**settings):
    """An ``allreduce`` standing for two ranks: this one, and one whose header
    says ``settings`` (records name -> value) instead."""
    def allreduce(records):
        theirs = records.copy()
        for name, value in settings.items():
            theirs[getattr(_records, name), 1:3] = value
        return merge_records(theirs, records)
    return allreduce


def sync_forward(**kwargs):
    """``sync_batch_norm_forward`` on a valid input with running statistics."""
    def make():
        args = dict(x=image(), running_mean=np.zeros(C, F32), running_var=np.ones(C, F32),
                    num_batches_tracked=np.zeros((), np.int64))
        return (lambda: sync_batch_norm_forward(args["x"], None, None, num_features=C,
                                                running_mean=args["running_mean"],
                                                running_var=args["running_var"],
                                                num_batches_tracked=args[
                                                    "num_batches_tracked"], **kwargs)), args
    return make


def merging(b):
    """``merge_records(a, b())`` on valid records a (of 2 + C records)."""
    def make():
        a = np.zeros((2 + C, 4))
        args = dict(a=a, b=b())
        return (lambda: merge_records(args["a"], args["b"])), args
    return make


def cs(function, x=None, gamma=None, beta=None, **bn_param):
    """``cs231n.<function>(x, gamma, beta, bn_param)`` with bn_param
    {'mode': 'train', running statistics of the right shape} updated by
    ``bn_param`` (a value of None removes the key)."""
    def make():
        spatial = function.startswith("spatial")
        xx = image(4, C, np.float64) if spatial else image(4, C, np.float64)[:, :, 0, 0].copy()
        param = {"mode": "train", "running_mean": np.zeros(C), "running_var": np.ones(C)}
        for k, v in bn_param.items():
            if v is None:
                param.pop(k)
            else:
                param[k] = v() if callable(v) else v
        args = dict(x=xx if x is None else x(xx), gamma=np.ones(C) if gamma is None else gamma(),
                    beta=np.zeros(C) if beta is None else beta(), bn_param=param)
        f = getattr(cs231n, function)
        return (lambda: f(args["x"], args["gamma"], args["beta"], args["bn_param"])), args
    return make


def cs_backward(function, dout=None, cache=None):
    """``cs231n.<function>(dout, cache)`` after a valid 'train' forward."""
    def make():
        x = image(4, C, np.float64)
        if not function.startswith("spatial"):
            x = x[:, :, 0, 0].copy()
        forward = cs231n.spatial_batchnorm_forward if x.ndim == 4 else cs231n.batchnorm_forward
        _, good_cache = forward(x, np.ones(C), np.zeros(C), {"mode": "train"})
        args = dict(dout=np.ones_like(x) if dout is None else dout(x),
                    cache=good_cache if cache is None else cache(good_cache), x=x)
        f = getattr(cs231n, function)
        return (lambda: f(args["dout"], args["cache"])), args
    return make


def dn(action, *, trained=False, **kwargs):
    """``action(layer, X)`` on a fresh deepnet Batchnorm((3, 2, 2)), X (4, 3, 2, 2)."""
    def make():
        bn = deepnet.Batchnorm((3, 2, 2), **kwargs)
        X = np.random.default_rng(2).standard_normal((4, 3, 2, 2))
        if trained:
            bn.forward(X)
        return (lambda: action(bn, X)), {"layer": bn, "X": X}
    return make


F32 = np.float32

FOLD_POSITIONAL = ("weight", "bias", "running_mean", "running_var", "gamma", "beta")


def fold_call(**changes):
    """(the call, its arguments): fastbn.fold_batch_norm on a valid (3, 2, 3, 3)
    float32 convolution weight with out_axis 0, its bias and the four arrays of
    a BatchNorm of 3 channels, with ``changes`` (a value, or a function of the
    arguments)."""
    rng = np.random.default_rng(3)
    args = dict(weight=rng.standard_normal((C, 2, 3, 3)).astype(F32),
                bias=rng.standard_normal(C).astype(F32),
                running_mean=rng.standard_normal(C).astype(F32),
                running_var=rng.uniform(0.5, 2.0, C).astype(F32),
                gamma=rng.uniform(0.5, 1.5, C).astype(F32), beta=rng.standard_normal(C).astype(F32),
                eps=1e-5, out_axis=0)
    for name, value in changes.items():
        args[name] = value(args) if callable(value) else value
    return (lambda: fastbn.fold_batch_norm(*(args[k] for k in FOLD_POSITIONAL), eps=args["eps"],
                                           out_axis=args["out_axis"])), args


def folding(**changes):
    """A row of one call of fastbn.fold_batch_norm: :func:`fold_call` made afresh."""
    return lambda: fold_call(**changes)


def fold_into(weight, out_axis=0, **kwargs):
    """``layer.fold_into(weight(), bias, out_axis=out_axis)`` on a fresh
    ``BatchNorm2d(3, **kwargs)`` that has trained a step, with a bias of 3."""
    def make():
        bn = BatchNorm2d(C, **kwargs)
        bn(image())
        w, b = weight(), np.ones(C, F32)
        return (lambda: bn.fold_into(w, b, out_axis=out_axis)), {"layer": bn, "weight": w,
                                                                  "bias": b}
    return make


# ---------------------------------------------------------------- the table ----
# x is (4, 3, 5, 2) float32 (C = 3) unless the row says otherwise; the
# functional rows start from helpers.valid_args, which passes every
# argument, out= included.

TABLE = [
    # -- functions: number of dimensions, zero-size axes, not arrays
    family("x (and dy) 0-d, 1-D (12,) or 6-D", ValueError,
           "x must have 2 to 5 dimensions (N, C, ...), got shape {shape}",
           lambda func, shape: function_call(func, ones_x(shape)),
           grid(EVERY_FUNCTION, shape=[(), (12,), (2, 3, 1, 1, 1, 2)])),
    family("x (and dy) with a zero-size axis: batch (0, 3, 5, 2), channels (4, 0) or "
           "spatial (4, 3, 0, 2)", ValueError,
           "x must not have a zero-size axis, got shape {shape}",
           lambda func, shape: function_call(func, ones_x(shape)),
           grid(EVERY_FUNCTION, shape=[(0, 3, 5, 2), (4, 0), (4, 3, 0, 2)])),
    family("x or dy a (nested) list", TypeError, "{name} must be a numpy.ndarray, got list",
           lambda func, name: function_call(func, **{name: lambda a: a[name].tolist()}),
           [dict(func=f, name="x") for f in FUNCTIONS] + [dict(func="backward", name="dy")]),
    Bad("batch_norm_forward", "x a NumPy scalar", TypeError,
        "x must be a numpy.ndarray, got float32", fn("forward", x=F32(1.0))),
    family("gamma, running_var or invstd a list", TypeError,
           "{name} must be a numpy.ndarray or None, got list",
           lambda func, name: function_call(func, **{name: lambda a: a[name].tolist()}),
           [dict(func="forward", name="gamma"), dict(func="inference", name="gamma"),
            dict(func="inference", name="running_var"), dict(func="backward", name="invstd")]),
    family("training with one value per channel, x (1, 3), (1, 1), (1, 3, 1), (1, 3, 1, 1), "
           "(1, 3, 1, 1, 1) channels first or (1, 3), (1, 1, 1, 3), (1, 1, 1, 1, 3) channels "
           "last; with out and without", ValueError,
           "Expected more than 1 value per channel when training, got input size {shape}",
           lambda func, shape, channel_axis, out: function_call(
               func, valid=dict(shape=shape, channel_axis=channel_axis),
               **({} if out else {"out": None})),
           grid([dict(func="forward", shape=s, channel_axis=ca) for s, ca in [
               ((1, 3), 1), ((1, 1), 1), ((1, 3), -1), ((1, 3, 1), 1), ((1, 3, 1, 1), 1),
               ((1, 1, 1, 3), -1), ((1, 3, 1, 1, 1), 1), ((1, 1, 1, 1, 3), -1)]],
               out=[True, False])),

    # -- functions: channel counts of every per-channel argument
    family("gamma, beta, running_mean, running_var, mean or invstd of shape (4,), (2,), (1,), "
           "(3, 1), (1, 3) or () (3 channels)", ValueError,
           "{name} must have shape (3,) (one value per channel), got shape {shape}",
           lambda func, name, shape: function_call(func, **{name: np.ones(shape, F32)}),
           grid(PER_CHANNEL, shape=[(4,), (2,), (1,), (3, 1), (1, 3), ()])),
    family("dy of another shape than x: (4, 3, 5), (4, 3, 2, 5), (3, 3, 5, 2) or (40, 3)",
           ValueError, "dy must have the shape of x (4, 3, 5, 2), got {shape}",
           lambda func, shape: function_call(func, dy=np.ones(shape, F32)),
           grid(BACKWARD, shape=[(4, 3, 5), (4, 3, 2, 5), (3, 3, 5, 2), (40, 3)])),

    # -- functions: dtypes
    family("x of dtype " + ", ".join(BAD_DTYPES[:-1]) + " or " + BAD_DTYPES[-1], TypeError,
           "x must have dtype float32, float64, float16 or bfloat16, got {dtype}",
           lambda func, dtype: function_call(func, x=lambda a: a["x"].astype(dtype)),
           grid(EVERY_FUNCTION, dtype=BAD_DTYPES)),
    Bad("batch_norm_forward", "x big-endian float32 ('>f4')", TypeError,
        "x must have dtype float32, float64, float16 or bfloat16, got float32 (big-endian)",
        fn("forward", x=lambda a: a["x"].astype(">f4"))),
    family("dy or a per-channel array of another float dtype than x: float64 with x float32, "
           "float32 with x float64, float16 with x float32", TypeError,
           "{name} must have the dtype of x ({x_dtype}), got {dtype}",
           lambda func, name, x_dtype, dtype: function_call(
               func, valid=dict(dtype=x_dtype), **{name: lambda a: a[name].astype(dtype)}),
           grid(PER_CHANNEL + [dict(func="backward", name="dy")],
                [dict(x_dtype="float32", dtype="float64"), dict(x_dtype="float64", dtype="float32"),
                 dict(x_dtype="float32", dtype="float16")])),
    Bad("batch_norm_backward", "mean int64", TypeError,
        "mean must have the dtype of x (float32), got int64",
        fn("backward", mean=np.zeros(3, np.int64))),
    # -- issue 19: 16-bit data, float32 parameters
    Bad("batch_norm_forward", "out float16 with x float32 (a 16-bit out is no cast)", TypeError,
        "out must have the dtype of x (float32), got float16",
        fn("forward", out=lambda a: np.empty(a["x"].shape, np.float16))),
    Bad("batch_norm_backward", "dy bfloat16 with x float16 (mixed 16-bit dtypes)", TypeError,
        "dy must have the dtype of x (float16), got bfloat16",
        lambda: function_call("backward", valid=dict(dtype="float16"),
                              dy=lambda a: a["dy"].astype(_bfloat16()))),
    family("a per-channel array float16 with x float16 (its parameters are float32)",
           TypeError, "{name} must have dtype float32, the parameter dtype of float16 x, got "
           "float16", lambda func, name: function_call(
               func, valid=dict(dtype="float16"), **{name: lambda a: a[name].astype(np.float16)}),
           [dict(func="forward", name="gamma"), dict(func="inference", name="running_var"),
            dict(func="backward", name="invstd")]),

    # -- functions: flags
    Bad("batch_norm_forward", "unbiased the string 'False'", TypeError,
        "unbiased must be True or False, got str", fn("forward", unbiased="False")),
    Bad("batch_norm_backward", "training the int 0", TypeError,
        "training must be True or False, got int", fn("backward", training=0)),
    Bad("batch_norm_backward", "param_grads None", TypeError,
        "param_grads must be True or False, got NoneType", fn("backward", param_grads=None)),

    Bad("batch_norm_forward", "activation 'gelu'", ValueError,
        "activation must be None, 'relu' or 'leaky_relu', got 'gelu'",
        fn("forward", activation="gelu")),
    Bad("batch_norm_inference", "activation the int 1", TypeError,
        "activation must be None, 'relu' or 'leaky_relu', got int",
        fn("inference", activation=1)),
    Bad("batch_norm_forward", "negative_slope the string '0.1'", TypeError,
        "negative_slope must be a real number, got str",
        fn("forward", activation="leaky_relu", negative_slope="0.1")),
    Bad("batch_norm_inference", "negative_slope inf", ValueError,
        "negative_slope must be finite, got inf",
        fn("inference", activation="leaky_relu", negative_slope=float("inf"))),

    # -- the backward of an activation: batch_norm_backward(beta=, activation=,
    #    negative_slope=) and batch_norm_backward_from_output (valid_args: y of a
    #    forward with leaky_relu, slope 0.1); ACTIVATED_BACKWARDS pass activation='leaky_relu'
    #    to the fused backward, so that its beta is used
    family("activation 'gelu', 'ReLU' or ''", ValueError,
           "activation must be None, 'relu' or 'leaky_relu', got {shown}",
           lambda func, activation, shown: function_call(func, activation=activation),
           grid([dict(func="backward"), dict(func="backward_from_output")],
                [dict(activation=v, shown=repr(v)) for v in ("gelu", "ReLU", "")])),
    family("activation the int 1, the bytes b'relu' or True", TypeError,
           "activation must be None, 'relu' or 'leaky_relu', got {type}",
           lambda func, activation, type: function_call(func, activation=activation),
           grid([dict(func="backward"), dict(func="backward_from_output")],
                typed("activation", [1, b"relu", True]))),
    family("negative_slope the string '0.1', None or an array", TypeError,
           "negative_slope must be a real number, got {type}",
           lambda func, activation, negative_slope, type: function_call(
               func, activation=activation, negative_slope=negative_slope),
           grid(ACTIVATED_BACKWARDS, typed("negative_slope", ["0.1", None, np.array([0.1])]))),
    family("negative_slope NaN, inf or -inf", ValueError,
           "negative_slope must be finite, got {negative_slope}",
           lambda func, activation, negative_slope: function_call(
               func, activation=activation, negative_slope=negative_slope),
           grid(ACTIVATED_BACKWARDS, negative_slope=[math.nan, math.inf, -math.inf])),
    Bad("batch_norm_backward_from_output", "activation 'relu' (not invertible)", ValueError,
        "activation 'relu' cannot be inverted (every negative pre-activation gives 0): use "
        "'leaky_relu' with a negative_slope > 0, or batch_norm_backward with x",
        fn("backward_from_output", activation="relu")),
    family("leaky_relu with negative_slope 0, -0.0, -0.1 or -1e-300 (not invertible)",
           ValueError, "negative_slope must be > 0 to invert leaky_relu, got {negative_slope}",
           lambda func, negative_slope: function_call(func, negative_slope=negative_slope),
           grid(FROM_OUTPUT, negative_slope=[0.0, -0.0, -0.1, -1e-300])),
    family("gamma with a zero: 0 in channel 1, -0.0 and 0 in channels 0 and 2, or all 0",
           ValueError, "gamma is 0 in channel(s) {channels}: y carries no information on x "
                       "there, so the backward from the output cannot recover it; use "
                       "batch_norm_backward with x",
           lambda func, gamma, channels: function_call(func, gamma=np.array(gamma, F32)),
           grid(FROM_OUTPUT, [dict(gamma=[1.0, 0.0, 1.0], channels="1"),
                              dict(gamma=[-0.0, 2.0, 0.0], channels="0, 2"),
                              dict(gamma=[0.0, 0.0, 0.0], channels="0, 1, 2")])),
    family("beta of shape (4,), (2,), (1, 3) or () (3 channels)", ValueError,
           "beta must have shape (3,) (one value per channel), got shape {shape}",
           lambda func, activation, shape: function_call(func, activation=activation,
                                                         beta=np.ones(shape, F32)),
           grid(ACTIVATED_BACKWARDS, shape=[(4,), (2,), (1, 3), ()])),
    family("beta float64 with x float32, float32 with x float64, or int64", TypeError,
           "beta must have the dtype of x ({x_dtype}), got {dtype}",
           lambda func, activation, x_dtype, dtype: function_call(
               func, valid=dict(dtype=x_dtype), activation=activation,
               beta=lambda a: np.ones(C, dtype)),
           grid([dict(func="backward", activation="leaky_relu")],
                [dict(x_dtype="float32", dtype="float64"), dict(x_dtype="float64", dtype="float32"),
                 dict(x_dtype="float32", dtype="int64")])),
    family("beta a list", TypeError, "beta must be a numpy.ndarray or None, got list",
           lambda func, activation: function_call(func, activation=activation,
                                                  beta=[0.0, 0.0, 0.0]),
           ACTIVATED_BACKWARDS),
    family("y (the output, dy unchanged) of shape (4, 3, 5) or (4, 3, 2, 5)", ValueError,
           "dy must have the shape of y {shape}, got (4, 3, 5, 2)",
           lambda func, shape: function_call(func, y=np.ones(shape, F32)),
           grid(FROM_OUTPUT, shape=[(4, 3, 5), (4, 3, 2, 5)])),
    family("dy of another shape than y: (4, 3, 5) or (4, 3, 2, 5)", ValueError,
           "dy must have the shape of y (4, 3, 5, 2), got {shape}",
           lambda func, shape: function_call(func, dy=np.ones(shape, F32)),
           grid(FROM_OUTPUT, shape=[(4, 3, 5), (4, 3, 2, 5)])),
    family("y (and dy) 1-D (12,) or 6-D", ValueError,
           "y must have 2 to 5 dimensions (N, C, ...), got shape {shape}",
           lambda func, shape: function_call(func, y=np.ones(shape, F32),
                                             dy=np.ones(shape, F32)),
           grid(FROM_OUTPUT, shape=[(12,), (2, 3, 1, 1, 1, 2)])),
    family("y of dtype int64, int16 or bool", TypeError,
           "y must have dtype float32, float64, float16 or bfloat16, got {dtype}",
           lambda func, dtype: function_call(func, y=lambda a: a["y"].astype(dtype)),
           grid(FROM_OUTPUT, dtype=["int64", "int16", "bool"])),
    Bad("batch_norm_backward_from_output", "y a list", TypeError,
        "y must be a numpy.ndarray, got list",
        fn("backward_from_output", y=lambda a: a["y"].tolist())),
    Bad("batch_norm_backward_from_output", "invstd None", TypeError,
        "invstd (from batch_norm_forward) is required, got None",
        fn("backward_from_output", invstd=None)),
    family("out overlapping y or dy in part: 1 or 7 items before or after it", ValueError,
           "out overlaps {name}; out may be dy or y itself (in place)",
           lambda func, name, shift: function_call(func, overlap(name, shift)),
           grid(FROM_OUTPUT, name=["y", "dy"], shift=[1, -1, 7, -7])),
    family("gamma, beta or invstd stored inside out; beta of the fused backward too",
           ValueError, "out overlaps {name}",
           lambda func, name, activation=None: function_call(
               func, inside_out(name), **({} if activation is None else
                                          {"activation": activation,
                                           "beta": np.ones(C, F32)})),
           [dict(func="backward", name="beta", activation="leaky_relu")]
           + [dict(func="backward_from_output", name=n) for n in ("gamma", "beta", "invstd")]),
    Bad("batch_norm_backward_from_output", "dy, gamma or invstd float64 with y float32",
        TypeError, "{name} must have the dtype of y (float32), got float64",
        lambda name: function_call("backward_from_output",
                                   **{name: lambda a: a[name].astype("float64")}),
        tuple(grid(name=["dy", "gamma", "invstd"]))),
    Bad("batch_norm_backward_from_output", "out of shape (4, 3, 5, 3)", ValueError,
        "out must have the shape of y (4, 3, 5, 2), got (4, 3, 5, 3)",
        fn("backward_from_output", out=np.empty((4, 3, 5, 3), F32))),
    Bad("batch_norm_backward_from_output", "out float64 (y float32)", TypeError,
        "out must have the dtype of y (float32), got float64",
        fn("backward_from_output", out=np.empty(SHAPE))),

    # -- functions: out
    family("out of another shape: (4, 3, 5, 3) or transposed (4, 3, 2, 5)", ValueError,
           "out must have the shape of x (4, 3, 5, 2), got {shape}",
           lambda func, shape: function_call(func, out=np.empty(shape, F32)),
           grid(EVERY_FUNCTION, shape=[(4, 3, 5, 3), (4, 3, 2, 5)])),
    family("out float64 or int32, x float32", TypeError,
           "out must have the dtype of x (float32), got {dtype}",
           lambda func, dtype: function_call(func, out=np.empty(SHAPE, dtype)),
           grid(EVERY_FUNCTION, dtype=["float64", "int32"])),
    family("out a strided view or in Fortran order", ValueError,
           "out must be C-contiguous, got a non-contiguous array",
           lambda func, layout: function_call(func, out=NOT_C_CONTIGUOUS[layout]()),
           grid(EVERY_FUNCTION, layout=list(NOT_C_CONTIGUOUS))),
    family("out read-only", ValueError, "out must be writeable, got a read-only array",
           lambda func: function_call(func, out=read_only(np.empty(SHAPE, F32))),
           EVERY_FUNCTION),
    Bad("batch_norm_inference", "out=x with x read-only", ValueError, "out must be writeable",
        fn("inference", lambda a: a.update(x=read_only(a["x"])),
           lambda a: a.update(out=a["x"]))),
    family("out a list", TypeError, "out must be a numpy.ndarray or None, got list",
           lambda func: function_call(func, out=lambda a: a["out"].tolist()), EVERY_FUNCTION),
    family("out overlapping x (or dy, in the backward) in part: 1, 7 or 29 items before or "
           "after it", ValueError, "out overlaps {name}; out may be {in_place} itself (in place)",
           lambda func, name, shift, **_: function_call(func, overlap(name, shift)),
           grid([dict(func="forward", name="x", in_place="x"),
                 dict(func="inference", name="x", in_place="x"),
                 dict(func="backward", name="x", in_place="dy"),
                 dict(func="backward", name="dy", in_place="dy")],
                shift=[1, -1, 7, -7, 29, -29])),
    Bad("batch_norm_backward", "out=x (only out=dy is in place)", ValueError,
        "out overlaps x; out may be dy itself (in place)",
        fn("backward", out=lambda a: a["x"])),
    family("a per-channel array stored inside out", ValueError, "out overlaps {name}",
           lambda func, name: function_call(func, inside_out(name)), PER_CHANNEL),

    # -- functions: eps, momentum, num_threads, channel_axis
    family("eps 0, -0, negative, NaN, inf or -inf", ValueError,
           "eps must be finite and > 0, got {eps}",
           lambda func, eps: function_call(func, eps=eps),
           grid(TRAINING_AND_INFERENCE, eps=[0.0, -0.0, -1e-5, math.nan, math.inf, -math.inf])),
    Bad("batch_norm_forward", "eps 10**400 (beyond a float)", ValueError,
        "eps must be finite and > 0, got 10000000000000000...",
        fn("forward", eps=10**400)),
    family("eps a string, None, a bool or an array", TypeError,
           "eps must be a real number, got {type}",
           lambda func, eps, type: function_call(func, eps=eps),
           grid(TRAINING_AND_INFERENCE,
                typed("eps", ["1e-5", None, True, np.array([1e-5, 1e-5])]))),
    family("momentum outside [0, 1]: -0.1, -1e-300, 1.0000001, 1.5, 2, NaN or inf", ValueError,
           "momentum must be in [0, 1] or None, got {momentum}",
           lambda func, momentum: function_call(func, momentum=momentum),
           grid(TRAINING, momentum=[-0.1, -1e-300, 1.0000001, 1.5, 2.0, math.nan, math.inf])),
    family("momentum a string, a bool or a list", TypeError,
           "momentum must be a real number or None, got {type}",
           lambda func, momentum, type: function_call(func, momentum=momentum),
           grid(TRAINING, typed("momentum", ["0.1", True, [0.1]]))),
    family("num_threads 0 (an int or a NumPy int64) or negative", ValueError,
           "num_threads must be a positive int or None, got {num_threads}",
           lambda func, num_threads: function_call(func, num_threads=num_threads),
           grid(EVERY_FUNCTION, num_threads=[0, np.int64(0), -1, -2, -4])),
    family("num_threads 1.5 or 2.0 (floats), '2' (a string) or True (a bool)", TypeError,
           "num_threads must be a positive int or None, got {type}",
           lambda func, num_threads, type: function_call(func, num_threads=num_threads),
           grid(EVERY_FUNCTION, typed("num_threads", [1.5, 2.0, "2", True]))),
    family("channel_axis 0, 2, -2, 4, -4, -5 or 100 (x 4-D)", ValueError,
           "channel_axis must be 1 (channels first) or -1 (channels last), "
           "got {channel_axis} for an input of 4 dimensions",
           lambda func, channel_axis: function_call(func, channel_axis=channel_axis),
           grid(EVERY_FUNCTION, channel_axis=[0, 2, -2, 4, -4, -5, 100])),
    family("channel_axis 1.0 (a float), '1' (a string), True (a bool) or None", TypeError,
           "channel_axis must be an int, got {type}",
           lambda func, channel_axis, type: function_call(func, channel_axis=channel_axis),
           grid(EVERY_FUNCTION, typed("channel_axis", [1.0, "1", True, None]))),

    # -- functions: running statistics and the counter
    family("running_mean or running_var read-only", ValueError,
           "{name} is updated in place and must be writeable, got a read-only array",
           lambda func, name: function_call(func, **{name: lambda a: read_only(a[name])}),
           grid(TRAINING, name=["running_mean", "running_var"])),
    family("running_var without running_mean, or running_mean without running_var",
           ValueError, "running_mean and running_var must be given together, got only {given}",
           lambda func, given, missing: function_call(func, **{missing: None}),
           grid(TRAINING, [dict(given="running_var", missing="running_mean"),
                           dict(given="running_mean", missing="running_var")])),
    Bad("batch_norm_forward", "running_var a view into x", ValueError,
        "running_var overlaps x",
        fn("forward", running_var=lambda a: a["x"].reshape(-1)[:3])),
    Bad("batch_norm_forward", "running_mean a writeable zero-stride view (one float for 3 "
        "channels)", ValueError,
        "running_mean is updated in place and needs one value per channel, got a zero-stride "
        "view", fn("forward", running_mean=lambda a: np.lib.stride_tricks.as_strided(
            np.zeros(1, F32), (3,), (0,), writeable=True))),
    Bad("batch_norm_forward", "running_var the same array as running_mean", ValueError,
        "running_var overlaps running_mean",
        fn("forward", running_var=lambda a: a["running_mean"])),
    Bad("batch_norm_forward", "momentum=None without num_batches_tracked", ValueError,
        "momentum=None (cumulative average) needs num_batches_tracked",
        fn("forward", momentum=None, num_batches_tracked=None)),
    family("num_batches_tracked not int64: a float64, a bool or an int8 0-d array (an int8 "
           "would wrap at 127); momentum 0.1 or None", TypeError,
           "num_batches_tracked must be an integer count of dtype int64 (PyTorch's dtype; a "
           "narrower count would wrap), got dtype {dtype}",
           lambda func, dtype, momentum: function_call(
               func, momentum=momentum, num_batches_tracked=np.zeros((), dtype)),
           grid(TRAINING, dtype=["float64", "bool", "int8"], momentum=[0.1, None])),
    Bad("batch_norm_forward", "num_batches_tracked two int64s", ValueError,
        "num_batches_tracked must hold one count, got shape (2,)",
        fn("forward", num_batches_tracked=np.zeros(2, np.int64))),
    Bad("batch_norm_forward", "num_batches_tracked -1", ValueError,
        "num_batches_tracked must be an integer count >= 0 that can grow by one within int64, "
        "got -1",
        fn("forward", num_batches_tracked=np.array(-1))),
    Bad("batch_norm_forward", "num_batches_tracked at the int64 maximum", ValueError,
        "num_batches_tracked must be an integer count >= 0 that can grow by one within int64, "
        "got 9223372036854775807",
        fn("forward", num_batches_tracked=np.array(np.iinfo(np.int64).max))),
    Bad("batch_norm_forward", "num_batches_tracked read-only, momentum=None", ValueError,
        "num_batches_tracked is updated in place and must be writeable, got a read-only array",
        fn("forward", momentum=None, num_batches_tracked=read_only(np.array(0, np.int64)))),
    Bad("batch_norm_forward", "num_batches_tracked a string, no running statistics", TypeError,
        "num_batches_tracked must be an integer count, a numpy.ndarray of one int64 (updated in "
        "place), got str",
        fn("forward", running_mean=None, running_var=None, num_batches_tracked="3")),
    Bad("batch_norm_forward", "num_batches_tracked the int 0, momentum=None", TypeError,
        "num_batches_tracked must be an integer count, a numpy.ndarray of one int64 (updated in "
        "place), got int",
        fn("forward", momentum=None, num_batches_tracked=0)),
    Bad("batch_norm_forward", "num_batches_tracked a view of out's first 8 bytes", ValueError,
        "out overlaps num_batches_tracked",
        fn("forward", lambda a: a.update(x=a["x"].astype(np.float64),
                                         gamma=None, beta=None,
                                         running_mean=a["running_mean"].astype(np.float64),
                                         running_var=a["running_var"].astype(np.float64),
                                         out=np.zeros(SHAPE)),
           lambda a: a.update(num_batches_tracked=a["out"].reshape(-1)[:1].view(np.int64))),),
    family("running_mean or running_var None", TypeError,
           "running_mean and running_var are required in inference, got None",
           lambda func, missing: function_call(func, **{missing: None}),
           grid(INFERENCE, missing=["running_mean", "running_var"])),
    family("mean or invstd None", TypeError,
           "mean and invstd (from batch_norm_forward) are required, got None",
           lambda func, missing: function_call(func, **{missing: None}),
           grid(BACKWARD, missing=["mean", "invstd"])),
    Bad("batch_norm_forward", "x a masked array", TypeError,
        "x must be a numpy.ndarray, got a numpy.ma.MaskedArray (its mask would be ignored)",
        fn("forward", x=lambda a: np.ma.masked_less(a["x"], 0.0))),
    Bad("batch_norm_backward", "dy a masked array", TypeError,
        "dy must be a numpy.ndarray, got a numpy.ma.MaskedArray",
        fn("backward", dy=lambda a: np.ma.masked_array(a["dy"]))),

    # -- Batch Renormalization and Ghost Batch Normalization (fastbn.variants)
    Bad("batch_renorm_forward", "rmax 0.5 (< 1)", ValueError,
        "rmax must be >= 1 (r is clipped to [rmin, rmax], around 1), got 0.5",
        variant("batch_renorm_forward", rmax=0.5)),
    Bad("batch_renorm_forward", "rmin 2.0 (> 1)", ValueError,
        "rmin must be in [0, 1] (r is clipped to [rmin, rmax], around 1), got 2.0",
        variant("batch_renorm_forward", rmin=2.0)),
    Bad("batch_renorm_forward", "dmax -1.0", ValueError,
        "dmax must be >= 0 (d is clipped to [-dmax, dmax]), got -1.0",
        variant("batch_renorm_forward", dmax=-1.0)),
    Bad("batch_renorm_forward", "rmax NaN", ValueError, "rmax must not be NaN",
        variant("batch_renorm_forward", rmax=float("nan"))),
    Bad("batch_renorm_forward", "dmax the string '5'", TypeError,
        "dmax must be a real number, got str", variant("batch_renorm_forward", dmax="5")),
    Bad("batch_renorm_forward", "running_var None", TypeError,
        "running_mean and running_var are required by Batch Renormalization",
        variant("batch_renorm_forward", running_var=None)),
    Bad("batch_renorm_backward", "r None", TypeError,
        "r (from the forward) is required, got None", variant("batch_renorm_backward", r=None)),
    Bad("batch_renorm_backward", "d of shape (4,)", ValueError,
        "d must have shape (3,), that of mean (3,), got (4,)",
        variant("batch_renorm_backward", d=np.zeros(4, np.float32))),
    Bad("ghost_batch_norm_forward", "virtual_batch_size 3 does not divide N = 4", ValueError,
        "virtual_batch_size=3 must be > 0 and divide the batch size N=4",
        variant("ghost_batch_norm_forward", virtual_batch_size=3)),
    Bad("ghost_batch_norm_forward", "groups of one sample and one value per channel",
        ValueError, "virtual_batch_size=1 gives groups of 1 value per channel for x of shape "
                    "(4, 3)",
        variant("ghost_batch_norm_forward", virtual_batch_size=1,
                x=lambda a: a["x"][:, :, 0, 0].copy(), out=None)),
    Bad("ghost_batch_norm_forward", "virtual_batch_size the float 2.0", TypeError,
        "virtual_batch_size must be an int, got float",
        variant("ghost_batch_norm_forward", virtual_batch_size=2.0)),
    Bad("ghost_batch_norm_backward", "mean (C,), not (groups, C)", ValueError,
        "mean must have shape (groups, 3), got (3,)",
        variant("ghost_batch_norm_backward", mean=lambda a: a["mean"][0].copy())),
    Bad("ghost_batch_norm_backward", "3 groups for N = 4", ValueError,
        "mean has 3 groups, which must divide the batch size N=4",
        variant("ghost_batch_norm_backward", mean=np.zeros((3, 3), np.float32),
                invstd=np.ones((3, 3), np.float32))),
    Bad("BatchNorm2d", "renorm_clipping without renorm", ValueError,
        "BatchNorm2d: renorm_clipping needs renorm=True, got renorm=False",
        construct(BatchNorm2d, num_features=3, renorm_clipping={"rmax": 2.0})),
    Bad("BatchNorm2d", "renorm_clipping with the key 'rmx'", ValueError,
        "BatchNorm2d: renorm_clipping takes the keys 'rmax', 'rmin' and 'dmax', got 'rmx'",
        construct(BatchNorm2d, num_features=3, renorm=True, renorm_clipping={"rmx": 2.0})),
    Bad("BatchNorm2d", "renorm_clipping rmax 0.5", ValueError, "BatchNorm2d: rmax must be >= 1",
        construct(BatchNorm2d, num_features=3, renorm=True, renorm_clipping={"rmax": 0.5})),
    Bad("BatchNorm2d", "renorm without running statistics", ValueError,
        "BatchNorm2d: renorm=True needs track_running_stats=True",
        construct(BatchNorm2d, num_features=3, renorm=True, track_running_stats=False)),
    Bad("BatchNorm2d", "virtual_batch_size 0", ValueError,
        "BatchNorm2d: virtual_batch_size must be > 0 or None, got 0",
        construct(BatchNorm2d, num_features=3, virtual_batch_size=0)),
    Bad("BatchNorm2d", "memory_saving with virtual_batch_size", ValueError,
        "BatchNorm2d: memory_saving=True is not available with renorm or virtual_batch_size",
        construct(BatchNorm2d, num_features=3, memory_saving=True, virtual_batch_size=2)),
    Bad("BatchNorm2d(3, virtual_batch_size=3)", "a training batch of N = 4", ValueError,
        "virtual_batch_size=3 must be > 0 and divide the batch size N=4",
        layer(BatchNorm2d, lambda bn, x: bn(x), virtual_batch_size=3)),
    Bad("BatchNorm2d(3)", "load_state_dict with renorm_clipping rmax 0.5", ValueError,
        "BatchNorm2d.load_state_dict: rmax must be >= 1",
        layer(BatchNorm2d, lambda bn, x: bn.load_state_dict(
            {**bn.state_dict(), "renorm_clipping": np.array([0.5, 1.0, 1.0])}))),

    # -- layers
    Bad("BatchNorm2d(3)", "x 3-D", ValueError,
        "BatchNorm2d expects 4-D input (N, C, H, W), got 3-D input of shape (4, 3, 5)",
        layer(BatchNorm2d, lambda bn, x: bn(x[..., 0]))),
    Bad("BatchNorm1d(3)", "x 4-D", ValueError,
        "BatchNorm1d expects 2-D or 3-D input (N, C) or (N, C, L), got 4-D input",
        layer(BatchNorm1d, lambda bn, x: bn(x))),
    Bad("BatchNorm2d(3)", "x with 4 channels", ValueError,
        "BatchNorm2d expects 3 channels on axis 1, got input of shape (4, 4, 5, 2)",
        layer(BatchNorm2d, lambda bn, x: bn(image(4, 4)))),
    Bad("BatchNorm2d(3, channel_axis=-1)", "x channels first", ValueError,
        "BatchNorm2d expects 3 channels on axis -1, got input of shape (4, 3, 5, 2)",
        layer(BatchNorm2d, lambda bn, x: bn(x), channel_axis=-1)),
    Bad("BatchNorm2d(3)", "x float64 (the layer is float32)", TypeError,
        "BatchNorm2d: x must have the layer's dtype (float32), got float64",
        layer(BatchNorm2d, lambda bn, x: bn(x.astype(np.float64)))),
    Bad("BatchNorm2d(3)", "x int64", TypeError,
        "BatchNorm2d: x must have the layer's dtype (float32), got int64",
        layer(BatchNorm2d, lambda bn, x: bn(x.astype(np.int64)))),
    Bad("BatchNorm2d(3)", "x a list", TypeError,
        "BatchNorm2d: x must be a numpy.ndarray, got list",
        layer(BatchNorm2d, lambda bn, x: bn(x.tolist()))),
    Bad("BatchNorm2d(3)", "training with one value per channel", ValueError,
        "Expected more than 1 value per channel when training, got input size (1, 3, 1, 1)",
        layer(BatchNorm2d, lambda bn, x: bn(x[:1, :, :1, :1].copy()))),
    Bad("BatchNorm2d(3)", "read-only running_mean (set by the user)", ValueError,
        "running_mean is updated in place and must be writeable",
        layer(BatchNorm2d, lambda bn, x: bn(x),
              setup=lambda bn: setattr(bn.running_mean.flags, "writeable", False))),
    Bad("BatchNorm2d(3)", "backward before any forward", RuntimeError,
        "BatchNorm2d.backward called before forward",
        layer(BatchNorm2d, lambda bn, x: bn.backward(np.ones_like(x)))),
    Bad("BatchNorm2d(3)", "backward dy of another shape", ValueError,
        "BatchNorm2d.backward: dy must have the shape of the last forward's input "
        "(4, 3, 5, 2), got (4, 3, 2, 5)",
        layer(BatchNorm2d, lambda bn, x: bn.backward(np.ones((4, 3, 2, 5), F32)),
              trained=True)),
    Bad("BatchNorm2d(3)", "backward dy float64", TypeError,
        "BatchNorm2d.backward: dy must have the dtype of x (float32), got float64",
        layer(BatchNorm2d, lambda bn, x: bn.backward(np.ones(x.shape)), trained=True)),
    Bad("BatchNorm2d(3), eval mode", "backward dy a list", TypeError,
        "BatchNorm2d.backward: dy must be a numpy.ndarray, got list",
        layer(BatchNorm2d, lambda bn, x: bn.backward(np.ones_like(x).tolist()), trained=True,
              mode="eval")),
    Bad("BatchNorm2d", "num_features 0", ValueError,
        "BatchNorm2d: num_features must be >= 1, got 0", construct(BatchNorm2d, num_features=0)),
    Bad("BatchNorm2d", "num_features 2**62 (no memory holds it)", ValueError,
        "BatchNorm2d: num_features must be small enough for one value per channel to fit in "
        "memory, got 4611686018427387904", construct(BatchNorm2d, num_features=2**62)),
    Bad("BatchNorm2d", "unbiased the int 1", TypeError,
        "BatchNorm2d: unbiased must be True or False, got int",
        construct(BatchNorm2d, num_features=3, unbiased=1)),
    Bad("BatchNorm2d", "eps NaN", ValueError, "BatchNorm2d: eps must be finite and > 0, got nan",
        construct(BatchNorm2d, num_features=3, eps=float("nan"))),
    Bad("BatchNorm2d", "momentum 1.5", ValueError,
        "BatchNorm2d: momentum must be in [0, 1] or None, got 1.5",
        construct(BatchNorm2d, num_features=3, momentum=1.5)),
    Bad("BatchNorm1d", "num_threads 0", ValueError,
        "BatchNorm1d: num_threads must be a positive int or None, got 0",
        construct(BatchNorm1d, num_features=3, num_threads=0)),
    Bad("BatchNorm1d", "num_threads '2' (a string)", TypeError,
        "BatchNorm1d: num_threads must be a positive int or None, got str",
        construct(BatchNorm1d, num_features=3, num_threads="2")),
    Bad("BatchNorm2d", "dtype float16", TypeError,
        "BatchNorm2d: dtype must be float32 or float64, got float16",
        construct(BatchNorm2d, num_features=3, dtype=np.float16)),
    Bad("BatchNorm2d", "activation 'gelu'", ValueError,
        "BatchNorm2d: activation must be None, 'relu' or 'leaky_relu', got 'gelu'",
        construct(BatchNorm2d, num_features=3, activation="gelu")),
    Bad("BatchNorm1d", "activation the int 1", TypeError,
        "BatchNorm1d: activation must be None, 'relu' or 'leaky_relu', got int",
        construct(BatchNorm1d, num_features=3, activation=1)),
    Bad("BatchNorm2d", "negative_slope NaN", ValueError,
        "BatchNorm2d: negative_slope must be finite, got nan",
        construct(BatchNorm2d, num_features=3, activation="leaky_relu",
                  negative_slope=float("nan"))),
    Bad("BatchNorm2d", "memory_saving the int 1", TypeError,
        "BatchNorm2d: memory_saving must be True or False, got int",
        construct(BatchNorm2d, num_features=3, memory_saving=1)),
    Bad("BatchNorm2d", "memory_saving with activation 'relu' (not invertible)", ValueError,
        "BatchNorm2d: memory_saving=True needs activation None or 'leaky_relu' with "
        "negative_slope > 0 (its backward inverts the activation on the output), got "
        "activation='relu'",
        construct(BatchNorm2d, num_features=3, activation="relu", memory_saving=True)),
    Bad("BatchNorm2d", "memory_saving with 'leaky_relu' and negative_slope 0 or -0.1",
        ValueError, "BatchNorm2d: memory_saving=True needs activation None or 'leaky_relu' "
        "with negative_slope > 0 (its backward inverts the activation on the output), got "
        "activation='leaky_relu' with negative_slope={slope}",
        lambda slope: construct(BatchNorm2d, num_features=3, activation="leaky_relu",
                                negative_slope=slope, memory_saving=True)(),
        tuple(grid(slope=[0, -0.1]))),
    Bad("BatchNorm2d", "memory_saving with a backend without batch_norm_backward_from_output",
        TypeError, "backend must provide batch_norm_forward, batch_norm_inference, "
        "batch_norm_backward, batch_norm_backward_from_output with the signatures of "
        "fastbn.functional",
        construct(BatchNorm2d, num_features=3, memory_saving=True, backend=types.SimpleNamespace(
            batch_norm_forward=fastbn.batch_norm_forward,
            batch_norm_inference=fastbn.batch_norm_inference,
            batch_norm_backward=fastbn.batch_norm_backward))),
    Bad("BatchNorm2d(3, memory_saving=True)", "backward after a forward with gamma 0 in "
        "channel 1", ValueError, "BatchNorm2d.backward: gamma was 0 in channel(s) 1 at the "
        "forward: the output says nothing of the input there",
        layer(BatchNorm2d, lambda bn, x: bn.backward(np.ones_like(x)), trained=True,
              setup=lambda bn: bn.gamma.__setitem__(1, 0), memory_saving=True)),
    Bad("BatchNorm1d(3)", "gamma assigned a (4,) array", ValueError,
        "BatchNorm1d.gamma must have shape (3,), got (4,)",
        assign("gamma", lambda: np.ones(4, F32))),
    Bad("BatchNorm1d(3)", "beta assigned a list", TypeError,
        "BatchNorm1d.beta must be a numpy.ndarray, got list",
        assign("beta", lambda: [0.0, 0.0, 0.0])),
    Bad("BatchNorm2d(3)", "load_state_dict with running_var of 4 channels", ValueError,
        "BatchNorm2d.load_state_dict: running_var must have shape (3,), got (4,)",
        load(running_var=lambda: np.ones(4, F32))),
    Bad("BatchNorm2d(3)", "load_state_dict with num_batches_tracked -1", ValueError,
        "BatchNorm2d.load_state_dict: num_batches_tracked must be an integer count >= 0 that "
        "can grow by one within int64, got -1",
        load(num_batches_tracked=lambda: np.array(-1))),
    Bad("BatchNorm2d(3)", "load_state_dict with a bias of strings", TypeError,
        "BatchNorm2d.load_state_dict: bias",
        load(bias=lambda: np.array(["a", "b", "c"])),),

    # -- issue 20: the backward differentiates the forward that ran
    Bad("BatchNorm2d(3, memory_saving=True)", "backward after a forward with gamma 0 in "
        "channel 1, gamma set to 1 since (an optimizer step)", ValueError,
        "BatchNorm2d.backward: gamma was 0 in channel(s) 1 at the forward",
        layer(BatchNorm2d, lambda bn, x: bn.backward(np.ones_like(x)), trained=True,
              setup=lambda bn: bn.gamma.__setitem__(1, 0),
              then=lambda bn: bn.gamma.__setitem__(1, 1.0), memory_saving=True)),
    # -- issue 20: every state change is all or nothing, and names the array
    Bad("BatchNorm2d(3)", "reset_running_stats or reset_parameters with a read-only "
        "running_var, num_batches_tracked or weight", ValueError,
        "BatchNorm2d.{method}: {name} is reset in place and must be writeable, got a "
        "read-only array",
        lambda method, name: frozen(BatchNorm2d, lambda bn: getattr(bn, method)(), name)(),
        tuple(grid(method=["reset_running_stats", "reset_parameters"],
                   name=["running_var", "num_batches_tracked"]))
        + ({"method": "reset_parameters", "name": "weight"},)),
    Bad("BatchNorm2d(3)", "load_state_dict into a read-only running_mean or bias", ValueError,
        "BatchNorm2d.load_state_dict: {name} is loaded in place and must be writeable",
        lambda name: frozen(BatchNorm2d, lambda bn: bn.load_state_dict(
            {k: v + 1 for k, v in bn.state_dict().items()}), name)(),
        tuple(grid(name=["running_mean", "bias"]))),
    Bad("BatchNorm1d(3)", "gamma or bias assigned a read-only array (np.load(mmap_mode='r'))",
        ValueError, "BatchNorm1d.{name} is updated in place (load_state_dict, "
        "reset_parameters, optimizers) and must be writeable, got a read-only array",
        lambda name: assign(name, lambda: read_only(np.ones(C, F32)))(),
        tuple(grid(name=["gamma", "bias"]))),
    Bad("BatchNorm1d(3)", "beta assigned the gamma array itself", ValueError,
        "BatchNorm1d.beta overlaps weight; it is updated in place and needs memory of its own",
        layer(BatchNorm1d, lambda bn, x: setattr(bn, "beta", bn.gamma))),
    # -- issue 20: flags are bools, numbers fit a float, counts are integers
    Bad("BatchNorm2d(3)", "train(mode) with 1, 'False' or None (the error is a ValueError "
        "too, as in PyTorch)", TypeError, "BatchNorm2d.train: mode must be True or False, "
        "got {type}", lambda mode, type: layer(BatchNorm2d, lambda bn, x: bn.train(mode))(),
        tuple(typed("mode", [1, "False", None]))),
    Bad("BatchNorm2d", "affine or track_running_stats 1", TypeError,
        "BatchNorm2d: {flag} must be True or False, got int",
        lambda flag: construct(BatchNorm2d, num_features=3, **{flag: 1})(),
        tuple(grid(flag=["affine", "track_running_stats"]))),
    Bad("BatchNorm2d(3)", "load_state_dict with strict=1", TypeError,
        "BatchNorm2d.load_state_dict: strict must be True or False, got int",
        layer(BatchNorm2d, lambda bn, x: bn.load_state_dict(bn.state_dict(), strict=1))),
    family("negative_slope 10**400 or -10**400 (too large for a float)", ValueError,
           "negative_slope must be finite, got {shown}",
           lambda func, sign, shown: function_call(func, activation="leaky_relu",
                                                   negative_slope=sign * 10**400),
           grid(EVERY_FUNCTION + FROM_OUTPUT, [dict(sign=1, shown="10000000000000000..."),
                                               dict(sign=-1, shown="-1000000000000000...")])),
    Bad("BatchNorm2d", "negative_slope 10**400", ValueError,
        "BatchNorm2d: negative_slope must be finite, got 10000000000000000...",
        construct(BatchNorm2d, num_features=3, activation="leaky_relu",
                  negative_slope=10**400)),
    Bad("sync_batch_norm_forward", "negative_slope 10**400", ValueError,
        "negative_slope must be finite, got 10000000000000000...",
        sync_forward(allreduce=lambda r: r, activation="leaky_relu", negative_slope=10**400)),
    Bad("BatchNorm2d(3)", "load_state_dict with num_batches_tracked 3.0 or a float64 array",
        TypeError, "BatchNorm2d.load_state_dict: num_batches_tracked must be an integer count",
        lambda count: load(num_batches_tracked=lambda: count)(),
        tuple(grid(count=[3.0, np.array(3.0)]))),
    Bad("BatchNorm2d(3)", "load_state_dict with num_batches_tracked 2**63 or 2**100",
        ValueError,
        "BatchNorm2d.load_state_dict: num_batches_tracked must be an integer count >= 0 that "
        "can grow by one within int64, got {shown}",
        lambda power, shown: load(num_batches_tracked=lambda: 2**power)(),
        ({"power": 63, "shown": "9223372036854775808"},
         {"power": 100, "shown": "12676506002282294..."})),
    # -- issue 20: load_state_dict's type errors name the key
    Bad("BatchNorm2d(3)", "load_state_dict with a list of pairs (not a mapping)", TypeError,
        "BatchNorm2d.load_state_dict: state_dict must be a mapping of str to arrays (as "
        "state_dict() returns), got list",
        layer(BatchNorm2d, lambda bn, x: bn.load_state_dict(list(bn.state_dict().items())))),
    Bad("BatchNorm2d(3)", "load_state_dict with running_var None, a string, int64 or int16",
        TypeError, "BatchNorm2d.load_state_dict: running_var must be float32, float64, float16 or bfloat16 values "
        "(a numpy.ndarray, a torch.Tensor or a list of floats), got {type}",
        lambda value, type: load(running_var=lambda: value)(),
        tuple(typed("value", [None, "1.0"])) + (
            {"value": np.ones(C, np.int64), "type": "ndarray of dtype int64"},
            {"value": np.ones(C, np.int16), "type": "ndarray of dtype int16"})),
    # -- issue 20: in place means in place (fastbn.distributed)
    Bad("merge_records", "b read-only", ValueError,
        "merge_records: b is updated in place and must be writeable, got a read-only array",
        merging(lambda: read_only(np.zeros((2 + C, 4))))),
    Bad("merge_records", "b float32", TypeError,
        "merge_records: b must have dtype float64, got float32",
        merging(lambda: np.zeros((2 + C, 4), np.float32))),
    # -- issue 20: a copy keeps the communicator or is refused
    Bad("SyncBatchNorm(3)", "pickle.dumps with a comm other than MPI.COMM_WORLD (here a "
        "wrapper object; a comm.Split group alike, under MPI in test_sync.py)", TypeError,
        "SyncBatchNorm(3) is bound to a communicator other than MPI.COMM_WORLD, which cannot "
        "be pickled", layer(SyncBatchNorm, lambda bn, x: pickle.dumps(bn),
                            then=lambda bn: setattr(bn, "comm", types.SimpleNamespace()),
                            allreduce=lambda r: r)),
    # -- issue 20: the synchronized functions compare the activation across ranks
    Bad("sync_batch_norm_forward", "another rank passes activation 'relu' (two ranks)",
        ValueError, "sync_batch_norm_forward: the ranks disagree on activation: None on some "
        "ranks, 'relu' on others", sync_forward(allreduce=other_rank(ACTIVATION=1))),
    Bad("sync_batch_norm_forward", "another rank passes leaky_relu with negative_slope 0.2",
        ValueError, "sync_batch_norm_forward: the ranks disagree on negative_slope (of "
        "activation 'leaky_relu'): 0.1 on some ranks, 0.2 on others",
        sync_forward(allreduce=other_rank(SLOPE=0.2), activation="leaky_relu",
                     negative_slope=0.1)),

    # -- folding (weight (3, 2, 3, 3) float32, out_axis 0: C = 3)
    Bad("fold_batch_norm", "weight 0-d or 1-D (3,)", ValueError,
        "weight must have 2 or more dimensions ((O, I, ...) or (I, O)), got shape {shape}",
        lambda shape: fold_call(weight=np.ones(shape, F32)), tuple(grid(shape=[(), (3,)]))),
    Bad("fold_batch_norm", "weight with a zero-size axis (3, 0)", ValueError,
        "weight must not have a zero-size axis, got shape (3, 0)",
        folding(weight=np.ones((3, 0), F32))),
    Bad("fold_batch_norm", "weight of dtype int64, int16, complex64 or bool", TypeError,
        "weight must have dtype float32, float64, float16 or bfloat16, got {dtype}",
        lambda dtype: fold_call(weight=lambda a: a["weight"].astype(dtype)),
        tuple(grid(dtype=["int64", "int16", "complex64", "bool"]))),
    Bad("fold_batch_norm", "weight a list", TypeError, "weight must be a numpy.ndarray, got list",
        folding(weight=lambda a: a["weight"].tolist())),
    Bad("fold_batch_norm", "running_mean, running_var, bias, gamma or beta of shape (4,), (2,) "
        "or (3, 1) (3 channels)", ValueError,
        "{name} must have shape (3,) (one value per channel on out_axis 0 of weight), got "
        "shape {shape}",
        lambda name, shape: fold_call(**{name: np.ones(shape, F32)}),
        tuple(grid(name=["running_mean", "running_var", "bias", "gamma", "beta"],
                   shape=[(4,), (2,), (3, 1)]))),
    Bad("fold_batch_norm", "out_axis 1, an axis of 2 channels (the statistics have 3)",
        ValueError,
        "running_mean must have shape (2,) (one value per channel on out_axis 1 of weight), got "
        "shape (3,)", folding(out_axis=1)),
    Bad("fold_batch_norm", "running_var or gamma int64 or int16", TypeError,
        "{name} must have dtype float32, float64, float16 or bfloat16, got {dtype}",
        lambda name, dtype: fold_call(**{name: lambda a: a[name].astype(dtype)}),
        tuple(grid(name=["running_var", "gamma"], dtype=["int64", "int16"]))),
    Bad("fold_batch_norm", "running_mean None", TypeError,
        "running_mean must be a numpy.ndarray, got NoneType", folding(running_mean=None)),
    Bad("fold_batch_norm", "out_axis 4, -5 or 100 (weight 4-D)", ValueError,
        "out_axis must be an axis of weight, in [-4, 3] for its 4 dimensions, got {out_axis}",
        lambda out_axis: fold_call(out_axis=out_axis), tuple(grid(out_axis=[4, -5, 100]))),
    Bad("fold_batch_norm", "out_axis 0.0 (a float), '0' (a string), True (a bool) or None",
        TypeError, "out_axis must be an int, got {type}",
        lambda out_axis, type: fold_call(out_axis=out_axis),
        tuple(typed("out_axis", [0.0, "0", True, None]))),
    Bad("fold_batch_norm", "eps 0, negative or NaN", ValueError,
        "eps must be finite and > 0, got {eps}",
        lambda eps: fold_call(eps=eps), tuple(grid(eps=[0.0, -1e-5, math.nan]))),
    Bad("BatchNorm2d(3, track_running_stats=False)", "fold_into (no running statistics)",
        ValueError, "BatchNorm2d.fold_into: the layer has no running statistics to fold",
        fold_into(lambda: np.ones((C, 2, 3, 3), F32), track_running_stats=False)),
    Bad("BatchNorm2d(3)", "fold_into a weight of 4 output channels", ValueError,
        "BatchNorm2d.fold_into: weight must have the layer's 3 channels on out_axis 0, got "
        "shape (4, 2, 3, 3)", fold_into(lambda: np.ones((4, 2, 3, 3), F32))),
    Bad("BatchNorm2d(3)", "fold_into a 1-D weight", ValueError,
        "BatchNorm2d.fold_into: weight must have 2 or more dimensions",
        fold_into(lambda: np.ones(C, F32))),
    Bad("BatchNorm2d(3)", "fold_into out_axis 2 (weight 2-D)", ValueError,
        "BatchNorm2d.fold_into: out_axis must be an axis of weight, in [-2, 1] for its 2 "
        "dimensions, got 2", fold_into(lambda: np.ones((C, 4), F32), out_axis=2)),
    Bad("BatchNorm2d(3)", "fold_into a weight int64", TypeError,
        "BatchNorm2d.fold_into: weight must have dtype float32, float64, float16 or bfloat16, got int64",
        fold_into(lambda: np.ones((C, 4), np.int64))),

    # -- adapters: cs231n
    Bad("cs231n.batchnorm_forward", "x 3-D", ValueError,
        "batchnorm_forward: x must be 2-D (N, D), got shape (4, 3, 5)",
        cs("batchnorm_forward", x=lambda x: np.ones((4, 3, 5)))),
    Bad("cs231n.spatial_batchnorm_forward", "x 2-D", ValueError,
        "spatial_batchnorm_forward: x must be 4-D (N, C, H, W), got shape (4, 3)",
        cs("spatial_batchnorm_forward", x=lambda x: x[:, :, 0, 0].copy())),
    Bad("cs231n.batchnorm_forward", "x of objects", TypeError,
        "x must hold real numbers, got dtype object",
        cs("batchnorm_forward", x=lambda x: x.astype(object))),
    Bad("cs231n.batchnorm_forward", "gamma with 4 features", ValueError,
        "gamma must have shape (3,), got (4,)", cs("batchnorm_forward", gamma=lambda: np.ones(4))),
    Bad("cs231n.spatial_batchnorm_forward", "beta complex", TypeError,
        "beta must hold real numbers, got dtype complex128",
        cs("spatial_batchnorm_forward", beta=lambda: np.zeros(3, complex))),
    Bad("cs231n.batchnorm_forward", "bn_param without 'mode'", ValueError,
        "bn_param['mode'] must be 'train' or 'test', got None (no 'mode' key)",
        cs("batchnorm_forward", mode=None)),
    Bad("cs231n.batchnorm_forward", "bn_param['momentum'] 1.5", ValueError,
        "bn_param['momentum'] must be in [0, 1], got 1.5", cs("batchnorm_forward", momentum=1.5)),
    Bad("cs231n.batchnorm_forward", "bn_param['eps'] negative", ValueError,
        "bn_param['eps'] must be finite and > 0, got -1", cs("batchnorm_forward", eps=-1)),
    Bad("cs231n.batchnorm_forward", "bn_param['momentum'] the string '0.9'", TypeError,
        "bn_param['momentum'] must be a real number, got str",
        cs("batchnorm_forward", momentum="0.9")),
    Bad("cs231n.batchnorm_forward", "bn_param['running_var'] with 4 features", ValueError,
        "bn_param['running_var'] must have shape (3,), got (4,)",
        cs("batchnorm_forward", running_var=lambda: np.ones(4))),
    Bad("cs231n.batchnorm_forward", "training on one sample", ValueError,
        "Expected more than 1 value per channel when training, got input size (1, 3)",
        cs("batchnorm_forward", x=lambda x: x[:1].copy())),
    Bad("cs231n.batchnorm_backward", "dout transposed", ValueError,
        "batchnorm_backward: dout must have the shape of x (4, 3), got (3, 4)",
        cs_backward("batchnorm_backward", dout=lambda x: np.ones(x.T.shape))),
    Bad("cs231n.spatial_batchnorm_backward", "cache a tuple, not the forward's", TypeError,
        "spatial_batchnorm_backward: cache must be the cache returned by the fastbn forward",
        cs_backward("spatial_batchnorm_backward", cache=lambda c: (c.x, c.gamma))),

    # -- adapters: deepnet
    Bad("deepnet.Batchnorm((3, 2, 2))", "X without 12 values per sample", ValueError,
        "Batchnorm: X must have shape (N, 3, 2, 2) or hold 12 values per sample, "
        "got shape (4, 3, 2, 3)",
        dn(lambda bn, X: bn.forward(np.ones((4, 3, 2, 3))))),
    Bad("deepnet.Batchnorm((3, 2, 2))", "X int64", TypeError,
        "Batchnorm: X must have dtype float32 or float64, got int64",
        dn(lambda bn, X: bn.forward(X.astype(np.int64)))),
    Bad("deepnet.Batchnorm((3, 2, 2))", "X a list", TypeError,
        "Batchnorm: X must be a numpy.ndarray, got list",
        dn(lambda bn, X: bn.forward(X.tolist()))),
    Bad("deepnet.Batchnorm((3, 2, 2))", "backward before forward", RuntimeError,
        "Batchnorm.backward called before forward", dn(lambda bn, X: bn.backward(X))),
    Bad("deepnet.Batchnorm((3, 2, 2))", "backward dout of another shape", ValueError,
        "Batchnorm.backward: dout must have the shape of X (4, 3, 2, 2), got (4, 12)",
        dn(lambda bn, X: bn.backward(np.ones((4, 12))), trained=True)),
    Bad("deepnet.Batchnorm", "X_dim with a 0", ValueError,
        "Batchnorm: X_dim entries must be >= 1, got (3, 0)",
        construct(deepnet.Batchnorm, X_dim=(3, 0))),
    Bad("deepnet.Batchnorm", "X_dim a float, 3.0", TypeError,
        "Batchnorm: X_dim must be a tuple of ints such as (C, H, W), got float 3.0",
        construct(deepnet.Batchnorm, X_dim=3.0)),
    Bad("deepnet.Batchnorm", "eps NaN", ValueError,
        "Batchnorm: eps must be finite and > 0, got nan",
        construct(deepnet.Batchnorm, X_dim=(3,), eps=float("nan"))),
    Bad("deepnet.Batchnorm((3, 2, 2))", "backward dout complex", TypeError,
        "Batchnorm.backward: dout",
        dn(lambda bn, X: bn.backward(np.ones(X.shape, complex)), trained=True),),
]


# ------------------------------------------------------------ the snapshot ----

def _freeze(obj, where, out, seen):
    """Append (where, object, its state) for obj and everything reachable from it
    through dicts, lists, tuples and the attributes of fastbn's own objects."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        out.append((where, obj, (obj.dtype, obj.shape, obj.flags.writeable, obj.tobytes())))
    elif isinstance(obj, dict):
        out.append((where, obj, {k: id(v) for k, v in obj.items()}))
        for k, v in obj.items():
            _freeze(v, f"{where}[{k!r}]", out, seen)
    elif isinstance(obj, (list, tuple)):
        out.append((where, obj, [id(v) for v in obj]))
        for i, v in enumerate(obj):
            _freeze(v, f"{where}[{i}]", out, seen)
    elif type(obj).__module__.startswith("fastbn") and not isinstance(obj, types.ModuleType):
        names = list(getattr(obj, "__dict__", {}))
        names += [n for cls in type(obj).__mro__ for n in getattr(cls, "__slots__", ())]
        attrs = {n: getattr(obj, n) for n in names if hasattr(obj, n)}
        out.append((where, obj, {n: id(v) for n, v in attrs.items()}))
        for n, v in attrs.items():
            _freeze(v, f"{where}.{n}", out, seen)


def freeze(objects):
    """The state of every array, dict, list and fastbn object reachable from ``objects``."""
    out, seen = [], set()
    for name, obj in objects.items():
        _freeze(obj, name, out, seen)
    return out


def assert_thawed_equal(frozen):
    """Everything :func:`freeze` recorded is as it was."""
    for where, obj, state in frozen:
        if freeze({where: obj})[0][2] != state:
            raise AssertionError(f"{where} was modified by the failed call")


# ------------------------------------------------------------------- tests ----

def _slug(text, length):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:length].strip("-")


def _words(text, length):
    """The slug of text's first words, up to about ``length`` characters."""
    words = _slug(text, 200).split("-")
    return "-".join(w for i, w in enumerate(words) if len("-".join(words[:i + 1])) <= length)


def _value_id(value):
    if isinstance(value, tuple):
        return "x".join(map(str, value)) or "0d"
    if isinstance(value, np.generic):
        return f"{type(value).__name__}({value})"
    if isinstance(value, np.ndarray):
        return f"array{value.shape}"
    return str(value)


def _case_id(i, case, variant):
    if not variant:
        return f"{i + 1:03d}-{_slug(f'{case.api} {case.bad}', 60)}"
    return f"{i + 1:03d}-{_words(case.bad, 24)}-" + "-".join(map(_value_id, variant.values()))


CASES = [pytest.param(case, variant, id=_case_id(i, case, variant),
                      marks=[pytest.mark.xfail(strict=True, reason=f"known gap: {case.bug}"),
                             pytest.mark.filterwarnings("ignore:Casting complex values")]
                      if case.bug else [])
         for i, case in enumerate(TABLE) for variant in case.variants]


def test_every_call_has_an_id_of_its_own():
    ids = [param.id for param in CASES]
    assert len(set(ids)) == len(ids) == sum(len(case.variants) for case in TABLE)


def test_the_table_is_large_and_covers_every_public_entry_point():
    assert len(TABLE) >= 30
    apis = {part.split("(")[0] for case in TABLE for part in case.api.split(", ")}
    for name in ("batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
                 "batch_norm_backward_from_output", "fold_batch_norm", "BatchNorm1d",
                 "BatchNorm2d", "cs231n.batchnorm_forward",
                 "cs231n.spatial_batchnorm_forward", "cs231n.batchnorm_backward",
                 "deepnet.Batchnorm"):
        assert name in apis, name


@pytest.mark.parametrize("case, variant", CASES)
def test_bad_call_raises_and_changes_nothing(case, variant):
    """The row's exception, a message that starts as the row says, nothing modified."""
    thunk, objects = case.make(**variant)
    frozen = freeze(objects)
    with pytest.raises(case.exc) as info:
        thunk()
    message, expected = str(info.value), case.expected(variant)
    assert message.startswith(expected), (
        f"message {message!r} does not start with {expected!r}")
    assert_thawed_equal(frozen)


def test_the_snapshot_sees_a_change():
    """Control: for every call, flipping one bit of any array the call was given, or
    rebinding an attribute of a layer, is seen by the check (so it can fail)."""
    arrays_checked = 0
    for case, variant in ((case, v) for case in TABLE for v in case.variants):
        try:
            thunk, objects = case.make(**variant)
        except pytest.skip.Exception:  # a row of an optional dtype (bfloat16) without it
            continue
        frozen = freeze(objects)
        assert_thawed_equal(frozen)
        for where, obj, _ in frozen:
            if (isinstance(obj, np.ndarray) and obj.size and obj.flags.writeable
                    and obj.dtype.kind in "biufc"):
                first = (0,) * obj.ndim
                saved = obj[first].copy()
                obj[first] = 0 if saved != 0 else 1     # NaN != 0 too
                with pytest.raises(AssertionError, match="was modified by the failed call"):
                    assert_thawed_equal(frozen)
                obj[first] = saved
                assert_thawed_equal(frozen)
                arrays_checked += 1
        bn = objects.get("layer")
        if isinstance(bn, BatchNorm2d):
            saved = bn.training
            bn.training = not saved
            with pytest.raises(AssertionError, match="layer was modified"):
                assert_thawed_equal(frozen)
            bn.training = saved
    assert arrays_checked > 3 * len(CASES)


@pytest.mark.parametrize("func", ENTRY_POINTS)
def test_valid_arguments_are_accepted(func):
    """The starting point of the functional rows is a valid call: it computes
    what the oracle computes with the same arguments, into ``out``, and
    updates the running statistics and the count as the oracle does."""
    args = valid_args(func)
    oracle_args = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in args.items()}
    got = call(func, args)
    want = call(func, oracle_args, impl=REFERENCE)
    got, want = (r if isinstance(r, tuple) else (r,) for r in (got, want))
    assert got[0] is args["out"]
    assert len(got) == len(want)
    for ours, theirs in zip(got, want):
        assert_close(ours, theirs, np.float32, rtol=1e-4)
    for name in ("running_mean", "running_var"):
        if name in args:
            assert_close(args[name], oracle_args[name], rtol=1e-5)
    if func == "forward":
        assert int(args["num_batches_tracked"]) == int(oracle_args["num_batches_tracked"]) == 1


# ------------------------------------------------- num_threads far too big ----

THREAD_COUNT_SCRIPT = """
import os
import numpy as np
import fastbn
print(len(os.listdir("/proc/self/task")))          # before: Python and NumPy's BLAS threads
x = np.zeros((64, 1, 2**20), np.float32)           # 2**26 values
rm, rv = np.zeros(1, np.float32), np.ones(1, np.float32)
fastbn.batch_norm_inference(x, None, None, rm, rv, num_threads=10**6, out=x)
assert (x == 0).all()
print(len(os.listdir("/proc/self/task")))          # OpenMP keeps its pool after the call
"""


@pytest.mark.skipif(not fastbn._openmp.openmp_enabled(),
                    reason="a serial build (FASTBN_OPENMP=0) starts no threads")
@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_huge_num_threads_does_not_start_hundreds_of_threads():
    """num_threads=10**6 is accepted (it is a cap) but must not start hundreds of
    threads: at most four per core. Run in a child process (the pool stays)."""
    done = subprocess.run([sys.executable, "-c", THREAD_COUNT_SCRIPT], capture_output=True,
                          **same_fastbn(),
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after = (int(n) for n in done.stdout.split()[-2:])
    assert after - before + 1 <= 4 * (os.cpu_count() or 1), f"{after - before} threads started"


# --------------------------------------------------------------------- docs ----

def markdown():
    """docs/hostile_inputs.md, generated from :data:`TABLE`."""
    lines = [
        "# Hostile inputs",
        "",
        "Generated from the table in `tests/test_hostile.py` "
        "(`python tests/test_hostile.py > docs/hostile_inputs.md`); "
        "`tests/test_hostile.py` checks that this file is up to date.",
        "",
        "Every row is one bad call, or a family of bad calls that break one rule the same "
        "way (one call per value or argument the row lists, in each function it names), "
        f"{len(TABLE)} rows and {len(CASES)} calls in all, made by the test suite on "
        "otherwise valid arguments (x is (4, 3, 5, 2) float32 unless the row says otherwise; "
        "the function rows pass every argument, `out=` included; the rows of "
        "`batch_norm_backward_from_output` pass y, the output of a forward with "
        "`activation='leaky_relu'` and `negative_slope=0.1`, and those of the fused "
        "`batch_norm_backward` pass `activation='leaky_relu'`; the `fold_batch_norm` rows "
        "start from a (3, 2, 3, 3) float32 weight with out_axis 0). Each call raises the "
        "exception shown, with a message that starts with the text shown (in a family, "
        "`<name>`, `<dtype>`, `<shape>` and the like stand for that call's argument, dtype, "
        "shape or value), and afterwards every array it was given "
        "(running statistics, `num_batches_tracked`, `out`, a layer's arrays, "
        "`bn_param`) holds the same bytes as before.",
        "",
        "Rows marked **known gap** do not behave so yet: the column says what happens "
        "instead; their tests are strict xfails until the gap is fixed.",
        "",
        "| # | called | bad input | raises | message starts with |",
        "| ---: | --- | --- | --- | --- |",
    ]
    for i, case in enumerate(TABLE):
        raises = case.exc.__name__
        if case.bug:
            raises = f"**known gap**: {case.bug}; should raise {raises}"
        message = case.message.replace("|", "\\|")
        if case.variants != ({},):
            message = re.sub(r"\{(\w+)\}", r"<\1>", message)
        lines.append(f"| {i + 1} | `{case.api}` | {case.bad} | {raises} | `{message}` |")
    lines.append("")
    return "\n".join(lines)


def test_docs_table_is_up_to_date():
    if not DOCS.exists():
        pytest.skip(f"{DOCS} is not here (a copy of tests/ without the repository)")
    assert DOCS.read_text() == markdown(), (
        "docs/hostile_inputs.md is out of date: "
        "python tests/test_hostile.py > docs/hostile_inputs.md")


if __name__ == "__main__":
    sys.stdout.write(markdown())
