"""The checkpoints of :class:`~mfac_core.DynamicIHVP`: ``state_dict``, its checks, copies.

``load_state_dict`` checks everything before anything changes: the state's
form, its shard layout, the whole Gram matrix against the one recomputed from
the stored gradients, and the factor against the Gram matrix on a sample of
columns. Sharded, every rank's checks are reduced with one status word.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from . import _host_rows
from ._attributes import BUILT_WITH, reassign
from ._capacitance import DRIFT_TOL, CapacitanceFactor, check_window_damp
from ._compat import Array, is_finite_array, refuse_derivatives, stored
from ._dtypes import byte_order_note, untyped_note
from ._dynamic_factor import SlotFactor, completed, evenly_spaced, factorized, warned_anew
from ._dynamic_setup import local_gram
from ._operator import LinearOperator
from ._validation import check_count, check_damp, check_flag, check_same_space

#: Why a loaded state's tangents are refused: they would reach the products only
#: through the gradients, as if the Gram matrix and factor were constants.
_AS_SAVED = (
    "a state loads as saved (its Gram matrix and factor are not recomputed from its gradients)"
)

#: The format version of ``state_dict``.
STATE_VERSION = 2
#: Every key a ``state_dict`` of this version or of version 1 (whose slot lists and edit
#: count were age_order, factor_order, since_refactor) may hold, a sharded one's
#: included; ``load_state_dict`` refuses others,
#: rather than drop them unread (a misspelt ``"exact_gram"`` would load the state with
#: the looser check of states saved before it).
STATE_KEYS = frozenset(
    (
        *("version", "num_grads", "dim", "damp", "zero_init", "grads", "gram", "factor"),
        *("window_slots", "free_slots", "factor_slots", "edits", "exact_gram"),
        *("age_order", "factor_order", "since_refactor", "shard_rank", "shard_widths"),
    )
)
#: This version's names of the keys that version 1 named by age and permutation.
V1_NAMES = {"window_slots": "age_order", "factor_slots": "factor_order", "edits": "since_refactor"}
#: Columns of a loaded factor that ``load_state_dict`` checks against the Gram matrix.
FACTOR_SAMPLE = 8
#: The rounding of a Gram entry, in units of (d + ranks) eps |g_i| |g_j|, that
#: ``load_state_dict`` allows between the stored Gram and the one recomputed from the
#: stored gradients: each of the two sums errs by at most one unit (a float64 sum of
#: d exact products, then of one partial sum per rank), and the norms taken from the
#: recomputed diagonal by a little more.
GRAM_ROUNDING = 4


def unpickled(state: dict[str, Any]) -> dict[str, Any]:
    """A pickled window's attributes (``__getstate__``) as this version keeps them.

    Pickles made before the state's edits were counted have no count; before
    ``refactor_every=0``, a reference window had ``update_method="refactor"``.
    """
    state = {"_version": 0, **state}
    if state.pop("update_method", None) == "refactor":
        state["refactor_every"] = 0
    return state


#: A DynamicIHVP or subclass (ShardedDynamicIHVP): what its deep copy is.
_Window = TypeVar("_Window", bound="WindowCopies")


class WindowCopies(LinearOperator):
    """The copies and pickles of a :class:`~mfac_core.DynamicIHVP` (a base class of it).

    The window is edited in place: a copy that shared its buffers would corrupt the
    original at its next update, so every copy is a deep one, and its buffer is in
    memory allocated as the constructor's (``_host_rows.zeros``: NumPy's, with
    transparent huge pages, for a PyTorch CPU window).
    """

    _G: Any
    # zero_init scales the damping of the factor's shift; a window is never block-wise.
    _fixed = (*(name for name in BUILT_WITH if name != "block_size"), "zero_init")

    def __copy__(self: _Window) -> _Window:
        return copy.deepcopy(self)

    def __deepcopy__(self: _Window, memo: dict[int, Any]) -> _Window:
        # The buffer is copied once, then the rest as any operator's, through the
        # pickling state: a subclass's own __getstate__ and __setstate__ leave out of the
        # copy and rebuild what they do for a pickle (a lock, say). The state is this
        # version's, so this class's __setstate__ (the migration and re-homing of a
        # pickle's buffer) is not needed.
        if id(self._G) not in memo:  # an enclosing deepcopy that copied it shares its copy
            memo[id(self._G)] = _host_rows.copied(self._xp, self._G)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = copy.deepcopy(self.__getstate__(), memo)
        if type(self).__setstate__ is WindowCopies.__setstate__:
            LinearOperator.__setstate__(new, state)
        else:
            new.__setstate__(state)
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(unpickled(state))
        # Pickle rebuilt a PyTorch buffer in PyTorch's memory: into the constructor's.
        self._G = _host_rows.rehomed(self._xp, self._G)


def saved_state(op: Any) -> dict[str, Any]:
    """The body of :meth:`DynamicIHVP.state_dict` (see there)."""
    xp = op._xp
    shard = (
        {}
        if op.layout is None
        else {"shard_rank": op.layout.rank, "shard_widths": list(op.layout.widths)}
    )
    return {
        **shard,
        "version": STATE_VERSION,
        "num_grads": op.num_grads,
        "dim": op.dim,
        "damp": op.damp,
        "zero_init": op.zero_init,
        "grads": xp.asarray(op._G, copy=True),
        "gram": xp.asarray(op._gram, copy=True),
        "factor": xp.asarray(op._factor.factor.U, copy=True),
        "window_slots": list(op._window),
        "free_slots": list(op._free),
        "factor_slots": list(op._factor.slots),
        "edits": op._edits,
        "exact_gram": bool(op._exact_gram),
    }


@dataclass(frozen=True)
class LoadedState:
    """A state dict checked against an operator, ready to be committed."""

    grads: Array
    gram: Array
    window: tuple[int, ...]
    free: tuple[int, ...]
    factor: SlotFactor
    edits: int
    damp: float
    #: Whether every Gram entry was accumulated in float64 (the operator's ``_exact_gram``).
    exact: bool

    def commit(self, op: Any) -> None:
        """Replace the state of ``op`` by this one (nothing here can fail but a warning).

        A loaded window is a new set-up: it warns where it is hopeless whatever the
        operator warned of before (a refactorised factor knows; a loaded one is judged
        by the window's next edits), and an interrupt completes the load before it is
        raised (``completed``).
        """
        hopeless = warned_anew(op, self.factor.factor)

        def commit() -> None:
            reassign(op, "damp", self.damp)
            op._G[...] = self.grads
            op._gram = self.gram
            op._exact_gram = self.exact
            op._window, op._free = deque(self.window), list(self.free)
            op._factor = self.factor
            op._edits = self.edits
            op._version = 0
            op._warned_hopeless = hopeless

        completed(commit)

    @classmethod
    def check(
        cls, op: Any, state: Mapping[str, Any], *, damp: float | None, refactor: bool
    ) -> LoadedState:
        """Every check of ``load_state_dict``; raises ``ValueError`` naming what is wrong.

        With ``damp`` the state is checked against its own damping and, with
        ``refactor``, its factor recomputed for ``damp``. Sharded, every rank's
        local checks and its part of the recomputed Gram matrix are reduced with
        one status word (every rank raises if one fails), which also compares a
        digest of the replicated m x m state, bit for bit, across the ranks.
        """
        parts: list[Any] = []
        m, xp = op.num_grads, op._xp

        def local() -> Array:
            parts.append(cls._check_local(op, state, damp))
            # This rank's columns of the stored gradients' Gram matrix, in float64.
            return xp.reshape(local_gram(xp, parts[0][0]), (-1,))

        def replicated() -> tuple[Any, ...]:
            # Everything but the gradients (each rank's own columns), bit for bit.
            _, gram, U, window, free, slots, edits, saved_damp, target, exact = parts[0]
            return gram, U, window, free, slots, edits, saved_damp, target, exact

        total = op._reduced(
            "load_state_dict" if refactor else "check_state_dict",
            local,
            m * m,
            agree=replicated,
            disagree=(
                ValueError,
                "the ranks' state_dicts disagree on the replicated window state (slot lists, "
                "edit count, damping, Gram matrix or factor): load every rank's state from "
                "one checkpoint",
            ),
        )
        grads, gram, U, window, free, slots, edits, saved_damp, target, exact = parts[0]
        k = len(window)
        cls._check_gram(op, gram, xp.reshape(total, (m, m)), exact=exact)
        # After the Gram's check: a Gram changed after it was computed no longer matches
        # the factor either, and was named as a corrupted factor. Replicated (the ranks
        # agreed on gram and U bit for bit), so every rank raises alike.
        cls._check_factor(op, gram, U, list(slots), k, saved_damp)
        gram = xp.asarray(gram, copy=True)
        if refactor and target != saved_damp:
            return cls(
                xp.asarray(grads, copy=True),
                gram,
                window,
                free,
                factorized(op, gram, list(slots), target, warn=False),
                0,
                target,
                exact,
            )
        factor = CapacitanceFactor(xp.asarray(U, copy=True), op._shift(k, saved_damp), 1.0)
        return cls(
            xp.asarray(grads, copy=True),
            gram,
            window,
            free,
            SlotFactor.build(factor, slots, op.num_grads),
            edits,
            saved_damp,
            exact,
        )

    @staticmethod
    def _check_layout(op: Any, state: Mapping[str, Any]) -> None:
        """The state's shard layout against the operator's (both unsharded, or the same)."""
        widths = state.get("shard_widths")
        if op.layout is None:
            if widths is not None:
                raise ValueError(
                    f"state_dict holds rank {state.get('shard_rank')}'s shard of a window split "
                    f"over {len(widths)} ranks; this operator is not sharded"
                )
            return
        if widths is None:
            raise ValueError(
                "state_dict is of an unsharded window; this operator holds rank "
                f"{op.layout.rank}'s shard of {len(op.layout.widths)} ranks (load it into "
                "a DynamicIHVP, or save the state of a sharded operator)"
            )
        try:
            saved = (int(state.get("shard_rank", -1)), tuple(int(w) for w in widths))
        except (TypeError, ValueError):
            raise ValueError("state_dict's shard_rank and shard_widths must be integers") from None
        if saved != (op.layout.rank, op.layout.widths):
            raise ValueError(
                f"state_dict holds rank {saved[0]}'s shard of a window whose {sum(saved[1])} "
                f"columns were split over {len(saved[1])} ranks as {list(saved[1])}; this "
                f"operator is rank {op.layout.rank} of {len(op.layout.widths)} with widths "
                f"{list(op.layout.widths)}: a sharded state loads only at the same world size "
                "and layout, on the rank that saved it"
            )

    @classmethod
    def _check_local(cls, op: Any, state: Mapping[str, Any], damp: float | None) -> tuple[Any, ...]:
        """The checks of one rank's state that need no other rank's data."""
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a mapping from state_dict(), got {type(state).__name__}"
            )
        version = state.get("version")
        if version == 1:
            state = {**state, **{new: state.get(old) for new, old in V1_NAMES.items()}}
        elif version != STATE_VERSION:
            raise ValueError(
                f"not a DynamicIHVP state_dict of a known version (got version "
                f"{version!r}, expected {STATE_VERSION})"
            )
        unknown = sorted(set(state) - STATE_KEYS, key=str)
        if unknown:
            raise ValueError(
                f"DynamicIHVP state_dict has unknown keys {unknown} (a state_dict() of "
                "DynamicIHVP holds only its own)"
            )
        keys = (
            "num_grads",
            "dim",
            "damp",
            "zero_init",
            "grads",
            "gram",
            "factor",
            "window_slots",
            "free_slots",
            "factor_slots",
            "edits",
        )
        # Named as the state names them: a version 1 state has no "window_slots" to add.
        missing = [V1_NAMES.get(k, k) if version == 1 else k for k in keys if state.get(k) is None]
        if missing:
            raise ValueError(f"DynamicIHVP state_dict lacks {', '.join(missing)}")
        cls._check_layout(op, state)
        m, d, xp = op.num_grads, op.dim, op._xp
        try:
            # As ints: compared as given, an array of sizes raised NumPy's "truth value of an
            # array ... is ambiguous", and 4.0 passed for 4.
            sizes = tuple(
                check_count(state[k], f"state['{k}']", minimum=0) for k in ("num_grads", "dim")
            )
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        if sizes != (m, d):
            raise ValueError(
                f"state_dict is for num_grads, dim = {sizes}, this operator has {(m, d)}"
            )
        try:
            saved_zero_init = check_flag(state["zero_init"], "state['zero_init']")
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        if saved_zero_init != op.zero_init:
            raise ValueError("state_dict and operator disagree on zero_init")
        try:
            saved_damp = check_damp(state["damp"])
        except TypeError as exc:
            raise ValueError(f"state['damp']: {exc}") from None
        if damp is None and saved_damp != op.damp:
            raise ValueError(
                f"state_dict has damp={saved_damp!r}, this operator "
                f"damp={op.damp!r}; pass load_state_dict(..., damp=...) to resume with "
                "another damping"
            )
        target = saved_damp if damp is None else check_damp(damp)
        check_window_damp(xp, op._G.dtype, m, op.zero_init, target)
        for key in ("grads", "gram", "factor"):
            refuse_derivatives(state[key], f'state_dict["{key}"]', _AS_SAVED, tangent_only=True)
        grads, gram, U = (
            stored(state[k], f'state_dict["{k}"]') for k in ("grads", "gram", "factor")
        )
        for name, array, dtype in (
            ("grads", grads, op._G.dtype),
            ("gram", gram, xp.float64),
            ("factor", U, xp.float64),
        ):
            check_same_space(xp, op.device, array, f"state['{name}']", owner=op)
            if array.dtype != dtype:
                # As the library prints an array's dtype (NumPy's xp.float64 is a class).
                expected = xp.empty((0,), dtype=dtype, device=op.device).dtype
                # A state saved with numpy.save comes back with bfloat16 grads as |V2.
                raise TypeError(
                    f"state['{name}'] has dtype {array.dtype}, expected {expected}"
                    f"{byte_order_note(f'state[{name!r}]', array.dtype)}"
                    f"{untyped_note(f'state[{name!r}]', array.dtype)}"
                )
        for key in ("window_slots", "free_slots", "factor_slots"):
            if isinstance(state[key], (str, bytes)) or not isinstance(state[key], Iterable):
                raise ValueError(
                    f"state['{key}'] must be a list of slot numbers (ints), got "
                    f"{type(state[key]).__name__}"
                )
        try:
            window, free, slots = (
                tuple(check_count(s, f"state['{key}'] entries", minimum=0) for s in state[key])
                for key in ("window_slots", "free_slots", "factor_slots")
            )
            edits = check_count(state["edits"], "state['edits']", minimum=0)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        k = len(window)
        if (
            sorted(slots) != sorted(window)
            or len(set(window)) != k
            or sorted(window + free) != list(range(m))
            or (op.zero_init and k != m)
        ):
            raise ValueError("state_dict slot lists are inconsistent")
        for name, array, shape in (
            ("grads", grads, (m, d)),
            ("gram", gram, (m, m)),
            ("factor", U, (k, k)),
        ):
            if tuple(array.shape) != shape:
                raise ValueError(
                    f"state['{name}'] has shape {tuple(array.shape)}, expected {shape}"
                )
        for name, array in (("grads", grads), ("gram", gram), ("factor", U)):
            if not is_finite_array(xp, array):
                raise ValueError(f"state['{name}'] holds NaN or infinity")
        # States saved before the Gram rows were summed in float64 lack the flag; a
        # float64 window's Gram always was.
        # Absent (None) in states saved before the flag; a bool wherever it is given.
        saved_exact = state.get("exact_gram")
        try:
            saved_exact = saved_exact is not None and check_flag(saved_exact, "state['exact_gram']")
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        exact = saved_exact or op._G.dtype == xp.float64
        return grads, gram, U, window, free, slots, edits, saved_damp, target, exact

    @staticmethod
    def _check_gram(op: Any, gram: Array, recomputed: Array, *, exact: bool) -> None:
        """The whole stored Gram matrix against the one recomputed from the stored gradients.

        Both are sums of d exact products in float64 (then of one partial sum per
        rank), so each entry errs by at most ``(d + ranks) eps |g_i| |g_j|``; a Gram
        saved before the rows were summed in float64 (``exact`` False) carries the
        rounding of the window's compute dtype instead. A negated, swapped or
        replaced gradient moves its whole Gram row by far more (unless it is
        orthogonal to every other to within that rounding, where the Gram is
        correct to it).
        """
        xp = op._xp
        ranks = 1 if op.layout is None else len(op.layout.widths)
        dim = op.dim if op.layout is None else op.layout.dim
        eps = float(xp.finfo(xp.float64 if exact else op.dtype).eps)
        norms = xp.sqrt(xp.clip(xp.linalg.diagonal(recomputed), 0.0, None))
        bound = (GRAM_ROUNDING * (dim + ranks) * eps) * (norms[:, None] * norms[None, :])
        excess = xp.abs(gram - recomputed) - bound
        if bool(xp.any(excess > 0)):
            flat = int(xp.argmax(xp.reshape(excess, (-1,))))
            i, j = divmod(flat, int(gram.shape[0]))
            raise ValueError(
                f"state_dict's Gram matrix does not match its gradients: entry ({i}, {j}) is "
                f"{float(gram[i, j]):.17g}, the stored gradients give "
                f"{float(recomputed[i, j]):.17g}, more than the rounding of the sums allows "
                f"({float(bound[i, j]):.3g}); a gradient was changed, moved or replaced after "
                "the Gram matrix was computed"
            )

    @staticmethod
    def _check_factor(
        op: Any, gram: Array, U: Array, slots: list[int], k: int, damp: float
    ) -> None:
        """The factor against the Gram matrix, on a sample of evenly spaced columns.

        The columns of ``U^T U`` against those of the capacitance matrix (within the
        rounding of a Cholesky factor, a small multiple of ``k eps`` relative to the
        matrix, or the drift that incremental edits may accumulate before a
        refactorisation).
        """
        xp = op._xp
        if not k:
            return
        eps64 = float(xp.finfo(xp.float64).eps)
        pos = evenly_spaced(k, FACTOR_SAMPLE)
        idx = xp.asarray(slots, dtype=xp.int64, device=op.device)
        C = xp.take(xp.take(gram, idx, axis=0), idx, axis=1)
        C = C + op._shift(k, damp) * xp.eye(k, dtype=xp.float64, device=op.device)
        cols = xp.asarray(pos, dtype=xp.int64, device=op.device)
        got = xp.matrix_transpose(U) @ xp.take(U, cols, axis=1)
        want = xp.take(C, cols, axis=1)
        scale = float(xp.max(xp.abs(xp.linalg.diagonal(C))))
        tol = max(64 * k * eps64, 1e3 * DRIFT_TOL) * scale
        # Sampled columns of U^T U, and its whole diagonal (O(k^2)), against C.
        diag_err = xp.abs(xp.sum(U * U, axis=0) - xp.linalg.diagonal(C))
        if float(xp.max(xp.abs(got - want))) > tol or float(xp.max(diag_err)) > tol:
            raise ValueError(
                "state_dict's factor does not match its Gram matrix (a permuted "
                "slot order or a corrupted factor)"
            )
