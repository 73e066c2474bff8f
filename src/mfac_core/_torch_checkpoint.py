"""MFAC's window in its checkpoints: tensors of fixed shapes and plain scalars only.

:meth:`DynamicIHVP.state_dict` holds the slot lists as Python lists and the
Cholesky factor as ``k x k`` for the ``k`` gradients in the window. Neither suits
:mod:`torch.distributed.checkpoint`: its flattened and full state dicts take
tensors, ints, floats and dicts only, and ``dcp.load`` fills the tensors of a
fresh optimizer's state dict in place, so every tensor must have the shape it
will have when loaded. In MFAC's state dict the window therefore holds

- each slot list as an int64 tensor of length ``m`` on the window's device, the
  list's entries first, then ``-1`` (:data:`PAD`);
- the factor as ``m x m``, the ``k x k`` factor in its top-left corner and zeros
  elsewhere;
- a sharded window's ``shard_widths`` as an int64 tensor of the ranks' widths.

:func:`unpacked` turns that back into the core's form, and accepts the core's form
(lists, a ``k x k`` factor) of earlier checkpoints as it is.

Beside the window, MFAC's entry holds its parameters' shapes (:func:`packed_shapes`),
which a load compares with its own: the window and the momentum are vectors over all
parameters' coordinates, which a state of parameters in another order would permute.
DCP takes no list there (its flattened state holds tensors, ints, floats and dicts), so
they are one int64 tensor, of the same length on every rank (the parameters' global
shapes, so that DCP keeps one copy of the key that every rank saves). Nothing here is
public.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: The slot lists of the window's state.
SLOT_KEYS = ("window_slots", "free_slots", "factor_slots")
#: What follows the entries of a slot list in its fixed-length tensor.
PAD = -1


def packed(window: Mapping[str, Any], num_grads: int) -> dict[str, Any]:
    """The core's window state (fresh copies) with fixed shapes: see the module's doc."""
    out = dict(window)
    m = num_grads
    device = window["grads"].device
    for key in SLOT_KEYS:
        slots = torch.full((m,), PAD, dtype=torch.int64, device=device)
        entries = list(window[key])
        slots[: len(entries)] = torch.tensor(entries, dtype=torch.int64, device=device)
        out[key] = slots
    factor = window["factor"]
    k = factor.shape[0]
    if k != m:
        full = factor.new_zeros((m, m))
        full[:k, :k] = factor
        out["factor"] = full
    if window.get("shard_widths") is not None:
        out["shard_widths"] = torch.tensor(
            list(window["shard_widths"]), dtype=torch.int64, device=device
        )
    return out


def unpacked(window: Mapping[str, Any], num_grads: int, where: str) -> dict[str, Any]:
    """The core's form of a window state, packed (:func:`packed`) or not (earlier states).

    Raises ``ValueError`` for a slot tensor that is not a 1-D integer tensor of
    length ``m`` with its entries before its padding, or a padded factor that is
    not zero outside its ``k x k`` corner. Everything else is the core's to check.
    """
    out = dict(window)
    m = num_grads
    for key in SLOT_KEYS:
        if isinstance(window.get(key), torch.Tensor):
            out[key] = slot_list(window[key], m, f"{where}[{key!r}]")
    widths = window.get("shard_widths")
    if isinstance(widths, torch.Tensor):
        if widths.dim() != 1 or widths.dtype.is_floating_point or widths.is_complex():
            raise ValueError(f"{where}['shard_widths'] must be a 1-D integer tensor")
        out["shard_widths"] = [int(w) for w in widths.tolist()]
    factor, slots = window.get("factor"), out.get("window_slots")
    if isinstance(factor, torch.Tensor) and isinstance(slots, list) and factor.dim() == 2:
        k = len(slots)
        if tuple(factor.shape) == (m, m) and k < m:
            if bool(factor[k:].any()) or bool(factor[:, k:].any()):
                raise ValueError(
                    f"{where}['factor'] is padded to {m} x {m} for {k} gradients but is "
                    f"not zero outside its {k} x {k} corner"
                )
            out["factor"] = factor[:k, :k]
    return out


def slot_list(slots: torch.Tensor, m: int, where: str) -> list[int]:
    """The entries of a packed slot list (before its padding)."""
    if (
        slots.dim() != 1
        or slots.shape[0] != m
        or slots.dtype.is_floating_point
        or slots.is_complex()
        or slots.dtype == torch.bool
    ):
        raise ValueError(
            f"{where} must be a 1-D integer tensor of length num_grads={m}, got "
            f"shape {tuple(slots.shape)} and dtype {slots.dtype}"
        )
    values = [int(v) for v in slots.tolist()]
    k = next((i for i, v in enumerate(values) if v == PAD), m)
    if any(v != PAD for v in values[k:]):
        raise ValueError(f"{where} has entries after its padding ({PAD}): {values}")
    return values[:k]


def packed_shapes(shapes: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """The parameters' shapes as one int64 tensor: each one's number of dimensions, its sizes.

    ``[(5,), (2, 3), ()]`` is ``[1, 5, 2, 2, 3, 0]``.
    """
    values = [v for shape in shapes for v in (len(shape), *shape)]
    return torch.tensor(values, dtype=torch.int64, device=device)


def unpacked_shapes(packed: Any, count: int, where: str) -> list[tuple[int, ...]]:
    """The ``count`` shapes of :func:`packed_shapes`; ``ValueError`` for anything else."""
    if (
        not isinstance(packed, torch.Tensor)
        or packed.dim() != 1
        or packed.dtype.is_floating_point
        or packed.is_complex()
        or packed.dtype == torch.bool
    ):
        got = (
            f"shape {tuple(packed.shape)} and dtype {packed.dtype}"
            if isinstance(packed, torch.Tensor)
            else type(packed).__name__
        )
        raise ValueError(
            f"{where} must be a 1-D integer tensor of the parameters' shapes, got {got}"
        )
    values = [int(v) for v in packed.tolist()]
    shapes: list[tuple[int, ...]] = []
    i = 0
    while i < len(values) and len(shapes) < count:
        n = values[i]
        sizes = values[i + 1 : i + 1 + n]
        if n < 0 or len(sizes) != n or any(v < 0 for v in sizes):
            break
        shapes.append(tuple(sizes))
        i += 1 + n
    if len(shapes) != count or i != len(values):
        shown = values if len(values) <= 16 else [*values[:16], "..."]
        raise ValueError(
            f"{where} must hold the shapes of {count} parameters (each one's number of "
            f"dimensions, then its sizes), got {shown}"
        )
    return shapes
