"""MFAC's step: the flat gradient, the window's update and product, the parameters' move.

Functions of the optimizer (``opt``, an :class:`mfac_core.torch.MFAC`) that
:mod:`mfac_core.torch` calls, for one process and across processes; nothing here is
public.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any

import torch

from ._dynamic_checks import Refused
from ._dynamic_window import NoGradient, RankPart, collective_step
from ._errors import FactorizationError
from ._finite import float32_overflow_said_by_caller
from ._torch_distributed import all_gather, dtensor_class, local
from ._torch_layout import check_groups_laid_out, self_overlapping
from ._torch_sparse import check_layouts
from ._torch_state import GROUP_KEYS, live_entry
from ._validation import short_repr


class Unstorable(Exception):
    """A finite gradient with an entry beyond the range of the window's 2-byte storage."""


# A step beyond float32's range is not finite, which the step tests and says itself (its
# MFACStepWarning), on every path (the previous window's product, the distributed step's).
@float32_overflow_said_by_caller
def step(opt: Any) -> None:
    """The step itself, after the closure."""
    present = any(p.grad is not None for group in opt.param_groups for p in group["params"])
    if not present and opt._comm is None:
        return  # nothing to step with: no window insert, no momentum decay, no count
    live_entry(opt)  # a state cleared by the user starts afresh before the window takes g
    if opt._comm is not None:
        # Collective even on a rank without gradients (its g is zeros): it joins the
        # step's reductions, which tell every rank whether any rank had one.
        distributed_step(opt, present)
        return
    g = gather(opt)
    if g.dtype != opt.ihvp.dtype:
        # float64 gradients for a 2-byte window: float32 steps. Cast before the check
        # below, so that a finite entry beyond float32's range counts as not finite.
        g = g.to(opt.ihvp.dtype)
    # One host sync per steady-state step, next to two passes over m x d: the window
    # reads its gradient's check (NaN, infinity, the 2-byte range), its row edit's
    # and the step's finiteness together, and reports them instead of raising. The
    # method is private to the window because it exists for this loop: it refuses
    # NaN whatever the window's check_finite, and computes the product before it
    # knows whether the step stands.
    strict = opt.defaults["errors"] == "raise"
    try:
        # Strict, a step that is not finite is refused before the window commits to
        # its gradient: the product is computed with the new factor first, at no cost.
        out = opt.ihvp._update_and_matvec_checked(g, strict=strict)
    except FactorizationError as exc:
        if strict:
            raise
        s, finite = with_previous_window(opt, g, exc)
    else:
        if out.status == "step not finite":
            skip(opt, step_not_finite(window_kept=False))
            return
        if out.status == "not finite":
            skip(
                opt,
                f"{culprit(opt)} holds NaN or infinity; the step is skipped "
                "(parameters, momentum and window unchanged)",
            )
            return
        if out.status in ("not representable", "too large"):
            if opt.defaults["errors"] == "raise":
                assert out.error is not None
                raise out.error  # the ValueError update_and_matvec raises
            if out.status == "too large":
                skip(opt, too_large(out.error))
                return
            unstorable = Unstorable(
                f"an entry of the gradient ({float(g.abs().max()):g}) is beyond the "
                f"range of the window's {str(opt.grad_dtype).removeprefix('torch.')}"
            )
            s, finite = with_previous_window(opt, g, unstorable)
        else:
            s, finite = out.s, out.s_finite
    moved(opt, s.to(opt.dtype), finite)


def moved(opt: Any, s: torch.Tensor, finite: bool) -> None:
    """Move the parameters by the preconditioned step ``s``, or skip it if not ``finite``.

    ``finite`` is decided by the caller (on every rank alike when distributed).
    """
    if not finite:
        skip(opt, step_not_finite(window_kept=True))
        return
    apply(opt, s)
    opt._count("steps")


def step_not_finite(*, window_kept: bool) -> str:
    """The message of a skipped step whose preconditioned step holds NaN or infinity.

    With ``errors="skip"`` the window keeps the gradient (it was finite and stored);
    with ``errors="raise"`` it is refused with the step, and nothing changes.
    """
    unchanged = "parameters and momentum" if window_kept else "parameters, momentum and window"
    return (
        "the preconditioned step holds NaN or infinity (damp too small for the dtype?); "
        f"the step is skipped ({unchanged} unchanged)"
    )


