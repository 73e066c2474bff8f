"""Export of NumPy-backed operators as real :class:`scipy.sparse.linalg.LinearOperator`.

SciPy's iterative solvers and eigensolvers (``cg``, ``minres``, ``gmres``,
``eigsh`` including shift-invert through ``OPinv``, ``lobpcg``) then work with
them unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse.linalg

from ._compat import is_numpy_namespace, namespace_name
from ._operator import LinearOperator

__all__ = ["to_scipy"]


def to_scipy(op: LinearOperator, /) -> scipy.sparse.linalg.LinearOperator:
    """A :class:`scipy.sparse.linalg.LinearOperator` that calls ``op``.

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
    if not is_numpy_namespace(op.xp):
        raise TypeError(
            f"to_scipy needs a NumPy-backed operator, but {op!r} works on "
            f"{namespace_name(op.xp)} arrays; SciPy would copy every vector into NumPy. Build "
            "the operator from NumPy arrays, or call its matvec directly")

    def cast(x: Any) -> np.ndarray:
        # SciPy's solvers hand in float64 work vectors or views; the operator wants
        # its own dtype, and refuses a silent change of precision from its users,
        # so the conversion happens here, where the SciPy contract asks for it.
        return np.asarray(x, dtype=op.dtype)

    return scipy.sparse.linalg.LinearOperator(
        op.shape,
        matvec=lambda x: op.matvec(cast(x)),
        rmatvec=lambda x: op.rmatvec(cast(x)),
        matmat=lambda X: op.matmat(cast(X)),
        rmatmat=lambda X: op.rmatmat(cast(X)),
        dtype=op.dtype,
    )
