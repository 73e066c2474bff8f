"""The editable capacitance factor of a :class:`~mfac_core.DynamicIHVP` window.

``C = shift I + Gram[slots][:, slots] = U^T U`` in float64, with the slot of each
row of ``U`` (the *factor slots*): computed in full (O(k^3)) or edited in O(m^2)
when one gradient is replaced, its drift checked on a sample of columns. The
functions take the operator and read its window and Gram matrix; none of them
changes the operator (the free factor buffer is scratch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _capacitance, _engine, _host_rows, _linalg, _pieces
from ._attributes import reassign
from ._capacitance import DRIFT_TOL, CapacitanceFactor, relative_column_drift
from ._compat import Array, has_tangent, host_values, take
from ._compat import device as device_of
from ._dynamic_checks import KappaBounds, Pending, with_norm
from ._errors import NotPositiveDefinite
from ._finite import float32_overflow_said_now, narrowed
from ._refine import refine
from ._validation import check_damp

#: The least normal float64: :func:`probe_vectors` divides by ``|g|^2`` plus it.
TINY = float(np.finfo(np.float64).tiny)


#: Columns of an edited factor checked for drift after each edit (O(m) each).
DRIFT_SAMPLE = 32


def evenly_spaced(k: int, count: int) -> list[int]:
    """Up to ``count`` evenly spaced positions in ``range(k)``, both ends included."""
    if k <= count:
        return list(range(k))
    return sorted({round(i * (k - 1) / (count - 1)) for i in range(count)})


@dataclass(frozen=True)
class SlotFactor:
    """The capacitance factor of the window, with the slot of each of its rows.

    Attributes
    ----------
    factor : CapacitanceFactor
        ``C = shift I + Gram[slots][:, slots] = U^T U``.
    slots : tuple of int
        The factor slots: the slot of each row of ``U``.
    slot_index : array
        ``slots`` as an int64 array on the device.
    position : array
        For each of the m slots its row in ``U``, or k for slots outside the
        factor (which read an appended zero).
    """

    factor: CapacitanceFactor
    slots: tuple[int, ...]
    slot_index: Any
    position: Any

    @classmethod
    def build(cls, factor: CapacitanceFactor, slots: Iterable[int], num_slots: int) -> SlotFactor:
        xp = factor.xp
        slots = tuple(slots)
        dev = device_of(factor.U)
        where = [len(slots)] * num_slots
        for row, slot in enumerate(slots):
            where[slot] = row
        return cls(
            factor,
            slots,
            xp.asarray(list(slots), dtype=xp.int64, device=dev),
            xp.asarray(where, dtype=xp.int64, device=dev),
        )

    def moved_index(self, row: int) -> Array:
        """``slot_index`` with entry ``row`` moved last (that of :meth:`moved_last`)."""
        si = self.slot_index
        return self.factor.xp.concat([si[:row], si[row + 1 :], si[row : row + 1]])

    def moved_last(
        self, factor: CapacitanceFactor, row: int, slot_index: Array | None = None
    ) -> SlotFactor:
        """The slot factor whose ``factor`` holds this one's rows with ``row`` moved last.

        What a row edit of the factor returns; the index arrays are derived from this
        one's on the device (no array made from host data on the hot path).
        ``slot_index`` is :meth:`moved_index`, where the caller made it already.
        """
        xp = factor.xp
        k = len(self.slots)
        pos = self.position
        slot_index = self.moved_index(row) if slot_index is None else slot_index
        if k == pos.shape[0]:
            # Every slot is in the factor (a full window's edit): position is the
            # inverse of the permutation slot_index, one call where the rule below
            # takes nine.
            position = xp.argsort(slot_index)
        else:
            # Rows after ``row`` move up one, ``row`` goes last; slots outside the factor
            # (position k) stay.
            up = xp.astype((pos > row) & (pos < k), xp.int64)
            last = xp.astype(pos == row, xp.int64)
            position = pos - up + last * (k - 1 - row)
        slots = self.slots[:row] + self.slots[row + 1 :] + self.slots[row : row + 1]
        return SlotFactor(factor, slots, slot_index, position)

    def coefficients(self, P: Array) -> Array:
        """``C^{-1} P`` in slot order (zero rows for slots outside the factor)."""
        xp = self.factor.xp
        coef = self.factor.solve(take(xp, P, self.slot_index, axis=0))
        if len(self.slots) == self.position.shape[0]:
            return take(xp, coef, self.position, axis=0)  # no slot outside the factor
        zero = xp.zeros((1, coef.shape[1]), dtype=coef.dtype, device=device_of(coef))
        return take(xp, xp.concat([coef, zero], axis=0), self.position, axis=0)


class NotFiniteStep(Exception):
    """A strict :class:`Speculation`'s product holds NaN or infinity: the insert is refused."""


