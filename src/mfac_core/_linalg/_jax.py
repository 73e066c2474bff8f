"""JAX: ``jax.scipy.linalg`` and ``lax`` (Cholesky gives NaN, the dispatcher checks)."""

from __future__ import annotations

from typing import Any

from ._backend import Backend
from ._rowedit import appended, coefficients, diagonal_block, panel_rows, trailing_q

__all__ = ["make_backend"]


def make_backend() -> Backend:
    """The backend over ``jax.numpy.linalg``, ``jax.scipy.linalg`` and ``lax``."""
    import jax.numpy as jnp
    import jax.scipy.linalg
    from jax import lax

    def solve(t: Any, b: Any, lower: bool, trans: bool) -> Any:
        if trans:
            # Solving with the transposed matrix, not with transpose_a: XLA's CPU solve
            # took 0.5 ms for U^T x = b at order 1024 this way, 2.3-2.6 ms the other.
            # lax's solve takes no vector and no broadcasting: both as solve_triangular.
            vector = b.ndim == 1
            bm = b[:, None] if vector else b
            batch = jnp.broadcast_shapes(t.shape[:-2], bm.shape[:-2])
            x = lax.linalg.triangular_solve(
                jnp.broadcast_to(jnp.swapaxes(t, -1, -2), batch + t.shape[-2:]),
                jnp.broadcast_to(bm, batch + bm.shape[-2:]),
                left_side=True,
                lower=not lower,
            )
            return x[..., 0] if vector else x
        return jax.scipy.linalg.solve_triangular(t, b, lower=lower)

    def replaced(U: Any, p: int, b: Any, c: Any) -> tuple[Any, Any]:
        # _rowedit's edit with XLA's loop: panels of one row in a fori_loop, each written
        # in place into the result (a k x k buffer whose last row and column are those
        # of the identity during the append's solve, as in _rowedit.replace). Panels of
        # 4-32 rows took 1.5-1.8x as long at k = 1024; the generic edit's Python loop
        # unrolls into a graph that compiled in 14 s and ran 3x as long.
        k = U.shape[0]
        n = k - 1
        c = jnp.asarray(c, U.dtype)
        out = jnp.zeros_like(U).at[n, n].set(1.0)
        if p:
            out = out.at[:p, :p].set(U[:p, :p]).at[:p, p:n].set(U[:p, p + 1 :])
        if p < n:
            r = n - p
            q = trailing_q(jnp, solve, U, p)
            diag, beta = coefficients(jnp, q)

            def row(i: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
                tail, out = carry
                j = r - 1 - i
                VJ = lax.dynamic_slice(U, (p + 1 + j, p + 1), (1, r))
                qJ, bJ, dJ = (lax.dynamic_slice(a, (j,), (1,)) for a in (q, beta, diag))
                rows = panel_rows(diagonal_block(jnp, qJ, bJ, dJ), VJ, bJ, tail)
                return tail + qJ @ VJ, lax.dynamic_update_slice(out, rows, (p + j, p))

            # The first row outside the loop: its carry then has the body's type (under
            # shard_map, varying over the devices as U), which zeros do not.
            carry = row(0, (jnp.zeros((r,), U.dtype), out))
            _, out = lax.fori_loop(1, r, row, carry) if r > 1 else carry
        rhs = jnp.concatenate([b, jnp.zeros((1,), b.dtype)])
        col = solve(out, rhs[:, None], False, True)[:n, 0]
        margin, corner = appended(jnp, c, col)
        return out.at[:n, n].set(col).at[n, n].set(corner), margin

    return Backend(jnp.linalg.cholesky, solve, replaced=replaced)