def with_previous_window(opt: Any, g: torch.Tensor, exc: Exception) -> tuple[torch.Tensor, bool]:
    """The step with the window as it was (which the core leaves unchanged)."""
    left_out(opt, exc)
    s = opt.ihvp.matvec(g)
    return s, bool(torch.isfinite(s).all())


def too_large(error: Exception | None) -> str:
    """The message of a step skipped for a gradient that would make the window hopeless.

    Its step, even with the previous window, would be of the gradient's absurd size: it
    is skipped as a non-finite gradient's.
    """
    return (
        f"the gradient is too large for the window ({error}); the step is skipped "
        "(parameters, momentum and window unchanged)"
    )


def skip(opt: Any, message: str) -> None:
    """Count and report a skipped step (``errors="skip"``), or raise (``errors="raise"``)."""
    if opt.defaults["errors"] == "raise":
        raise FloatingPointError(f"MFAC step {opt.steps + 1}: {message}")
    opt._count("skipped_steps")
    opt._warn(f"{message} ({opt.skipped_steps} skipped so far)")


def left_out(opt: Any, exc: Exception) -> None:
    """Count and report a gradient the window could not take (``errors="skip"``)."""
    opt._count("rejected_grads")
    opt._warn(
        f"the gradient was left out of the window and the step taken with the "
        f"previous window ({opt.rejected_grads} so far): {exc}"
    )


def distributed_step(opt: Any, present: bool) -> None:
    """The step across processes: every rank decides alike (see the class's Notes).

    ``present``: whether any parameter of this rank has a gradient. Where no rank's
    has, the step does nothing on every rank (one process's empty step); where some
    rank's has, a rank without one steps with zeros for its coordinates (as for any
    parameter without a gradient) and moves none of its parameters.

    The flat gradient is gathered, and its parameters and options checked, inside
    the step's first reduction (the window's Gram row): a check that fails on one
    rank only (a parameter resized there, a sparse gradient, an option edited into
    a string) raises on every rank, where the other ranks waited in the reduction
    for the one that raised until the group's timeout. The reduction's tag holds
    the groups' options (:func:`group_options`), which every rank must share.
    """
    lo, hi = opt._columns
    x = opt._grad[lo:hi]  # a view, filled by gather() in the reduction
    options = group_options(opt)
    part = RankPart(present, lambda: gather(opt), options, lambda: diverged_options(options))
    strict = opt.defaults["errors"] == "raise"
    agreed: list[tuple[torch.Tensor, bool]] = []

    def agree(s: torch.Tensor) -> bool:
        agreed.append(agreed_step(opt, s))
        return agreed[0][1]

    try:
        # Strict, a step not finite on any rank is refused on every rank before the
        # window commits to the gradient: the step's own reduction of the product (its
        # all-gather, or the sum of its flag) decides, moved before the commit.
        s = collective_step(opt.ihvp, x, part=part, strict=strict, agree=agree if strict else None)
    except NoGradient:
        return  # no rank had a gradient: no window insert, no momentum decay, no count
    except (FactorizationError, ValueError) as exc:
        hopeless = isinstance(exc, Refused) and exc.hopeless
        if isinstance(exc, FactorizationError) or hopeless:
            # Decided from reduced numbers, on every rank: a factorisation that fails,
            # or a finite gradient too large for the window (whose step is skipped).
            if opt.defaults["errors"] == "raise":
                raise
            if hopeless:
                skip(opt, too_large(exc))
                return
            left_out(opt, exc)
            s = opt.ihvp.matvec(x)
        else:
            # A ValueError on every rank: a gradient holding NaN or infinity on some
            # rank, or an option's value refused on some (set on one rank only: every
            # rank raises then, none counts a skipped step). One more reduction tells
            # them apart, on this path only, which every rank takes alike.
            error: ValueError | None = None
            try:
                check_option_values(opt)
            except ValueError as own:
                error = own
            if ranks_with(opt, error is not None):
                if error is not None:
                    raise error from exc
                raise ValueError(
                    "MFAC: a group's lr, momentum or weight_decay is NaN or infinite on "
                    "another rank (the step was not taken, nothing changed)"
                ) from exc
            # The window checks its shard inside the reduction of the Gram row, so a NaN
            # or infinity on any rank raises on every rank, and the window is kept.
            where = (
                culprit(opt)
                if not bool(torch.isfinite(x).all())
                else "the gradient on another rank"
            )
            skip(
                opt,
                f"{where} holds NaN or infinity; the step is skipped (parameters, momentum "
                "and window unchanged)",
            )
            return
    if s is None:
        skip(opt, step_not_finite(window_kept=False))
        return
    # Strict, agree made the reduction before the commit; otherwise it is made here.
    s, finite = agreed[0] if agreed else agreed_step(opt, s)
    moved(opt, s, finite)


