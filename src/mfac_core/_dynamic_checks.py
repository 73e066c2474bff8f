"""The checks of a gradient inserted into a :class:`~mfac_core.DynamicIHVP` window.

Shape, library and dtype are checked at once; the value checks (NaN, infinity,
the range of 2-byte storage) need one number read from the device, which a step
may defer to read with its other checks in one transfer (``_dynamic_factor.judge``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from ._capacitance import EPS64, is_hopeless
from ._compat import (
    SHARDED_SUMS,
    Array,
    is_numpy_namespace,
    is_torch_namespace,
    refuse_derivatives,
    stored,
)
from ._finite import non_finite_entry, non_finite_error
from ._pieces import is_accelerator
from ._validation import check_operand


class Refused(ValueError):
    """A gradient refused for its values.

    ``finite`` tells a range error or a hopeless gradient from NaN/infinity;
    ``hopeless`` marks a finite gradient so large that ``eps(float64) kappa >= 1``.
    """

    def __init__(self, message: str, *, finite: bool, hopeless: bool = False) -> None:
        super().__init__(message)
        self.finite = finite
        self.hopeless = hopeless


#: Bounds ``(lower, upper)`` of an edited window's kappa (:meth:`Pending.kappa_bounds`);
#: ``upper`` None where unknown.
KappaBounds = tuple[float, float | None]


class Pending(NamedTuple):
    """A gradient's value checks left to be read with a step's other checks.

    ``biggest`` is ``max |g|`` (a 0-d array; None where no value check of ``g``
    is asked), judged by :func:`judge_gradient` (``finite``: refuse NaN).
    ``norm2`` is ``|g|^2``, the new diagonal entry of the window's Gram matrix (a
    0-d array, or None), judged by :func:`judge_conditioning` against ``shift``.
    ``quotient`` and ``trace`` (0-d arrays, or None) are a lower bound of the edited Gram
    matrix's largest eigenvalue (its best Rayleigh quotient of two test vectors, less
    its rounding: ``_dynamic_factor.edited_gram_sums``) and its trace, which bound that
    eigenvalue from below and above (:meth:`kappa_bounds`); they are read, not judged.
    """

    g: Any
    biggest: Any
    finite: bool
    norm2: Any = None
    shift: float = 1.0
    quotient: Any = None
    trace: Any = None
    #: Whether ``g`` is known to be finite (called only where ``|g|^2`` overflows).
    known_finite: Callable[[], bool] | None = None

    def arrays(self) -> list[Any]:
        """The 0-d arrays to read, in the order :meth:`judge` takes their values."""
        return [a for a in (self.biggest, self.norm2, self.quotient, self.trace) if a is not None]

    def kappa_bounds(self, values: list[float]) -> KappaBounds | None:
        """Bounds ``(lower, upper)`` of the edited window's kappa from :meth:`arrays`' values.

        ``1 + lambda_max / shift`` with ``lambda_max`` at least ``|g|^2`` and the
        quotient (many nearly collinear gradients, each below the bound alone), and at
        most the trace; ``upper`` is None where no trace was asked or it is not finite.
        None where no ``norm2`` was asked.
        """
        if self.norm2 is None:
            return None
        i = 0 if self.biggest is None else 1  # where norm2's value is (:meth:`arrays`)
        top, i = values[i], i + 1
        if self.quotient is not None:
            quotient, i = values[i], i + 1
            if math.isfinite(quotient) and quotient > top:
                top = quotient
        upper = None
        if self.trace is not None and math.isfinite(values[i]):
            upper = 1.0 + values[i] / self.shift
        return 1.0 + top / self.shift, upper

    def judge(self, op: Any, values: list[float]) -> list[float]:
        """Raise if a check fails; return ``values`` past the ones :meth:`arrays` gave."""
        if self.biggest is not None:
            judge_gradient(op, self.g, values[0], finite=self.finite)
            values = values[1:]
        if self.norm2 is not None:
            judge_conditioning(values[0], self.shift, known_finite=self.known_finite)
            values = values[1:]
        return values[(self.quotient is not None) + (self.trace is not None) :]


def with_norm(
    pending: Pending | None,
    norm2: Any,
    shift: float,
    *,
    quotient: Any = None,
    trace: Any = None,
    known_finite: Callable[[], bool] | None = None,
) -> Pending:
    """``pending`` with the gradient's squared norm to judge against ``shift``, and the
    edited Gram's ``quotient`` and ``trace`` to read (:meth:`Pending.kappa_bounds`);
    ``known_finite``: see :func:`judge_conditioning`."""
    if pending is None:
        return Pending(None, None, False, norm2, shift, quotient, trace, known_finite)
    return pending._replace(
        norm2=norm2, shift=shift, quotient=quotient, trace=trace, known_finite=known_finite
    )


def check_gradient(op: Any, g: Array, *, deferred: bool = False, finite: bool = False) -> Any:
    """``g`` checked (shape, library, dtype; NaN, infinity and range where asked).

    NaN and infinity are refused with ``check_finite`` or ``finite``. With
    ``deferred``, returns ``(g, pending)``: the value checks need a number read
    from the device, which ``pending`` (a :class:`Pending`, or None) leaves to
    ``_dynamic_factor.judge``, so that a step reads all its checks at once.
    """
    return checked_values(op, checked_operand(op, g), deferred=deferred, finite=finite)


def checked_values(op: Any, g: Array, *, deferred: bool = False, finite: bool = False) -> Any:
    """:func:`check_gradient`'s value checks of an operand :func:`checked_operand` returned."""
    finite = finite or op.check_finite
    # A rank of a sharded window may hold no coordinates: nothing to check.
    needed = values_checked(op, finite) and g.shape[0]
    pending = Pending(g, largest_magnitude(op._xp, g), finite) if needed else None
    if deferred:
        return g, pending
    if pending is not None:
        judge_gradient(op, g, float(pending.biggest), finite=finite)
    return g


