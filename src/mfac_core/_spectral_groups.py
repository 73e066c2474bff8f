r"""The groups of blocks of the spectral form: float64 eigenpairs, products through G.

``F_b = damp I + G_b^T G_b / m`` for each block b of a group. Every power
``f(F) = F^p`` of the closed forms is applied from a float64 eigen-decomposition,
in one of two ways by the blocks' width s:

- :class:`GramEigen` (``s > m``): the m x m Gram ``G_b G_b^T = U diag(Lambda) U^T``,
  and G itself (by reference, any storage dtype), with

      f(F_b) = f(damp) I + G_b^T U diag(h) U^T G_b,
      h_i = (f(damp + Lambda_i / m) - f(damp)) / Lambda_i

  (:func:`coefficients`): both passes over G through the pass engine (``_engine``),
  summed in float64 and rounded once, the m x m work in float64. No derived m x d
  array (``V = U^T G``) is stored: a float32 V would carry ``eps32 * kappa`` into
  products near the gradients' span and into diagonals where ``1 - sum c_i V_ij^2``
  cancels (docs/mathematics.rst, "Exact passes"). The diagonal whitens columns on the
  fly, in float64.
- :class:`ColumnEigen` (``s <= m``): the s x s ``G_b^T G_b = Q diag(mu) Q^T``, with
  ``f(F_b) = Q diag(f(damp + mu / m)) Q^T`` applied in float64: O(s) per coordinate,
  no pass over G, and a diagonal that is a sum of positive terms.

Both give the ``k = min(s, m)`` nonzero-capable eigenvalues of the Gram, ascending
(``top``), from which the spectrum of ``F_b`` follows: ``damp + top / m`` and ``damp``
on the other ``s - k`` directions. Both also give the form
``f(F_b) = a I + B_b^T diag(w) B_b`` with float64 coordinates ``B_b A^T``
(:meth:`project`) and ``(a, w)`` from :meth:`form`, for the bilinear and quadratic
forms (``_spectral_forms``): ``a = f(damp)`` with the weights of ``U`` for
:class:`GramEigen`, ``a = 0`` with the whole spectrum for :class:`ColumnEigen`,
whose Q spans its blocks (``f(damp) I`` there would cancel against the weights where
``f(damp)`` dominates: power < 0 and a small damping, however well-conditioned F).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import _engine, _linalg, _pieces
from ._capacitance import EPS64
from ._compat import Array, array_namespace, device
from ._finite import narrowed
from ._layout import BlockGroup, piece_stack, pieces

__all__ = [
    "POWERS",
    "ColumnEigen",
    "GramEigen",
    "Group",
    "applied",
    "check_top_in_range",
    "checked_power",
    "coefficients",
    "conditioning",
    "diagonal_of",
    "logdet_of",
    "spectrum_bounds",
    "trace_of",
]

#: The powers of F the closed forms cover: F^{-1}, F^{-1/2}, F^{1/2}, F.
POWERS = (-1.0, -0.5, 0.5, 1.0)

#: The scales of the weights (:func:`coefficients`) with which a one-vector product goes
#: through the engine's lift: beyond them (a damping beyond about 1e100 or 1e-100 for
#: F^{-1}) the lift's coefficients could leave float64's range, and each damping reads the
#: group once instead.
_LIFT_SCALES = (1e-100, 1e100)

#: The most blocks of a group whose one-vector sweep goes block by block through the
#: engine's lift (one read of G for all dampings); past that, per-call costs outweigh it
#: and each damping reads the group once (one call for all blocks).
_LIFT_BLOCKS = 64


def coefficients(xp: Any, lam: Array, damp: float, power: float, m: int) -> tuple[float, Any]:
    """``(s, c)`` with ``h = s * c = (f(damp + lam/m) - f(damp)) / lam``, float64.

    ``f(x) = x**power``. Each form is the difference quotient with the difference
    multiplied out, so that nothing is divided by ``lam`` (exact zeros included) and
    nothing cancels. ``h`` itself leaves float64's range where the damping does by the
    square root of it (``h = -1 / (damp (m damp + lam))`` underflows for a damping above
    about 1e154, overflows below 1e-154): the scale ``s`` (a power of the damping) is
    kept apart, and applied after ``c`` has met the in-range data it weighs.
    """
    if power == -1.0:
        # m damp + lam spelled so that it overflows only where damp + lam / m does (never
        # for m >= 2 within the dampings check_damp admits).
        return -1.0 / damp, (1.0 / m) / (damp + lam / m)
    if power == 1.0:
        return 1.0, xp.full(lam.shape, 1.0 / m, dtype=xp.float64, device=device(lam))
    sd = math.sqrt(damp)
    s = xp.sqrt(damp + lam / m)
    if power == 0.5:
        return 1.0, 1.0 / (m * (s + sd))
    return -1.0 / sd, 1.0 / (m * s * (s + sd))


def _rows_of(xp: Any, A: Array, group: BlockGroup) -> Array:
    """The group's columns of the rows of ``A`` (n, d) as ``(count * size, n)``."""
    return xp.matrix_transpose(A[:, group.start : group.end])