def group_options(opt: Any) -> tuple[Any, ...]:
    """Every group's ``lr``, ``momentum`` and ``weight_decay``, as the ranks must share them.

    Replicated like the window's options: ranks whose options differ (a scheduler
    stepped on some ranks only) would move their replicas of the parameters (DDP), or
    their shards of one parameter (FSDP2), by different rules without a word; in the
    step's first reduction's tag, they raise instead. Numbers compare by their float64
    value, one-element tensors by their value in the step's dtype, as the step uses
    them (read in one transfer: a device sync beside the reduction's own), anything
    else by its type's name. A tensor never equals a number: the step applies them by
    other operations (a zero tensor momentum writes the momentum buffer, a zero float
    leaves it), whose replicas would move apart. Never raises: a rank whose options the
    step refuses (:func:`check_options`) joins the reduction with what it holds, where
    every rank raises for its refusal.
    """
    raw = [group.get(key) for group in opt.param_groups for key in GROUP_KEYS]
    taken = [isinstance(v, torch.Tensor) and readable(opt, v) for v in raw]
    tensors = [
        v.detach().reshape(()).to(opt.device, opt.dtype)
        for v, t in zip(raw, taken, strict=True)
        if t
    ]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    # + 0.0: -0.0 steps as 0.0 does, and must compare equal to it.
    return tuple(
        ("tensor", next(read) + 0.0) if t else number(v) for v, t in zip(raw, taken, strict=True)
    )


def readable(opt: Any, value: torch.Tensor) -> bool:
    """Whether a tensor option is one that the step takes (:func:`check_options`)."""
    try:
        check_tensor_option(opt, value, "a group option")
    except TypeError:
        return False
    return value.numel() == 1


def number(value: Any) -> Any:
    """A group option that is not a tensor, as :func:`group_options` compares it."""
    if isinstance(value, numbers.Real):
        try:
            return float(value) + 0.0
        except (OverflowError, TypeError, ValueError):  # an int beyond float64's range
            pass
    return (type(value).__name__,)


def diverged_options(options: tuple[Any, ...]) -> str:
    """The message of the step's first reduction where the ranks' tags differ."""
    per_group = [options[i : i + len(GROUP_KEYS)] for i in range(0, len(options), len(GROUP_KEYS))]
    return (
        "MFAC step: the ranks' replicated states differ: the lr, momentum or weight_decay "
        "of their parameter groups (a scheduler stepped, or an option edited, on some ranks "
        "only: their parameters would move by different rules; this rank's (lr, momentum, "
        f"weight_decay) per group: {per_group}), or their windows (opt.state cleared, "
        "reset, load_state_dict or another edit on some ranks only), or they called "
        "different collective operations. Every rank raised this and left its optimizer "
        "as it was"
    )


def ranks_with(opt: Any, flag: bool) -> int:
    """How many ranks pass ``flag`` True (one all-reduce; every rank must call it)."""
    count = torch.tensor([float(flag)], dtype=torch.float64, device=opt.device)
    return round(float(opt._comm.allreduce_sum(count)[0]))


