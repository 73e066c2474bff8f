"""Literal, loop-by-loop transcriptions of the paper's algorithms, for :mod:`mfac_core.testing`.

:class:`PaperStatic` (Eqs. 3-5) and :class:`PaperDynamic` (Eqs. 8-13), built
by :func:`paper_static` and :func:`paper_dynamic`, are public, re-exported and
documented by :mod:`mfac_core.testing`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._testing_oracles import as_grads, index_numpy, real_numpy
from ._validation import check_damp

# -- literal transcriptions of the paper ---------------------------------------------------


def _vector(x: Any, d: int) -> np.ndarray:
    # x as float64 of shape (d,): a short or 2-D x reached NumPy's broadcasting or
    # "setting an array element with a sequence" errors deep in the loops.
    out = np.asarray(real_numpy(x, "x"), dtype=np.float64)
    if out.shape != (d,):
        raise ValueError(f"x must have shape ({d},), got {out.shape}")
    return out


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
        If ``G`` is not a non-empty 2-D array or holds NaN or infinity, or
        ``damp`` is not finite and positive.
    TypeError
        If ``damp`` is not a real number, or ``G`` is complex.
    """

    def __init__(self, G: Any, damp: float) -> None:
        G = as_grads(G)
        m, d = G.shape
        # check_damp: float() read a string damping, and NaN or 0 gave a NaN "reference".
        self.damp, self.num_grads, self.dim = check_damp(damp), m, d
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

        Raises
        ------
        ValueError
            If ``x`` does not have shape ``(d,)``.
        TypeError
            If ``x`` is complex.
        """
        return self._apply(_vector(x, self.dim), upto=self.num_grads)

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

        Raises
        ------
        TypeError
            If ``i`` or ``j`` is not one integer (a float is not truncated, a bool
            not taken as 0 or 1).
        IndexError
            If ``i`` or ``j`` lies outside ``[0, d)``: a negative index is not
            counted from the end.
        """
        i, j = (self._index(k, name) for k, name in ((i, "i"), (j, "j")))
        total = (1.0 if i == j else 0.0) / self.damp
        for k in range(self.num_grads):
            total -= self.v[k, i] * self.v[k, j] / self.q[k]
        return total

    def _index(self, k: Any, name: str) -> int:
        # As SpectralOracle.entries and the operators' entries refuse them, not as NumPy
        # indexing would take them (self.v[:, -1] is the last column).
        index = index_numpy(k, name, self.dim)
        if index.ndim:
            raise TypeError(f"{name} must be one index, got an array of shape {index.shape}")
        return int(index)

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
    problems; speed is irrelevant. Like every Woodbury form its rounding
    errors scale with ``1 + ||G||_2^2 / (m damp)``, also where ``d <= m``
    and :func:`condition_number` is far smaller (``d = 1``, ``m = 5``,
    ``damp = 1e-5``: an error of 7e3 ``eps`` where ``condition_number`` is 1).

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

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array or holds NaN or infinity, or
        ``damp`` is not finite and positive.
    TypeError
        If ``damp`` is not a real number, or ``G`` is complex.
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
        If ``G`` is not a non-empty 2-D array or holds NaN or infinity, or
        ``damp`` is not finite and positive.
    TypeError
        If ``damp`` is not a real number, or ``G`` is complex.
    """

    def __init__(self, G: Any, damp: float) -> None:
        G = as_grads(G)
        m, d = G.shape
        lam = check_damp(damp)  # as PaperStatic
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

        Raises
        ------
        ValueError
            If ``x`` does not have shape ``(d,)``.
        TypeError
            If ``x`` is complex.
        """
        x = _vector(x, self.dim)
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
    Like every Woodbury form its rounding errors scale with
    ``1 + ||G||_2^2 / (m damp)``, also where ``d <= m`` and
    :func:`condition_number` is far smaller.

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

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array or holds NaN or infinity, or
        ``damp`` is not finite and positive.
    TypeError
        If ``damp`` is not a real number, or ``G`` is complex.
    """
    return PaperDynamic(G, damp)


# Re-exported by mfac_core.testing, under whose name they are documented, doctested and pickled.
for _public in (PaperStatic, paper_static, PaperDynamic, paper_dynamic):
    _public.__module__ = "mfac_core.testing"
