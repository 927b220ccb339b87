"""Train a small convolutional net in pure NumPy on scikit-learn's digits, with fastbn.

The net, on 8x8 grey images (NCHW, float32)::

    conv 3x3, pad 1 (1 -> 32 channels, no bias) -> BatchNorm2d -> ReLU -> max pool 2x2
    -> fully connected (32*4*4 -> 128, no bias) -> BatchNorm1d -> ReLU
    -> fully connected (128 -> 10) -> softmax cross-entropy

(no bias before a BatchNorm: its beta is the bias). The convolution is
im2col plus one matrix product; everything but Batch Normalization is plain
NumPy written here. The data are the 1,797 images of
``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download),
split 75/25 with a fixed seed.

Batch Normalization runs on :mod:`fastbn` (``--bn fastbn``, the default), on
the pure-NumPy oracle :mod:`fastbn.reference` (``--bn reference``), or on
both one after the other with the same seed (``--bn both``), which reports
the BN speedup and the whole run's (training and evaluation, data loading
excluded). The time spent inside the BatchNorm layers (forward in
training and eval mode, backward), and in the ReLU layers after them, is
measured around their calls. ``--fused`` trains twice with the same seed, with the ReLU as its own
NumPy layer and then fused into each BatchNorm layer (``activation="relu"``:
applied in the sweep that writes y, its derivative in the backward's), and
reports that time and the peak memory of a training step both ways.

fastbn uses the OpenMP default thread count (``--num-threads 0``, the
default; a positive number caps it). Its kernels take a second thread only
for inputs of 131072 values or more per thread, so the BN calls of this small
net (0.5 MB per training call) run on one thread and start no OpenMP
worker that could take a core away from NumPy's BLAS between them.

Usage::

    python examples/train_digits.py                      # fastbn
    python examples/train_digits.py --bn both            # fastbn, then the reference; speedups
    python examples/train_digits.py --optimizer adam --epochs 20 --plot curves.png
    python examples/train_digits.py --fused              # ReLU apart, then fused; time, memory

Needs scikit-learn (and matplotlib for ``--plot``): ``pip install fastbn[examples]``.
"""

import argparse
import dataclasses
import sys
import time
import tracemalloc

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import fastbn
import fastbn.functional
import fastbn.reference

BACKENDS = {"fastbn": fastbn.functional, "reference": fastbn.reference}
DTYPE = np.float32


# ------------------------------------------------------------------ data ----

