"""What is timed: the shapes, the input data, and one call per implementation.

A :class:`Workload` holds the inputs of one shape and dtype. When x is large
enough to matter for bandwidth it keeps several identical copies of x, dy and
the ``out=`` buffers, and the timed loop rotates through them so that the
data one call touches was last touched a whole working set earlier, a working
set at least twice the last-level cache: every call starts from main memory
("cold"). The tiny latency shapes are instead timed "hot", as when the layer
before has just written them.

:func:`make_call` returns, for one implementation, operation and workload, a
function ``call(i)`` that runs the operation on copy ``i`` and returns its
main result (y or dx) without converting it.

Two backward rows compare fastbn's one-pass variants with what a caller
would otherwise run (issue 11):

- ``backward_relu``: the backward of ``relu(batch_norm(x))`` by
  ``batch_norm_backward(..., beta=, activation="relu")``, which recomputes
  the pre-activation z from x; PyTorch has no fused kernel and runs what
  autograd runs, ``threshold_backward(dy, y, 0)`` and then
  ``native_batch_norm_backward``.
- ``from_output``: ``batch_norm_backward_from_output`` (no activation),
  which reads the forward's output y in place of x; PyTorch has no
  from-output kernel, so its column is the standard backward from x: the
  row is from-output against the standard backward.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import numpy as np
import threadpoolctl

import fastbn
import numpy_formula
import peers
from fastbn import reference

try:
    import torch
except ImportError:  # the suite runs without PyTorch, minus its column
    torch = None
try:
    import ml_dtypes
except ImportError:  # the suite runs without it, minus the bfloat16 rows
    ml_dtypes = None

EPS = 1e-5
MOMENTUM = 0.1
OPERATIONS = ("forward", "inference", "backward", "frozen", "frozen_dx", "backward_relu",
              "from_output", "renorm_forward", "renorm_backward", "ghost_forward",
              "ghost_backward")
OPERATION_TITLES = {"forward": "Training forward", "inference": "Inference",
                    "backward": "Backward",
                    "frozen": "Frozen backward (eval mode: dx, dgamma, dbeta)",
                    "frozen_dx": "Frozen backward, dx only (gamma and beta frozen too)",
                    "backward_relu": "Backward, fused ReLU (PyTorch: threshold_backward + "
                                     "backward)",
                    "from_output": "Backward from the output y, no activation (PyTorch: "
                                   "from x)",
                    "renorm_forward": "Batch Renormalization, training forward (PyTorch: none)",
                    "renorm_backward": "Batch Renormalization, backward (PyTorch: none)",
                    "ghost_forward": "Ghost Batch Normalization, virtual batches of N/8, "
                                     "training forward (PyTorch: none)",
                    "ghost_backward": "Ghost Batch Normalization, virtual batches of N/8, "
                                      "backward (PyTorch: none)"}
# The variants (fastbn.variants) and the plain operation each is judged
# against, with the largest time ratio the issue allows (fastbn to fastbn).
VARIANT_OF = {"renorm_forward": ("forward", 1.1), "renorm_backward": ("backward", 1.1),
              "ghost_forward": ("forward", 1.2), "ghost_backward": ("backward", 1.2)}
GHOST_GROUPS = 8
# Minimal traffic of one call, in multiples of x.nbytes: forward and
# inference read x and write y; the backward reads x and dy and writes dx;
# the frozen backward without parameter gradients reads dy and writes dx;
# the backward from the output reads y in place of x.
TRAFFIC_FACTOR = {"forward": 2, "inference": 2, "backward": 3, "frozen": 3, "frozen_dx": 2,
                  "backward_relu": 3, "from_output": 3, "renorm_forward": 2,
                  "renorm_backward": 3, "ghost_forward": 2, "ghost_backward": 3}
# Operations timed on float32 shapes only (not on the float64 subset), to
# keep the full run's length: the two backward variants of issue 11 and the
# BatchNorm variants of issue 22.
FLOAT32_ONLY = frozenset({"backward_relu", "from_output"}) | frozenset(VARIANT_OF)

# Inputs smaller than this are timed hot (they fit in the per-core cache).
COLD_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class Shape:
    dims: tuple
    channels_last: bool = False

    @property
    def channel_axis(self):
        return -1 if self.channels_last else 1

    @property
    def num_features(self):
        return self.dims[self.channel_axis]

    @property
    def label(self):
        return f"({', '.join(map(str, self.dims))})" + (" NHWC" if self.channels_last else "")


SHAPES = (
    Shape((64, 64, 56, 56)),
    Shape((32, 256, 14, 14)),
    Shape((128, 32, 32, 32)),
    Shape((32, 2048, 7, 7)),
    Shape((8, 16, 8, 8)),
    Shape((4096, 1024)),
    Shape((256, 4096)),
    Shape((65536, 64)),
    Shape((64, 128)),
    Shape((64, 56, 56, 64), channels_last=True),
    Shape((16, 3, 224, 224)),
    Shape((1, 64, 256, 256)),
)
# float64 on a subset: one planar, one columnar, channels last, both tiny.
FLOAT64_SHAPES = (
    Shape((32, 256, 14, 14)),
    Shape((4096, 1024)),
    Shape((64, 56, 56, 64), channels_last=True),
    Shape((8, 16, 8, 8)),
    Shape((64, 128)),
)
# float16 and bfloat16 (issue 19: 16-bit data, float32 parameters) on the large
# shapes of each family and one tiny one.
HALF_SHAPES = (
    Shape((64, 64, 56, 56)),
    Shape((32, 256, 14, 14)),
    Shape((4096, 1024)),
    Shape((64, 56, 56, 64), channels_last=True),
    Shape((8, 16, 8, 8)),
)
QUICK_SHAPES = (Shape((32, 256, 14, 14)), Shape((4096, 1024)), Shape((8, 16, 8, 8)),
                Shape((64, 128)))
QUICK_FLOAT64_SHAPES = (Shape((64, 128)),)
QUICK_HALF_SHAPES = (Shape((4096, 1024)),)
#: the 16-bit dtypes timed (bfloat16 where ml_dtypes is installed)
HALF_DTYPES = (np.dtype(np.float16),) + ((np.dtype(ml_dtypes.bfloat16),) if ml_dtypes else ())
TINY_SHAPES = (Shape((8, 16, 8, 8)), Shape((64, 128)))


def operations(dtype):
    """The operations timed on workloads of ``dtype``, in table order."""
    return tuple(op for op in OPERATIONS
                 if np.dtype(dtype) == np.float32 or op not in FLOAT32_ONLY)


def suite(quick, dtypes=None, half_shapes=False):
    """The (shape, dtype) pairs to run, float32 first, then float64 and the
    16-bit dtypes; only those named in ``dtypes`` (names) when given; every
    dtype on the 16-bit shapes with ``half_shapes`` (16-bit against 32-bit)."""
    f32, f64, f16 = ((QUICK_SHAPES, QUICK_FLOAT64_SHAPES, QUICK_HALF_SHAPES) if quick
                     else (SHAPES, FLOAT64_SHAPES, HALF_SHAPES))
    if half_shapes:
        f32 = f64 = f16
    pairs = ([(s, np.dtype(np.float32)) for s in f32]
             + [(s, np.dtype(np.float64)) for s in f64]
             + [(s, d) for s in f16 for d in HALF_DTYPES])
    return [(s, d) for s, d in pairs if dtypes is None or d.name in dtypes]


def parameter_dtype(dtype):
    """float64 for float64 data, float32 for the others (fastbn's and PyTorch's rule)."""
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


@contextlib.contextmanager
def thread_limit(num_threads):
    """Every thread pool in the process (OpenMP, BLAS, PyTorch) at ``num_threads``."""
    with threadpoolctl.threadpool_limits(limits=num_threads):
        previous = torch.get_num_threads() if torch is not None else None
        if torch is not None:
            torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(previous)


# ------------------------------------------------------- implementations ----

@dataclass(frozen=True)
class Implementation:
    name: str
    label: str
    warmup_calls: int = 2
    max_reps: int = 20_000


FASTBN_OUT = Implementation("fastbn_out", "fastbn (out=)")
FASTBN = Implementation("fastbn", "fastbn")
TORCH = Implementation("torch", "PyTorch")
# The oracle is slow on big shapes: one warm-up call, at most 9 repetitions.
REFERENCE = Implementation("reference", "reference", warmup_calls=1, max_reps=9)
# The formula in float32 as a NumPy net writes it (forward and backward only;
# the training-step scenario's third column).
NUMPY = Implementation("numpy", "NumPy formula")


PEERS = [Implementation(name, label) for name, label in peers.available()]


def implementations():
    """Implementations in timing order: the reference first (it is the oracle)."""
    return [REFERENCE] + ([TORCH] if torch is not None else []) + PEERS + [FASTBN, FASTBN_OUT]


def log(message):
    """Progress on stderr (stdout is for the results)."""
    print(message, file=sys.stderr, flush=True)


def nbytes(shape, dtype=np.float32):
    """Bytes of an array of ``shape`` and ``dtype``."""
    return math.prod(shape.dims) * np.dtype(dtype).itemsize


def float32_workloads(shapes, flush_bytes, scenario):
    """The float32 :class:`Workload` of each shape in turn, released after use."""
    for shape in shapes:
        w = Workload(shape, np.float32, flush_bytes)
        log(f"{scenario}: {w.label}")
        yield w
        w.release()


def fastbn_and_torch():
    """fastbn (``out=``) and, where installed, PyTorch: the scenarios' implementations."""
    return [FASTBN_OUT] + ([TORCH] if torch is not None else [])


