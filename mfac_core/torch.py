r"""PyTorch front-ends: the M-FAC optimizer and an M-FAC pruner for ``nn.Module`` weights.

This module imports :mod:`torch`; ``import mfac_core`` does not import it.

- :class:`MFAC` is the matrix-free preconditioned SGD of Section 4.2 of the
  M-FAC paper: every step inserts the flat gradient ``g`` into a sliding
  window of the last ``num_grads`` gradients (a
  :class:`~mfac_core.DynamicIHVP`) and moves the parameters along
  ``F^{-1} g``.
- :class:`MFACPruner` is the pruner of Section 4.1: it collects gradients of
  a model's weights from a data loader, builds the static inverse Fisher
  (:class:`~mfac_core.StaticIHVP`, optionally block-wise) and prunes with the
  OBS saliency and update of :mod:`mfac_core.pruning`, in one shot or
  gradually with recomputations, and keeps the masks applied afterwards.

All tensors stay on the parameters' device; the window, its float64
factor and every buffer are allocated there once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import pruning
from ._compat import array_namespace
from ._dynamic import DynamicIHVP
from ._validation import check_choice, check_count, check_damp, check_fraction, check_number

__all__ = ["MFAC", "MFACPruner"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MFAC(torch.optim.Optimizer):
    r"""M-FAC: SGD preconditioned by the inverse empirical Fisher of a sliding window.

    All parameters are treated as one flat vector ``theta`` of ``d``
    coordinates (in the order of the parameter groups). A step computes

    .. math::

        g &= \nabla L(\theta) + \mathrm{wd}\,\theta, \qquad
        s = \hat F^{-1} g \quad (\text{after inserting } g \text{ into the window}), \\
        b &\leftarrow \mu b + s, \qquad \theta \leftarrow \theta - \eta\, b ,

    where ``F = damp I + (1/m) sum g_i g_i^T`` over the window of the last
    ``m = num_grads`` gradients. The step vector is split back per parameter,
    so the learning rate ``eta``, the momentum ``mu`` and the weight decay
    ``wd`` are per parameter group, as in :class:`torch.optim.SGD`.

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups (dicts), as for any
        :class:`torch.optim.Optimizer`. All must be floating tensors on one
        device with one dtype (float32 or float64).
    lr : float, optional
        The learning rate (default ``1e-3``).
    num_grads : int, optional
        The window size m (default 1024, the paper's default for language
        models). Memory: ``m * d`` values of the parameters' dtype.
    damp : float, optional
        The damping ``lambda > 0`` (default ``1e-5``).
    momentum : float, optional
        Momentum on the preconditioned step, in ``[0, 1)`` (default 0: the
        paper uses none).
    weight_decay : float, optional
        L2 penalty added to the gradient before preconditioning (default 0).
    zero_init : bool, optional
        Start from a window of ``m`` zero gradients with the normalisation
        ``1/m`` fixed, as the authors' implementation does (default). With
        ``False`` the normalisation is ``1/k`` for the ``k`` gradients seen so
        far, which makes the first steps ``g / |g|^2``-sized.

    Attributes
    ----------
    ihvp : DynamicIHVP
        The window and its factorisation.
    dim : int
        The number of coordinates d.

    Raises
    ------
    ValueError
        For parameters on different devices or with different dtypes, no
        parameters, or out-of-range hyper-parameters.
    TypeError
        For non-floating parameters.

    Notes
    -----
    Parameters whose ``grad`` is ``None`` in a step contribute zeros to the
    flat gradient and are not moved in that step (their momentum buffer still
    decays). A step reads the ``m x d`` window twice, the floor of the
    dynamic algorithm; see :meth:`DynamicIHVP.update_and_matvec`.

    :meth:`state_dict` holds the window (gradients, Gram matrix and Cholesky
    factor), the momentum buffer and the step count, so that a run restored
    from a checkpoint continues bit for bit.

    Examples
    --------
    >>> import torch
    >>> from mfac_core.torch import MFAC
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(4, 1)
    >>> X, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> opt = MFAC(model.parameters(), lr=1e-3, num_grads=8, damp=1e-2)
    >>> first = torch.nn.functional.mse_loss(model(X), y).item()
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     torch.nn.functional.mse_loss(model(X), y).backward()
    ...     opt.step()
    >>> torch.nn.functional.mse_loss(model(X), y).item() < first
    True
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        num_grads: int = 1024,
        damp: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        zero_init: bool = True,
    ) -> None:
        lr = check_number(lr, "lr", low=0.0)
        momentum = check_number(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        weight_decay = check_number(weight_decay, "weight_decay", low=0.0)
        num_grads = check_count(num_grads, "num_grads")
        self._frozen = False
        super().__init__(params, {"lr": lr, "momentum": momentum,
                                  "weight_decay": weight_decay})
        self._frozen = True
        flat = [p for group in self.param_groups for p in group["params"]]
        if not flat:
            raise ValueError("MFAC got an empty parameter list")
        first = flat[0]
        for p in flat:
            if not p.is_floating_point() or p.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"MFAC needs float32 or float64 parameters, got {p.dtype}")
            if p.device != first.device or p.dtype != first.dtype:
                raise ValueError(
                    "MFAC treats all parameters as one vector: they must share one device and "
                    f"one dtype, got {first.device}/{first.dtype} and {p.device}/{p.dtype}")
        self.device, self.dtype = first.device, first.dtype
        self._slices: list[list[tuple[torch.Tensor, int, int]]] = []
        offset = 0
        for group in self.param_groups:
            layout = []
            for p in group["params"]:
                layout.append((p, offset, offset + p.numel()))
                offset += p.numel()
            self._slices.append(layout)
        self.dim = offset
        xp = array_namespace(first)
        self.ihvp = DynamicIHVP(num_grads, self.dim, damp=damp, dtype=self.dtype, xp=xp,
                                device=self.device, zero_init=zero_init)
        self._grad = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        self._momentum: torch.Tensor | None = None
        self.steps = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; possible only while the optimizer is being built.

        The window's dimension d is fixed once the optimizer exists, so adding
        parameters later raises ``ValueError``.

        Parameters
        ----------
        param_group : dict
            The group, as for :meth:`torch.optim.Optimizer.add_param_group`.
        """
        if getattr(self, "_frozen", False):
            raise ValueError("MFAC cannot add parameter groups after construction: the "
                             "window's dimension is fixed; build a new optimizer instead")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one M-FAC step.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (computed with
            gradients enabled).

        Returns
        -------
        object
            The loss returned by ``closure``, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g = self._grad
        for group, layout in zip(self.param_groups, self._slices, strict=True):
            wd = group["weight_decay"]
            for p, lo, hi in layout:
                seg = g[lo:hi]
                if p.grad is None:
                    seg.zero_()
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients")
                seg.copy_(p.grad.reshape(-1))
                if wd:
                    seg.add_(p.detach().reshape(-1), alpha=wd)
        s = self.ihvp.update_and_matvec(g)
        if self._momentum is None and any(gr["momentum"] for gr in self.param_groups):
            self._momentum = torch.zeros_like(s)
        for group, layout in zip(self.param_groups, self._slices, strict=True):
            lr, mu = group["lr"], group["momentum"]
            for p, lo, hi in layout:
                d_p = s[lo:hi]
                if mu:
                    buf = self._momentum[lo:hi]
                    buf.mul_(mu).add_(d_p)
                    d_p = buf
                if p.grad is not None:
                    p.add_(d_p.view(p.shape), alpha=-lr)
        self.steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, including the M-FAC window.

        Returns
        -------
        dict
            :meth:`torch.optim.Optimizer.state_dict` plus a key ``"mfac"``
            holding copies of the window's state
            (:meth:`DynamicIHVP.state_dict`), the momentum buffer and the
            step count.
        """
        state = super().state_dict()
        state["mfac"] = {
            "window": self.ihvp.state_dict(),
            "momentum_buffer": None if self._momentum is None else self._momentum.clone(),
            "steps": self.steps,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, window included.

        Parameters
        ----------
        state_dict : dict
            From :meth:`state_dict` of an MFAC optimizer over parameters of
            the same shapes. Tensors are moved to this optimizer's device.

        Raises
        ------
        ValueError
            If the state has no M-FAC window or its sizes do not match.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac", None)
        if not isinstance(extra, dict) or "window" not in extra:
            raise ValueError("not an MFAC state_dict: it has no 'mfac' window state")
        window = {k: v.to(device=self.device) if isinstance(v, torch.Tensor) else v
                  for k, v in extra["window"].items()}
        self.ihvp.load_state_dict(window)
        super().load_state_dict(state_dict)
        buf = extra.get("momentum_buffer")
        if buf is not None:
            if tuple(buf.shape) != (self.dim,):
                raise ValueError(f"momentum buffer has shape {tuple(buf.shape)}, expected "
                                 f"({self.dim},)")
            buf = buf.to(device=self.device, dtype=self.dtype, copy=True)
        self._momentum = buf
        self.steps = int(extra.get("steps", 0))


# -- pruning ------------------------------------------------------------------------------


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
        Gradients (batches) per Fisher estimate (default 64).
    block_size : int or None, optional
        Block size of the block-diagonal Fisher (default 128); ``None`` uses
        the full Fisher over all chosen weights.
    damp : float, optional
        The damping ``lambda`` (default ``1e-5``).
    layers : sequence of str, optional
        Names of the modules (as in ``model.named_modules()``) whose
        ``weight`` is pruned. Default: every ``Linear`` and ``Conv1d/2d/3d``.
    saliency : {"obs", "obd", "magnitude"}, optional
        The saliency (default ``"obs"``); see :func:`mfac_core.pruning.prune`.
    update : {"single", "joint", "none"}, optional
        The update of the remaining weights (default ``"single"``, the
        paper's).
    selection_block_size : int, optional
        Prune the same fraction of every block of this many weights instead
        of selecting globally.
    dtype : torch.dtype, optional
        The dtype of the Fisher computations (default: the weights' dtype).
        ``torch.float64`` gives more accurate OBS updates at small damping.

    Attributes
    ----------
    masks : dict of str to torch.Tensor
        The boolean mask of each chosen weight, by module name.

    Raises
    ------
    ValueError
        If the model has no prunable layer or a named layer does not exist
        or has no ``weight``.

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
        damp = check_damp(damp)
        check_choice(saliency, "saliency", ("obs", "obd", "magnitude"))
        check_choice(update, "update", ("single", "joint", "none"))
        self.model = model
        self.num_grads = num_grads
        self.block_size = block_size
        self.damp = damp
        self.saliency = saliency
        self.update = update
        self.selection_block_size = selection_block_size
        self.weights = self._resolve(model, layers)
        first = next(iter(self.weights.values()))
        for name, w in self.weights.items():
            if w.device != first.device or w.dtype != first.dtype:
                raise ValueError(f"all pruned weights must share one device and dtype; "
                                 f"{name} is {w.device}/{w.dtype}, not "
                                 f"{first.device}/{first.dtype}")
        self.device = first.device
        self.dtype = first.dtype if dtype is None else dtype
        self.masks = {name: torch.ones_like(w, dtype=torch.bool)
                      for name, w in self.weights.items()}
        self.dim = sum(w.numel() for w in self.weights.values())

    @staticmethod
    def _resolve(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Parameter]:
        modules = dict(model.named_modules())
        if layers is None:
            found = {name: m.weight for name, m in modules.items() if isinstance(m, _PRUNABLE)}
            if not found:
                raise ValueError("the model has no Linear or Conv layer to prune; name the "
                                 "layers explicitly with layers=[...]")
            return found
        if isinstance(layers, str):
            layers = [layers]
        out = {}
        for name in layers:
            if name not in modules:
                raise ValueError(f"the model has no layer named {name!r}; its layers are "
                                 f"{[n for n in modules if n]}")
            weight = getattr(modules[name], "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise ValueError(f"layer {name!r} has no weight tensor to prune")
            out[name] = weight
        if not out:
            raise ValueError("layers must name at least one layer")
        return out

    # -- flat views -----------------------------------------------------------------------

    def flat_weights(self) -> torch.Tensor:
        """The chosen weights as one flat vector.

        Returns
        -------
        torch.Tensor, shape (d,)
            A copy, in the Fisher's dtype, on the weights' device.
        """
        return torch.cat([w.detach().reshape(-1) for w in self.weights.values()]).to(self.dtype)

    def flat_mask(self) -> torch.Tensor:
        """The masks as one flat vector.

        Returns
        -------
        torch.Tensor of bool, shape (d,)
            ``True`` for the weights that are kept.
        """
        return torch.cat([m.reshape(-1) for m in self.masks.values()])

    @torch.no_grad()
    def _write(self, theta: torch.Tensor, mask: torch.Tensor) -> None:
        offset = 0
        for name, w in self.weights.items():
            n = w.numel()
            w.copy_(theta[offset:offset + n].view(w.shape))
            self.masks[name] = mask[offset:offset + n].reshape(w.shape).clone()
            offset += n
        self.apply_masks()

    def sparsity(self) -> float:
        """The fraction of the chosen weights that is pruned.

        Returns
        -------
        float
            In ``[0, 1)``.
        """
        return 1.0 - float(self.flat_mask().sum()) / self.dim

    # -- gradients ------------------------------------------------------------------------

    def collect_grads(self, loader: Iterable[Any], loss_fn: Callable[[Any, Any], Any],
                      /) -> torch.Tensor:
        """``num_grads`` gradients of the chosen weights, one per batch.

        Batches are ``(inputs, targets)`` pairs; the gradient of
        ``loss_fn(model(inputs), targets)`` is taken with respect to the
        chosen weights and zeroed at pruned coordinates. The loader is
        iterated again from the start if it has fewer batches. The model's
        ``.grad`` fields are cleared.

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
        """
        weights = list(self.weights.values())
        G = torch.empty((self.num_grads, self.dim), dtype=self.dtype, device=self.device)
        mask = self.flat_mask()
        row = 0
        while row < self.num_grads:
            got = False
            for batch in loader:
                got = True
                inputs, targets = batch[0], batch[1]
                with torch.enable_grad():
                    loss = loss_fn(self.model(inputs), targets)
                    grads = torch.autograd.grad(loss, weights, allow_unused=True)
                offset = 0
                for w, g in zip(weights, grads, strict=True):
                    n = w.numel()
                    if g is None:
                        G[row, offset:offset + n] = 0
                    else:
                        G[row, offset:offset + n] = g.reshape(-1)
                    offset += n
                row += 1
                if row == self.num_grads:
                    break
            if not got:
                raise ValueError("the data loader yielded no batches")
        return G * mask.to(G.dtype)

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
    ) -> None:
        """Prune the chosen weights to ``sparsity`` (one shot, or in ``steps`` steps).

        With ``steps > 1`` the gradients are collected again and the inverse
        Fisher rebuilt before each step, at the partially pruned weights
        (the paper's recomputations). Weights pruned earlier stay pruned.

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

        Raises
        ------
        ValueError
            For a sparsity outside ``[0, 1)`` or ``steps < 1``.
        """
        sparsity = check_fraction(sparsity, "sparsity")

        def grad_fn(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            self._write(theta, mask)
            return self.collect_grads(loader, loss_fn)

        result = pruning.gradual_prune(
            self.flat_weights(), grad_fn, sparsity=sparsity, steps=steps, schedule=schedule,
            mask=self.flat_mask(), damp=self.damp, block_size=self.block_size,
            saliency=self.saliency, update=self.update,
            selection_block_size=self.selection_block_size)
        self._write(result.theta, result.mask)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set the pruned weights to zero again (e.g. after an optimizer step)."""
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
