"""Any other Array-API namespace: its ``linalg`` extension only."""

from __future__ import annotations

from typing import Any

from .._errors import NotPositiveDefinite
from ._backend import Backend

__all__ = ["make_backend"]


def make_backend(xp: Any) -> Backend:
    """The backend over ``xp.linalg`` (the Array API has no triangular solve)."""

    def chol(a: Any) -> Any:
        try:
            return xp.linalg.cholesky(a)
        except Exception as exc:  # each library raises its own LinAlgError
            raise NotPositiveDefinite(str(exc)) from None

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        # A general solve: exact enough for the small triangular factors used here,
        # whose condition number is the square root of the capacitance matrix's.
        return xp.linalg.solve(xp.matrix_transpose(t) if trans else t, b)

    return Backend(chol, solve)