# ------------------------------------------------------------ workload ----

class Workload:
    """Inputs of one (shape, dtype), in ``copies`` identical rotating copies.

    ``copies`` is chosen so that the bytes one forward sweep over all copies
    touches (x read + y written) reach ``flush_bytes``; 1 for inputs below
    :data:`COLD_MIN_BYTES`. Every buffer is written once here, so no timed
    call pays for first-touch page faults of its inputs or ``out=`` buffers.
    The forward's output :attr:`y`, which two backward rows read, is made on
    first use, before any timing.
    """

    def __init__(self, shape, dtype, flush_bytes, seed=0):
        rng = np.random.default_rng(seed)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        c = shape.num_features
        p = parameter_dtype(self.dtype)
        x0 = rng.standard_normal(shape.dims, dtype=p).astype(self.dtype)
        dy0 = rng.standard_normal(shape.dims, dtype=p).astype(self.dtype)
        self.nbytes = x0.nbytes
        self.cold = self.nbytes >= COLD_MIN_BYTES
        self.copies = max(1, math.ceil(flush_bytes / (2 * self.nbytes))) if self.cold else 1
        self.x = [x0] + [x0.copy() for _ in range(self.copies - 1)]
        self.dy = [dy0] + [dy0.copy() for _ in range(self.copies - 1)]
        self.out = [np.full_like(x0, 0.0) for _ in range(self.copies)]
        self.gamma = rng.uniform(0.5, 1.5, c).astype(p)
        self.beta = rng.standard_normal(c).astype(p)
        self.running_mean = (0.1 * rng.standard_normal(c)).astype(p)
        self.running_var = rng.uniform(0.5, 2.0, c).astype(p)
        self.running_invstd = (1.0 / np.sqrt(self.running_var.astype(np.float64) + EPS)
                               ).astype(p)
        _, self.mean, self.invstd = fastbn.batch_norm_forward(
            x0, self.gamma, self.beta, eps=EPS, channel_axis=shape.channel_axis)
        self._y = None
        self._torch = {}

    @property
    def label(self):
        return f"{self.shape.label} {self.dtype.name}"

    @property
    def pool_bytes(self):
        return 3 * self.copies * self.nbytes

    @property
    def y(self):
        """Copies of the training forward's output without activation, z.

        Computed in float64 from copy 0 of x with the batch statistics
        ``mean`` and ``invstd`` as the fused backward recomputes z,
        ``(x - mean) * (gamma * invstd) + beta``, and rounded to the dtype:
        rounding keeps the sign, so ``y > 0`` is the very mask that
        ``activation="relu"`` applies (a forward's own float32 output may
        differ in sign where z is within its round-off of 0, and one such
        value would set dx apart from the oracle's).
        """
        if self._y is None:
            z = pre_activation(self.x[0], self.gamma, self.beta, self.mean, self.invstd,
                               self.shape.channel_axis)
            y0 = z.astype(self.dtype)
            self._y = [y0] + [y0.copy() for _ in range(self.copies - 1)]
        return self._y

    def torch_inputs(self, *names):
        """The copies of the arrays ``names`` (default x and dy) as torch
        tensors sharing the NumPy memory.

        Channels-last arrays become NCHW-shaped tensors in the channels_last
        memory format (``permute(0, 3, 1, 2)`` of the NHWC array).
        """
        def view(a):
            if a.dtype.kind == "V":  # ml_dtypes' bfloat16: the same bits as torch's
                t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(a)
            return t.permute(0, 3, 1, 2) if self.shape.channels_last else t

        names = names or ("x", "dy")
        for name in names:
            if name not in self._torch:
                self._torch[name] = [view(a) for a in getattr(self, name)]
        return tuple(self._torch[name] for name in names)

    def release(self):
        self.x = self.dy = self.out = self._y = self._torch = None


