"""SyncBatchNorm under MPI: the worker that tests/test_sync.py starts with mpirun.

Run as ``mpirun -n K python -m mpi4py tests/mpi_worker_sync.py`` (``-m mpi4py``
makes an uncaught exception on one rank abort them all instead of leaving
the others waiting). Every rank builds the same global batches from a fixed
seed and keeps its own slice, split unevenly (with an empty slice from 3
ranks on); the synchronized layer on the slices is compared with the
single-process layer on the whole batch. Nothing raises between two
collective calls: failures are collected, gathered to rank 0 at the end,
and rank 0 prints one line ``RESULT {json}`` with

- ``size``, ``splits``: the number of ranks and the local batch sizes;
- ``cases``: per layout, dtype and configuration, the largest absolute
  difference from the single-process layer of y, dx, dgamma, dbeta, mean,
  invstd, running_mean and running_var over two training steps (and of y
  in eval mode), and the same divided by the largest magnitude (``rel``);
- ``calls``: the communicator calls made by one training forward, one
  training backward and one eval forward (counted on a wrapped
  communicator);
- ``errors``: per bad-input scenario, the exception type and message every
  rank raised;
- ``failures``: what went wrong, with the rank; empty when all is well.
"""

import collections
import copy
import json
import pickle
import sys

import numpy as np
from mpi4py import MPI

from fastbn.distributed import SyncBatchNorm, sync_batch_norm_backward, sync_batch_norm_forward
from fastbn.distributed import mpi_allreduce
from fastbn.layers import BatchNorm

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
N = 13  # global batch
SPLITS = {1: [13], 2: [9, 4], 3: [6, 0, 7], 4: [1, 5, 0, 7]}
# scaled tolerance: |ours - single process| <= TOL * max|single process|
TOL = {"float32": 1e-6, "float64": 1e-13}
LOCAL_METHODS = {"Get_rank", "Get_size", "Is_inter", "Is_intra", "Get_name", "Get_group",
                 "Get_topology", "Get_attr", "Get_info", "rank", "size"}

failures = []


def fail(message):
    failures.append(f"rank {RANK}: {message}")


def splits(size):
    if size in SPLITS:
        return SPLITS[size]
    rng = np.random.default_rng(size)  # uneven, the same on every rank
    return [int(c) for c in rng.multinomial(N, rng.dirichlet(np.ones(size)))]


SPLIT = splits(SIZE)
BOUNDS = np.cumsum([0] + SPLIT)
LOCAL = slice(BOUNDS[RANK], BOUNDS[RANK + 1])


class CountingComm:
    """Forwards to a communicator and counts every call that communicates."""

    def __init__(self, comm):
        self._comm = comm
        self.calls = collections.Counter()

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if not callable(attr) or name in LOCAL_METHODS:
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted

    def take(self):
        calls, self.calls = dict(self.calls), collections.Counter()
        return calls