def checked_operand(op: Any, g: Array) -> Array:
    """``g`` checked for library, device, dtype and shape (promoted, detached); no values."""
    # The window stores gradients, never their autograd history.
    g = check_operand(op._xp, op.device, op.dtype, g, "g", owner=op)
    if op._collective_checks:  # sharded: checked inside the reduction of g's row
        refuse_derivatives(g, "g", SHARDED_SUMS, tangent_only=True)
    g = stored(g, "g")
    if g.ndim != 1 or g.shape[0] != op.dim:
        raise ValueError(f"g must have shape ({op.dim},), got {tuple(g.shape)}")
    return g


def values_checked(op: Any, finite: bool) -> bool:
    """Whether a gradient's values are checked: NaN and infinity, or a 2-byte range."""
    return finite or op.storage_dtype is not None


def largest_magnitude(xp: Any, g: Array) -> Array:
    """``max |g|`` as a 0-d array of ``g``'s library: NaN if ``g`` holds a NaN.

    ``max(max g, -min g)``: the same value as ``max(abs(g))`` (negation is exact),
    without the d-long temporary of ``abs``, which a step would pay on every call.
    PyTorch reads ``g`` once (``aminmax``), NumPy twice; other libraries take the
    generic form. NaN propagates through each (``maximum`` keeps it). A ``g`` of
    zeros gives +0.0 in every form, as ``abs`` does: ``maximum`` of +0.0 and -0.0
    may return either, and adding +0.0 turns -0.0 (only) into +0.0.
    """
    if is_torch_namespace(xp):
        import torch

        low, high = torch.aminmax(g)
        return torch.maximum(high, torch.neg(low)) + 0.0
    if is_numpy_namespace(xp):
        # The array's own methods: the same reductions, without fromnumeric's dispatch.
        return xp.maximum(g.max(), -g.min()) + 0.0
    return generic_largest_magnitude(xp, g)


def generic_largest_magnitude(xp: Any, g: Array) -> Array:
    """:func:`largest_magnitude` in any Array-API library."""
    return xp.max(xp.abs(g))


def judge_gradient(op: Any, g: Array, biggest: float, *, finite: bool) -> None:
    """Raise if ``g``, whose largest magnitude is ``biggest``, is refused.

    NaN and infinity propagate to ``biggest``: one number decides both checks.
    They are refused with ``finite``, and always by a 2-byte window.
    """
    if finite and not math.isfinite(biggest):
        raise non_finite_refusal(op, g)
    if op.storage_dtype is not None:
        check_representable(op, g, biggest)