def pre_activation(x, gamma, beta, mean, invstd, channel_axis):
    """z = (x - mean) * (gamma * invstd) + beta in float64, per channel, in
    the order of the fused backward's recomputation (so the same signs)."""
    shape = [1] * x.ndim
    shape[channel_axis] = -1

    def per_channel(v):
        return np.asarray(v, dtype=np.float64).reshape(shape)

    scale = per_channel(gamma) * per_channel(invstd)
    return (x.astype(np.float64) - per_channel(mean)) * scale + per_channel(beta)


def as_array(result, shape):
    """A result of any implementation as an ndarray in the layout of x."""
    if not isinstance(result, np.ndarray):
        return peers.as_numpy(result, shape)
    if torch is not None and isinstance(result, torch.Tensor):
        if shape.channels_last:
            result = result.permute(0, 2, 3, 1)
        return result.numpy()
    return result


# --------------------------------------------------------------- calls ----

def make_call(impl, op, w, num_threads):
    """``call(i)``: one ``op`` by ``impl`` on copy ``i`` of workload ``w`` (None:
    a peer that lacks the case).

    Forward calls update running statistics (each implementation has its
    own), as a training step does. The backward takes the mean and invstd of
    a forward on the same x (PyTorch: its own saved statistics).
    """
    if op in VARIANT_OF:  # fastbn's and the oracle's only
        return _variant_call(impl, op, w, num_threads)
    if impl.name == "torch":
        return _torch_call(op, w)
    if impl in PEERS:  # None where the peer lacks the case (16-bit data: all of them here)
        return None if w.dtype.itemsize == 2 else peers.make_call(impl.name, op, w, num_threads)
    module = {"reference": reference, "numpy": numpy_formula}.get(impl.name, fastbn)
    out = w.out if impl.name == "fastbn_out" else [None] * w.copies
    kw = {"channel_axis": w.shape.channel_axis, "num_threads": num_threads}
    g, b, x, dy = w.gamma, w.beta, w.x, w.dy
    if op == "forward":
        rm, rv = w.running_mean.copy(), w.running_var.copy()
        return lambda i: module.batch_norm_forward(
            x[i], g, b, eps=EPS, running_mean=rm, running_var=rv, momentum=MOMENTUM,
            out=out[i], **kw)[0]
    if op == "inference":
        rm, rv = w.running_mean, w.running_var
        return lambda i: module.batch_norm_inference(x[i], g, b, rm, rv, eps=EPS,
                                                     out=out[i], **kw)
    if op == "backward":
        mean, invstd = w.mean, w.invstd
        return lambda i: module.batch_norm_backward(dy[i], x[i], g, mean, invstd,
                                                    out=out[i], **kw)[0]
    if op in ("frozen", "frozen_dx"):
        mean, invstd = w.running_mean, w.running_invstd
        grads = op == "frozen"
        return lambda i: module.batch_norm_backward(dy[i], x[i], g, mean, invstd, training=False,
                                                    param_grads=grads, out=out[i], **kw)[0]
    if op == "backward_relu":
        mean, invstd = w.mean, w.invstd
        return lambda i: module.batch_norm_backward(dy[i], x[i], g, mean, invstd, beta=b,
                                                    activation="relu", out=out[i], **kw)[0]
    if op == "from_output":
        y, invstd = w.y, w.invstd
        return lambda i: module.batch_norm_backward_from_output(dy[i], y[i], g, b, invstd,
                                                                out=out[i], **kw)[0]
    raise ValueError(f"unknown operation {op!r}")


