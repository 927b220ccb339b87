"""The per-channel finishing of a pass, for the synchronized passes.

The fused kernels (``_planar``, ``_columnar``) finish each channel inside
the pass with the inline functions of ``_stats.pxd``. A pass split at its
reduction (``fastbn.distributed``) runs ``sums`` locally, reduces across
processes, then finishes each channel here with the very same functions,
so no per-channel formula is written twice and one process gives the bits
of the fused kernel. Every kernel level is built with ``-ffp-contract=off``,
so this module (built once, at the baseline level) rounds exactly as the
inlined copies in every level do.

Arrays: ``floating`` ones have the call's dtype, (C,); ``double`` ones are
float64. ``None`` is accepted where the fused kernels accept NULL.
"""

from cython cimport floating

from fastbn._call cimport ACT_NONE, GRAD_OUTPUT, GRAD_PLAIN
from fastbn._pass cimport PASS_BACKWARD, Pass, backward_pass, forward_pass
from fastbn._stats cimport (MAP_BLOCK, Coef, CoefBlock, backward_block, coef_at,
                            exact_inverse, moments as channel_moments, stats_block)
from fastbn._views cimport cptr, wptr


cdef void renorm_of(Pass* ps, floating[::1] r, floating[::1] d, double rmax, double rmin,
                    double dmax):
    """Batch Renormalization in the pass ps when r is given (d with it)."""
    if r is not None:
        ps.renorm = True
        ps.r, ps.d = &r[0], &d[0]
        ps.rmax, ps.rmin, ps.dmax = rmax, rmin, dmax


cdef void finish_channels(const Pass* ps, const double[:, :] pairs, Coef* coef,
                          const floating* like) noexcept nogil:
    """The maps coef of every channel, MAP_BLOCK at a time, from its pair of
    values (C, 2) as the kernels finish them (fastbn._stats): a forward's
    (mean, var), a backward's sums."""
    cdef double a[MAP_BLOCK]
    cdef double b[MAP_BLOCK]
    cdef CoefBlock k
    cdef Py_ssize_t c0 = 0, j, n
    while c0 < pairs.shape[0]:
        n = min(<Py_ssize_t>MAP_BLOCK, pairs.shape[0] - c0)
        for j in range(n):
            a[j] = pairs[c0 + j, 0]
            b[j] = pairs[c0 + j, 1]
        if ps.kind == PASS_BACKWARD:
            backward_block(ps, a, b, c0, n, &k, like)
        else:
            stats_block(ps, a, b, c0, n, &k, like)
        for j in range(n):
            coef[c0 + j] = coef_at(&k, j)
        c0 += n


def moments(const double[:, ::1] sums, const double[::1] center, double m,
            double[:, :] out):
    """Per channel, the mean and biased variance of its m local values.

    sums (C, 2): ``sum(x - center)`` and ``sum((x - center)**2)``, as
    ``sums()`` of the kernel modules gives them; out (C, 2), written:
    ``(mean, var)``.
    """
    cdef Py_ssize_t c
    cdef double mean, var, inv_m = exact_inverse(m)
    for c in range(sums.shape[0]):
        channel_moments(sums[c, 0], sums[c, 1], m, inv_m, center[c], &mean, &var)
        out[c, 0] = mean
        out[c, 1] = var


def forward_map(const double[:, :] stats, double m, double eps,
                floating[::1] mean, floating[::1] invstd,
                const floating[::1] gamma, const floating[::1] beta,
                floating[::1] running_mean, floating[::1] running_var,
                double factor, bint unbiased, double[:, ::1] coef,
                floating[::1] r=None, floating[::1] d=None, double rmax=1.0,
                double rmin=1.0, double dmax=0.0):
    """From the (mean, var) of every channel over m values (stats (C, 2)):
    write mean and invstd, update the running statistics (both or None)
    with weight factor (the variance corrected by m / (m - 1) when unbiased),
    and write the maps coef (C, 4) for ``apply``. With r and d (C,): Batch
    Renormalization, r and d written (clipped to [rmin, rmax] and [-dmax,
    dmax]) from the running statistics before their update.
    (The first array of the call's dtype is never None: Cython picks the
    specialization from it.)"""
    cdef Pass ps = forward_pass(m, eps, factor, unbiased, cptr(gamma), cptr(beta), &mean[0],
                                &invstd[0], wptr(running_mean), wptr(running_var), ACT_NONE, 0.0)
    renorm_of(&ps, r, d, rmax, rmin, dmax)
    with nogil:
        finish_channels(&ps, stats, <Coef*>&coef[0, 0], &mean[0])


def backward_map(const double[:, :] sums, double m, const floating[::1] invstd,
                 const floating[::1] mean, const floating[::1] gamma,
                 floating[::1] dgamma, floating[::1] dbeta, double[:, ::1] coef,
                 floating[::1] r=None, floating[::1] d=None):
    """From the sums (C, 2) ``sum(dy)``, ``sum(dy * (x - mean))`` over m
    values: write dgamma and dbeta and the maps coef (C, 4) that give dx.
    mean None: the sums are ``sum(dy)``, ``sum(dy * xhat)`` (from the output).
    With r and d (C,): the backward of Batch Renormalization (not from the
    output).
    (invstd, never None, comes first: Cython picks the specialization from it.)"""
    cdef Pass ps = backward_pass(m, False, True, cptr(gamma), <const floating*>NULL, cptr(mean),
                                 &invstd[0], &dgamma[0], &dbeta[0],
                                 GRAD_OUTPUT if mean is None else GRAD_PLAIN, ACT_NONE, 0.0)
    renorm_of(&ps, r, d, 1.0, 1.0, 0.0)
    with nogil:
        finish_channels(&ps, sums, <Coef*>&coef[0, 0], &invstd[0])
