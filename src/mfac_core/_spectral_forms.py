r"""The bilinear and quadratic forms of :class:`~mfac_core.SpectralIHVP`, without a d x d array.

``Q f(F) R^T = sum_b a_b Q_b R_b^T + (B_b Q_b^T)^T diag(w_b) (B_b R_b^T)`` with the
float64 coordinates ``B_b A^T`` and ``(a_b, w_b)`` of each group of blocks
(``_spectral_groups``: ``project`` and ``form``): Q is projected once, R a batch
of rows at a time (docs/beyond.rst, "What each operation costs").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _pieces
from ._compat import Array
from ._finite import check_finite, narrowed
from ._spectral_groups import GramEigen
from ._validation import check_count, check_operand

__all__ = ["Forms", "checked_rows", "forms_of"]


def checked_rows(op: Any, A: Array, name: str) -> Any:
    """``A`` checked as a stack of vectors in the rows, ``(n, d)``, for ``op``'s forms."""
    A = check_operand(op.xp, op.device, op.dtype, A, name, owner=op)
    if A.ndim != 2 or A.shape[1] != op.dim:
        raise ValueError(
            f"{name} must have shape (n, {op.dim}), one vector per row; got {tuple(A.shape)}"
        )
    if op.check_finite:
        check_finite(op.xp, A, name)
    return A


def forms_of(op: Any, batch_size: int | None) -> Forms:
    """The forms of ``op``'s power of F at its damping, ``batch_size`` rows of R at a time."""
    groups = op._groups
    if batch_size is None:
        # Bounded temporaries: about 2**22 entries of the coordinates (or of R in float64),
        # on an accelerator the engine's one device piece.
        blocks = sum(g.group.count for g in groups)
        first = groups[0]
        anchor = first.U if isinstance(first, GramEigen) else first.Q
        entries = _pieces.piece_entries(op.xp, anchor, host=_pieces.LARGE_PIECE_ENTRIES)
        step = max(1, entries // max(op.num_grads * blocks, op.dim))
    else:
        step = check_count(batch_size, "batch_size")
    return Forms(op.xp, groups, op.damp, op.power, step, op.dtype, op.device)


@dataclass(frozen=True)
class Forms:
    """The bilinear and quadratic forms of ``F**power``, ``step`` rows of R at a time.

    ``sum_b a_b Q_b R_b^T + (B_b Q_b^T)^T diag(w_b) (B_b R_b^T)`` with the float64
    coordinates ``B_b`` of each group's ``project``: the temporaries are
    ``(p + step) x m`` per block, and the m-sized contractions float64.
    """

    xp: Any
    groups: Any
    damp: float
    power: float
    step: int
    dtype: Any
    device: Any

    def bilinear(self, Q: Array, R: Array) -> Array:
        """``Q F**power R^T``, shape ``(p, n)``: Q projected once, R a batch at a time."""
        xp = self.xp
        forms = [g.form(self.damp, self.power) for g in self.groups]
        # The scales apart until the sums meet R's projections, as in quadratic().
        PQ = [w[..., None] * g.project(Q) for g, (_, w, _) in zip(self.groups, forms, strict=True)]
        Q64 = xp.astype(Q, xp.float64)
        parts = []
        for lo in range(0, R.shape[0], self.step):
            Rb = R[lo : min(lo + self.step, R.shape[0]), :]
            R64 = xp.astype(Rb, xp.float64)
            acc = xp.zeros((Q.shape[0], Rb.shape[0]), dtype=xp.float64, device=self.device)
            for g, (a, _, sc), pq in zip(self.groups, forms, PQ, strict=True):
                if a:
                    # a before the product, as w meets the projections: Q R^T may pass
                    # float64's range where a Q R^T does not (a huge damping).
                    s, e = g.group.start, g.group.end
                    acc = acc + (a * Q64[:, s:e]) @ xp.matrix_transpose(R64[:, s:e])
                acc = acc + sc * xp.sum(xp.matrix_transpose(pq) @ g.project(Rb), axis=0)
            parts.append(narrowed(xp, acc, self.dtype))
        if not parts:
            return xp.zeros((Q.shape[0], 0), dtype=self.dtype, device=self.device)
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def quadratic(self, R: Array) -> Array:
        """``diag(R F**power R^T)``, shape ``(n,)``, a batch of rows of R at a time."""
        xp = self.xp
        forms = [g.form(self.damp, self.power) for g in self.groups]
        parts = []
        for lo in range(0, R.shape[0], self.step):
            Rb = R[lo : min(lo + self.step, R.shape[0]), :]
            R64 = xp.astype(Rb, xp.float64)
            acc = xp.zeros((Rb.shape[0],), dtype=xp.float64, device=self.device)
            for g, (a, w, sc) in zip(self.groups, forms, strict=True):
                if a:
                    Rg = R64[:, g.group.start : g.group.end]
                    acc = acc + xp.sum((a * Rg) * Rg, axis=1)  # as in bilinear()
                P = g.project(Rb)  # (count, r, n)
                acc = acc + sc * xp.sum(w[..., None] * P * P, axis=(0, 1))
            parts.append(narrowed(xp, acc, self.dtype))
        if not parts:
            return xp.zeros((0,), dtype=self.dtype, device=self.device)
        return parts[0] if len(parts) == 1 else xp.concat(parts)