class Speculation:
    """The step's product, computed with the new factor before the window commits to it.

    On the steady-state path (a row edit) ``compute`` returns the product's
    finiteness as a 0-d array, read with the row edit's checks in one transfer
    (:func:`edited`); the product stands only if the edit is kept (``s`` is None
    otherwise). On the other paths (the window filling up, a refactorisation)
    :meth:`settle` computes it with the factor about to be committed, where the
    product was computed after the commit before: the same work, read once.
    ``strict`` refuses a product that is not finite before the commit, so that
    the window is as it was (``errors="raise"`` of :class:`mfac_core.torch.MFAC`).
    ``agree`` (a sharded window's strict step) is the caller's collective that
    decides on every rank alike whether the product is finite: the reduction its
    step makes of the product anyway (an all-gather of it, or the sum of a flag),
    moved before the commit, in place of a reduction of its own.
    ``say_overflow`` (:meth:`DynamicIHVP.update_and_matvec`'s, unsharded) says a
    product beyond float32's range before the commit, so that the warning turned into
    an error refuses the insert; such a speculation neither needs the product's
    finiteness nor refuses a gradient's NaN or infinity beyond ``check_finite``.
    """

    def __init__(
        self,
        op: Any,
        *,
        strict: bool = False,
        agree: Callable[[Array], bool] | None = None,
        say_overflow: bool = False,
    ) -> None:
        self._op = op
        self.strict = strict
        self.agree = agree
        self.say_overflow = say_overflow
        self.X: Any = None
        self.P: Any = None
        self.s: Any = None
        self.finite = False

    def compute(self, factor: SlotFactor) -> Array | None:
        """The product with ``factor`` into ``s``, and its finiteness as a 0-d array.

        None in place of the finiteness where ``agree`` decides it (:meth:`settle`):
        the local one would be overridden, and costs a read of ``s``.
        """
        op, xp = self._op, self._op._xp
        self.s = op._refined(self.X, op._finish(self.X, self.P, factor), factor)[:, 0]
        if self._agreed() or (self.say_overflow and not self.strict):
            return None  # agree's business, or nobody's (a read of s saved)
        return _host_rows.all_finite(xp, self.s)

    def _agreed(self) -> bool:
        """Whether ``agree`` decides the product's finiteness (a sharded strict step)."""
        return self.strict and self._op._collective_checks and self.agree is not None

    def settle(self, factor: SlotFactor) -> None:
        """The product with ``factor`` (the row edit's, if it made it) and its finiteness.

        Raises ``NotFiniteStep`` where ``strict`` and the product is not finite; a
        sharded window then decides on every rank alike: through ``agree``, or else
        one reduction of one number (without ``strict`` its caller decides, after the
        product).
        """
        op, xp = self._op, self._op._xp
        agree = self.agree if self._agreed() else None
        if agree is not None:
            if self.s is None:
                self.compute(factor)  # no local finiteness: agree's business
            self.finite = bool(agree(self.s))
        else:
            if self.s is None:
                self.finite = bool(self.compute(factor))
            if self.strict and op._collective_checks:
                flag = [0.0 if self.finite else 1.0]
                bad = xp.asarray(flag, dtype=xp.float64, device=op.device)
                self.finite = float(op._summed(bad)[0]) == 0.0
        if self.strict and not self.finite:
            raise NotFiniteStep
        if self.say_overflow:
            float32_overflow_said_now()  # before the commit (see the class)


# -- products: the factor applied (DynamicIHVP._finish, _solve, _refined) ------------------


