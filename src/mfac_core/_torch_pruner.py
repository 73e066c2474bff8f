"""MFACPruner: the M-FAC pruner of ``nn.Module`` weights (re-exported by :mod:`mfac_core.torch`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import pruning
from ._finite import entry_name
from ._pruning_inputs import check_choices
from ._torch_pruner_grads import collected_gradients, held_out_loss, modes_and_buffers_kept
from ._torch_pruner_inputs import (
    check_block,
    check_damping_grid,
    check_differentiable,
    check_fisher_dtype,
    check_kept_layers,
    check_masks,
    check_weights_current,
    checked_state,
    chosen_weights,
    pruner_state,
)
from ._validation import check_count, check_damp, check_fraction

__all__ = ["MFACPruner"]

#: Copies of the weights by name (their dtype), and the same weights flat in the
#: Fisher's dtype: where :meth:`MFACPruner.prune` started.
_Base = tuple[dict[str, torch.Tensor], torch.Tensor]


class MFACPruner:
    r"""Prune the weights of chosen layers of a model with the M-FAC inverse Fisher.

    The weights of the chosen layers form one flat vector ``theta``. Each
    pruning step collects ``num_grads`` gradients of ``theta`` (one per batch
    of the data loader, at the unpruned coordinates), builds the inverse
    Fisher with :class:`~mfac_core.StaticIHVP` and prunes the least salient
    weights globally (paper Section 4.1), updating the others with the OBS
    update. Masks (``True`` = kept) are kept per layer and can be re-applied
    after every optimizer step.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its chosen weights are changed in place.
    num_grads : int, optional
        Gradients (batches) per Fisher estimate (default 64). Each estimate
        holds them in a ``num_grads x d`` matrix of the Fisher's dtype, ``d``
        the number of chosen weights; its size is logged when it is allocated
        (logger ``"mfac_core.torch"``, level ``INFO``).
    block_size : int or None, optional
        Block size of the block-diagonal Fisher (default 128); ``None`` uses
        the full Fisher over all chosen weights.
    damp : float, optional
        The damping ``lambda`` (default ``1e-5``).
    layers : sequence of str, optional
        Names of the modules (as in ``model.named_modules()``) whose
        ``weight`` is pruned. Default: every ``Linear`` and ``Conv1d/2d/3d``.
        A weight shared by several of them (tied weights) is pruned once, as
        one tensor, under the first of their names.
    saliency : {"obs", "obd", "magnitude"}, optional
        The saliency (default ``"obs"``); see :func:`mfac_core.pruning.prune`.
    update : {"single", "joint", "none"}, optional
        The update of the remaining weights (default ``"single"``, the
        paper's).
    selection_block_size : int, optional
        Prune the same fraction of every block of this many weights instead
        of selecting globally.
    dtype : torch.dtype, optional
        The dtype of the Fisher computations (default: the weights' dtype
        when the pruner is built, kept if the model is cast later).
        ``torch.float64`` gives more accurate OBS updates at small damping;
        ``torch.float16`` or ``torch.bfloat16`` store the gradients in 2 bytes
        and compute in float32, with float32 weights. Weights of a
        wider dtype than the computations' (float64 weights, a float32
        Fisher) are not rounded to it: the kept weights change by the update
        computed in the narrower dtype, added to them in their own dtype (one
        rounding), so with ``update="none"`` they stay bit for bit as they
        were.

    Attributes
    ----------
    masks : dict of str to torch.Tensor
        The boolean mask of each chosen weight, by module name. It may be
        assigned (masks saved with the model's ``state_dict``, say): one
        boolean tensor of the weight's shape and device for each name, in
        any order; the methods that use it refuse anything else, naming the
        layer.
    selected_damps : list of float
        The damping chosen at each step of the last :meth:`prune` with a
        grid of ``dampings`` (empty before).

    Raises
    ------
    ValueError
        If the model has no prunable layer, a named layer does not exist
        or has no ``weight``, or a chosen layer's ``weight`` is not one of
        its parameters (a parametrization such as ``weight_norm`` computes
        it), or for ``num_grads``, ``block_size`` or
        ``selection_block_size`` below 1 or a ``damp`` that is not finite
        and positive, or weights on the meta device.
    TypeError
        For a ``model`` that is not a module, a ``num_grads``, ``block_size`` or
        ``selection_block_size`` that is not an int, or a ``dtype`` other
        than the four above.

    Examples
    --------
    >>> import torch
    >>> from mfac_core.torch import MFACPruner
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
    ...                             torch.nn.Linear(16, 2))
    >>> data = [(torch.randn(4, 8), torch.randint(0, 2, (4,))) for _ in range(8)]
    >>> pruner = MFACPruner(model, num_grads=8, block_size=32, damp=1e-3)
    >>> pruner.prune(data, torch.nn.functional.cross_entropy, sparsity=0.5)
    >>> round(pruner.sparsity(), 2)
    0.5
    >>> int((model[0].weight == 0).sum()) + int((model[2].weight == 0).sum())
    80
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_grads: int = 64,
        block_size: int | None = 128,
        damp: float = 1e-5,
        layers: Sequence[str] | None = None,
        saliency: pruning.Saliency = "obs",
        update: pruning.Update = "single",
        selection_block_size: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        num_grads = check_count(num_grads, "num_grads")
        check_choices(saliency, update)
        # Checked here, as torch.optim checks its hyper-parameters, not after the m forward
        # and backward passes of the first prune() (a damping whose m damp overflows too).
        damp = check_damp(damp, num_grads=num_grads)
        block_size = check_block(block_size, "block_size")
        selection_block_size = check_block(selection_block_size, "selection_block_size")
        check_fisher_dtype(dtype)
        self.model = model
        self.num_grads = num_grads
        self.block_size = block_size
        self.damp = damp
        self.saliency = saliency
        self.update = update
        self.selection_block_size = selection_block_size
        self.weights = chosen_weights(model, layers)
        first = next(iter(self.weights.values()))
        self.device = first.device
        self.dtype = first.dtype if dtype is None else dtype
        self._theta_dtype = _theta_dtype(self.dtype)
        self.masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        self.dim = sum(w.numel() for w in self.weights.values())
        self.selected_damps: list[float] = []

    # -- flat views -----------------------------------------------------------------------

    def flat_weights(self) -> torch.Tensor:
        """The chosen weights as one flat vector.

        Returns
        -------
        torch.Tensor, shape (d,)
            A copy, in the Fisher's dtype (float32 for 2-byte gradients), on
            the weights' device.
        """
        flat = torch.cat([w.detach().reshape(-1) for w in self.weights.values()])
        return flat.to(self._theta_dtype)

    def flat_mask(self) -> torch.Tensor:
        """The masks as one flat vector.

        Returns
        -------
        torch.Tensor of bool, shape (d,)
            ``True`` for the weights that are kept.
        """
        check_masks(self.masks, self.weights)
        # In the weights' order, which theta's has (not the dict's own, if assigned).
        return torch.cat([self.masks[name].reshape(-1) for name in self.weights])

    def _base(self, weights: dict[str, torch.Tensor]) -> _Base | None:
        """What :meth:`_write` needs to change weights wider than the Fisher's dtype exactly.

        ``weights`` are copies of the weights (their dtype); None where theta's dtype
        holds them exactly (the same or a wider dtype): theta is then written as it is.
        """
        w_dtype = next(iter(self.weights.values())).dtype
        if torch.finfo(self._theta_dtype).eps <= torch.finfo(w_dtype).eps:
            return None
        return weights, self.flat_weights()

    @torch.no_grad()
    def _write(self, theta: torch.Tensor, mask: torch.Tensor, base: _Base | None) -> None:
        """Write ``theta`` (the Fisher's dtype) and ``mask`` into the weights and masks."""
        _write_weights(self.weights, self.masks, theta, mask, base)
        self.apply_masks()

    def param_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """The masks keyed by the pruned weights, as ``MFAC(masks=...)`` takes them.

        An :class:`~mfac_core.torch.MFAC` optimizer built with them fine-tunes
        the kept weights only: its window holds their coordinates (and those
        of the parameters without a mask, such as biases), so its memory and
        step time scale with the density, and the pruned weights stay zero.
        It keeps the masks it was built with: the weights that a later
        :meth:`prune` removes are still among its coordinates, and its steps
        move them again. Between pruning steps, build a new optimizer from
        the new ``param_masks()`` (or :meth:`attach` the pruner to the old
        one, which zeroes them after each step).

        Returns
        -------
        dict of torch.Tensor to torch.Tensor
            Each chosen weight (the model's parameter itself) to a copy of
            its boolean mask, ``True`` where it is kept.

        Examples
        --------
        >>> import torch
        >>> from mfac_core.torch import MFAC, MFACPruner
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                             torch.nn.Linear(16, 2))
        >>> data = [(torch.randn(4, 8), torch.randint(0, 2, (4,))) for _ in range(8)]
        >>> pruner = MFACPruner(model, num_grads=8, block_size=32, damp=1e-3)
        >>> pruner.prune(data, torch.nn.functional.cross_entropy, sparsity=0.5)
        >>> opt = MFAC(model.parameters(), lr=1e-3, num_grads=8, masks=pruner.param_masks())
        >>> opt.dim  # 80 kept weights of 160, and the 18 biases
        98
        """
        check_masks(self.masks, self.weights)
        return {w: self.masks[name].clone() for name, w in self.weights.items()}

    def sparsity(self) -> float:
        """The fraction of the chosen weights that is pruned.

        Returns
        -------
        float
            In ``[0, 1]``: ``prune`` leaves some weights, but assigned
            ``masks`` may keep none.
        """
        return 1.0 - float(self.flat_mask().sum()) / self.dim

    # -- gradients ------------------------------------------------------------------------

    def collect_grads(
        self, loader: Iterable[Any], loss_fn: Callable[[Any, Any], Any], /
    ) -> torch.Tensor:
        """``num_grads`` gradients of the chosen weights, one per batch.

        Batches are ``(inputs, targets)`` pairs; the gradient of
        ``loss_fn(model(inputs), targets)`` is taken with respect to the
        chosen weights and zeroed at pruned coordinates. The loader is
        iterated again from the start if it has fewer batches (so a one-shot
        iterator must yield ``num_grads`` batches). The gradients are taken
        with :func:`torch.autograd.grad`: the model's ``.grad`` fields are
        left as they are. Sparse gradients (``nn.Embedding(sparse=True)``)
        are made dense.

        The model runs in the mode it is in: in train mode, batch norm
        normalises by each batch's statistics and dropout is active, as in
        training; call ``model.eval()`` first for the gradients of the model
        as it is evaluated. Its buffers (batch norm's running statistics and
        ``num_batches_tracked``) and every module's train/eval mode are
        restored afterwards, whether the call returns or raises: collecting
        gradients for pruning does not change what the model computes. An
        error (of ``loss_fn``, a non-finite gradient, an interrupt) closes the
        loader's iterator it leaves unfinished (``close()``, where it has one:
        a generator's ``finally`` blocks run then); one that still has batches
        after ``num_grads`` is left open, for the next step of ``prune``.

        Parameters
        ----------
        loader : iterable
            Yields ``(inputs, targets)`` batches on the model's device.
        loss_fn : callable
            ``loss_fn(outputs, targets) -> scalar tensor``.

        Returns
        -------
        torch.Tensor, shape (num_grads, d)
            In the Fisher's dtype, on the weights' device.

        Raises
        ------
        ValueError
            If the loader yields no batch, or fewer than ``num_grads`` and
            then none when iterated again, a chosen weight does not require
            grad, a gradient holds NaN or infinity at a kept weight, the
            ``masks`` do not fit the weights, a weight is no longer the
            parameter the pruner was built with (replaced, as by
            ``load_state_dict(..., assign=True)``), or (``dtype=torch.float16``) a
            finite gradient entry is beyond float16's range.
        RuntimeError
            Under :func:`torch.inference_mode`, which disables gradients.
        """
        check_weights_current(self.model, self.weights)
        check_differentiable(self.weights)
        return collected_gradients(
            self.model, self.weights, self.flat_mask(), loader, loss_fn, self.num_grads, self.dtype
        )

    # -- pruning --------------------------------------------------------------------------

    def prune(
        self,
        loader: Iterable[Any],
        loss_fn: Callable[[Any, Any], Any],
        /,
        *,
        sparsity: float,
        steps: int = 1,
        schedule: pruning.Schedule = "linear",
        dampings: Sequence[float] | None = None,
        select_damp: Callable[[nn.Module], Any] | None = None,
    ) -> None:
        """Prune the chosen weights to ``sparsity`` (one shot, or in ``steps`` steps).

        With ``steps > 1`` the gradients are collected again and the inverse
        Fisher rebuilt before each step, at the partially pruned weights
        (the paper's recomputations). Weights pruned earlier stay pruned.

        With ``dampings`` and ``select_damp``, each step prunes at every
        damping of the grid from one set-up (:func:`mfac_core.pruning.select_damping`)
        and keeps the weights of the lowest ``select_damp(model)``, called
        with the candidate weights and masks in the model; the chosen
        dampings are in :attr:`selected_damps`. If anything raises, the
        weights and masks are restored to what they were before the call.
        Either way the model's buffers (batch norm's running statistics) and
        its modules' train/eval modes are afterwards what they were before
        the call, as they are for every ``select_damp`` call and every step's
        gradients, whatever ``loss_fn`` or ``select_damp`` did to them (see
        :meth:`collect_grads`): only the chosen weights change.

        Parameters
        ----------
        loader : iterable
            Yields ``(inputs, targets)`` batches.
        loss_fn : callable
            ``loss_fn(outputs, targets) -> scalar tensor``.
        sparsity : float
            The fraction of the chosen weights pruned afterwards, in
            ``[0, 1)``.
        steps : int, optional
            The number of steps (default 1: one shot).
        schedule : {"linear", "cubic", "exponential"}, optional
            The sparsity of the intermediate steps (see
            :func:`mfac_core.pruning.sparsity_schedule`).
        dampings : sequence of float, optional
            A grid of dampings to choose from at each step, instead of the
            pruner's ``damp``; needs ``select_damp``, the OBS saliency and
            ``update`` ``"single"`` or ``"none"``.
        select_damp : callable, optional
            ``select_damp(model) -> float``: the held-out loss of the model
            holding the weights pruned at one damping of the grid (for
            instance its loss on validation data, under ``torch.no_grad()``).

        Raises
        ------
        ValueError
            For a sparsity outside ``[0, 1)``, ``steps < 1``, an unknown
            ``schedule``, only one of ``dampings`` and ``select_damp``,
            ``dampings`` with the joint update, a non-finite held-out loss, an
            update past the weights' dtype's range (float16: 65504; the weights
            then as before the call); and as :meth:`collect_grads`.
        TypeError
            For a ``select_damp`` that is not callable or returns something
            other than a real number.
        FactorizationError
            If the damped Fisher of the collected gradients cannot be
            factorised in float64 (a damping far too small for them).

        Examples
        --------
        >>> import torch
        >>> from torch.nn.functional import cross_entropy
        >>> from mfac_core.torch import MFACPruner
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                             torch.nn.Linear(16, 2))
        >>> data = [(torch.randn(4, 8), torch.randint(0, 2, (4,))) for _ in range(8)]
        >>> x_val, y_val = torch.randn(32, 8), torch.randint(0, 2, (32,))
        >>> @torch.no_grad()
        ... def val_loss(model):
        ...     return float(cross_entropy(model(x_val), y_val))
        >>> pruner = MFACPruner(model, num_grads=8, block_size=32)
        >>> pruner.prune(data, cross_entropy, sparsity=0.5, dampings=[1e-4, 1e-2, 1.0],
        ...              select_damp=val_loss)
        >>> len(pruner.selected_damps), round(pruner.sparsity(), 2)
        (1, 0.5)
        """
        sparsity = check_fraction(sparsity, "sparsity")
        check_weights_current(self.model, self.weights)
        check_kept_layers(self.masks, self.weights)  # before they are copied to restore them
        check_damping_grid(dampings, select_damp, num_grads=self.num_grads)
        before = (
            {name: w.detach().clone() for name, w in self.weights.items()},
            {name: m.clone() for name, m in self.masks.items()},
        )
        base = self._base(before[0])
        # The candidates of the current step, and the damping select_damping chose at
        # each step: the one whose result object it returned (no second argmin here).
        candidates: list[tuple[pruning.PruneResult, float]] = []
        chosen: list[float] = []

        def grad_fn(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            self._write(theta, mask, base)
            return self.collect_grads(loader, loss_fn)

        def held_out(damp: float, result: pruning.PruneResult) -> Any:
            self._write(result.theta, result.mask, base)
            assert select_damp is not None
            candidates.append((result, damp))
            return held_out_loss(self.model, select_damp)

        def step_done(step: int, result: pruning.PruneResult) -> None:
            chosen.append(next(damp for r, damp in candidates if r is result))
            candidates.clear()

        with modes_and_buffers_kept(self.model):
            try:
                result = pruning.gradual_prune(
                    self.flat_weights() if base is None else base[1],
                    grad_fn,
                    sparsity=sparsity,
                    steps=steps,
                    schedule=schedule,
                    mask=self.flat_mask(),
                    damp=self.damp if dampings is None else dampings,
                    block_size=self.block_size,
                    saliency=self.saliency,
                    update=self.update,
                    selection_block_size=self.selection_block_size,
                    select_damp=None if select_damp is None else held_out,
                    callback=None if select_damp is None else step_done,
                )
                self._write(result.theta, result.mask, base)
            except BaseException:
                _restore(self.weights, self.masks, *before)
                raise
        if dampings is not None:
            self.selected_damps = chosen

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The pruner's state, to checkpoint a pruning run between :meth:`prune` calls.

        As :meth:`torch.ao.pruning.BaseSparsifier.state_dict`, the masks and the
        options, not the weights: save it beside ``model.state_dict()`` (which
        holds the pruned weights). A :meth:`prune` call, all its ``steps``
        included, leaves nothing half done, so this is the whole state.

        Returns
        -------
        dict
            ``"masks"``: each layer's boolean mask by name (copies, in the order of the
            pruned weights); ``"selected_damps"``: the list :attr:`selected_damps`;
            ``"options"``: ``num_grads``, ``block_size``, ``damp``, ``saliency``,
            ``update``, ``selection_block_size`` and ``dtype`` (its name, such as
            ``"float32"``). Tensors, strings, numbers, ``None``, lists and dicts
            only: ``torch.load(..., weights_only=True)`` reads it.

        Raises
        ------
        TypeError, ValueError
            For assigned :attr:`masks` that do not fit the weights.
        """
        return pruner_state(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take the masks, chosen dampings and options of :meth:`state_dict`.

        The options replace the pruner's own (as an optimizer's
        ``load_state_dict`` replaces its hyper-parameters), so a pruner built
        over the same layers continues the saved run: its next :meth:`prune`
        prunes as the saved pruner's would. The masks are copied onto the
        weights' devices. The weights are not touched: load them with
        ``model.load_state_dict``, or call :meth:`apply_masks` to zero the pruned
        ones. The whole state is checked before anything is set: a refused one
        leaves the pruner as it was.

        Parameters
        ----------
        state_dict : dict
            As :meth:`state_dict` returns it (read back with
            ``torch.load``, say).

        Raises
        ------
        ValueError, TypeError
            For a state that :meth:`state_dict` does not give, naming its key:
            missing or unknown keys, masks that do not fit the pruned layers
            (as :attr:`masks`), options the constructor refuses, or chosen
            dampings that are not positive finite numbers.
        """
        # Everything checked before anything is set.
        for key, value in checked_state(self, state_dict).items():
            setattr(self, key, value)
        self._theta_dtype = _theta_dtype(self.dtype)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set the pruned weights to zero again (e.g. after an optimizer step)."""
        check_weights_current(self.model, self.weights)
        check_masks(self.masks, self.weights)
        for name, w in self.weights.items():
            w.masked_fill_(~self.masks[name], 0.0)

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Re-apply the masks after every step of ``optimizer``.

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
            Any optimizer over (some of) the model's parameters.

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            Call ``.remove()`` on it to stop.
        """
        return optimizer.register_step_post_hook(lambda *_: self.apply_masks())