def _variant_call(impl, op, w, num_threads):
    """A BatchNorm variant's call (fastbn.variants), by fastbn or the oracle;
    None for the others, and for ghost BN when N is not a multiple of
    GHOST_GROUPS. The backward takes the statistics of fastbn's forward."""
    if impl.name not in ("fastbn", "fastbn_out", "reference"):
        return None
    module = reference if impl.name == "reference" else fastbn
    out = w.out if impl.name == "fastbn_out" else [None] * w.copies
    kw = {"channel_axis": w.shape.channel_axis, "num_threads": num_threads}
    g, b, x, dy = w.gamma, w.beta, w.x, w.dy
    rm, rv = w.running_mean.copy(), w.running_var.copy()
    n = w.shape.dims[0]
    if op.startswith("ghost"):
        if n % GHOST_GROUPS:
            return None
        v = n // GHOST_GROUPS
        if op == "ghost_forward":
            return lambda i: module.ghost_batch_norm_forward(
                x[i], g, b, v, eps=EPS, running_mean=rm, running_var=rv, momentum=MOMENTUM,
                out=out[i], **kw)[0]
        stats = fastbn.ghost_batch_norm_forward(x[0], g, b, v, **kw)[1:]
        return lambda i: module.ghost_batch_norm_backward(dy[i], x[i], g, *stats, out=out[i],
                                                          **kw)[0]
    if op == "renorm_forward":  # momentum 0: the running statistics are written but stay
        # as they are, so r and d (which read them) are the same after any number of calls
        return lambda i: module.batch_renorm_forward(x[i], g, b, rm, rv, eps=EPS,
                                                     momentum=0.0, out=out[i], **kw)[0]
    stats = fastbn.batch_renorm_forward(x[0], g, b, rm.copy(), rv.copy(), **kw)[1:]
    return lambda i: module.batch_renorm_backward(dy[i], x[i], g, *stats, out=out[i], **kw)[0]


