"""What a backend of the small dense linear algebra provides (one table per array library)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Backend"]


@dataclass(frozen=True)
class Backend:
    """The functions of one array library for small (stacks of) float64 matrices.

    Attributes
    ----------
    cholesky : callable
        ``cholesky(A)`` -> the lower factor of each matrix of the stack ``A``; raises
        :class:`~mfac_core._errors.NotPositiveDefinite` (or returns NaN, which the
        dispatcher catches).
    solve_triangular : callable
        ``solve_triangular(T, B, lower, trans)`` -> ``T^{-1} B`` (``T^{-T} B`` with
        ``trans``), batched over leading axes.
    inverse : callable or None
        ``inverse(T)`` -> ``T^{-1}`` for a stack of lower triangular ``T``; ``None``: a
        solve against the identity.
    replace : callable or None
        ``replace(U, p, b, c, out)``, the row edit of an upper factor; ``None``: the
        generic one of ``_rowedit`` with this backend's solve.
    replaced : callable or None
        ``replaced(U, p, b, c)`` -> ``(new, margin)``, the row edit as a pure function
        of arrays (``_rowedit.replaced``'s contract), in this library's own loop;
        ``None``: ``_rowedit.replaced`` with this backend's solve.
    matmul_into : callable or None
        ``matmul_into(A, B, out)``: ``out[...] = A @ B`` without a temporary; ``None``:
        with one.
    cholesky_inverse : callable or None
        ``cholesky_inverse(U, out)``: writes ``(U^T U)^{-1}`` for a stack of upper factors
        ``U`` into ``out`` (a stack of the same shape, any float dtype); ``None``: from
        the triangular inverse, ``U^{-1} U^{-T}``.
    """

    cholesky: Callable[[Any], Any]
    solve_triangular: Callable[[Any, Any, bool, bool], Any]
    inverse: Callable[[Any], Any] | None = None
    replace: Callable[..., Any] | None = None
    replaced: Callable[..., tuple[Any, Any]] | None = None
    matmul_into: Callable[[Any, Any, Any], None] | None = None
    cholesky_inverse: Callable[[Any, Any], None] | None = None
