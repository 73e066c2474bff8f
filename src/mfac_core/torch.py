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

import copy
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import pruning
from ._compat import array_namespace
from ._dynamic import DynamicIHVP
from ._errors import FactorizationError, user_stacklevel
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
#: Parameter dtypes MFAC steps (2-byte ones in float32).
_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: What MFAC._layout sets (restored when adding a parameter group fails).
_LAYOUT_ATTRS = (
    *("_first", "dtype", "device", "_sharded", "_slices"),
    *("dim", "_grad", "_columns", "grad_dtype"),
)
#: The keys of MFAC's state entry (on its first parameter); "window" only in state_dict().
_ENTRY_KEYS = ("momentum_buffer", "steps", "skipped_steps", "rejected_grads")


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


def _fresh_entry(grad: torch.Tensor) -> dict[str, Any]:
    """MFAC's state entry before the first step: a zero momentum buffer, zero counters."""
    return {
        "momentum_buffer": torch.zeros_like(grad),
        "steps": 0,
        "skipped_steps": 0,
        "rejected_grads": 0,
    }


def _check_lr(lr: Any, where: str) -> Any:
    """A learning rate >= 0: a real number (as a float), or a one-element floating tensor.

    A tensor is kept (as torch's optimizers keep it), so that a scheduler or the user can
    change it in place; its value is read here once, to check it.
    """
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point() or lr.requires_grad:
            raise ValueError(
                f"Tensor lr must be 1-element: {where} as a tensor must be a one-element floating "
                "tensor without grad, "
                f"got shape {tuple(lr.shape)}, dtype {lr.dtype}"
            )
        check_number(float(lr), where, low=0.0)
        return lr
    return check_number(lr, where, low=0.0)


