"""The other CPU BatchNorms a user might pick, side by side with fastbn on the same inputs.

- oneDNN: PyTorch's ``mkldnn`` tensors (``Tensor.to_mkldnn``), so that
  ``aten.native_batch_norm`` and its backward run oneDNN's kernels on
  oneDNN's own memory layout (converted before timing). oneDNN's training
  kernels take 4-D float32 only (the rows of other ranks or float64 show
  "—"); inference takes 4-D and 5-D.
- ONNX Runtime: a one-node ``BatchNormalization`` model (opset 15,
  inference; NCHW and its relatives only: the channels-last rows show "—"),
  run by an ``InferenceSession`` with ``intra_op_num_threads`` set to the
  row's thread count.
- JAX/Flax: ``flax.linen.BatchNorm`` under ``jax.jit``: the training
  forward (batch statistics, running statistics updated), inference, and
  the training backward as ``jax.vjp`` of the forward (dx). XLA's CPU
  thread pool is fixed when jax is imported, to every core: JAX runs the
  rows at all cores only.

Each is skipped when its package is not installed
(``pip install onnx onnxruntime jax flax``). The inputs are those of
:class:`cases.Workload`, converted once before timing; every call returns
its result in the implementation's own type (``cases.as_array`` turns it
into NumPy for the check against the oracle, outside the timing).
"""

from __future__ import annotations

import os

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - the benchmarks run with PyTorch
    torch = None
try:
    import onnx
    import onnx.helper
    import onnxruntime
except ImportError:
    onnxruntime = None
try:
    import jax
    import jax.numpy as jnp
    from flax import linen
except ImportError:
    jax = None
else:
    jax.config.update("jax_enable_x64", True)  # float64 rows in float64

EPS = 1e-5
MOMENTUM = 0.1


def available():
    """The peers whose packages are installed, as (name, label)."""
    found = []
    if torch is not None and torch.backends.mkldnn.is_available():
        found.append(("onednn", "oneDNN"))
    if onnxruntime is not None:
        found.append(("onnxruntime", "ONNX Runtime"))
    if jax is not None:
        found.append(("jax", "JAX/Flax"))
    return found


def make_call(name, op, w, num_threads):
    """``call(i)`` of peer ``name`` on copy i of workload w, or None where the
    peer lacks the case (then its cell shows "—")."""
    return {"onednn": _onednn, "onnxruntime": _onnxruntime, "jax": _jax}[name](
        op, w, num_threads)


def as_numpy(result, shape):
    """A peer's result as an ndarray in the layout of x."""
    if torch is not None and isinstance(result, torch.Tensor):
        if result.is_mkldnn:
            result = result.to_dense()
        if shape.channels_last:
            result = result.permute(0, 2, 3, 1)
        # bfloat16 has no NumPy dtype in torch: widened (exactly) for the comparison
        return (result.float() if result.dtype == torch.bfloat16 else result).numpy()
    if isinstance(result, list):  # ONNX Runtime
        result = result[0]
    return np.asarray(result)


# ------------------------------------------------------------- oneDNN ----

def _onednn(op, w, num_threads):
    training = op in ("forward", "backward")
    if w.dtype != np.float32 or op not in ("forward", "inference", "backward"):
        return None
    if len(w.shape.dims) != 4 and (training or len(w.shape.dims) != 5):
        return None
    x, dy = w.torch_inputs()
    x = [t.to_mkldnn() for t in x]
    weight, bias = torch.from_numpy(w.gamma), torch.from_numpy(w.beta)
    rm, rv = torch.from_numpy(w.running_mean.copy()), torch.from_numpy(w.running_var.copy())
    aten = torch.ops.aten
    if op == "forward":
        return lambda i: aten.native_batch_norm(x[i], weight, bias, rm, rv, True, MOMENTUM,
                                                EPS)[0]
    if op == "inference":
        return lambda i: aten.native_batch_norm(x[i], weight, bias, rm, rv, False, MOMENTUM,
                                                EPS)[0]
    dy = [t.to_mkldnn() for t in dy]
    _, save_mean, save_invstd = aten.native_batch_norm(x[0], weight, bias, None, None, True,
                                                       MOMENTUM, EPS)
    return lambda i: aten.native_batch_norm_backward(dy[i], x[i], weight, rm, rv, save_mean,
                                                     save_invstd, True, EPS,
                                                     [True, True, True])[0]


# ------------------------------------------------------- ONNX Runtime ----

def _onnxruntime(op, w, num_threads):
    if op != "inference" or w.shape.channels_last:
        return None
    elem = onnx.TensorProto.FLOAT if w.dtype == np.float32 else onnx.TensorProto.DOUBLE
    c = w.shape.num_features
    inits = [onnx.helper.make_tensor(name, elem, (c,), values.tolist())
             for name, values in (("scale", w.gamma), ("B", w.beta),
                                  ("mean", w.running_mean), ("var", w.running_var))]
    node = onnx.helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"],
                                 epsilon=EPS)
    graph = onnx.helper.make_graph(
        [node], "bn", [onnx.helper.make_tensor_value_info("X", elem, list(w.shape.dims))],
        [onnx.helper.make_tensor_value_info("Y", elem, list(w.shape.dims))], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    x = w.x
    return lambda i: session.run(None, {"X": x[i]})


# ----------------------------------------------------------- JAX/Flax ----

def _jax(op, w, num_threads):
    if num_threads != os.cpu_count() or op not in ("forward", "inference", "backward"):
        return None
    axis = -1 if w.shape.channels_last else 1
    layer = linen.BatchNorm(axis=axis, momentum=1.0 - MOMENTUM, epsilon=EPS,
                            dtype=w.dtype, param_dtype=w.dtype)
    params = {"params": {"scale": jnp.asarray(w.gamma), "bias": jnp.asarray(w.beta)},
              "batch_stats": {"mean": jnp.asarray(w.running_mean),
                              "var": jnp.asarray(w.running_var)}}
    x = [jax.device_put(a) for a in w.x]

    if op == "inference":
        run = jax.jit(lambda v, p: layer.apply(p, v, use_running_average=True))
        return lambda i: run(x[i], params).block_until_ready()

    def train(v, p):
        return layer.apply(p, v, use_running_average=False, mutable=["batch_stats"])

    if op == "forward":
        run = jax.jit(train)
        return lambda i: jax.block_until_ready(run(x[i], params))[0]
    dy = [jax.device_put(a) for a in w.dy]

    def dx_of(v, g, p):
        _, pullback = jax.vjp(lambda u: train(u, p)[0], v)
        return pullback(g)[0]

    run = jax.jit(dx_of)
    return lambda i: run(x[i], dy[i], params).block_until_ready()
