"""The window bookkeeping of :class:`~mfac_core.DynamicIHVP`: inserting and removing gradients.

A gradient goes into a slot (the oldest window slot of a full window, else the
last free slot); its Gram row is written first, then the factor edited
(``_dynamic_factor``); if the factor cannot be computed the slot's old row is
put back and the operator is as it was.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import _engine, _host_rows, _pieces
from ._compat import Array, is_numpy_namespace, is_torch_namespace
from ._dynamic_checks import (
    Refused,
    check_gradient,
    checked_operand,
    checked_values,
    gradient_culprit,
    judge_gradient,
    values_checked,
)
from ._dynamic_factor import (
    NotFiniteStep,
    Speculation,
    all_or_nothing,
    edited,
    factorized,
    warn_if_edit_hopeless,
    warn_if_hopeless,
    warned_anew,
)
from ._errors import FactorizationError
from ._finite import float32_overflow_said_by_caller


class NoGradient(Exception):
    """No rank of a sharded window had a gradient (:func:`collective_step`): nothing changed."""


class RankPart(NamedTuple):
    """A distributed optimiser's part in the first reduction of its step (:func:`collective_step`).

    present : bool
        Whether this rank has a gradient (``g`` is zeros if not).
    prepare : callable or None
        Called first inside the reduction's local part, before ``g`` is read: the
        step's rank-local checks, which fill ``g``. Where it raises on one rank,
        every rank raises with the window as it was (``reduce_checked``), instead
        of the other ranks waiting in the reduction for the one that raised.
    state : object
        The optimiser's replicated state beside the window's (anything
        ``_sharding.digest`` takes; None for none), compared in the reduction's
        tag: where it differs between ranks, every rank raises ``RuntimeError``
        with the message ``diverged()`` (where no rank's checks failed: else as
        for any failure, ``reduce_checked``).
    diverged : callable or None
        Gives that message (made only where it is raised).
    """

    present: bool
    prepare: Callable[[], object] | None = None
    state: object = None
    diverged: Callable[[], str] | None = None


class StepCheck(NamedTuple):
    """What :meth:`DynamicIHVP._update_and_matvec_checked` found.

    status : {"ok", "not finite", "not representable", "too large", "step not finite"}
        ``"ok"``: ``g`` was inserted. ``"not finite"``: ``g`` holds NaN or
        infinity. ``"not representable"``: ``g`` is finite but an entry is
        beyond the range of the window's 2-byte storage. ``"too large"``:
        ``g`` is finite but so large that the window with it would have
        ``eps(float64) kappa >= 1``. ``"step not finite"`` (``strict`` only):
        ``F^{-1} g`` for the window with ``g`` holds NaN or infinity. The
        window is unchanged unless ``"ok"``.
    s : array or None
        ``F^{-1} g`` for the window that includes ``g`` (``"ok"`` only).
    s_finite : bool
        Whether ``s`` holds no NaN or infinity (False when ``s`` is None).
    error : ValueError or None
        The exception :meth:`DynamicIHVP.update_and_matvec` raises for this
        ``g`` (None when ``"ok"``).
    """

    status: str
    s: Any
    s_finite: bool
    error: ValueError | None


def products(op: Any, slot: int, g: Array, rows: Any = None) -> tuple[Any, Any]:
    """The Gram row of ``slot`` (float64) and ``G g`` (float64, ``(m, 1)``), one pass.

    ``G g`` is ``None`` when it is the Gram row. With 2-byte storage the row
    is that of the stored (rounded) gradient, so that factor and window
    agree, and ``G g`` that of ``g`` as given, for the product of
    :meth:`DynamicIHVP.update_and_matvec`: both columns in one float32 pass,
    over ``rows`` (NumPy, from :class:`RowStore`) where given, else :func:`paired_rows`.
    """
    xp = op._xp
    if op.storage_dtype is None:
        # A float64 gradient whose squared norm overflows leaves inf in the row, which
        # the factor's edit refuses with an error that says so; NumPy's RuntimeWarning
        # would come first, and be the error where warnings are errors (np.errstate is
        # local to this context).
        with np.errstate(over="ignore", invalid="ignore"):
            return _engine.project(xp, op._G, g[:, None], constant_G=False)[:, 0], None
    rows = paired_rows(xp, op._G[slot, ...], g) if rows is None else _engine.as_library(xp, rows)
    P = _engine.project_rows(xp, op._G, rows)
    return P[:, 0], P[:, 1:]


def paired_rows(xp: Any, stored: Array, g: Array) -> Array:
    """``stack([astype(stored, g.dtype), g])``: the two rows of one pass, ``(2, d)``.

    PyTorch and NumPy write both rows straight into one new array (the stored row
    widened as it is copied): one d-long write each, where ``astype`` and
    ``stack`` write the widened row twice and allocate twice. Other libraries take
    the generic form. The values are the same (widening is exact).
    """
    rows: Any
    if is_torch_namespace(xp):
        import torch

        rows = torch.empty((2, g.shape[0]), dtype=g.dtype, device=g.device)
    elif is_numpy_namespace(xp):
        rows = np.empty((2, g.shape[0]), dtype=g.dtype)
    else:
        return generic_paired_rows(xp, stored, g)
    _engine.assign_row(xp, rows, 0, stored)  # float16 widened by F16C, not NumPy's cast
    rows[1, ...] = g
    return rows


def generic_paired_rows(xp: Any, stored: Array, g: Array) -> Array:
    """:func:`paired_rows` in any Array-API library."""
    return xp.stack([xp.astype(stored, g.dtype), g], axis=0)


class RowStore:
    """A host window's row write through the extension (``_fused.store_row``), undoable.

    One loop on the calling thread reads ``g`` once: it saves the slot's row, writes ``g``
    into it (rounded, for 2-byte storage), fills the rows of the first pass (the stored row
    widened, and ``g``) and returns ``max |g|``, from which the gradient's value checks
    follow (``_dynamic_checks.judge_gradient``), exactly as ``check_gradient`` would judge
    them before the write. The same values as ``assign_row`` and :func:`paired_rows`; no d-long
    work on PyTorch's intra-op threads, whose spinning took the cores from the passes.
    """

    def __init__(self, op: Any, slot: int, g: Array, views: tuple[Any, Any, str], finite: bool):
        self.op, self.slot, self.g, self.finite = op, slot, g, finite
        self.G, self.gv, self.storage = views
        self.old: Any = None
        self.first: Any = None
        self.rows: Any = None

    @classmethod
    def of(cls, op: Any, g: Array, finite: bool) -> RowStore | None:
        """The row store for ``g`` (checked operand), or None where the extension cannot write."""
        views = _host_rows.host_row_views(op._xp, op._G, g)
        if views is None:
            return None
        slot = op._window[0] if op.is_full else op._free[-1]
        return cls(op, slot, g, views, finite)

    def write(self) -> None:
        """Write the row (saving the old one), then judge ``g``'s values; raises ``Refused``."""
        row = self.G[self.slot]
        old = _scratch(self.op, "old", row.shape, row.dtype)
        # The undo buffer is kept before the call: an interrupt (a signal's handler runs
        # between bytecodes) surfaces as the extension returns, the row already written.
        # Whether the extension ran is told by ``old``'s first item, set here to bits the
        # row's first item does not have and overwritten by the extension with that item.
        first = _first_bits(row)
        if first is not None:  # the marker before the buffer is installed: an interrupt
            _bits(old)[0] = ~first  # between the two left a stale one, restored as the row
        self.old, self.first = old, first
        if self.op.storage_dtype is None:
            biggest = _host_rows.store_row(self.gv, row, old=old, storage=self.storage)
        else:
            self.rows = _scratch(self.op, "rows", (2, row.shape[0]), np.dtype(np.float32))
            biggest = _host_rows.store_row(
                self.gv, row, old=old, wide=self.rows[0], copy=self.rows[1], storage=self.storage
            )
        if biggest is None:  # the extension checked this could not happen (``stores``)
            raise RuntimeError("the extension did not write the row")
        if values_checked(self.op, self.finite) and self.g.shape[0]:
            judge_gradient(self.op, self.g, biggest, finite=self.finite)

    def products(self) -> tuple[Any, Any]:
        """:func:`products`, from the rows :meth:`write` filled."""
        return products(self.op, self.slot, self.g, self.rows)

    def restore(self) -> None:
        """Put the saved row back (nothing, if the extension did not write it)."""
        old, self.old = self.old, None
        if old is not None and self.first is not None and _bits(old)[0] == self.first:
            np.copyto(self.G[self.slot], old)