def _torch_call(op, w):
    """PyTorch's CPU kernels, as BatchNorm2d calls them (thread count set by the caller)."""
    aten = torch.ops.aten
    x, dy = w.torch_inputs()
    weight, bias = torch.from_numpy(w.gamma), torch.from_numpy(w.beta)
    rm, rv = torch.from_numpy(w.running_mean.copy()), torch.from_numpy(w.running_var.copy())
    if op == "forward":
        return lambda i: aten.native_batch_norm(x[i], weight, bias, rm, rv, True,
                                                MOMENTUM, EPS)[0]
    if op == "inference":
        batch_norm = torch.nn.functional.batch_norm
        return lambda i: batch_norm(x[i], rm, rv, weight, bias, False, MOMENTUM, EPS)
    if op in ("backward", "backward_relu", "from_output"):
        _, save_mean, save_invstd = aten.native_batch_norm(x[0], weight, bias, None, None,
                                                           True, MOMENTUM, EPS)
        mask = [True, True, True]
        if op == "backward_relu":
            # What autograd runs for relu(batch_norm(x)): threshold_backward
            # against the saved relu output, then the backward. y is z before
            # the ReLU: relu(z) > 0 exactly where z > 0, at the same cost.
            (y,) = w.torch_inputs("y")
            return lambda i: aten.native_batch_norm_backward(
                aten.threshold_backward(dy[i], y[i], 0), x[i], weight, rm, rv, save_mean,
                save_invstd, True, EPS, mask)[0]
        # backward, and from_output (PyTorch has no from-output kernel): from x
        return lambda i: aten.native_batch_norm_backward(dy[i], x[i], weight, rm, rv,
                                                         save_mean, save_invstd, True, EPS,
                                                         mask)[0]
    if op in ("frozen", "frozen_dx"):  # eval mode: the running statistics are constants
        mask = [True, op == "frozen", op == "frozen"]
        return lambda i: aten.native_batch_norm_backward(dy[i], x[i], weight, rm, rv, None,
                                                         None, False, EPS, mask)[0]
    raise ValueError(f"unknown operation {op!r}")
