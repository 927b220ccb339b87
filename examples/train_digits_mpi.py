"""Train the digits net of train_digits.py data-parallel over MPI, with fastbn.SyncBatchNorm.

Run with::

    mpirun -n 2 .venv/bin/python -m mpi4py examples/train_digits_mpi.py            # 2 processes
    mpirun -n 3 .venv/bin/python -m mpi4py examples/train_digits_mpi.py --compare  # and 1 process

(as root, in a container say, Open MPI also wants ``--allow-run-as-root``,
or ``OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1`` in the
environment; more processes than cores, ``--oversubscribe``). The net, the
data, the optimizers and the batches are those of ``examples/train_digits.py``
(imported from it): every process builds the same net from the same seed and
draws the same sequence of global batches of ``--batch-size`` images; process
r trains on its own slice of each batch (the slices may differ in size).
Data-parallel training then computes the same thing as one process:

- the two BatchNorm layers are ``fastbn.SyncBatchNorm``: they normalize
  with the statistics of the whole global batch (one ``Allreduce`` per
  forward and one per backward), and their dgamma and dbeta are already the
  gradients of the global loss, the same on every process;
- the loss is the mean over the global batch: each process scales its
  gradient by its share of the batch, and the gradients of the convolution
  and the fully connected layers are summed over the processes in one
  ``Allreduce`` per step;
- so every process applies the same update and the parameters stay the
  same on every process (checked at the end); the accuracy is that of one
  process up to float32 rounding (``--compare`` runs the one-process
  ``train_digits.train`` afterwards and prints both).

Evaluation (BatchNorm in eval mode, with the running statistics, which are
the same on every process) runs on each process's share of the images, and
the correct counts are summed. The peak memory reported is that of rank 0's
first training step, as ``tracemalloc`` traces it (NumPy reports to it).

Needs mpi4py with an MPI library and scikit-learn:
``pip install "fastbn[mpi,examples]"`` (Open MPI on Debian/Ubuntu:
``apt-get install openmpi-bin libopenmpi-dev``).
"""

import os

# One BLAS/OpenMP thread per core: several processes on one machine share its cores.
# (Set before NumPy loads OpenBLAS; the environment overrides it.)
_local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", os.environ.get("MPI_LOCALNRANKS", "1")))
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // max(1, _local))))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

import fastbn  # noqa: E402
import fastbn.functional  # noqa: E402
from fastbn.distributed import SyncBatchNorm  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_digits as single  # noqa: E402  (examples/train_digits.py)

DTYPE = single.DTYPE


def shares(count, size):
    """Bounds of the size slices of count items: as even as can be, the first ones longer."""
    base, extra = divmod(count, size)
    sizes = [base + (r < extra) for r in range(size)]
    return np.concatenate([[0], np.cumsum(sizes)])


def make_net(comm, channels, hidden, rng, num_threads):
    """The net of train_digits.py with its BatchNorm layers made synchronized."""
    net = single.Net(channels, hidden, rng, fastbn.functional, num_threads=num_threads)
    for timed in net.bn:
        timed.layer = SyncBatchNorm.from_batch_norm(timed.layer, comm)
    return net


def local_grads(net):
    """The gradients that are local to this process: all but SyncBatchNorm's."""
    return [g for layer in net.layers
            if not isinstance(getattr(layer, "layer", layer), SyncBatchNorm)
            for g in layer.grads]


def sum_over_processes(comm, arrays, extra):
    """Sum float32 arrays (in place) and a few float64 numbers over comm, in one Allreduce."""
    from mpi4py import MPI

    buf = np.concatenate([a.ravel().astype(np.float64) for a in arrays] + [np.asarray(extra,
                                                                                     np.float64)])
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    offset = 0
    for a in arrays:
        a[...] = buf[offset:offset + a.size].reshape(a.shape)
        offset += a.size
    return buf[offset:]


def accuracy(comm, net, x, y):
    """Share of correct predictions over all processes, each predicting its share of x."""
    bounds = shares(len(x), comm.Get_size())
    mine = slice(bounds[comm.Get_rank()], bounds[comm.Get_rank() + 1])
    correct = int(np.sum(net.predict(x[mine]) == y[mine])) if mine.stop > mine.start else 0
    return comm.allreduce(correct) / len(x)


