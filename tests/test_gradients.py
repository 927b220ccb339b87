"""The backward against central finite differences of the forward, in float64.

The loss is ``L = sum(y * w)`` for a fixed random ``w``, so ``dL/dy = w``;
``batch_norm_backward(w, x, gamma, mean, invstd)`` must give the numeric
gradients of L with respect to x, gamma and beta.
"""

import numpy as np
import pytest

import fastbn

from helpers import layout_id, make_inputs, numeric_gradient

RTOL = 1e-6
ATOL = 1e-7


@pytest.mark.parametrize("shape, channel_axis", [
    pytest.param(s, ca, id=layout_id(s, ca))
    for s, ca in [((4, 3), 1), ((2, 1), 1), ((3, 2, 5), 1), ((3, 5, 2), -1),
                  ((2, 3, 1, 1), 1), ((2, 2, 3, 3), 1), ((2, 3, 2, 3), -1),
                  ((2, 2, 2, 2, 3), 1), ((2, 2, 2, 3, 2), -1)]])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_backward_matches_finite_differences(shape, channel_axis, affine, rng):
    """dx, dgamma and dbeta equal the numeric gradients of sum(y * w)."""
    a = make_inputs(shape, np.float64, channel_axis, rng)
    x, w = a.x.copy(), a.dy
    gamma, beta = (a.gamma.copy(), a.beta.copy()) if affine else (None, None)

    def loss():
        y, _, _ = fastbn.batch_norm_forward(x, gamma, beta, channel_axis=channel_axis)
        return float(np.sum(y * w))

    _, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta, channel_axis=channel_axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(w, x, gamma, mean, invstd,
                                                   channel_axis=channel_axis)

    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=RTOL, atol=ATOL,
                               err_msg="dx")
    if affine:
        np.testing.assert_allclose(dgamma, numeric_gradient(loss, gamma), rtol=RTOL,
                                   atol=ATOL, err_msg="dgamma")
        np.testing.assert_allclose(dbeta, numeric_gradient(loss, beta), rtol=RTOL,
                                   atol=ATOL, err_msg="dbeta")
    else:
        # Without affine, dgamma and dbeta are the gradients of an implicit
        # gamma = 1 and beta = 0: check them with explicit ones.
        gamma, beta = np.ones(a.C), np.zeros(a.C)
        np.testing.assert_allclose(dgamma, numeric_gradient(loss, gamma), rtol=RTOL,
                                   atol=ATOL, err_msg="dgamma (implicit gamma = 1)")
        np.testing.assert_allclose(dbeta, numeric_gradient(loss, beta), rtol=RTOL,
                                   atol=ATOL, err_msg="dbeta (implicit beta = 0)")