def agreed_step(opt: Any, s: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The step from this rank's part ``s``, and whether it is finite on every rank.

    One collective: sharded (FSDP2), each rank moves its own shards and the ranks sum
    a flag; replicated (DDP), the step is all-gathered and its finiteness is that of
    the same gathered step on every rank.
    """
    if opt._sharded:
        return s, ranks_with(opt, not bool(torch.isfinite(s).all())) == 0
    s = all_gather(opt, s)
    return s, bool(torch.isfinite(s).all())


def check_params(opt: Any) -> None:
    """Refuse a step after the groups' parameters were edited, or one changed size, dtype or memory.

    The parameters stay the same objects through ``p.data = ...`` and ``model.double()``
    after the optimizer was built: a new size would not fit its slice of the flat vector,
    and the float32 flat gradient, window and step would round every float64 update to
    float32 without a word. (2-byte parameters, or float32 ones in a float64 optimizer,
    are stepped in a wider dtype and rounded once, as at construction.)
    """
    check_groups_laid_out(opt, opt.param_groups, "the step was not taken, nothing changed")
    # Every step: only comparisons per parameter; the messages are built where one fails.
    narrow = opt.dtype != torch.float64
    dtensor = dtensor_class() or ()  # isinstance(p, ()) is False
    for j, layout in enumerate(opt._slices):
        for i, (p, lo, hi, shape) in enumerate(layout):
            mine = p.to_local() if isinstance(p, dtensor) else p
            # The shape, not the size alone: a transposed .data of the same size paired
            # the window's columns with other entries (steps 46 % off, without a word).
            if p.shape != shape or (p not in opt._masks and mine.numel() != hi - lo):
                raise RuntimeError(
                    f"MFAC: {_where(p, i, j)} had shape {tuple(shape)} when the optimizer was "
                    "built (its .data replaced since?): the window holds its coordinates as "
                    "they were; "
                    "build a new optimizer (the step was not taken, nothing changed)"
                )
            if p.grad is not None and self_overlapping(mine):  # the step writes it
                # torch refused the in-place move in the middle of the step, after the
                # window had taken the gradient and earlier parameters had moved.
                raise RuntimeError(
                    f"MFAC: {_where(p, i, j)} has entries that share memory (strides "
                    f"{mine.stride()}: a dimension of size > 1 with stride 0, as expand() "
                    "makes; its .data replaced since?): a step writes the parameter in "
                    "place, which torch refuses for such a tensor; give it memory of its "
                    "own, e.g. p.data = p.data.clone() (the step was not taken, nothing "
                    "changed)"
                )
            if p.device != opt.device:
                # e.g. model.cuda() after construction (torch's modules keep their
                # parameters, with new .data): the step would fail moving it, after the
                # window had taken the gradient.
                raise RuntimeError(
                    f"MFAC: {_where(p, i, j)} is on {p.device}, but the optimizer was built "
                    f"for parameters on {opt.device}, where its window and buffers are (e.g. "
                    "before model.to(device)); build the optimizer after moving the model "
                    "(the step was not taken, nothing changed)"
                )
            if narrow and p.dtype == torch.float64:
                raise RuntimeError(
                    f"MFAC: {_where(p, i, j)} is float64, but the optimizer was built for "
                    f"parameters without float64 (its window and steps are "
                    f"{str(opt.dtype).removeprefix('torch.')}), e.g. before model.double(): "
                    "its updates would be rounded to that dtype; build the optimizer after "
                    "converting the model (the step was not taken, nothing changed)"
                )


def check_options(opt: Any) -> None:
    """Refuse a group option edited into what a step cannot use, before anything changes.

    A number must be finite (:func:`check_option_values`). Of a tensor only the type is
    read (its value would cost a device sync per step): a
    ``None`` or a string failed in the middle of the parameters' move, after the window
    had taken the gradient, with Python's bare "bad operand type" (a ``None`` momentum or
    weight decay was taken for zero). A tensor's device and dtype are read too: one on
    another device than the parameters' or the CPU's (a CUDA ``lr`` for CPU parameters,
    the meta device), or a complex one, failed the same way.
    """
    for j, group in enumerate(opt.param_groups):
        for key in GROUP_KEYS:
            value = group.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                check_tensor_option(opt, value, f"{key} of parameter group {j}")
                continue
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                continue
            got = "missing" if key not in group else short_repr(value)
            raise TypeError(
                f"MFAC: {key} of parameter group {j} is {got}: a step needs a real number "
                "(or a one-element tensor) there (the step was not taken, nothing changed)"
            )
    check_option_values(opt)


def check_option_values(opt: Any) -> None:
    """Refuse a group option that is a NaN or infinite number (a ``ValueError``).

    A NaN or infinite ``lr`` (a scheduler's, or edited in) made every parameter NaN
    without a word. Finiteness only: a schedule that ends at zero by repeated products
    (``LinearLR``) ends a hair below it (-3e-19), which torch's optimizers take and a
    range check would refuse at the end of every such schedule. Called by
    :func:`check_options`, and again where a distributed step's reduction reports a
    ``ValueError`` (which there stands for a gradient holding NaN or infinity).
    """
    for j, group in enumerate(opt.param_groups):
        for key in GROUP_KEYS:
            value = group.get(key)
            if isinstance(value, numbers.Real) and not _finite_float(value):
                raise ValueError(
                    f"MFAC: {key} of parameter group {j} is {short_repr(value)}: a step needs "
                    "a finite number there (the step was not taken, nothing changed)"
                )


def _finite_float(value: numbers.Real) -> bool:
    """Whether the step's ``float(value)`` is finite (an int or fraction past float's range
    is not: it would overflow there)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_tensor_option(opt: Any, value: torch.Tensor, where: str) -> None:
    """Refuse a one-element tensor option that the parameters' arithmetic cannot take."""
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(
            f"MFAC: {where} is a {value.dtype} tensor: a step needs a real one (the step "
            "was not taken, nothing changed)"
        )
    if value.is_nested or value.layout != torch.strided:
        # A sparse or nested one-element tensor passed the checks above and failed in
        # the middle of the step (after the window had taken the gradient), and before
        # a distributed step's first reduction, where the other ranks waited for it.
        kind = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
        raise TypeError(
            f"MFAC: {where} is a {kind} tensor: a step needs a dense one (the step was not "
            "taken, nothing changed)"
        )
    if value.device.type != "cpu" and value.device != opt.device:
        # A 0-d CPU tensor goes into any device's arithmetic as a number; others do not.
        raise TypeError(
            f"MFAC: {where} is a tensor on {value.device}, but the parameters are on "
            f"{opt.device}: put it there or on the CPU (the step was not taken, nothing "
            "changed)"
        )