@dataclass(frozen=True)
class GramEigen:
    """Blocks wider than m: G and each block's Gram eigenpairs, ``U`` ``(count, m, m)``
    and ``lams`` ``(count, m)`` ascending, clipped at 0, both float64."""

    group: BlockGroup
    G: Array
    U: Array
    lams: Array
    dtype: Any

    @property
    def xp(self) -> Any:
        return array_namespace(self.U)

    @property
    def top(self) -> Array:
        return self.lams

    def weights(self, damp: float, power: float) -> tuple[float, Array]:
        """``(s, c)``: the weights ``h = s * c`` of :func:`coefficients`."""
        return coefficients(self.xp, self.lams, damp, power, self.G.shape[0])

    def form(self, damp: float, power: float) -> tuple[float, Array, float]:
        """``(f(damp), c, s)``: ``f(F_b) = f(damp) I + s (U^T G_b)^T diag(c) (U^T G_b)``."""
        scale, c = self.weights(damp, power)
        return damp**power, c, scale

    def apply(self, X: Array, damps: list[float], power: float) -> Array:
        """``f(F_b) X_b`` at each damping: ``(K, count * size, k)`` of ``dtype``."""
        xp, g, G = self.xp, self.group, self.G
        X = _engine.widened_for_derivatives(xp, X)
        Ut = xp.matrix_transpose(self.U)
        alphas = [dp**power for dp in damps]
        H = [self.weights(dp, power) for dp in damps]  # K x (s, (count, m))
        # The lift's coefficients carry the scale s of the weights (a power of the damping);
        # at an extreme damping they would leave float64's range where the others' A, in
        # which s / f(damp) is about 1, does not.
        in_range = all(_LIFT_SCALES[0] <= abs(sc) <= _LIFT_SCALES[1] for sc, _ in H)
        # Where PyTorch differentiates X over a G the kernels read, the combinations below
        # run in them under autograd Functions (_pass_derivatives); the lift has none (its
        # pieces are float64 copies of G's: a product 4.8x the no-grad one at m = 64,
        # d = 1e6, float32).
        lift = not _engine.kernels_under_derivatives(xp, G, X)
        if X.shape[1] == 1 and g.count <= _LIFT_BLOCKS and in_range and lift:
            # One vector: per block, all K results from one more read of its columns (the
            # engine's lift, x shared by the K rows of coefficients).
            P = _engine.project_blocks(xp, G, g, X)[..., 0]  # (count, m)
            Z = (Ut @ P[..., None])[..., 0]
            a = xp.asarray(alphas, dtype=xp.float64, device=device(P))
            parts = []
            for b in range(g.count):
                C = xp.stack([sc * (self.U[b, ...] @ (c[b, ...] * Z[b, ...])) for sc, c in H])
                lo, hi = b * g.size, (b + 1) * g.size
                cols = {"start": g.start + lo, "stop": g.start + hi}
                Y_b = _engine.lift(xp, G, X[lo:hi, 0], C, alphas=a, dtype=self.dtype, **cols)
                parts.append(Y_b)
            Y = parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)
            return Y[..., None]
        # The small products by NumPy for PyTorch CPU tensors (_linalg.matmul).
        Z = _linalg.matmul(xp, Ut, _engine.project_blocks(xp, G, g, X))  # (count, m, k)
        out = []
        for (scale, c), alpha in zip(H, alphas, strict=True):
            # alpha (X - G^T A) with A = -U (h * Z) / alpha: f(damp) X + G^T U diag(h) U^T G X.
            A = _linalg.matmul(xp, self.U, c[..., None] * Z) * (-scale / alpha)
            out.append(_engine.combine_blocks(xp, G, g, X, A, alpha=alpha, dtype=self.dtype))
        return xp.stack(out)

    def diagonal(self, damps: list[float], power: float) -> Array:
        """``f(damp) + sum_i h_i (U_b^T g_j)_i^2`` per coordinate: ``(K, count * size)``.

        The columns are whitened on the fly, in float64, a bounded piece at a time.
        """
        xp, g, G, m = self.xp, self.group, self.G, self.G.shape[0]
        weights = [self.weights(dp, power) for dp in damps]
        H = xp.stack([c for _, c in weights])  # (K, count, m)
        scales = xp.reshape(
            xp.asarray([sc for sc, _ in weights], dtype=xp.float64, device=device(H)), (-1, 1, 1)
        )
        alphas = xp.reshape(
            xp.asarray([dp**power for dp in damps], dtype=xp.float64, device=device(H)), (-1, 1)
        )
        Ut = xp.matrix_transpose(self.U)
        parts = []
        # 32 MiB pieces on the host; on a GPU, where each piece costs launches, the
        # engine's device piece.
        width = _pieces.piece_width(xp, G, m, host=_pieces.LARGE_PIECE_ENTRIES)
        for b0, b1, c0, c1 in pieces(g, width):
            Gp = piece_stack(xp, G, g, (b0, b1, c0, c1))
            Z = Ut[b0:b1, ...] @ xp.astype(Gp, xp.float64)  # (b, m, w)
            hb = xp.permute_dims(H[:, b0:b1, :], (1, 0, 2))  # (b, K, m)
            D = xp.permute_dims(hb @ (Z * Z), (1, 0, 2)) * scales  # (K, b, w)
            parts.append(narrowed(xp, alphas + xp.reshape(D, (len(damps), -1)), self.dtype))
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def project(self, A: Array) -> Array:
        """``U_b^T G_b A_b^T`` for the rows of ``A`` (n, d): ``(count, m, n)`` float64."""
        xp = self.xp
        P = _engine.project_blocks(xp, self.G, self.group, _rows_of(xp, A, self.group))
        return xp.matrix_transpose(self.U) @ P


