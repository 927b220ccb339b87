"""One SHA-256 of every output of fastbn over a matrix of calls.

A rewrite of the kernels that must change no bit (issue "Kernels v3") runs
this before and after and compares the two lines it prints. The matrix
reaches every schedule of both kernel families (planar: channel groups,
single channels, (channel, block) units; columnar: tiles, row blocks,
chunks of few rows), both dtypes, every pass (training forward, inference,
backward, frozen backward with and without parameter gradients, the
backward from the output), every activation and gradient kind, one and two
threads, fresh and streamed ``out=``, with and without gamma and beta, and
maps that float cannot carry (the double path), through the functions and
through the synchronized passes (the kernels' ``sums`` and ``apply``).

Usage: ``python scripts/bits.py`` (from anywhere; prints the kernel level
and the digest; FASTBN_KERNELS picks the level).
"""

import hashlib

import numpy as np

import fastbn
from fastbn import _dispatch
from fastbn.distributed import sync_batch_norm_backward, sync_batch_norm_forward

# shape, channel_axis: which schedule each reaches
SHAPES = [
    ((8, 3, 40000), 1),        # planar, few channels, long rows: (channel, block) units
    ((16, 64, 7, 7), 1),       # planar, channel groups
    ((4, 5, 33000), 1),        # planar, one channel per unit, rows cut into blocks
    ((2, 40, 300, 300), 1),    # planar, streamed out= (over STREAM_MIN_BYTES)
    ((4096, 64), 1),           # columnar, row blocks
    ((100, 3000), 1),          # columnar, tiles
    ((2, 9000), 1),            # columnar, chunks of few rows
    ((3, 70000), 1),           # columnar, C >= 65536 and few rows: row blocks of one row
    ((8, 10, 10, 24), -1),     # channels last
    ((70000, 24), 1),          # columnar, streamed out=
]


def digest_of(seed: int = 7) -> str:
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()

    def add(*arrays):
        for a in arrays:
            if a is None:  # a gradient not asked for
                digest.update(b"None")
                continue
            digest.update(np.ascontiguousarray(a).tobytes())

    for shape, ca in SHAPES:
        for dtype in (np.float32, np.float64):
            C = shape[ca]
            x = (rng.standard_normal(shape) * 3 + 1e3).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
            beta = rng.standard_normal(C).astype(dtype)
            gamma[0] = 1e35 if dtype == np.float32 else 1e300   # a map float cannot carry
            for affine in (True, False):
                g, b = (gamma, beta) if affine else (None, None)
                for act in (None, "relu", "leaky_relu"):
                    for threads in (1, 2):
                        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
                        y, mean, invstd = fastbn.batch_norm_forward(
                            x, g, b, running_mean=rm, running_var=rv, activation=act,
                            negative_slope=0.2, channel_axis=ca, num_threads=threads)
                        out = np.empty_like(x)
                        fastbn.batch_norm_forward(x, g, b, activation=act, negative_slope=0.2,
                                                  channel_axis=ca, out=out, num_threads=threads)
                        add(y, mean, invstd, rm, rv, out)
                        add(fastbn.batch_norm_inference(x, g, b, rm, rv, activation=act,
                                                        negative_slope=0.2, channel_axis=ca,
                                                        num_threads=threads))
                        for training, param_grads in ((True, True), (False, True),
                                                      (False, False)):
                            add(*fastbn.batch_norm_backward(
                                dy, x, g, mean, invstd, beta=b, activation=act,
                                negative_slope=0.2, training=training, param_grads=param_grads,
                                channel_axis=ca, num_threads=threads))
                        if affine and act != "relu":   # relu cannot be inverted
                            add(*fastbn.batch_norm_backward_from_output(
                                dy, y, g, b, invstd, activation=act, negative_slope=0.2,
                                channel_axis=ca, num_threads=threads))
                            dx = np.empty_like(x)
                            fastbn.batch_norm_backward(dy, x, g, mean, invstd, beta=b,
                                                       activation=act, negative_slope=0.2,
                                                       channel_axis=ca, out=dx,
                                                       num_threads=threads)
                            add(dx)
                if dtype == np.float32 and x.size < 10**6:
                    # the synchronized passes: the kernels' sums and apply
                    one = {"allreduce": lambda a: a, "num_features": C, "channel_axis": ca,
                           "activation": "relu"}
                    ys, ms, iss = sync_batch_norm_forward(x, gamma, beta, **one)
                    add(ys, ms, iss, *sync_batch_norm_backward(dy, x, gamma, ms, iss, beta=beta,
                                                               **one))
    return digest.hexdigest()


if __name__ == "__main__":
    print(_dispatch.level, fastbn.__version__)
    print(digest_of())