def train(comm, epochs=12, batch_size=64, seed=0, optimizer="sgd", lr=None, channels=32,
          hidden=128, num_threads=1, log=print):
    """Train data-parallel over comm; returns train_digits.Result (the same on every process)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    x_train, y_train, x_test, y_test = single.load_data(seed)
    n = len(x_train)
    if not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 2 and the {n} training images, "
                         f"got {batch_size}")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)       # the same draws as train_digits.train
    net = make_net(comm, channels, hidden, rng, num_threads)
    if optimizer == "sgd":
        opt = single.SGD(net.params, **({} if lr is None else {"lr": lr}))
    elif optimizer == "adam":
        opt = single.Adam(net.params, **({} if lr is None else {"lr": lr}))
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    bounds = shares(batch_size, size)
    mine = slice(bounds[rank], bounds[rank + 1])
    history = single.Result(f"fastbn SyncBatchNorm, {size} processes", [], [], [], 0.0, 0.0,
                            0.0, 0.0)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        losses = []
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size][mine]
            first = epoch == 1 and i == 0
            if first:   # the peak memory of one training step, as in train_digits.train
                tracemalloc.start()
            logits = net.forward(x_train[idx])
            if len(idx):
                loss, dlogits = single.softmax_cross_entropy(logits, y_train[idx])
                # gradient of the global mean loss: this process's share of the batch
                dlogits *= DTYPE(len(idx) / batch_size)
                loss_sum = loss * len(idx)
            else:
                loss_sum, dlogits = 0.0, np.zeros_like(logits)
            net.backward(dlogits)
            (total,) = sum_over_processes(comm, local_grads(net), [loss_sum])
            opt.step(net.grads)
            if first:
                history.step_peak_bytes = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            losses.append(total / batch_size)
        history.loss.append(float(np.mean(losses)))
        history.train_accuracy.append(accuracy(comm, net, x_train, y_train))
        history.test_accuracy.append(accuracy(comm, net, x_test, y_test))
        if log is not None and rank == 0:
            log(f"[{size} processes] epoch {epoch:2d}/{epochs}  loss {history.loss[-1]:.4f}  "
                f"train acc {100 * history.train_accuracy[-1]:5.1f}%  "
                f"test acc {100 * history.test_accuracy[-1]:5.1f}%")
    history.bn_forward_train, history.bn_forward_eval, history.bn_backward = net.bn_times()
    history.total_time = time.perf_counter() - start
    digest = hashlib.sha256(b"".join(p.tobytes() for p in net.params)).hexdigest()
    history.same_params = len(set(comm.allgather(digest))) == 1
    return history


def main(argv=None):
    from mpi4py import MPI

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="epochs (default: 12)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="global batch size, split over the processes (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: 0.05 for sgd, 2e-3 for adam)")
    parser.add_argument("--channels", type=int, default=32,
                        help="convolution channels (default: 32)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units (default: 128)")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="OpenMP threads for fastbn per process; 0: the OpenMP default "
                             "(default: 1)")
    parser.add_argument("--compare", action="store_true",
                        help="then train on one process (train_digits.train, rank 0) and "
                             "compare")
    parser.add_argument("--json", action="store_true",
                        help="print a last line 'RESULT {json}' with the histories")
    args = parser.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2, got {args.batch_size}")
    num_threads = None if args.num_threads == 0 else args.num_threads
    kwargs = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                  optimizer=args.optimizer, lr=args.lr, channels=args.channels,
                  hidden=args.hidden, num_threads=num_threads)
    if rank == 0:
        print(f"fastbn {fastbn.__version__}; {size} processes, global batch {args.batch_size} "
              f"(local {', '.join(map(str, np.diff(shares(args.batch_size, size))))}); "
              f"digits 8x8, conv {args.channels} channels, hidden {args.hidden}, "
              f"{args.optimizer}, seed {args.seed}", flush=True)
    result = train(comm, **kwargs)
    if rank != 0:
        return result
    print(single.summary(result))
    print("(the time inside BatchNorm of a synchronized run includes the waits for the other "
          "processes at its collectives)")
    print(f"parameters the same on every process: {'yes' if result.same_params else 'NO'}")
    report = {"processes": size, "loss": result.loss, "test_accuracy": result.test_accuracy,
              "train_accuracy": result.train_accuracy, "same_params": result.same_params,
              "step_peak_bytes": result.step_peak_bytes}
    if args.compare:
        one = single.train(bn="fastbn", log=None, **kwargs)
        print(single.summary(one))
        gap = max(abs(a - b) for a, b in zip(result.loss, one.loss))
        print(f"{size} processes vs 1: test accuracy {100 * result.test_accuracy[-1]:.1f}% vs "
              f"{100 * one.test_accuracy[-1]:.1f}%; largest difference of the epoch losses "
              f"{gap:.2g}")
        report.update(one_loss=one.loss, one_test_accuracy=one.test_accuracy)
    if args.json:
        print("RESULT " + json.dumps(report), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