@dataclass(frozen=True)
class ColumnEigen:
    """Blocks no wider than m: each block's ``G_b^T G_b = Q diag(mu) Q^T``, ``Q``
    ``(count, s, s)`` and ``mu`` ``(count, s)`` ascending, clipped at 0, float64."""

    group: BlockGroup
    Q: Array
    mu: Array
    m: int
    dtype: Any

    @property
    def xp(self) -> Any:
        return array_namespace(self.Q)

    @property
    def top(self) -> Array:
        return self.mu

    def _spectrum(self, damp: float, power: float) -> Array:
        return (damp + self.mu / self.m) ** power  # (count, s), positive

    def form(self, damp: float, power: float) -> tuple[float, Array, float]:
        """``(0, f(damp + mu / m), 1)``: ``f(F_b) = Q diag(f(damp + mu / m)) Q^T``."""
        return 0.0, self._spectrum(damp, power), 1.0

    def apply(self, X: Array, damps: list[float], power: float) -> Array:
        xp, g = self.xp, self.group
        k = X.shape[1]
        Xb = xp.reshape(xp.astype(X, xp.float64), (g.count, g.size, k))
        Z = xp.matrix_transpose(self.Q) @ Xb
        out = [
            # (count * size, k) spelled out: -1 is ambiguous for k = 0 (sample(0)).
            xp.reshape(self.Q @ (self._spectrum(dp, power)[..., None] * Z), (g.count * g.size, k))
            for dp in damps
        ]
        return narrowed(xp, xp.stack(out), self.dtype)

    def diagonal(self, damps: list[float], power: float) -> Array:
        # sum_i Q_ji^2 f(damp + mu_i / m): positive terms, nothing cancels.
        xp = self.xp
        S = self.Q * self.Q  # (count, s_j, s_i)
        Fs = xp.stack([self._spectrum(dp, power) for dp in damps], axis=-1)  # (count, s, K)
        D = xp.permute_dims(S @ Fs, (2, 0, 1))  # (K, count, s)
        return narrowed(xp, xp.reshape(D, (len(damps), -1)), self.dtype)

    def project(self, A: Array) -> Array:
        xp, g = self.xp, self.group
        n = A.shape[0]
        Ab = xp.reshape(xp.astype(_rows_of(xp, A, g), xp.float64), (g.count, g.size, n))
        return xp.matrix_transpose(self.Q) @ Ab