def finished(op: Any, X: Array, P: Array, factor: SlotFactor | None = None) -> Any:
    """``(X - G^T C^{-1} P) / damp`` given ``P = G X`` (float64, slot order).

    With the operator's factor unless ``factor`` is given (see :func:`edited`).
    """
    factor = op._factor if factor is None else factor
    if not factor.slots:
        # In float64 and rounded once, as the other products: a float32 division would
        # divide by the damping rounded to float32 (0 below float32's range).
        xp = op._xp
        return narrowed(xp, xp.astype(X, xp.float64) / op.damp, op.dtype)
    A = factor.coefficients(P)
    # The window's rows change in place (constant_G=False: the pieces keep copies).
    return _engine.combine(
        op._xp, op._G, X, A, alpha=1.0 / op.damp, dtype=op.dtype, constant_G=False
    )


def solved(op: Any, X: Array, factor: SlotFactor | None = None) -> Array:
    """``F^{-1} X`` without refinement: ``G X`` summed over the coordinates, then finished."""
    X = _engine.widened_for_derivatives(op._xp, X)
    P = _engine.project(op._xp, op._G, X, constant_G=False)
    return finished(op, X, op._summed(P), factor)


def refined(op: Any, X: Array, Y: Array, factor: SlotFactor | None = None) -> Array:
    """``Y ~ F^{-1} X`` after ``op.refine`` steps of iterative refinement.

    With the operator's factor unless ``factor`` is given (the window's size is
    that of its slots).
    """
    factor = op._factor if factor is None else factor
    if not op.refine or not factor.slots:
        return Y  # an empty window's F = damp I is applied exactly
    # The factor's slots are the window's: a factor about to be committed counts the
    # gradient being inserted (``Speculation.settle``).
    scale = 1.0 / (op.num_grads if op.zero_init else len(factor.slots))

    def residual(X: Array, Y64: Array) -> Array | None:
        return op._residual(X, Y64, scale)

    def solve(R: Array) -> Array:
        return solved(op, R, factor)

    return refine(op._xp, solve, residual, X, Y, op.refine, collective=op._collective_checks)


# -- the operator's factor replaced (DynamicIHVP._commit, set_damp) ------------------------


def committed(op: Any, factor: SlotFactor, *, refactored: bool) -> None:
    """Make ``factor`` the operator's, counting the edit (nothing here can fail)."""
    op._factor = factor
    op._version += 1
    if refactored:
        op._edits = 0
        op.refactor_count += 1
    else:
        op._edits += 1


#: What an edit of a window replaces (never edits in place): :func:`all_or_nothing` keeps
#: them, and puts them back where the edit is cut short.
_REPLACED = (
    "_factor",
    "_version",
    "_edits",
    "refactor_count",
    "damp",
    "_gram",
    "_exact_gram",
    "_window",
    "_free",
    "_warned_hopeless",
)


@contextmanager
def all_or_nothing(
    op: Any, *, undo: Callable[[], None] | None = None
) -> Iterator[Callable[[int, Any], None]]:
    """Make the edit of ``op`` in the ``with`` block all of it, or none of it.

    Whatever stops the block (a refusal, an error, a warning that a filter makes an
    error, or an interrupt, which Python raises between two statements) puts back the
    attributes of ``_REPLACED`` (the block assigns them new objects, the window's
    deques included), the Gram row that the block set through the function it is given
    (``set_row(slot, b)`` sets row and column ``slot`` in place, keeping the old row
    first), and whatever ``undo`` restores (a buffer row). A row not set is not put
    back: no device read on a refused step, and no write into a Gram that torch.func
    captured, which it refuses.
    """
    saved = [(name, getattr(op, name, False)) for name in _REPLACED]
    gram = op._gram
    rows: list[tuple[int, Any]] = []

    def set_row(slot: int, b: Any) -> None:
        if op._gram is gram:  # not a Gram recomputed in the block, which is dropped
            rows.append((slot, op._xp.asarray(gram[slot, :], copy=True)))
        op._gram[slot, :] = b
        op._gram[:, slot] = b

    try:
        yield set_row
    except BaseException:
        for name, value in saved:
            object.__setattr__(op, name, value)
        for slot, row in rows:
            gram[slot, :] = row
            gram[:, slot] = row
        if undo is not None:
            undo()
        raise


