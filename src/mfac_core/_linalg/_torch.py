"""PyTorch: ``torch.linalg`` (any device)."""

from __future__ import annotations

from typing import Any

from .._errors import NotPositiveDefinite
from ._backend import Backend

__all__ = ["make_backend"]


def make_backend() -> Backend:
    """The backend over ``torch.linalg``."""
    import torch

    def chol(a: Any) -> Any:
        factor, info = torch.linalg.cholesky_ex(a)
        if bool((info != 0).any()):
            raise NotPositiveDefinite("leading minor not positive definite")
        return factor

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        if trans:
            return torch.linalg.solve_triangular(t.mT, b, upper=lower)
        return torch.linalg.solve_triangular(t, b, upper=not lower)

    return Backend(chol, solve)
