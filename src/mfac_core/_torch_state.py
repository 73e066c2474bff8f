"""MFAC's checkpoints: the state it saves, and the checks and migration of a state it loads.

Functions of the optimizer (``opt``, an :class:`mfac_core.torch.MFAC`) that
:mod:`mfac_core.torch` calls; each check leaves the optimizer unchanged, so that a
load commits only a state that passed them all. Nothing here is public.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from ._compat import array_namespace
from ._sharding import reduce_checked
from ._torch_checkpoint import packed, packed_shapes, unpacked, unpacked_shapes
from ._torch_layout import check_option, layout, new_window
from ._torch_sparse import MASK_ORDER, check_mask_order, check_saved_mask, masks_list
from ._validation import check_damp

#: The options of a parameter group.
GROUP_KEYS = ("lr", "momentum", "weight_decay")
#: Options of the whole optimizer (one window over all parameters), not per group.
GLOBAL_KEYS = ("num_grads", "damp", "zero_init", "errors", "grad_dtype")
#: The counters and momentum of MFAC's state entry, which also holds "window",
#: "param_shapes" (:func:`param_shapes`) and, with masks, "mask" (every parameter's mask, flat).
ENTRY_KEYS = ("momentum_buffer", "steps", "skipped_steps", "rejected_grads")


def param_shapes(opt: Any) -> torch.Tensor:
    """The shapes of the parameters in order, group by group, as one int64 tensor.

    Global shapes (a DTensor's ``shape``): the same on every rank. A load compares them
    with its own (:func:`check_param_shapes`).
    """
    return packed_shapes(layout_shapes(opt), opt.device)


def layout_shapes(opt: Any) -> list[tuple[int, ...]]:
    """The parameters' shapes when the optimizer laid them out (the window's coordinates).

    Not their shapes now: a ``.data`` of the same size in another shape is refused by the
    step, and saved as it was laid out, so that a load or a copy refuses it as well.
    """
    return [tuple(shape) for layout in opt._slices for *_, shape in layout]


def fresh_entry(grad: torch.Tensor) -> dict[str, Any]:
    """MFAC's state entry before the first step: a zero momentum buffer, zero counters."""
    return {
        "momentum_buffer": torch.zeros_like(grad),
        "steps": 0,
        "skipped_steps": 0,
        "rejected_grads": 0,
    }


def live_entry(opt: Any) -> dict[str, Any]:
    """MFAC's state entry; after ``opt.state`` was cleared, a fresh one over an emptied window.

    ``opt.state.clear()`` (or ``opt.state = defaultdict(dict)``) is how a torch optimizer
    is made to start afresh: Adam or LBFGS rebuild their state at the next step. MFAC's
    window and momentum start afresh the same way, the first time the entry is read
    (a step reads it before the window takes the gradient). Only when no parameter has
    an entry: while ``state_dict()`` holds the saved entry under another parameter, that
    is not a cleared state.
    """
    entry = opt.state.get(opt._first)  # .get: a defaultdict would add an empty entry
    if entry:
        return entry
    if not any(opt.state.values()):
        with outside_inference():
            opt.ihvp.reset()
            opt._reset_state(fresh_entry(opt._grad))
    return opt.state[opt._first]


def without_window(entry: Mapping[str, Any]) -> dict[str, Any]:
    """MFAC's state entry without its ``"window"`` (the live operator, or its saved state)."""
    return {k: v for k, v in entry.items() if k != "window"}


def check_group(group: Mapping[str, Any], where: str, *, ranged: bool = True) -> None:
    """Refuse a group that lacks an option or holds one :func:`check_option` refuses."""
    for key in GROUP_KEYS:
        if key not in group:
            raise ValueError(f"{where} has no {key!r}")
        check_option(group[key], key, f"{key} of {where}", ranged=ranged)


def check_option_devices(group: Mapping[str, Any], where: str) -> None:
    """Refuse a tensor option that a step over the group's parameters could not use.

    A one-element tensor on the CPU goes into any device's arithmetic as a number; one on
    another device than the parameters' (a CUDA ``lr`` over CPU parameters) was accepted
    here and then refused by every step (``_torch_step.check_tensor_option``), so it is
    refused when it is given, as torch's optimizers check their options' devices when built.
    """
    for key in GROUP_KEYS:
        value = group.get(key)
        if not isinstance(value, torch.Tensor) or value.device.type == "cpu":
            continue
        devices = sorted({str(p.device) for p in group["params"] if p.device != value.device})
        if devices:
            raise ValueError(
                f"{key} of {where} is a tensor on {value.device}, but the group's parameters "
                f"are on {', '.join(devices)}: a step could not use it; put it on the "
                "parameters' device or on the CPU"
            )