def completed(commit: Callable[[], None]) -> None:
    """Run ``commit`` to its end, also where an interrupt is raised in it, then raise that.

    For commits that replace the whole state (a reset, a loaded state), where putting the
    old one back would need a copy of the buffer: ``commit`` cannot fail otherwise and must
    give the same state when run again.
    """
    interrupt: BaseException | None = None
    for _ in range(3):  # an interrupt in the rerun too: run it once more
        try:
            commit()
        except BaseException as exc:
            interrupt = interrupt or exc
            continue
        break
    if interrupt is not None:
        raise interrupt


def warned_anew(op: Any, factor: CapacitanceFactor) -> bool:
    """Warn where ``factor``'s window is hopeless, whether or not the window warned before.

    For a new set-up of the window (another damping, a loaded state): returns whether it
    is hopeless, the warn-once note that the caller commits with the factor.
    """
    if factor.kappa is None:
        return False
    hopeless = _is_hopeless(factor.kappa[0])
    if hopeless:
        damp = factor.shift / (op.num_grads if op.zero_init else max(factor.size, 1))
        _capacitance.warn_if_passes_hopeless(factor.kappa[0], damp=damp)
    return hopeless


def redamped(op: Any, damp: float) -> None:
    """The body of :meth:`DynamicIHVP.set_damp` (see there): refactorised, then committed."""
    given = damp
    op._agreed("set_damp", lambda: _window_damp(op, given))
    damp = _window_damp(op, damp)
    factor = factorized(op, op._gram, list(op._factor.slots), damp, warn=False)
    # Another damping is a new set-up: it warns where the window is hopeless with it,
    # also after a warning with the old one (a smaller damping would pass in silence).
    hopeless = warned_anew(op, factor.factor)
    with all_or_nothing(op):
        op._warned_hopeless = hopeless
        reassign(op, "damp", damp)
        op._commit(factor, refactored=True)


def _window_damp(op: Any, damp: Any) -> float:
    """``damp`` checked as the constructor checks it: a damping the window can use."""
    value = check_damp(damp)
    _capacitance.check_window_damp(op._xp, op._G.dtype, op.num_grads, op.zero_init, value)
    return value


def free_buffer(op: Any) -> Any:
    """The one of the two m x m factor buffers that does not hold the factor."""
    if op._buffers is None:
        m = op.num_grads
        op._buffers = (
            op._xp.empty((m, m), dtype=op._xp.float64, device=op.device),
            op._xp.empty((m, m), dtype=op._xp.float64, device=op.device),
        )
    first, second = op._buffers
    # Before the first factor exists, either buffer is free.
    current = getattr(op, "_factor", None)
    return second if current is not None and current.factor.U is first else first


def factorized(
    op: Any,
    gram: Array,
    slots: list[int],
    damp: float | None = None,
    *,
    exact: bool = False,
    warn: bool = True,
    locate: Callable[[], str | None] | None = None,
) -> SlotFactor:
    """The factor of the capacitance matrix of ``slots``, in full (O(k^3)).

    With the operator's damping unless ``damp`` is given. Raises
    ``FactorizationError``; nothing of the operator changes. Warns of a hopeless
    window (:func:`warn_if_hopeless`) unless ``warn`` is false: then the caller
    warns once nothing can refuse the factor any more, before it commits it.
    ``locate`` names, for a Gram that is not finite, the first NaN or infinity of
    the gradients just put in (``_capacitance.factorize``).
    """
    damp = op.damp if damp is None else damp
    xp = op._xp
    k = len(slots)
    idx = xp.asarray(slots, dtype=xp.int64, device=op.device)
    sub = xp.take(xp.take(gram, idx, axis=0), idx, axis=1)
    out = free_buffer(op) if k == op.num_grads else None
    factor = _capacitance.factorize(
        xp,
        sub,
        shift=op._shift(k, damp),
        scale=1.0,
        damp=damp,
        gram_dtype="float64" if exact or op._exact_gram else "float32",
        out=out,
        locate=locate,
    )
    if warn:
        warn_if_hopeless(op, factor)
    return SlotFactor.build(factor, slots, op.num_grads)