def _scratch(op: Any, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A host buffer of ``op`` that every step reuses (``key`` names its use), uninitialised.

    A step's buffers live only within the step. A fresh d-long array per step cost about
    1.3 ms at d = 1e6 (float32, 5 % of the step): glibc hands freed memory at the top of its
    heap back to the kernel, and the next step's first writes fault it in again, page by
    page. Not pickled, not deep-copied (``DynamicIHVP._transient``): no copy shares it.
    """
    buffers = op.__dict__.setdefault("_row_scratch", {})
    buf = buffers.get(key)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = buffers[key] = np.empty(shape, dtype=dtype)
    return buf


def _bits(row: np.ndarray) -> np.ndarray:
    """``row``'s items as unsigned integers of their size (their bits, compared exactly)."""
    return row.view(f"u{row.itemsize}")


def _first_bits(row: np.ndarray) -> Any:
    """The bits of ``row``'s first item (a NumPy scalar), or None for an empty row."""
    return _bits(row)[0].copy() if row.shape[0] else None


def place(
    op: Any,
    slot: int,
    g: Array,
    b: Array | None = None,
    *,
    pending: Any = None,
    speculation: Speculation | None = None,
    store: RowStore | None = None,
    part: RankPart | None = None,
    slots: tuple[deque[int], list[int]] | None = None,
) -> tuple[Array, Any, Any]:
    """Put gradient ``g`` into ``slot``; return it (checked) and its Gram row (float64).

    Also returns ``G g`` (float64, ``(m, 1)``) for the product of
    :meth:`DynamicIHVP.update_and_matvec` (``None`` when ``b`` is given). A 2-byte
    window rounds ``g`` here, once.

    The row is written first so that one product ``G g`` gives the whole
    Gram row, the diagonal included: entries of one kernel keep a
    duplicated gradient's 2 x 2 block exactly singular, not indefinite by
    rounding. ``b`` may be given when it is known (a zero gradient). If
    the new factor cannot be computed, the old row is put back and the
    operator is as it was. A sharded operator checks ``g`` here, inside the
    reduction of the row, so that every rank raises if one rank's ``g`` is bad.
    ``pending`` is an unsharded ``g``'s deferred check (``_dynamic_checks.check_gradient``),
    judged before the operator changes. ``speculation`` is handed the product's
    operands and computes it with the new factor before the commit (see
    ``_dynamic_factor.Speculation``); a strict one that finds it not finite raises
    ``NotFiniteStep`` with the row put back.
    ``store`` (a :class:`RowStore` for ``slot``) writes the row on the host in one read of
    ``g`` and judges ``g``'s values there, the row then put back if they are refused.
    ``part`` (sharded only): the optimiser's part in the row's reduction (:func:`written_row`).
    ``slots``: the window's new ``(_window, _free)``, committed with the row and the factor,
    all of them or (an interrupt between two statements) none (``all_or_nothing``).
    """
    xp = op._xp
    old = None if store is not None else xp.asarray(op._G[slot, ...], copy=True)
    gram = None
    product = None
    # Whether the row is written: a gradient refused before (under torch.func, where a
    # write of the old row back is refused too) puts nothing back.
    writing: list[bool] = []

    def put_back() -> None:
        if store is not None:
            store.restore()
        elif writing:
            op._G[slot, ...] = old

    # One block from the row's write to the commit: whatever stops it (a refusal, an
    # error, an interrupt between two statements) leaves the window as it was.
    with all_or_nothing(op, undo=put_back) as set_row:
        if b is None:
            g, b, product = written_row(op, slot, g, store, part, writing)
            if speculation is not None:
                speculation.X = g[:, None]
                speculation.P = b[:, None] if product is None else product
        else:
            writing.append(True)
            op._G[slot, ...] = g
        # The rest of the window's Gram was finite: NaN or infinity in it (which
        # check_finite=False lets in) is g's.
        locate = gradient_culprit(op, g)
        try:
            # bounds: kappa's, after the edit (read with the gradient's checks).
            factor, refactored, bounds = edited(
                op, slot, b, pending=pending, speculation=speculation, locate=locate
            )
        except FactorizationError:
            if op._exact_gram:
                raise
            # The row is exact (the engine sums in float64), but the rest of a Gram
            # loaded from an older checkpoint may hold single-precision rounding
            # that makes nearly collinear windows indefinite: recompute it, once.
            gram = op._exact_gram_matrix()
            b = xp.asarray(gram[slot, :], copy=True)
            factor, refactored, bounds = edited(op, slot, b, gram=gram, locate=locate)
            if speculation is not None:
                speculation.s = None  # not made with this factor
        if speculation is not None:
            # Before the commit: a strict speculation refuses a product that is not
            # finite here, and the row is put back below (nothing else has changed).
            speculation.settle(factor)
        if refactored:
            # Only now, the factor refused by nothing: a refused insert warned of a
            # factor that it threw away. (Where the warning is an error, it refuses
            # the insert like any error here.)
            warn_if_hopeless(op, factor.factor)
        else:
            # A row edit has no kappa bounds of its own: those edited() read decide.
            warn_if_edit_hopeless(op, bounds)
        if gram is not None:
            op._gram = gram
            op._exact_gram = True
        op._commit(factor, refactored=refactored)
        if slots is not None:
            op._window, op._free = slots
        set_row(slot, b)
    return g, b, (b[:, None] if product is None else product)


# -- reductions over the d coordinates (every one goes through here) ---------------


def written_row(
    op: Any,
    slot: int,
    g: Array,
    store: RowStore | None = None,
    part: RankPart | None = None,
    writing: list[bool] | None = None,
) -> tuple[Array, Any, Any]:
    """Write ``g`` into ``slot``; return it, its Gram row and ``G g`` (float64, summed).

    ``G g`` (``(m, 1)``) is ``None`` when it is the row (see :func:`products`).
    Unsharded, ``g`` was checked by the caller. Sharded, it is checked here and the
    row reduced with the status word: one reduction of m + 20 numbers (2 m + 20 for a
    2-byte window, whose row and ``G g`` differ). ``part`` (sharded, a step of
    :func:`collective_step`): its ``prepare`` runs first in this rank's part of the
    reduction, and its ``present`` (whether this rank has a gradient; ``g`` is zeros
    if not) is the status word's argument digest, so that a rank without one learns
    in the same reduction whether any rank had one, and raises ``NoGradient`` (the
    slot's row put back by :func:`place`) where none had. ``writing`` gets ``True``
    when the row is about to be written (so that a refusal before it puts nothing back).
    """
    xp = op._xp
    m = op.num_grads
    checked = [g]
    same: list[bool] = []
    agreement: dict[str, Any] = {}
    present = None if part is None else part.present
    if part is not None:
        agreement = {"agree": lambda: present, "agreed_into": same}
        if part.state is not None:
            agreement.update(state=part.state, diverged=part.diverged)

    def local() -> Array:
        if part is not None and part.prepare is not None:
            part.prepare()
        if op._collective_checks:
            checked[0] = check_gradient(op, g)
        if store is not None:
            store.write()
            row, product = store.products()
        else:
            if writing is not None:
                writing.append(True)
            _engine.assign_row(xp, op._G, slot, checked[0])
            row, product = products(op, slot, checked[0])
        return row if product is None else xp.concat([row, product[:, 0]])

    if op.storage_dtype is None:
        total = op._reduced("update", local, m, **agreement)
        no_gradient(present, same)
        return checked[0], total, None
    total = op._reduced("update", local, 2 * m, **agreement)
    no_gradient(present, same)
    return checked[0], total[:m], total[m:][:, None]


def no_gradient(present: bool | None, same: list[bool]) -> None:
    """Raise ``NoGradient`` where no rank had a gradient, decided alike on every rank.

    A rank with a gradient goes on; one without goes on too unless every rank is
    known to hold its flag. A group too large for exact agreement checks knows
    nothing (``reduce_checked``): every rank then goes on (the absent ones with
    zeros), as they do where only some ranks lack a gradient.
    """
    if present is False and same[0]:
        raise NoGradient("no rank had a gradient")


def insert(
    op: Any, g: Array, *, speculation: Speculation | None = None, part: RankPart | None = None
) -> tuple[Array, Any]:
    """Insert gradient ``g``; return it (checked) and ``G g`` (float64, ``(m, 1)``).

    With a ``speculation`` (unsharded only), NaN and infinity are refused
    whatever ``check_finite``, and the step's product may be computed before
    the checks are read (``_dynamic_factor.edited``). ``part``: see
    :func:`collective_step`.
    """
    pending = None
    store = None
    if not op._collective_checks:  # sharded, g is checked inside the reduction of its row
        finite = speculation is not None and not speculation.say_overflow
        # On a device the gradient's check waits for the row edit's, to be read
        # with it in one transfer; on the host it runs first, or in the row's write.
        if _pieces.is_accelerator(op._xp, op._G):
            g, pending = check_gradient(op, g, deferred=True, finite=finite)
        else:
            g = checked_operand(op, g)
            store = RowStore.of(op, g, finite or op.check_finite)
            if store is None:
                g = checked_values(op, g, finite=finite)
    slot = op._window[0] if op.is_full else op._free[-1]
    window, free = deque(op._window), list(op._free)
    if op.is_full:
        window.popleft()
    else:
        free.pop()
    window.append(slot)
    g, _, product = place(
        op,
        slot,
        g,
        pending=pending,
        speculation=speculation,
        store=store,
        part=part,
        slots=(window, free),
    )
    return g, product


@float32_overflow_said_by_caller
def update_and_matvec_checked(op: Any, g: Array, /, *, strict: bool = False) -> StepCheck:
    """:meth:`DynamicIHVP.update_and_matvec` for an optimiser step: bad values are a status.

    NaN and infinity in ``g`` are refused whatever ``check_finite``, and
    reported with a 2-byte window's range error and a gradient that makes the
    window hopeless as a status, not raised;
    whether the product is finite is returned with it. The product is computed
    with the new factor before the window commits to it: on a device, the
    steady-state step (a full window and a row edit) reads the gradient's
    check, the edit's and the product's finiteness in one transfer, and the
    product is discarded if the step is refused. Unsharded windows only (a sharded
    gradient is checked collectively, inside the reduction of its row).

    Parameters
    ----------
    g : array, shape (d,)
        The gradient, as for :meth:`DynamicIHVP.update`.
    strict : bool
        Refuse a product holding NaN or infinity (status ``"step not finite"``)
        and leave the window as it was; otherwise ``g`` stays in the window.

    Returns
    -------
    StepCheck
        The status, the product and whether it is finite.

    Raises
    ------
    TypeError, ValueError
        For a wrong library, dtype, device or shape, as :meth:`DynamicIHVP.update`.
    FactorizationError
        As :meth:`DynamicIHVP.update`; the window is then unchanged.
    """
    if op._collective_checks:
        raise ValueError("_update_and_matvec_checked is for unsharded windows only")
    speculation = Speculation(op, strict=strict)
    try:
        insert(op, g, speculation=speculation)
    except Refused as exc:
        status = (
            "too large" if exc.hopeless else "not representable" if exc.finite else "not finite"
        )
        return StepCheck(status, None, False, exc)
    except NotFiniteStep:
        return StepCheck("step not finite", None, False, None)
    return StepCheck("ok", speculation.s, speculation.finite, None)


@float32_overflow_said_by_caller
def update_and_matvec_finite(
    op: Any,
    g: Array,
    /,
    *,
    agree: Callable[[Array], bool] | None = None,
    part: RankPart | None = None,
) -> Array | None:
    """:meth:`DynamicIHVP.update_and_matvec`, or None, the window unchanged, for a step not finite.

    A sharded window decides on every rank alike (the step is not finite where it is
    not on one rank): the step of a distributed ``MFAC(errors="raise")``. ``agree(s)``,
    where given, is that decision (collective; see ``_dynamic_factor.Speculation``),
    taken before the window commits to ``g``; without it the window reduces a flag.
    ``part``: see :func:`collective_step`.
    """
    speculation = Speculation(op, strict=True, agree=agree)
    try:
        insert(op, g, speculation=speculation, part=part)
    except NotFiniteStep:
        return None
    return speculation.s


@float32_overflow_said_by_caller
def collective_step(
    op: Any,
    g: Array,
    /,
    *,
    part: RankPart,
    strict: bool,
    agree: Callable[[Array], bool] | None = None,
) -> Array | None:
    """The window's part of a distributed ``MFAC`` step: insert ``g``, return ``F^{-1} g``.

    Sharded windows only. ``part.present`` is whether this rank has a gradient (``g``
    is zeros if not, as for a parameter without one): the reduction of ``g``'s Gram row
    tells every rank whether any rank had one, and where none had, every rank raises
    ``NoGradient`` with the window as it was, as one process's step without a
    gradient does nothing; where some had, every rank inserts its ``g``.
    ``part.prepare`` (the optimiser's checks of the step, which fill ``g``) runs in
    that reduction, so that a check that fails on one rank raises on every rank. ``strict``
    and ``agree``: as :func:`update_and_matvec_finite` (None for a step not finite);
    otherwise as :meth:`DynamicIHVP.update_and_matvec`.
    """
    if not op._collective_checks:
        raise ValueError("collective_step is for sharded windows only")
    if strict:
        return update_and_matvec_finite(op, g, agree=agree, part=part)
    g, product = insert(op, g, part=part)
    X = g[:, None]
    return op._refined(X, op._finish(X, product))[:, 0]


def remove_slot(op: Any, slot: int, /) -> None:
    """The body of :meth:`DynamicIHVP.remove` (see there)."""
    given = slot

    def check() -> int:
        try:
            if isinstance(given, bool):
                raise TypeError
            index = operator.index(given)
        except TypeError:
            raise TypeError(
                f"slot must be an int (one of the window's slots {list(op._window)}), got "
                f"{given!r} ({type(given).__name__})"
            ) from None
        if index not in op._window:
            raise ValueError(
                f"slot {given!r} holds no gradient; the window's slots are {list(op._window)}"
            )
        return index

    op._agreed("remove", check)
    slot = check()
    xp = op._xp
    window = deque(s for s in op._window if s != slot)
    if op.zero_init:
        window.appendleft(slot)
        place(
            op,
            slot,
            xp.zeros((op.dim,), dtype=op.dtype, device=op.device),
            xp.zeros((op.num_grads,), dtype=xp.float64, device=op.device),
            slots=(window, list(op._free)),
        )
        return
    # The normalisation 1/k changes: refactorise without the slot (its Gram row
    # is not read), then clear it; a failure leaves the window as it was.
    factor = factorized(op, op._gram, list(window), warn=False)
    # A smaller window is a new set-up: it warns where it is hopeless (the normalisation
    # 1/k grows, and with it kappa), whether or not the window warned before.
    hopeless = warned_anew(op, factor.factor)
    old = xp.asarray(op._G[slot, ...], copy=True)

    def put_back() -> None:
        op._G[slot, ...] = old

    with all_or_nothing(op, undo=put_back) as set_row:
        op._window, op._free = window, [*op._free, slot]
        op._warned_hopeless = hopeless
        op._commit(factor, refactored=True)
        op._G[slot, ...] = 0
        set_row(slot, 0)


# -- products ----------------------------------------------------------------------