#: A group of blocks of the spectral form.
Group = GramEigen | ColumnEigen


# -- the spectral operator's functions of its groups (SpectralIHVP's methods call these) --


def checked_power(current: float, power: float, what: str) -> float:
    """``power``, the power that ``what()`` of ``F**current`` gives, if a closed form has it."""
    if power not in POWERS:
        raise ValueError(
            f"{what}() of F**{current:g} would be F**{power:g}; the closed "
            f"forms cover the powers {', '.join(f'{p:g}' for p in POWERS)}"
        )
    return power


def check_top_in_range(groups: Any, m: int, damp: float) -> float:
    """The largest eigenvalue of the Grams, refused where F's, ``damp + top / m``, overflows.

    Only for ``m = 1`` can it with both terms finite (``check_damp`` keeps ``m damp``
    within a quarter of float64's range): every weight and spectral sum would meet
    ``inf`` there, and the direction's weight become 0 (products of ``1 / damp`` for
    ``1 / (damp + |g|^2)``). StaticIHVP refuses the same G and damping.
    """
    top = max(float(g.xp.max(g.top[:, -1])) for g in groups)
    if math.isinf(damp + top / m):
        raise ValueError(
            f"F's largest eigenvalue, damp + |g|^2 / m, overflows float64 (damp={damp:g}, "
            f"largest eigenvalue of the Gram {top:g}, m={m}): decrease damp, or rescale the "
            "gradients (the damping scales with their square)"
        )
    return top


def spectrum_bounds(xp: Any, groups: Any, m: int, damp: float) -> tuple[float, float]:
    """``(error_scale, kappa)`` of the operator at ``damp`` (see ``SpectralIHVP``).

    Raises ValueError where F's largest eigenvalue overflows (:func:`check_top_in_range`).
    """
    top = check_top_in_range(groups, m, damp)
    kappa = 1.0
    for g in groups:
        t = g.top
        low = t[:, 0] if g.group.size <= m else xp.zeros_like(t[:, 0])
        kappa = max(kappa, float(xp.max(_ratio(xp, damp + t[:, -1] / m, damp + low / m))))
    return 1.0 + top / (m * damp), kappa


