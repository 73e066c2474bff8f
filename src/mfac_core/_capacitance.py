"""The capacitance factor: ``C = shift * I + scale * Gram`` in float64, shared by every operator.

Both operators reduce F^{-1} to a small symmetric positive definite matrix of
this form: the static Woodbury form and the dynamic window use the m x m
``C = m damp I + G G^T`` (shift ``m damp``, scale 1), dense blocks of the static
operator the B x B ``F_b = damp I + G_b^T G_b / m`` (shift ``damp``, scale
``1/m``). For C of the Woodbury form, whose Gram is singular on F's side (more
coordinates than gradients), the condition number of F is

    kappa = 1 + scale * lambda_max(Gram) / shift;

a dense block's Gram ``G_b^T G_b`` can be nonsingular (gradients that span the
block), and then kappa is smaller: :func:`dense_kappa_lower` bounds it from below
through the inverse factor. This module is the one place that factorises such a matrix, estimates
kappa, edits the factor and words the error when float64 cannot factorise it.

Convention: the upper Cholesky factor, ``C = U^T U`` (LAPACK's ``uplo='U'``),
for a single matrix or a stack. ``U^{-T} = L^{-1}`` is what the static operator
applies to G (``W = U^{-T} G``); the dynamic operator edits rows of ``U``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import _linalg
from ._compat import Array, FoundNamespace, device
from ._errors import (
    FactorizationError,
    IllConditionedWarning,
    NotPositiveDefinite,
    user_stacklevel,
)
from ._validation import check_damp

__all__ = [
    "check_window_damp",
    "dense_kappa_lower",
    "smallest_window_damp",
    "DRIFT_TOL",
    "EPS64",
    "CapacitanceFactor",
    "relative_column_drift",
    "factorize",
    "is_hopeless",
    "is_imprecise",
    "excess_bounds",
    "kappa_bounds",
    "lambda_max_bounds",
    "power_bounds",
    "warn_if_hopeless",
    "warn_if_passes_hopeless",
]

#: Relative drift of diag(U^T U) against diag(C) beyond which an edited factor is
#: refactorised from scratch (the window's drift check).
DRIFT_TOL = 1e-10

#: float64's machine epsilon, the unit of the hopeless rule for the float64 passes.
EPS64 = 2.0**-52
#: ``eps * kappa`` from which a dense block's factor (``F_b`` itself, no wider than m)
#: warns that products may have no correct digit. Its products lose up to about
#: ``c eps(float64) kappa`` (rank-deficient dense blocks: 7 % at eps kappa = 0.44), so the
#: warning comes at 1/32 of where eps kappa alone reaches 1.
WARN_EPS_KAPPA = 2.0**-5
#: ``eps * kappa**1.5`` from which the Woodbury forms (the capacitance ``m damp I + G G^T``,
#: its Cholesky factor or its eigenvectors) warn. The factor's backward error, about eps
#: times its largest eigenvalue, reaches a vector near the gradients' span amplified by up
#: to ``kappa**1.5 / 2`` to first order, where the Gram also has eigenvalues near
#: ``m damp`` (gradients whose spread decays over decades): measured up to 0.08
#: ``eps kappa**1.5`` (46 % at kappa = 1e11), where evenly spread gradients lose about
#: ``eps kappa`` (docs/mathematics.rst, "When the set-up fails or warns"). The warning
#: comes where the first-order bound reaches 1/2: from kappa = 2.7e10 in float64. A window
#: refuses a gradient only from eps kappa >= 1 (:func:`is_hopeless`).
WARN_EPS_KAPPA_WOODBURY = 1.0
#: ``eps * kappa * a`` from which a Woodbury form that knows its spectrum (``SpectralIHVP``'s
#: blocks wider than m) warns, with ``a = sqrt(t_1) max_j sqrt(t_j) / (1 + t_j)`` the exact
#: first-order amplification of the float64 rounding (``t_j m damp`` the Gram's eigenvalues,
#: ``a <= kappa**0.5 / 2``; times ``max(1, sqrt(B)/8)`` for the Gram's sums over ``B``
#: coordinates, ``_spectral_groups.conditioning``). Its products were measured up to 6.5
#: ``eps kappa a`` off (m up to 512; evenly spread gradients, a near 2-5), so one that is not
#: warned of is within about 20 %; :data:`WARN_EPS_KAPPA_WOODBURY`'s rule must hold too (it
#: still decides where some ``t_j`` is near 1), so nothing warns below the worst case's
#: threshold.
WARN_EPS_KAPPA_AMPLIFIED = 2.0**-5
#: How warnings name the precision of the passes' accumulation.
PASSES_DTYPE = "float64 (the passes' accumulation)"

#: Power iterations behind the lower bound of lambda_max (O(k^2) each).
_POWER_ITERATIONS = 4


def lambda_max_bounds(xp: Any, gram: Array, /) -> tuple[Any, Any]:
    """Lower and upper bounds of the largest eigenvalue of each PSD matrix of a stack.

    The upper bound is the trace. The lower bound is the largest Rayleigh quotient
    of a few power iterations started from two unit vectors (:func:`power_bounds`):
    that of the largest diagonal entry, whose quotient is at least ``trace / k >=
    lambda_max / k``, so the bound cannot collapse to zero for a nonzero Gram (a
    start such as the all-ones vector can lie in the null space, e.g. for gradients
    that sum to zero); and that of the largest ``||A e_i||^2 / A_ii``, the quotient
    after one step from ``e_i``, where the largest diagonal entry belongs to an
    eigenvector of a smaller eigenvalue (a gradient orthogonal to the others, beside
    k - 1 nearly collinear ones of a slightly smaller norm: its start alone stayed
    at ``lambda_max / (k - 1)``).

    Returns arrays of the stack's leading shape (float64). A PyTorch CPU stack is
    iterated by NumPy on its memory: PyTorch multiplies even 8 x 8 x 2 on its intra-op
    team, which then spins on the cores that the passes want.
    """
    views = _linalg.host_views(xp, gram)
    if views is not None:
        bounds = lambda_max_bounds(_linalg.host_namespace(), views[0])
        return tuple(xp.asarray(b, device=device(gram)) for b in bounds)
    return power_bounds(
        xp,
        xp.linalg.diagonal(gram),
        lambda v: gram @ v,
        column_norms2=xp.sum(gram * gram, axis=-2),
    )


def power_bounds(
    xp: Any,
    diag: Array,
    matvec: Callable[[Array], Array],
    /,
    *,
    column_norms2: Array | None = None,
) -> tuple[Any, Any]:
    """:func:`lambda_max_bounds` of a stack given by its diagonal and its product.

    ``diag`` is ``(..., k)``, ``matvec`` maps a ``(..., k, n)`` stack of vectors (in the
    columns, n of 1 or 2) to the matrices' products with them; a caller that holds a
    factor rather than the matrix (the dense blocks' set-up) passes products through it.
    Each product serves both a Rayleigh quotient and the next iterate. The iterations
    start from the unit vector of the largest diagonal entry and from a second vector:
    where the squared column norms ``||A e_i||^2`` are given (``(..., k)``), the unit
    vector of the largest ``||A e_i||^2 / A_ii`` (for a PSD matrix the Rayleigh
    quotient of ``A e_i``, at least ``tr(A^2) / tr(A) >= lambda_max^2 / tr(A)``);
    otherwise fixed pseudo-random signs (:func:`_signs`), which a caller holding only a
    factor gets for O(k^2), where the columns' norms would cost a product of factors.
    """
    upper = xp.sum(diag, axis=-1)
    k = diag.shape[-1]
    if k == 0:
        # A 0 x 0 matrix has no eigenvalue: both bounds are the empty sum, 0.
        return upper, upper
    index = xp.arange(k, device=device(diag))
    first = xp.astype(index == xp.argmax(diag, axis=-1)[..., None], diag.dtype)
    if column_norms2 is not None:
        # A zero diagonal entry has a zero column (PSD): its ratio is 0, not 0 / 0.
        best = xp.argmax(column_norms2 / xp.where(diag > 0, diag, 1.0), axis=-1)
        second = xp.astype(index == best[..., None], diag.dtype)
    else:
        signs = xp.asarray(_signs(k), dtype=diag.dtype, device=device(diag))
        second = xp.broadcast_to(signs, diag.shape)
    v = xp.stack([first, second], axis=-1)
    lower = xp.max(diag, axis=-1)
    w = matvec(v)
    for _ in range(_POWER_ITERATIONS):
        # Rescale each iterate so that it neither overflows nor underflows.
        scale = xp.max(xp.abs(w), axis=-2, keepdims=True)
        v = w / xp.where(scale > 0, scale, 1.0)
        norm2 = xp.sum(v * v, axis=-2)
        w = matvec(v)
        rayleigh = xp.sum(v * w, axis=-2) / xp.where(norm2 > 0, norm2, 1.0)
        lower = xp.maximum(lower, xp.max(rayleigh, axis=-1))
    return lower, upper


@functools.cache
def _signs(k: int) -> tuple[float, ...]:
    """``k`` fixed pseudo-random signs: the parity of the bits of ``i`` times 2654435761.

    Pseudo-random rather than all equal or alternating, which gradients that cancel in
    pairs (``g, -g``) or in sign patterns make orthogonal to the top eigenvector; fixed,
    so that the same gradients give the same bound (and warning) on every call.
    """
    return tuple(-1.0 if (i * 2654435761 & 0xFFFFFFFF).bit_count() & 1 else 1.0 for i in range(k))


def excess_bounds(xp: Any, gram: Array, /, *, shift: float, scale: float) -> tuple[Any, Any]:
    """Bounds of ``kappa - 1 = scale * lambda_max(Gram) / shift`` for each matrix of a stack.

    The power iterations run on the Gram scaled by ``2**-e``, ``e = ceil(log2(largest
    diagonal entry))`` clipped to float64's normal exponents (XLA flushes subnormals to
    zero): exactly the same bounds, scaled, where the Gram's own products (k entries of
    up to ``max |g|^2`` summed) would overflow although ``lambda_max`` does not. The
    scale comes back before the division by ``shift`` where it shrinks the bound, after it
    where it grows it: each overflows only where ``kappa`` does, and the roundings are
    those of the unscaled form. Arrays of the stack's leading shape (any Array-API
    library, JAX under ``jit`` too).
    """
    top = xp.max(xp.linalg.diagonal(gram))
    e = xp.clip(xp.ceil(xp.log2(xp.where(top > 0, top, 1.0))), min=-1022.0, max=1022.0)
    lo, hi = lambda_max_bounds(xp, gram * xp.pow(2.0, -e))
    back = xp.pow(2.0, e)
    return (
        xp.where(e > 0, scale * lo / shift * back, scale * (lo * back) / shift),
        xp.where(e > 0, scale * hi / shift * back, scale * (hi * back) / shift),
    )


def kappa_bounds(xp: Any, gram: Array, /, *, shift: float, scale: float) -> tuple[float, float]:
    """Bounds ``(lo, hi)`` of the largest condition number over a stack of capacitances.

    ``kappa = 1 + scale * lambda_max(Gram) / shift`` for each matrix of the stack
    (:func:`excess_bounds`).
    """
    if not gram.shape[-1] or math.prod(gram.shape[:-2]) == 0:
        return 1.0, 1.0
    # A Gram with inf (the gradients' squared norms overflow, or G holds inf) gives NaN
    # bounds, which factorization_error words; NumPy's RuntimeWarning would come first,
    # and be the error where warnings are errors (np.errstate is local to this context).
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = excess_bounds(xp, gram, shift=shift, scale=scale)
    return (1.0 + float(xp.max(lo)), 1.0 + float(xp.max(hi)))


def dense_kappa_lower(xp: Any, lam_max_lower: Array, Linv: Array, /) -> float:
    """A lower bound of the largest condition number over a stack of dense blocks ``F_b``.

    ``lam_max_lower`` holds lower bounds of ``lambda_max(F_b)`` (shape ``(...,)``) and
    ``Linv`` the inverses of the blocks' Cholesky factors ``F_b = L_b L_b^T`` (shape
    ``(..., s, s)``). Since ``F_b^{-1} = Linv^T Linv``, its diagonal holds the squared
    column norms of ``Linv``, and ``lambda_min(F_b) = 1 / lambda_max(F_b^{-1})`` is at
    most ``1 / max_j (F_b^{-1})_jj``. Where the gradients span a block, this is far
    below ``1 + lambda_max(S_b) / damp``, which assumes ``lambda_min(F_b) = damp``.
    """
    diag_inverse = xp.sum(Linv * Linv, axis=-2)
    # Nothing here may warn: an overflowing inverse (a hopeless block) gives inf, the
    # bound the warning then reports (np.errstate is local to this context).
    with np.errstate(over="ignore", invalid="ignore"):
        lower = lam_max_lower * xp.max(diag_inverse, axis=-1)
        kappa = float(xp.max(lower)) if math.prod(lower.shape) else 1.0
    return max(1.0, kappa) if not math.isnan(kappa) else math.inf


#: What :func:`factorize`'s ``locate`` returns for gradients found finite: their Gram is
#: not finite because their squared norms overflow.
FINITE = ""


def non_finite_gram_error(damp: float, culprit: str | None) -> FactorizationError:
    """:func:`factorization_error` for a Gram that is not finite (its kappa is infinite).

    ``culprit`` names the gradients' first NaN or infinity (``"G[4, 7] is nan"``), or
    is None where they are finite (their squared norms overflow float64).
    """
    return factorization_error(
        damp, (math.inf, math.inf), culprit=FINITE if culprit is None else culprit
    )


def factorization_error(
    damp: float,
    kappa: tuple[float, float],
    *,
    gram_dtype: str = "float64",
    culprit: str | None = None,
    gram_finite: bool = False,
) -> FactorizationError:
    """The one wording of a failed factorisation: it names damp and kappa.

    For a Gram that is not finite, ``culprit`` (where the gradients were looked at) names
    their first NaN or infinity (``"G[4, 7] is nan"``, as the refusals of ``check_finite``
    word it), or is :data:`FINITE` for finite gradients whose squared norms overflow.
    ``gram_finite`` says that the Gram's diagonal (which bounds every entry) was found
    finite: a kappa that is not finite then overflowed by itself (``lambda_max / shift``
    with a damping near float64's smallest normal number), and the Gram is not blamed.
    """
    lo, hi = kappa
    if not (math.isfinite(lo) and math.isfinite(hi)) and not gram_finite:
        head = f"the Gram matrix of these gradients is not finite (damp={damp:g}): "
        if culprit == FINITE:
            return FactorizationError(
                head + "the gradients are finite, but so large that their squared norms "
                "overflow float64; rescale the gradients (the damping scales with their square)"
            )
        if culprit is not None:
            return FactorizationError(head + f"the gradients hold NaN or infinity: {culprit}")
        return FactorizationError(
            head + "the gradients hold NaN or infinity, or are so large that their squared "
            "norms overflow"
        )
    cause = (
        f"its Gram matrix was accumulated in {gram_dtype}, whose rounding can make a nearly "
        "singular matrix indefinite; use float64 gradients, "
        if gram_dtype != "float64"
        else ""
    )
    return FactorizationError(
        f"the damped Fisher of these gradients is not numerically positive definite "
        f"(damp={damp:g}, condition number kappa {_kappa_range(lo, hi)}); {cause}"
        "increase damp, or remove duplicated or nearly collinear gradients"
    )


def _kappa_range(lo: float, hi: float) -> str:
    """``"between 3e+12 and 6e+12"``, or what is known where a bound overflowed float64."""
    if math.isfinite(hi):
        return f"between {lo:.3g} and {hi:.3g}"
    if math.isfinite(lo):
        return f"at least {lo:.3g}"
    return f"beyond float64's range (above {np.finfo(np.float64).max:.3g})"


def is_hopeless(kappa_lower: Any, *, eps: float) -> Any:
    """Whether ``eps * kappa >= 1``: products then have no correct digit in general.

    The rule by which a window refuses a gradient. A pure function of its argument, so
    it also takes (traced) arrays.
    """
    return eps * kappa_lower >= 1.0


def is_imprecise(
    kappa_lower: Any, *, eps: float, dense: bool = False, amplification: Any = None
) -> Any:
    """Whether products may have no correct digit: the rule of :func:`warn_if_hopeless`.

    ``eps * kappa**1.5 >= WARN_EPS_KAPPA_WOODBURY`` for the Woodbury forms,
    ``eps * kappa >= WARN_EPS_KAPPA`` for ``dense`` blocks' factors; both earlier than
    :func:`is_hopeless`. A Woodbury form that knows its first-order ``amplification``
    (:data:`WARN_EPS_KAPPA_AMPLIFIED`) warns only where ``eps * kappa * amplification``
    reaches that too: never below the worst case's threshold. A pure function of its
    arguments, so it also takes (traced) arrays.
    """
    if dense:
        return eps * kappa_lower >= WARN_EPS_KAPPA
    worst = eps * kappa_lower * kappa_lower**0.5 >= WARN_EPS_KAPPA_WOODBURY
    if amplification is None:
        return worst
    return worst & (eps * kappa_lower * amplification >= WARN_EPS_KAPPA_AMPLIFIED)


def smallest_window_damp(xp: Any, dtype: Any, count: int) -> float:
    """The smallest damping with which a window of ``dtype`` can take a nonzero gradient.

    A window (``_dynamic_checks.judge_conditioning``, the JAX window's step) refuses
    ``g`` where ``eps(float64) (1 + |g|^2 / shift) >= 1``, with ``shift = count damp``
    (``count``: 1 for an emptied window's first gradient, ``num_grads`` with
    ``zero_init``). The smallest nonzero ``|g|^2``
    of the storage ``dtype`` is the square of its smallest subnormal
    (``smallest_normal * eps``; exact in float64 for float32 and the 2-byte dtypes),
    so that below the damping returned every nonzero gradient is refused. It is 0.0
    for float64, whose smallest subnormal squares to zero.
    """
    info = xp.finfo(dtype)
    tiny = float(info.smallest_normal) * float(info.eps)
    norm2 = tiny * tiny
    if norm2 == 0.0:
        return 0.0
    floor = norm2 / (count * (1.0 / EPS64 - 1.0))
    while is_hopeless(1.0 + norm2 / (count * floor), eps=EPS64):
        floor = math.nextafter(floor, math.inf)
    return floor


def check_window_damp(xp: Any, dtype: Any, num_grads: int, zero_init: bool, damp: float) -> None:
    """Refuse a (checked) damping with which a window could take no nonzero gradient.

    Judged for the window's emptiest state (an emptied window's first gradient, or
    any with ``zero_init``), which every window can reach (``reset``): below it the
    window would refuse every later gradient as too large. Also refused: a damping
    whose shift at a full window, ``m damp``, overflows float64 (:func:`check_damp`).
    """
    check_damp(damp, num_grads=num_grads)
    count = num_grads if zero_init else 1
    floor = smallest_window_damp(xp, dtype, count)
    if damp < floor:
        name = str(getattr(xp.finfo(dtype), "dtype", dtype)).rsplit(".", 1)[-1]
        when = "with zero_init, against m * damp" if zero_init else "in an empty window"
        raise ValueError(
            f"damp={damp!r} is too small for a {name} window: it would refuse every nonzero "
            f"gradient as too large (even one {name} subnormal gives eps(float64) * kappa >= 1 "
            f"{when}); the smallest damping that works is {floor!r}"
        )


def warn_if_hopeless(
    kappa_lower: float,
    *,
    damp: float,
    eps: float,
    dtype: Any,
    dense: bool = False,
    amplification: float | None = None,
) -> None:
    """Warn where :func:`is_imprecise` says products may have no correct digit.

    The warning names the user's line that led here (``user_stacklevel``).
    """
    if is_imprecise(kappa_lower, eps=eps, dense=dense, amplification=amplification):
        rule = "eps * kappa >= 1/32" if dense else "eps * kappa**1.5 >= 1"
        if amplification is not None and not dense:
            rule = (
                f"eps * kappa * a >= 1/32 for the spectrum's amplification a = "
                f"{amplification:.3g}, and {rule}"
            )
        warnings.warn(
            f"F is so ill-conditioned (kappa >= {kappa_lower:.3g}, damp={damp:g}) that "
            f"{dtype} products of vectors near the gradients' span may have no correct "
            f"digits ({rule}); increase damp" + (" or use float64" if eps > 1e-15 else ""),
            IllConditionedWarning,
            stacklevel=user_stacklevel(),
        )


def warn_if_passes_hopeless(
    kappa_lower: float, *, damp: float, dense: bool = False, amplification: float | None = None
) -> None:
    """:func:`warn_if_hopeless` for the float64 factor and passes, whatever the storage dtype.

    The passes over the gradients and the factor are float64 (docs/mathematics.rst,
    "Exact passes"), so float64's eps, not the storage's, decides when digits run out.
    ``dense``: every factor is a dense block's (the rule of :data:`WARN_EPS_KAPPA`);
    ``amplification``: the exact first-order one (:data:`WARN_EPS_KAPPA_AMPLIFIED`).
    """
    warn_if_hopeless(
        kappa_lower,
        damp=damp,
        eps=EPS64,
        dtype=PASSES_DTYPE,
        dense=dense,
        amplification=amplification,
    )


@dataclass(frozen=True)
class CapacitanceFactor(FoundNamespace):
    """The upper Cholesky factor ``U`` of ``C = shift * I + scale * Gram`` (float64).

    ``U`` is one ``(k, k)`` matrix or a stack ``(..., k, k)``; its strict lower
    triangle is zero.

    Attributes
    ----------
    U : array
        The factor.
    shift, scale : float
        The shape of C (see the module docstring).
    kappa : tuple of float
        Bounds ``(lo, hi)`` of the largest condition number, or ``None`` where
        they were not computed (an edited factor).
    """

    U: Array
    shift: float
    scale: float
    kappa: tuple[float, float] | None = None

    _NAMESPACE_FIELD: ClassVar[str] = "U"

    @property
    def size(self) -> int:
        """k, the order of C."""
        return int(self.U.shape[-1])

    def lower_inverse(self) -> Array:
        """``U^{-T}`` (lower triangular), so that ``C^{-1} = (U^{-T})^T U^{-T}``."""
        xp = self.xp
        return _linalg.triangular_inverse(xp, xp.matrix_transpose(self.U), lower=True)

    def inverse(self) -> Array:
        """``C^{-1}`` (float64), for matrices small enough to hold densely."""
        Linv = self.lower_inverse()
        return self.xp.matrix_transpose(Linv) @ Linv

    def solve(self, P: Array, /) -> Array:
        """``C^{-1} P`` by two triangular solves (never through an inverse)."""
        xp = self.xp
        Z = _linalg.solve_triangular(xp, self.U, P, lower=False, trans=True)
        return _linalg.solve_triangular(xp, self.U, Z, lower=False)

    def replace_row(self, p: int, b: Array, c: float, /, *, out: Array) -> CapacitanceFactor:
        """The factor with row/column ``p`` removed and ``[b; c]`` appended last, in O(k^2).

        ``b`` holds the new row's entries of ``scale * Gram`` against the other rows in
        their order, ``c`` the new diagonal entry of C (shift included). The result
        is written into ``out`` (a C-contiguous ``(k, k)`` float64 buffer, not ``U``).

        Raises
        ------
        NotPositiveDefinite
            If the new pivot is not positive; the caller refactorises in full.
        """
        U = _linalg.replace_row(self.xp, self.U, p, b, c, out)
        return CapacitanceFactor(U, self.shift, self.scale).namespace_of(self)

    def replace_row_deferred(
        self, p: int, b: Array, c: Any, /, *, out: Array
    ) -> tuple[CapacitanceFactor, Any]:
        """As :meth:`replace_row`, the pivot's check left to the caller (no host read).

        ``c`` may be a 0-d device array. Returns the factor and ``margin``, a 0-d
        array positive exactly when the pivot is (None where the backend checked the
        pivot itself and raised ``NotPositiveDefinite`` if it failed).
        """
        U, margin = _linalg.replace_row(self.xp, self.U, p, b, c, out, deferred=True)
        return CapacitanceFactor(U, self.shift, self.scale).namespace_of(self), margin

    def column_drift(self, columns: Array, want: Array, /) -> float:
        """Largest relative error of ``diag(U^T U)`` on ``columns`` against ``want``.

        A cheap check of an edited factor: rounding drift of the rank-one updates
        spreads over every column, so a sample of columns sees it.
        """
        return float(self.column_drift_array(columns, want))

    def column_drift_array(self, columns: Array, want: Array, /) -> Array:
        """:meth:`column_drift` as a 0-d array on the device (no host read)."""
        return relative_column_drift(self.xp, self.xp.take(self.U, columns, axis=1), want)


def relative_column_drift(xp: Any, Uc: Array, want: Array, /) -> Any:
    """Largest relative error of the squared column norms of ``Uc`` against ``want``.

    ``diag(U^T U)`` on some (or all) columns of an edited factor against the
    diagonal of ``C`` there: the drift check of a row edit, compared with
    :data:`DRIFT_TOL`. A pure function of arrays (a 0-d array; jittable).
    """
    got = xp.sum(Uc * Uc, axis=0)
    return xp.max(xp.abs(got - want) / want)


def factorize(
    xp: Any,
    gram: Array,
    /,
    *,
    shift: float,
    scale: float,
    damp: float,
    gram_dtype: str = "float64",
    out: Array = None,
    locate: Callable[[], str | None] | None = None,
) -> CapacitanceFactor:
    """Factorise ``C = shift * I + scale * gram`` (float64; a matrix or a stack).

    Parameters
    ----------
    xp : module
        The namespace of ``gram``.
    gram : array (..., k, k)
        Symmetric positive semi-definite, float64.
    shift, scale : float
        The shape of C; ``shift > 0``.
    damp : float
        The damping, for the error message.
    gram_dtype : str, optional
        The dtype in which the Gram matrix was accumulated, for the error message.
    out : array (k, k), optional
        A C-contiguous float64 buffer for ``U`` (a single matrix only).
    locate : callable, optional
        Called only where the Gram is not finite (the failure path: a successful call
        reads nothing more): the first NaN or infinity of the gradients behind it, in
        the words of ``_finite.non_finite_entry``, or None where they are finite.

    Raises
    ------
    FactorizationError
        If some matrix of the stack is not numerically positive definite in
        float64; the message names ``damp`` and bounds of ``kappa``.
    """
    kappa = kappa_bounds(xp, gram, shift=shift, scale=scale)
    if not gram.shape[-1]:
        return CapacitanceFactor(
            xp.zeros(gram.shape, dtype=xp.float64, device=device(gram)), shift, scale, kappa
        )
    eye = xp.eye(gram.shape[-1], dtype=xp.float64, device=device(gram))
    # C's diagonal may overflow beside a large shift: told apart below, after the failure.
    with np.errstate(over="ignore"):
        C = scale * gram + shift * eye
    try:
        L = _linalg.cholesky(xp, C)
    except NotPositiveDefinite:
        top = shift + scale * float(xp.max(xp.linalg.diagonal(gram)))
        if math.isfinite(kappa[1]) and not math.isfinite(top):
            # C's diagonal overflowed: no damping is too small here, so kappa's advice
            # ("increase damp") would mislead.
            raise FactorizationError(
                f"the capacitance matrix overflows float64 (damp={damp:g}): the damping "
                "term plus the gradients' squared norms exceed float64's range; decrease "
                "damp, or rescale the gradients (the damping scales with their square)"
            ) from None
        # Each off-diagonal entry is bounded by the diagonal's: a Gram that is not
        # finite has a diagonal that is not, and gradients behind it to look at.
        finite = bool(xp.all(xp.isfinite(xp.linalg.diagonal(gram))))
        culprit = None
        if locate is not None and not finite:
            found = locate()
            culprit = FINITE if found is None else found
        raise factorization_error(
            damp, kappa, gram_dtype=gram_dtype, culprit=culprit, gram_finite=finite
        ) from None
    U = xp.matrix_transpose(L)
    if out is not None:
        out[...] = U
        U = out
    return CapacitanceFactor(U, shift, scale, kappa)
