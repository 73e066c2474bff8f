"""Export of NumPy-backed operators as real :class:`scipy.sparse.linalg.LinearOperator`.

SciPy's iterative solvers and eigensolvers (``cg``, ``minres``, ``gmres``,
``eigsh`` including shift-invert through ``OPinv``, ``lobpcg``) then work with
them unchanged.
"""

from __future__ import annotations

import scipy.sparse.linalg

from ._operator import LinearOperator

__all__ = ["to_scipy"]


def to_scipy(op: LinearOperator, /) -> scipy.sparse.linalg.LinearOperator:
    """A :class:`scipy.sparse.linalg.LinearOperator` that calls ``op``.

    The same as ``op.to_scipy()`` (see :meth:`mfac_core.LinearOperator.to_scipy`).

    Parameters
    ----------
    op : LinearOperator
        An operator of :mod:`mfac_core` over NumPy arrays.

    Returns
    -------
    scipy.sparse.linalg.LinearOperator
        With ``op``'s shape and dtype, and its ``matvec``, ``matmat``,
        ``rmatvec`` and ``rmatmat``.

    Raises
    ------
    TypeError
        If ``op`` is not an operator, or works on arrays of another library
        (SciPy would copy them into NumPy).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.sparse.linalg import cg
    >>> from mfac_core import EmpiricalFisher, StaticIHVP
    >>> G = np.random.default_rng(0).standard_normal((5, 40))
    >>> F = EmpiricalFisher(G, damp=0.5).to_scipy()
    >>> M = StaticIHVP(G, damp=0.5).to_scipy()
    >>> b = np.ones(40)
    >>> x, info = cg(F, b, M=M)
    >>> info, bool(np.allclose(F @ x, b))
    (0, True)
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"to_scipy expects an mfac_core LinearOperator, got {type(op).__name__}")
    return op.to_scipy()