def scalar(value: Any) -> Any:
    """A group option as a step uses it: a one-element tensor 0-d, so that it never broadcasts.

    A ``(1, 1)`` momentum made ``buf.mul_`` fail after the window had taken the gradient,
    a ``(1,)`` weight decay was no ``alpha`` for ``add_``, and a ``(1,)`` lr broadcast a 0-d
    parameter's step to ``(1,)`` (a ``(1, 1)`` lr a vector's to ``(1, n)``). Any other real
    number is read as a float: torch takes no ``fractions.Fraction`` (a ``numbers.Real``
    that :func:`check_options` lets by), as it failed there too.
    """
    return value.reshape(()) if isinstance(value, torch.Tensor) else float(value)


def _where(p: torch.Tensor, i: int, j: int) -> str:
    """A parameter as the step's refusals name it."""
    return f"parameter {i} of group {j} (shape {tuple(p.shape)})"


def gather(opt: Any) -> torch.Tensor:
    """The flat gradient, weight decay included, in the reused buffer."""
    check_params(opt)
    check_options(opt)
    check_layouts(opt)  # before anything changes: apply() writes through their flat views
    g = opt._grad
    for group, layout in zip(opt.param_groups, opt._slices, strict=True):
        wd = scalar(group["weight_decay"])
        decay = used(wd)
        for p, lo, hi, _ in layout:
            seg = g[lo:hi]
            if p.grad is None:
                seg.zero_()
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MFAC does not support sparse gradients")
            kept = opt._kept.get(p)
            if kept is not None:  # a masked parameter: its kept entries only
                kept.read(p.grad, seg)
                if decay:
                    flat, place = kept.places(p.detach())  # dense: check_layouts
                    add_scaled(seg, flat.index_select(0, place), wd)
                continue
            seg.copy_(local(p.grad).reshape(-1))
            if decay:
                add_scaled(seg, local(p.detach()).reshape(-1), wd)
    return g


