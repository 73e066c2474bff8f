r"""The spectral form of the static operator: powers of F from the eigenvalues of the Gram.

With the float64 eigen-decomposition ``G_b G_b^T = U diag(Lambda) U^T`` of
each block's m x m Gram and ``V = U^T G_b`` (stored in G's dtype, the same
O(d m^2) set-up as ``W = U^{-T} G``), the rows of ``V`` are orthogonal with
squared norms ``Lambda`` and ``F_b = damp I + V^T V / m``. Every power
``f(F) = F^p`` then has the closed form

    f(F_b) = f(damp) I + V^T diag(h) V,
    h_i = (f(damp + mu_i) - f(damp)) / Lambda_i,   mu_i = Lambda_i / m,

for *any* damping: changing the damping changes the m coefficients ``h``, not
``V``. ``h`` is evaluated in forms that never divide by a small ``Lambda``
(``_coefficients``). The spectrum of ``F_b`` is ``damp + mu_i`` for the
``k = min(B, m)`` largest ``Lambda`` and ``damp`` on the other ``B - k``
directions, which gives log-determinants and traces in O(m) per block.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from . import _capacitance, _fused
from ._compat import (
    Array,
    device,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    is_writeable_array,
    namespace_name,
)
from ._layout import (
    BlockGroup,
    block_groups,
    chunk_gram,
    chunks,
    group_stack,
    piece_columns,
    piece_stack,
)
from ._operator import LinearOperator
from ._validation import (
    check_block_size,
    check_count,
    check_damp,
    check_dampings,
    check_finite,
    check_flag,
    check_float64_available,
    check_gradients,
    check_operand,
)

__all__ = ["SpectralIHVP"]

#: float64 entries in one column piece of the set-up (32 MiB).
_PIECE_ENTRIES = 2**22

#: float64 entries in one column piece of ``diagonal`` (512 KiB), at least ``_DIAG_MIN_COLS``
#: columns so that the loop over pieces stays cheap: the float64 copy of a piece and its
#: squares stay in cache. Measured 3-8x faster than 32 MiB pieces (m = 64 and 256, one and
#: eight dampings); with 2**17 entries OpenBLAS threaded the K x m by m x w products, which
#: made eight dampings 10x slower on a loaded machine.
_DIAG_PIECE_ENTRIES = 2**16
_DIAG_MIN_COLS = 256

#: The most dampings of a sweep through the kernels of ``_fused`` (they do 8 per read of V).
_FUSED_MAX_DAMPINGS = 8

#: The smallest blocks whose diagonal goes through the kernels: their coefficients are padded to
#: 8 dampings per block, 16 / B times the size of a float32 V (B = 16: as large as V, and slower).
_FUSED_MIN_BLOCK = 64

#: The powers of F the closed forms cover: F^{-1}, F^{-1/2}, F^{1/2}, F.
_POWERS = (-1.0, -0.5, 0.5, 1.0)


def _coefficients(xp: Any, lam: Array, damp: float, power: float, m: int) -> Any:
    """``h = (f(damp + lam/m) - f(damp)) / lam`` for ``f(x) = x**power``, float64.

    Each form is the difference quotient with the difference multiplied out, so
    that nothing is divided by ``lam`` (exact zeros included) and nothing cancels.
    """
    if power == -1.0:
        return -1.0 / (damp * (m * damp + lam))
    if power == 1.0:
        return xp.full(lam.shape, 1.0 / m, dtype=xp.float64, device=device(lam))
    sd = math.sqrt(damp)
    s = xp.sqrt(damp + lam / m)
    if power == 0.5:
        return 1.0 / (m * (s + sd))
    return -1.0 / (m * sd * s * (s + sd))


class SpectralIHVP(LinearOperator):
    r"""``F^{-1}`` (and ``F^{-1/2}``, ``F^{1/2}``, ``F``) from the eigenvalues of the Gram.

    The same inverse as :class:`~mfac_core.StaticIHVP`, for
    ``F = damp * I + G.T @ G / m`` (optionally block-diagonal), built from the
    float64 eigen-decomposition ``G G^T = U diag(Lambda) U^T`` and
    ``V = U^T G`` instead of a Cholesky factor. The set-up costs the same
    O(d m^2); what the spectral form adds is that every function of F is
    known for every damping:

    - :meth:`with_damp` gives the operator at another damping in O(m),
      sharing ``V``; :meth:`sweep` and ``diagonal(damps=...)`` give products
      and diagonals for K dampings in one pass over ``V``;
    - :meth:`logdet`, :meth:`trace` and :meth:`trace_inverse` in O(m) per
      block;
    - :meth:`sqrt` and :meth:`inv_sqrt` (``F^{-1/2}`` and ``F^{1/2}``) as
      operators, :meth:`sample` from ``N(0, F^{-1})`` in O(d m) per sample;
    - :meth:`bilinear` ``Q F^{-1} R^T`` and :meth:`quadratic`
      ``diag(R F^{-1} R^T)`` for stacks of vectors, without a d x d array.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row, of any Array-API library; float32 or
        float64. The operator lives in G's namespace and on G's device, and
        keeps no reference to G.
    damp : float
        The damping ``lambda > 0``.
    block_size : int, optional
        Block-diagonal F over consecutive blocks of this many coordinates
        (the last block may be shorter). ``None`` (default) uses the full F.
    check_finite : bool, optional
        Check G, and later each input, for NaN and infinity (default ``True``).

    Attributes
    ----------
    shape : tuple
        ``(d, d)``.
    dtype, device
        G's dtype and device.
    num_grads, dim, damp, block_size
        m, d, lambda and the block size (``d`` for the full operator).
    power : float
        The operator is ``F ** power``: -1 for the constructor's result, -0.5,
        0.5 or 1 for the results of :meth:`sqrt`, :meth:`inv_sqrt` and
        :meth:`inverse`.
    kappa : float
        The condition number of F (the largest over the blocks), from the
        eigenvalues: ``(damp + Lambda_max/m) / (damp + Lambda_min/m)`` with
        ``Lambda_min`` the smallest of the ``min(B, m)`` largest eigenvalues
        of a block of B coordinates, or 0 when ``B > m``.
    error_scale : float
        ``1 + max Lambda / (m damp)``: the factor of ``eps(dtype)`` in the
        relative error of a product (see Notes).

    Raises
    ------
    ValueError
        For a G that is not 2-D, empty, or holds NaN/inf, for ``damp <= 0``
        and for ``block_size < 1``.
    TypeError
        For an integer or complex G, or a G that is not an array.

    See Also
    --------
    StaticIHVP : The Cholesky form of the same inverse.

    Notes
    -----
    With ``c_i = 1 / (m damp + Lambda_i)``,

    .. math::

        F^{-1} x = \big(x - V^\top \mathrm{diag}(c)\, V x\big) / \lambda ,

    which has no factorisation to fail: any damping works, also where the
    Cholesky factor of ``m damp I + G G^T`` would not exist in float64. A
    product's relative error is within about 2x of the Cholesky form's, about
    ``eps(dtype) * error_scale`` at worst (two passes over V in G's dtype; the
    m x m work is float64); see the documentation page "Beyond inverse-vector
    products" for measurements. Blocks no wider than m are not special-cased (unlike
    :class:`StaticIHVP`, which inverts them densely): their error scale is
    ``1 + ||G_b||_2^2 / (m damp)`` even where ``F_b`` itself is better
    conditioned, and they store ``m x B`` numbers each.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import SpectralIHVP
    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((8, 50))
    >>> op = SpectralIHVP(G, damp=0.1)
    >>> F = 0.1 * np.eye(50) + G.T @ G / 8
    >>> x = rng.standard_normal(50)
    >>> bool(np.allclose(F @ op.matvec(x), x))
    True
    >>> bool(np.isclose(op.logdet(), -np.linalg.slogdet(F)[1]))
    True
    >>> half = op.sqrt()                      # F^{-1/2}
    >>> bool(np.allclose(half @ (half @ x), op @ x))
    True
    """

    def __init__(
        self, G: Array, /, *, damp: float, block_size: int | None = None, check_finite: bool = True
    ) -> None:
        check_finite = check_flag(check_finite, "check_finite")
        xp = check_gradients(G, require_finite=False)
        damp = check_damp(damp)
        check_float64_available(xp)
        m, d = (int(n) for n in G.shape)
        bs = check_block_size(block_size, d)
        groups = block_groups(d, bs)
        dev = device(G)
        V, lams = _setup(xp, G, groups, check_finite=check_finite, device=dev)
        super().__init__(
            shape=(d, d),
            dtype=G.dtype,
            xp=xp,
            device=dev,
            symmetric=True,
            check_finite=check_finite,
        )
        self.num_grads, self.dim, self.block_size = m, d, bs
        self._groups = groups
        self._V = V
        self._lams = lams  # per group: (count, m) float64, ascending, clipped at 0
        self.power = -1.0
        self._set_damp(damp)
        _capacitance.warn_if_hopeless(
            self.error_scale, damp=damp, eps=float(xp.finfo(self.dtype).eps), dtype=self.dtype
        )

    # -- damping, spectrum and derived operators -----------------------------------------------

    def _set_damp(self, damp: float) -> None:
        self.damp = damp
        m = self.num_grads
        top = max(float(self._xp.max(lam[:, -1])) for lam in self._lams)
        self.error_scale = 1.0 + top / (m * damp)
        kappa = 1.0
        for g, lam in zip(self._groups, self._lams, strict=True):
            k = min(g.size, m)
            low = lam[:, m - k] if g.size <= m else self._xp.zeros_like(lam[:, 0])
            kappa = max(kappa, float(self._xp.max((damp + lam[:, -1] / m) / (damp + low / m))))
        self.kappa = kappa

    def _derived(self, *, damp: float | None = None, power: float | None = None) -> SpectralIHVP:
        # A shallow copy shares V and the eigenvalues: O(m) per group, never O(d m).
        new = copy.copy(self)
        if power is not None:
            new.power = power
        if damp is not None:
            new._set_damp(damp)
            _capacitance.warn_if_hopeless(
                new.error_scale,
                damp=damp,
                eps=float(new._xp.finfo(new.dtype).eps),
                dtype=new.dtype,
            )
        return new

    def with_damp(self, damp: float, /) -> SpectralIHVP:
        """The same power of F at another damping, sharing ``V`` (O(m)).

        Parameters
        ----------
        damp : float
            The new damping ``> 0``; any value works (no factorisation).

        Returns
        -------
        SpectralIHVP
            The operator for ``F = damp I + G^T G / m``.

        Raises
        ------
        TypeError, ValueError
            For a damping that is not a finite positive real number.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP, StaticIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=1.0).with_damp(1e-3)
        >>> bool(np.allclose(op.diagonal(), StaticIHVP(G, damp=1e-3).diagonal()))
        True
        """
        return self._derived(damp=check_damp(damp))

    def sqrt(self) -> SpectralIHVP:
        """The square root of this operator: ``F^{-1/2}`` for ``F^{-1}``, ``F^{1/2}`` for ``F``.

        Returns
        -------
        SpectralIHVP
            Sharing ``V``; ``sqrt() @ sqrt()`` equals this operator.

        Raises
        ------
        ValueError
            For an operator that is already a square root (``power = ±1/2``).

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> R = op.sqrt().todense()
        >>> bool(np.allclose(R @ R, op.todense()))
        True
        """
        return self._derived(power=self._power_checked(self.power / 2, "sqrt"))

    def inv_sqrt(self) -> SpectralIHVP:
        """The inverse square root of this operator: ``F^{1/2}`` for ``F^{-1}``.

        Returns
        -------
        SpectralIHVP
            Sharing ``V``; ``inv_sqrt() @ inv_sqrt()`` is the inverse of this operator.

        Raises
        ------
        ValueError
            For an operator that is already a square root (``power = ±1/2``).

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> S = SpectralIHVP(G, damp=0.5).inv_sqrt().todense()
        >>> bool(np.allclose(S @ S, 0.5 * np.eye(20) + G.T @ G / 4))
        True
        """
        return self._derived(power=self._power_checked(-self.power / 2, "inv_sqrt"))

    def inverse(self) -> SpectralIHVP:
        """The inverse of this operator (``F`` for ``F^{-1}``), sharing ``V``.

        Returns
        -------
        SpectralIHVP
            The operator of the opposite power, sharing ``V`` (O(m)).

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> F = SpectralIHVP(G, damp=0.5).inverse()
        >>> bool(np.allclose(F.todense(), 0.5 * np.eye(20) + G.T @ G / 4))
        True
        """
        return self._derived(power=-self.power)

    def _power_checked(self, power: float, what: str) -> float:
        if power not in _POWERS:
            raise ValueError(
                f"{what}() of F**{self.power:g} would be F**{power:g}; the closed "
                f"forms cover the powers {', '.join(f'{p:g}' for p in _POWERS)}"
            )
        return power

    def _spectrum_sum(self, term: Any) -> float:
        """``sum over blocks of term(top, k, size)``, with ``top`` the ``k`` largest eigenvalues."""
        m, total = self.num_grads, 0.0
        for g, lam in zip(self._groups, self._lams, strict=True):
            k = min(g.size, m)
            total += float(self._xp.sum(term(lam[:, m - k :], k, g.size)))
        return total

    def logdet(self) -> float:
        """``log det`` of this operator (``-log det F`` for ``F^{-1}``), in O(m) per block.

        ``log det F = sum_b [B log(damp) + sum_{i <= min(B, m)} log1p(Lambda_i / (m damp))]``
        over the ``min(B, m)`` largest eigenvalues of each block's Gram, in float64.

        Returns
        -------
        float
            The log-determinant, summed in float64.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> bool(np.isclose(op.logdet(), np.linalg.slogdet(op.todense())[1]))
        True
        """
        xp, m, damp = self._xp, self.num_grads, self.damp
        logdet_f = self._spectrum_sum(
            lambda top, k, size: size * math.log(damp) + xp.sum(xp.log1p(top / (m * damp)), axis=1)
        )
        return self.power * logdet_f

    def _trace(self, power: float) -> float:
        xp, m, damp = self._xp, self.num_grads, self.damp
        # (B - k) f(damp) + sum f(damp + mu): a sum of positive terms, nothing cancels.
        return self._spectrum_sum(
            lambda top, k, size: (
                (size - k) * damp**power + xp.sum((damp + top / m) ** power, axis=1)
            )
        )

    def trace(self) -> float:
        """The trace of this operator (``tr F^{-1}`` for ``F^{-1}``), in O(m) per block.

        Returns
        -------
        float
            A sum of positive float64 terms, accurate to a few ``eps(float64)``
            relative to the eigenvalues.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> bool(np.isclose(op.trace(), np.trace(op.todense())))
        True
        """
        return self._trace(self.power)

    def trace_inverse(self) -> float:
        """The trace of this operator's inverse (``tr F`` for ``F^{-1}``), in O(m) per block.

        Returns
        -------
        float
            The trace, summed in float64.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> bool(np.isclose(op.trace_inverse(), 0.5 * 20 + np.sum(G * G) / 4))
        True
        """
        return self._trace(-self.power)

    # -- products ------------------------------------------------------------------------------

    def _coefs(self, damps: list[float]) -> tuple[list[float], list[Any]]:
        """``f(damp)`` per damping, and per group the ``(K, count, m)`` float64 coefficients."""
        xp, m = self._xp, self.num_grads
        alphas = [dp**self.power for dp in damps]
        H = [
            xp.stack([_coefficients(xp, lam, dp, self.power, m) for dp in damps])
            for lam in self._lams
        ]
        return alphas, H

    def _apply(self, X: Array, damps: list[float]) -> Array:
        """``f_k(F) X`` for every damping, stacked: ``(K, d, k)``, one pass over V per group."""
        xp, dt = self._xp, self.dtype
        alphas, H = self._coefs(damps)
        K, k = len(damps), X.shape[1]
        alpha = xp.reshape(xp.asarray(alphas, dtype=dt, device=self.device), (K, 1, 1))
        parts = []
        for g, h in zip(self._groups, H, strict=True):
            Xg = X[g.start : g.end, ...]
            if g.count == 1:
                V = self._V[:, g.start : g.end]
                P = xp.astype(V @ Xg, xp.float64)  # (m, k)
                C = xp.astype(xp.reshape(h, (K, -1, 1)) * P, dt)  # (K, m, k)
                C = xp.reshape(xp.permute_dims(C, (1, 0, 2)), (V.shape[0], K * k))
                # (C^T V)^T rather than V^T C: faster for this thin shape (see lowrank_apply).
                low = xp.reshape((C.T @ V).T, (g.size, K, k))
            else:
                Vs = group_stack(xp, self._V, g)  # (count, m, size)
                Xb = xp.reshape(Xg, (g.count, g.size, k))
                P = xp.astype(Vs @ Xb, xp.float64)  # (count, m, k)
                C = xp.astype(xp.reshape(h, (K, g.count, -1, 1)) * P, dt)  # (K, count, m, k)
                C = xp.reshape(xp.permute_dims(C, (1, 2, 0, 3)), (g.count, -1, K * k))
                low = xp.reshape(xp.matrix_transpose(Vs) @ C, (g.count * g.size, K, k))
            parts.append(alpha * Xg[None, ...] + xp.permute_dims(low, (1, 0, 2)))
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def _matmat(self, X: Array) -> Array:
        return self._apply(X, [self.damp])[0, ...]

    def _matvec(self, x: Array) -> Array:
        if any(g.count > 1 for g in self._groups):
            return self._matmat(x[:, None])[:, 0]
        # One block per group: two GEMVs over V, without the stacked layout of _apply.
        xp = self._xp
        alpha, H = self._coefs([self.damp])
        parts = []
        for g, h in zip(self._groups, H, strict=True):
            V, xg = self._V[:, g.start : g.end], x[g.start : g.end]
            c = xp.astype(h[0, 0, :] * xp.astype(V @ xg, xp.float64), self.dtype)
            parts.append(alpha[0] * xg + c @ V)
        return parts[0] if len(parts) == 1 else xp.concat(parts)

    def sweep(self, x: Array, /, *, damps: Sequence[float]) -> Array:
        """Apply this power of F at each of K dampings to ``x``, in two passes over ``V``.

        ``V x`` once, then the K results together: about the cost of one product,
        not K (docs/beyond.rst, "Speed").

        Parameters
        ----------
        x : array, shape (d,) or (d, k)
            In the operator's namespace, device and dtype (float32 is
            promoted for a float64 operator).
        damps : sequence of float
            The K dampings ``> 0``.

        Returns
        -------
        array, shape (K, d) or (K, d, k)
            ``result[j]`` is ``F_j^{power} x`` with ``F_j = damps[j] I + G^T G / m``.

        Raises
        ------
        TypeError, ValueError
            For an input of another library, device, dtype or shape, or bad dampings.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=1.0)
        >>> x = np.ones(20)
        >>> Y = op.sweep(x, damps=[0.1, 1.0])
        >>> Y.shape, bool(np.allclose(Y[1], op @ x))
        ((2, 20), True)
        """
        dl = check_dampings(damps)
        x = self._check_input(x, "x", self.dim, (1, 2))
        if x.ndim == 2:
            return self._apply(x, dl)
        if any(g.count > 1 for g in self._groups):
            return self._apply(x[:, None], dl)[..., 0]
        # One block per group: V x once, then C V + alpha x with C of K x m in one more read
        # of V: by the fused kernel where it applies, else one GEMM, which with OpenBLAS
        # costs about 3x a GEMV pass (it packs V, then computes; docs/beyond.rst, "Speed").
        xp = self._xp
        alphas, H = self._coefs(dl)
        # The kernels compute 8 dampings per read of V: at K = 1 a GEMV pass is faster, and
        # above 8 the GEMM's one read beats their K / 8.
        fused = _fused.supports(self._V) and 2 <= len(dl) <= _FUSED_MAX_DAMPINGS
        parts = []
        for g, h in zip(self._groups, H, strict=True):
            V, xg = self._V[:, g.start : g.end], x[g.start : g.end]
            if fused:
                # Both passes by the kernels: no hand-over from BLAS's spinning threads.
                P = _fused.project(self._V, xg, start=g.start, stop=g.end)
                C = xp.astype(h[:, 0, :] * P, self.dtype)  # (K, m)
                parts.append(_fused.apply(self._V, C, alphas, xg, start=g.start, stop=g.end))
                continue
            C = xp.astype(h[:, 0, :] * xp.astype(V @ xg, xp.float64), self.dtype)  # (K, m)
            Y = C @ V
            if is_writeable_array(Y):
                # Row by row in place: no (K, d) temporary for alpha x (4-10% of this pass).
                for j, a in enumerate(alphas):
                    Y[j, ...] += a * xg
            else:
                a = xp.reshape(xp.asarray(alphas, dtype=self.dtype, device=self.device), (-1, 1))
                Y = Y + a * xg
            parts.append(Y)
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def diagonal(self, *, damps: Sequence[float] | None = None) -> Array:
        """The diagonal of this operator, at its damping or at each of K dampings, in O(d m).

        ``f(damp) + sum_i h_i V_ij^2``, the sums in float64 a bounded piece of V
        at a time; all K dampings share one pass over V.

        Parameters
        ----------
        damps : sequence of float, optional
            The K dampings; ``None`` (default) uses the operator's.

        Returns
        -------
        array, shape (d,), or (K, d) when ``damps`` is given
            In the operator's namespace, dtype and device.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=1.0)
        >>> D = op.diagonal(damps=[0.1, 1.0])
        >>> D.shape, bool(np.allclose(D[1], np.diag(op.todense())))
        ((2, 20), True)
        """
        dl = [self.damp] if damps is None else check_dampings(damps)
        xp, m = self._xp, self.num_grads
        alphas, H = self._coefs(dl)
        K = len(dl)
        alpha = xp.reshape(xp.asarray(alphas, dtype=xp.float64, device=self.device), (K, 1))
        fused = _fused.supports(self._V)
        parts = []
        for g, h in zip(self._groups, H, strict=True):
            if fused and (g.count == 1 or g.size >= _FUSED_MIN_BLOCK):
                # One read of V in place, each block with its coefficients, sums in float64
                # (the BLAS path below converts pieces of V to float64 first: 3-4x slower).
                size = None if g.count == 1 else g.size
                h_g = h[:, 0, :] if size is None else h
                parts.append(
                    _fused.diagonal(
                        self._V, h_g, alphas, start=g.start, stop=g.end, block_size=size
                    )
                )
                continue
            for chunk in chunks(g, max(_DIAG_MIN_COLS, _DIAG_PIECE_ENTRIES // m)):
                for piece in chunk:
                    b0, b1, _, _ = piece
                    if b1 - b0 == 1:
                        # Part of one block: plain 2-D products (a GEMV for one damping).
                        lo, hi = piece_columns(g, piece)
                        Vc = xp.astype(self._V[:, lo:hi], xp.float64)
                        S = Vc * Vc
                        D = (h[0, b0, :] @ S)[None, ...] if K == 1 else h[:, b0, :] @ S
                    else:
                        Vs = xp.astype(piece_stack(xp, self._V, g, piece), xp.float64)
                        hb = xp.permute_dims(h[:, b0:b1, :], (1, 0, 2))  # (b, K, m)
                        D = xp.reshape(xp.permute_dims(hb @ (Vs * Vs), (1, 0, 2)), (K, -1))
                    parts.append(xp.astype(alpha + D, self.dtype))
        out = parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)
        return out[0, ...] if damps is None else out

    # -- bilinear and quadratic forms ----------------------------------------------------------

    def _rows(self, A: Array, name: str) -> Any:
        A = check_operand(self._xp, self.device, self.dtype, A, name, owner=repr(self))
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(
                f"{name} must have shape (n, {self.dim}), one vector per row; got {tuple(A.shape)}"
            )
        if self.check_finite:
            check_finite(self._xp, A, name)
        return A

    def _batch(self, batch_size: int | None) -> int:
        if batch_size is not None:
            return check_count(batch_size, "batch_size")
        # Bounded temporaries: about 2**22 entries of V R^T (or of R in float64) per batch.
        blocks = sum(g.count for g in self._groups)
        return max(1, _PIECE_ENTRIES // max(self.num_grads * blocks, self.dim))

    def _project(self, A: Array, g: BlockGroup) -> Any:
        """``V_b A_b^T`` per block of ``g`` for the rows of ``A``, ``(count, m, n)`` float64."""
        xp = self._xp
        Ag = A[:, g.start : g.end]
        if g.count == 1:
            return xp.astype(self._V[:, g.start : g.end] @ Ag.T, xp.float64)[None, ...]
        Ab = xp.permute_dims(xp.reshape(Ag, (Ag.shape[0], g.count, g.size)), (1, 2, 0))
        return xp.astype(group_stack(xp, self._V, g) @ Ab, xp.float64)

    def bilinear(self, Q: Array, R: Array, /, *, batch_size: int | None = None) -> Array:
        r"""``Q A R^T`` for this operator A (``Q F^{-1} R^T``), without a d x d array.

        ``f(damp) Q R^T + sum_b (V_b Q_b^T)^T diag(h_b) (V_b R_b^T)``: Q is
        projected once, R a batch of rows at a time, so the temporaries are
        ``(p + n_batch) x m`` per block; the m-sized contractions are float64.

        Parameters
        ----------
        Q : array, shape (p, d)
            Vectors in the rows (for instance gradients of test losses).
        R : array, shape (n, d)
            Vectors in the rows (for instance per-example training gradients).
        batch_size : int, optional
            Rows of R per batch; by default chosen to bound the temporaries.

        Returns
        -------
        array, shape (p, n)
            In the operator's namespace, dtype and device.

        Raises
        ------
        TypeError, ValueError
            For inputs of another library, device, dtype or width.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> rng = np.random.default_rng(0)
        >>> G = rng.standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> Q, R = rng.standard_normal((2, 20)), rng.standard_normal((3, 20))
        >>> bool(np.allclose(op.bilinear(Q, R), Q @ op.todense() @ R.T))
        True
        """
        xp = self._xp
        Q, R = self._rows(Q, "Q"), self._rows(R, "R")
        step = self._batch(batch_size)
        alphas, H = self._coefs([self.damp])
        PQ = [
            xp.reshape(h[0, ...], (g.count, -1, 1)) * self._project(Q, g)
            for g, h in zip(self._groups, H, strict=True)
        ]
        parts = []
        for lo in range(0, R.shape[0], step):
            Rb = R[lo : min(lo + step, R.shape[0]), :]
            acc = alphas[0] * xp.astype(Q @ Rb.T, xp.float64)
            for g, pq in zip(self._groups, PQ, strict=True):
                acc = acc + xp.sum(xp.matrix_transpose(pq) @ self._project(Rb, g), axis=0)
            parts.append(xp.astype(acc, self.dtype))
        if not parts:
            return xp.zeros((Q.shape[0], 0), dtype=self.dtype, device=self.device)
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def quadratic(self, R: Array, /, *, batch_size: int | None = None) -> Array:
        """``diag(R A R^T)`` for this operator A: ``r^T F^{-1} r`` for each row r of R.

        Parameters
        ----------
        R : array, shape (n, d)
            Vectors in the rows.
        batch_size : int, optional
            Rows of R per batch; by default chosen to bound the temporaries.

        Returns
        -------
        array, shape (n,)
            In the operator's namespace, dtype and device.

        Raises
        ------
        TypeError, ValueError
            For an input of another library, device, dtype or width.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> rng = np.random.default_rng(0)
        >>> G = rng.standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> R = rng.standard_normal((3, 20))
        >>> bool(np.allclose(op.quadratic(R), np.diag(R @ op.todense() @ R.T)))
        True
        """
        xp = self._xp
        R = self._rows(R, "R")
        step = self._batch(batch_size)
        alphas, H = self._coefs([self.damp])
        parts = []
        for lo in range(0, R.shape[0], step):
            Rb = R[lo : min(lo + step, R.shape[0]), :]
            R64 = xp.astype(Rb, xp.float64)
            acc = alphas[0] * xp.sum(R64 * R64, axis=1)
            for g, h in zip(self._groups, H, strict=True):
                P = self._project(Rb, g)  # (count, m, n)
                acc = acc + xp.sum(xp.reshape(h[0, ...], (g.count, -1, 1)) * P * P, axis=(0, 1))
            parts.append(xp.astype(acc, self.dtype))
        if not parts:
            return xp.zeros((0,), dtype=self.dtype, device=self.device)
        return parts[0] if len(parts) == 1 else xp.concat(parts)

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, n: int, /, *, rng: Any) -> Array:
        """``n`` draws from ``N(0, A)`` for this operator A (``N(0, F^{-1})``), O(d m) each.

        ``A^{1/2} z`` for standard normal ``z`` drawn on the operator's device
        in its library, so ``A`` must be ``F^{-1}`` or ``F`` (a square root
        exists in closed form).

        Parameters
        ----------
        n : int
            The number of samples, ``>= 0``.
        rng : generator, key or int
            The caller's source of randomness, per library:

            - NumPy: a :class:`numpy.random.Generator`, or an int seed for
              :func:`numpy.random.default_rng`;
            - PyTorch: a :class:`torch.Generator` on the operator's device, or
              an int seed for a new one;
            - JAX: a PRNG key (``jax.random.key`` or ``PRNGKey``), used as given
              (split it yourself for further draws), or an int seed;
            - CuPy: a ``cupy.random.Generator``, or an int seed;
            - array-api-strict (which has no generator): a NumPy Generator or
              seed; the draws are copied to the operator's device.

        Returns
        -------
        array, shape (n, d)
            One sample per row, in the operator's namespace, dtype and device.

        Raises
        ------
        TypeError
            For a generator of another library.
        ValueError
            For a negative ``n``, or an operator whose square root is not
            covered (``power = ±1/2``).

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> X = SpectralIHVP(G, damp=0.5).sample(3, rng=np.random.default_rng(1))
        >>> X.shape
        (3, 20)
        """
        n = check_count(n, "n", minimum=0)
        root = self.sqrt()
        Z = _standard_normal(self._xp, rng, (self.dim, n), self.dtype, self.device)
        return root._matmat(Z).T


def _standard_normal(xp: Any, rng: Any, shape: tuple[int, int], dtype: Any, dev: Any) -> Any:
    """Standard normal draws of ``shape`` in namespace ``xp`` on ``dev``, from the caller's rng."""
    name = namespace_name(xp)
    if is_numpy_namespace(xp) or is_array_api_strict_namespace(xp):
        import numpy as np

        gen = np.random.default_rng(rng) if isinstance(rng, int) else rng
        if not isinstance(gen, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator or an int seed for {name} "
                f"operators, got {type(rng).__name__}"
            )
        npdt = np.float32 if dtype == xp.float32 else np.float64
        Z = gen.standard_normal(shape, dtype=npdt)
        return Z if is_numpy_namespace(xp) else xp.asarray(Z, device=dev)
    if is_torch_namespace(xp):
        import torch

        gen = torch.Generator(device=dev).manual_seed(rng) if isinstance(rng, int) else rng
        if not isinstance(gen, torch.Generator):
            raise TypeError(
                f"rng must be a torch.Generator or an int seed for torch operators, "
                f"got {type(rng).__name__}"
            )
        return torch.randn(shape, generator=gen, dtype=dtype, device=dev)
    if is_jax_namespace(xp):
        import jax

        key = jax.random.key(rng) if isinstance(rng, int) else rng
        if not isinstance(key, jax.Array):
            raise TypeError(
                f"rng must be a JAX PRNG key or an int seed for jax operators, "
                f"got {type(rng).__name__}"
            )
        return jax.device_put(jax.random.normal(key, shape, dtype=dtype), dev)
    if is_cupy_namespace(xp):
        import cupy

        gen = cupy.random.default_rng(rng) if isinstance(rng, int) else rng
        if not isinstance(gen, cupy.random.Generator):
            raise TypeError(
                f"rng must be a cupy.random.Generator or an int seed for cupy "
                f"operators, got {type(rng).__name__}"
            )
        with cupy.cuda.Device(dev.id):
            return gen.standard_normal(shape, dtype=dtype)
    raise TypeError(f"sample() has no random number generator for {name} arrays")


