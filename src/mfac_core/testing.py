"""Oracles, assertions and Hypothesis strategies for testing M-FAC operators.

Everything here works in NumPy float64 and is meant for tests, not for speed:

- :func:`to_numpy` brings an array of any supported library to the host.
- :func:`empirical_fisher_dense`, :func:`dense_inverse` and
  :func:`condition_number` build the damped empirical Fisher
  ``F = damp I + G^T G / m`` (optionally block-diagonal), its inverse and its
  exact condition number.
- :class:`SpectralOracle` applies ``F^{-1}`` from the eigen-decomposition of
  each block's small ``m x m`` Gram matrix; at a large condition number it
  stays accurate for generic vectors, where a dense float64 solve with ``F``
  loses ``log10(kappa)`` digits.
- :func:`extended_precision_inverse` applies ``F^{-1}`` by Woodbury's identity in
  ``numpy.longdouble``: a reference for vectors near the gradients' span, where
  every float64 computation loses digits to cancellation.
- :func:`paper_static` and :func:`paper_dynamic` are literal, loop-by-loop
  transcriptions of the paper's static (Eqs. 3-5) and dynamic (Eqs. 8-13)
  algorithms.
- :func:`assert_close` compares results with a tolerance scaled by the
  condition number and the precision of the result.
- :class:`ThreadComm` and :func:`run_spmd_threads` run a column-sharded (SPMD)
  computation on several threads of one process, each a rank, for tests of
  :mod:`mfac_core.distributed` code without starting processes.
- :func:`problems` is a Hypothesis strategy drawing gradients, damping,
  vectors and block sizes, including the hard cases (vectors in the span of
  the gradients, duplicated gradients, ``d < m``, ``m = 1``, ``d = 1``, tiny
  and huge damping, ragged blocks).

The paper is Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free
Approximations of Second-Order Information", NeurIPS 2021.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._compat import (
    array_namespace,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_torch_namespace,
)

__all__ = [
    "DEFAULT_FACTOR",
    "DEFAULT_FACTOR_HALF",
    "PaperDynamic",
    "PaperStatic",
    "Problem",
    "SpectralOracle",
    "ThreadComm",
    "assert_close",
    "condition_number",
    "dense_inverse",
    "empirical_fisher_dense",
    "extended_precision_inverse",
    "paper_dynamic",
    "paper_static",
    "problems",
    "run_spmd_threads",
    "to_numpy",
]

#: Default constant of :func:`assert_close` for float32 and float64 (see its Notes).
DEFAULT_FACTOR = 100.0

#: Default constant of :func:`assert_close` for float16 and bfloat16 (see its Notes).
DEFAULT_FACTOR_HALF = 10.0

#: Machine epsilons of the floating dtypes by name (``bfloat16`` is not in NumPy).
_EPS = {
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
    "float32": float(np.finfo(np.float32).eps),
    "float64": float(np.finfo(np.float64).eps),
}


# -- conversion ---------------------------------------------------------------------------


def to_numpy(x: Any) -> np.ndarray:
    """An array of any supported library as a NumPy array on the host.

    For tests only: it moves data off devices and out of other libraries,
    which the operators themselves never do. NumPy floating arrays are
    returned as they are (no copy); other libraries' arrays are copied.

    Parameters
    ----------
    x : array or scalar
        A NumPy, PyTorch, CuPy, JAX or array-api-strict array (on any of
        its devices), or anything :func:`numpy.asarray` accepts.

    Returns
    -------
    numpy.ndarray
        Real floating arrays keep their precision (``float16`` and
        ``bfloat16`` become ``float32``); integer and boolean arrays become
        ``float64``.
    """
    if isinstance(x, np.ndarray | np.generic | float | int | list | tuple):
        out = np.asarray(x)
    else:
        try:
            xp = array_namespace(x)
        except TypeError:
            xp = None
        if xp is not None and is_torch_namespace(xp):
            t = x.detach().cpu()
            if t.dtype.is_floating_point and t.element_size() < 4:
                t = t.float()
            out = t.numpy()
        elif xp is not None and is_cupy_namespace(xp):
            out = x.get()
        elif xp is not None and is_array_api_strict_namespace(xp):
            import array_api_strict

            out = np.asarray(x.to_device(array_api_strict.Device("CPU_DEVICE")))
        else:  # NumPy, JAX and anything with __array__ or the buffer protocol
            out = np.asarray(x)
    if out.dtype == np.float16:
        out = out.astype(np.float32)
    elif not np.issubdtype(out.dtype, np.inexact):
        out = out.astype(np.float64)
    return out


def _as_grads(G: Any) -> np.ndarray:
    G = np.asarray(to_numpy(G), dtype=np.float64)
    if G.ndim != 2 or G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(f"G must be a non-empty 2-D array (m, d), got shape {G.shape}")
    return G


def _blocks(d: int, block_size: int | None) -> Iterator[slice]:
    """Consecutive blocks of ``block_size`` coordinates; the last may be shorter."""
    b = d if block_size is None else int(block_size)
    if b < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    for start in range(0, d, b):
        yield slice(start, min(start + b, d))


# -- dense oracles -------------------------------------------------------------------------


def empirical_fisher_dense(G: Any, damp: float, *, block_size: int | None = None) -> np.ndarray:
    """The damped empirical Fisher ``F = damp I + G^T G / m`` as a dense float64 matrix.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda``.
    block_size : int, optional
        Keep only the diagonal blocks of this many consecutive coordinates
        (the last block may be shorter); ``None`` keeps the full matrix.

    Returns
    -------
    numpy.ndarray, shape (d, d)
        ``F`` in float64, zero outside the diagonal blocks.

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array, or ``block_size < 1``.
    """
    G = _as_grads(G)
    m, d = G.shape
    F = np.zeros((d, d))
    for s in _blocks(d, block_size):
        Gb = G[:, s]
        F[s, s] = Gb.T @ Gb / m
    F[np.diag_indices(d)] += float(damp)
    return F


def dense_inverse(G: Any, damp: float, *, block_size: int | None = None) -> np.ndarray:
    """The dense float64 inverse of :func:`empirical_fisher_dense`, block by block.

    Accurate to about ``eps(float64) * kappa``; use :class:`SpectralOracle`
    when the condition number is large.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda``.
    block_size : int, optional
        Invert only the diagonal blocks of this many consecutive coordinates
        (the last block may be shorter); ``None`` inverts the full matrix.

    Returns
    -------
    numpy.ndarray, shape (d, d)
        ``F^{-1}`` in float64, symmetrised block by block and zero outside
        the diagonal blocks.

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array, or ``block_size < 1``.
    numpy.linalg.LinAlgError
        If a block of ``F`` is exactly singular in float64, as it can be
        for ``damp <= 0``.
    """
    F = empirical_fisher_dense(G, damp, block_size=block_size)
    out = np.zeros_like(F)
    for s in _blocks(F.shape[0], block_size):
        Fb = F[s, s]
        inv = np.linalg.solve(Fb, np.eye(Fb.shape[0]))
        out[s, s] = (inv + inv.T) / 2
    return out


def extended_precision_inverse(G: Any, damp: float, x: Any) -> np.ndarray:
    """Apply ``F^{-1}`` to ``x`` in extended precision, for an error reference.

    Woodbury's identity with the ``m x m`` capacitance matrix solved by Gaussian
    elimination (it is symmetric positive definite), all in ``numpy.longdouble``
    (80-bit extended precision on x86-64, about 3 more digits than float64; on
    platforms where ``longdouble`` is float64 it is no better than float64).
    Costs O(m^2 d + m^3) in Python-speed arithmetic: for small problems.

    Parameters
    ----------
    G : array_like, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda > 0``.
    x : array_like, shape (d,)
        The vector.

    Returns
    -------
    numpy.ndarray, shape (d,)
        ``F^{-1} x`` rounded to float64.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.testing import dense_inverse, extended_precision_inverse
    >>> G = np.random.default_rng(0).standard_normal((3, 8))
    >>> x = np.ones(8)
    >>> bool(np.allclose(extended_precision_inverse(G, 0.5, x), dense_inverse(G, 0.5) @ x))
    True
    """
    LD = np.longdouble
    Gl = _as_grads(G).astype(LD)
    xl = np.asarray(to_numpy(x), dtype=LD)
    m = Gl.shape[0]
    C = np.einsum("ik,jk->ij", Gl, Gl) + m * LD(damp) * np.eye(m, dtype=LD)
    b = Gl @ xl
    for k in range(m):
        f = C[k + 1 :, k] / C[k, k]
        C[k + 1 :, k:] -= f[:, None] * C[k, k:]
        b[k + 1 :] -= f * b[k]
    z = np.zeros(m, dtype=LD)
    for k in range(m - 1, -1, -1):
        z[k] = (b[k] - C[k, k + 1 :] @ z[k + 1 :]) / C[k, k]
    return np.asarray((xl - Gl.T @ z) / LD(damp), dtype=np.float64)


def condition_number(G: Any, damp: float, *, block_size: int | None = None) -> float:
    """The exact 2-norm condition number of F (the largest over its blocks), in float64.

    With blocks this is the largest condition number of a diagonal block, not
    ``cond(F)`` of the assembled block-diagonal matrix (which can be larger):
    the rounding errors of each block's product scale with its own condition
    number, so this is the scale of the normwise error.

    For a block with a null space (more coordinates than gradients, or
    rank-deficient gradients) this is ``1 + lambda_max(G_b G_b^T) / (m damp)``,
    the scale of the rounding errors of the M-FAC products. A block of
    ``B <= m`` coordinates whose gradients have full column rank is better
    conditioned: ``(damp + mu_max / m) / (damp + mu_min / m)`` with ``mu`` the
    eigenvalues of ``G_b^T G_b``; that is what is returned for it.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda > 0``.
    block_size : int, optional
        Consider the diagonal blocks of this many consecutive coordinates
        (the last block may be shorter); ``None`` takes the full matrix.

    Returns
    -------
    float
        The condition number, at least 1: the largest over the blocks.

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array, or ``block_size < 1``.
    """
    G = _as_grads(G)
    m, d = G.shape
    lam = float(damp)
    kappa = 1.0
    for s in _blocks(d, block_size):
        Gb = G[:, s]
        if Gb.shape[1] <= m:
            mu = np.linalg.eigvalsh(Gb.T @ Gb)
            lo, hi = max(float(mu[0]), 0.0), max(float(mu[-1]), 0.0)
        else:
            lo, hi = 0.0, max(float(np.linalg.eigvalsh(Gb @ Gb.T)[-1]), 0.0)
        kappa = max(kappa, (lam + hi / m) / (lam + lo / m))
    return kappa


@dataclass(frozen=True)
class _SpectralBlock:
    sl: slice
    V: np.ndarray  # (size, r), orthonormal columns
    coef: np.ndarray  # (r,), the eigenvalues of F_b^{-1} on span(V)
    projector: bool  # whether F_b^{-1} also has the eigenvalue 1/damp on span(V)^perp


class SpectralOracle:
    r"""``F^{-1}`` in float64 from the eigen-decomposition of each block's Gram matrix.

    For a block of ``B > m`` coordinates, ``G_b G_b^T = U diag(sigma) U^T``
    (``m x m``, ``eigh``); with ``V = G_b^T U diag(sigma)^{-1/2}``
    (eigenvalues at most ``max(m, B) * eps * sigma_max`` are dropped: they
    lie in the null space of ``G_b`` to working precision),

    .. math::

        F_b^{-1} = \lambda^{-1} (I - V V^T)
                   + V \,\mathrm{diag}\big(1 / (\lambda + \sigma/m)\big)\, V^T ,

    a form without cancellation between the two terms' coefficients. Its
    relative error is a small multiple of ``eps(float64) * kappa``,
    whatever the damping, unlike a dense solve with F. A block of
    ``B <= m`` coordinates may have no null space, and then the projector
    ``I - V V^T`` would only add rounding errors of size ``eps / lambda``;
    such a block uses ``F_b = Q diag(f) Q^T`` (``eigh`` of the ``B x B``
    block) and ``F_b^{-1} = Q diag(1/f) Q^T``, accurate to
    ``eps(float64) * cond(F_b)``.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row (converted to NumPy float64).
    damp : float
        The damping ``lambda > 0``.
    block_size : int, optional
        Block-diagonal F over consecutive blocks of this many coordinates.

    Attributes
    ----------
    shape : tuple
        ``(d, d)``.
    kappa : float
        The exact 2-norm condition number of F, the largest over the blocks
        (:func:`condition_number`).
    damp, num_grads, dim, block_size
        lambda, m, d and the block size (``d`` for the full matrix).

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array, ``damp`` is not finite and
        positive, or ``block_size < 1``.
    """

    def __init__(self, G: Any, damp: float, *, block_size: int | None = None) -> None:
        G = _as_grads(G)
        m, d = G.shape
        lam = float(damp)
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"damp must be finite and > 0, got {damp!r}")
        self.damp, self.num_grads, self.dim = lam, m, d
        self.block_size = d if block_size is None else min(int(block_size), d)
        self.shape = (d, d)
        eps = float(np.finfo(np.float64).eps)
        self._blocks: list[_SpectralBlock] = []
        kappa = 1.0
        for s in _blocks(d, block_size):
            Gb = G[:, s]
            size = Gb.shape[1]
            if size <= m:
                Fb = Gb.T @ Gb / m
                Fb[np.diag_indices(size)] += lam
                f, Q = np.linalg.eigh(Fb)
                kappa = max(kappa, float(f[-1] / f[0]))
                self._blocks.append(_SpectralBlock(s, Q, 1.0 / f, False))
                continue
            sigma, U = np.linalg.eigh(Gb @ Gb.T)
            smax = max(float(sigma[-1]), 0.0)
            kappa = max(kappa, 1.0 + smax / (m * lam))
            keep = sigma > max(m, size) * eps * smax
            sigma, U = sigma[keep], U[:, keep]
            V = (Gb.T @ U) / np.sqrt(sigma)
            self._blocks.append(_SpectralBlock(s, V, 1.0 / (lam + sigma / m), True))
        self.kappa = kappa

    def matmat(self, X: Any) -> np.ndarray:
        """Apply ``F^{-1}`` to the columns of a matrix.

        Parameters
        ----------
        X : array, shape (d, k)
            Of any supported library (converted to NumPy float64).

        Returns
        -------
        numpy.ndarray, shape (d, k)
            ``F^{-1} X`` in float64.

        Raises
        ------
        ValueError
            If ``X`` does not have shape ``(d, k)``.
        """
        X = np.asarray(to_numpy(X), dtype=np.float64)
        if X.ndim != 2 or X.shape[0] != self.dim:
            raise ValueError(f"X must have shape ({self.dim}, k), got {X.shape}")
        out = np.empty_like(X)
        for b in self._blocks:
            Xb = X[b.sl]
            P = b.V.T @ Xb
            out[b.sl] = b.V @ (b.coef[:, None] * P)
            if b.projector:
                out[b.sl] += (Xb - b.V @ P) / self.damp
        return out

    def matvec(self, x: Any) -> np.ndarray:
        """Apply ``F^{-1}`` to a vector.

        Parameters
        ----------
        x : array, shape (d,) or (d, 1)
            Of any supported library (converted to NumPy float64).

        Returns
        -------
        numpy.ndarray, shape (d,) or (d, 1)
            ``F^{-1} x`` in float64, in the shape of ``x``.

        Raises
        ------
        ValueError
            If ``x`` has another shape.
        """
        x = np.asarray(to_numpy(x), dtype=np.float64)
        if x.ndim == 2 and x.shape[1] == 1:
            return self.matmat(x)
        if x.ndim != 1:
            raise ValueError(f"x must have shape ({self.dim},), got {x.shape}")
        return self.matmat(x[:, None])[:, 0]

    def diagonal(self) -> np.ndarray:
        """Return the diagonal of ``F^{-1}``.

        Returns
        -------
        numpy.ndarray, shape (d,)
            The diagonal entries ``[F^{-1}]_{jj}`` in float64.
        """
        out = np.empty(self.dim)
        for b in self._blocks:
            V2 = b.V * b.V
            out[b.sl] = V2 @ b.coef
            if b.projector:
                out[b.sl] += (1.0 - V2.sum(axis=1)) / self.damp
        return out

    def entries(self, rows: Any, cols: Any) -> np.ndarray:
        """Return selected entries ``[F^{-1}][rows[k], cols[k]]``.

        Parameters
        ----------
        rows, cols : array of int
            Row and column indices in ``[0, d)``, of the same shape, of any
            supported library.

        Returns
        -------
        numpy.ndarray
            The entries in float64, in the shape of ``rows``; entries that
            couple two different blocks are zero.

        Raises
        ------
        ValueError
            If ``rows`` and ``cols`` have different shapes.
        IndexError
            For an index outside ``[0, d)``.
        """
        r = np.asarray(to_numpy(rows)).astype(np.int64)
        c = np.asarray(to_numpy(cols)).astype(np.int64)
        if r.shape != c.shape:
            raise ValueError(f"rows and cols must have the same shape, got {r.shape}, {c.shape}")
        out = np.zeros(r.shape)
        B = self.block_size
        for idx in np.ndindex(r.shape):
            i, j = int(r[idx]), int(c[idx])
            if not (0 <= i < self.dim and 0 <= j < self.dim):
                raise IndexError(
                    f"index ({i}, {j}) out of range for a {self.dim} x {self.dim} matrix"
                )
            if i // B != j // B:
                continue
            b = self._blocks[i // B]
            vi, vj = b.V[i - b.sl.start], b.V[j - b.sl.start]
            out[idx] = (vi * vj) @ b.coef
            if b.projector:
                out[idx] += (float(i == j) - vi @ vj) / self.damp
        return out

    def todense(self) -> np.ndarray:
        """Build the dense inverse.

        Returns
        -------
        numpy.ndarray, shape (d, d)
            ``F^{-1}`` in float64, zero outside the diagonal blocks.
        """
        out = np.zeros(self.shape)
        for b in self._blocks:
            n = b.sl.stop - b.sl.start
            out[b.sl, b.sl] = (b.V * b.coef) @ b.V.T
            if b.projector:
                out[b.sl, b.sl] += (np.eye(n) - b.V @ b.V.T) / self.damp
        return out

    def __repr__(self) -> str:
        return (
            f"<SpectralOracle d={self.dim} m={self.num_grads} damp={self.damp:g} "
            f"block_size={self.block_size} kappa={self.kappa:.3g}>"
        )


# -- literal transcriptions of the paper ---------------------------------------------------


class PaperStatic:
    """The paper's static algorithm (Eqs. 3-5); built by :func:`paper_static`.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients ``g_i`` in the rows (converted to NumPy float64).
    damp : float
        The damping ``lambda``.

    Attributes
    ----------
    v : numpy.ndarray, shape (m, d)
        ``v_i = F_{i-1}^{-1} g_i`` (row i).
    q : numpy.ndarray, shape (m,)
        ``q_i = m + g_i^T v_i``.

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array.
    """

    def __init__(self, G: Any, damp: float) -> None:
        G = _as_grads(G)
        m, d = G.shape
        self.damp, self.num_grads, self.dim = float(damp), m, d
        self.v = np.zeros((m, d))
        self.q = np.zeros(m)
        # v_i = F_{i-1}^{-1} g_i, evaluated with Eq. (4) over the v_j, q_j for j < i.
        for i in range(m):
            g = G[i]
            self.v[i] = self._apply(g, upto=i)
            self.q[i] = m + g @ self.v[i]

    def _apply(self, x: np.ndarray, upto: int) -> np.ndarray:
        # Eq. (4): F_i^{-1} x = x / lambda - sum_{j <= i} v_j (v_j^T x) / q_j.
        out = x / self.damp
        for j in range(upto):
            out = out - self.v[j] * ((self.v[j] @ x) / self.q[j])
        return out

    def matvec(self, x: Any) -> np.ndarray:
        """Apply ``F_m^{-1}`` to a vector by Eq. (4).

        Parameters
        ----------
        x : array, shape (d,)
            Of any supported library (converted to NumPy float64).

        Returns
        -------
        numpy.ndarray, shape (d,)
            ``F_m^{-1} x`` in float64.
        """
        x = np.asarray(to_numpy(x), dtype=np.float64)
        return self._apply(x, upto=self.num_grads)

    def entry(self, i: int, j: int) -> float:
        """Return one entry of ``F_m^{-1}`` in O(m) by Eq. (5).

        Parameters
        ----------
        i, j : int
            The row and the column, in ``[0, d)``.

        Returns
        -------
        float
            ``[F_m^{-1}]_{ij}``.
        """
        total = (1.0 if i == j else 0.0) / self.damp
        for k in range(self.num_grads):
            total -= self.v[k, i] * self.v[k, j] / self.q[k]
        return total

    def diagonal(self) -> np.ndarray:
        """Return the diagonal of ``F_m^{-1}``, one Eq. (5) per entry.

        Returns
        -------
        numpy.ndarray, shape (d,)
            The diagonal entries ``[F_m^{-1}]_{jj}`` in float64.
        """
        return np.array([self.entry(j, j) for j in range(self.dim)])


def paper_static(G: Any, damp: float) -> PaperStatic:
    """A literal transcription of the paper's static algorithm, Eqs. (3)-(5).

    Precomputes ``v_i = F_{i-1}^{-1} g_i`` in increasing ``i`` with plain
    Python loops and ``q_i = m + g_i^T v_i``, where
    ``F_i = damp I + (1/m) sum_{j <= i} g_j g_j^T``. An oracle for small
    problems; speed is irrelevant.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients ``g_i`` in the rows (converted to NumPy float64).
    damp : float
        The damping ``lambda``.

    Returns
    -------
    PaperStatic
        With ``matvec(x)`` (Eq. 4), ``entry(i, j)`` (Eq. 5) and ``diagonal()``.
    """
    return PaperStatic(G, damp)


class PaperDynamic:
    """The paper's dynamic algorithm (Eqs. 8-13); built by :func:`paper_dynamic`.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients in the rows (converted to NumPy float64).
    damp : float
        The damping ``lambda``.

    Attributes
    ----------
    GG : numpy.ndarray, shape (m, m)
        The Gram matrix ``G G^T``.
    D : numpy.ndarray, shape (m, m)
        Upper triangular, ``D_ij = g_i^T F_{i-1}^{-1} g_j`` for ``i <= j``.
    B : numpy.ndarray, shape (m, m)
        Lower triangular with ``1/lambda`` on the diagonal; row ``i`` holds the
        coefficients of ``F_{i-1}^{-1} g_i`` in the gradients (Eq. 7).

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array.
    """

    def __init__(self, G: Any, damp: float) -> None:
        G = _as_grads(G)
        m, d = G.shape
        lam = float(damp)
        self.G, self.damp, self.num_grads, self.dim = G, lam, m, d
        self.GG = np.zeros((m, m))
        for i in range(m):
            for j in range(m):
                self.GG[i, j] = G[i] @ G[j]
        # Eqs. (8)-(9): P[j, k] = g_j^T F_i^{-1} g_k, starting at F_0^{-1} = I / lambda;
        # row i of D is row i of P before step i removes gradient i.
        P = self.GG / lam
        self.D = np.zeros((m, m))
        for i in range(m):
            for j in range(i, m):
                self.D[i, j] = P[i, j]
            Pn = P.copy()
            for j in range(m):
                for k in range(m):
                    Pn[j, k] = P[j, k] - P[j, i] * P[i, k] / (m + P[i, i])
            P = Pn
        # Eq. (10): B_ii = 1 / lambda, B_ij = -sum_{k=j}^{i-1} D_ki / (m + D_kk) B_kj.
        self.B = np.zeros((m, m))
        for i in range(m):
            self.B[i, i] = 1.0 / lam
            for j in range(i):
                total = 0.0
                for k in range(j, i):
                    total += self.D[k, i] / (m + self.D[k, k]) * self.B[k, j]
                self.B[i, j] = -total

    def matvec(self, x: Any) -> np.ndarray:
        """Apply ``F_m^{-1}`` to a vector by Eqs. (11)-(13).

        Parameters
        ----------
        x : array, shape (d,)
            Of any supported library (converted to NumPy float64).

        Returns
        -------
        numpy.ndarray, shape (d,)
            ``F_m^{-1} x`` in float64.
        """
        x = np.asarray(to_numpy(x), dtype=np.float64)
        m, lam, G = self.num_grads, self.damp, self.G
        p = np.array([G[j] @ x for j in range(m)])
        # Eq. (11): s[j] = g_j^T F_0^{-1} x = p_j / lambda, then Eq. (12) step by step.
        s = p / lam
        q = np.zeros(m)
        for i in range(m):
            q[i] = s[i] / (m + self.D[i, i])
            sn = s.copy()
            for j in range(i + 1, m):
                sn[j] = s[j] - self.D[i, j] / (m + self.D[i, i]) * s[i]
            s = sn
        # Eq. (13): F_m^{-1} x = x / lambda - sum_j (sum_{k >= j} q_k B_kj) g_j.
        out = x / lam
        for j in range(m):
            c = 0.0
            for k in range(j, m):
                c += q[k] * self.B[k, j]
            out = out - c * G[j]
        return out


def paper_dynamic(G: Any, damp: float) -> PaperDynamic:
    """A literal transcription of the paper's dynamic algorithm, Eqs. (8)-(13).

    Computes ``G G^T``, then ``D`` (upper triangular) by the recursion
    (8)-(9) and ``B`` (lower triangular) by (10); ``matvec`` evaluates
    ``p = G x``, the recursion (11)-(12) for the ``q_i`` and finally (13).
    The ``m`` in the denominators is the number of gradients
    (``F = damp I + G^T G / m``). Plain Python loops, for small problems.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients in the rows (converted to NumPy float64).
    damp : float
        The damping ``lambda``.

    Returns
    -------
    PaperDynamic
        With attributes ``GG``, ``D``, ``B`` and method ``matvec(x)``.
    """
    return PaperDynamic(G, damp)


# -- assertions ------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    """The name of a real floating dtype of any library (or of a dtype name)."""
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            npdt = np.dtype(dtype)
        except TypeError:
            npdt = None
        name = npdt.name if npdt is not None else str(dtype).rsplit(".", 1)[-1]
    if name not in _EPS:
        raise TypeError(f"assert_close needs a real floating dtype, got {dtype!r}")
    return name


def _norm(v: np.ndarray) -> float:
    """The 2-norm of the flattened ``v``, scaled so that it neither under- nor overflows."""
    scale = float(np.max(np.abs(v))) if v.size else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        return scale
    return scale * float(np.linalg.norm((v / scale).ravel()))


def assert_close(
    actual: Any,
    desired: Any,
    *,
    kappa: float = 1.0,
    dtype: Any = None,
    factor: float | None = None,
    atol: float = 0.0,
    err_msg: str = "",
) -> None:
    r"""Assert a normwise, condition-aware closeness of two arrays.

    Passes when the shapes are equal and

    .. math::

        \|a - d\|_2 \le \mathrm{factor} \cdot \varepsilon(\mathrm{dtype})
        \cdot \kappa \cdot \|d\|_2 + \mathrm{atol},

    with the 2-norm of the flattened arrays (the Frobenius norm of matrices),
    computed in float64 on the host.

    Parameters
    ----------
    actual : array
        The result under test, of any supported library and device.
    desired : array
        The reference (often a NumPy float64 oracle).
    kappa : float, optional
        The condition number of the problem (for ``F`` or ``F^{-1}``:
        :func:`condition_number`). The default 1 suits well-conditioned
        comparisons.
    dtype : dtype or str, optional
        The precision that decides ``eps``; defaults to ``actual``'s dtype.
    factor : float, optional
        The constant in front of ``eps * kappa``; default
        :data:`DEFAULT_FACTOR` (100) for float32 and float64 and
        :data:`DEFAULT_FACTOR_HALF` (10) for float16 and bfloat16, see Notes.
    atol : float, optional
        An absolute slack, for results whose reference is (near) zero.
    err_msg : str, optional
        Prepended to the message of the ``AssertionError``.

    Raises
    ------
    AssertionError
        On different shapes, non-finite values in ``actual`` or an error
        above the tolerance; the message gives the relative error, the
        tolerance, ``kappa`` and the dtype.

    Notes
    -----
    The products of the M-FAC operators make an unavoidable relative error
    of ``c * eps * kappa`` (``kappa = 1 + ||G||_2^2 / (m damp)``): the O(dm)
    passes ``G x`` and ``G^T c`` run in the storage precision, and an error
    of ``eps * ||x|| / damp`` in ``F^{-1} x`` is ``eps * kappa`` relative to
    a result that may be as small as ``||x|| / (damp kappa)``. The constant
    ``c`` collects the rounding of length-``d`` and length-``m`` inner
    products and of the float64 m x m work; rounding errors of dot
    products grow like ``sqrt(n) eps`` in practice (``n eps`` only in the
    worst case), and for the test sizes used here (``d <= 64``,
    ``m <= 16``) the measured ratio error / (eps kappa) stays below about
    10. The default ``factor = 100`` leaves a margin of 10 for other
    libraries' summation orders and for the float64 oracle's own error
    (also a small multiple of ``eps(float64) kappa``) while staying tight:
    in float64 a relative error above ``2.2e-14 * kappa`` fails, so a
    wrong damping or a missing ``1/m`` fails unless its effect is below the
    precision of the dtype. Pass a larger ``factor`` (with a comment
    saying why) for large dimensions.

    For float16 and bfloat16 the default is 10: ``100 * eps`` would be 10%
    and 78% there, too loose to catch anything, while with float32
    accumulation the error is dominated by a few roundings to the storage
    precision (of the inputs and of the result).
    """
    a = to_numpy(actual)
    desired_np = np.asarray(to_numpy(desired), dtype=np.float64)
    if dtype is None:
        dtype = getattr(actual, "dtype", a.dtype)
    name = _dtype_name(dtype)
    eps = _EPS[name]
    if factor is None:
        factor = DEFAULT_FACTOR_HALF if name in ("float16", "bfloat16") else DEFAULT_FACTOR
    factor = float(factor)
    prefix = f"{err_msg}\n" if err_msg else ""
    if a.shape != desired_np.shape:
        raise AssertionError(f"{prefix}shapes differ: actual {a.shape}, desired {desired_np.shape}")
    if not np.all(np.isfinite(desired_np)):
        raise AssertionError(f"{prefix}desired holds NaN or infinity")
    a64 = a.astype(np.float64)
    if not np.all(np.isfinite(a64)):
        raise AssertionError(
            f"{prefix}actual holds NaN or infinity "
            f"({int(np.sum(~np.isfinite(a64)))} of {a64.size} entries)"
        )
    err = _norm(a64 - desired_np)
    ref = _norm(desired_np)
    tol = factor * eps * float(kappa) * ref + float(atol)
    if not err <= tol:
        rel = err / ref if ref > 0 else math.inf
        raise AssertionError(
            f"{prefix}not close: ||actual - desired|| = {err:.3e}, relative error {rel:.3e}, "
            f"tolerance {tol:.3e} (= {factor:g} * eps {eps:.3g} * kappa {float(kappa):.3g} * "
            f"||desired|| {ref:.3e} + atol {float(atol):.3g}); dtype {dtype}, shape {a.shape}; "
            f"error / (eps kappa ||desired||) = "
            f"{err / (eps * float(kappa) * ref) if ref > 0 else math.inf:.3g}"
        )


# -- Hypothesis strategies -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Problem:
    """One drawn test problem: gradients, damping, a vector and a block size.

    ``G`` and ``x`` are NumPy float64 arrays; when the problem was drawn for
    float32 their values are exactly representable in float32, so that the
    float64 oracles see exactly the data the operator under test sees.

    Attributes
    ----------
    G : numpy.ndarray, shape (m, d)
        The gradients, one per row (read-only).
    damp : float
        The damping ``lambda > 0``.
    x : numpy.ndarray, shape (d,)
        The vector to apply ``F^{-1}`` to (read-only).
    block_size : int or None
        The block size of a block-diagonal F, or ``None`` for the full one.
    description : str
        How the problem was drawn (kinds, sizes, condition number).
    """

    G: np.ndarray
    damp: float
    x: np.ndarray
    block_size: int | None
    description: str

    @property
    def m(self) -> int:  # numpydoc ignore=RT01
        """The number of gradients."""
        return int(self.G.shape[0])

    @property
    def d(self) -> int:  # numpydoc ignore=RT01
        """The dimension."""
        return int(self.G.shape[1])

    @property
    def kappa(self) -> float:  # numpydoc ignore=RT01
        """The exact condition number of (block-diagonal) F."""
        return condition_number(self.G, self.damp, block_size=self.block_size)

    def oracle(self) -> SpectralOracle:
        """Build the :class:`SpectralOracle` of this problem.

        Returns
        -------
        SpectralOracle
            ``F^{-1}`` for this problem's ``G``, ``damp`` and ``block_size``.
        """
        return SpectralOracle(self.G, self.damp, block_size=self.block_size)

    def as_arrays(self, xp: Any, dtype: Any, device: Any = None) -> tuple[Any, Any]:
        """Fresh copies of ``G`` and ``x`` in namespace ``xp`` with ``dtype`` on ``device``.

        Parameters
        ----------
        xp : module
            An Array-API namespace (e.g. from ``array_api_compat.array_namespace``).
        dtype : dtype or str
            A dtype of ``xp`` or its name (``"float32"``, ``"float64"``).
        device : object, optional
            A device of ``xp``; ``None`` uses its default.

        Returns
        -------
        G : array, shape (m, d)
            A copy of ``G`` in ``xp``, with ``dtype``, on ``device``.
        x : array, shape (d,)
            A copy of ``x`` in ``xp``, with ``dtype``, on ``device``.
        """
        if isinstance(dtype, str):
            dtype = getattr(xp, dtype)
        kw = {} if device is None else {"device": device}
        return (
            xp.asarray(self.G, dtype=dtype, copy=True, **kw),
            xp.asarray(self.x, dtype=dtype, copy=True, **kw),
        )

    def __repr__(self) -> str:
        return f"Problem({self.description})"


_G_KINDS = ("gaussian", "low-rank", "duplicated", "identical", "scaled")
_X_KINDS = ("random", "span", "gradient", "zero")


def _hypothesis() -> Any:
    try:
        import hypothesis.strategies as st
    except ImportError:  # pragma: no cover - exercised only without hypothesis
        raise ImportError(
            "mfac_core.testing.problems needs Hypothesis: "
            'pip install hypothesis (or pip install ".[test]" from the checkout)'
        ) from None
    return st


def problems(
    *,
    dtype: str = "float64",
    max_m: int = 8,
    max_d: int = 40,
    block_sizes: bool = True,
) -> Any:
    """A Hypothesis strategy of :class:`Problem` instances.

    Draws ``m`` in ``[1, max_m]`` and ``d`` in ``[1, max_d]`` (so ``d < m``,
    ``m = 1`` and ``d = 1`` occur); gradients that are Gaussian, low-rank,
    partly duplicated, all identical, or Gaussian with rows scaled over six
    orders of magnitude, at an overall scale between 1e-3 and 1e3; a
    damping set from a log-uniform target condition number
    ``kappa = 1 + ||G||_2^2 / (m damp)`` between ``1 + 1e-8`` (huge damping)
    and ``1e6`` for float64 or ``1e4`` for float32 (tiny damping), so that
    ``eps * kappa`` stays well below 1; a vector that is random, in the span
    of the gradients (``x = G^T a``), equal to a gradient, or zero; and a
    block size that is ``None`` or in ``[1, d + 2]`` (ragged blocks, and
    blocks both smaller and larger than ``m``).

    Parameters
    ----------
    dtype : {"float64", "float32"}, optional
        The precision the problem is for: it bounds the condition number,
        and for float32 the data are rounded to float32 values.
    max_m, max_d : int, optional
        Upper bounds of m and d.
    block_sizes : bool, optional
        Whether to draw block sizes; ``False`` always gives ``None``.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        A strategy whose examples are :class:`Problem` instances.

    Raises
    ------
    ValueError
        If ``dtype`` is neither ``"float32"`` nor ``"float64"``, or
        ``max_m`` or ``max_d`` is below 1.
    ImportError
        If Hypothesis is not installed.
    """
    st = _hypothesis()
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if max_m < 1 or max_d < 1:
        raise ValueError("max_m and max_d must be >= 1")
    log_kappa_max = 4.0 if dtype == "float32" else 6.0
    store = np.float32 if dtype == "float32" else np.float64

    @st.composite
    def draw_problem(draw: Any) -> Problem:
        m = draw(st.integers(1, max_m), label="m")
        d = draw(st.integers(1, max_d), label="d")
        g_kind = draw(st.sampled_from(_G_KINDS), label="G kind")
        x_kind = draw(st.sampled_from(_X_KINDS), label="x kind")
        seed = draw(st.integers(0, 2**32 - 1), label="seed")
        log_scale = draw(st.floats(-3.0, 3.0), label="log10 gradient scale")
        # log10(kappa - 1): from huge damping (kappa ~ 1) to tiny damping.
        log_km1 = draw(st.floats(-8.0, log_kappa_max), label="log10(kappa - 1)")
        block_size = None
        if block_sizes:
            block_size = draw(st.one_of(st.none(), st.integers(1, d + 2)), label="block_size")
        rng = np.random.default_rng(seed)

        G = rng.standard_normal((m, d))
        if g_kind == "low-rank":
            r = int(rng.integers(1, min(m, d) + 1))
            G = rng.standard_normal((m, r)) @ rng.standard_normal((r, d)) / math.sqrt(r)
        elif g_kind == "duplicated":
            src = rng.integers(0, m, size=m)
            src[0] = 0
            G = G[np.minimum(src, np.arange(m))]  # each row a copy of itself or an earlier one
        elif g_kind == "identical":
            G = np.repeat(G[:1], m, axis=0)
        elif g_kind == "scaled":
            G = G * 10.0 ** rng.uniform(-3.0, 3.0, size=(m, 1))
        G = (G * 10.0**log_scale).astype(store).astype(np.float64)
        if not np.any(G):  # float32 underflow cannot happen at these scales; stay safe
            G[0, 0] = 1.0

        top = float(np.linalg.eigvalsh(G @ G.T)[-1])
        damp = top / (m * 10.0**log_km1)

        if x_kind == "random":
            x = rng.standard_normal(d)
        elif x_kind == "span":
            x = G.T @ rng.standard_normal(m)
        elif x_kind == "gradient":
            x = G[int(rng.integers(0, m))].copy()
        else:
            x = np.zeros(d)
        x = x.astype(store).astype(np.float64)

        kappa = condition_number(G, damp, block_size=block_size)
        description = (
            f"m={m}, d={d}, G={g_kind}, x={x_kind}, block_size={block_size}, "
            f"damp={damp:.3g}, kappa={kappa:.3g}, seed={seed}"
        )
        G.setflags(write=False)
        x.setflags(write=False)
        return Problem(G=G, damp=damp, x=x, block_size=block_size, description=description)

    return draw_problem()


# -- SPMD on threads ------------------------------------------------------------------------


class _ThreadGroup:
    """What the ranks of one :func:`run_spmd_threads` call share: a barrier that breaks.

    Unlike :class:`threading.Barrier`, a rank released from a round returns even if
    another rank fails right after the release, so only ranks that wait for a rank
    that failed see :class:`threading.BrokenBarrierError`.
    """

    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self.parts: list[Any] = [None] * size
        self._cond = threading.Condition()
        self._waiting = 0
        self._round = 0
        self._failed = False

    def wait(self) -> None:
        with self._cond:
            if self._failed:
                raise threading.BrokenBarrierError
            this_round = self._round
            self._waiting += 1
            if self._waiting == self.size:
                self._waiting = 0
                self._round += 1
                self._cond.notify_all()
                return
            self._cond.wait_for(lambda: self._round != this_round or self._failed, self.timeout)
            if self._round != this_round:
                return
            self._failed = True
            self._cond.notify_all()
            raise threading.BrokenBarrierError

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()


class ThreadComm:
    """One rank of a group of threads: a :class:`~mfac_core.distributed.Communicator`.

    Made by :func:`run_spmd_threads`, one per thread. ``allreduce_sum`` waits for
    every rank (a barrier), then each rank adds the parts in rank order, so the
    sum is the same bits on every rank, as the protocol requires.

    Parameters
    ----------
    group : object
        The state the ranks share (internal).
    rank : int
        This thread's rank.

    Attributes
    ----------
    rank : int
        This thread's rank.
    size : int
        The number of threads in the group.
    num_calls : int
        The reductions this rank has completed.

    Notes
    -----
    A rank that raises breaks the group, so a rank still waiting in a
    reduction raises :class:`threading.BrokenBarrierError` instead of waiting
    forever: a test sees an error that is not collective as different
    exceptions on different ranks.
    """

    def __init__(self, group: _ThreadGroup, rank: int) -> None:
        self._group = group
        self.rank = rank
        self.size = group.size
        self.num_calls = 0

    def allreduce_sum(self, x: Any, /) -> Any:
        """The sum of every rank's ``x``, added in rank order.

        Parameters
        ----------
        x : array
            This rank's part.

        Returns
        -------
        array
            A new array with the sum, in ``x``'s namespace and device.
        """
        group = self._group
        group.parts[self.rank] = x
        group.wait()
        parts = list(group.parts)
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            group.fail()
            raise RuntimeError(f"ranks reduced arrays of different shapes: {sorted(shapes)}")
        xp = array_namespace(x)
        total = xp.asarray(parts[0], copy=True)
        for part in parts[1:]:
            total = total + part
        # Nobody may overwrite its part before every rank has read all of them.
        group.wait()
        self.num_calls += 1
        return total


def run_spmd_threads(
    fn: Callable[..., Any], size: int, /, *args: Any, timeout: float = 60.0
) -> list[Any]:
    """Run ``fn(comm, *args)`` on ``size`` threads, each a rank of one group.

    Parameters
    ----------
    fn : callable
        Called as ``fn(comm, *args)`` on every rank, with ``comm`` a
        :class:`ThreadComm`.
    size : int
        The number of ranks (threads), at least 1.
    *args
        Passed to ``fn`` on every rank.
    timeout : float, default 60.0
        Seconds a rank waits in a reduction for the others before the group is
        declared broken.

    Returns
    -------
    list
        Per rank, in rank order: what ``fn`` returned, or the exception it raised
        (returned, not raised, so that a test can check that every rank failed
        the same way).

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.testing import run_spmd_threads
    >>> run_spmd_threads(lambda comm: comm.allreduce_sum(np.array([comm.rank])), 3)
    [array([3]), array([3]), array([3])]
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    group = _ThreadGroup(size, timeout)
    results: list[Any] = [None] * size

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(group, rank), *args)
        except Exception as exc:  # reported to the caller per rank
            results[rank] = exc
            group.fail()

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