def conditioning(xp: Any, group: Group, m: int, damp: float) -> tuple[Array, Array | None]:
    """``(kappa, a)`` of each block of ``group`` at ``damp``: arrays ``(count,)``.

    ``kappa`` is the block's exact condition number. For blocks wider than m, ``a`` is the
    first-order amplification of the float64 eigen-decomposition's rounding (its backward
    error, about ``eps |G_b G_b^T|``, and the m x m work's) in a product, relative to the
    product (docs/mathematics.rst, "When the set-up fails or warns"):

        a = sqrt(t_1) max_j sqrt(t_j) / (1 + t_j),   t_j = Lambda_j / (m damp),

    each ``t_j`` moved within ``delta = m eps t_1`` to its worst value (an eigenvalue is
    known to about ``eps Lambda_1``: those of duplicated gradients, 0 in exact arithmetic,
    cannot be told from nearly collinear ones, which do amplify). ``a`` is None for blocks
    no wider than m (``F_b``'s own eigenpairs: the dense rule).

    The Gram's own float64 sums over a block's ``B`` coordinates round to more than
    ``eps |G_b G_b^T|`` where ``B`` is long: up to about ``sqrt(B)/4 eps`` of it for
    gradients of float32 values, whose exact squares leave the sums' rounding a bias
    (OpenBLAS: 72 eps at ``B = 1e6``, 2300 at ``1e8``; a product of one such gradient 210 %
    off at ``eps kappa a = 0.028``). That rounding enters as the decomposition's does, so
    ``a`` and ``delta`` carry the factor ``max(1, sqrt(B)/8)`` (1 up to ``B = 64``).
    """
    t = group.top
    if isinstance(group, ColumnEigen):
        return _ratio(xp, damp + t[:, -1] / m, damp + t[:, 0] / m), None
    ratio = _ratio(xp, t / m, xp.full_like(t, damp))
    kappa = 1.0 + ratio[:, -1]
    # Past 2 / eps every rule warns already; clipped, nothing below meets inf / inf.
    t = xp.clip(ratio, max=2.0 / EPS64)
    sums = max(1.0, math.sqrt(group.group.size) / 8.0)
    delta = (max(m, sums) * EPS64) * t[:, -1:]
    g = xp.sqrt(t + delta) / (1.0 + xp.clip(t - delta, min=0.0))
    return kappa, sums * xp.sqrt(t[:, -1] + delta[:, 0]) * xp.max(g, axis=-1)


def _ratio(xp: Any, hi: Array, lo: Array) -> Array:
    """``hi / lo`` (positive), ``inf`` where it passes float64's range, without the
    overflow (and NumPy's warning about it) of the division itself."""
    huge = hi * 2.0**-1000 > lo
    return xp.where(huge, xp.full_like(hi, math.inf), hi / xp.where(huge, hi, lo))


def _log1p_over(xp: Any, top: Array, m: int, damp: float) -> Array:
    """``log1p(top / (m damp))`` where the ratio may pass float64's range.

    There (a damping some 1e300 below the squared norms) it is ``log(top / m) -
    log(damp)``, above 690: the 1 is beneath its rounding. It was ``log1p(inf)``, so
    ``logdet`` was infinite for a finite determinant.
    """
    scaled = top / m
    huge = scaled * 2.0**-1000 > damp
    ratio = xp.where(huge, xp.zeros_like(scaled), scaled) / damp
    logs = xp.log(xp.where(huge, scaled, xp.ones_like(scaled))) - math.log(damp)
    return xp.where(huge, logs, xp.log1p(ratio))


def _spectrum_sum(xp: Any, groups: Any, term: Any) -> float:
    """``sum over blocks of term(top, k, size)``, with ``top`` the ``k`` largest eigenvalues."""
    total = 0.0
    for g in groups:
        top = g.top
        total += float(xp.sum(term(top, top.shape[-1], g.group.size)))
    return total


def logdet_of(xp: Any, groups: Any, m: int, damp: float) -> float:
    """``log det F``, summed in float64 over the blocks' spectra."""
    return _spectrum_sum(
        xp,
        groups,
        lambda top, k, size: size * math.log(damp) + xp.sum(_log1p_over(xp, top, m, damp), axis=1),
    )


def trace_of(xp: Any, groups: Any, m: int, damp: float, power: float) -> float:
    """``tr F**power``, summed in float64 over the blocks' spectra."""
    # (B - k) f(damp) + sum f(damp + mu): a sum of positive terms, nothing cancels.
    return _spectrum_sum(
        xp,
        groups,
        lambda top, k, size: (size - k) * damp**power + xp.sum((damp + top / m) ** power, axis=1),
    )


def applied(xp: Any, groups: Any, X: Array, damps: list[float], power: float) -> Array:
    """``f_k(F) X`` for every damping, stacked: ``(K, d, k)``, one pass over G per group."""
    parts = [g.apply(X[g.group.start : g.group.end, ...], damps, power) for g in groups]
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)


def diagonal_of(xp: Any, groups: Any, damps: list[float], power: float) -> Array:
    """The diagonal of ``f_k(F)`` for every damping, stacked: ``(K, d)``."""
    parts = [g.diagonal(damps, power) for g in groups]
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)
