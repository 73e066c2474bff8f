"""JAX: ``jax.scipy.linalg`` (Cholesky returns NaN instead of raising; the dispatcher checks)."""

from __future__ import annotations

from typing import Any

from ._backend import Backend

__all__ = ["make_backend"]


def make_backend() -> Backend:
    """The backend over ``jax.numpy.linalg`` and ``jax.scipy.linalg``."""
    import jax.numpy as jnp
    import jax.scipy.linalg

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        return jax.scipy.linalg.solve_triangular(t, b, lower=lower, trans=1 if trans else 0)

    return Backend(jnp.linalg.cholesky, solve)
