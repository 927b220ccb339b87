"""Drop-in adapters that run existing NumPy networks on fastbn.

- :mod:`fastbn.compat.cs231n`: the ``batchnorm_*`` functions of the CS231n
  assignment API, and :func:`fastbn.compat.cs231n.patch` to swap them into an
  existing ``layers`` module.
- :mod:`fastbn.compat.deepnet`: the ``Batchnorm`` layer class of the deepnet
  NumPy library.

Both are light (they import :mod:`fastbn.functional` and NumPy only).
"""

from fastbn.compat import cs231n, deepnet

__all__ = ["cs231n", "deepnet"]
