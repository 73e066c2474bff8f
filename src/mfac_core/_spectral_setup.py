"""The set-up and the state of :class:`~mfac_core.SpectralIHVP`: eigenpairs, damping, power.

The constructor's checks and its one pass over G (each group's float64 Gram, then
``eigh``), and the derived operators (another damping or power), which share G and
the eigenpairs and recompute only the O(m) bounds of the spectrum.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from . import _capacitance, _engine, _pieces
from ._attributes import reassign
from ._compat import Array, device, is_dask_namespace, stored
from ._dtypes import compute_dtype, half_dtype_name
from ._gram import columns_gram, rows_gram
from ._jax_mode import check_float64_available
from ._layout import BlockGroup, block_groups, checked_gram, chunk_culprit, chunks
from ._operator import LinearOperator
from ._spectral_groups import (
    ColumnEigen,
    GramEigen,
    Group,
    check_top_in_range,
    conditioning,
    spectrum_bounds,
)
from ._validation import (
    check_block_size,
    check_damp,
    check_dampings,
    check_flag,
    check_gradients,
)

__all__ = [
    "build",
    "check_namespace",
    "derived",
    "eigen_groups",
    "sweep_damps",
    "warn_if_any_hopeless",
]


def build(op: Any, G: Array, *, damp: Any, block_size: Any, check_finite: Any) -> None:
    """The body of :class:`SpectralIHVP`'s constructor: the checks, the set-up, the state."""
    check_finite = check_flag(check_finite, "check_finite")
    G = stored(G, "G")  # the operator stores G, never its autograd graph
    xp = check_gradients(G, require_finite=False, half=True)
    check_namespace(xp)
    m, d = (int(n) for n in G.shape)
    damp = check_damp(damp, num_grads=m)
    check_float64_available(xp)
    bs = check_block_size(block_size, d)
    storage = half_dtype_name(xp, G.dtype)
    dtype = compute_dtype(xp, G)
    groups = eigen_groups(
        xp, G, block_groups(d, bs), dtype=dtype, damp=damp, check_finite=check_finite
    )
    LinearOperator.__init__(
        op,
        shape=(d, d),
        dtype=dtype,
        xp=xp,
        device=device(G),
        symmetric=True,
        check_finite=check_finite,
    )
    op.num_grads, op.dim, op.block_size = m, d, bs
    op.storage_dtype = storage
    op._groups = groups
    op.power = -1.0
    _set_damp(op, damp)
    _warn_if_hopeless(op)


def check_namespace(xp: Any) -> None:
    """Refuse Dask arrays before any pass over G: the set-up's ``eigh`` has none for them.

    A Dask G failed only after the Gram's pass over it, as an ``AttributeError`` of
    ``array_api_compat``'s Dask namespace (so did the damping sweep and selection of
    :mod:`mfac_core.pruning`, which build this operator).
    """
    if is_dask_namespace(xp):
        raise TypeError(
            "SpectralIHVP takes no Dask arrays (nor do damping_sweep, select_damping and "
            "gradual_prune's select_damp of mfac_core.pruning, which build one): its set-up "
            "needs an eigendecomposition, which Dask lacks. Compute the arrays into NumPy "
            "ones first, or prune at one damping (prune, DaskStaticIHVP)"
        )


def derived(op: Any, *, damp: float | None = None, power: float | None = None) -> Any:
    """``op`` at another (checked) damping or power, sharing G and the eigenpairs."""
    check_float64_available(op.xp)  # a JAX operator built inside jax.enable_x64
    # A shallow copy shares G and the eigenpairs: O(m) per group, never O(d m).
    new = copy.copy(op)
    if power is not None:
        reassign(new, "power", power)
    if damp is not None:
        _set_damp(new, damp)
        _warn_if_hopeless(new)
    return new


def _set_damp(op: Any, damp: float) -> None:
    error_scale, kappa = spectrum_bounds(op.xp, op._groups, op.num_grads, damp)
    # Also a derived operator's, a copy of its source's attributes: set anew.
    for name, value in (("damp", damp), ("error_scale", error_scale), ("kappa", kappa)):
        reassign(op, name, value)


