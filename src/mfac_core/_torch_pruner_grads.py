"""The pruner's gradients: one per batch, with the model's modes and buffers kept."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from . import _host_rows
from ._errors import close_abandoned
from ._torch_layout import format_bytes, itemsize, logger
from ._torch_pruner_inputs import check_finite_row, check_float16

__all__ = ["collected_gradients", "held_out_loss", "modes_and_buffers_kept"]


@contextlib.contextmanager
def modes_and_buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval mode and buffers on exit, raised or not.

    Forward passes in train mode update batch norm's running statistics (and
    ``num_batches_tracked``) in place; gradients for a pruning step should leave the
    model the user evaluates as it was. A buffer the forward pass replaced by another
    tensor is put back too.
    """
    modes = [(module, module.training) for module in model.modules()]
    copies: dict[int, torch.Tensor] = {}
    buffers = []
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if id(buf) not in copies:  # a buffer shared by two modules is copied once
                copies[id(buf)] = buf.detach().clone()
            buffers.append((module, name, buf))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf in buffers:
                if getattr(module, name, None) is not buf:
                    setattr(module, name, buf)
                buf.copy_(copies[id(buf)])
        for module, training in modes:
            module.training = training


def held_out_loss(model: nn.Module, select_damp: Callable[[nn.Module], Any]) -> Any:
    """``select_damp(model)``, with the model's modes and buffers put back after it.

    A held-out loss commonly calls ``model.eval()`` and leaves it so: the next step's
    gradients were then taken in eval mode (and from batch norm statistics that a
    train-mode forward pass of the held-out data had moved), and the next damping's
    candidate was scored from the model as the last one left it.
    """
    with modes_and_buffers_kept(model):
        return select_damp(model)


def collected_gradients(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    mask: torch.Tensor,
    loader: Iterable[Any],
    loss_fn: Callable[[Any, Any], Any],
    num_grads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``num_grads`` gradients of ``weights`` (by name), one per batch, zero where ``mask`` is not.

    ``(num_grads, d)`` in ``dtype`` on the weights' device; the model's modes and
    buffers are as they were afterwards, raised or not.
    """
    dim = int(mask.numel())
    device = next(iter(weights.values())).device
    size = num_grads * dim * itemsize(dtype)
    logger.info(
        "MFACPruner allocates num_grads=%d x dim=%d %s gradients on %s: %d bytes (%s)",
        num_grads,
        dim,
        str(dtype).removeprefix("torch."),
        device,
        size,
        format_bytes(size),
    )
    # Through NumPy on the CPU (huge pages): the saliency's passes stream it.
    G = _host_rows.zeros(torch, (num_grads, dim), dtype=dtype, device=device)
    with modes_and_buffers_kept(model):
        _fill(model, weights, dtype, G, mask, loader, loss_fn)
    # In place (no second m x d array); the pruning functions zero them again.
    return G.masked_fill_(~mask, 0)


def _fill(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype,
    G: torch.Tensor,
    mask: torch.Tensor,
    loader: Iterable[Any],
    loss_fn: Callable[[Any, Any], Any],
) -> None:
    """Write one gradient of ``weights`` (by name) per batch into each row of ``G``."""
    num_grads = int(G.shape[0])
    params = list(weights.values())
    row = 0
    while row < num_grads:
        got = False
        batches = iter(loader)
        try:
            for batch in batches:
                got = True
                row = _fill_row(model, weights, params, dtype, G, mask, batch, loss_fn, row)
                if row == num_grads:
                    # Not closed: a longer one-shot iterator serves prune()'s next step.
                    break
        except BaseException as exc:
            # An error abandons the iterator: a generator's finally blocks and with
            # statements run now, not when it is collected (never, while the caller
            # holds it), and this frame, which the traceback holds, lets it go.
            close_abandoned(batches, exc)
            del batches
            raise
        if not got and row:
            raise ValueError(
                f"the data loader yielded {row} batches and then none when iterated "
                f"again: num_grads={num_grads} needs {num_grads}; pass a "
                "loader that can be iterated more than once (a list, a DataLoader) "
                "or a smaller num_grads"
            )
        if not got:
            raise ValueError(
                "the data loader yielded no batches (an iterator exhausted already? "
                "prune() with steps > 1 iterates the loader again at every step: pass "
                "a list or a DataLoader)"
            )


def _fill_row(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    params: list[torch.Tensor],
    dtype: torch.dtype,
    G: torch.Tensor,
    mask: torch.Tensor,
    batch: Any,
    loss_fn: Callable[[Any, Any], Any],
    row: int,
) -> int:
    """Write the gradient of ``batch``'s loss into ``G[row]``; the next row."""
    inputs, targets = batch[0], batch[1]
    with torch.enable_grad():
        loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    offset = 0
    for name, w, g in zip(weights, params, grads, strict=True):
        n = w.numel()
        if g is None:
            G[row, offset : offset + n] = 0
        else:
            # A sparse gradient (nn.Embedding(sparse=True)) is dense here.
            g = (g.to_dense() if g.layout != torch.strided else g).reshape(-1)
            G[row, offset : offset + n] = g
            if dtype == torch.float16:
                check_float16(G[row, offset : offset + n], g, name, row)
        offset += n
    check_finite_row(G[row], mask, weights, row)  # one sync per batch
    return row + 1