def warn_if_hopeless(op: Any, factor: CapacitanceFactor) -> None:
    """Warn, once until the window recovers, when eps(float64) * kappa**1.5 >= 1.

    The passes and the factor are float64 whatever the storage dtype
    (docs/mathematics.rst, "Exact passes"), so the storage's own eps does not
    decide when digits run out.

    Checked at every full factorisation (at least every ``refactor_every``
    edits), where the kappa bounds come for free; a row edit checks the new
    gradient's own bound (:func:`warn_if_edit_hopeless`).
    """
    if factor.kappa is None:
        return
    if getattr(op, "_warned_hopeless", False):
        op._warned_hopeless = _is_hopeless(factor.kappa[0])
    else:
        op._warned_hopeless = warned_anew(op, factor)


def _is_hopeless(kappa: float) -> bool:
    """Whether eps(float64) * kappa**1.5 >= 1 for a lower bound ``kappa``."""
    return bool(_capacitance.is_imprecise(kappa, eps=_capacitance.EPS64))


def warn_if_edit_hopeless(op: Any, bounds: KappaBounds | None) -> None:
    """:func:`warn_if_hopeless` for a row edit, with bounds of the edited window's kappa.

    An edited factor has no kappa bounds of its own; :func:`edited` gives ``(lower,
    upper)`` from the new gradient's ``|g|^2``, the edited Gram's Rayleigh quotients and
    its trace (:func:`edited_gram_sums`, ``Pending.kappa_bounds``). Without the lower
    bound a full window took a gradient that makes it hopeless in silence, or several
    nearly collinear ones that do together, and the warning came at the next
    refactorisation, from an unrelated update (which, where warnings are errors, it
    refused, and every later one with it: each refactorises and warns again). An upper
    bound below the rule clears the warn-once note, so that a window that recovered by
    edits warns of the next one.
    """
    if bounds is None:
        return
    lower, upper = bounds
    if upper is not None and not _capacitance.is_imprecise(upper, eps=_capacitance.EPS64):
        op._warned_hopeless = False
    elif not getattr(op, "_warned_hopeless", False) and bool(
        _capacitance.is_imprecise(lower, eps=_capacitance.EPS64)
    ):
        _capacitance.warn_if_passes_hopeless(lower, damp=op.damp)
        op._warned_hopeless = True


