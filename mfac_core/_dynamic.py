"""The dynamic M-FAC operator: the inverse Fisher of a sliding window of gradients."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from . import _linalg
from ._blocks import BlockGroup, chunk_gram, pieces
from ._compat import array_namespace, is_writeable_array
from ._compat import device as device_of
from ._linalg import FactorizationError
from ._operator import LinearOperator
from ._validation import check_damp, check_finite, check_same_space, namespace_of

__all__ = ["DynamicIHVP"]

_STATE_VERSION = 1
#: Relative drift of diag(U^T U) against diag(C) that triggers a full refactorisation.
_DRIFT_TOL = 1e-10


def _default_namespace() -> Any:
    import numpy as np

    return array_namespace(np.empty(0))


class DynamicIHVP(LinearOperator):
    r"""The inverse damped Fisher of a sliding window of the last gradients.

    ``F = damp * I + (1/k) * sum(g g^T)`` over the ``k <= num_grads``
    gradients currently in the window (``k = num_grads`` once it is full).
    Inserting a gradient into a full window replaces the oldest one. Every
    buffer is created once, in the given namespace and on the given device.

    Parameters
    ----------
    num_grads : int
        The window's capacity m.
    dim : int
        The number of coordinates d.
    damp : float
        The damping ``lambda > 0``.
    dtype : dtype or str
        Storage dtype of the gradients (``"float32"`` or ``"float64"`` or the
        namespace's dtype object). All m x m work is float64.
    xp : module, optional
        The array namespace (default: NumPy). Any Array-API namespace, or
        the library module itself (``torch``, ``cupy``, ...).
    device : optional
        The device of the buffers (default: the namespace's default).
    zero_init : bool, optional
        Reproduce the authors' convention: the window starts as ``num_grads``
        zero gradients and the normalisation is fixed at ``1/num_grads``.
        Removing a gradient then sets it to zero.
    update_method : {"incremental", "refactor"}, optional
        ``"incremental"`` (default) edits the float64 Cholesky factor of the
        m x m capacitance matrix in O(m^2) per replaced gradient;
        ``"refactor"`` refactorises it in O(m^3), as a reference.
    refactor_every : int, optional
        Refactorise in full after this many incremental edits (default m),
        which bounds the drift of the factor; a cheap drift check after each
        edit refactorises earlier if needed.
    check_finite : bool, optional
        Refuse gradients and vectors holding NaN or infinity (default True).

    See Also
    --------
    StaticIHVP : the same inverse for a fixed set of gradients.

    Notes
    -----
    With the window's gradients in the rows of ``G`` (k x d) and the
    capacitance matrix ``C = k lambda I + G G^T = U^T U`` (float64),

    .. math:: F^{-1} x = (x - G^T C^{-1} G x) / \lambda .

    Replacing a gradient g by g' changes one row and column of ``G G^T``:
    one product ``G g'`` (O(dm)) and an O(m^2) edit of ``U`` (delete a row and
    column by a rank-one update, append one by a triangular solve). The
    optimiser step :meth:`update_and_matvec` shares ``G g'`` between the
    update and the product, so it reads the m x d window twice, the floor.
    While the window fills up (or after a removal) the normalisation ``1/k``
    changes every diagonal entry of ``C`` and the factor is recomputed
    (O(k^3)); with ``zero_init=True`` it never changes.

    Precision: each new Gram row is the one product ``G g'`` in the storage
    dtype (a float64 copy of the window would double the step's traffic), so
    its rounding is that of the O(dm) passes, about ``eps(dtype)`` relative;
    the factor and all m x m work are float64. :meth:`from_window`
    accumulates its initial Gram matrix in float64.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import DynamicIHVP, StaticIHVP
    >>> rng = np.random.default_rng(0)
    >>> op = DynamicIHVP(4, 50, damp=0.1, dtype="float64")
    >>> for _ in range(6):
    ...     step = op.update_and_matvec(rng.standard_normal(50))
    >>> len(op), op.window().shape
    (4, (4, 50))
    >>> x = rng.standard_normal(50)
    >>> bool(np.allclose(op @ x, StaticIHVP(op.window(), damp=0.1) @ x))
    True
    """

    def __init__(
        self,
        num_grads: int,
        dim: int,
        /,
        *,
        damp: float,
        dtype: Any,
        xp: Any = None,
        device: Any = None,
        zero_init: bool = False,
        update_method: str = "incremental",
        refactor_every: int | None = None,
        check_finite: bool = True,
    ) -> None:
        for name, value in (("num_grads", num_grads), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.damp = check_damp(damp)
        if update_method not in ("incremental", "refactor"):
            raise ValueError(f"update_method must be 'incremental' or 'refactor', "
                             f"got {update_method!r}")
        if refactor_every is None:
            refactor_every = num_grads
        if isinstance(refactor_every, bool) or not isinstance(refactor_every, int) \
                or refactor_every < 1:
            raise ValueError(f"refactor_every must be an int >= 1, got {refactor_every!r}")
        xp = _default_namespace() if xp is None else array_namespace(xp.empty(0))
        if isinstance(dtype, str):
            if dtype not in ("float32", "float64"):
                raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
            dtype = getattr(xp, dtype)
        if dtype not in (xp.float32, xp.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
        G = xp.zeros((num_grads, dim), dtype=dtype, device=device)
        if not is_writeable_array(G):
            raise TypeError("DynamicIHVP needs a library with mutable arrays (not JAX)")
        super().__init__(shape=(dim, dim), dtype=dtype, xp=xp, device=device_of(G), symmetric=True,
                         check_finite=check_finite)
        self.num_grads, self.dim = num_grads, dim
        self.zero_init = bool(zero_init)
        self.update_method = update_method
        self.refactor_every = refactor_every
        self._G = G
        self._gram = xp.zeros((num_grads, num_grads), dtype=xp.float64, device=self.device)
        self._buffers: tuple[Any, Any] | None = None
        self.reset()

    @classmethod
    def from_window(cls, G: Any, /, *, damp: float, num_grads: int | None = None,
                    **options: Any) -> DynamicIHVP:
        """A window initialised with the gradients in the rows of ``G`` (oldest first).

        ``num_grads`` (default: the number of rows) is the capacity; the
        namespace, device and dtype are G's. The set-up is BLAS-3: one Gram
        product and one factorisation.
        """
        xp = namespace_of(G, "G")
        if G.ndim != 2:
            raise ValueError(f"G must be 2-D (k, d), got shape {tuple(G.shape)}")
        k, d = G.shape
        num_grads = k if num_grads is None else num_grads
        if k > num_grads:
            raise ValueError(f"G holds {k} gradients, more than num_grads={num_grads}")
        op = cls(num_grads, d, damp=damp, dtype=G.dtype, xp=xp, device=device_of(G), **options)
        if k == 0:
            return op
        if op.check_finite:
            check_finite(xp, G, "G")
        # Both conventions put the k gradients into slots 0..k-1, oldest first.
        op._G[:k, ...] = G
        whole = BlockGroup(0, 1, d, False)
        chunk = list(pieces(whole, max(1, 2**22 // k)))  # one block: a single chunk
        op._gram[:k, :k] = chunk_gram(xp, G, whole, chunk,
                                      lambda X: X @ xp.matrix_transpose(X))[0, ...]
        if op.zero_init:
            op._age = deque(list(range(k, num_grads)) + list(range(k)))
        else:
            op._age = deque(range(k))
            op._free = list(range(num_grads - 1, k - 1, -1))
        op._refactor()
        return op

    # -- bookkeeping -------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the window (or, with ``zero_init``, fill it with zero gradients)."""
        m = self.num_grads
        self._G[...] = 0
        self._gram[...] = 0
        self._since_refactor = 0
        self.refactor_count = 0
        self._U = None
        if self.zero_init:
            self._age = deque(range(m))
            self._free = []
        else:
            self._age = deque()
            self._free = list(range(m - 1, -1, -1))
        self._refactor()

    def __len__(self) -> int:
        """The number of gradients in the window."""
        return len(self._age)

    @property
    def is_full(self) -> bool:
        return len(self._age) == self.num_grads

    @property
    def slots(self) -> list[int]:
        """The buffer rows of the window's gradients, oldest first."""
        return list(self._age)

    def window(self) -> Any:
        """The window's gradients as a new ``(k, d)`` array, oldest first."""
        idx = self._xp.asarray(list(self._age), dtype=self._xp.int64, device=self.device)
        return self._xp.take(self._G, idx, axis=0)

    def _shift(self, k: int) -> float:
        return (self.num_grads if self.zero_init else k) * self.damp

    def _set_factor(self, U: Any, perm: list[int]) -> None:
        xp = self._xp
        self._U, self._perm = U, perm
        self._perm_idx = xp.asarray(perm, dtype=xp.int64, device=self.device)
        # Position of each slot in the factor, or k (an extra zero) for slots outside it.
        inv = [len(perm)] * self.num_grads
        for pos, slot in enumerate(perm):
            inv[slot] = pos
        self._inv_idx = xp.asarray(inv, dtype=xp.int64, device=self.device)

    def _capacitance(self, gram: Any, perm: list[int]) -> Any:
        xp = self._xp
        idx = xp.asarray(perm, dtype=xp.int64, device=self.device)
        sub = xp.take(xp.take(gram, idx, axis=0), idx, axis=1)
        eye = xp.eye(len(perm), dtype=xp.float64, device=self.device)
        return sub + self._shift(len(perm)) * eye

    def _factorize(self, gram: Any, perm: list[int]) -> Any:
        if not perm:
            return self._xp.zeros((0, 0), dtype=self._xp.float64, device=self.device)
        C = self._capacitance(gram, perm)
        try:
            return _linalg.cholesky(self._xp, C)
        except _linalg._NotPositiveDefinite:
            raise self._factorization_error(C) from None

    def _factorization_error(self, C: Any) -> FactorizationError:
        k = C.shape[0]
        xp = self._xp
        shift = self._shift(k)
        kappa = float(xp.max(xp.linalg.diagonal(C))) / shift if k else 1.0
        return FactorizationError(
            f"the window's damped Fisher is not numerically positive definite in float64 "
            f"(damp={self.damp:g}, condition number kappa ~ {kappa:.3g}); increase damp, or do "
            "not insert duplicated gradients")

    def _refactor(self, perm: list[int] | None = None) -> None:
        """Factorise the capacitance matrix of ``perm`` (default: the window) in full."""
        perm = list(self._age) if perm is None else perm
        self._set_factor(self._upper_from_lower(self._factorize(self._gram, perm)), perm)
        self._since_refactor = 0
        self.refactor_count += 1

    # -- updates -----------------------------------------------------------------------

    def _check_gradient(self, g: Any) -> None:
        check_same_space(self._xp, self.device, self.dtype, g, "g", owner=repr(self))
        if g.ndim != 1 or g.shape[0] != self.dim:
            raise ValueError(f"g must have shape ({self.dim},), got {tuple(g.shape)}")
        if self.check_finite:
            check_finite(self._xp, g, "g")

    def _free_buffer(self) -> Any:
        """The one of the two m x m factor buffers that does not hold the factor.

        Once the window is full, factors ping-pong between two C-ordered
        buffers created once: no allocation per step, and row-wise writes.
        """
        if self._buffers is None:
            m = self.num_grads
            self._buffers = tuple(
                self._xp.empty((m, m), dtype=self._xp.float64, device=self.device)
                for _ in range(2))
        first, second = self._buffers
        return second if self._U is first else first

    def _upper_from_lower(self, L: Any) -> Any:
        U = self._xp.matrix_transpose(L)
        if L.shape[0] != self.num_grads:
            return U
        out = self._free_buffer()
        out[...] = U
        return out

    def _new_factor(self, slot: int, b: Any) -> tuple[Any, list[int], bool]:
        """The factor after ``slot`` gets Gram row ``b``; the O(m^2) or O(m^3) part.

        Returns ``(U, perm, refactored)``; nothing of the operator changes (the
        free factor buffer is scratch).
        """
        with _linalg.single_threaded(self._xp):
            return self._new_factor_unlimited(slot, b)

    def _new_factor_unlimited(self, slot: int, b: Any) -> tuple[Any, list[int], bool]:
        xp = self._xp
        replacing = slot in self._perm
        perm = [s for s in self._perm if s != slot] + [slot]
        k = len(perm)
        if (self.update_method == "incremental" and replacing and k == self.num_grads
                and self._since_refactor < self.refactor_every):
            try:
                bp = xp.take(b, self._perm_idx_without(slot), axis=0)
                U = _linalg.replace_row(xp, self._U, self._perm.index(slot), bp,
                                      float(b[slot]) + self._shift(k), self._free_buffer())
                if not self._drifted(U, perm, b, slot):
                    return U, perm, False
            except _linalg._NotPositiveDefinite:
                pass
        gram = xp.asarray(self._gram, copy=True)
        gram[slot, :] = b
        gram[:, slot] = b
        return self._upper_from_lower(self._factorize(gram, perm)), perm, True

    def _place(self, slot: int, g: Any, b: Any | None = None) -> Any:
        """Put gradient ``g`` into ``slot``; return its Gram row (float64, slot order).

        The row is written first so that one product ``G g`` gives the whole
        Gram row, the diagonal included: entries of one kernel keep a
        duplicated gradient's 2 x 2 block exactly singular, not indefinite by
        rounding. ``b`` may be given when it is known (a zero gradient). If
        the new factor cannot be computed, the old row is put back and the
        operator is as it was.
        """
        xp = self._xp
        old = xp.asarray(self._G[slot, ...], copy=True)
        self._G[slot, ...] = g
        try:
            if b is None:
                b = xp.astype(self._G @ g, xp.float64)
            U, perm, refactored = self._new_factor(slot, b)
        except BaseException:
            self._G[slot, ...] = old
            raise
        self._gram[slot, :] = b
        self._gram[:, slot] = b
        self._set_factor(U, perm)
        if refactored:
            self._since_refactor = 0
            self.refactor_count += 1
        else:
            self._since_refactor += 1
        return b

    def _perm_idx_without(self, slot: int) -> Any:
        xp = self._xp
        return xp.asarray([s for s in self._perm if s != slot], dtype=xp.int64,
                          device=self.device)

    def _drifted(self, U: Any, perm: list[int], b: Any, slot: int) -> bool:
        """Cheap check of an edited factor: diag(U^T U) against diag(C).

        On up to 32 evenly spaced columns, the new one included: O(32 m), next
        to the O(m^2) edit. Rounding drift spreads over all columns of the
        rank-one updates, so a sample sees it.
        """
        xp = self._xp
        k = len(perm)
        cols = sorted({round(i * (k - 1) / 31) for i in range(32)} if k > 32 else range(k))
        pos = xp.asarray(cols, dtype=xp.int64, device=self.device)
        slots = xp.asarray([perm[c] for c in cols], dtype=xp.int64, device=self.device)
        diag_gram = xp.take(xp.linalg.diagonal(self._gram), slots, axis=0)
        diag_gram = xp.where(slots == slot, b[slot], diag_gram)
        want = diag_gram + self._shift(k)
        Uc = xp.take(U, pos, axis=1)
        got = xp.sum(Uc * Uc, axis=0)
        return float(xp.max(xp.abs(got - want) / want)) > _DRIFT_TOL

    def _insert(self, g: Any) -> Any:
        self._check_gradient(g)
        if self.is_full:
            slot = self._age[0]
        else:
            slot = self._free[-1]
        b = self._place(slot, g)
        if self.is_full:
            self._age.popleft()
        else:
            self._free.pop()
        self._age.append(slot)
        return b

    def update(self, g: Any, /) -> None:
        """Insert gradient ``g`` (shape ``(d,)``); a full window drops its oldest.

        A gradient holding NaN or infinity is refused and the window is left
        unchanged.
        """
        self._insert(g)

    def update_and_matvec(self, g: Any, /) -> Any:
        """Insert ``g``, then return ``F^{-1} g`` for the window that includes it.

        The optimiser step: the product ``G g`` serves both the update of the
        Gram matrix and the product, so the m x d window is read twice in all.
        """
        b = self._insert(g)
        return self._finish(g[:, None], b[:, None])[:, 0]

    def remove_oldest(self) -> None:
        """Remove the oldest gradient of the window."""
        if not self._age:
            raise ValueError("the window is empty")
        self.remove(self._age[0])

    def remove(self, slot: int, /) -> None:
        """Remove the gradient in buffer row ``slot`` (see :attr:`slots`).

        With ``zero_init`` the slot is set to a zero gradient and becomes the
        next one to be replaced.
        """
        if isinstance(slot, bool) or not isinstance(slot, int) or slot not in self._age:
            raise ValueError(f"slot {slot!r} holds no gradient; the window's slots are "
                             f"{list(self._age)}")
        xp = self._xp
        if self.zero_init:
            self._place(slot, xp.zeros((self.dim,), dtype=self.dtype, device=self.device),
                        xp.zeros((self.num_grads,), dtype=xp.float64, device=self.device))
            self._age.remove(slot)
            self._age.appendleft(slot)
            return
        # The normalisation 1/k changes: refactorise without the slot (its Gram row
        # is not read), then clear it; a failure leaves the window as it was.
        self._refactor([s for s in self._age if s != slot])
        self._age.remove(slot)
        self._free.append(slot)
        self._G[slot, ...] = 0
        self._gram[slot, :] = 0
        self._gram[:, slot] = 0

    # -- products ----------------------------------------------------------------------

    def _coefficients(self, P: Any) -> Any:
        """``C^{-1} P`` in slot order (zero for empty slots): the m x m part of a product."""
        xp = self._xp
        Pp = xp.take(P, self._perm_idx, axis=0)
        with _linalg.single_threaded(xp):
            Z = _linalg.solve_triangular(xp, self._U, Pp, lower=False, trans=True)
            coef = _linalg.solve_triangular(xp, self._U, Z, lower=False)
        zero = xp.zeros((1, coef.shape[1]), dtype=coef.dtype, device=self.device)
        return xp.take(xp.concat([coef, zero], axis=0), self._inv_idx, axis=0)

    def _finish(self, X: Any, P: Any) -> Any:
        """``(X - G^T C^{-1} P) / damp`` given ``P = G X`` (float64, slot order)."""
        if not self._perm:
            return X / self.damp
        A = self._xp.astype(self._coefficients(P), self.dtype)
        return (X - self._G.T @ A) / self.damp

    def _matmat(self, X: Any) -> Any:
        return self._finish(X, self._xp.astype(self._G @ X, self._xp.float64))

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The window's state as plain arrays and numbers (for checkpoints).

        Restoring it with :meth:`load_state_dict` reproduces the operator bit
        for bit, including its Cholesky factor.
        """
        xp = self._xp
        return {
            "version": _STATE_VERSION,
            "num_grads": self.num_grads,
            "dim": self.dim,
            "damp": self.damp,
            "zero_init": self.zero_init,
            "grads": xp.asarray(self._G, copy=True),
            "gram": xp.asarray(self._gram, copy=True),
            "factor": xp.asarray(self._U, copy=True),
            "factor_order": list(self._perm),
            "age_order": list(self._age),
            "free_slots": list(self._free),
            "since_refactor": self._since_refactor,
        }

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        """Restore a state from :meth:`state_dict` (same sizes, dtype and device)."""
        xp = self._xp
        try:
            version = state["version"]
            sizes = (state["num_grads"], state["dim"])
        except (KeyError, TypeError):
            raise ValueError("not a DynamicIHVP state_dict") from None
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported state_dict version {version!r}")
        if sizes != (self.num_grads, self.dim):
            raise ValueError(f"state_dict is for num_grads, dim = {sizes}, this operator has "
                             f"{(self.num_grads, self.dim)}")
        if bool(state["zero_init"]) != self.zero_init:
            raise ValueError("state_dict and operator disagree on zero_init")
        if not math.isclose(float(state["damp"]), self.damp, rel_tol=0.0, abs_tol=0.0):
            raise ValueError(f"state_dict has damp={state['damp']}, this operator "
                             f"damp={self.damp}")
        grads, gram, factor = state["grads"], state["gram"], state["factor"]
        perm, age, free = (list(map(int, state[k])) for k in
                           ("factor_order", "age_order", "free_slots"))
        m = self.num_grads
        check_same_space(xp, self.device, self.dtype, grads, "state['grads']")
        check_same_space(xp, self.device, xp.float64, gram, "state['gram']")
        check_same_space(xp, self.device, xp.float64, factor, "state['factor']")
        if tuple(grads.shape) != (m, self.dim) or tuple(gram.shape) != (m, m) \
                or tuple(factor.shape) != (len(perm), len(perm)):
            raise ValueError("state_dict arrays have the wrong shapes")
        if sorted(perm) != sorted(age) or len(set(age)) != len(age) \
                or sorted(age + free) != list(range(m)):
            raise ValueError("state_dict slot lists are inconsistent")
        self._G[...] = grads
        self._gram[...] = gram
        self._age, self._free = deque(age), free
        self._set_factor(xp.asarray(factor, copy=True), perm)
        self._since_refactor = int(state["since_refactor"])