def data(shape, ca, dtype, seed, offset=3.0):
    """A global batch, off-centre per channel, and its upstream gradient; same on every rank."""
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    per_channel = [1] * ndim
    per_channel[ca % ndim] = shape[ca % ndim]
    centers = offset + rng.uniform(-2, 2, shape[ca % ndim]).reshape(per_channel)
    scales = rng.uniform(0.5, 2.0, shape[ca % ndim]).reshape(per_channel)
    x = (centers + scales * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def compare(record, name, ours, expected, dtype):
    ours = np.asarray(ours, np.float64)
    expected = np.asarray(expected, np.float64)
    if ours.shape != expected.shape:
        fail(f"{record['case']}: {name} has shape {ours.shape}, expected {expected.shape}")
        return
    diff = float(np.abs(ours - expected).max(initial=0.0))
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
    record["abs"][name] = max(record["abs"].get(name, 0.0), diff)
    record["rel"][name] = max(record["rel"].get(name, 0.0), diff / scale)
    if diff > TOL[dtype] * scale or (SIZE == 1 and diff != 0.0):
        fail(f"{record['case']}: {name} differs by {diff:.3g} (scale {scale:.3g})")


def same_on_every_rank(label, arrays):
    """Arrays bitwise identical on every rank (checked outside the counted calls)."""
    mine = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    if len(set(WORLD.allgather(mine))) != 1:
        fail(f"{label}: not the same bits on every rank")


# ---------------------------------------------------------- equivalence ----

LAYOUTS = {
    "NCHW": ((N, 6, 5, 7), 1),
    "NCHW-3ch-40x40": ((N, 3, 40, 40), 1),
    "ND": ((N, 11), 1),
    "NLC": ((N, 9, 5), -1),
    "NHWC": ((N, 4, 3, 6), -1),
    # a 131 kB reduction buffer: MPI libraries switch to segmented (ring) algorithms
    "ND-4096": ((N, 4096), 1),
}
CONFIGS = {
    "default": dict(),
    "momentum=None": dict(momentum=None),
    "affine=False": dict(affine=False),
    "no-running-stats": dict(track_running_stats=False),
    "relu": dict(activation="relu"),
    "leaky-memory-saving": dict(activation="leaky_relu", negative_slope=0.2, memory_saving=True),
}


def equivalence(layout, dtype, config, calls):
    shape, ca = LAYOUTS[layout]
    name = np.dtype(dtype).name
    record = {"case": f"{layout} {name} {config}", "abs": {}, "rel": {}}
    C = shape[ca % len(shape)]
    comm = CountingComm(WORLD)
    kwargs = dict(dtype=dtype, channel_axis=ca, num_threads=1, **CONFIGS[config])
    ours = SyncBatchNorm(C, comm=comm, **kwargs)
    ref = BatchNorm(C, **kwargs)
    comm.take()
    if ours.affine:
        rng = np.random.default_rng(7)
        gamma = rng.uniform(0.5, 1.5, C).astype(dtype) * rng.choice([-1, 1], C).astype(dtype)
        beta = rng.standard_normal(C).astype(dtype)
        ours.gamma[...] = ref.gamma[...] = gamma
        ours.beta[...] = ref.beta[...] = beta
    for step in range(2):
        x, dy = data(shape, ca, dtype, seed=100 * step + len(layout))
        y = ours(x[LOCAL])
        forward_calls = comm.take()
        dx = ours.backward(dy[LOCAL])
        backward_calls = comm.take()
        y_ref = ref(x)
        dx_ref = ref.backward(dy)
        compare(record, "y", y, y_ref[LOCAL], name)
        compare(record, "dx", dx, dx_ref[LOCAL], name)
        compare(record, "mean", ours._saved.mean, ref._saved.mean, name)
        compare(record, "invstd", ours._saved.invstd, ref._saved.invstd, name)
        if ours.affine:
            compare(record, "dgamma", ours.dgamma, ref.dgamma, name)
            compare(record, "dbeta", ours.dbeta, ref.dbeta, name)
        if ours.track_running_stats:
            compare(record, "running_mean", ours.running_mean, ref.running_mean, name)
            compare(record, "running_var", ours.running_var, ref.running_var, name)
            if int(ours.num_batches_tracked) != int(ref.num_batches_tracked):
                fail(f"{record['case']}: num_batches_tracked {ours.num_batches_tracked}")
        for label, counted in (("forward", forward_calls), ("backward", backward_calls)):
            calls[label].append(counted)
            if counted != {"Allreduce": 1}:
                fail(f"{record['case']}: a training {label} made the calls {counted}")
        shared = [ours._saved.mean, ours._saved.invstd]
        if ours.affine:
            shared += [ours.dgamma, ours.dbeta]
        if ours.track_running_stats:
            shared += [ours.running_mean, ours.running_var]
        same_on_every_rank(record["case"], shared)
    x, _ = data(shape, ca, dtype, seed=999)
    ours.eval()
    ref.eval()
    y = ours(x[LOCAL])
    eval_calls = comm.take()
    calls["eval forward"].append(eval_calls)
    if eval_calls:
        fail(f"{record['case']}: an eval forward made the calls {eval_calls}")
    if ours.track_running_stats:  # without them eval normalizes with the local batch
        compare(record, "y (eval)", y, ref(x)[LOCAL], name)
    return record


# --------------------------------------------------------------- errors ----

def expect_error(errors, label, expected_type, contains, action):
    """action() must raise expected_type on every rank, with every string of contains."""
    try:
        action()
    except expected_type as exc:
        message = str(exc)
        for text in contains:
            if text not in message:
                fail(f"{label}: {text!r} not in the message {message!r}")
        errors[label] = WORLD.gather((RANK, type(exc).__name__, message), root=0)
        return
    except Exception as exc:  # noqa: BLE001
        fail(f"{label}: raised {type(exc).__name__}: {exc}, expected {expected_type.__name__}")
    else:
        fail(f"{label}: did not raise")
    errors[label] = WORLD.gather((RANK, None, None), root=0)


def error_scenarios():
    errors = {}
    last = SIZE - 1
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    dy = np.ones_like(x)
    bn = SyncBatchNorm(4, num_threads=1)
    if SIZE > 1:
        # a rank with another channel count
        bad = rng.standard_normal((3, 5, 5, 5)).astype(np.float32)
        expect_error(errors, "channels", ValueError, [f"rank {last}", "channels"],
                     lambda: bn(bad if RANK == last else x))
        # a rank with another dtype
        expect_error(errors, "dtype", TypeError, ["rank 0", "float64"],
                     lambda: bn(x.astype(np.float64) if RANK == 0 else x))
        # a rank with another number of dimensions
        expect_error(errors, "ndim", ValueError, [f"rank {last}"],
                     lambda: bn(x[:, :, 0, 0].ravel() if RANK == last else x))
        # a dy of the wrong shape in the backward
        bn(x)
        expect_error(errors, "backward dy shape", ValueError, [f"rank {last}", "shape"],
                     lambda: bn.backward(dy[:2] if RANK == last else dy))
        # a layer built with another num_features: caught at construction
        expect_error(errors, "construction", ValueError, ["num_features"],
                     lambda: SyncBatchNorm(5 if RANK == last else 4))
        # the functional form with different dtypes on the ranks
        reduce = mpi_allreduce(WORLD)
        expect_error(errors, "functional dtypes", TypeError, ["dtype"],
                     lambda: sync_batch_norm_forward(
                         x.astype(np.float64) if RANK == 0 else x, None, None,
                         allreduce=reduce, num_features=4))
        # a forward on some ranks meeting a backward on others
        mean, invstd = np.zeros(4, np.float32), np.ones(4, np.float32)
        expect_error(errors, "mixed calls", RuntimeError, ["different calls"],
                     lambda: sync_batch_norm_forward(x, None, None, allreduce=reduce,
                                                     num_features=4) if RANK == 0 else
                     sync_batch_norm_backward(dy, x, None, mean, invstd, allreduce=reduce,
                                              num_features=4))
        # the functional form with another num_features on one rank: the reduction
        # buffers differ in length; the header says so, or MPI_ERR_TRUNCATE does
        def features():
            C = 5 if RANK == last else 4
            xl = rng.standard_normal((3, C, 5, 5)).astype(np.float32)
            return sync_batch_norm_forward(xl, None, None, allreduce=reduce, num_features=C)
        if SIZE == 2:  # with more ranks the MPI library may leave ranks waiting: see
            # test_sync.py's test_an_uncaught_error_on_one_rank_ends_the_run
            expect_error(errors, "functional num_features", ValueError, ["num_features"],
                         features)
        # another eps on one rank
        expect_error(errors, "functional eps", ValueError, ["disagree on eps"],
                     lambda: sync_batch_norm_forward(x, None, None, allreduce=reduce,
                                                     num_features=4,
                                                     eps=1e-3 if RANK == last else 1e-5))
        # another fused activation, or slope of leaky_relu, on one rank
        expect_error(errors, "functional activation", ValueError, ["disagree on activation"],
                     lambda: sync_batch_norm_forward(x, None, None, allreduce=reduce,
                                                     num_features=4,
                                                     activation="relu" if RANK == last else None))
        expect_error(errors, "functional negative_slope", ValueError,
                     ["disagree on negative_slope"],
                     lambda: sync_batch_norm_backward(dy, x, None, mean, invstd,
                                                      allreduce=reduce, num_features=4,
                                                      activation="leaky_relu",
                                                      negative_slope=0.2 if RANK == last
                                                      else 0.1))
        # a big-endian x on one rank is named as such
        expect_error(errors, "big-endian", TypeError, ["rank 0", "big-endian"],
                     lambda: bn(x.astype(">f4") if RANK == 0 else x))

        # a KeyboardInterrupt while one rank checks its arguments: that rank
        # still joins the reduction, then re-raises it; the others raise RuntimeError
        class Interrupting(np.ndarray):
            @property
            def ndim(self):
                raise KeyboardInterrupt

        def interrupted():
            xl = x.view(Interrupting) if RANK == last else x
            try:
                return bn(xl)
            except KeyboardInterrupt:
                raise RuntimeError("interrupted here, as expected") from None
        expect_error(errors, "interrupt", RuntimeError, ["interrupt"], interrupted)
    if SIZE > 2:
        two = rng.standard_normal((3, 6, 5, 5)).astype(np.float32)
        expect_error(errors, "two bad ranks", ValueError, ["ranks 0 and 2"],
                     lambda: bn(two if RANK in (0, 2) else x))
    # MPI.COMM_NULL is refused naming comm
    expect_error(errors, "COMM_NULL", ValueError, ["comm", "COMM_NULL"],
                 lambda: SyncBatchNorm(4, comm=MPI.COMM_NULL))
    # one value per channel in the whole global batch
    one = np.ones((1 if RANK == 0 else 0, 4), np.float32)
    expect_error(errors, "one value per channel", ValueError,
                 ["Expected more than 1 value per channel"], lambda: bn(one))
    # after all that the layer still works, and agrees with one process
    x_all, dy_all = data((N, 4, 5, 5), 1, np.float32, seed=3)
    ref = BatchNorm(4, num_threads=1)
    bn.reset_running_stats()
    record = {"case": "after the errors", "abs": {}, "rel": {}}
    compare(record, "y", bn(x_all[LOCAL]), ref(x_all)[LOCAL], "float32")
    compare(record, "dx", bn.backward(dy_all[LOCAL]), ref.backward(dy_all)[LOCAL], "float32")
    compare(record, "running_var", bn.running_var, ref.running_var, "float32")
    return errors


def copies():
    """A layer on a sub-communicator: copies keep it (their training passes
    synchronize over the group, as the original's do, not over COMM_WORLD),
    and pickling it is refused; a layer on COMM_WORLD pickles."""
    group = WORLD.Split(RANK % 2, RANK)
    rng = np.random.default_rng(11 + RANK)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = SyncBatchNorm(3, comm=group, num_threads=1)
    for label, twin in (("deepcopy", copy.deepcopy(bn)), ("copy", copy.copy(bn))):
        if twin.comm is not group:
            fail(f"{label} of a layer on a sub-communicator did not keep it")
    twin = copy.deepcopy(bn)
    y, y_twin = bn(x), twin(x)
    dx, dx_twin = bn.backward(dy), twin.backward(dy)
    if not (np.array_equal(y, y_twin) and np.array_equal(dx, dx_twin)
            and np.array_equal(bn.running_var, twin.running_var)):
        fail("a deep copy of a layer on a sub-communicator computes otherwise than the layer")
    try:
        pickle.dumps(bn)
        fail("pickling a layer on a sub-communicator did not raise")
    except TypeError as exc:
        if "COMM_WORLD" not in str(exc):
            fail(f"pickling a layer on a sub-communicator: {exc}")
    world = SyncBatchNorm(3, num_threads=1)
    again = pickle.loads(pickle.dumps(world))
    if not np.array_equal(again(x), world(x)):
        fail("an unpickled layer on COMM_WORLD computes otherwise than the layer")
    # the transport alone: pickled only on COMM_WORLD; records it cannot reduce
    # in place are refused (before any communication, so no rank waits)
    if not isinstance(pickle.loads(pickle.dumps(mpi_allreduce(WORLD))), mpi_allreduce):
        fail("mpi_allreduce(COMM_WORLD) does not pickle")
    reduce = mpi_allreduce(group)
    if copy.deepcopy(reduce) is not reduce:
        fail("a deep copy of mpi_allreduce is another transport")
    buffers = {"pickle": (reduce, TypeError), "strided": (np.zeros((10, 8))[:, ::2], ValueError),
               "float32": (np.zeros((10, 4), np.float32), TypeError),
               "read-only": (np.frombuffer(bytes(320)).reshape(10, 4), ValueError),
               "list": ([0.0] * 40, TypeError)}
    for label, (buffer, expected) in buffers.items():
        try:
            pickle.dumps(buffer) if label == "pickle" else reduce(buffer)
            fail(f"mpi_allreduce: {label} did not raise")
        except expected:
            pass
    group.Free()


def main():
    cases = []
    calls = collections.defaultdict(list)
    for layout in LAYOUTS:
        for dtype in (np.float32, np.float64):
            configs = CONFIGS if layout == "NCHW" else ["default"]
            for config in configs:
                cases.append(equivalence(layout, dtype, config, calls))
    errors = error_scenarios()
    copies()
    every = WORLD.gather(failures, root=0)
    if RANK == 0:
        result = {
            "size": SIZE,
            "splits": SPLIT,
            "cases": cases,
            "calls": {k: sorted({json.dumps(c, sort_keys=True) for c in v})
                      for k, v in calls.items()},
            "errors": errors,
            "failures": [f for fs in every for f in fs],
        }
        print("RESULT " + json.dumps(result), flush=True)
    WORLD.Barrier()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