def used(option: Any) -> bool:
    """Whether a step applies an option: a float that is not zero, or any tensor.

    A tensor's value is not read: on a GPU ``bool(t)`` is a device sync per step, and
    multiplying by a zero tensor gives the same step (only a parameter that already
    holds infinity or NaN, whose step is then skipped as non-finite, differs).
    """
    return isinstance(option, torch.Tensor) or option != 0


def add_scaled(out: torch.Tensor, x: torch.Tensor, c: Any) -> None:
    """``out += c * x`` for a float or 0-d tensor ``c``, whose value stays on its device."""
    if isinstance(c, torch.Tensor):  # add_'s alpha would read it on the host
        out.addcmul_(x, c.to(out.dtype))
    else:
        out.add_(x, alpha=c)


def culprit(opt: Any) -> str:
    """Which parameter made the flat gradient non-finite (for the message)."""
    for j, layout in enumerate(opt._slices):
        for i, (p, lo, hi, _) in enumerate(layout):
            seg = opt._grad[lo:hi]
            if not bool(torch.isfinite(seg.to(opt.ihvp.dtype)).all()):
                what = (
                    "gradient"
                    if p.grad is not None and not bool(torch.isfinite(local(p.grad)).all())
                    else "weight-decayed gradient"
                )
                where = f"parameter {i} of group {j} (shape {tuple(p.shape)})"
                if bool(torch.isfinite(seg).all()):
                    return (
                        f"the {what} of {where} is beyond the range of "
                        f"{str(opt.ihvp.dtype).removeprefix('torch.')} (the dtype the "
                        "step is computed in with this grad_dtype) and"
                    )
                return f"the {what} of {where}"
    return "the gradient"


def apply(opt: Any, s: torch.Tensor) -> None:
    momentum = opt._entry["momentum_buffer"]
    for group, layout in zip(opt.param_groups, opt._slices, strict=True):
        lr, mu = scalar(group["lr"]), scalar(group["momentum"])
        for p, lo, hi, _ in layout:
            d_p = s[lo:hi]
            if used(mu):
                buf = momentum[lo:hi]
                buf.mul_(mu)
                if p.grad is None:
                    # Its step entries come from the other coordinates' gradients
                    # through F^{-1}; a parameter without a gradient only decays.
                    continue
                d_p = buf.add_(d_p)
            if p.grad is None:
                continue
            # A parameter made under torch.inference_mode is written in it, as torch's
            # optimizers write it (the step runs outside, where its writes are refused).
            with torch.inference_mode() if p.is_inference() else contextlib.nullcontext():
                kept = opt._kept.get(p)
                if kept is None:
                    move(local(p), d_p, lr)
                else:
                    move_kept(p.detach(), kept, d_p, lr)


# -- checkpoints ----------------------------------------------------------------------


def move(local: torch.Tensor, d_p: torch.Tensor, lr: Any) -> None:
    """``theta -= lr * d_p``, computed in the step's dtype and rounded to the parameter's once."""
    step = d_p.view(local.shape)
    wide = local if local.dtype == step.dtype else local.to(step.dtype)
    if isinstance(lr, torch.Tensor):  # 0-d (scalar()), so that it never broadcasts the step
        wide.addcmul_(step, lr.to(step.dtype), value=-1)
    else:
        wide.add_(step, alpha=-lr)
    if wide is not local:
        local.copy_(wide)


def move_kept(p: torch.Tensor, kept: Any, d_p: torch.Tensor, lr: Any) -> None:
    """:func:`move` of a masked parameter's kept entries; the pruned ones are not touched."""
    flat, place = kept.places(p)  # a view of its memory: dense (check_layouts)
    if flat.dtype == d_p.dtype and not isinstance(lr, torch.Tensor):
        flat.index_add_(0, place, d_p, alpha=-lr)  # one pass, as move()'s add_
        return
    values = flat.index_select(0, place)
    move(values, d_p, lr)
    flat.index_copy_(0, place, values)