def _theta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The weights' dtype in the pruning functions: 2-byte gradients go with float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.no_grad()
def _restore(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    saved_weights: dict[str, torch.Tensor],
    saved_masks: dict[str, torch.Tensor],
) -> None:
    """Put the weights and masks (by name) back to the saved copies."""
    for name, w in weights.items():
        w.copy_(saved_weights[name])
        masks[name] = saved_masks[name]


def _write_weights(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    theta: torch.Tensor,
    mask: torch.Tensor,
    base: _Base | None,
) -> None:
    """Write the flat ``theta`` and ``mask`` into ``weights`` and ``masks`` (by name).

    With a ``base`` (weights wider than theta), each weight becomes its value at
    the base plus theta's change from the base's theta: the difference of two
    values of theta's dtype, exact in the wider one (unless one is below 2**-29 of
    the other, for float32 in float64), so a weight the pruning left alone is
    unchanged, bit for bit, and an updated one is rounded once.

    Nothing is written where an updated weight leaves its dtype's range (a float16
    model's weight past 65504 became infinity, silently): a ``ValueError`` names it.
    """
    offsets, offset = {}, 0
    for name, w in weights.items():
        offsets[name], offset = offset, offset + w.numel()

    def new_weight(name: str) -> torch.Tensor:
        w, offset = weights[name], offsets[name]
        new = theta[offset : offset + w.numel()].view(w.shape)
        if base is not None:
            start, start_theta = base[0][name], base[1][offset : offset + w.numel()]
            new = start + (new.to(start.dtype) - start_theta.view(w.shape).to(start.dtype))
        return new

    def overflows(name: str) -> torch.Tensor:
        # The kept weights were finite (prune checks them): a kept value that is not is
        # the update's, beyond float32 or the weights' dtype. (A pruned one may hold
        # anything until the masks zero it.) theta's cast says it without the base's
        # arithmetic: with a base the weights are wider, and finite theta stays finite.
        w, offset = weights[name], offsets[name]
        part = theta[offset : offset + w.numel()].view(w.shape)
        kept = mask[offset : offset + w.numel()].view(w.shape)
        return kept & ~torch.isfinite(part.to(w.dtype))

    # One transfer for all layers (a pruning step writes rarely, but a model has many).
    names = list(weights)
    if names and bool(torch.stack([overflows(name).any() for name in names]).any()):
        name = next(name for name in names if overflows(name).any())
        index = [int(i) for i in torch.nonzero(overflows(name))[0]]
        # The narrower of the weights' dtype and the Fisher's (theta's) overflowed.
        dtype = min(weights[name].dtype, theta.dtype, key=lambda t: torch.finfo(t).max)
        value = float(new_weight(name)[tuple(index)])
        wider = "the weights" if dtype == weights[name].dtype else "the Fisher (dtype=)"
        raise ValueError(
            f"the pruning update leaves {dtype}'s range (largest {torch.finfo(dtype).max:g}): "
            f"{entry_name(f'weight {name!r}', index, value)}; prune with a larger damping "
            f"or in more steps, or keep {wider} in a wider dtype"
        )
    for name, w in weights.items():
        w.copy_(new_weight(name))
        offset = offsets[name]
        masks[name] = mask[offset : offset + w.numel()].reshape(w.shape).clone()
