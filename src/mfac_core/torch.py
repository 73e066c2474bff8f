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
factor and every buffer are allocated there once. Both classes log the memory
of their ``num_grads x d`` gradient matrices (logger ``"mfac_core.torch"``,
level ``INFO``) when they allocate them.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import pruning
from ._compat import array_namespace
from ._dynamic import DynamicIHVP
from ._errors import FactorizationError
from ._sharding import reduce_checked
from ._validation import (
    check_choice,
    check_count,
    check_damp,
    check_flag,
    check_fraction,
    check_number,
)
from .distributed import Communicator, TorchComm, check_communicator

__all__ = ["MFAC", "MFACPruner", "MFACStepWarning"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

logger = logging.getLogger("mfac_core.torch")

_GROUP_KEYS = ("lr", "momentum", "weight_decay")
#: Options of the whole optimizer (one window over all parameters), not per group.
_GLOBAL_KEYS = ("num_grads", "damp", "zero_init", "errors", "grad_dtype")
#: Window storage dtypes of MFAC's ``grad_dtype`` besides the parameters' own.
_HALF_GRAD_DTYPES = (torch.float16, torch.bfloat16)


class MFACStepWarning(RuntimeWarning):
    """An :class:`MFAC` step was skipped, or its gradient left out of the window."""


class _Unstorable(Exception):
    """A finite gradient that the window's 2-byte storage would make infinite."""


def _format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{value:.1f} TiB"


def _dtensor_class() -> Any:
    """DTensor's class, or None where this PyTorch has no torch.distributed.tensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return None
    return DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writes reach the DTensor), else ``t``."""
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(t, dtensor):
        return t.to_local()
    return t


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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
    ``wd`` are per parameter group, as in :class:`torch.optim.SGD`;
    ``num_grads``, ``damp``, ``zero_init`` and ``errors`` belong to the one
    window and are the same for all groups (they are in :attr:`defaults`,
    not in the groups).

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups (dicts), as for any
        :class:`torch.optim.Optimizer`. All must be floating tensors on one
        device with one dtype (float32 or float64).
    lr : float, optional
        The learning rate (default ``1e-3``).
    num_grads : int
        The window size m; required, because the window holds ``m * d``
        values of the parameters' dtype (41 GB for m = 1024 and ten million
        float32 parameters). The paper uses 1024. The size is logged when the
        window is allocated (logger ``"mfac_core.torch"``, level ``INFO``).
    damp : float, optional
        The damping ``lambda > 0`` (default ``1e-5``).
    momentum : float, optional
        Momentum on the preconditioned step, in ``[0, 1)`` (default 0: the
        paper uses none).
    weight_decay : float, optional
        L2 penalty added to the gradient before preconditioning (default 0).
    zero_init : bool, optional
        Start from a window of ``m`` zero gradients with the normalisation
        ``1/m`` fixed, as the paper and the authors' implementation do
        (default). Every insertion is then an O(m^2) edit of the factor. With
        ``False`` the normalisation is ``1/k`` for the ``k`` gradients seen so
        far, which makes the first steps ``g / |g|^2``-sized, and each of the
        first m insertions refactorises the k x k factor (O(k^3)).
    errors : {"skip", "raise"}, optional
        What a step does with a gradient it cannot use (default ``"skip"``);
        see Notes.
    grad_dtype : torch.dtype, optional
        The storage dtype of the window: the parameters' dtype (default,
        ``None``), or ``torch.bfloat16`` or ``torch.float16``, which halve
        (float32 parameters) the window's memory, ``2 m d`` bytes. Each
        gradient is then rounded to it once when inserted, the window's Fisher
        is that of the stored gradients, and the step is computed in float32
        (a float64 gradient is first rounded to float32); the parameters keep
        their dtype (docs/mathematics.rst, "2-byte storage"). float16's range
        ends at 65504: a larger gradient entry is not stored (see Notes);
        bfloat16 has float32's range.
    comm : Communicator, optional
        Shard the window by columns over the processes of ``comm`` (usually
        ``mfac_core.distributed.TorchComm(group)``), for parameters replicated
        on every rank with the same gradient, as under
        :class:`~torch.nn.parallel.DistributedDataParallel`. Parameters that are
        DTensors sharded on dimension 0 (``torch.distributed.fsdp.fully_shard``)
        need no ``comm``: the optimizer uses their device mesh's group. See
        "Distributed training" in the documentation and Notes. Not with a
        2-byte ``grad_dtype``.

    Attributes
    ----------
    ihvp : DynamicIHVP
        The window and its factorisation (distributed: this rank's columns).
    dim : int
        The number of coordinates d (over all ranks).
    num_grads, damp : int, float
        The window's size m and damping (read-only; see
        :meth:`load_state_dict` to change the damping).
    steps : int
        Steps taken (parameters moved).
    skipped_steps : int
        Steps skipped because the gradient or the step was not finite.
    rejected_grads : int
        Gradients left out of the window (their step was taken with the
        previous window).

    Raises
    ------
    ValueError
        For parameters on different devices or with different dtypes, no
        parameters, or out-of-range hyper-parameters.
    TypeError
        For non-floating parameters, or without ``num_grads``.

    Warns
    -----
    MFACStepWarning
        With ``errors="skip"``, for every skipped step and every gradient
        left out of the window.

    Notes
    -----
    Parameters whose ``grad`` is ``None`` in a step contribute zeros to the
    flat gradient and are not moved in that step (their momentum buffer still
    decays). A step reads the ``m x d`` window twice, the floor of the
    dynamic algorithm; see :meth:`DynamicIHVP.update_and_matvec`. Gradients
    never enter autograd: the window, the momentum and the step are computed
    without recording history even if the gradients require grad (e.g. after
    ``backward(create_graph=True)``).

    A training run does not die of a bad gradient, as with AMP's
    ``GradScaler``:

    - A gradient (after weight decay) holding NaN or infinity skips the
      step: parameters, momentum, window and :attr:`steps` are untouched,
      :attr:`skipped_steps` counts it and a :class:`MFACStepWarning` names the
      parameter. So does a finite gradient whose preconditioned step is not
      finite (the gradient then stays in the window).
    - A gradient that cannot be inserted because the window's Fisher would
      not be numerically positive definite, or (with a float16
      ``grad_dtype``) because an entry exceeds float16's range (a
      :class:`~mfac_core.FactorizationError`, e.g. a gradient repeated exactly
      with a tiny ``damp``) is left out of the window, which is unchanged,
      and the step is taken with the previous window: ``s = F^{-1} g`` of the
      window without ``g``, which is still a valid preconditioner: the
      gradient is used for the step, only not stored (skipping would discard
      it). :attr:`rejected_grads` counts these steps.

    With ``errors="raise"`` both raise instead (``FloatingPointError``,
    ``FactorizationError``, or the window's ``ValueError`` for a gradient
    beyond float16's range) and the optimizer is left as it was, except that a
    non-finite step of a finite gradient leaves that gradient in the window.

    Distributed (``comm``, or DTensor parameters), each rank's window holds
    its columns of the gradients (``m d / p`` values): under DDP the rank's
    :func:`torch.chunk` of the flat gradient, whose step is then all-gathered
    (``d`` numbers per step, next to the window's one reduction of ``m + 20``:
    the Gram row and a status word); with DTensor parameters the local shards
    of the gradients, and each rank moves its own shards (nothing is
    gathered; one more reduction of one number says whether the step is
    finite everywhere). Every decision is
    collective: a NaN on one rank skips (or raises on) every rank, a
    gradient the window cannot take is left out on every rank. The state
    holds this rank's window and momentum under
    ``state["mfac"]["shards"]["rank{r}_of_{p}"]`` (tensors of fixed shapes,
    so that :mod:`torch.distributed.checkpoint` saves every rank's shard and
    loads into the state_dict of a fresh optimizer) and loads only at the
    same world size, on the rank that saved it. A distributed optimizer
    cannot be pickled or copied.

    :meth:`state_dict` holds the window (gradients, Gram matrix and Cholesky
    factor), the momentum buffer, the step count and the two counters, so
    that a run restored from a checkpoint continues bit for bit;
    :meth:`load_state_dict` can also resume it with another damping. An
    optimizer can be copied with :func:`copy.deepcopy` (with its model, as
    ``copy.deepcopy((model, opt))``) and pickled; the copy continues exactly
    as the original would. Hooks are not copied, as for every
    :class:`torch.optim.Optimizer`.

    Examples
    --------
    >>> import torch
    >>> from mfac_core.torch import MFAC
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(4, 1)
    >>> X, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> opt = MFAC(model.parameters(), lr=1e-3, num_grads=8, damp=1e-2)
    >>> opt.defaults["num_grads"], opt.defaults["damp"]
    (8, 0.01)
    >>> first = torch.nn.functional.mse_loss(model(X), y).item()
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     torch.nn.functional.mse_loss(model(X), y).backward()
    ...     opt.step()
    >>> torch.nn.functional.mse_loss(model(X), y).item() < first
    True
    >>> opt.steps, opt.skipped_steps, opt.rejected_grads
    (20, 0, 0)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        num_grads: int,
        damp: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        zero_init: bool = True,
        errors: str = "skip",
        grad_dtype: torch.dtype | None = None,
        comm: Communicator | None = None,
    ) -> None:
        lr = check_number(lr, "lr", low=0.0)
        momentum = check_number(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        weight_decay = check_number(weight_decay, "weight_decay", low=0.0)
        num_grads = check_count(num_grads, "num_grads")
        damp = check_damp(damp)
        check_choice(errors, "errors", ("skip", "raise"))
        self._frozen = False
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self._frozen = True
        # Added after the groups exist, so that add_param_group does not copy these
        # window-wide options into every group (where changing them would do nothing).
        self.defaults.update(
            num_grads=int(num_grads),
            damp=damp,
            zero_init=check_flag(zero_init, "zero_init"),
            errors=errors,
            grad_dtype=grad_dtype,
        )
        self._comm: Communicator | None = None if comm is None else check_communicator(comm)
        self._layout()
        self.ihvp = self._new_window(damp)
        self._momentum: torch.Tensor | None = None
        self.steps = 0
        self.skipped_steps = 0
        self.rejected_grads = 0

    # -- construction ---------------------------------------------------------------------

    def _layout(self) -> None:
        """Check the parameters and map each to its slice of the flat vector."""
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
                    f"one dtype, got {first.device}/{first.dtype} and {p.device}/{p.dtype}"
                )
        self.device, self.dtype = first.device, first.dtype
        self._sharded = self._check_dtensors(flat)
        self._slices: list[list[tuple[torch.Tensor, int, int]]] = []
        offset = 0
        for group in self.param_groups:
            layout = []
            for p in group["params"]:
                n = _local(p).numel()
                layout.append((p, offset, offset + n))
                offset += n
            self._slices.append(layout)
        # d counts every coordinate; sharded parameters hold ``offset`` of them here.
        self.dim = sum(p.numel() for p in flat) if self._sharded else offset
        # The flat gradient (this rank's shards of it, sharded), reused by every step.
        self._grad = torch.zeros(offset, dtype=self.dtype, device=self.device)
        self._columns = self._window_columns(offset)
        grad_dtype = self.defaults.get("grad_dtype")
        if grad_dtype is not None and grad_dtype not in (*_HALF_GRAD_DTYPES, self.dtype):
            raise TypeError(
                f"grad_dtype must be None (the parameters' dtype, {self.dtype}), "
                f"torch.bfloat16 or torch.float16, got {grad_dtype!r}"
            )
        if grad_dtype in _HALF_GRAD_DTYPES and self._comm is not None:
            raise ValueError(
                f"grad_dtype={grad_dtype} is not available for a distributed optimizer "
                "(comm= or DTensor parameters): store the window in the parameters' dtype"
            )
        #: The window's storage dtype.
        self.grad_dtype: torch.dtype = self.dtype if grad_dtype is None else grad_dtype

    def _check_dtensors(self, flat: list[torch.Tensor]) -> bool:
        """Whether the parameters are DTensors sharded on dimension 0 (FSDP2); sets the comm."""
        dtensor = _dtensor_class()
        kinds = {dtensor is not None and isinstance(p, dtensor) for p in flat}
        if kinds == {False}:
            return False
        from torch.distributed.tensor import Shard

        meshes = {id(p.device_mesh) for p in flat if isinstance(p, dtensor)}
        mesh = flat[0].device_mesh  # type: ignore[attr-defined]
        if len(kinds) > 1 or len(meshes) > 1 or mesh.ndim != 1:
            raise ValueError(
                "MFAC over DTensor parameters needs all parameters to be DTensors of one "
                "1-D device mesh (as torch.distributed.fsdp.fully_shard makes them)"
            )
        for p in flat:
            if tuple(p.placements) != (Shard(0),):  # type: ignore[attr-defined]
                raise ValueError(
                    "MFAC over DTensor parameters needs them sharded on dimension 0 "
                    f"(placements (Shard(0),)), got {tuple(p.placements)}"  # type: ignore[attr-defined]
                )
        if self._comm is None:
            self._comm = TorchComm(mesh.get_group())
        elif (self._comm.rank, self._comm.size) != (mesh.get_local_rank(), mesh.size()):
            raise ValueError(
                f"comm is rank {self._comm.rank} of {self._comm.size}, but the parameters' "
                f"device mesh has this process at {mesh.get_local_rank()} of {mesh.size()}"
            )
        return True

    def _window_columns(self, width: int) -> tuple[int, int]:
        """The columns of the flat gradient this rank's window holds.

        Replicated parameters (DDP) with ``comm``: this rank's chunk, as
        :func:`torch.chunk` splits the d coordinates (as DTensor's ``Shard``); otherwise
        every coordinate of the flat (local) gradient.
        """
        if self._comm is None or self._sharded:
            return 0, width
        size, rank = self._comm.size, self._comm.rank
        chunk = -(-width // size)
        return min(rank * chunk, width), min((rank + 1) * chunk, width)

    def _log_window(self, damp: float) -> None:
        m, d = self.defaults["num_grads"], self._columns[1] - self._columns[0]
        window = m * d * _itemsize(self.grad_dtype)
        # The Gram matrix and the two factor buffers the core keeps once the window is full.
        small = 3 * m * m * 8
        logger.info(
            "MFAC allocates a window of num_grads=%d x dim=%d %s on %s (damp=%g): "
            "%d bytes (%s), plus %d bytes (%s) of float64 m x m matrices",
            m,
            d,
            str(self.grad_dtype).removeprefix("torch."),
            self.device,
            damp,
            window,
            _format_bytes(window),
            small,
            _format_bytes(small),
        )

    def _new_window(self, damp: float) -> DynamicIHVP:
        self._log_window(damp)
        lo, hi = self._columns
        return DynamicIHVP(
            self.defaults["num_grads"],
            hi - lo,
            damp=damp,
            dtype=self.grad_dtype,
            xp=array_namespace(self._grad),
            device=self.device,
            zero_init=self.defaults["zero_init"],
            comm=self._comm,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; possible only while the optimizer is being built.

        The window's dimension d is fixed once the optimizer exists, so adding
        parameters later raises ``ValueError``.

        Parameters
        ----------
        param_group : dict
            The group, as for :meth:`torch.optim.Optimizer.add_param_group`.

        Raises
        ------
        ValueError
            After construction, or for an out-of-range ``lr``, ``momentum`` or
            ``weight_decay`` of the group.
        """
        if getattr(self, "_frozen", False):
            raise ValueError(
                "MFAC cannot add parameter groups after construction: the "
                "window's dimension is fixed; build a new optimizer instead"
            )
        for key in _GLOBAL_KEYS:
            if isinstance(param_group, Mapping) and key in param_group:
                raise ValueError(
                    f"{key} is an option of the whole MFAC optimizer (one window "
                    "over all parameters), not of a parameter group"
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group, "the parameter group")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_group(group: Mapping[str, Any], where: str) -> None:
        for key in _GROUP_KEYS:
            if key not in group:
                raise ValueError(f"{where} has no {key!r}")
            if key == "momentum":
                check_number(group[key], f"{key} of {where}", low=0.0, high=1.0, high_open=True)
            else:
                check_number(group[key], f"{key} of {where}", low=0.0)

    # -- properties -----------------------------------------------------------------------

    @property
    def num_grads(self) -> int:
        """The window size m."""  # numpydoc ignore=RT01
        return self.ihvp.num_grads

    @property
    def damp(self) -> float:
        """The damping lambda of the window."""  # numpydoc ignore=RT01
        return self.ihvp.damp

    def __repr__(self) -> str:
        head = ", ".join(f"{key}: {self.defaults[key]!r}" for key in _GLOBAL_KEYS)
        base = super().__repr__()
        name = type(self).__name__ + " ("
        return f"{name}{head}, dim: {self.dim}{base[len(name) :]}"

    # -- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one M-FAC step (or skip it; see the class's Notes).

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (computed with
            gradients enabled).

        Returns
        -------
        object
            The loss returned by ``closure``, or ``None``.

        Raises
        ------
        FloatingPointError
            With ``errors="raise"``, for a gradient or a step holding NaN or
            infinity.
        FactorizationError
            With ``errors="raise"``, for a gradient the window cannot take.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g = self._gather()
        if self._comm is not None:
            self._distributed_step(g)
            return loss
        # One reduction and one host sync per step, next to two passes over m x d.
        if not bool(torch.isfinite(g).all()):
            self._skip(
                f"{self._culprit()} holds NaN or infinity; the step is skipped "
                "(parameters, momentum and window unchanged)"
            )
            return loss
        if g.dtype != self.ihvp.dtype:
            g = g.to(self.ihvp.dtype)  # float64 gradients for a 2-byte window: float32 steps
        try:
            if self.defaults["errors"] == "skip" and not self._fits_window(g):
                raise _Unstorable(
                    f"an entry of the gradient ({float(g.abs().max()):g}) is beyond the "
                    f"range of the window's {str(self.grad_dtype).removeprefix('torch.')}"
                )
            s = self.ihvp.update_and_matvec(g)
        except (FactorizationError, _Unstorable) as exc:
            if self.defaults["errors"] == "raise":
                raise
            # The core leaves the window as it was; precondition with it.
            self._left_out(exc)
            s = self.ihvp.matvec(g)
        if not bool(torch.isfinite(s).all()):
            self._skip(
                "the preconditioned step holds NaN or infinity (damp too small for "
                "the dtype?); the step is skipped (parameters and momentum unchanged)"
            )
            return loss
        self._apply(s.to(self.dtype))
        self.steps += 1
        return loss

    def _left_out(self, exc: Exception) -> None:
        """Count and report a gradient the window could not take (``errors="skip"``)."""
        self.rejected_grads += 1
        self._warn(
            f"the gradient was left out of the window and the step taken with the "
            f"previous window ({self.rejected_grads} so far): {exc}"
        )

    def _fits_window(self, g: torch.Tensor) -> bool:
        """Whether a finite gradient stays finite when rounded to the window's dtype."""
        if self.grad_dtype not in _HALF_GRAD_DTYPES:
            return True
        return bool(torch.isfinite(g.to(self.grad_dtype)).all())

    def _distributed_step(self, g: torch.Tensor) -> None:
        """The step across processes: every rank decides alike (see the class's Notes)."""
        lo, hi = self._columns
        x = g[lo:hi]
        try:
            s = self.ihvp.update_and_matvec(x)
        except FactorizationError as exc:  # decided from reduced numbers: on every rank
            if self.defaults["errors"] == "raise":
                raise
            self._left_out(exc)
            s = self.ihvp.matvec(x)
        except ValueError:
            # The window checks its shard inside the reduction of the Gram row, so a NaN
            # or infinity on any rank raises on every rank, and the window is kept.
            where = (
                self._culprit()
                if not bool(torch.isfinite(x).all())
                else "the gradient on another rank"
            )
            self._skip(
                f"{where} holds NaN or infinity; the step is skipped (parameters, momentum "
                "and window unchanged)"
            )
            return
        if self._sharded:
            # Each rank moves its own shards, so whether the step is finite is collective.
            bad = torch.tensor([float(not bool(torch.isfinite(s).all()))], dtype=torch.float64)
            finite = float(self._comm.allreduce_sum(bad.to(self.device))[0]) == 0.0  # type: ignore[union-attr]
        else:
            s = self._all_gather(s)
            finite = bool(torch.isfinite(s).all())  # the same s on every rank
        if not finite:
            self._skip(
                "the preconditioned step holds NaN or infinity (damp too small for "
                "the dtype?); the step is skipped (parameters and momentum unchanged)"
            )
            return
        self._apply(s)
        self.steps += 1

    def _all_gather(self, s: torch.Tensor) -> torch.Tensor:
        """The whole step from every rank's chunk (DDP): one all-gather of d numbers."""
        comm = self._comm
        assert comm is not None
        d, size = self.dim, comm.size
        chunk = -(-d // size)
        lo, hi = self._columns
        if isinstance(comm, TorchComm):
            import torch.distributed as dist

            padded = torch.zeros(chunk, dtype=s.dtype, device=s.device)
            padded[: hi - lo] = s
            out = torch.empty(chunk * size, dtype=s.dtype, device=s.device)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(out, padded, group=comm.group)
            return out[:d]
        # Any other communicator: a sum in which each entry is one rank's value plus zeros.
        full = torch.zeros(d, dtype=s.dtype, device=s.device)
        full[lo:hi] = s
        return comm.allreduce_sum(full)

    def _gather(self) -> torch.Tensor:
        """The flat gradient, weight decay included, in the reused buffer."""
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
                seg.copy_(_local(p.grad).reshape(-1))
                if wd:
                    seg.add_(_local(p.detach()).reshape(-1), alpha=wd)
        return g

    def _culprit(self) -> str:
        """Which parameter made the flat gradient non-finite (for the message)."""
        for j, layout in enumerate(self._slices):
            for i, (p, lo, hi) in enumerate(layout):
                if not bool(torch.isfinite(self._grad[lo:hi]).all()):
                    what = (
                        "gradient"
                        if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all())
                        else "weight-decayed gradient"
                    )
                    return f"the {what} of parameter {i} of group {j} (shape {tuple(p.shape)})"
        return "the gradient"

    def _skip(self, message: str) -> None:
        if self.defaults["errors"] == "raise":
            raise FloatingPointError(f"MFAC step {self.steps + 1}: {message}")
        self.skipped_steps += 1
        self._warn(f"{message} ({self.skipped_steps} skipped so far)")

    def _warn(self, message: str) -> None:
        # Point at the caller of opt.step(), past this module and torch's wrappers of step
        # (no_grad, hooks, profiling), whose depth depends on torch's version.
        frame, level = sys._getframe(0), 1
        while frame.f_back is not None and (
            frame.f_globals.get("__name__") == __name__
            or str(frame.f_globals.get("__name__")).startswith("torch.")
        ):
            frame, level = frame.f_back, level + 1
        warnings.warn(f"MFAC step {self.steps + 1}: {message}", MFACStepWarning, stacklevel=level)

    def _apply(self, s: torch.Tensor) -> None:
        if self._momentum is None and any(gr["momentum"] for gr in self.param_groups):
            self._momentum = torch.zeros_like(s)
        momentum = self._momentum
        for group, layout in zip(self.param_groups, self._slices, strict=True):
            lr, mu = group["lr"], group["momentum"]
            for p, lo, hi in layout:
                d_p = s[lo:hi]
                if mu and momentum is not None:
                    buf = momentum[lo:hi]
                    buf.mul_(mu).add_(d_p)
                    d_p = buf
                if p.grad is not None:
                    local = _local(p)
                    local.add_(d_p.view(local.shape), alpha=-lr)

    # -- checkpoints ----------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {
            "window": self.ihvp.state_dict(),
            "momentum_buffer": None if self._momentum is None else self._momentum.clone(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "rejected_grads": self.rejected_grads,
        }

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, including the M-FAC window.

        Returns
        -------
        dict
            :meth:`torch.optim.Optimizer.state_dict` plus a key ``"mfac"``
            holding copies of the window's state
            (:meth:`DynamicIHVP.state_dict`), the momentum buffer, the step
            count and the counters ``skipped_steps`` and ``rejected_grads``.
        """
        state = super().state_dict()
        extra = self._extra_state()
        if self._comm is not None:
            # Under a key naming the rank and the world size: torch.distributed.checkpoint
            # keeps one copy of a key that every rank saves, and this shard is the rank's own.
            # Every tensor has the shape it had at construction, so that the state_dict of
            # a fresh optimizer is a template that dcp.load can fill in place.
            window = dict(extra.pop("window"))
            m = self.ihvp.num_grads
            factor = window["factor"].new_zeros((m, m))
            k = window["factor"].shape[0]
            factor[:k, :k] = window["factor"]
            window["factor"] = factor
            momentum = extra.pop("momentum_buffer")
            if momentum is None:  # a zero buffer steps exactly as no buffer
                momentum = torch.zeros_like(self._grad)
            shard = {"window": window, "momentum_buffer": momentum}
            extra.update(window=None, momentum_buffer=None, shards={self._shard_key: shard})
        state["mfac"] = extra
        return state

    @property
    def _shard_key(self) -> str:
        comm = self._comm
        assert comm is not None
        return f"rank{comm.rank}_of_{comm.size}"

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any], *, damp: float | None = None) -> None:
        """Restore a state from :meth:`state_dict`, window included.

        Everything is checked before anything changes: a state that cannot
        be loaded raises and leaves the optimizer exactly as it was.

        Parameters
        ----------
        state_dict : dict
            From :meth:`state_dict` of an MFAC optimizer with the same
            ``num_grads``, ``zero_init``, dtype and parameter sizes. Tensors
            are moved to this optimizer's device; none keeps autograd
            history.
        damp : float, optional
            Resume with this damping. Without it the state's damping must
            equal the optimizer's. With a damping other than the state's,
            the window's factor is recomputed from its gradients
            from the stored Gram matrix (O(m^3), no pass over the window and no
            extra ``m x d`` buffer); the continuation then differs from the
            original run.

        Raises
        ------
        ValueError
            If the state is not an MFAC state of matching sizes, or a value
            in it is missing, of the wrong type or out of range.
        FactorizationError
            If the window cannot be factorised with the new ``damp``.
        """
        if self._comm is None:
            plan = self._check_state(state_dict, damp)
        else:
            plan = self._check_distributed_state(state_dict, damp)
        # Commit. The core's loader checks its state before it changes anything, and
        # a new damping's refactorisation is its one step that may still raise: first.
        self.ihvp.load_state_dict(plan.window, damp=plan.damp)
        super().load_state_dict(plan.base)
        self.defaults["damp"] = self.ihvp.damp
        self._momentum = plan.momentum
        self.steps = plan.steps
        self.skipped_steps = plan.skipped_steps
        self.rejected_grads = plan.rejected_grads

    def _check_state(
        self, state_dict: Any, damp: float | None, *, window: bool = True
    ) -> SimpleNamespace:
        """Check a state for :meth:`load_state_dict`: what to commit; nothing changes here.

        Without ``window`` the window's state is not checked (the caller does).
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"not an MFAC state_dict: expected a dict, got {type(state_dict).__name__}"
            )
        missing = [k for k in ("state", "param_groups", "mfac") if k not in state_dict]
        if missing:
            raise ValueError(
                f"not an MFAC state_dict: it has no {missing} (the 'mfac' entry holds the window)"
            )
        base = {k: v for k, v in state_dict.items() if k != "mfac"}
        self._check_groups(base)
        extra = state_dict["mfac"]
        if not isinstance(extra, Mapping):
            raise ValueError("state_dict['mfac'] must be a dict")
        if window and extra.get("shards") is not None:
            raise ValueError(
                f"state_dict['mfac'] holds the shards {sorted(extra['shards'])} of a distributed "
                "MFAC optimizer; this one was built without comm (and its parameters are not "
                "DTensors): load it into an optimizer of the same world size"
            )
        missing = [k for k in ("window", "momentum_buffer", "steps") if k not in extra]
        if missing:
            raise ValueError(f"state_dict['mfac'] has no {missing}")
        counts = {}
        for key in ("steps", "skipped_steps", "rejected_grads"):
            value = extra.get(key, 0)  # the counters are absent from older checkpoints
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict['mfac'][{key!r}] must be an int >= 0, got {value!r}")
            counts[key] = int(value)
        momentum = self._check_momentum(extra["momentum_buffer"])
        if not window:
            return SimpleNamespace(base=base, window=None, damp=None, momentum=momentum, **counts)
        state, target = self._check_window(extra["window"], damp)
        return SimpleNamespace(base=base, window=state, damp=target, momentum=momentum, **counts)

    def _check_distributed_state(self, state_dict: Any, damp: float | None) -> SimpleNamespace:
        """:meth:`_check_state` for a distributed optimizer, with collective errors.

        This rank's entry of ``shards`` is taken as the window and momentum; the
        checks of this rank's part run inside one reduction of a status word, so
        that every rank raises if one rank's state is bad, before the window's own
        (collective) checks run.
        """
        comm = self._comm
        assert comm is not None
        flat: list[Any] = []

        def local() -> torch.Tensor:
            if not isinstance(state_dict, Mapping) or not isinstance(
                state_dict.get("mfac"), Mapping
            ):
                raise ValueError("not an MFAC state_dict: it has no 'mfac' entry")
            shards = state_dict["mfac"].get("shards")
            if not isinstance(shards, Mapping):
                raise ValueError(
                    "state_dict['mfac'] has no 'shards': it is the state of an MFAC optimizer "
                    "without comm; this one is distributed"
                )
            if self._shard_key not in shards:
                raise ValueError(
                    f"state_dict['mfac']['shards'] holds {sorted(shards)}, not "
                    f"{self._shard_key!r}: a distributed MFAC state loads only at the world "
                    "size that saved it, each rank its own shard"
                )
            shard = shards[self._shard_key]
            if not isinstance(shard, Mapping):
                raise ValueError(
                    f"state_dict['mfac']['shards'][{self._shard_key!r}] must be a dict"
                )
            mfac = {k: v for k, v in state_dict["mfac"].items() if k != "shards"}
            window = shard.get("window")
            if isinstance(window, Mapping) and isinstance(window.get("factor"), torch.Tensor):
                k = len(window.get("window_slots") or ())
                window = {**window, "factor": window["factor"][:k, :k]}
            flat.append({**state_dict, "mfac": {**mfac, **shard, "window": window}})
            flat.append(self._check_state(flat[0], damp, window=False))
            return torch.zeros(0, dtype=torch.float64, device=self.device)

        reduce_checked(
            comm,
            array_namespace(self._grad),
            local,
            length=0,
            dtype=torch.float64,
            device=self.device,
            what="MFAC.load_state_dict",
            tag=1,
        )
        plan = flat[1]
        # The window's checks are collective themselves.
        plan.window, plan.damp = self._check_window(flat[0]["mfac"]["window"], damp)
        return plan

    def _check_groups(self, base: Mapping[str, Any]) -> None:
        if not isinstance(base["state"], Mapping):
            raise ValueError("state_dict['state'] must be a dict")
        groups = base["param_groups"]
        if (
            not isinstance(groups, Sequence)
            or isinstance(groups, str)
            or len(groups) != len(self.param_groups)
        ):
            have = len(groups) if isinstance(groups, Sequence) else groups
            raise ValueError(
                f"state_dict['param_groups'] must list {len(self.param_groups)} "
                f"parameter groups, got {have!r}"
            )
        ids = []
        for j, (saved, group) in enumerate(zip(groups, self.param_groups, strict=True)):
            where = f"state_dict['param_groups'][{j}]"
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), Sequence):
                raise ValueError(f"{where} must be a dict with a list 'params'")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{where} has {len(saved['params'])} parameters, this "
                    f"optimizer's group {len(group['params'])}"
                )
            try:
                self._check_group(saved, where)
            except TypeError as exc:  # one kind of error for every malformed state
                raise ValueError(str(exc)) from None
            ids.extend(saved["params"])
        if len(set(ids)) != len(ids):
            raise ValueError("state_dict['param_groups'] lists a parameter twice")

    def _check_momentum(self, buf: Any) -> torch.Tensor | None:
        if buf is None:
            return None
        # Sharded parameters keep the momentum of their local shards only.
        n = self._grad.shape[0]
        if (
            not isinstance(buf, torch.Tensor)
            or not buf.is_floating_point()
            or tuple(buf.shape) != (n,)
        ):
            shape = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
            raise ValueError(
                f"the momentum buffer must be a floating tensor of shape ({n},), got {shape}"
            )
        # A copy, detached: the buffer is updated in place and must not join a graph.
        buf = buf.detach().to(device=self.device, dtype=self.dtype, copy=True)
        if not bool(torch.isfinite(buf).all()):
            raise ValueError("the momentum buffer holds NaN or infinity")
        return buf

    def _check_window(self, window: Any, damp: float | None) -> tuple[dict[str, Any], float | None]:
        """The window's state on this device, checked by the core (nothing changes here).

        Returns the state and the damping to load it with (``None``: its own).
        """
        where = "state_dict['mfac']['window']"
        if not isinstance(window, Mapping):
            raise ValueError(f"{where} must be a dict")
        # Tensors to this device; the core detaches them, and checks everything else.
        out = {
            k: v.to(device=self.device) if isinstance(v, torch.Tensor) else v
            for k, v in window.items()
        }
        target = None if damp is None else check_damp(damp)
        try:
            self.ihvp.check_state_dict(out, damp=target)
        except (TypeError, ValueError) as exc:  # one kind of error for every malformed state
            raise ValueError(f"{where}: {exc}") from None
        return out, target

    # -- copies and pickles ---------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; the
        # window goes as its state_dict (plain tensors), because DynamicIHVP holds its
        # array namespace, a module, which neither pickle nor deepcopy can copy.
        if getattr(self, "_comm", None) is not None:
            raise TypeError(
                "a distributed MFAC optimizer (comm=, or DTensor parameters) cannot be "
                "pickled or copied: it belongs to a process group; save state_dict() "
                "(e.g. with torch.distributed.checkpoint) instead"
            )
        state = super().__getstate__()
        state["_mfac"] = self._extra_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        extra = state.pop("_mfac", None)
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        had_flag = "differentiable" in defaults
        super().__setstate__(state)
        if not had_flag:
            # torch adds this for pickles of its own old optimizers; MFAC has no
            # differentiable mode, and keeping defaults as built makes copies equal.
            self.defaults.pop("differentiable", None)
        if extra is None:  # torch's load_state_dict sets the groups through here
            return
        with torch.no_grad():
            self._frozen = True
            self._comm = None
            self._layout()
            self.ihvp = self._new_window(extra["window"]["damp"])
            window, _ = self._check_window(extra["window"], None)
            self.ihvp.load_state_dict(window)
            self._momentum = self._check_momentum(extra["momentum_buffer"])
            self.steps = extra["steps"]
            self.skipped_steps = extra["skipped_steps"]
            self.rejected_grads = extra["rejected_grads"]


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
        ``torch.float64`` gives more accurate OBS updates at small damping;
        ``torch.float16`` or ``torch.bfloat16`` store the gradients in 2 bytes
        (half the memory of float32) and compute in float32, with float32
        weights (:mod:`mfac_core.pruning`'s 2-byte gradients).

    Attributes
    ----------
    masks : dict of str to torch.Tensor
        The boolean mask of each chosen weight, by module name.
    selected_damps : list of float
        The damping chosen at each step of the last :meth:`prune` with a
        grid of ``dampings`` (empty before).

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
        if isinstance(num_grads, bool) or not isinstance(num_grads, int) or num_grads < 1:
            raise ValueError(f"num_grads must be an int >= 1, got {num_grads!r}")
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
                raise ValueError(
                    f"all pruned weights must share one device and dtype; "
                    f"{name} is {w.device}/{w.dtype}, not "
                    f"{first.device}/{first.dtype}"
                )
        self.device = first.device
        self.dtype = first.dtype if dtype is None else dtype
        # 2-byte gradients go with float32 weights through the pruning functions.
        self._theta_dtype = (
            torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        )
        self.masks = {
            name: torch.ones_like(w, dtype=torch.bool) for name, w in self.weights.items()
        }
        self.dim = sum(w.numel() for w in self.weights.values())
        self.selected_damps: list[float] = []

    @staticmethod
    def _resolve(model: nn.Module, layers: Sequence[str] | None) -> dict[str, torch.Tensor]:
        modules = dict(model.named_modules())
        if layers is None:
            found = {name: m.weight for name, m in modules.items() if isinstance(m, _PRUNABLE)}
            if not found:
                raise ValueError(
                    "the model has no Linear or Conv layer to prune; name the "
                    "layers explicitly with layers=[...]"
                )
            return found
        if isinstance(layers, str):
            layers = [layers]
        out = {}
        for name in layers:
            if name not in modules:
                raise ValueError(
                    f"the model has no layer named {name!r}; its layers are "
                    f"{[n for n in modules if n]}"
                )
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
        return torch.cat([m.reshape(-1) for m in self.masks.values()])

    @torch.no_grad()
    def _write(self, theta: torch.Tensor, mask: torch.Tensor) -> None:
        offset = 0
        for name, w in self.weights.items():
            n = w.numel()
            w.copy_(theta[offset : offset + n].view(w.shape))
            self.masks[name] = mask[offset : offset + n].reshape(w.shape).clone()
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

    def collect_grads(
        self, loader: Iterable[Any], loss_fn: Callable[[Any, Any], Any], /
    ) -> torch.Tensor:
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
        size = self.num_grads * self.dim * _itemsize(self.dtype)
        logger.info(
            "MFACPruner allocates num_grads=%d x dim=%d %s gradients on %s: %d bytes (%s)",
            self.num_grads,
            self.dim,
            str(self.dtype).removeprefix("torch."),
            self.device,
            size,
            _format_bytes(size),
        )
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
                        G[row, offset : offset + n] = 0
                    else:
                        G[row, offset : offset + n] = g.reshape(-1)
                    offset += n
                row += 1
                if row == self.num_grads:
                    break
            if not got:
                raise ValueError("the data loader yielded no batches")
        # In place (no second m x d array); the pruning functions zero them again.
        return G.masked_fill_(~mask, 0)

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
            For a sparsity outside ``[0, 1)``, ``steps < 1``, only one of
            ``dampings`` and ``select_damp``, or a non-finite held-out loss.
        TypeError
            For a ``select_damp`` that returns something other than a real
            number.

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
        if (dampings is None) != (select_damp is None):
            raise ValueError("give both dampings (the grid) and select_damp (the held-out loss)")
        before = (
            {name: w.detach().clone() for name, w in self.weights.items()},
            {name: m.clone() for name, m in self.masks.items()},
        )
        # The candidates of the current step, and the damping select_damping chose at
        # each step: the one whose result object it returned (no second argmin here).
        candidates: list[tuple[pruning.PruneResult, float]] = []
        chosen: list[float] = []

        def grad_fn(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            self._write(theta, mask)
            return self.collect_grads(loader, loss_fn)

        def held_out(damp: float, result: pruning.PruneResult) -> Any:
            self._write(result.theta, result.mask)
            assert select_damp is not None
            candidates.append((result, damp))
            return select_damp(self.model)

        def step_done(step: int, result: pruning.PruneResult) -> None:
            chosen.append(next(damp for r, damp in candidates if r is result))
            candidates.clear()

        try:
            result = pruning.gradual_prune(
                self.flat_weights(),
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
            self._write(result.theta, result.mask)
        except BaseException:
            self._restore(*before)
            raise
        if dampings is not None:
            self.selected_damps = chosen

    @torch.no_grad()
    def _restore(self, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        for name, w in self.weights.items():
            w.copy_(weights[name])
            self.masks[name] = masks[name]

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