def _setup(
    xp: Any, G: Array, groups: tuple[BlockGroup, ...], *, check_finite: bool, device: Any
) -> tuple[Array, list[Any]]:
    """``V = U^T G`` (G's dtype, G's layout) and each group's Gram eigenvalues ``(count, m)``.

    Chunk by chunk, as the Cholesky set-up: the chunk's float64 Grams summed
    over column pieces, their ``eigh``, then the chunk's columns of V.
    """
    m, d = G.shape
    width = max(1, min(_PIECE_ENTRIES, m * d // 64) // m)
    writable = is_writeable_array(xp.empty((0,), dtype=G.dtype, device=device))
    V = xp.empty((m, d), dtype=G.dtype, device=device) if writable else None
    pieces: list[Any] = []
    lams = []
    for g in groups:
        glams = []
        for chunk in chunks(g, width):
            gram = chunk_gram(xp, G, g, chunk, lambda X: X @ xp.matrix_transpose(X))
            # A NaN or infinity in G makes its row's squared norm non-finite.
            if check_finite and not bool(xp.all(xp.isfinite(xp.linalg.diagonal(gram)))):
                raise ValueError(
                    "G must not contain NaN or infinity (or its squared row norms overflow float64)"
                )
            lam, U = xp.linalg.eigh(gram)
            glams.append(xp.clip(lam, min=0.0))
            Ut = xp.astype(xp.matrix_transpose(U), G.dtype)
            first = chunk[0][0]
            for piece in chunk:
                b0, b1, _, _ = piece
                lo, hi = piece_columns(g, piece)
                P = Ut[b0 - first : b1 - first, ...] @ piece_stack(xp, G, g, piece)  # (b, m, w)
                P = xp.reshape(xp.permute_dims(P, (1, 0, 2)), (m, hi - lo))
                if V is not None:
                    V[:, lo:hi] = P
                else:
                    pieces.append(P)
        lams.append(glams[0] if len(glams) == 1 else xp.concat(glams, axis=0))
    if V is None:
        V = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=1)
    return V, lams
