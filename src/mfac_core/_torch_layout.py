"""MFAC's layout: the parameters' slices of the flat vector, the window, its memory.

Functions of the optimizer (``opt``, an :class:`mfac_core.torch.MFAC`) that
:mod:`mfac_core.torch` calls, and the memory report that :class:`MFACPruner` shares;
nothing here is public.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from . import _torch_distributed
from ._compat import array_namespace
from ._dynamic import DynamicIHVP
from ._dynamic_setup import WindowOptions
from ._torch_distributed import check_dtensors, local, window_columns
from ._torch_sparse import check_not_sharded, kept_index

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


def layout(opt: Any) -> None:
    """Check the parameters and map each to its slice of the flat vector."""
    flat = [p for group in opt.param_groups for p in group["params"]]
    if not flat:
        raise ValueError("MFAC got an empty parameter list")
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
            layout.append((p, offset, offset + n))
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
        layout(opt)
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
