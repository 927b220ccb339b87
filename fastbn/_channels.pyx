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

from fastbn._stats cimport Coef, backward_coef, moments as channel_moments, stats_coef
from fastbn._views cimport cptr, wptr


def moments(const double[:, ::1] sums, const double[::1] center, double m,
            double[:, :] out):
    """Per channel, the mean and biased variance of its m local values.

    sums (C, 2): ``sum(x - center)`` and ``sum((x - center)**2)``, as
    ``sums()`` of the kernel modules gives them; out (C, 2), written:
    ``(mean, var)``.
    """
    cdef Py_ssize_t c
    cdef double mean, var
    for c in range(sums.shape[0]):
        channel_moments(sums[c, 0], sums[c, 1], m, center[c], &mean, &var)
        out[c, 0] = mean
        out[c, 1] = var


def forward_map(const double[:, :] stats, double m, double eps,
                floating[::1] mean, floating[::1] invstd,
                const floating[::1] gamma, const floating[::1] beta,
                floating[::1] running_mean, floating[::1] running_var,
                double factor, bint unbiased, double[:, ::1] coef):
    """From the (mean, var) of every channel over m values (stats (C, 2)):
    write mean and invstd, update the running statistics (both or None)
    with weight factor (the variance corrected by m / (m - 1) when unbiased),
    and write the maps coef (C, 4) for ``apply``.
    (The first array of the call's dtype is never None: Cython picks the
    specialization from it.)"""
    cdef const floating* g = cptr(gamma)
    cdef const floating* b = cptr(beta)
    cdef floating* rm = wptr(running_mean)
    cdef floating* rv = wptr(running_var)
    cdef Coef* k = <Coef*>&coef[0, 0]
    cdef Py_ssize_t c
    for c in range(stats.shape[0]):
        k[c] = stats_coef(stats[c, 0], stats[c, 1], m, eps, g, b, &mean[0], &invstd[0],
                          rm, rv, factor, unbiased, c)


def backward_map(const double[:, :] sums, double m, const floating[::1] invstd,
                 const floating[::1] mean, const floating[::1] gamma,
                 floating[::1] dgamma, floating[::1] dbeta, double[:, ::1] coef):
    """From the sums (C, 2) ``sum(dy)``, ``sum(dy * (x - mean))`` over m
    values: write dgamma and dbeta and the maps coef (C, 4) that give dx.
    mean None: the sums are ``sum(dy)``, ``sum(dy * xhat)`` (from the output).
    (invstd, never None, comes first: Cython picks the specialization from it.)"""
    cdef const floating* g = cptr(gamma)
    cdef Coef* k = <Coef*>&coef[0, 0]
    cdef Py_ssize_t c
    for c in range(sums.shape[0]):
        k[c] = backward_coef(sums[c, 0], sums[c, 1], m, mean is None, cptr(mean), &invstd[0],
                             g, &dgamma[0], &dbeta[0], c)