def edited(
    op: Any,
    slot: int,
    b: Array,
    *,
    gram: Array | None = None,
    pending: Any = None,
    speculation: Speculation | None = None,
    locate: Callable[[], str | None] | None = None,
) -> tuple[SlotFactor, bool, KappaBounds | None]:
    """The factor after ``slot`` gets Gram row ``b``: an O(m^2) edit where possible.

    Returns ``(factor, refactored, bounds)``; raises ``FactorizationError``; nothing
    of the operator changes (the free factor buffer is scratch), and nothing
    warns: a refactorised factor may still be refused (a strict
    :class:`Speculation`), so the caller warns of a hopeless one
    (:func:`warn_if_hopeless`) just before it commits it. With
    ``gram`` (a recomputed Gram matrix, row ``slot`` included) the factor is
    computed from it in full. ``pending`` is the gradient's deferred check
    (``_dynamic_checks.check_gradient``), judged here before anything else can fail: the
    row edit reads it in the same transfer as its own checks, so that a step
    synchronises with the device once. A ``speculation`` computes the step's
    product with the edited factor, whose finiteness joins that read; it is
    discarded (``speculation.s`` None) unless the edit is kept. ``locate`` is
    :func:`factorized`'s, for the new gradient. ``bounds`` are ``(lower, upper)`` of
    the edited window's kappa, read with the gradient's checks (:func:`judge`), for
    :func:`warn_if_edit_hopeless`; None where none were read.
    """
    current = op._factor
    slots = [s for s in current.slots if s != slot] + [slot]
    k = len(slots)
    # The new gradient's Gram diagonal bounds kappa from below: a gradient that makes
    # the window hopeless is refused (read with the step's other checks).
    quotient, trace = edited_gram_sums(op, slot, b, k)
    pending = with_norm(
        pending,
        b[slot],
        op._shift(k),
        quotient=quotient,
        trace=trace,
        known_finite=lambda: known_finite(op, speculation, locate),
    )
    if gram is not None:
        bounds = judge(op, pending, [])[1]
        return factorized(op, gram, slots, exact=True, warn=False, locate=locate), True, bounds
    # The gradient's checks (and with them kappa's bounds) are read once, by the first
    # judge() given ``pending``; it is None afterwards.
    bounds = None
    if (
        op.update_method == "incremental"
        and len(current.slots) == k == op.num_grads
        and op._edits < op.refactor_every
        # The edit's arithmetic reads the new row's pivot as a float: a forward-mode
        # tangent of the row (or of the window's Gram) goes the full factorisation's way.
        and not (has_tangent(b) or has_tangent(op._gram))
    ):
        xp = op._xp
        row = current.slots.index(slot)
        # The edited factor's slots in order: the others', then ``slot``.
        moved_index = current.moved_index(row)
        others = take(xp, b, moved_index[:-1], axis=0)
        margin = None
        try:
            if _pieces.is_accelerator(xp, b):
                # The pivot's check joins the step's one read (see _judge).
                factor, margin = current.factor.replace_row_deferred(
                    row, others, b[slot] + op._shift(k), out=free_buffer(op)
                )
            else:
                # On the host a read costs nothing, and NaN never reaches NumPy's
                # arithmetic (whose warnings would be errors in strict code).
                bounds = judge(op, pending, [])[1]
                pending = None
                if not bool(xp.all(xp.isfinite(b))):
                    # A finite float64 gradient whose squared norm overflows: the full
                    # factorisation below refuses its row in words, which the edit's
                    # arithmetic would precede with NumPy's overflow warnings.
                    raise NotPositiveDefinite
                factor = current.factor.replace_row(
                    row, others, float(b[slot]) + op._shift(k), out=free_buffer(op)
                )
        except NotPositiveDefinite:
            pass  # the full factorisation below decides, and words any error
        else:
            moved = current.moved_last(factor, row, moved_index)
            drifted = drift(op, moved, b[slot])
            checks = [drifted] if margin is None else [margin, drifted]
            finite = None if speculation is None else speculation.compute(moved)
            if finite is not None:  # None where the caller's agree decides (settle)
                checks.append(finite)
            values, judged = judge(op, pending, checks)
            if pending is not None:
                bounds = judged
            if speculation is not None and finite is not None:
                speculation.finite = values.pop() > 0
            pivot_ok = margin is None or values[0] > 0
            if pivot_ok and not values[-1] > DRIFT_TOL:
                return moved, False, bounds
            pending = None  # judged above
            if speculation is not None:
                speculation.s = None  # made with the edit that was just refused
    if pending is not None:
        bounds = judge(op, pending, [])[1]
    gram = op._xp.asarray(op._gram, copy=True)
    gram[slot, :] = b
    gram[:, slot] = b
    return factorized(op, gram, slots, warn=False, locate=locate), True, bounds


def known_finite(
    op: Any, speculation: Speculation | None, locate: Callable[[], str | None] | None
) -> bool:
    """Whether the gradient just put in is finite: checked so, or found so (rare path).

    Its values were checked where the window checks them, and where a step's
    speculation refuses NaN and infinity (unsharded; as ``insert`` asks); else
    ``locate`` (:func:`factorized`'s) finds no NaN or infinity in it.
    """
    if op.check_finite:
        return True
    if speculation is not None and not speculation.say_overflow and not op._collective_checks:
        return True
    return locate is not None and locate() is None


