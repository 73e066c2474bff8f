"""MFAC's sparse mode: parameters' masks, and the kept coordinates the window holds.

With ``MFAC(..., masks={param: mask})`` a masked parameter contributes only its kept
coordinates to the flat vector: its gradient entries are gathered into the compact
flat gradient, and the step is scattered back to them, so the window, the momentum
and every per-step pass scale with the number of kept coordinates. Functions of the
optimizer (``opt``, an :class:`mfac_core.torch.MFAC`); nothing here is public.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class Kept:
    """Where a masked parameter's kept coordinates are.

    ``positions`` holds their places in the parameter's row-major (logical) order, sorted
    (int64, on the parameter's device): the order of the window's columns and of the
    momentum, whatever the parameter's memory layout, so that a layout changed after
    construction (``module.to(memory_format=torch.channels_last)``), a load into an
    optimizer built under another layout, a copy and ``add_param_group`` all read the
    same coordinates. The step reads and writes a dense tensor through its memory (a
    flat view, no copy): :meth:`places` gives the kept coordinates' places there for
    the tensor's strides: the positions themselves for a row-major tensor, else computed
    once for the parameter's layout and kept (one index of the kept coordinates' size;
    a gradient in yet another layout is read through a copy, not given one of its own).
    """

    def __init__(self, shape: tuple[int, ...], positions: torch.Tensor) -> None:
        self.shape = shape
        self.positions = positions
        self._layout: tuple[tuple[int, ...], tuple[int, ...], torch.Tensor] | None = None

    def places(
        self, t: torch.Tensor, *, keep: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``t`` flat in its memory order (a view) and the kept places there; None if
        ``t`` is not dense (no flat view of its memory exists), or, without ``keep``, if
        its layout is neither row-major nor the one kept."""
        if t.is_contiguous():  # row-major: the places are the positions
            return t.view(-1), self.positions
        strides = t.stride()
        if self._layout is None or self._layout[0] != strides:
            order = memory_order(t)
            if not keep or not t.permute(order).is_contiguous():
                return None
            # A row-major place, split into its coordinates, times t's strides.
            place = torch.zeros_like(self.positions)
            rest = self.positions
            for size, stride in zip(reversed(self.shape), reversed(strides), strict=True):
                place += (rest % size) * stride
                rest = rest // size
            self._layout = (strides, order, place)
        _, order, place = self._layout
        return t.permute(order).view(-1), place

    def read(self, t: torch.Tensor, out: torch.Tensor) -> None:
        """Write the kept entries of ``t`` (a gradient or the parameter) into ``out``."""
        found = self.places(t, keep=False)
        flat, place = found if found is not None else (t.reshape(-1), self.positions)
        if flat.dtype == out.dtype:
            torch.index_select(flat, 0, place, out=out)
        else:
            out.copy_(flat.index_select(0, place))


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    strides = t.stride()
    return tuple(sorted(range(t.dim()), key=lambda i: -strides[i]))


def kept_index(p: torch.Tensor, mask: torch.Tensor) -> Kept:
    """The :class:`Kept` of a parameter and its (checked) mask."""
    return Kept(tuple(p.shape), mask.reshape(-1).nonzero().reshape(-1))


def check_layouts(opt: Any) -> None:
    """Refuse a step if a masked parameter is no longer dense in memory.

    The step writes a masked parameter's kept entries in place through a flat view of its
    memory, which a dense tensor (any order of its dimensions, channels-last included) has
    and a strided slice (``p.data = big[:, ::2]``) has not. Nothing has changed when this
    raises.
    """
    for p, kept in opt._kept.items():
        if kept.places(p) is not None:
            continue
        where = next(
            f"parameter {i} of group {j} (shape {tuple(p.shape)})"
            for j, group in enumerate(opt.param_groups)
            for i, q in enumerate(group["params"])
            if q is p
        )
        raise RuntimeError(
            f"MFAC: the masked {where} is not dense in memory (strides {p.stride()}): a "
            "step writes its kept entries in place through a flat view of its memory; "
            "make its data contiguous (the step was not taken, nothing changed)"
        )


#: ``"mask_order"`` of a state with masks: the kept entries' order in the window and the
#: momentum, 1 for row-major (an int: DCP's flattened states take no strings). States
#: saved before it existed hold them in the parameters' memory order.
MASK_ORDER = 1


def check_mask_order(opt: Any, masked: bool, order: Any) -> None:
    """Refuse a state with masks whose columns this optimizer would read in another order.

    ``masked``: whether the state was saved with masks (``"mask"``, or a pickle's
    ``"masks"``); ``order`` its ``"mask_order"``, :data:`MASK_ORDER` in this version's.
    Without one (saved by an earlier development version) the window held each masked
    parameter's kept entries in its memory order then, which is read as row-major where
    the parameter is row-major now (right if it was so when saved, which the state does
    not say); one laid out otherwise now is refused. A state saved without masks holds
    every parameter in row-major order.
    """
    if not (opt._masks and masked) or (type(order) is int and order == MASK_ORDER):
        return
    if order is not None:
        raise ValueError(
            f"the MFAC state's 'mask_order' must be {MASK_ORDER} (row-major), got {order!r}"
        )
    for j, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            kept = opt._kept.get(p)
            found = None if kept is None else kept.places(p)
            if kept is None or (found is not None and torch.equal(found[1], kept.positions)):
                continue
            raise ValueError(
                f"the MFAC state has no 'mask_order': it was saved by an earlier version, "
                "whose window held a masked parameter's kept entries in the parameter's "
                f"memory order; the masked parameter {i} of group {j} (shape "
                f"{tuple(p.shape)}) is not laid out row-major now (strides {p.stride()}), "
                "and the order it had when saved is unknown: load the state into an "
                "optimizer built with that parameter contiguous if it was so when saved"
            )