def non_finite_refusal(op: Any, g: Array) -> Refused:
    """The refusal of a ``g`` holding NaN or infinity, naming its first such entry on the host.

    Built only once the check has failed, so the index costs nothing on success. On
    an accelerator the message names none: finding it would read the device once more,
    and a step's checks are read in one transfer (tests/test_gpu_budgets.py).
    """
    xp = op._xp
    if g is not None and names_entries(op, g):
        error = non_finite_error(xp, g, "g")
        if error is not None:
            return Refused(str(error), finite=False)
    return Refused("g must not contain NaN or infinity", finite=False)


def names_entries(op: Any, g: Array) -> bool:
    """Whether the refusals of ``g``'s values name its entries (:func:`non_finite_refusal`).

    Not for a rank's shard of g (a sharded window), whose indices are local, nor on
    an accelerator, where the index would cost one more read of the device.
    """
    return not getattr(op, "_collective_checks", False) and not is_accelerator(op._xp, g)


def gradient_culprit(op: Any, g: Array) -> Callable[[], str | None] | None:
    """The ``locate`` of a factorisation with ``g`` just put in (``_capacitance.factorize``).

    A window with ``check_finite=False`` lets NaN and infinity into its Gram, whose
    factorisation then fails: it names ``g``'s first such entry where the refusals of
    ``check_finite`` would (:func:`names_entries`), None elsewhere.
    """
    if not names_entries(op, g):
        return None
    return lambda: non_finite_entry(op._xp, g, "g")


def check_representable(op: Any, g: Array, biggest: float) -> None:
    """Refuse a gradient that the 2-byte storage would turn into infinity."""
    xp = op._xp
    info = xp.finfo(op._G.dtype)
    top, eps = float(info.max), float(info.eps)
    # Magnitudes from the largest finite value plus half its spacing upwards round
    # to infinity (the spacing there is 2**emax * eps, and top = (2 - eps) 2**emax).
    limit = top + top * eps / (2 * (2 - eps))
    if not biggest < limit:
        if not math.isfinite(biggest):  # a NaN or infinity given is reported as such
            raise non_finite_refusal(op, g)
        raise Refused(
            f"g does not fit the window's {op.storage_dtype} storage: an entry of magnitude "
            f"{biggest:g} overflows its range (largest finite {top:g}); scale the "
            "gradients or store them in a wider dtype",
            finite=True,
        )


def judge_conditioning(
    norm2: float, shift: float, *, known_finite: Callable[[], bool] | None = None
) -> None:
    """Refuse a gradient whose squared norm makes ``eps(float64) kappa >= 1``.

    ``norm2 = |g|^2`` is a diagonal entry of the window's Gram matrix with ``g``,
    so ``kappa >= 1 + norm2 / shift`` (``shift = k damp``, or ``m damp`` with
    ``zero_init``): the same rule as the JAX window's. The float64 factor and
    passes then leave no correct digit in any product with that window, and a
    window keeps such a gradient for m steps. A ``norm2`` that overflows float64
    is the rule's last case where ``known_finite()`` says ``g`` is finite (a
    float64 gradient of entries beyond ~1e154); otherwise a ``norm2`` that is not
    finite is left to the other checks (NaN, infinity, the factorisation).
    """
    if norm2 == math.inf and known_finite is not None and known_finite():
        raise Refused(
            "g is too large for this window: its squared norm overflows float64, so the "
            "condition number kappa >= 1 + |g|^2 / (k damp) is beyond 1/eps(float64) and no "
            "digit of a product would be correct; clip or scale the gradients",
            finite=True,
            hopeless=True,
        )
    kappa = 1.0 + norm2 / shift
    if math.isfinite(norm2) and is_hopeless(kappa, eps=EPS64):
        raise Refused(
            f"g is too large for this window: its squared norm {norm2:.3g} against the "
            f"damping term {shift:.3g} (k damp, k gradients; m damp with zero_init) makes the "
            f"condition number kappa >= {kappa:.3g}, at or beyond 1/eps(float64) = "
            f"{1 / EPS64:.3g}, where no digit of a product would be correct; clip or scale "
            "the gradients, or increase damp",
            finite=True,
            hopeless=True,
        )