def check_new_group(opt: Any, param_group: Any) -> bool:
    """Check a group for ``MFAC.add_param_group`` before torch adds it; whether MFAC is built.

    Before the end of ``MFAC.__init__`` (not yet built) torch adds the first groups.
    """
    for key in GLOBAL_KEYS:
        if isinstance(param_group, Mapping) and key in param_group:
            raise ValueError(
                f"{key} is an option of the whole MFAC optimizer (one window "
                "over all parameters), not of a parameter group"
            )
    frozen = getattr(opt, "_frozen", False)
    if frozen and opt._comm is not None:
        raise ValueError(
            "a distributed MFAC optimizer cannot add parameter groups: every rank's "
            "window shard is fixed; build a new optimizer instead"
        )
    return frozen


def saved_entry(opt: Any) -> dict[str, Any]:
    """The state entry as ``MFAC.state_dict`` saves it: copies, the window included."""
    entry = opt._entry
    saved = {
        # Tensors of the shapes they have from construction on (_torch_checkpoint).
        "window": packed(opt.ihvp.state_dict(), opt.ihvp.num_grads),
        "momentum_buffer": entry["momentum_buffer"].clone(),
        **{key: int(entry[key]) for key in ENTRY_KEYS[1:]},
        # The same on every rank: DCP keeps one copy of it.
        "param_shapes": param_shapes(opt),
    }
    if opt._masks:  # sparse mode: which coordinates the window and momentum hold, in order
        saved["mask"] = entry["mask"].clone()
        saved["mask_order"] = MASK_ORDER
    if opt._comm is not None:
        # Under a key naming the rank and the world size: torch.distributed.checkpoint
        # keeps one copy of a key that every rank saves, and these are the rank's own.
        # Under the entry's own keys, which DCP's flattened state is rebuilt from.
        for key in ("window", "momentum_buffer"):
            saved[key] = {opt._shard_key: saved[key]}
    return saved


def with_saved_entry(opt: Any, parent_state_dict: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``torch.optim.Optimizer.state_dict`` with the entry of :func:`saved_entry` in it.

    The entry goes under the first parameter that requires grad now, which may be another
    than when the optimizer was built (a layer frozen or unfrozen since):
    torch.distributed.checkpoint drops the state of frozen parameters. The other
    parameters get empty entries for the call. The copies of the window exist in the
    returned state only: kept in ``opt.state`` they would double the m x d memory.
    """
    live = opt._entry
    params = [p for group in opt.param_groups for p in group["params"]]
    holder = next((p for p in params if p.requires_grad), opt._first)
    saved = saved_entry(opt)
    del opt.state[opt._first]
    opt.state[holder] = saved
    others = [p for p in params if p not in opt.state]
    for p in others:
        opt.state[p] = {}
    try:
        return parent_state_dict()
    finally:
        del opt.state[holder]
        opt.state[opt._first] = live
        for p in others:
            if opt.state.get(p) == {}:  # unless a hook wrote into it
                del opt.state[p]


@contextlib.contextmanager
def outside_inference() -> Iterator[None]:
    """No grad, and outside inference mode even where called in it: where MFAC makes buffers.

    An inference tensor cannot be updated in place by a later step outside inference
    mode, which torch's optimizers never ask of theirs (their state is made by their
    first step, and loads keep tensors). ``inference_mode(False)`` enables grad mode,
    so ``no_grad`` goes inside it.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


def rank_keyed(value: Any) -> bool:
    """Whether ``value`` is a distributed state's dict of ranks (``"rank{r}_of_{p}"`` keys)."""
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and re.fullmatch(r"rank\d+_of_\d+", k) for k in value)
    )