def check_masks(masks: Any, groups: list[dict[str, Any]]) -> dict[torch.Tensor, torch.Tensor]:
    """``MFAC(masks=...)``: checked copies of the masks, by parameter (empty for none)."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(
            "masks must be a dict mapping parameters to bool tensors of their shapes "
            f"(True = kept), got {type(masks).__name__}"
        )
    where = {id(p): (j, i) for j, g in enumerate(groups) for i, p in enumerate(g["params"])}
    out: dict[torch.Tensor, torch.Tensor] = {}
    for p, mask in masks.items():
        if isinstance(p, str):
            raise TypeError(
                f"masks must be keyed by the parameter tensors, got the name {p!r}; "
                "MFACPruner.masks is keyed by module name: pass pruner.param_masks()"
            )
        if not isinstance(p, torch.Tensor) or id(p) not in where:
            what = f"shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"masks has a key that is not a parameter of this optimizer ({what})")
        j, i = where[id(p)]
        name = f"the mask of parameter {i} of group {j} (shape {tuple(p.shape)})"
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"{name} must be a bool tensor (True = kept), got {got}")
        if mask.shape != p.shape:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; it must be the parameter's")
        if mask.device != p.device:
            raise ValueError(
                f"{name} is on {mask.device}; it must be on the parameter's {p.device}"
            )
        if not p.permute(memory_order(p)).is_contiguous():
            raise ValueError(
                f"parameter {i} of group {j} is not dense in memory (strides "
                f"{p.stride()}): a masked parameter's kept entries are written in place "
                "through a flat view; make it contiguous"
            )
        out[p] = mask.detach().clone()
    dense = sum(p.numel() for g in groups for p in g["params"] if p not in out)
    if out and dense + sum(int(mask.sum()) for mask in out.values()) == 0:
        raise ValueError("masks keep no coordinate of any parameter: nothing to optimise")
    return out


def flat_mask(opt: Any) -> torch.Tensor:
    """Every parameter's mask (all ``True`` for an unmasked one), flat, in parameter order."""
    parts = []
    for group in opt.param_groups:
        for p in group["params"]:
            mask = opt._masks.get(p)
            parts.append(
                torch.ones(p.numel(), dtype=torch.bool, device=p.device)
                if mask is None
                else mask.reshape(-1)
            )
    return torch.cat(parts)


def check_saved_mask(opt: Any, saved: Any) -> None:
    """Refuse a state whose ``"mask"`` (absent: all kept) is not this optimizer's masks."""
    n = sum(p.numel() for group in opt.param_groups for p in group["params"])
    if saved is not None and (
        not isinstance(saved, torch.Tensor) or saved.dtype != torch.bool or saved.shape != (n,)
    ):
        got = (
            f"{saved.dtype} of shape {tuple(saved.shape)}"
            if isinstance(saved, torch.Tensor)
            else type(saved).__name__
        )
        raise ValueError(
            f"the MFAC state's 'mask' must be a bool tensor of shape ({n},), got {got}"
        )
    if saved is None and not opt._masks:
        return
    mine = flat_mask(opt)
    theirs = torch.ones_like(mine) if saved is None else saved.to(mine.device)
    if torch.equal(theirs, mine):
        return
    differ = int((theirs != mine).sum())
    raise ValueError(
        f"the MFAC state was saved with {described(saved is not None, theirs)}, this "
        f"optimizer has {described(bool(opt._masks), mine)}; they differ at {differ} "
        "coordinates: load it into an optimizer built with the same masks"
    )


def described(masked: bool, mask: torch.Tensor) -> str:
    kept = f"{int(mask.sum())} of {mask.numel()} coordinates"
    return f"masks keeping {kept}" if masked else f"no masks (all {mask.numel()} kept)"


def masks_list(opt: Any) -> list[torch.Tensor | None]:
    """The masks in parameter order (``None``: unmasked), for pickling."""
    return [opt._masks.get(p) for group in opt.param_groups for p in group["params"]]


def masks_from_list(opt: Any, masks: list[torch.Tensor | None] | None) -> None:
    """Set ``opt._masks`` from :func:`masks_list` (of a pickle) before the layout."""
    flat = [p for group in opt.param_groups for p in group["params"]]
    opt._masks = {
        p: m for p, m in zip(flat, masks or [None] * len(flat), strict=True) if m is not None
    }


def check_not_sharded(opt: Any) -> None:
    if opt._masks and opt._sharded:
        raise ValueError(
            "masks= is not available for DTensor (FSDP) parameters: each rank would need "
            "the masks of its shards; use replicated parameters with comm= (DDP)"
        )