def drift(op: Any, edited: SlotFactor, new_diagonal: Array) -> Array:
    """How far diag(U^T U) drifted from diag(C) on a sample of columns (O(32 m)).

    The edited slot is the factor's last; its Gram diagonal is ``new_diagonal``.
    A 0-d array: it is read with the step's other checks (:func:`judge`).
    """
    xp = op._xp
    k = len(edited.slots)
    diagonal = xp.linalg.diagonal(op._gram)
    if k <= DRIFT_SAMPLE:  # every column: the sample would be a copy of them all
        want = take(xp, diagonal, edited.slot_index, axis=0)
    else:
        pos = drift_positions(op, k)
        want = take(xp, diagonal, take(xp, edited.slot_index, pos, axis=0), axis=0)
    # The sample's last column is the factor's last, the edited slot's, whose Gram row
    # the window does not hold yet (``want`` is a new array).
    want[-1] = new_diagonal
    if k <= DRIFT_SAMPLE:
        return relative_column_drift(xp, edited.factor.U, want + op._shift(k))
    return edited.factor.column_drift_array(pos, want + op._shift(k))


def drift_positions(op: Any, k: int) -> Array:
    """The sampled columns of :func:`drift`, made on the device once per ``k``."""
    cache = op.__dict__.setdefault("_drift_sample", {})
    if k not in cache:
        xp = op._xp
        cache[k] = xp.asarray(evenly_spaced(k, DRIFT_SAMPLE), dtype=xp.int64, device=op.device)
    return cache[k]


def edited_gram_sums(op: Any, slot: int, b: Array, k: int) -> tuple[Any, Any]:
    """The Gram matrix with row ``slot`` set to ``b``: a lower bound of its largest
    eigenvalue and its trace, as 0-d arrays, O(m^2) (the trace alone O(m)).

    For a window of all m slots only (a full or ``zero_init`` one, the windows that take
    gradients by row edits); ``(None, None)`` otherwise, whose other slots' rows are not
    the window's. Read with the step's other checks (no device sync of its own).

    The bound is the larger Rayleigh quotient ``v^T G v / v^T v`` of two test vectors
    (:func:`probe_vectors`), less its rounding (:func:`rayleigh_slack`); not finite (no
    bound) where either is not.
    """
    if k != op.num_grads:
        return None, None
    xp, gram = op._xp, op._gram
    # A PyTorch CPU window's m x m arrays are summed by NumPy too: PyTorch runs even a
    # 64 x 64 x 2 product on its intra-op (OpenMP) team, whose threads then spin for
    # milliseconds on the cores that the step's passes, right after, want.
    views = _linalg.host_views(xp, gram, b)
    if views is not None:
        gram, b = views
    # A gradient whose squared norm overflows is refused by its own check, in words:
    # these sums' overflow or inf - inf is no finding of NumPy's to warn of.
    with np.errstate(all="ignore"):
        if type(gram) is np.ndarray and type(b) is np.ndarray:
            # The host's sums as NumPy scalars, without the namespace's per-call cost (a
            # small step's time is a few such calls). The edited diagonal's own sum, as
            # the device's: the old trace less the leaving entry lost the others' digits
            # where that entry was far larger (after set_damp), and an upper bound below
            # the true trace cleared the warn-once note of a window still hopeless.
            diagonal = gram.diagonal().copy()
            diagonal[slot] = b[slot]
            trace = float(diagonal.sum())
            if getattr(op, "_warned_hopeless", False) or not _capacitance.is_imprecise(
                1.0 + trace / op._shift(k), eps=_capacitance.EPS64
            ):
                # No need of the quotients (nor of their O(m^2) products) where the trace
                # bounds the window's kappa within the rule, nor where the window has
                # warned already: only the trace decides then (warn_if_edit_hopeless).
                return None, np.float64(trace)
            return host_quotient(gram, slot, b, trace), np.float64(trace)
        edited = xp.asarray(gram, copy=True)
        edited[slot, :] = b
        edited[:, slot] = b
        probes = probe_vectors(xp, b, slot)
        quotients = xp.sum(probes * (edited @ probes), axis=0) / xp.sum(probes * probes, axis=0)
        trace = xp.sum(xp.linalg.diagonal(edited))
        return xp.max(quotients) - rayleigh_slack(k) * trace, trace