def load_data(seed, test_size=0.25):
    """Digits as (N, 1, 8, 8) float32, standardized with the training set's mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images[:, None, :, :].astype(DTYPE)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=test_size, random_state=seed, stratify=digits.target)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


# ---------------------------------------------------------------- layers ----
# Each layer has forward(x), backward(dy) -> dx, and params/grads lists in the
# same order; BatchNorm layers from fastbn have the same interface.

class Conv3x3:
    """3x3 convolution, stride 1, zero padding 1, no bias; im2col and one matmul.

    It is the first layer of the net, so backward returns no input gradient.
    """

    def __init__(self, c_in, c_out, rng):
        fan_in = c_in * 9
        self.W = (rng.standard_normal((fan_in, c_out)) * np.sqrt(2.0 / fan_in)).astype(DTYPE)
        self.dW = None

    @property
    def params(self):
        return [self.W]

    @property
    def grads(self):
        return [self.dW]

    def forward(self, x):
        n, c, h, w = x.shape
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = sliding_window_view(padded, (3, 3), axis=(2, 3))    # (N, C, H, W, 3, 3)
        self.cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)
        out = self.cols @ self.W                                        # (N*H*W, C_out)
        return np.ascontiguousarray(out.reshape(n, h, w, -1).transpose(0, 3, 1, 2))

    def backward(self, dy):
        dy_cols = dy.transpose(0, 2, 3, 1).reshape(-1, dy.shape[1])    # (N*H*W, C_out)
        self.dW = self.cols.T @ dy_cols
        return None


class MaxPool2x2:
    """2x2 max pooling, stride 2; the gradient goes to the first maximum of each window."""

    params = grads = []

    def forward(self, x):
        n, c, h, w = x.shape
        self.shape = x.shape
        windows = (x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
                   .reshape(n, c, h // 2, w // 2, 4))
        self.argmax = windows.argmax(axis=-1)[..., None]
        return np.take_along_axis(windows, self.argmax, axis=-1)[..., 0]

    def backward(self, dy):
        n, c, h, w = self.shape
        dwindows = np.zeros((n, c, h // 2, w // 2, 4), dtype=dy.dtype)
        np.put_along_axis(dwindows, self.argmax, dy[..., None], axis=-1)
        return (dwindows.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
                .reshape(self.shape))


class ReLU:
    params = grads = []
    training = True

    def train(self, mode=True):
        self.training = mode

    def forward(self, x):
        self.mask = x > 0
        return np.where(self.mask, x, DTYPE(0))

    def backward(self, dy):
        return np.where(self.mask, dy, DTYPE(0))


class Flatten:
    params = grads = []

    def forward(self, x):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self.shape)


class Linear:
    """y = x @ W (+ b), He-initialized."""

    def __init__(self, n_in, n_out, rng, bias=True):
        self.W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(DTYPE)
        self.b = np.zeros(n_out, dtype=DTYPE) if bias else None
        self.dW = self.db = None

    @property
    def params(self):
        return [self.W] if self.b is None else [self.W, self.b]

    @property
    def grads(self):
        return [self.dW] if self.b is None else [self.dW, self.db]

    def forward(self, x):
        self.x = x
        out = x @ self.W
        return out if self.b is None else out + self.b

    def backward(self, dy):
        self.dW = self.x.T @ dy
        if self.b is not None:
            self.db = dy.sum(axis=0)
        return dy @ self.W.T


class Timed:
    """A layer (BatchNorm, or the ReLU after it) with the wall time of its
    calls added up, by kind."""

    def __init__(self, layer):
        self.layer = layer
        self.forward_train = self.forward_eval = self.backward_time = 0.0

    params = property(lambda self: self.layer.params)
    grads = property(lambda self: self.layer.grads)

    def forward(self, x):
        start = time.perf_counter()
        y = self.layer.forward(x)
        elapsed = time.perf_counter() - start
        if self.layer.training:
            self.forward_train += elapsed
        else:
            self.forward_eval += elapsed
        return y

    def backward(self, dy):
        start = time.perf_counter()
        dx = self.layer.backward(dy)
        self.backward_time += time.perf_counter() - start
        return dx


class Net:
    """The layers in order; params and grads are walked in the same order.

    ``fused``: the ReLU after each BatchNorm is fused into it
    (``activation="relu"``) instead of being a layer of its own.
    """

    def __init__(self, channels, hidden, rng, backend, num_threads=None, fused=False):
        bn = dict(backend=backend, num_threads=num_threads,
                  **(dict(activation="relu") if fused else {}))
        blocks = [[Timed(fastbn.BatchNorm2d(channels, **bn))],
                  [Timed(fastbn.BatchNorm1d(hidden, **bn))]]
        if not fused:
            for block in blocks:
                block.append(Timed(ReLU()))
        self.bn = [blocks[0][0], blocks[1][0]]      # the BatchNorm layers
        self.relu = blocks[0][1:] + blocks[1][1:]   # the ReLU layers after them, if apart
        self.layers = [Conv3x3(1, channels, rng), *blocks[0], MaxPool2x2(), Flatten(),
                       Linear(channels * 16, hidden, rng, bias=False), *blocks[1],
                       Linear(hidden, 10, rng)]

    @property
    def params(self):
        return [p for layer in self.layers for p in layer.params]

    @property
    def grads(self):
        return [g for layer in self.layers for g in layer.grads]

    def train(self, mode=True):
        for timed in self.bn + self.relu:
            timed.layer.train(mode)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)

    def predict(self, x, batch_size=512):
        self.train(False)
        logits = [self.forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        self.train(True)
        return np.concatenate(logits).argmax(axis=1)

    def bn_times(self):
        """(forward in training mode, forward in eval mode, backward) of the
        BatchNorm layers, seconds."""
        return (sum(t.forward_train for t in self.bn), sum(t.forward_eval for t in self.bn),
                sum(t.backward_time for t in self.bn))

    def relu_time(self):
        """Seconds in the ReLU layers after the BatchNorm layers (0 when fused)."""
        return sum(t.forward_train + t.forward_eval + t.backward_time for t in self.relu)


def softmax_cross_entropy(logits, y):
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(y)
    loss = -log_p[np.arange(n), y].mean()
    dlogits = np.exp(log_p)
    dlogits[np.arange(n), y] -= 1
    return float(loss), (dlogits / n).astype(DTYPE)


# ------------------------------------------------------------- optimizers ---
# Both update the parameter arrays in place, so the layers see the new values.

class SGD:
    def __init__(self, params, lr=0.05, momentum=0.9):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.velocity = [np.zeros_like(p) for p in params]

    def step(self, grads):
        for p, g, v in zip(self.params, grads, self.velocity):
            v *= self.momentum
            v -= self.lr * g
            p += v


class Adam:
    def __init__(self, params, lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params, self.lr, self.beta1, self.beta2, self.eps = params, lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        scale = self.lr * np.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m += (1 - self.beta1) * (g - m)
            v += (1 - self.beta2) * (g * g - v)
            p -= (scale * m / (np.sqrt(v) + self.eps)).astype(p.dtype)


# --------------------------------------------------------------- training ---

@dataclasses.dataclass
class Result:
    """What :func:`train` returns: per-epoch history, accuracy and timings (seconds)."""

    bn: str
    loss: list
    train_accuracy: list
    test_accuracy: list
    bn_forward_train: float
    bn_forward_eval: float
    bn_backward: float
    total_time: float       # training and evaluation, data loading excluded
    relu_time: float = 0.0      # in the ReLU layers after BatchNorm (0 when fused)
    step_peak_bytes: int = 0    # peak memory traced during the first training step

    @property
    def bn_time(self):
        return self.bn_forward_train + self.bn_forward_eval + self.bn_backward


def train(epochs=12, batch_size=64, seed=0, optimizer="sgd", lr=None, channels=32, hidden=128,
          bn="fastbn", num_threads=None, fused=False, log=print):
    """Train the net; returns a :class:`Result`.

    Parameters
    ----------
    epochs, batch_size, seed : int
    optimizer : {"sgd", "adam"}
        SGD with momentum 0.9 (default lr 0.05) or Adam (default lr 2e-3).
    lr : float or None
    channels, hidden : int
        Convolution channels and hidden units.
    bn : {"fastbn", "reference"}
        The BatchNorm back end: :mod:`fastbn.functional` or :mod:`fastbn.reference`.
    num_threads : int or None
        OpenMP threads for fastbn (None: the OpenMP default).
    fused : bool
        Fuse the ReLU after each BatchNorm into it (``activation="relu"``).
    log : callable or None
        Called with one line per epoch; None is silent.
    """
    if bn not in BACKENDS:
        raise ValueError(f"bn must be one of {sorted(BACKENDS)}, got {bn!r}")
    x_train, y_train, x_test, y_test = load_data(seed)
    start = time.perf_counter()   # the run's time: training and evaluation, not the loading
    rng = np.random.default_rng(seed)
    net = Net(channels, hidden, rng, BACKENDS[bn], num_threads=num_threads, fused=fused)
    if optimizer == "sgd":
        opt = SGD(net.params, **({} if lr is None else {"lr": lr}))
    elif optimizer == "adam":
        opt = Adam(net.params, **({} if lr is None else {"lr": lr}))
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")

    history = Result(bn + (", fused relu" if fused else ""), [], [], [], 0.0, 0.0, 0.0, 0.0)
    n = len(x_train)
    if not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 2 (BatchNorm trains on batch statistics) "
                         f"and the {n} training images, got {batch_size}")
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        losses = []
        # Whole batches only: the statistics of a short last batch (3 samples here)
        # are noise, and BatchNorm cannot train on a batch of one.
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            first = epoch == 1 and i == 0
            if first:   # the peak memory of one training step (NumPy reports to tracemalloc)
                tracemalloc.start()
            loss, dlogits = softmax_cross_entropy(net.forward(x_train[idx]), y_train[idx])
            net.backward(dlogits)
            opt.step(net.grads)
            if first:
                history.step_peak_bytes = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            losses.append(loss)
        history.loss.append(float(np.mean(losses)))
        history.train_accuracy.append(float(np.mean(net.predict(x_train) == y_train)))
        history.test_accuracy.append(float(np.mean(net.predict(x_test) == y_test)))
        if log is not None:
            log(f"[{history.bn}] epoch {epoch:2d}/{epochs}  loss {history.loss[-1]:.4f}  "
                f"train acc {100 * history.train_accuracy[-1]:5.1f}%  "
                f"test acc {100 * history.test_accuracy[-1]:5.1f}%")
    history.bn_forward_train, history.bn_forward_eval, history.bn_backward = net.bn_times()
    history.relu_time = net.relu_time()
    history.total_time = time.perf_counter() - start
    return history


def summary(r):
    return (f"[{r.bn}] test accuracy {100 * r.test_accuracy[-1]:.1f}% in {r.total_time:.2f} s; "
            f"time inside BatchNorm {r.bn_time:.3f} s ({100 * r.bn_time / r.total_time:.0f}% of "
            f"the run): forward {r.bn_forward_train:.3f} s train + {r.bn_forward_eval:.3f} s "
            f"eval, backward {r.bn_backward:.3f} s"
            + (f"; in the ReLU layers after it {r.relu_time:.3f} s" if r.relu_time else "")
            + f"; peak memory of a training step {r.step_peak_bytes / 2**20:.2f} MiB")


def plot(results, path):
    """Save the loss and accuracy curves of one or more runs as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for r, style in zip(results, ("-", "--")):   # one line style per back end
        epochs = np.arange(1, len(r.loss) + 1)
        ax_loss.plot(epochs, r.loss, style, color="C0", marker="o", label=r.bn)
        ax_acc.plot(epochs, 100 * np.asarray(r.train_accuracy), style, color="C0", marker="o",
                    label=f"{r.bn}, train")
        ax_acc.plot(epochs, 100 * np.asarray(r.test_accuracy), style, color="C1", marker="s",
                    label=f"{r.bn}, test")
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log",
                title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("Conv net with fastbn BatchNorm on scikit-learn digits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bn", choices=["fastbn", "reference", "both"], default="fastbn",
                        help="BatchNorm back end; 'both' runs fastbn then the reference and "
                             "reports the BN speedup and the whole run's (default: fastbn)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs (default: 12)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the weights and the batches (default: 0)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                        help="SGD with momentum 0.9, or Adam (default: sgd)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: 0.05 for sgd, 2e-3 for adam)")
    parser.add_argument("--channels", type=int, default=32,
                        help="convolution channels (default: 32)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units (default: 128)")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="OpenMP threads for fastbn; 0 (the default) means the "
                             "OpenMP default")
    parser.add_argument("--fused", action="store_true",
                        help="train with the ReLU apart, then fused into BatchNorm, with the "
                             "same seed; report the time and peak memory both ways")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="save the loss and accuracy curves to this PNG file")
    args = parser.parse_args(argv)

    threads = "OpenMP default" if args.num_threads == 0 else args.num_threads
    print(f"fastbn {fastbn.__version__}; digits 8x8, conv {args.channels} channels, "
          f"hidden {args.hidden}, batch {args.batch_size}, {args.optimizer}, seed {args.seed}, "
          f"fastbn threads: {threads}")
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2 (BatchNorm trains on batch "
                     f"statistics), got {args.batch_size}")
    if args.fused and args.bn == "both":
        parser.error("--fused compares one back end with itself: choose --bn fastbn or "
                     "--bn reference")
    num_threads = None if args.num_threads == 0 else args.num_threads
    runs = ([(args.bn, False), (args.bn, True)] if args.fused else
            [("fastbn", False), ("reference", False)] if args.bn == "both" else
            [(args.bn, False)])
    results = []
    for bn, fused in runs:
        results.append(train(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                             optimizer=args.optimizer, lr=args.lr, channels=args.channels,
                             hidden=args.hidden, bn=bn, num_threads=num_threads, fused=fused))
    for r in results:
        print(summary(r))
    if args.fused:
        apart, fused = results
        both = apart.bn_time + apart.relu_time
        print(f"ReLU fused into BatchNorm: BatchNorm and ReLU {both:.3f} s -> "
              f"{fused.bn_time:.3f} s ({both / fused.bn_time:.2f}x); peak memory of a "
              f"training step {apart.step_peak_bytes / 2**20:.2f} MiB -> "
              f"{fused.step_peak_bytes / 2**20:.2f} MiB; test accuracy "
              f"{100 * apart.test_accuracy[-1]:.1f}% vs {100 * fused.test_accuracy[-1]:.1f}%")
    elif len(results) == 2:
        fast, ref = results
        print(f"BatchNorm speedup, fastbn over the NumPy reference: "
              f"{ref.bn_time / fast.bn_time:.1f}x ({ref.bn_time:.3f} s -> {fast.bn_time:.3f} s); "
              f"test accuracy {100 * fast.test_accuracy[-1]:.1f}% vs "
              f"{100 * ref.test_accuracy[-1]:.1f}%")
        print(f"Whole run's speedup (training and evaluation), fastbn over the NumPy "
              f"reference: {ref.total_time / fast.total_time:.2f}x ({ref.total_time:.2f} s -> "
              f"{fast.total_time:.2f} s)")
    else:
        print("(--bn both runs the two back ends with the same seed and reports the speedups)")
    if args.plot:
        plot(results, args.plot)
        print(f"saved the curves to {args.plot}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
