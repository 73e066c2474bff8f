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

import inspect
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ._errors import user_stacklevel
from ._torch_compile import eager_under_torch_compile
from ._torch_layout import build, grow, new_window
from ._torch_pruner import MFACPruner
from ._torch_sparse import MASK_ORDER, flat_mask, masks_from_list
from ._torch_state import (
    GLOBAL_KEYS,
    check_group,
    check_new_group,
    check_option_devices,
    fresh_entry,
    live_entry,
    load_state,
    outside_inference,
    param_shapes,
    pickled,
    restore,
    with_saved_entry,
    without_window,
)
from ._torch_step import step as take_step
from .distributed import Communicator, check_communicator

__all__ = ["MFAC", "MFACPruner", "MFACStepWarning"]

# Defined in a private module; documented, doctested and pickled under this one.
MFACPruner.__module__ = __name__
# doctest looks for methods only among functions of this module's globals, which the
# pruner's methods are not: their examples are listed here for it.
__test__ = {
    f"MFACPruner.{name}": member
    for name, member in vars(MFACPruner).items()
    if inspect.isfunction(member) and member.__doc__
}


class MFACStepWarning(RuntimeWarning):
    """An :class:`MFAC` step was skipped, or its gradient left out of the window."""


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
        The learning rate (default ``1e-3``); a one-element float tensor is
        kept as given (a scheduler may change it in place), on the
        parameters' device or the CPU; so are the two options below.
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
    momentum : float or torch.Tensor, optional
        Momentum on the preconditioned step, in ``[0, 1)`` (default 0: the
        paper uses none).
    weight_decay : float or torch.Tensor, optional
        L2 penalty added to the gradient before preconditioning (default 0).
    zero_init : bool, optional
        Start from a window of ``m`` zero gradients with the normalisation
        ``1/m`` fixed, as the paper and the authors' implementation do
        (default): steps of a steady size from the first one on. With
        ``False`` the normalisation is ``1/k`` for the ``k`` gradients seen so
        far, which makes the first steps ``g / |g|^2``-sized (the default of
        :class:`~mfac_core.DynamicIHVP`, which is exact for the gradients it has).
    errors : {"skip", "raise"}, optional
        What a step does with a gradient it cannot use (default ``"skip"``, Notes):
        skip the step (or take it with the previous window), or raise and leave
        the optimizer, window included, exactly as it was.
    grad_dtype : torch.dtype, optional
        The storage dtype of the window: the parameters' dtype if they share
        one, else the step's (default, ``None``), or ``torch.bfloat16`` or
        ``torch.float16`` (``2 m d`` bytes, half of float32's). Each
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
        2-byte window (2-byte parameters need ``grad_dtype=torch.float32``).
        Every rank passes the same ``num_grads``, ``damp``, ``zero_init``, ``errors``,
        parameters (shapes and dtypes, in order) and ``masks`` (a ``ValueError`` on every
        rank otherwise); every error below is raised on every rank.
    masks : dict of torch.Tensor to torch.Tensor, optional
        Sparse mode: a boolean mask (``True`` = kept) of the shape and device
        of each masked parameter, keyed by the parameter itself, e.g.
        :meth:`MFACPruner.param_masks` after pruning. The flat vector, and so
        the window, the momentum and every pass of a step, hold only the kept
        coordinates (parameters without a mask keep all theirs): the window
        is ``m * kept`` values, and a step's cost is linear in the density.
        The gradient's entries at the other coordinates never enter the
        window, and those entries of the parameters are never changed (zero
        after pruning stays zero). The masks are copied; parameters of
        :meth:`add_param_group` have none. Not for DTensor parameters.

    Attributes
    ----------
    ihvp : DynamicIHVP
        The window and its factorisation (distributed: this rank's columns).
    dim : int
        The number of coordinates d of the flat vector (over all ranks): with
        ``masks``, the kept ones.
    num_grads, damp : int, float
        The window's size m and damping (read-only; :meth:`load_state_dict` changes damp).
    dtype : torch.dtype
        The dtype of the flat gradient, the momentum and the step.
    steps : int
        Steps taken (parameters moved).
    skipped_steps : int
        Steps skipped because the gradient or the step was not finite, or
        the gradient was too large for the window.
    rejected_grads : int
        Gradients left out of the window (their step was taken with the
        previous window).
    state : dict
        As for every :class:`torch.optim.Optimizer`; MFAC's state is global,
        held (as :class:`torch.optim.LBFGS` holds its own) by the first
        parameter that requires grad, which :mod:`torch.distributed.checkpoint`
        keeps (else the first one): ``state[first]`` has ``"window"`` (the operator
        :attr:`ihvp` itself), ``"momentum_buffer"`` and the three counters
        (with ``masks``, also ``"mask"``, as :meth:`state_dict` saves it);
        the other parameters have none (:meth:`state_dict` gives them empty
        entries, and holds the window's state in place of the window).

    Raises
    ------
    ValueError
        For parameters on different devices or on the meta device, no parameters, a parameter
        listed twice or whose entries share memory (a stride 0, as ``expand()`` makes),
        out-of-range hyper-parameters, a tensor ``lr``, ``momentum`` or ``weight_decay`` on
        another device than the parameters' or the CPU, or masks of the wrong shape or device,
        for a tensor that is not a parameter, or keeping no coordinate at all.
    TypeError
        For parameters of another dtype than the four above or not dense (nested, sparse),
        masks that are not boolean tensors (or keyed by name), a ``grad_dtype`` other than
        ``None``, the two 2-byte dtypes and the step's dtype, or a ``zero_init`` that is not
        a bool.

    Warns
    -----
    MFACStepWarning
        With ``errors="skip"``, for every skipped step and every gradient
        left out of the window.

    Notes
    -----
    A step reads the ``m x d`` window twice, the floor of the dynamic algorithm
    (:meth:`DynamicIHVP.update_and_matvec`); gradients never enter autograd. Parameters
    whose ``grad`` is ``None`` are not moved and their momentum only decays; a step in
    which every ``grad`` is ``None`` does nothing (distributed: on every rank, and only
    when it is so on every rank; a rank without gradients among ranks with some takes
    the step with zeros for its coordinates and moves none of its parameters). With
    ``masks`` the optimizer equals a dense :class:`MFAC` over a model made of just the
    kept coordinates, whose entries alone it reads and moves.

    A bad gradient does not end a run, as with AMP's ``GradScaler``: one
    holding NaN or infinity, or so large that the window with it would leave
    no correct digit in float64, skips the step (:attr:`skipped_steps`); one
    the window cannot store (a :class:`~mfac_core.FactorizationError`, or an
    entry beyond float16's range with a float16 ``grad_dtype``) is left out
    of the window and the step is taken with the previous window
    (:attr:`rejected_grads`). A finite gradient whose preconditioned step is
    not finite skips the step but stays in the window. With ``errors="raise"``
    each raises instead and the optimizer is left as it was, its window
    included (the step is computed before the window commits to the
    gradient).

    The state round-trips through :meth:`state_dict`, copies, pickles and
    :mod:`torch.distributed.checkpoint` (every ``StateDictOptions``, and
    ``dcp.load`` into a fresh optimizer) and continues bit for bit; under
    :func:`torch.compile` the step is one graph break and equals the eager
    run. The documentation's sections "Gradients that cannot be used",
    "Checkpoints and copies", "Sparse fine-tuning" and "Distributed
    training" give the details, including each rank's share of the window.

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

    # Set by _torch_layout.layout (with device, _sharded, _slices and _columns): the
    # parameter that holds the state, the flat gradient (reused by every step), and the
    # number of coordinates; before it, the masks by parameter (sparse mode; else empty).
    _first: torch.Tensor
    _grad: torch.Tensor
    dim: int
    _masks: dict[torch.Tensor, torch.Tensor]
    #: The dtype of the flat gradient, the momentum and the step.
    dtype: torch.dtype
    #: The window's storage dtype.
    grad_dtype: torch.dtype

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
        masks: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self._frozen = False
        # A bad communicator cannot join a reduction: it raises on its rank alone.
        self._comm: Communicator | None = None if comm is None else check_communicator(comm)
        options = {
            "lr": lr,
            "num_grads": num_grads,
            "damp": damp,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "zero_init": zero_init,
            "errors": errors,
            "grad_dtype": grad_dtype,
            "masks": masks,
        }
        with outside_inference():
            # Every check, the groups and the layout; distributed, collective (every rank
            # raises if one rank's check fails) and the ranks' layouts compared.
            build(self, params, options)
            self.ihvp = new_window(self, self.defaults["damp"])
            # The optimizer's state lives on one parameter, as torch.optim.LBFGS keeps
            # its global state: never empty, so that torch.distributed.checkpoint finds
            # it initialised and does not call step() with zero gradients to create it.
            self._reset_state(fresh_entry(self._grad))

    def _reset_state(self, entry: dict[str, Any]) -> None:
        # Only one parameter (self._first) has an entry, as with torch.optim.LBFGS (torch's
        # harness asks every entry to be non-empty); state_dict() lists the others.
        self.state = defaultdict(dict)
        # The window itself, not a copy (the m x d memory is held once): DCP rebuilds a
        # flattened state from the keys of the live one, so "window" must be among them.
        live = {"window": self.ihvp, **without_window(entry)}
        live.pop("mask", None)
        live.pop("mask_order", None)
        # The shapes of the parameters now (a group added since, or a pickle's): DCP
        # rebuilds a flattened state from the live entry's keys, so it is among them.
        live["param_shapes"] = param_shapes(self)
        if self._masks:
            # As state_dict() saves them: DCP rebuilds a flattened state from the live
            # entry's keys only, and a load without them would be refused.
            live["mask"], live["mask_order"] = flat_mask(self), MASK_ORDER
        self.state[self._first] = live

    @property
    def _entry(self) -> dict[str, Any]:
        """The optimizer's state entry (``self.state`` of its holding parameter)."""
        return live_entry(self)

    @property
    def steps(self) -> int:
        """The number of steps taken (parameters moved)."""  # numpydoc ignore=RT01
        return int(self._entry["steps"])

    @property
    def skipped_steps(self) -> int:
        """The number of steps skipped for a non-finite or too large gradient, or step.

        A too large gradient is one that would make the window hopeless.
        """  # numpydoc ignore=RT01
        return int(self._entry["skipped_steps"])

    @property
    def rejected_grads(self) -> int:
        """The number of gradients left out of the window."""  # numpydoc ignore=RT01
        return int(self._entry["rejected_grads"])

    def _count(self, key: str) -> None:
        self._entry[key] += 1

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as to any :class:`torch.optim.Optimizer`.

        The new parameters' coordinates are appended to the flat vector. The window's gradients
        get zeros there (the new parameters had no gradient in the steps before), which leaves
        the Gram matrix and its factor as they are: the new coordinates start with the Fisher
        ``damp I`` and a zero momentum.

        Parameters
        ----------
        param_group : dict
            The group, as for :meth:`torch.optim.Optimizer.add_param_group`.

        Raises
        ------
        ValueError
            For an out-of-range ``lr``, ``momentum`` or ``weight_decay`` of the group, a tensor
            option on another device than its parameters' or the CPU, a window option in it, a
            parameter listed twice, parameters on another device, parameters that would change
            the step's dtype (float64 ones added to a float32 optimizer) or the window's storage
            dtype (float32 ones added to a bfloat16 optimizer without ``grad_dtype``), or a
            distributed optimizer; ``TypeError`` for nested or sparse parameters, ``RuntimeError``
            for groups edited by hand or a parameter reshaped since. Nothing then changes.
        """
        frozen = check_new_group(self, param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in GLOBAL_KEYS:  # torch copied the defaults into the group
            group.pop(key, None)
        try:
            check_group(group, "the parameter group")
            check_option_devices(group, f"parameter group {len(self.param_groups) - 1}")
            if frozen:
                with outside_inference():
                    grow(self)
        except Exception:  # out of memory too: the group goes with the layout's changes
            self.param_groups.pop()
            raise

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
        head = ", ".join(f"{key}: {self.defaults[key]!r}" for key in GLOBAL_KEYS)
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
            Re-evaluates the model and returns the loss (computed with gradients enabled).

        Returns
        -------
        object
            The loss returned by ``closure``, or ``None``.

        Raises
        ------
        FloatingPointError
            With ``errors="raise"``, for a gradient or a step holding NaN or infinity; the
            parameters, momentum, counters and window are as they were (the gradient of a step
            that is not finite is not kept).
        FactorizationError
            With ``errors="raise"``, for a gradient the window cannot take; the optimizer is as
            it was.
        RuntimeError
            For sparse gradients, groups edited by hand (not with :meth:`add_param_group`), a
            parameter whose size or device changed, whose entries came to share memory (or,
            masked, that is no longer dense) since construction, a float64 parameter in an
            optimizer built without one (e.g. ``model.double()`` since), or ranks whose groups'
            options differ; nothing changes.
        TypeError
            For a group's ``lr``, ``momentum`` or ``weight_decay`` edited into other than a real
            number or a one-element real tensor on the parameters' device or the CPU; nothing
            changes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The update decides on the host, which torch.compile cannot trace: _step runs
        # eagerly (eager_under_torch_compile), one graph break.
        self._step()
        return loss

    # no_grad again: this runs on its own when a compiled function calls it eagerly.
    @eager_under_torch_compile
    @torch.no_grad()
    def _step(self) -> None:
        """The step itself, after the closure."""
        if not torch.is_inference_mode_enabled():  # the usual case: no context to enter
            take_step(self)
            return
        with outside_inference():
            take_step(self)

    def _warn(self, message: str) -> None:
        # Point at the caller of opt.step(), past this package and torch's wrappers of step
        # (no_grad, hooks, profiling), whose depth depends on torch's version.
        warnings.warn(
            f"MFAC step {self.steps + 1}: {message}",
            MFACStepWarning,
            stacklevel=user_stacklevel(),
        )

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, including the M-FAC window.

        Returns
        -------
        dict
            :meth:`torch.optim.Optimizer.state_dict`, whose ``"state"`` holds one entry, under
            the id of the first parameter that requires grad when it is called (of the first
            parameter if none does; as :class:`torch.optim.LBFGS` keeps its global state):
            MFAC's state for all parameters, with copies of the window's state (``"window"``:
            :meth:`DynamicIHVP.state_dict` with its slot lists as int64 tensors of length
            ``num_grads`` padded with -1, and its factor padded with zeros to
            ``num_grads x num_grads``, so that every tensor keeps its shape from construction
            on), the momentum buffer of the flat vector (``"momentum_buffer"``), the step count
            (``"steps"``), the counters ``"skipped_steps"`` and ``"rejected_grads"``, and the
            parameters' shapes in order (``"param_shapes"``, one int64 tensor: each parameter's
            number of dimensions, then its sizes), which a load compares with its own; with
            ``masks``, also ``"mask"``, every parameter's mask flat in parameter order (a
            boolean tensor of all their coordinates, ``True`` where kept), which a load checks.
            The other parameters have empty entries (which the strict loading of
            :mod:`torch.distributed.checkpoint` asks for). State-dict hooks see these entries.
        """
        return with_saved_entry(self, super().state_dict)

    @property
    def _shard_key(self) -> str:
        comm = self._comm
        assert comm is not None
        return f"rank{comm.rank}_of_{comm.size}"

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any], *, damp: float | None = None) -> None:
        """Restore a state from :meth:`state_dict`, window included.

        The load pre-hooks run first (on a shallow copy, as in
        :meth:`torch.optim.Optimizer.load_state_dict`); then everything is checked before
        anything changes: a state that cannot be loaded raises and leaves the optimizer exactly
        as it was (window, momentum, counters, parameter groups). The post-hooks run after the
        load.

        A state saved by mfac_core 0.x before the state moved into ``state_dict["state"]`` (a
        top-level ``"mfac"`` entry beside an empty ``"state"``) loads too, and so does a window
        whose slot lists are Python lists (:meth:`DynamicIHVP.state_dict`'s form, which earlier
        checkpoints hold). Group options must be finite, as for a step, not in the
        constructor's ranges (``LinearLR`` down to zero ends at -3e-19).

        Parameters
        ----------
        state_dict : dict
            From :meth:`state_dict` of an MFAC optimizer with the same ``num_grads``,
            ``zero_init``, window dtype and parameter sizes. Tensors are moved to this
            optimizer's device; none keeps autograd history.
        damp : float, optional
            Resume with this damping. Without it the state's damping must equal the optimizer's.
            With a damping other than the state's, the window's factor is recomputed from its
            gradients from the stored Gram matrix (O(m^3), no pass over the window and no extra
            ``m x d`` buffer); the continuation then differs from the original run.

        Raises
        ------
        ValueError
            If the state is not an MFAC state of matching sizes, or a value in it is missing, of
            the wrong type, out of range or cannot be copied, or it was saved with other
            ``masks`` than the optimizer's (no masks counting as all kept), for parameters of
            other shapes or in another order (the first that differs is named), or for named
            parameters whose names are this optimizer's in another order.
        FactorizationError
            If the window cannot be factorised with the new ``damp``.
        """
        with outside_inference():
            load_state(self, state_dict, damp)

    def __getstate__(self) -> dict[str, Any]:
        return pickled(self, super().__getstate__)

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
        masks_from_list(self, None if extra is None else extra.get("masks"))
        if extra is None:
            return
        with outside_inference():
            restore(self, extra)
