"""The static M-FAC operators: F = damp I + G^T G / m and its inverse."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

from . import _blocks, _linalg
from ._blocks import BlockGroup
from ._compat import device, is_writeable_array, size
from ._linalg import FactorizationError, IllConditionedWarning
from ._operator import LinearOperator
from ._validation import (
    check_damp,
    check_finite,
    check_floating,
    namespace_of,
)

__all__ = ["EmpiricalFisher", "StaticIHVP"]

#: float64 entries in one column piece of the set-up (32 MiB).
_PIECE_ENTRIES = 2**22


def _check_grads(G: Any, check: bool) -> Any:
    xp = namespace_of(G, "G")
    if G.ndim != 2:
        raise ValueError(f"G must be a 2-D array of shape (m, d), one gradient per row; "
                         f"got shape {tuple(G.shape)}")
    m, d = G.shape
    if m == 0 or d == 0:
        raise ValueError(f"G must hold at least one gradient of at least one coordinate; "
                         f"got shape {tuple(G.shape)}")
    check_floating(xp, G, "G")
    if check:
        check_finite(xp, G, "G")
    return xp


def _check_block_size(block_size: Any, d: int) -> int:
    if block_size is None:
        return d
    if isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int or None, got {block_size!r}")
    try:
        block_size = operator.index(block_size)
    except TypeError:
        raise TypeError(f"block_size must be an int or None, got {block_size!r}") from None
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return min(block_size, d)


def _lambda_max_bounds(xp: Any, gram: Any, iterations: int = 4) -> tuple[float, float]:
    """Bounds on the largest eigenvalue over a stack of PSD Gram matrices.

    The upper bound is the trace; the lower bound a Rayleigh quotient after a
    few power iterations from the all-ones vector (exact for rank one). Both
    cost O(m^2) per block, nothing next to the Gram product.
    """
    hi = float(xp.max(xp.sum(xp.linalg.diagonal(gram), axis=-1)))
    v = xp.ones((*gram.shape[:-1], 1), dtype=gram.dtype, device=device(gram))
    for _ in range(iterations):
        v = gram @ v
        v = v / xp.maximum(xp.max(xp.abs(v), axis=-2, keepdims=True), 1e-300)
    # v = 0 only for a zero Gram, whose Rayleigh quotient is then 0/tiny = 0.
    norm2 = xp.maximum(xp.sum(v * v, axis=(-2, -1)), 1e-300)
    rayleigh = xp.sum(v * (gram @ v), axis=(-2, -1)) / norm2
    return float(xp.max(rayleigh)), hi


class _BlockOperatorBase(LinearOperator):
    """What the forward and inverse operators share: G, damp, the block layout."""

    def _init_layout(self, G: Any, damp: Any, block_size: Any, check: bool,
                     check_G: bool = True) -> Any:
        xp = _check_grads(G, check and check_G)
        self.damp = check_damp(damp)
        m, d = G.shape
        self.num_grads, self.dim = int(m), int(d)
        self.block_size = _check_block_size(block_size, d)
        super().__init__(shape=(d, d), dtype=G.dtype, xp=xp, device=device(G), symmetric=True,
                         check_finite=check)
        return xp

    def _groups_matmat(self, X: Any, apply: Callable[[BlockGroup, Any], Any]) -> Any:
        parts = [apply(g, X) for g in self._groups]
        return parts[0] if len(parts) == 1 else self._xp.concat(parts, axis=0)


class StaticIHVP(_BlockOperatorBase):
    r"""The inverse of the damped empirical Fisher of m gradients, ``F^{-1}``.

    ``F = damp * I + G.T @ G / m`` for the gradients in the rows of ``G``
    (shape ``(m, d)``), optionally restricted to a block-diagonal matrix over
    consecutive blocks of ``block_size`` coordinates. The operator is
    factorised once, in O(d m^2) BLAS-3 work, and then applies ``F^{-1}`` in
    O(d m) per vector, gives single entries of ``F^{-1}`` in O(m) and its
    diagonal in O(d m).

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row, of any Array-API library; float32 or
        float64. The operator lives in G's namespace and on G's device.
    damp : float
        The damping ``lambda > 0`` (absolute, as in the M-FAC paper, whose
        default is ``1e-5``).
    block_size : int, optional
        Use a block-diagonal F over consecutive blocks of this many
        coordinates (the last block may be shorter). ``None`` (default) uses
        the full F.
    overwrite_G : bool, optional
        Reuse G's memory for the m x d working array ``W = L^{-1} G``, so the
        operator needs no second m x d array. G's contents are destroyed
        (also when the set-up fails, for instance on a NaN found late in G).
        Needs a writeable array (not JAX).
    check_finite : bool, optional
        Check G, and later each input vector, for NaN and infinity
        (default ``True``; one extra read of each array).
    progress : callable, optional
        Called as ``progress(done, total)`` while the set-up runs, with the
        amount of work done so far and in all (two passes over d columns).

    Attributes
    ----------
    shape : tuple
        ``(d, d)``.
    dtype, device
        G's dtype and device.
    num_grads, dim, damp, block_size
        m, d, lambda and the block size (``d`` for the full operator).
    kappa_bound : float
        An upper bound of the 2-norm condition number of F (the largest over
        the blocks): ``1 + ||G_b||_F^2 / (m damp)``.

    Raises
    ------
    ValueError
        For a G that is not 2-D, empty, or holds NaN/inf, for ``damp <= 0``
        and for ``block_size < 1``.
    TypeError
        For an integer or complex G, or a G that is not an array.
    FactorizationError
        If the capacitance matrix cannot be factorised in float64 (possible
        only when ``kappa`` approaches 1e16, e.g. duplicated gradients with a
        tiny damping).

    See Also
    --------
    EmpiricalFisher : the forward operator F.
    DynamicIHVP : the same inverse over a sliding window of gradients.

    Notes
    -----
    With the capacitance matrix ``C = m damp I + G G^T = L L^T`` (Cholesky, in
    float64) and ``W = L^{-1} G`` (stored in G's dtype), Woodbury's identity
    gives

    .. math::

        F^{-1} x = (x - W^T W x) / \lambda, \qquad
        [F^{-1}]_{jk} = (\delta_{jk} - W_{:j}^T W_{:k}) / \lambda .

    These are the paper's recursions (3)-(5) in closed form: the LDL^T
    pivots of ``C / lambda`` are its ``q_i`` and ``W`` its ``v_i`` up to
    scaling. Blocks no larger than m store the dense inverse of their
    ``B x B`` block instead, which is cheaper. The relative error of a
    product is about ``eps(dtype) * kappa`` for ``kappa = 1 + ||G||_2^2 /
    (m damp)``; all m x m work is done in float64.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import StaticIHVP
    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((8, 100))
    >>> op = StaticIHVP(G, damp=1e-2)
    >>> x = rng.standard_normal(100)
    >>> F = 1e-2 * np.eye(100) + G.T @ G / 8
    >>> bool(np.allclose(F @ op.matvec(x), x))
    True
    >>> bool(np.allclose(op.diagonal(), np.diag(np.linalg.inv(F))))
    True
    """

    def __init__(
        self,
        G: Any,
        /,
        *,
        damp: float,
        block_size: int | None = None,
        overwrite_G: bool = False,
        check_finite: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        # G's finiteness is checked on the Gram diagonals, without a pass of its own.
        xp = self._init_layout(G, damp, block_size, check_finite, check_G=False)
        m, d = self.num_grads, self.dim
        if overwrite_G and not is_writeable_array(G):
            raise ValueError("overwrite_G=True needs a writeable array; this G is read-only "
                             "(or from a library with immutable arrays such as JAX)")
        self._groups = _blocks.block_groups(d, self.block_size, m)
        # float64 pieces of at most 32 MiB and at most 1/64 of G's entries (1/32 of a
        # float32 G's bytes), so that the set-up's peak memory stays near size(G).
        max_cols = max(1, min(_PIECE_ENTRIES, m * d // 64) // m)

        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, 2 * d)

        wood_end = max((g.end for g in self._groups if not g.dense), default=0)
        self._W = None
        if wood_end:
            if overwrite_G:
                self._W = G
            elif is_writeable_array(xp.empty((0,), dtype=G.dtype, device=self.device)):
                # The library's arrays are mutable (G itself may be read-only).
                self._W = xp.empty((m, wood_end), dtype=G.dtype, device=self.device)
        kappa_lo = kappa_hi = 1.0
        factors: list[list[Any]] = [[] for _ in self._groups]
        W_parts: list[Any] = []
        for group, parts in zip(self._groups, factors, strict=True):
            # A dense block's G_b^T G_b needs whole blocks (size <= m columns: O(m^2)).
            cols = max(max_cols, group.size) if group.dense else max_cols
            for chunk in _blocks.chunks(group, cols):
                lo, hi = self._setup_chunk(xp, G, group, chunk, parts, W_parts, advance)
                kappa_lo = max(kappa_lo, 1.0 + lo / (m * self.damp))
                kappa_hi = max(kappa_hi, 1.0 + hi / (m * self.damp))
        self._factors = [None if not parts else parts[0] if len(parts) == 1
                         else xp.concat(parts, axis=0) for parts in factors]
        if W_parts:
            # Only for libraries with immutable arrays: assemble W from its pieces.
            self._W = xp.concat(W_parts, axis=1)
        self.kappa_bound = kappa_hi
        self._warn_if_hopeless(kappa_lo)

    def _setup_chunk(self, xp: Any, G: Any, group: BlockGroup, chunk: list[Any],
                     factors: list[Any], W_parts: list[Any],
                     advance: Callable[[int], None]) -> tuple[float, float]:
        """Factorise the blocks of one chunk; returns bounds on their largest eigenvalue.

        Dense blocks append their ``size x size`` inverses to ``factors``;
        Woodbury blocks write their part of ``W = L^{-1} G`` (or append it to
        ``W_parts``).
        """
        m = self.num_grads
        if group.dense:
            # F_b = damp I + G_b^T G_b / m is only size x size: invert it densely.
            gram = _blocks.chunk_gram(xp, G, group, chunk,
                                      lambda X: xp.matrix_transpose(X) @ X, advance)
            shift, scale = self.damp, 1.0 / m
        else:
            gram = _blocks.chunk_gram(xp, G, group, chunk,
                                      lambda X: X @ xp.matrix_transpose(X), advance)
            shift, scale = m * self.damp, 1.0
        if self.check_finite:
            # A NaN or infinity anywhere in G makes its row's (or column's) sum of
            # squares non-finite: the Gram diagonal checks G at no extra pass.
            check_finite(xp, xp.linalg.diagonal(gram), "G")
        # Small matrices: one BLAS thread (see _linalg.single_threaded).
        with _linalg.single_threaded(xp):
            lo, hi = _lambda_max_bounds(xp, gram)
            eye = xp.eye(gram.shape[-1], dtype=xp.float64, device=self.device)
            L = self._factorize(scale * gram + shift * eye, hi)
            Linv = _linalg.triangular_inverse(xp, L)
            if group.dense:
                inverse = xp.astype(xp.matrix_transpose(Linv) @ Linv, self.dtype)
        if group.dense:
            factors.append(inverse)
            advance(sum((b1 - b0) * (c1 - c0) for b0, b1, c0, c1 in chunk))
        else:
            W_parts.extend(self._apply_inverse_factor(xp, xp.astype(Linv, self.dtype), G,
                                                      group, chunk, advance))
        return lo, hi

    def _factorize(self, S: Any, lambda_max_bound: float) -> Any:
        try:
            return _linalg.cholesky(self._xp, S)
        except _linalg._NotPositiveDefinite:
            kappa = 1.0 + lambda_max_bound / (self.num_grads * self.damp)
            raise FactorizationError(
                f"the damped Fisher of these gradients is not numerically positive definite in "
                f"float64 (damp={self.damp:g}, condition number kappa <= {kappa:.3g}); increase "
                "damp, or remove duplicated or non-finite gradients") from None

    def _apply_inverse_factor(self, xp: Any, Linv: Any, G: Any, group: BlockGroup,
                              chunk: list[Any], advance: Callable[[int], None]) -> list[Any]:
        """W = L^{-1} G for the blocks of a chunk, written piece by piece into ``self._W``.

        ``Linv`` holds the chunk's blocks only (its first is the chunk's first).
        """
        out = []
        m = self.num_grads
        first = chunk[0][0]
        for piece in chunk:
            b0, b1, c0, c1 = piece
            X = _blocks.piece_stack(xp, G, group, piece)
            if b1 - b0 == 1 and self._W is not None:
                lo, hi = _blocks.piece_columns(group, piece)
                _linalg.matmul_into(xp, Linv[b0 - first, ...], X[0, ...], self._W[:, lo:hi])
                advance(c1 - c0)
                continue
            if b1 - b0 == 1:
                Y = Linv[b0 - first, ...] @ X[0, ...]
            else:
                Y = xp.reshape(xp.permute_dims(Linv[b0 - first:b1 - first, ...] @ X, (1, 0, 2)),
                               (m, (b1 - b0) * (c1 - c0)))
            if self._W is None:
                out.append(Y)
            else:
                lo, hi = _blocks.piece_columns(group, piece)
                self._W[:, lo:hi] = Y
            advance((b1 - b0) * (c1 - c0))
        return out

    def _warn_if_hopeless(self, kappa_lower: float) -> None:
        eps = float(self._xp.finfo(self.dtype).eps)
        if eps * kappa_lower >= 1.0:
            warnings.warn(
                f"F is so ill-conditioned (kappa >= {kappa_lower:.3g}, damp={self.damp:g}) that "
                f"{self.dtype} products may have no correct digits; increase damp"
                + (" or use float64" if eps > 1e-15 else ""), IllConditionedWarning, stacklevel=3)

    # -- products ------------------------------------------------------------------------

    def _apply_group(self, group: BlockGroup, X: Any) -> Any:
        xp = self._xp
        if group.dense:
            inv = self._factors[self._groups.index(group)]
            Xb = xp.reshape(X[group.start:group.end, ...], (group.count, group.size, X.shape[1]))
            return xp.reshape(inv @ Xb, (group.count * group.size, X.shape[1]))
        return _blocks.lowrank_apply(xp, self._W, X, group, 1.0 / self.damp, -1.0 / self.damp)

    def _matmat(self, X: Any) -> Any:
        return self._groups_matmat(X, self._apply_group)

    def _matvec(self, x: Any) -> Any:
        if len(self._groups) == 1 and self._groups[0].count == 1 and not self._groups[0].dense:
            W = self._W
            return (x - (W @ x) @ W) / self.damp
        return self._matmat(x[:, None])[:, 0]

    # -- entries -------------------------------------------------------------------------

    def diagonal(self) -> Any:
        """The d diagonal entries of ``F^{-1}``, in O(d m).

        Returns
        -------
        array, shape (d,)
            In the operator's namespace, dtype and device. The sums of squares
            are accumulated in float64.
        """
        xp = self._xp
        m = self.num_grads
        max_cols = max(1, _PIECE_ENTRIES // m)
        parts = []
        for group, inv in zip(self._groups, self._factors, strict=True):
            if group.dense:
                parts.append(xp.reshape(xp.linalg.diagonal(inv), (-1,)))
                continue
            for lo in range(group.start, group.end, max_cols):
                Wc = xp.astype(self._W[:, lo:min(lo + max_cols, group.end)], xp.float64)
                parts.append(xp.astype((1.0 - xp.sum(Wc * Wc, axis=0)) / self.damp, self.dtype))
        return parts[0] if len(parts) == 1 else xp.concat(parts)

    def entries(self, rows: Any, cols: Any, /) -> Any:
        """Selected entries ``[F^{-1}][rows[k], cols[k]]``, O(m) each (paper Eq. 5).

        Parameters
        ----------
        rows, cols : integer arrays of the same shape
            Indices in ``[0, d)``, in the operator's namespace and device.

        Returns
        -------
        array
            The entries, with the shape of ``rows`` and the operator's dtype.
            Entries that couple two different blocks are zero.
        """
        xp = self._xp
        r, c = self._check_indices(rows, "rows"), self._check_indices(cols, "cols")
        if r.shape != c.shape:
            raise ValueError(f"rows and cols must have the same shape, got {tuple(r.shape)} and "
                             f"{tuple(c.shape)}")
        shape = r.shape
        r, c = xp.reshape(r, (-1,)), xp.reshape(c, (-1,))
        B = self.block_size
        out = xp.zeros(r.shape, dtype=self.dtype, device=self.device)
        for group, inv in zip(self._groups, self._factors, strict=True):
            inside = (r // B == c // B) & (r >= group.start) & (r < group.end)
            rr = xp.clip(r, group.start, group.end - 1) - group.start
            cc = xp.clip(c, group.start, group.end - 1) - group.start
            if group.dense:
                s = group.size
                flat = (rr // s) * (s * s) + (rr % s) * s + (cc % s)
                vals = xp.take(xp.reshape(inv, (-1,)), flat)
            else:
                Wg = self._W[:, group.start:group.end]
                Wr = xp.astype(xp.take(Wg, rr, axis=1), xp.float64)
                Wc = xp.astype(xp.take(Wg, cc, axis=1), xp.float64)
                delta = xp.astype(rr == cc, xp.float64)
                vals = xp.astype((delta - xp.sum(Wr * Wc, axis=0)) / self.damp, self.dtype)
            out = xp.where(inside, vals, out)
        return xp.reshape(out, shape)

    def _check_indices(self, idx: Any, name: str) -> Any:
        xp = self._xp
        xp_i = namespace_of(idx, name)
        if xp_i is not xp or device(idx) != self.device:
            raise TypeError(f"{name} must be an integer array of the operator's library and "
                            f"device ({self!r})")
        if not xp.isdtype(idx.dtype, "integral"):
            raise TypeError(f"{name} must have an integer dtype, got {idx.dtype}")
        if size(idx):
            lo, hi = int(xp.min(idx)), int(xp.max(idx))
            if lo < 0 or hi >= self.dim:
                raise IndexError(f"{name} holds an index out of range [0, {self.dim}): "
                                 f"{lo if lo < 0 else hi}")
        return idx


class EmpiricalFisher(_BlockOperatorBase):
    """The damped empirical Fisher ``F = damp * I + G.T @ G / m`` as an operator.

    Useful as the forward operator in solvers and tests; with ``block_size``
    it is the block-diagonal F that :class:`StaticIHVP` inverts. G is kept by
    reference, not copied.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda > 0``.
    block_size : int, optional
        Block-diagonal F over consecutive blocks of this many coordinates.
    check_finite : bool, optional
        Check G and each input for NaN and infinity (default ``True``).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import EmpiricalFisher, StaticIHVP
    >>> G = np.random.default_rng(1).standard_normal((4, 30))
    >>> F, Finv = EmpiricalFisher(G, damp=0.1), StaticIHVP(G, damp=0.1)
    >>> x = np.ones(30)
    >>> bool(np.allclose(F @ (Finv @ x), x))
    True
    """

    def __init__(self, G: Any, /, *, damp: float, block_size: int | None = None,
                 check_finite: bool = True) -> None:
        self._init_layout(G, damp, block_size, check_finite)
        # Every block uses the low-rank form here: applying F needs no inverse.
        self._groups = tuple(BlockGroup(g.start, g.count, g.size, False) for g in
                             _blocks.block_groups(self.dim, self.block_size, self.num_grads))
        self._G = G

    def _matmat(self, X: Any) -> Any:
        return self._groups_matmat(X, lambda g, X: _blocks.lowrank_apply(
            self._xp, self._G, X, g, self.damp, 1.0 / self.num_grads))

    def diagonal(self) -> Any:
        """The diagonal ``damp + sum_i G_ij^2 / m`` (shape ``(d,)``)."""
        xp = self._xp
        return self.damp + xp.sum(self._G * self._G, axis=0) / self.num_grads