def probe_vectors(xp: Any, b: Array, slot: int) -> Array:
    """The Rayleigh quotients' test vectors, the columns of an m x 2 array, each 1 at
    ``slot``: the ones vector and the new Gram row ``b / b[slot]``.

    The ones vector finds nearly collinear gradients of one sign. The new row (the new
    gradient's Gram column, one power-iteration step from its slot: its quotient is at
    least ``b[slot] = |g|^2``) also finds those spread in sign (``g, -g, g, ...``), which
    cancel in the ones vector's, and gradients collinear with the new one among
    unrelated ones, which the ones vector dilutes by the window's length. Scaled by
    ``|g|^2`` (plus the least normal number, so that a zero gradient's is ``e_slot``)
    its entries are at most the other gradients' norms over ``|g|``: its quotient
    overflows only where those span 150 decades.
    """
    # Written into, not stacked: array_api_compat's stack is a Python wrapper, which a
    # host step does not pay for (tests/test_overhead.py).
    probes = xp.ones((b.shape[0], 2), dtype=b.dtype, device=device_of(b))
    probes[:, 1] = b / (b[slot] + TINY)
    probes[slot, :] = 1.0
    return probes


def host_quotient(gram: np.ndarray, slot: int, b: np.ndarray, trace: float) -> Any:
    """:func:`edited_gram_sums`' bound on the host, less its rounding per ``trace`` (the
    edited Gram's), or None where it is not finite.

    With each test vector ``v`` less its 1 at ``slot`` (``t``), ``v^T G v = t^T gram t + 2
    b.t + b[slot]``: the old row and column of ``gram`` only ever meet a zero, without
    the edited copy's O(m^2) writes. NumPy's dot is the cheapest of its calls on small
    arrays.
    """
    k, new = len(b), float(b[slot])
    probes = probe_vectors(np, b, slot)
    probes[slot, :] = 0.0
    products = np.dot(gram, probes)
    quotients = [
        (float(np.dot(t, p)) + 2.0 * float(np.dot(b, t)) + new) / (float(np.dot(t, t)) + 1.0)
        for t, p in zip(probes.T, products.T, strict=True)
    ]
    best = max(quotients) - rayleigh_slack(k) * trace
    return np.float64(best) if all(map(math.isfinite, quotients)) else None


def rayleigh_slack(k: int) -> float:
    """What to subtract, per unit of the trace (or of an upper bound of it), from a
    computed Rayleigh quotient of a k x k Gram matrix so that it stays below the exact
    one.

    The numerator ``v^T (G v)``, a product of k terms per entry and then a sum of k,
    errs by at most about ``2 k eps`` times ``|v|^T |G| |v| <= (v^T v) trace(G)``
    (``|G_ij| <= sqrt(G_ii G_jj)`` and Cauchy-Schwarz); the denominator's sum of k
    squares and the division add about ``(k + 1) eps`` of the quotient, itself at most
    the trace: ``(3 k + 2) eps trace`` in all, which ``3 (k + 4) eps trace`` covers with
    room (the probe vector's own rounding does not matter: any v gives a quotient at
    most lambda_max). That is ``<= 3 k (k + 4) eps lambda_max``, a relative ``3e-12`` at
    k = 64: no warning it could miss matters.
    """
    return 3.0 * (k + 4) * _capacitance.EPS64


def judge(
    op: Any,
    pending: Pending | None,
    checks: list[Array],
) -> tuple[list[float], KappaBounds | None]:
    """Read ``checks`` (0-d arrays) and a gradient's deferred checks in one transfer.

    Raises the gradient's error if its check fails (before ``checks`` are looked
    at); returns the values of ``checks``, and bounds ``(lower, upper)`` of the
    window's kappa (``Pending.kappa_bounds``) read in the same transfer where the
    gradient's squared norm is among the checks (None otherwise).
    """
    arrays = ([] if pending is None else pending.arrays()) + checks
    if not arrays:
        return [], None
    xp = op._xp
    if _pieces.is_accelerator(xp, arrays[0]):
        values = host_values(xp.stack([xp.astype(xp.reshape(a, ()), xp.float64) for a in arrays]))
    else:
        # On the host a read costs nothing: each value read as it is (the same float64,
        # widening is exact), without the stack's four array calls (a step reads twice).
        values = [float(a if a.ndim == 0 else xp.reshape(a, ())) for a in arrays]
    if pending is None:
        return values, None
    bounds = pending.kappa_bounds(values)
    return pending.judge(op, values), bounds