def _warn_if_hopeless(op: Any, damp: float | None = None) -> None:
    # The passes are exact to the result's rounding; what remains is the float64
    # eigen-decomposition: of G G^T (blocks wider than m), whose rounding each group's
    # spectrum amplifies by a known factor, or of each block's F_b itself (the dense
    # blocks' rule). The first block that may have no correct digit is named.
    damp = op.damp if damp is None else damp
    xp, eps = op.xp, _capacitance.EPS64
    for g in op._groups:
        kappa, a = conditioning(xp, g, op.num_grads, damp)
        # kappa**1.5 may pass float64's range (then it warns): NumPy's RuntimeWarning would
        # come first (np.errstate is local to this context).
        with np.errstate(over="ignore"):
            bad = _capacitance.is_imprecise(kappa, eps=eps, dense=a is None, amplification=a)
        if bool(xp.any(bad)):
            i = int(xp.argmax(xp.astype(bad, xp.int8)))
            _capacitance.warn_if_passes_hopeless(
                float(kappa[i]),
                damp=damp,
                dense=a is None,
                amplification=None if a is None else float(a[i]),
            )
            return


def warn_if_any_hopeless(op: Any, damps: list[float]) -> None:
    """Warn as the constructor does where one of ``damps`` (a sweep's) is hopeless.

    kappa and the amplification only grow as the damping shrinks (every ``t_j`` scales
    by the same factor, and ``(1 + t_1) / (1 + t_j)`` with it), so the smallest damping
    decides. One at or
    above the operator's own was covered when that was set (the constructor and
    ``with_damp`` warn), so only a smaller one is checked: an O(m) look at the spectrum.
    """
    low = min(damps)
    if low < op.damp:
        _warn_if_hopeless(op, low)


def sweep_damps(op: Any, damps: Any) -> list[float]:
    """The dampings of a sweep or ``diagonal(damps=...)``, checked, warned of as ``with_damp``.

    Refused as ``with_damp`` refuses them: not finite dampings > 0, or a damping at which
    F's largest eigenvalue overflows (the largest decides); then the smallest may warn.
    """
    dl = check_dampings(damps, num_grads=op.num_grads)
    check_top_in_range(op._groups, op.num_grads, max(dl))
    warn_if_any_hopeless(op, dl)
    return dl


def eigen_groups(
    xp: Any,
    G: Array,
    groups: tuple[BlockGroup, ...],
    *,
    dtype: Any,
    damp: float,
    check_finite: bool,
) -> tuple[Group, ...]:
    """Each group's float64 eigenpairs, chunk by chunk, in one pass over G.

    The chunk's Grams are summed in float64 over column pieces (products of float32
    or 2-byte values are exact in float64), then decomposed by ``eigh``; blocks no
    wider than m decompose their ``G_b^T G_b`` instead (``_spectral_groups``).
    """
    m = G.shape[0]
    # StaticIHVP's set-up rule: on the host at most 32 MiB and 1/64 of G's entries (the
    # peak memory stays near size(G)); on an accelerator one device piece.
    width = _pieces.gram_piece_width(xp, G)

    def rows(X: Array) -> Array:
        return rows_gram(xp, X)

    def columns(X: Array) -> Array:
        return columns_gram(xp, X)

    # The C extension's Gram (in levels, with no float64 copy of G) where it serves, as
    # StaticIHVP's set-up.
    kernel = _engine.gram_kernel(xp, G)
    out: list[Group] = []
    for g in groups:
        dense = g.size <= m
        vals, vecs = [], []
        for chunk in chunks(g, max(width, g.size) if dense else width):
            gram = checked_gram(
                xp,
                G,
                g,
                chunk,
                columns if dense else rows,
                check=check_finite,
                gram=None if dense else kernel,
            )
            if not check_finite and not bool(xp.all(xp.isfinite(xp.linalg.diagonal(gram)))):
                # Unchecked NaN or infinity in G: eigh would fail with a bare LinAlgError
                # (or return NaN). Each off-diagonal entry is bounded by the diagonal's,
                # so O(m) of work tells, and the error is StaticIHVP's.
                raise _capacitance.non_finite_gram_error(damp, chunk_culprit(xp, G, g, chunk)())
            lam, U = xp.linalg.eigh(gram)
            if not bool(xp.all(xp.isfinite(lam[..., -1]))):
                # Finite entries (each at most the largest squared norm) whose largest
                # eigenvalue (up to m times it) overflows: no weight would be right.
                raise ValueError(
                    "the largest eigenvalue of G's Gram matrix overflows float64: G is finite "
                    "but too large; rescale the gradients (the damping scales with their square)"
                )
            vals.append(xp.clip(lam, min=0.0))
            vecs.append(U)
        lams = vals[0] if len(vals) == 1 else xp.concat(vals, axis=0)
        U = vecs[0] if len(vecs) == 1 else xp.concat(vecs, axis=0)
        out.append(ColumnEigen(g, U, lams, m, dtype) if dense else GramEigen(g, G, U, lams, dtype))
    return tuple(out)