def shards_of(extra: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """A distributed state's windows and momenta by rank, of this format or the earlier one.

    The earlier format held them under ``"shards"`` (``{rank: {"window", "momentum_buffer"}}``)
    beside ``None`` for both; ``None`` for the state of an optimizer without ``comm``.
    """
    if extra.get("shards") is not None:
        shards: Mapping[str, Any] = extra["shards"]
        return shards
    window, momentum = extra.get("window"), extra.get("momentum_buffer")
    if not isinstance(window, Mapping) or not rank_keyed(window):
        return None
    momenta = momentum if isinstance(momentum, Mapping) else {}
    return {k: {"window": v, "momentum_buffer": momenta.get(k)} for k, v in window.items()}


def migrated(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state of the earlier format (the entry under a top-level "mfac") in this one.

    Also mends what :func:`torch.distributed.checkpoint.load` makes of a state_dict
    with integer parameter ids: it fills the tensors of the template in place, under
    ``0``, and puts the other values (counters, slot lists) under ``"0"``.
    """
    state = state_dict.get("state")
    if isinstance(state, Mapping) and any(
        isinstance(k, str) and k.isdigit() and int(k) in state for k in state
    ):
        mended = {k: v for k, v in state.items() if not (isinstance(k, str) and k.isdigit())}
        for k, v in state.items():
            if isinstance(k, str) and k.isdigit():
                mended[int(k)] = merged(state.get(int(k)), v)
        state_dict = {**state_dict, "state": mended}
    if "mfac" not in state_dict:
        return state_dict
    old = {k: v for k, v in state_dict.items() if k != "mfac"}
    groups, state = old.get("param_groups"), old.get("state")
    if state or not isinstance(groups, Sequence) or not groups:
        raise ValueError(
            "not an MFAC state_dict: it has an 'mfac' entry (the earlier format) "
            "but a non-empty 'state' or no 'param_groups'"
        )
    first = groups[0].get("params") if isinstance(groups[0], Mapping) else None
    if not isinstance(first, Sequence) or not first:
        raise ValueError("state_dict['param_groups'][0] must be a dict with a list 'params'")
    return {**old, "state": {first[0]: state_dict["mfac"]}}


def merged(a: Any, b: Any) -> Any:
    """``b`` over ``a``, merging dicts key by key (nothing is modified)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = dict(a)
        for k, v in b.items():
            out[k] = merged(a.get(k), v)
        return out
    return b


def check_state(
    opt: Any, state_dict: Any, damp: float | None, *, window: bool = True
) -> SimpleNamespace:
    """Check a state for ``MFAC.load_state_dict``: what to commit; nothing changes here.

    Without ``window`` the window's state is not checked (the caller does).
    """
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        raise ValueError(f"not an MFAC state_dict: it has no {missing}")
    with foreign_noted(state_dict):
        groups = check_groups(opt, state_dict)
        extra = saved_state(state_dict)
    shards = shards_of(extra) if window else None
    if shards is not None:
        raise ValueError(
            f"the MFAC state holds the shards {sorted(shards)} of a distributed "
            "MFAC optimizer; this one was built without comm (and its parameters are not "
            "DTensors): load it into an optimizer of the same world size"
        )
    missing = [k for k in ("window", "momentum_buffer", "steps") if k not in extra]
    if missing:
        raise ValueError(f"the MFAC state has no {missing}")
    unknown = sorted(
        set(extra) - {*ENTRY_KEYS, "window", "shards", "mask", "mask_order", "param_shapes"},
        key=str,
    )
    if unknown:
        raise ValueError(f"the MFAC state has unknown keys {unknown}")
    # Before the mask: a permuted order of parameters explains a mask that differs.
    check_param_shapes(opt, extra.get("param_shapes"))
    check_saved_mask(opt, extra.get("mask"))
    check_mask_order(opt, extra.get("mask") is not None, extra.get("mask_order"))
    counts = {}
    for key in ENTRY_KEYS[1:]:
        value = extra.get(key, 0)  # the counters are absent from older checkpoints
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the MFAC state's {key!r} must be an int >= 0, got {value!r}")
        counts[key] = int(value)
    if not window:
        momentum = check_momentum(opt, extra["momentum_buffer"])
        return SimpleNamespace(groups=groups, window=None, damp=None, momentum=momentum, **counts)
    # The window first: its sizes explain a mismatch better than the momentum's length.
    state, target = check_window(opt, extra["window"], damp)
    momentum = check_momentum(opt, extra["momentum_buffer"])
    return SimpleNamespace(groups=groups, window=state, damp=target, momentum=momentum, **counts)


@contextlib.contextmanager
def foreign_noted(state_dict: Mapping[str, Any]) -> Iterator[None]:
    """Add to a refusal of the groups or the entries what shows another optimizer's state.

    The state_dict of torch.optim.Adam was refused with "state_dict['param_groups'][0] has
    no 'momentum'", that of SGD with momentum for holding entries under several
    parameters: true, but neither said that it is not an MFAC state at all. Only when no
    entry holds MFAC's window (which every MFAC state has, from construction on).
    """
    try:
        yield
    except ValueError as exc:
        note = foreign_note(state_dict)
        if not note:
            raise
        raise ValueError(f"{note} ({exc})") from None


def foreign_note(state_dict: Mapping[str, Any]) -> str:
    """What a state_dict without MFAC's window holds instead, or ``""`` if one holds it."""
    state, groups = state_dict.get("state"), state_dict.get("param_groups")
    entries = (
        [v for v in state.values() if isinstance(v, Mapping) and v]
        if isinstance(state, Mapping)
        else []
    )
    if any("window" in e or "shards" in e for e in entries):
        return ""
    held = sorted({str(k) for e in entries for k in e})
    options = sorted(
        {str(k) for g in groups if isinstance(g, Mapping) for k in g} - {"params", "param_names"}
        if isinstance(groups, Sequence) and not isinstance(groups, str)
        else set()
    )
    what = f"entries of {len(entries)} parameter(s) with the keys {held}" if held else "no entry"
    return (
        "not an MFAC state_dict (the state of another optimizer class?): no entry holds "
        f"MFAC's 'window'; its state has {what}, its groups the options {options}"
    )


def saved_state(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """MFAC's entry of a state_dict's "state"."""
    key = holder(state_dict)
    extra = state_dict["state"][key]
    if not isinstance(extra, Mapping):
        raise ValueError(f"state_dict['state'][{key!r}] must be a dict")
    return extra


def holder(state_dict: Mapping[str, Any]) -> Any:
    """The id of the one parameter whose entry of a state_dict's "state" is MFAC's.

    MFAC saves its entry under the first parameter that requires grad (which a
    checkpoint does not record), so any one parameter's entry is taken.
    """
    state = state_dict["state"]
    if not isinstance(state, Mapping):
        raise ValueError("state_dict['state'] must be a dict")
    ids = {i for group in state_dict["param_groups"] for i in group["params"]}
    held = [k for k, v in state.items() if k not in ids or not isinstance(v, Mapping) or v]
    if len(held) != 1 or held[0] not in ids:
        raise ValueError(
            "state_dict['state'] must hold MFAC's state under the id of one parameter "
            "(the first that requires grad) and nothing (or empty entries) for the "
            f"others, got non-empty entries for {sorted(held, key=str)} of "
            f"{sorted(state, key=str)}"
        )
    return held[0]


def check_distributed_state(opt: Any, state_dict: Any, damp: float | None) -> SimpleNamespace:
    """:func:`check_state` for a distributed optimizer, with collective errors.

    This rank's entries (:func:`shards_of`) are taken as the window and momentum; the
    checks of this rank's part run inside one reduction of a status word, so
    that every rank raises if one rank's state is bad, before the window's own
    (collective) checks run.
    """
    comm = opt._comm
    assert comm is not None
    flat: list[Any] = []

    def local() -> torch.Tensor:
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        if missing:
            raise ValueError(f"not an MFAC state_dict: it has no {missing}")
        with foreign_noted(state_dict):
            check_groups(opt, state_dict)
            extra = saved_state(state_dict)
        shards = shards_of(extra)
        if not isinstance(shards, Mapping):
            raise ValueError(
                "the MFAC state has no windows by rank: it is the state of an MFAC "
                "optimizer without comm; this one is distributed"
            )
        if opt._shard_key not in shards:
            raise ValueError(
                f"the MFAC state holds the windows of {sorted(shards)}, not "
                f"{opt._shard_key!r}: a distributed MFAC state loads only at the world "
                "size that saved it, each rank its own shard"
            )
        shard = shards[opt._shard_key]
        if not isinstance(shard, Mapping):
            raise ValueError(f"the MFAC state's shard {opt._shard_key!r} must be a dict")
        mine = {k: v for k, v in extra.items() if k != "shards"}
        mine.update(shard)
        flat.append({**state_dict, "state": {holder(state_dict): mine}})
        flat.append(check_state(opt, flat[0], damp, window=False))
        # The window's own checks of this rank's part, here: raised after the reduction,
        # they left the other ranks waiting in the window's collective checks (a hang).
        window_unpacked(opt, mine.get("window"))
        return torch.zeros(0, dtype=torch.float64, device=opt.device)

    reduce_checked(
        comm,
        array_namespace(opt._grad),
        local,
        length=0,
        dtype=torch.float64,
        device=opt.device,
        what="MFAC.load_state_dict",
        tag=1,
    )
    plan = flat[1]
    # The window's checks are collective themselves.
    plan.window, plan.damp = check_window(opt, saved_state(flat[0])["window"], damp)
    return plan


def check_groups(opt: Any, base: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The parameter groups to commit: the saved ones, with this optimizer's params."""
    groups = base["param_groups"]
    if (
        not isinstance(groups, Sequence)
        or isinstance(groups, str)
        or len(groups) != len(opt.param_groups)
    ):
        have = len(groups) if isinstance(groups, Sequence) else groups
        raise ValueError(
            f"state_dict['param_groups'] must list {len(opt.param_groups)} "
            f"parameter groups, got {have!r}"
        )
    ids = []
    for j, (saved, group) in enumerate(zip(groups, opt.param_groups, strict=True)):
        where = f"state_dict['param_groups'][{j}]"
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), Sequence):
            raise ValueError(f"{where} must be a dict with a list 'params'")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{where} has {len(saved['params'])} parameters, this "
                f"optimizer's group {len(group['params'])}"
            )
        try:
            check_group(saved, where, ranged=False)  # what a step takes: finite
        except TypeError as exc:  # one kind of error for every malformed state
            raise ValueError(str(exc)) from None
        ids.extend(saved["params"])
    if len(set(ids)) != len(ids):
        raise ValueError("state_dict['param_groups'] lists a parameter twice")
    check_param_names(opt, groups)
    try:  # as torch's load_state_dict, which writes into a copy of the groups
        copies = copy.deepcopy(list(groups))
    except Exception as exc:
        raise ValueError(f"state_dict['param_groups'] cannot be copied: {exc!r}") from None
    new = []
    for saved, group in zip(copies, opt.param_groups, strict=True):
        saved = dict(saved)
        for key in GLOBAL_KEYS:
            if key in saved:
                raise ValueError(
                    f"state_dict['param_groups'] has {key!r} in a group: it is an option "
                    "of the whole MFAC optimizer"
                )
        for key in GROUP_KEYS:
            value = saved[key]
            if (
                isinstance(value, torch.Tensor)
                and value.device.type != "cpu"
                and value.device != opt.device
            ):
                # A tensor lr saved on another device (a CUDA checkpoint loaded for CPU
                # parameters), which no step could use: moved, as the state's tensors are.
                saved[key] = value.to(device=opt.device)
        saved["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            saved["param_names"] = group["param_names"]
        new.append(saved)
    return new


def check_param_shapes(opt: Any, saved: Any) -> None:
    """Refuse a state saved for parameters of other shapes, or in another order.

    The window and the momentum hold every parameter's coordinates in one vector, in
    parameter order: the state of ``MFAC([a, b])`` loaded into ``MFAC([b, a])`` would
    permute them, unnoticed where the total size is the same (torch's optimizers keep a
    state per parameter, whose shape a step checks). States saved before MFAC recorded
    the shapes (``None``) load unchecked.
    """
    if saved is None:
        return
    groups = opt.param_groups
    count = sum(len(group["params"]) for group in groups)
    shapes = iter(unpacked_shapes(saved, count, "the MFAC state's 'param_shapes'"))
    for j, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            shape = next(shapes)
            if shape != tuple(p.shape):
                raise ValueError(
                    f"the MFAC state is of other parameters: parameter {i} of group {j} "
                    f"has shape {shape} in the state, {tuple(p.shape)} in this optimizer "
                    "(its window and momentum hold all parameters' coordinates in one "
                    "vector, which would be read in other coordinates); load it into an "
                    "optimizer over parameters of the same shapes in the same order"
                )


def check_param_names(opt: Any, saved_groups: Sequence[Any]) -> None:
    """Refuse a state whose parameters are this optimizer's names in another order.

    Parameters of one shape in another order are told apart by their names only. Other
    names (of a model wrapped since, with a prefix) load by position, as in
    :meth:`torch.optim.Optimizer.load_state_dict`, which compares no names; so do
    groups without names.
    """
    saved = [g.get("param_names") for g in saved_groups]
    mine = [g.get("param_names") for g in opt.param_groups]
    groups = (*opt.param_groups, *opt.param_groups)
    for names, group in zip((*saved, *mine), groups, strict=True):
        if (
            not isinstance(names, Sequence)
            or isinstance(names, str)
            or len(names) != len(group["params"])
        ):
            return
    flat_saved = [n for names in saved for n in names]
    flat_mine = [n for names in mine for n in names]
    if not all(isinstance(n, str) for n in (*flat_saved, *flat_mine)):
        return
    if flat_saved == flat_mine or Counter(flat_saved) != Counter(flat_mine):
        return
    for j, (a, b) in enumerate(zip(saved, mine, strict=True)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                raise ValueError(
                    f"the MFAC state names this optimizer's parameters in another order: "
                    f"parameter {i} of group {j} is named {x!r} in the state, {y!r} in this "
                    "optimizer (its window and momentum hold all parameters' coordinates "
                    "in one vector, in parameter order); load it into an optimizer over the "
                    "parameters in the order they were saved in"
                )


def check_momentum(opt: Any, buf: Any) -> torch.Tensor:
    if buf is None:  # saved before the first momentum step: a zero buffer steps alike
        return torch.zeros_like(opt._grad)
    # Sharded parameters keep the momentum of their local shards only.
    n = opt._grad.shape[0]
    if not isinstance(buf, torch.Tensor) or not buf.is_floating_point() or tuple(buf.shape) != (n,):
        shape = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
        raise ValueError(
            f"the momentum buffer must be a floating tensor of shape ({n},), got {shape}"
        )
    # A copy, detached: the buffer is updated in place and must not join a graph.
    buf = buf.detach().to(device=opt.device, dtype=opt.dtype, copy=True)
    if not bool(torch.isfinite(buf).all()):
        raise ValueError("the momentum buffer holds NaN or infinity")
    return buf


def check_window(opt: Any, window: Any, damp: float | None) -> tuple[dict[str, Any], float | None]:
    """The window's state on this device, checked by the core (nothing changes here).

    Returns the state and the damping to load it with (``None``: its own).
    """
    out = window_unpacked(opt, window)
    target = None if damp is None else check_damp(damp)
    try:
        opt.ihvp.check_state_dict(out, damp=target)
    except (TypeError, ValueError) as exc:  # one kind of error for every malformed state
        raise ValueError(f"the MFAC state's 'window': {exc}") from None
    return out, target


def window_unpacked(opt: Any, window: Any) -> dict[str, Any]:
    """The window's state on this device, its sizes and dtype checked (this rank's part)."""
    where = "the MFAC state's 'window'"  # the entry sits on the first parameter that trains
    if not isinstance(window, Mapping):
        raise ValueError(f"{where} must be a dict")
    check_window_sizes(opt, window, where)
    check_window_dtype(opt, window, where)
    # Tensors to this device; the core detaches them, and checks everything else.
    return {
        k: v.to(device=opt.device) if isinstance(v, torch.Tensor) else v
        for k, v in unpacked(window, opt.ihvp.num_grads, where).items()
    }


def check_window_dtype(opt: Any, window: Mapping[str, Any], where: str) -> None:
    """Refuse a window stored in another dtype with the option that sets it named.

    The core's message ("state['grads'] has dtype torch.float32, expected
    torch.float64") does not say that the optimizer's ``grad_dtype`` (or its parameters'
    dtype) differs. A ``grads`` that is not a tensor is left to the core's checks.
    """
    grads = window.get("grads")
    if isinstance(grads, torch.Tensor) and grads.dtype != opt.grad_dtype:
        raise ValueError(
            f"{where} holds gradients ('grads') stored in {grads.dtype}, this optimizer's "
            f"window in {opt.grad_dtype}: load it into an optimizer of the same grad_dtype "
            "(by default its parameters' dtype)"
        )


def check_window_sizes(opt: Any, window: Mapping[str, Any], where: str) -> None:
    """Refuse a window of another ``num_grads`` or ``dim`` with both sizes named.

    Checked before the padded slot lists (whose length is ``num_grads``) and the momentum
    (of length ``dim``), whose own messages would not say which option differs. Values
    that are not ints are left to the core's checks.
    """
    sizes = (window.get("num_grads"), window.get("dim"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
        return
    mine = (opt.ihvp.num_grads, opt.ihvp.dim)
    if sizes != mine:
        raise ValueError(
            f"{where} is a window of num_grads={sizes[0]} gradients of dim={sizes[1]} "
            f"coordinates, this optimizer's of num_grads={mine[0]} and dim={mine[1]}: "
            "load it into an optimizer built with the same num_grads over parameters of "
            "the same sizes (and masks)"
        )


def load_state(opt: Any, state_dict: Any, damp: float | None) -> None:
    """``MFAC.load_state_dict``: the hooks, the checks, then the commit."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"not an MFAC state_dict: expected a dict, got {type(state_dict).__name__}"
        )
    state_dict = dict(state_dict)  # shallow copy, as torch's load_state_dict
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    state_dict = migrated(state_dict)
    if opt._comm is None:
        plan = check_state(opt, state_dict, damp)
    else:
        plan = check_distributed_state(opt, state_dict, damp)
    # Commit. The core's loader checks its state before it changes anything, and
    # a new damping's refactorisation is its one step that may still raise: first.
    opt.ihvp.load_state_dict(plan.window, damp=plan.damp)
    opt.defaults["damp"] = opt.ihvp.damp
    opt.param_groups = plan.groups
    opt._reset_state(
        {
            "momentum_buffer": plan.momentum,
            "steps": plan.steps,
            "skipped_steps": plan.skipped_steps,
            "rejected_grads": plan.rejected_grads,
        }
    )
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def pickled(opt: Any, parent_getstate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``MFAC.__getstate__``: torch's pickled state, the window beside it as its state_dict.

    torch.optim.Optimizer pickles only defaults, state and param_groups; the window goes
    as its state_dict (plain tensors), because DynamicIHVP holds its array namespace, a
    module, which neither pickle nor deepcopy can copy. A distributed ``MFAC`` is refused.
    """
    if getattr(opt, "_comm", None) is not None:
        raise TypeError(
            "a distributed MFAC optimizer (comm=, or DTensor parameters) cannot be "
            "pickled or copied: it belongs to a process group; save state_dict() "
            "(e.g. with torch.distributed.checkpoint) instead"
        )
    state = parent_getstate()
    # As the other entries: without the operator, whose state goes separately.
    state["state"] = defaultdict(
        dict, {p: without_window(e) if p is opt._first else e for p, e in opt.state.items()}
    )
    state["_mfac"] = {"window": opt.ihvp.state_dict(), "shapes": layout_shapes(opt)}
    if opt._masks:
        state["_mfac"]["masks"] = masks_list(opt)
        state["_mfac"]["mask_order"] = MASK_ORDER
    return state


def restore(opt: Any, extra: Mapping[str, Any]) -> None:
    """The window (and, from the earlier format, the entry) of an unpickled ``MFAC``."""
    opt._frozen = True
    opt._comm = None
    layout(opt)
    shapes = extra.get("shapes")  # as laid out (pickles of earlier versions: as now)
    if shapes is not None and len(shapes) == sum(len(layout) for layout in opt._slices):
        # The copy steps as the original would: a parameter reshaped since is refused.
        laid = iter(torch.Size(shape) for shape in shapes)
        opt._slices = [[(*entry[:3], next(laid)) for entry in group] for group in opt._slices]
    check_mask_order(opt, extra.get("masks") is not None, extra.get("mask_order"))
    opt.ihvp = new_window(opt, extra["window"]["damp"])
    window, _ = check_window(opt, extra["window"], None)
    opt.ihvp.load_state_dict(window)
    if "steps" in extra:  # a pickle of the earlier format: the entry was here
        entry = {key: extra.get(key, 0) for key in ENTRY_KEYS[1:]}
        entry["momentum_buffer"] = check_momentum(opt, extra["momentum_buffer"])
    else:  # the one entry (held by the first parameter that required grad when pickled)
        # Listed before opt._entry is read: when requires_grad changed since the optimizer
        # was built, layout() picked another holder, and reading its (default) entry adds
        # it to the state.
        held = [e for e in opt.state.values() if e]
        entry = held[0] if held else opt._entry
    opt._reset_state(entry)  # the entry of the live window