def _merged(a: Any, b: Any) -> Any:
    """``b`` over ``a``, merging dicts key by key (nothing is modified)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merged(a.get(k), v)
        return out
    return b


def _move(local: torch.Tensor, d_p: torch.Tensor, lr: Any) -> None:
    """``theta -= lr * d_p``, computed in the step's dtype and rounded to the parameter's once."""
    step = d_p.view(local.shape)
    wide = local if local.dtype == step.dtype else local.to(step.dtype)
    if isinstance(lr, torch.Tensor):
        wide.addcmul_(step, lr.to(step.dtype), value=-1)
    else:
        wide.add_(step, alpha=-lr)
    if wide is not local:
        local.copy_(wide)


_EAGER_STEP: dict[str, Callable[..., Any]] = {}


def _eager_step() -> Callable[..., Any]:
    """MFAC's step excluded from torch.compile (created on the first compiled step).

    Made lazily because ``torch.compiler.disable`` imports torch._dynamo (seconds), which
    an eager user never needs.
    """
    fn = _EAGER_STEP.get("step")
    if fn is None:
        fn = _EAGER_STEP["step"] = torch.compiler.disable(MFAC._step)
    return fn


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
        :class:`torch.optim.Optimizer`. All must be floating tensors
        (float16, bfloat16, float32 or float64) on one device; they may mix
        dtypes. The flat gradient, the momentum and the step are float64 if
        a parameter is float64, else float32; each parameter's update is
        computed in that dtype and rounded to the parameter's dtype once.
    lr : float or torch.Tensor, optional
        The learning rate (default ``1e-3``); a one-element tensor is kept
        as given (a scheduler may change it in place).
    num_grads : int, optional
        The window size m (default 64). The window holds ``m * d`` values
        of its storage dtype (``grad_dtype``); the size is logged when it is
        allocated (logger ``"mfac_core.torch"``, level ``INFO``). The paper
        uses 1024; the project's measurements (docs/guidance.rst) show that
        m = 32 to 64 captures most of the gain at a sixteenth of the memory.
    damp : float, optional
        The damping ``lambda > 0`` (default ``1e-3``: in the project's
        training measurements, docs/guidance.rst, 1e-3 trained best and the
        paper's 1e-5 trained 13x worse).
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
        first m insertions refactorises the k x k factor (O(k^3)). The
        default differs from :class:`~mfac_core.DynamicIHVP`'s (``False``) on
        purpose: an operator should be exact for the gradients it has; an
        optimizer should take steps of a steady size from the first one on.
    errors : {"skip", "raise"}, optional
        What a step does with a gradient it cannot use (default ``"skip"``);
        see Notes.
    grad_dtype : torch.dtype, optional
        The storage dtype of the window: the parameters' dtype if they share
        one, else the step's (default, ``None``), or ``torch.bfloat16`` or
        ``torch.float16``, which halve
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
    dtype : torch.dtype
        The dtype of the flat gradient, the momentum and the step.
    steps : int
        Steps taken (parameters moved).
    skipped_steps : int
        Steps skipped because the gradient or the step was not finite.
    rejected_grads : int
        Gradients left out of the window (their step was taken with the
        previous window).
    state : dict
        As for every :class:`torch.optim.Optimizer`; MFAC's state is global
        (one window, one momentum buffer over the flat vector), so it is
        held by the first parameter (as :class:`torch.optim.LBFGS` holds
        its own): ``state[first]`` has ``"momentum_buffer"`` and the three
        counters; the other parameters have empty entries. The window is
        :attr:`ihvp`; :meth:`state_dict` adds it to the entry.

    Raises
    ------
    ValueError
        For parameters on different devices, no parameters, or
        out-of-range hyper-parameters.
    TypeError
        For parameters of another dtype than the four above.

    Warns
    -----
    MFACStepWarning
        With ``errors="skip"``, for every skipped step and every gradient
        left out of the window.

    Notes
    -----
    Parameters whose ``grad`` is ``None`` in a step contribute zeros to the
    flat gradient and are not moved in that step; their momentum only decays
    (``b <- mu b``: the entries of ``F^{-1} g`` that the other gradients give
    them are dropped). A step in which every ``grad`` is ``None`` does
    nothing (no insertion, no decay, no count). A step reads the ``m x d``
    window twice, the floor of the dynamic algorithm; see
    :meth:`DynamicIHVP.update_and_matvec`. Gradients never enter autograd:
    the window, the momentum and the step are computed without recording
    history even if the gradients require grad (e.g. after
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
    ``state_dict()["state"][0]["shards"]["rank{r}_of_{p}"]`` (the first
    parameter's entry; tensors of fixed shapes,
    so that :mod:`torch.distributed.checkpoint` saves every rank's shard and
    loads into the state_dict of a fresh optimizer) and loads only at the
    same world size, on the rank that saved it. A distributed optimizer
    cannot be pickled or copied.

    :meth:`state_dict` holds the window (gradients, Gram matrix and Cholesky
    factor), the momentum buffer, the step count and the two counters, so
    that a run restored from a checkpoint continues bit for bit, also
    through :func:`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`
    and ``set_optimizer_state_dict``;
    :meth:`load_state_dict` can also resume it with another damping. An
    optimizer can be copied with :func:`copy.deepcopy` (with its model, as
    ``copy.deepcopy((model, opt))``) and pickled; the copy continues exactly
    as the original would. Hooks are not copied, as for every
    :class:`torch.optim.Optimizer`.

    Under :func:`torch.compile`, the step runs eagerly
    (:func:`torch.compiler.disable`): the window's update decides on the
    host (finiteness, the factor's positive definiteness), which a graph
    cannot hold, so a compiled training step has one graph break, at
    ``opt.step()``, and equals the eager run.

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
        num_grads: int = 64,
        damp: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        zero_init: bool = True,
        errors: str = "skip",
        grad_dtype: torch.dtype | None = None,
        comm: Communicator | None = None,
    ) -> None:
        lr = _check_lr(lr, "lr")
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
        # The optimizer's state lives on its first parameter, as torch.optim.LBFGS keeps
        # its global state: never empty, so that torch.distributed.checkpoint finds it
        # initialised and does not call step() with zero gradients to create it. Every
        # other parameter has an empty entry, which DCP's strict loading asks for.
        self._reset_state(_fresh_entry(self._grad))

    def _reset_state(self, entry: dict[str, Any]) -> None:
        self.state = defaultdict(dict)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {}
        self.state[self._first] = entry

    @property
    def _entry(self) -> dict[str, Any]:
        """The optimizer's state entry (``self.state`` of the first parameter)."""
        return self.state[self._first]

    @property
    def steps(self) -> int:
        """The number of steps taken (parameters moved)."""  # numpydoc ignore=RT01
        return int(self._entry["steps"])

    @property
    def skipped_steps(self) -> int:
        """The number of steps skipped for a non-finite gradient or step."""  # numpydoc ignore=RT01
        return int(self._entry["skipped_steps"])

    @property
    def rejected_grads(self) -> int:
        """The number of gradients left out of the window."""  # numpydoc ignore=RT01
        return int(self._entry["rejected_grads"])

    def _count(self, key: str) -> None:
        self._entry[key] += 1

    # -- construction ---------------------------------------------------------------------

    def _layout(self) -> None:
        """Check the parameters and map each to its slice of the flat vector."""
        flat = [p for group in self.param_groups for p in group["params"]]
        if not flat:
            raise ValueError("MFAC got an empty parameter list")
        first = flat[0]
        for p in flat:
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(
                    f"MFAC needs float16, bfloat16, float32 or float64 parameters, got {p.dtype}"
                )
            if p.device != first.device:
                raise ValueError(
                    "MFAC treats all parameters as one vector: they must share one device, "
                    f"got {first.device} and {p.device}"
                )
        self._first = first
        dtypes = {p.dtype for p in flat}
        #: The dtype of the flat gradient, the momentum and the step: float64 if a
        #: parameter is float64, else float32 (2-byte parameters are stepped in float32
        #: and the result rounded to their dtype once).
        self.dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self.device = first.device
        # The window stores the parameters' dtype if they share one (2-byte parameters:
        # a 2-byte window, as grad_dtype would make it), else the step's.
        own = dtypes.pop() if len(dtypes) == 1 else self.dtype
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
                f"grad_dtype must be None (default: {own}), torch.bfloat16, "
                f"torch.float16 or {self.dtype}, got {grad_dtype!r}"
            )
        #: The window's storage dtype.
        self.grad_dtype: torch.dtype = own if grad_dtype is None else grad_dtype
        if self.grad_dtype in _HALF_GRAD_DTYPES and self._comm is not None:
            raise ValueError(
                f"a window of {self.grad_dtype} is not available for a distributed optimizer "
                "(comm= or DTensor parameters): use float32 or float64 parameters and no "
                "2-byte grad_dtype"
            )

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
            # One process: the step has the window check the gradient
            # (_update_and_matvec_checked) and products are left unchecked, as before;
            # distributed, the window's check is the collective one.
            check_finite=self._comm is not None,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as to any :class:`torch.optim.Optimizer`.

        The new parameters' coordinates are appended to the flat vector. The
        window's gradients get zeros there (the new parameters had no
        gradient in the steps before), which leaves the Gram matrix and its
        factor as they are: the new coordinates start with the Fisher
        ``damp I`` and a zero momentum.

        Parameters
        ----------
        param_group : dict
            The group, as for :meth:`torch.optim.Optimizer.add_param_group`.

        Raises
        ------
        ValueError
            For an out-of-range ``lr``, ``momentum`` or ``weight_decay`` of
            the group, a window option in it, parameters on another device,
            parameters that would change the step's dtype (float64 ones added
            to a float32 optimizer), or a distributed optimizer. The optimizer
            is then unchanged.
        """
        for key in _GLOBAL_KEYS:
            if isinstance(param_group, Mapping) and key in param_group:
                raise ValueError(
                    f"{key} is an option of the whole MFAC optimizer (one window "
                    "over all parameters), not of a parameter group"
                )
        frozen = getattr(self, "_frozen", False)
        if frozen and self._comm is not None:
            raise ValueError(
                "a distributed MFAC optimizer cannot add parameter groups: every rank's "
                "window shard is fixed; build a new optimizer instead"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in _GLOBAL_KEYS:  # torch copied the defaults into the group
            group.pop(key, None)
        try:
            self._check_group(group, "the parameter group")
            if frozen:
                self._grow()
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def _grow(self) -> None:
        """Widen the window, the flat gradient and the momentum to the new last group."""
        saved = {k: self.__dict__[k] for k in _LAYOUT_ATTRS}
        try:
            self._layout()
            if (self.dtype, self.grad_dtype) != (saved["dtype"], saved["grad_dtype"]):
                raise ValueError(
                    f"the new parameters would change the step's dtype from {saved['dtype']} "
                    f"to {self.dtype} (or the window's): add parameters of the dtypes the "
                    "optimizer was built with, or build a new optimizer"
                )
            width = self._grad.shape[0] - saved["_grad"].shape[0]
            window = self.ihvp.state_dict()
            grads = window["grads"]
            window["grads"] = torch.cat([grads, grads.new_zeros((grads.shape[0], width))], 1)
            window["dim"] = self.dim
            ihvp = self._new_window(self.ihvp.damp)
            ihvp.load_state_dict(window)
        except Exception:
            self.__dict__.update(saved)
            raise
        entry = dict(self._entry)
        old = entry["momentum_buffer"]
        entry["momentum_buffer"] = torch.cat([old, old.new_zeros(width)])
        self.ihvp = ihvp
        self._reset_state(entry)

    @staticmethod
    def _check_group(group: Mapping[str, Any], where: str) -> None:
        for key in _GROUP_KEYS:
            if key not in group:
                raise ValueError(f"{where} has no {key!r}")
            if key == "momentum":
                check_number(group[key], f"{key} of {where}", low=0.0, high=1.0, high_open=True)
            elif key == "lr":
                _check_lr(group[key], f"lr of {where}")
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
        if torch.compiler.is_compiling():
            # The window's update decides on the host (finiteness, factorisation), which
            # torch.compile cannot trace: it runs eagerly, one graph break per step.
            _eager_step()(self)
        else:
            self._step()
        return loss

    # no_grad again: this runs on its own when a compiled function calls it eagerly.
    @torch.no_grad()
    def _step(self) -> None:
        """The step itself, after the closure."""
        if all(p.grad is None for group in self.param_groups for p in group["params"]):
            return  # nothing to step with: no window insert, no momentum decay, no count
        g = self._gather()
        if self._comm is not None:
            self._distributed_step(g)
            return
        if g.dtype != self.ihvp.dtype:
            # float64 gradients for a 2-byte window: float32 steps. Cast before the check
            # below, so that a finite entry beyond float32's range counts as not finite.
            g = g.to(self.ihvp.dtype)
        # One host sync per steady-state step, next to two passes over m x d: the window
        # reads its gradient's check (NaN, infinity, the 2-byte range), its row edit's
        # and the step's finiteness together, and reports them instead of raising. The
        # method is private to the window because it exists for this loop: it refuses
        # NaN whatever the window's check_finite, and computes the product before it
        # knows whether the step stands.
        try:
            out = self.ihvp._update_and_matvec_checked(g)
        except FactorizationError as exc:
            if self.defaults["errors"] == "raise":
                raise
            s, finite = self._with_previous_window(g, exc)
        else:
            if out.status == "not finite":
                self._skip(
                    f"{self._culprit()} holds NaN or infinity; the step is skipped "
                    "(parameters, momentum and window unchanged)"
                )
                return
            if out.status == "not representable":
                if self.defaults["errors"] == "raise":
                    assert out.error is not None
                    raise out.error  # the ValueError update_and_matvec raises
                unstorable = _Unstorable(
                    f"an entry of the gradient ({float(g.abs().max()):g}) is beyond the "
                    f"range of the window's {str(self.grad_dtype).removeprefix('torch.')}"
                )
                s, finite = self._with_previous_window(g, unstorable)
            else:
                s, finite = out.s, out.s_finite
        if not finite:
            self._skip(
                "the preconditioned step holds NaN or infinity (damp too small for "
                "the dtype?); the step is skipped (parameters and momentum unchanged)"
            )
            return
        self._apply(s.to(self.dtype))
        self._count("steps")

    def _with_previous_window(self, g: torch.Tensor, exc: Exception) -> tuple[torch.Tensor, bool]:
        """The step with the window as it was (which the core leaves unchanged)."""
        self._left_out(exc)
        s = self.ihvp.matvec(g)
        return s, bool(torch.isfinite(s).all())

    def _left_out(self, exc: Exception) -> None:
        """Count and report a gradient the window could not take (``errors="skip"``)."""
        self._count("rejected_grads")
        self._warn(
            f"the gradient was left out of the window and the step taken with the "
            f"previous window ({self.rejected_grads} so far): {exc}"
        )

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
        self._count("steps")

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
                seg = self._grad[lo:hi]
                if not bool(torch.isfinite(seg.to(self.ihvp.dtype)).all()):
                    what = (
                        "gradient"
                        if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all())
                        else "weight-decayed gradient"
                    )
                    where = f"parameter {i} of group {j} (shape {tuple(p.shape)})"
                    if bool(torch.isfinite(seg).all()):
                        return (
                            f"the {what} of {where} is beyond the range of "
                            f"{str(self.ihvp.dtype).removeprefix('torch.')} (the dtype the "
                            "step is computed in with this grad_dtype) and"
                        )
                    return f"the {what} of {where}"
        return "the gradient"

    def _skip(self, message: str) -> None:
        if self.defaults["errors"] == "raise":
            raise FloatingPointError(f"MFAC step {self.steps + 1}: {message}")
        self._count("skipped_steps")
        self._warn(f"{message} ({self.skipped_steps} skipped so far)")

    def _warn(self, message: str) -> None:
        # Point at the caller of opt.step(), past this package and torch's wrappers of step
        # (no_grad, hooks, profiling), whose depth depends on torch's version.
        warnings.warn(
            f"MFAC step {self.steps + 1}: {message}",
            MFACStepWarning,
            stacklevel=user_stacklevel(),
        )

    def _apply(self, s: torch.Tensor) -> None:
        momentum = self._entry["momentum_buffer"]
        for group, layout in zip(self.param_groups, self._slices, strict=True):
            lr, mu = group["lr"], group["momentum"]
            for p, lo, hi in layout:
                d_p = s[lo:hi]
                if mu:
                    buf = momentum[lo:hi]
                    buf.mul_(mu)
                    if p.grad is None:
                        # Its step entries come from the other coordinates' gradients
                        # through F^{-1}; a parameter without a gradient only decays.
                        continue
                    d_p = buf.add_(d_p)
                if p.grad is not None:
                    _move(_local(p), d_p, lr)

    # -- checkpoints ----------------------------------------------------------------------

    def _saved_entry(self) -> dict[str, Any]:
        """The state entry as :meth:`state_dict` saves it: copies, the window included."""
        entry = self._entry
        saved = {
            "window": self.ihvp.state_dict(),
            "momentum_buffer": entry["momentum_buffer"].clone(),
            **{key: int(entry[key]) for key in _ENTRY_KEYS[1:]},
        }
        if self._comm is not None:
            # Under a key naming the rank and the world size: torch.distributed.checkpoint
            # keeps one copy of a key that every rank saves, and this shard is the rank's own.
            # Every tensor has the shape it had at construction, so that the state_dict of
            # a fresh optimizer is a template that dcp.load can fill in place.
            window = dict(saved.pop("window"))
            m = self.ihvp.num_grads
            factor = window["factor"].new_zeros((m, m))
            k = window["factor"].shape[0]
            factor[:k, :k] = window["factor"]
            window["factor"] = factor
            shard = {"window": window, "momentum_buffer": saved.pop("momentum_buffer")}
            saved.update(window=None, momentum_buffer=None, shards={self._shard_key: shard})
        return saved

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, including the M-FAC window.

        Returns
        -------
        dict
            :meth:`torch.optim.Optimizer.state_dict`, whose ``"state"`` holds
            one entry, under the id of the first parameter (as
            :class:`torch.optim.LBFGS` keeps its global state): MFAC's state
            for all parameters, with copies of the window's state
            (``"window"``, :meth:`DynamicIHVP.state_dict`), the momentum
            buffer of the flat vector (``"momentum_buffer"``), the step count
            (``"steps"``) and the counters ``"skipped_steps"`` and
            ``"rejected_grads"``. State-dict hooks see this entry.
        """
        live = self._entry
        # The window exists in state_dict() only: kept in self.state it would double
        # the m x d memory.
        self.state[self._first] = self._saved_entry()
        try:
            return super().state_dict()
        finally:
            self.state[self._first] = live

    @property
    def _shard_key(self) -> str:
        comm = self._comm
        assert comm is not None
        return f"rank{comm.rank}_of_{comm.size}"

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any], *, damp: float | None = None) -> None:
        """Restore a state from :meth:`state_dict`, window included.

        The load pre-hooks run first (on a shallow copy, as in
        :meth:`torch.optim.Optimizer.load_state_dict`); then everything is
        checked before anything changes: a state that cannot be loaded raises
        and leaves the optimizer exactly as it was (window, momentum,
        counters, parameter groups). The post-hooks run after the load.

        A state saved by mfac_core 0.x before the state moved into
        ``state_dict["state"]`` (a top-level ``"mfac"`` entry beside an
        empty ``"state"``) loads too.

        Parameters
        ----------
        state_dict : dict
            From :meth:`state_dict` of an MFAC optimizer with the same
            ``num_grads``, ``zero_init``, window dtype and parameter sizes.
            Tensors are moved to this optimizer's device; none keeps autograd
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
            in it is missing, of the wrong type, out of range or cannot be
            copied.
        FactorizationError
            If the window cannot be factorised with the new ``damp``.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"not an MFAC state_dict: expected a dict, got {type(state_dict).__name__}"
            )
        state_dict = dict(state_dict)  # shallow copy, as torch's load_state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = self._migrated(state_dict)
        if self._comm is None:
            plan = self._check_state(state_dict, damp)
        else:
            plan = self._check_distributed_state(state_dict, damp)
        # Commit. The core's loader checks its state before it changes anything, and
        # a new damping's refactorisation is its one step that may still raise: first.
        self.ihvp.load_state_dict(plan.window, damp=plan.damp)
        self.defaults["damp"] = self.ihvp.damp
        self.param_groups = plan.groups
        self._reset_state(
            {
                "momentum_buffer": plan.momentum,
                "steps": plan.steps,
                "skipped_steps": plan.skipped_steps,
                "rejected_grads": plan.rejected_grads,
            }
        )
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _migrated(self, state_dict: dict[str, Any]) -> dict[str, Any]:
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
                    mended[int(k)] = _merged(state.get(int(k)), v)
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

    def _check_state(
        self, state_dict: Any, damp: float | None, *, window: bool = True
    ) -> SimpleNamespace:
        """Check a state for :meth:`load_state_dict`: what to commit; nothing changes here.

        Without ``window`` the window's state is not checked (the caller does).
        """
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        if missing:
            raise ValueError(f"not an MFAC state_dict: it has no {missing}")
        groups = self._check_groups(state_dict)
        extra = self._saved_state(state_dict)
        if window and extra.get("shards") is not None:
            raise ValueError(
                f"the MFAC state holds the shards {sorted(extra['shards'])} of a distributed "
                "MFAC optimizer; this one was built without comm (and its parameters are not "
                "DTensors): load it into an optimizer of the same world size"
            )
        missing = [k for k in ("window", "momentum_buffer", "steps") if k not in extra]
        if missing:
            raise ValueError(f"the MFAC state has no {missing}")
        unknown = sorted(set(extra) - {*_ENTRY_KEYS, "window", "shards"}, key=str)
        if unknown:
            raise ValueError(f"the MFAC state has unknown keys {unknown}")
        counts = {}
        for key in _ENTRY_KEYS[1:]:
            value = extra.get(key, 0)  # the counters are absent from older checkpoints
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"the MFAC state's {key!r} must be an int >= 0, got {value!r}")
            counts[key] = int(value)
        momentum = self._check_momentum(extra["momentum_buffer"])
        if not window:
            return SimpleNamespace(
                groups=groups, window=None, damp=None, momentum=momentum, **counts
            )
        state, target = self._check_window(extra["window"], damp)
        return SimpleNamespace(
            groups=groups, window=state, damp=target, momentum=momentum, **counts
        )

    def _saved_state(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        """MFAC's entry of a state_dict's "state" (under the first parameter's id)."""
        state = state_dict["state"]
        if not isinstance(state, Mapping):
            raise ValueError("state_dict['state'] must be a dict")
        first = state_dict["param_groups"][0]["params"][0]
        ids = {i for group in state_dict["param_groups"] for i in group["params"]}
        others = [k for k, v in state.items() if k != first and (k not in ids or v != {})]
        if others or first not in state:
            raise ValueError(
                f"state_dict['state'] must hold MFAC's state under the id of the first "
                f"parameter ({first!r}) and nothing for the others, got entries for "
                f"{sorted(state, key=str)}"
            )
        extra = state[first]
        if not isinstance(extra, Mapping):
            raise ValueError(f"state_dict['state'][{first!r}] must be a dict")
        return extra

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
            missing = [k for k in ("state", "param_groups") if k not in state_dict]
            if missing:
                raise ValueError(f"not an MFAC state_dict: it has no {missing}")
            self._check_groups(state_dict)
            extra = self._saved_state(state_dict)
            shards = extra.get("shards")
            if not isinstance(shards, Mapping):
                raise ValueError(
                    "the MFAC state has no 'shards': it is the state of an MFAC optimizer "
                    "without comm; this one is distributed"
                )
            if self._shard_key not in shards:
                raise ValueError(
                    f"the MFAC state's 'shards' hold {sorted(shards)}, not "
                    f"{self._shard_key!r}: a distributed MFAC state loads only at the world "
                    "size that saved it, each rank its own shard"
                )
            shard = shards[self._shard_key]
            if not isinstance(shard, Mapping):
                raise ValueError(f"the MFAC state's shard {self._shard_key!r} must be a dict")
            window = shard.get("window")
            if isinstance(window, Mapping) and isinstance(window.get("factor"), torch.Tensor):
                k = len(window.get("window_slots") or ())
                window = {**window, "factor": window["factor"][:k, :k]}
            mine = {k: v for k, v in extra.items() if k != "shards"}
            mine.update(shard, window=window)
            first = state_dict["param_groups"][0]["params"][0]
            flat.append({**state_dict, "state": {first: mine}})
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
        plan.window, plan.damp = self._check_window(self._saved_state(flat[0])["window"], damp)
        return plan

    def _check_groups(self, base: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The parameter groups to commit: the saved ones, with this optimizer's params."""
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
        try:  # as torch's load_state_dict, which writes into a copy of the groups
            copies = copy.deepcopy(list(groups))
        except Exception as exc:
            raise ValueError(f"state_dict['param_groups'] cannot be copied: {exc!r}") from None
        new = []
        for saved, group in zip(copies, self.param_groups, strict=True):
            saved = dict(saved)
            for key in _GLOBAL_KEYS:
                if key in saved:
                    raise ValueError(
                        f"state_dict['param_groups'] has {key!r} in a group: it is an option "
                        "of the whole MFAC optimizer"
                    )
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            new.append(saved)
        return new

    def _check_momentum(self, buf: Any) -> torch.Tensor:
        if buf is None:  # saved before the first momentum step: a zero buffer steps alike
            return torch.zeros_like(self._grad)
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
        state["_mfac"] = {"window": self.ihvp.state_dict()}
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
        if extra is None:
            return
        with torch.no_grad():
            self._frozen = True
            self._comm = None
            self._layout()
            self.ihvp = self._new_window(extra["window"]["damp"])
            window, _ = self._check_window(extra["window"], None)
            self.ihvp.load_state_dict(window)
            if "steps" in extra:  # a pickle of the earlier format: the entry was here
                entry = {key: extra.get(key, 0) for key in _ENTRY_KEYS[1:]}
                entry["momentum_buffer"] = self._check_momentum(extra["momentum_buffer"])
                self._reset_state(entry)


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
