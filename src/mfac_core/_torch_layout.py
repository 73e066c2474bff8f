"""MFAC's layout: its construction's checks, the parameters' slices of the flat vector,
the window, its memory.

Functions of the optimizer (``opt``, an :class:`mfac_core.torch.MFAC`) that
:mod:`mfac_core.torch` calls, and the memory report that :class:`MFACPruner` shares;
nothing here is public.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch

from . import _torch_distributed
from ._compat import array_namespace
from ._dynamic import DynamicIHVP
from ._dynamic_setup import WindowOptions
from ._torch_distributed import (
    agreed_construction,
    check_dtensors,
    first_tensor,
    local,
    mesh_comm,
    window_columns,
)
from ._torch_sparse import check_masks, check_not_sharded, kept_index
from ._validation import check_choice, check_count, check_damp, check_flag, check_number

logger = logging.getLogger("mfac_core.torch")

#: Window storage dtypes of MFAC's ``grad_dtype`` besides the parameters' own.
HALF_GRAD_DTYPES = (torch.float16, torch.bfloat16)
#: Parameter dtypes MFAC steps (2-byte ones in float32).
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: What layout() sets (restored when adding a parameter group fails).
LAYOUT_ATTRS = (
    *("_first", "dtype", "device", "_sharded", "_slices"),
    *("dim", "_grad", "_columns", "grad_dtype", "_kept"),
)


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{value:.1f} TiB"


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


#: The range of each group option, as :func:`check_option` checks it.
GROUP_BOUNDS: dict[str, dict[str, Any]] = {
    "lr": {"low": 0.0},
    "momentum": {"low": 0.0, "high": 1.0, "high_open": True},
    "weight_decay": {"low": 0.0},
}


def check_option(value: Any, key: str, where: str, *, ranged: bool = True) -> Any:
    """A group option: a finite real number (as a float), or a one-element float tensor.

    With ``ranged`` (the constructor's and ``add_param_group``'s check) the value must lie
    in its range (:data:`GROUP_BOUNDS`); without it (a load's), finite is enough, as for a
    step, so that every state the optimizer saved loads again (a ``LinearLR`` schedule
    down to zero ends at -3e-19).

    A tensor is kept (as torch's optimizers keep a tensor ``lr``), so that a scheduler or
    the user can change it in place; its value is read here once, to check it. The step
    takes one-element tensors for every option, so a load and ``add_param_group`` take
    them too: a group whose ``momentum`` was made a tensor saved a state that no load took.
    """
    bounds = GROUP_BOUNDS[key] if ranged else {}
    if isinstance(value, torch.Tensor):
        if value.is_nested or value.layout != torch.strided:
            # Every step refuses it (_torch_step.check_tensor_option): refused when given.
            kind = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
            raise ValueError(f"{where} is a {kind} tensor: a step needs a dense one")
        if value.numel() != 1 or not value.is_floating_point() or value.requires_grad:
            # torch's own words first (its optimizer harness matches them for lr);
            # requires_grad is named, or the message would show a valid shape and dtype.
            raise ValueError(
                (f"Tensor {key} must be 1-element: " if value.numel() != 1 else "")
                + f"{where} as a tensor must be a one-element floating tensor without grad, "
                f"got shape {tuple(value.shape)}, dtype {value.dtype}"
                + (f", requires_grad=True (pass {key}.detach())" if value.requires_grad else "")
            )
        if value.is_meta:  # float() below would fail with "item() cannot be called on meta"
            raise ValueError(f"{where} is a tensor on the meta device, which holds no value")
        check_number(float(value), where, **bounds)
        return value
    return check_number(value, where, **bounds)


def build(opt: Any, params: Any, options: Mapping[str, Any]) -> None:
    """``MFAC.__init__`` up to its window: every check, the groups, the masks, the layout.

    ``options``: the constructor's keywords but ``comm`` (``opt._comm``, or None, set
    and checked by the caller: a bad communicator cannot join a reduction).
    Distributed, the checks are collective and the ranks' layouts compared
    (:func:`_torch_distributed.agreed_construction`): every rank raises alike if one
    rank's checks fail or the layouts differ.
    """
    given: list[Any] = []
    error: Exception | None = None
    try:
        if not isinstance(params, torch.Tensor):  # which torch refuses, with its own words
            with contextlib.suppress(TypeError):  # not iterable: torch refuses it, later
                # As torch lists them; listed here to find their device and mesh.
                params = given = list(params)
        if opt._comm is None:
            # DTensor parameters: their device mesh's group, found before any check.
            opt._comm = mesh_comm(first_tensor(given))
        checked(opt, params, options)
    except Exception as exc:  # every failure must reach the other ranks
        if opt.__dict__.get("_comm") is None:  # one process
            raise
        error = exc
    if opt._comm is not None:
        agreed_construction(opt, error, given)


def checked(opt: Any, params: Any, options: Mapping[str, Any]) -> None:
    """This rank's part of :func:`build`: its arguments checked, its groups and layout."""
    # Imported here: _torch_state imports this module (layout, new_window).
    lr = check_option(options["lr"], "lr", "lr")
    momentum = check_option(options["momentum"], "momentum", "momentum")
    weight_decay = check_option(options["weight_decay"], "weight_decay", "weight_decay")
    num_grads = check_count(options["num_grads"], "num_grads")
    damp = check_damp(options["damp"])
    errors = check_choice(options["errors"], "errors", ("skip", "raise"))
    defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    torch.optim.Optimizer.__init__(opt, params, defaults)
    opt._frozen = True
    # Added after the groups exist, so that add_param_group does not copy these
    # window-wide options into every group (where changing them would do nothing).
    opt.defaults.update(
        num_grads=int(num_grads),
        damp=damp,
        zero_init=check_flag(options["zero_init"], "zero_init"),
        errors=errors,
        grad_dtype=options["grad_dtype"],
    )
    check_param_tensors(opt.param_groups)  # before check_masks reads their shapes
    opt._masks = check_masks(options["masks"], opt.param_groups)
    layout(opt)


def self_overlapping(t: torch.Tensor) -> bool:
    """Whether ``t`` has a dimension of size > 1 and stride 0, as ``expand()`` makes.

    Such a tensor's entries share memory, and torch refuses to write one in place
    ("more than one element of the written-to tensor refers to a single memory
    location"). Other overlaps torch finds "too hard" to tell and lets be: so does this.
    """
    strides = t.stride()
    return (
        0 in strides
        and t.numel() > 0  # no entries: nothing shared (torch writes such a tensor)
        and any(n > 1 and s == 0 for n, s in zip(t.shape, strides, strict=True))
    )


def check_groups_laid_out(opt: Any, groups: list[dict[str, Any]], outcome: str) -> None:
    """Refuse ``groups`` that no longer list the parameters the window is laid out over.

    The flat vector and the window are laid out over the parameters as built (and as
    added by ``add_param_group``); ``outcome`` says what the refusal left unchanged.
    """
    edited = len(groups) != len(opt._slices) or any(
        len(group["params"]) != len(layout)
        or any(p is not q for p, (q, *_) in zip(group["params"], layout, strict=False))
        for group, layout in zip(groups, opt._slices, strict=False)
    )
    if edited:
        raise RuntimeError(
            "MFAC: opt.param_groups no longer lists the parameters the optimizer was built "
            f"with ({[len(layout) for layout in opt._slices]} per group, now "
            f"{[len(group['params']) for group in groups]}, or others): a parameter added "
            "to or removed from a group, or a group appended, would be left out of (or "
            "kept in) the window; use add_param_group(), or build a new optimizer "
            f"({outcome})"
        )


def check_param_tensors(groups: list[dict[str, Any]]) -> None:
    """Refuse parameters that no step can write: not dense, or whose entries share memory.

    A lazy module's parameter has no size yet; a nested tensor failed deep inside the
    construction (its shape cannot be read); a
    sparse one was taken, and then no step could use it (its gradient is sparse too); an
    expanded one (stride 0) that requires grad failed in the middle of the step, after
    the window had taken the gradient and earlier parameters had moved (a step writes a
    parameter with a gradient only: the step checks those again). Checked first, before
    anything reads a parameter's shape.
    """
    for j, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            if isinstance(p, torch.nn.parameter.UninitializedParameter):
                # A lazy module's (nn.LazyLinear): torch's own error came from numel().
                raise ValueError(
                    f"MFAC: parameter {i} of group {j} is not initialised yet (a lazy "
                    "module's): the window is allocated when the optimizer is built, for "
                    "the parameters' sizes; run one forward pass first"
                )
            if p.is_nested or p.layout != torch.strided:
                kind = "nested" if p.is_nested else str(p.layout).removeprefix("torch.")
                raise TypeError(
                    f"MFAC needs dense (torch.strided) parameters, got a {kind} tensor "
                    f"(parameter {i} of group {j}): a step writes every parameter's "
                    "entries in place through a flat view"
                )
            if p.requires_grad and self_overlapping(local(p)):  # a frozen one is never written
                raise ValueError(
                    f"MFAC: parameter {i} of group {j} (shape {tuple(p.shape)}, strides "
                    f"{local(p).stride()}) has entries that share memory (a dimension of "
                    "size > 1 with stride 0, as expand() makes): a step writes the "
                    "parameter in place, which torch refuses for such a tensor; give it "
                    "memory of its own (e.g. nn.Parameter(t.clone()))"
                )


def layout(opt: Any) -> None:
    """Check the parameters and map each to its slice of the flat vector."""
    flat = [p for group in opt.param_groups for p in group["params"]]
    if not flat:
        raise ValueError("MFAC got an empty parameter list")
    check_param_tensors(opt.param_groups)
    first = flat[0]
    seen: set[int] = set()
    for p in flat:
        if id(p) in seen:
            # torch.optim only warns of a group listing a parameter twice (its optimizers
            # then step it twice); here its coordinates would enter the flat vector twice,
            # and the window's Fisher would be that of another, duplicated, vector.
            raise ValueError(
                f"MFAC got a parameter twice (shape {tuple(p.shape)}): its coordinates "
                "would enter the flat vector, and its gradient the window, twice; list "
                "each once"
            )
        seen.add(id(p))
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(
                f"MFAC needs float16, bfloat16, float32 or float64 parameters, got {p.dtype}"
            )
        if p.device != first.device:
            raise ValueError(
                "MFAC treats all parameters as one vector: they must share one device, "
                f"got {first.device} and {p.device}"
            )
    if first.device.type == "meta":
        # The window is allocated and factorised at construction, which reads values.
        raise ValueError(
            "MFAC's parameters are on the meta device (no storage): the window is "
            "allocated and factorised when the optimizer is built; materialise the model "
            "first (e.g. model.to_empty(device=...) and initialise it), then build MFAC "
            "over its new parameters"
        )
    # The parameter that holds MFAC's state: the first one that requires grad, since
    # torch.distributed.checkpoint drops the state of frozen parameters.
    opt._first = next((p for p in flat if p.requires_grad), first)
    dtypes = {p.dtype for p in flat}
    # The step's dtype: float64 if a parameter is float64, else float32 (2-byte
    # parameters are stepped in float32 and the result rounded to their dtype once).
    opt.dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    opt.device = first.device
    # The window stores the parameters' dtype if they share one (2-byte parameters:
    # a 2-byte window, as grad_dtype would make it), else the step's.
    own = dtypes.pop() if len(dtypes) == 1 else opt.dtype
    opt._sharded = check_dtensors(opt, flat)
    check_not_sharded(opt)
    # Masked parameters (sparse mode) give the flat vector their kept coordinates only.
    opt._kept = {p: kept_index(p, mask) for p, mask in opt._masks.items()}
    opt._slices = []
    offset = 0
    for group in opt.param_groups:
        layout = []
        for p in group["params"]:
            kept = opt._kept.get(p)
            n = local(p).numel() if kept is None else kept.positions.numel()
            layout.append((p, offset, offset + n, p.shape))
            offset += n
        opt._slices.append(layout)
    # d counts every (kept) coordinate; sharded parameters hold ``offset`` of them here.
    opt.dim = sum(p.numel() for p in flat) if opt._sharded else offset
    if opt.dim == 0:
        shapes = ", ".join(str(tuple(p.shape)) for p in flat[:4]) + (
            ", ..." if len(flat) > 4 else ""
        )
        raise ValueError(
            f"MFAC's parameters hold no entries ({len(flat)} parameter(s), all of size 0: "
            f"shapes {shapes}): there is nothing to precondition; pass parameters with at "
            "least one entry"
        )
    # The flat gradient (this rank's shards of it, sharded), reused by every step.
    opt._grad = torch.zeros(offset, dtype=opt.dtype, device=opt.device)
    opt._columns = window_columns(opt, offset)
    grad_dtype = opt.defaults.get("grad_dtype")
    if grad_dtype is not None and grad_dtype not in (*HALF_GRAD_DTYPES, opt.dtype):
        raise TypeError(
            f"grad_dtype must be None (default: {own}), torch.bfloat16, "
            f"torch.float16 or {opt.dtype}, got {grad_dtype!r}"
        )
    opt.grad_dtype = own if grad_dtype is None else grad_dtype
    if opt.grad_dtype in HALF_GRAD_DTYPES and opt._comm is not None:
        raise ValueError(
            f"a window of {opt.grad_dtype} is not available for a distributed optimizer "
            "(comm= or DTensor parameters): pass grad_dtype=torch.float32 for 2-byte "
            "parameters, and no 2-byte grad_dtype"
        )


def log_window(opt: Any, damp: float) -> None:
    m, d = opt.defaults["num_grads"], opt._columns[1] - opt._columns[0]
    window = m * d * itemsize(opt.grad_dtype)
    # The Gram matrix and the two factor buffers the core keeps once the window is full.
    small = 3 * m * m * 8
    total = sum(local(p).numel() for group in opt.param_groups for p in group["params"])
    logger.info(
        "MFAC allocates a window of num_grads=%d x dim=%d %s on %s (damp=%g): "
        "%d bytes (%s), plus %d bytes (%s) of float64 m x m matrices%s",
        m,
        d,
        str(opt.grad_dtype).removeprefix("torch."),
        opt.device,
        damp,
        window,
        format_bytes(window),
        small,
        format_bytes(small),
        f"; masks keep {opt._grad.shape[0]} of {total} coordinates" if opt._masks else "",
    )


def new_window(opt: Any, damp: float) -> DynamicIHVP:
    log_window(opt, damp)
    lo, hi = opt._columns
    options = {
        "damp": damp,
        "dtype": opt.grad_dtype,
        "xp": array_namespace(opt._grad),
        "device": opt.device,
    }
    zero_init = opt.defaults["zero_init"]
    if opt._comm is not None:
        return _torch_distributed.sharded_window(opt, hi - lo, zero_init, options)
    # One process: the step has the window check the gradient
    # (_update_and_matvec_checked) and products are left unchecked, as before.
    unchecked = WindowOptions(zero_init=zero_init, check_finite=False)
    return DynamicIHVP(opt.defaults["num_grads"], hi - lo, options=unchecked, **options)


@torch.no_grad()
def grow(opt: Any) -> None:
    """Widen the window, the flat gradient and the momentum to the new last group."""
    # Read under the parameter that holds it before layout() (the holder changes when the
    # new group has the first parameter that requires grad), and first: a state cleared
    # by the user starts afresh before the window grows.
    entry = dict(opt._entry)
    saved = {k: opt.__dict__[k] for k in LAYOUT_ATTRS}
    try:
        # The groups before the new one, as laid out: a hand edit failed in the zip below.
        check_groups_laid_out(opt, opt.param_groups[:-1], "the group was not added")
        layout(opt)
        for old, new in zip(saved["_slices"], opt._slices, strict=False):
            for (*_, was), (*_, now) in zip(old, new, strict=True):
                if now != was:  # .data replaced since: the window's columns are not its
                    raise RuntimeError(
                        f"MFAC: a parameter of shape {tuple(now)} had shape {tuple(was)} when "
                        "the optimizer was built (its .data replaced since?): the window "
                        "holds its coordinates as they were; build a new optimizer"
                    )
        if opt.dtype != saved["dtype"]:
            raise ValueError(
                f"the new parameters would change the step's dtype from {saved['dtype']} "
                f"to {opt.dtype}: add parameters of the dtypes the optimizer was built "
                "with, or build a new optimizer"
            )
        if opt.grad_dtype != saved["grad_dtype"]:
            # The default window stores the parameters' dtype only while they share one.
            raise ValueError(
                "the new parameters would change the window's storage dtype from "
                f"{saved['grad_dtype']} to {opt.grad_dtype} (the parameters would no "
                "longer share one dtype): add parameters of the optimizer's dtype, or "
                f"build the optimizer with grad_dtype={saved['grad_dtype']}"
            )
        width = opt._grad.shape[0] - saved["_grad"].shape[0]
        window = opt.ihvp.state_dict()
        grads = window["grads"]
        window["grads"] = torch.cat([grads, grads.new_zeros((grads.shape[0], width))], 1)
        window["dim"] = opt.dim
        ihvp = new_window(opt, opt.ihvp.damp)
        ihvp.load_state_dict(window)
        old = entry["momentum_buffer"]
        entry["momentum_buffer"] = torch.cat([old, old.new_zeros(width)])
    except Exception:  # out of memory too: the optimizer stays as it was
        opt.__dict__.update(saved)
        raise
    opt.ihvp = ihvp
    opt._reset_state(entry)
