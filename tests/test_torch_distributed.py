"""MFAC across processes: the window sharded by columns under DDP and FSDP2 (DTensor).

Threads (``run_spmd_threads``) cover the replicated-parameter (DDP) mode, its
collective skips and its checkpoints; one spawn of two gloo processes covers
torch's own DDP and FSDP2, and checkpoints through torch.distributed.checkpoint.

Tolerance of the 1- vs p-process comparisons: the sharded window sums each Gram
row and product over the ranks' column parts in another order than one
process, so each step's direction differs by rounding, about ``eps * kappa``
relative (float64, kappa below 1e4 here); a few steps of training with a small
learning rate carry that through with a factor of order one per step, hence
``1e-9`` relative to the parameters' norm.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mfac_core.distributed import Communicator, CountingComm  # noqa: E402
from mfac_core.testing import run_spmd_threads  # noqa: E402
from mfac_core.torch import MFAC, MFACStepWarning  # noqa: E402

nn = torch.nn
F = torch.nn.functional
OPTIONS = {"lr": 0.05, "num_grads": 4, "damp": 1e-2, "momentum": 0.5, "weight_decay": 1e-3}
STEPS = 8
RTOL = 1e-9


def make_model(seed: int = 0) -> Any:
    # Initialised from its own generator: threads share torch's global one.
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def batches(n: int) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(8, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=gen),
        )
        for _ in range(n)
    ]


def flat(model: Any) -> np.ndarray:
    parts = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        parts.append(full.detach().numpy().reshape(-1))
    return np.concatenate(parts)


def reference(steps: int = STEPS, **options: Any) -> np.ndarray:
    model = make_model()
    opt = MFAC(model.parameters(), **{**OPTIONS, **options})
    for x, y in batches(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return flat(model)


def assert_params_close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.linalg.norm(got - want) <= RTOL * np.linalg.norm(want), np.abs(got - want).max()


# -- threads: replicated parameters (DDP's setting) ------------------------------------------


def _ddp_threads(comm: Communicator, nan_step: int | None, errors: str) -> dict[str, Any]:
    counting = CountingComm(comm)
    model = make_model()
    opt = MFAC(model.parameters(), **OPTIONS, errors=errors, comm=counting)
    out: dict[str, Any] = {"calls": []}
    for i, (x, y) in enumerate(batches(STEPS)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i == nan_step and comm.rank == comm.size - 1:
            # A NaN in this rank's own columns of the flat gradient.
            lo = opt.ihvp.layout.start
            for p in model.parameters():
                if lo < p.numel():
                    p.grad.view(-1)[lo] = float("nan")
                    break
                lo -= p.numel()
        counting.reset()
        try:
            opt.step()
        except FloatingPointError as exc:
            out["raised"] = str(exc)
            break
        out["calls"].append([c.shape for c in counting.calls])
    out["params"] = flat(model)
    out["counts"] = (opt.steps, opt.skipped_steps, opt.rejected_grads)
    out["window"] = (opt.ihvp.dim, opt.ihvp.layout.widths if opt.ihvp.layout else None)
    return out


@pytest.mark.parametrize("size", [1, 2, 3])
def test_ddp_mode_matches_one_process(size: int) -> None:
    results = run_spmd_threads(_ddp_threads, size, None, "skip")
    want = reference()
    d = want.size
    chunk = -(-d // size)
    widths = tuple(min((r + 1) * chunk, d) - min(r * chunk, d) for r in range(size))
    for rank, r in enumerate(results):
        assert not isinstance(r, Exception), r
        assert r["counts"] == (STEPS, 0, 0)
        assert r["window"] == (widths[rank], widths)  # memory m * d / p per rank
        # Bit for bit the same parameters on every rank, and those of one process.
        np.testing.assert_array_equal(r["params"], results[0]["params"])
        assert_params_close(r["params"], want)
        # Per step: the Gram row (m + 20 numbers with the status word: a count of failed
        # ranks per exception class, the digests of the tag and arguments), then the all-gather
        # (through the sum of a zero-padded d-vector with this communicator).
        assert r["calls"] == [[(OPTIONS["num_grads"] + 20,), (d,)]] * STEPS


def test_ddp_strict_step_decides_in_its_all_gather() -> None:
    # errors="raise" refuses a step that is not finite before the window commits: the
    # all-gather of the step, moved before the commit, decides on every rank alike (it
    # reduced a flag of its own before). The same parameters, bit for bit.
    strict = run_spmd_threads(_ddp_threads, 2, None, "raise")
    plain = run_spmd_threads(_ddp_threads, 2, None, "skip")
    d = plain[0]["params"].size
    for r, p in zip(strict, plain, strict=True):
        assert not isinstance(r, Exception), r
        assert r["counts"] == (STEPS, 0, 0)
        np.testing.assert_array_equal(r["params"], p["params"])
        assert r["calls"] == [[(OPTIONS["num_grads"] + 20,), (d,)]] * STEPS


def test_a_nan_on_one_rank_skips_the_step_on_every_rank() -> None:
    # Warnings are process-wide: the three threads' warnings land in one list.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MFACStepWarning)
        results = run_spmd_threads(_ddp_threads, 3, 2, "skip")
    for r in results:
        assert not isinstance(r, Exception), r
        assert r["counts"] == (STEPS - 1, 1, 0)
        np.testing.assert_array_equal(r["params"], results[0]["params"])
    messages = sorted(str(w.message) for w in caught if w.category is MFACStepWarning)
    assert len(messages) == 3 and all("step 3" in m and "NaN" in m for m in messages)
    assert sum("another rank" in m for m in messages) == 2
    assert sum("of group 0" in m for m in messages) == 1
    raised = run_spmd_threads(_ddp_threads, 3, 2, "raise")
    for r in raised:
        assert not isinstance(r, Exception), r
        assert "NaN" in r["raised"] and r["counts"] == (2, 0, 0)


def _inf_step_threads(comm: Communicator, errors: str) -> dict[str, Any]:
    model = make_model()
    opt = MFAC(model.parameters(), **OPTIONS, errors=errors, comm=comm)
    out: dict[str, Any] = {}
    for i, (x, y) in enumerate(batches(4)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if comm.rank == 0 and i == 2:
            # This rank's part of the product overflows: the gathered step is not finite.
            refined = opt.ihvp._refined
            opt.ihvp._refined = lambda *a, refined=refined: refined(*a) * float("inf")
        before = copy.deepcopy(opt.state_dict())
        try:
            opt.step()
        except FloatingPointError as exc:
            out["raised"] = str(exc)
            # Every rank refused the gradient with the step: nothing changed.
            _assert_same_tree(opt.state_dict(), before)
            break
        finally:
            opt.ihvp.__dict__.pop("_refined", None)
        # A skipped step (errors="skip") keeps the finite gradient in the window.
        out.setdefault("windows", []).append(opt.ihvp.slots)
        out.setdefault("grads", []).append(opt.ihvp.window().clone())
    out["params"] = flat(model)
    out["counts"] = (opt.steps, opt.skipped_steps, opt.rejected_grads)
    return out


def _assert_same_tree(a: Any, b: Any) -> None:
    """Equal nested dicts and lists, their tensors equal bit for bit."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.layout == b.layout
        assert torch.equal(a.to_dense(), b.to_dense())  # torch.equal has no sparse kernel
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_tree(x, y)
    else:
        assert a == b or (a != a and b != b)  # a NaN option, kept as it was


def test_a_nonfinite_step_on_one_rank_skips_the_step_on_every_rank() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MFACStepWarning)
        results = run_spmd_threads(_inf_step_threads, 2, "skip")
    for r in results:
        assert not isinstance(r, Exception), r
        # The gradient stays in the window; the parameters and momentum do not move.
        assert r["counts"] == (3, 1, 0)
        assert not torch.equal(r["grads"][2], r["grads"][1])
        np.testing.assert_array_equal(r["params"], results[0]["params"])
    messages = [str(w.message) for w in caught if w.category is MFACStepWarning]
    assert len(messages) == 2 and all("preconditioned step holds NaN" in m for m in messages)
    # errors="raise": every rank refuses the gradient with the step, its window as it was
    # (checked in the threads; it used to keep the gradient).
    for r in run_spmd_threads(_inf_step_threads, 2, "raise"):
        assert not isinstance(r, Exception), r
        assert "step 3: the preconditioned step holds NaN" in r["raised"]
        assert "(parameters, momentum and window unchanged)" in r["raised"]
        assert r["counts"] == (2, 0, 0)


#: Per step, the ranks whose parameters all have grad None (they run no backward).
ABSENT = [(), (1,), (0, 1), ()]


def _absent_grads(comm: Communicator) -> dict[str, Any]:
    return {errors: _absent_grads_run(comm, errors) for errors in ("skip", "raise")}


def _absent_grads_run(comm: Communicator, errors: str) -> dict[str, Any]:
    counting = CountingComm(comm)
    model = make_model()
    opt = MFAC(model.parameters(), **OPTIONS, errors=errors, comm=counting)
    out: dict[str, Any] = {"calls": [], "moved": []}
    for absent, (x, y) in zip(ABSENT, batches(len(ABSENT)), strict=True):
        opt.zero_grad()  # set_to_none: every grad None
        if comm.rank not in absent:
            F.cross_entropy(model(x), y).backward()
        params, state = flat(model), copy.deepcopy(opt.state_dict())
        counting.reset()
        opt.step()
        out["calls"].append([c.shape for c in counting.calls])
        out["moved"].append(not np.array_equal(flat(model), params))
        if comm.rank in absent and len(absent) < comm.size:
            # Its parameters have no gradient: their momentum only decays.
            key = f"rank{comm.rank}_of_{comm.size}"
            buf = [s["state"][0]["momentum_buffer"][key] for s in (state, opt.state_dict())]
            out["decayed"] = torch.equal(buf[1], OPTIONS["momentum"] * buf[0])
        if len(absent) == comm.size:
            _assert_same_tree(opt.state_dict(), state)  # no rank had a gradient: a no-op
    out["counts"] = (opt.steps, opt.skipped_steps, opt.rejected_grads)
    window = opt.ihvp.state_dict()
    out["gram"], out["slots"] = window["gram"].numpy(), window["window_slots"]
    out["window"] = opt.ihvp.window().numpy()
    return out


def test_a_rank_without_gradients_joins_the_step() -> None:
    # A rank whose parameters all have grad None used to return from step() at once:
    # the others waited in the step's reduction (a hang until the group's timeout).
    from _spmd import spawn

    runs = spawn(_absent_grads, 2, timeout=10, pooled=True)
    for r in runs:
        assert isinstance(r, dict), r
    m, d = OPTIONS["num_grads"], sum(r["skip"]["window"].shape[1] for r in runs)
    for errors in ("skip", "raise"):  # "raise": the step decided before the window commits
        results = [r[errors] for r in runs]
        for rank, r in enumerate(results):
            # The step with rank 1 empty is taken on every rank; the one without any
            # gradient on any rank is a no-op everywhere (checked in the ranks), its
            # one reduction (the Gram row's, with the status word) and nothing else.
            assert r["counts"] == (3, 0, 0)
            steps = [[(m + 20,), (d,)], [(m + 20,), (d,)], [(m + 20,)], [(m + 20,), (d,)]]
            assert r["calls"] == steps
            # A rank without gradients moves no parameter (torch's grad None), and
            # their momentum only decays.
            assert r["moved"] == [True, rank == 0, False, True]
            # The replicated window: bit for bit the same on every rank (and mode).
            np.testing.assert_array_equal(r["gram"], runs[0]["skip"]["gram"])
            np.testing.assert_array_equal(r["window"], runs[rank]["skip"]["window"])
            assert r["slots"] == results[0]["slots"]
        assert results[1]["decayed"]
    # Rank 1's columns of the second gradient (the window's last but one) are zeros
    # (its parameters had no gradient), rank 0's are its gradient's; the Gram matrix
    # is that of the whole window, every rank's columns together.
    results = [r["skip"] for r in runs]
    assert not results[1]["window"][-2].any() and results[0]["window"][-2].any()
    whole = np.concatenate([r["window"] for r in results], axis=1)
    gram = results[0]["gram"][np.ix_(results[0]["slots"], results[0]["slots"])]
    scale = float(np.max(np.sum(whole * whole, axis=1)))
    np.testing.assert_allclose(whole @ whole.T, gram, rtol=0, atol=1e-13 * scale)


def _one_rank_edit(model: Any, opt: Any, case: str) -> Any:
    """Make ``case``'s step fail on this rank alone; return what undoes it."""
    group = opt.param_groups[0]
    weight = model[0].weight
    if case in ("lr", "momentum", "sparse lr", "nan lr", "inf momentum"):
        key = case.split()[-1]
        saved = group[key]
        edits = {
            "lr": "0.1",
            "momentum": None,
            "sparse lr": torch.tensor([saved]).to_sparse(),
            "nan lr": math.nan,
            "inf momentum": math.inf,
        }
        group[key] = edits[case]
        return lambda: group.__setitem__(key, saved)
    if case == "params":  # a parameter removed from its group by hand
        removed = group["params"].pop()
        return lambda: group["params"].append(removed)
    if case == "sparse":
        dense = weight.grad
        weight.grad = dense.to_sparse()
        return lambda: setattr(weight, "grad", dense)
    if case == "expanded":  # entries that share memory (stride 0): torch writes none
        data = weight.data
        weight.data = data[:, :1].expand(data.shape)
        return lambda: setattr(weight, "data", data)
    if case == "layout":  # a masked parameter no longer dense in memory (a strided slice)
        data = weight.data
        wide = torch.zeros(data.shape[0], 2 * data.shape[1], dtype=data.dtype)
        wide[:, ::2] = data
        weight.data = wide[:, ::2]
        return lambda: setattr(weight, "data", data)
    old = weight.data
    # Either resized (p.data = ...) or float64 in a float32 optimizer (model.double()).
    weight.data = torch.zeros(3, 6) if case == "resized" else old.double()
    grad, weight.grad = weight.grad, None
    weight.grad = torch.zeros_like(weight)

    def undo() -> None:
        weight.data, weight.grad = old, None
        weight.grad = grad

    return undo


def _one_rank_fails(comm: Communicator, case: str, errors: str) -> dict[str, Any]:
    model = make_model().float()
    masks = {model[0].weight: torch.arange(48).reshape(8, 6) % 3 > 0} if case == "layout" else None
    opt = MFAC(model.parameters(), **OPTIONS, errors=errors, comm=comm, masks=masks)
    out: dict[str, Any] = {}
    for i, (x, y) in enumerate(batches(3)):
        opt.zero_grad()
        F.cross_entropy(model(x.float()), y).backward()
        undo = _one_rank_edit(model, opt, case) if i == 1 and comm.rank == 1 else None
        before = copy.deepcopy((opt.state_dict(), model.state_dict()))
        try:
            opt.step()
        except (TypeError, RuntimeError, ValueError) as exc:
            out["raised"] = (type(exc), str(exc))
            # The failed step changed nothing on any rank.
            _assert_same_tree((opt.state_dict(), model.state_dict()), before)
            if undo is not None:
                undo()
            opt.step()  # the same step again, on every rank
    out["params"] = flat(model)
    out["counts"] = (opt.steps, opt.skipped_steps, opt.rejected_grads)
    return out


#: A one-rank edit that the step refuses: its class and its message on the failing rank.
ONE_RANK_FAILURES = {
    "lr": (TypeError, "lr of parameter group 0 is '0.1'"),
    "momentum": (TypeError, "momentum of parameter group 0 is None"),
    # Read (as the ranks compare it) before the first reduction: it raised there.
    "sparse lr": (TypeError, "lr of parameter group 0 is a sparse_coo tensor"),
    "params": (RuntimeError, "no longer lists the parameters"),
    "sparse": (RuntimeError, "does not support sparse gradients"),
    "layout": (RuntimeError, "masked parameter 0 of group 0 (shape (8, 6)) is not dense"),
    "expanded": (RuntimeError, "parameter 0 of group 0 (shape (8, 6)) has entries that share"),
    "resized": (RuntimeError, "parameter 0 of group 0 (shape (3, 6)) had shape (8, 6)"),
    "float64": (RuntimeError, "parameter 0 of group 0 (shape (8, 6)) is float64"),
    # Regression: the other ranks took the ValueError for a gradient holding NaN on
    # another rank, skipped the step and counted it (errors="raise": FloatingPointError).
    "nan lr": (ValueError, "lr of parameter group 0 is nan"),
    "inf momentum": (ValueError, "momentum of parameter group 0 is inf"),
}
#: What the other ranks say, where it is not "failed on 1 other rank(s) of 3".
OTHER_RANKS_SAY = dict.fromkeys(["nan lr", "inf momentum"], "NaN or infinite on another rank")


@pytest.mark.parametrize("errors", ["skip", "raise"])
@pytest.mark.parametrize("case", sorted(ONE_RANK_FAILURES))
def test_a_check_that_fails_on_one_rank_raises_on_every_rank(case: str, errors: str) -> None:
    # The step's checks of its parameters and options ran before its first reduction:
    # the failing rank raised and the others waited in the reduction (a hang until the
    # group's timeout). Now they run inside it and every rank raises, unchanged.
    results = run_spmd_threads(_one_rank_fails, 3, case, errors, timeout=5)
    for r in results:
        assert not isinstance(r, Exception), r
    kind, message = ONE_RANK_FAILURES[case]
    assert results[1]["raised"][0] is kind and message in results[1]["raised"][1]
    for rank in (0, 2):
        assert results[rank]["raised"][0] is kind
        say = OTHER_RANKS_SAY.get(case, "failed on 1 other rank(s) of 3")
        assert say in results[rank]["raised"][1]
    # Then the step taken again on every rank: the three steps of every rank, alike.
    for r in results:
        assert r["counts"] == (3, 0, 0)
        np.testing.assert_array_equal(r["params"], results[0]["params"])


def _failing_differently(comm: Communicator, errors: str) -> Any:
    model = make_model().float()
    opt = MFAC(model.parameters(), **OPTIONS, errors=errors, comm=comm)
    x, y = batches(1)[0]
    F.cross_entropy(model(x.float()), y).backward()
    if comm.rank == 0:
        model[0].weight.grad.view(-1)[0] = float("nan")  # in rank 0's columns
    undo = _one_rank_edit(model, opt, "resized") if comm.rank == 1 else None
    try:
        opt.step()
        outcome = None
    except (FloatingPointError, RuntimeError, ValueError) as exc:
        outcome = type(exc)
    if undo is not None:
        undo()
    return outcome, (opt.steps, opt.skipped_steps, opt.rejected_grads)


@pytest.mark.parametrize("errors", ["skip", "raise"])
def test_ranks_failing_differently_decide_alike(errors: str) -> None:
    # A NaN in rank 0's part of the gradient (a ValueError in the reduction, which skips
    # the step) and a resized parameter on rank 1 (a RuntimeError): rank 1 raised its
    # own error while the others skipped the step and went on, their skip counted, to
    # wait for rank 1 in the next step. Now every rank raises the RuntimeError, as one
    # process checks its parameters before it looks for NaN: the NaN does not hide it.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always", MFACStepWarning)
        results = run_spmd_threads(_failing_differently, 3, errors, timeout=5)
    assert results == [(RuntimeError, (0, 0, 0))] * 3, results


def _options_differ(comm: Communicator, key: str, tensor: bool) -> dict[str, Any]:
    model = make_model()
    if tensor:  # one-element tensors, as a scheduler changes them in place
        options = {k: torch.tensor(OPTIONS[k]) for k in ("lr", "momentum", "weight_decay")}
        opt = MFAC(model.parameters(), **{**OPTIONS, **options}, comm=comm)
    else:
        opt = MFAC(model.parameters(), **OPTIONS, comm=comm)
    group = opt.param_groups[0]
    out: dict[str, Any] = {}
    for i, (x, y) in enumerate(batches(3)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i == 1 and comm.rank == 1:
            # As a scheduler stepped on this rank only.
            value = group[key] * 0.5
            group[key] = group[key].clone().fill_(value) if tensor else float(value)
        before = copy.deepcopy((opt.state_dict(), model.state_dict()))
        try:
            opt.step()
        except RuntimeError as exc:
            out["raised"] = str(exc)
            _assert_same_tree((opt.state_dict(), model.state_dict()), before)
            group[key] = torch.tensor(OPTIONS[key]) if tensor else OPTIONS[key]
            opt.step()
    if not tensor:
        # A weight decay of -0.0 steps as 0.0 does: not a difference.
        opt.zero_grad()
        F.cross_entropy(model(batches(4)[3][0]), batches(4)[3][1]).backward()
        group["weight_decay"] = -0.0 if comm.rank == 1 else 0.0
        opt.step()
    out["params"] = flat(model)
    out["counts"] = (opt.steps, opt.skipped_steps, opt.rejected_grads)
    return out


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
def test_ranks_whose_group_options_differ_are_refused_on_every_rank(key: str, tensor: bool) -> None:
    # The options are replicated like the window's (ranks built with different
    # num_grads, damp or errors are refused): ranks whose options differed (a scheduler
    # stepped on one rank only) moved their replicas of the parameters apart in silence.
    # The step's first reduction compares them in its tag: no reduction more.
    results = run_spmd_threads(_options_differ, 3, key, tensor, timeout=5)
    for r in results:
        assert not isinstance(r, Exception), r
        assert "the lr, momentum or weight_decay of their parameter groups" in r["raised"]
        # The step taken again with the options alike: the replicas stay equal.
        assert r["counts"] == (3 if tensor else 4, 0, 0)
        np.testing.assert_array_equal(r["params"], results[0]["params"])
    said = 0.025 if key == "lr" else 0.05
    shown = f"('tensor', {said}" if tensor else said  # a float32 tensor: 0.025000000372...
    assert f"(lr, momentum, weight_decay) per group: [({shown}" in results[1]["raised"]


def _tensor_or_number(comm: Communicator, key: str) -> bool:
    value = 0.0 if key == "momentum" else OPTIONS[key]
    option = torch.tensor(value, dtype=torch.float64) if comm.rank == 0 else value
    model = make_model()
    opt = MFAC(model.parameters(), **{**OPTIONS, key: option}, comm=comm)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    before = copy.deepcopy((opt.state_dict(), model.state_dict()))
    with pytest.raises(RuntimeError, match="the lr, momentum or weight_decay of their"):
        opt.step()
    _assert_same_tree((opt.state_dict(), model.state_dict()), before)
    return True


@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
def test_a_tensor_option_and_a_number_of_one_value_differ(key: str) -> None:
    # They compared equal (both read as float64): a zero momentum tensor writes the
    # momentum buffer where a zero float leaves it, so that once the momentum was raised
    # the replicas moved apart without a word; lr and weight decay go through other
    # kernels (addcmul_, add_ with alpha) with their own rounding.
    assert run_spmd_threads(_tensor_or_number, 2, key, timeout=5) == [True, True]


def _checkpoint_threads(comm: Communicator, saved: list[Any] | None, size_ok: bool) -> Any:
    model = make_model()
    opt = MFAC(model.parameters(), **OPTIONS, comm=comm)
    data = batches(STEPS)
    if saved is not None:
        params, state = saved[comm.rank]
        with torch.no_grad():
            for p, q in zip(model.parameters(), params, strict=True):
                p.copy_(q)
        opt.load_state_dict(state)
        data = data[4:]
    for i, (x, y) in enumerate(data):
        if saved is None and i == 4:
            snap = ([p.detach().clone() for p in model.parameters()], opt.state_dict())
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return flat(model) if saved is not None else (snap, flat(model))


def _earlier_layout(params: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    entry = dict(state["state"][0])
    (key,) = entry["window"]
    shard = {"window": entry["window"][key], "momentum_buffer": entry["momentum_buffer"][key]}
    entry.update(window=None, momentum_buffer=None, shards={key: shard})
    return params, {**state, "state": {**state["state"], 0: entry}}


def test_ddp_mode_checkpoints_resume_bit_for_bit() -> None:
    first = run_spmd_threads(_checkpoint_threads, 2, None, True)
    for r in first:
        assert not isinstance(r, Exception), r
    state = first[0][0][1]
    # This rank's window and momentum under its key (keys of the live entry: DCP's
    # flattened state dict is rebuilt from them).
    entry = state["state"][0]
    assert list(entry["window"]) == list(entry["momentum_buffer"]) == ["rank0_of_2"]
    assert "shards" not in entry
    resumed = run_spmd_threads(_checkpoint_threads, 2, [r[0] for r in first], True)
    for r, again in zip(first, resumed, strict=True):
        np.testing.assert_array_equal(again, r[1])
    # The earlier layout (both under "shards", None in their places) loads too.
    earlier = run_spmd_threads(
        _checkpoint_threads, 2, [_earlier_layout(*r[0]) for r in first], True
    )
    for r, again in zip(first, earlier, strict=True):
        np.testing.assert_array_equal(again, r[1])
    # Another world size, or ranks' shards swapped: every rank refuses, clearly.
    other = run_spmd_threads(_checkpoint_threads, 3, [first[0][0]] * 3, True, timeout=20)
    assert all(isinstance(r, ValueError) for r in other), other
    assert "world size" in str(other[0])
    swapped = run_spmd_threads(_checkpoint_threads, 2, [r[0] for r in first[::-1]], True)
    assert all(isinstance(r, ValueError) for r in swapped), swapped
    with pytest.raises(ValueError, match="built without comm"):
        MFAC(make_model().parameters(), **OPTIONS).load_state_dict(state)


def _one_rank_bad_window(comm: Communicator, edit: str) -> Any:
    model = make_model()
    opt = MFAC(model.parameters(), **OPTIONS, comm=comm)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.state_dict()
    before = copy.deepcopy(state)
    if comm.rank == 1:  # rank 1's checkpoint file is stale, or of another run
        (window,) = state["state"][0]["window"].values()
        if edit == "num_grads":
            window["num_grads"] += 1
        else:
            window["grads"] = window["grads"].to(torch.float32)
    try:
        opt.load_state_dict(state)
    except ValueError as exc:
        failed = str(exc)
    else:
        failed = None
    after = opt.state_dict()
    same = all(
        torch.equal(torch.as_tensor(a), torch.as_tensor(b))
        for a, b in zip(_leaves(before), _leaves(after), strict=True)
    )
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the group still works
    return failed, same, opt.steps


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree, key=str) for leaf in _leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree] if isinstance(tree, (torch.Tensor, int, float)) else []


@pytest.mark.parametrize("edit", ["num_grads", "dtype"])
def test_a_window_state_bad_on_one_rank_is_refused_on_every_rank(edit: str) -> None:
    # Regression: the window's sizes and dtype were checked after the collective check of
    # the rest of the state, on each rank alone: the bad rank raised, the other waited in
    # the window's own collective check until the group's timeout (30 min by default).
    results = run_spmd_threads(_one_rank_bad_window, 2, edit, timeout=20)
    for r in results:
        assert not isinstance(r, Exception), r
    assert "the MFAC state's 'window'" in results[1][0]
    assert "failed on 1 other rank(s) of 2" in results[0][0]
    assert all(r[1] and r[2] == 2 for r in results), results


def _permuted_threads(comm: Communicator, permuted: tuple[int, ...]) -> Any:
    gen = torch.Generator().manual_seed(0)
    a, b = (nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (5, 3))
    opt = MFAC([a, b], **OPTIONS, comm=comm)
    a.grad, b.grad = torch.ones(5, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    opt.step()
    state = opt.state_dict()
    c, d = (nn.Parameter(p.detach().clone()) for p in (a, b))
    try:
        target = MFAC([d, c] if comm.rank in permuted else [c, d], **OPTIONS, comm=comm)
    except ValueError as exc:
        return str(exc), None
    try:
        target.load_state_dict(state)
    except ValueError as exc:
        return str(exc), target.steps
    return None, target.steps


def test_a_distributed_state_of_parameters_in_another_order_is_refused_on_every_rank() -> None:
    # The parameters' shapes are global (the same on every rank, kept once by DCP); a
    # mismatch is refused on every rank, before anything changes.
    results = run_spmd_threads(_permuted_threads, 2, (0, 1))
    for r in results:
        assert not isinstance(r, Exception), r
        assert r[0] is not None and r[1] == 0, r
        assert "parameter 0 of group 0 has shape (5,) in the state, (3,)" in r[0]
    # One rank's parameters in another order: refused on every rank when built, as the
    # ranks' layouts differ (the load was refused; the window, never compared, would
    # have stepped other coordinates on each rank).
    for r in run_spmd_threads(_permuted_threads, 2, (1,)):
        assert not isinstance(r, Exception), r
        assert r[1] is None and "the same parameters on every rank" in r[0], r


def test_ranks_built_with_different_errors_are_refused_on_every_rank() -> None:
    # errors= decides collectively (a strict step refuses its gradient before the window
    # commits, a lenient one keeps it and may step with the previous window, one more
    # reduction): ranks built with different ones diverged at their first step not finite,
    # every later step refused as "replicated states diverged", where the window's own
    # options (num_grads, damp, ...) are compared at construction.
    def rank(comm: Communicator) -> Any:
        errors = ("skip", "raise")[comm.rank % 2]
        try:
            MFAC(make_model().parameters(), **OPTIONS, errors=errors, comm=comm)
        except ValueError as exc:
            refused = str(exc)
        else:
            refused = None
        return refused

    for r in run_spmd_threads(rank, 2):
        assert isinstance(r, str), r
        assert "the same errors on every rank (this rank's is" in r, r


#: A construction that fails on one rank: the keywords given to that rank only, and
#: the class and message of its refusal.
ONE_RANK_CONSTRUCTIONS: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "grad_dtype bfloat16": (
        {"grad_dtype": torch.bfloat16},
        ValueError,
        "not available for a distributed optimizer",
    ),
    "grad_dtype float64": ({"grad_dtype": torch.float64}, TypeError, "grad_dtype must be None"),
    "negative damp": ({"damp": -1.0}, ValueError, "damp must be finite and > 0"),
    "zero damp": ({"damp": 0.0}, ValueError, "damp must be finite and > 0"),
    "num_grads": ({"num_grads": 0}, ValueError, "num_grads must be >= 1"),
    "negative lr": ({"lr": -1.0}, ValueError, "lr must be finite"),
    "nan lr": ({"lr": math.nan}, ValueError, "lr must be finite"),
    "momentum": ({"momentum": 2.0}, ValueError, "momentum must be finite and lie in [0, 1)"),
    "errors": ({"errors": "bogus"}, ValueError, "errors must be one of"),
    "zero_init": ({"zero_init": "yes"}, TypeError, "zero_init must be True or False"),
    "masks": ({"masks": "bad"}, TypeError, "masks must be a dict"),
    "params": ({"params": 3}, TypeError, "not iterable"),
    "expanded": ({"params": "expanded"}, ValueError, "has entries that share memory"),
}


def _one_rank_constructs_badly(comm: Communicator, case: str) -> Any:
    model = make_model().float()
    options: dict[str, Any] = {"params": model.parameters(), **OPTIONS}
    if comm.rank == 1:
        options.update(ONE_RANK_CONSTRUCTIONS[case][0])
        if options["params"] == "expanded":
            expanded = nn.Parameter(torch.zeros(3, 1).expand(3, 4))
            options["params"] = [*model.parameters(), expanded]
    try:
        MFAC(**options, comm=comm)
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("case", sorted(ONE_RANK_CONSTRUCTIONS))
def test_a_bad_argument_on_one_rank_is_refused_on_every_rank(case: str) -> None:
    # Regression: the constructor checked its arguments before any reduction: the rank
    # given a bad one raised at once, the others waited in the window's reduction (a
    # hang until gloo's timeout). Now every rank raises, in the construction's first
    # reduction, as ShardedDynamicIHVP does: that rank its own error, the others one of
    # its class naming how many ranks failed.
    results = run_spmd_threads(_one_rank_constructs_badly, 3, case, timeout=10)
    _, kind, message = ONE_RANK_CONSTRUCTIONS[case]
    assert results[1][0] is kind and message in results[1][1], results[1]
    for rank in (0, 2):
        assert results[rank] == (kind, results[rank][1]), results[rank]
        assert "MFAC failed on 1 other rank(s) of 3" in results[rank][1], results[rank]


def _layouts(comm: Communicator, case: str) -> Any:
    gen = torch.Generator().manual_seed(0)
    a = nn.Parameter(torch.randn(3, 4, generator=gen))
    b = nn.Parameter(torch.randn(5, generator=gen))
    keep = torch.tensor([True, True, False, False, True])
    masks: dict[Any, Any] | None = {b: keep}
    params: Any = [a, b]
    other = comm.rank == 1
    if case == "masks elsewhere" and other:
        masks = {b: keep.flip(0)}
    elif case == "masks kept counts" and other:
        masks = {b: torch.ones(5, dtype=torch.bool).logical_and(torch.arange(5) > 0)}
    elif case == "mask and none" and other:
        masks = None
    elif case == "all-kept mask and none" and other:  # other operations, other rounding
        masks = {b: torch.ones(5, dtype=torch.bool)}
    elif case == "equal masks":  # copies of one mask
        masks = {b: keep.clone()}
    elif case == "order" and other:
        params = [b, a]
    elif case == "shapes" and other:
        a.data = a.data.reshape(4, 3)  # the same number of coordinates
    elif case == "dtypes" and other:
        b.data = b.data.double()
    elif case == "groups" and other:
        params = [{"params": [a]}, {"params": [b]}]
    try:
        opt = MFAC(params, lr=0.1, num_grads=3, damp=0.1, comm=comm, masks=masks)
    except ValueError as exc:
        return str(exc)
    for _ in range(2):
        for p in (a, b):
            p.grad = torch.ones_like(p)
        opt.step()
    return torch.cat([a.detach().reshape(-1), b.detach().double()])


@pytest.mark.parametrize(
    "case",
    [
        "masks elsewhere",
        "masks kept counts",
        "mask and none",
        "all-kept mask and none",
        "equal masks",
        "order",
        "shapes",
        "dtypes",
        "groups",
    ],
)
def test_ranks_whose_layouts_differ_are_refused_on_every_rank(case: str) -> None:
    # Regression: masks keeping as many coordinates elsewhere, or parameters in another
    # order, built and stepped without a word, the window's columns other coordinates on
    # each rank: the replicas diverged. Masks keeping other counts raised "ranks reduced
    # arrays of different shapes" at the first step. Now every rank raises at
    # construction, naming what differs.
    results = run_spmd_threads(_layouts, 2, case, timeout=10)
    if case == "equal masks":
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
        return
    what = "the same masks on every rank" if "mask" in case else "the same parameters on every"
    for r in results:
        assert isinstance(r, str) and what in r and "rank(s) [1] differ from rank 0" in r, r


def test_distributed_optimizers_do_not_pickle() -> None:
    import pickle

    def rank(comm: Communicator) -> Any:
        opt = MFAC(make_model().parameters(), **OPTIONS, comm=comm)
        with pytest.raises(TypeError, match="state_dict"):
            pickle.dumps(opt)

    for r in run_spmd_threads(rank, 2):
        assert r is None, r


# -- processes: torch's DDP and FSDP2, torch.distributed.checkpoint ----------------------------


def _train(model: Any, opt: Any, data: list[Any], comm: Communicator) -> None:
    half = data[0][0].shape[0] // comm.size
    for x, y in data:
        rows = slice(comm.rank * half, (comm.rank + 1) * half)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()


def _gloo_optimizer(comm: Communicator, root: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    out: dict[str, Any] = {}
    data = batches(STEPS + 3)
    # DDP: each rank its half of every batch; DDP averages the gradients.
    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = MFAC(model.parameters(), **OPTIONS, comm=comm)
    _train(ddp, opt, data[:STEPS], comm)
    out["ddp"] = flat(model)
    # FSDP2's usual recipe: each layer, then the root, with no mesh=: each call makes
    # its own mesh, equal to the others (so here, before any mesh of this process, which
    # later calls reuse). Regression: refused as not "DTensors of one 1-D device mesh".
    layered = make_model()
    for layer in (layered[0], layered[2]):
        fully_shard(layer)
    fully_shard(layered)
    out["meshes"] = len({id(p.device_mesh) for p in layered.parameters()})
    lopt = MFAC(layered.parameters(), **OPTIONS)
    _train(layered, lopt, data[:STEPS], comm)
    out["fsdp_layers"] = flat(layered)
    # FSDP2: parameters and gradients are DTensors sharded on dimension 0.
    mesh = init_device_mesh("cpu", (comm.size,))
    sharded = make_model()
    fully_shard(sharded, mesh=mesh)
    fopt = MFAC(sharded.parameters(), **OPTIONS)
    # A bad damp on one rank, no comm: every rank raises, in the first reduction over the
    # parameters' mesh (it raised on rank 1 alone, rank 0 waited for gloo's timeout).
    try:
        MFAC(sharded.parameters(), **{**OPTIONS, "damp": -1.0 if comm.rank else 0.1})
    except ValueError as exc:
        out["fsdp_refused"] = str(exc)
    try:  # named parameters too: the mesh was looked for in tensors alone
        MFAC(sharded.named_parameters(), **{**OPTIONS, "damp": -1.0 if comm.rank else 0.1})
    except ValueError as exc:
        out["fsdp_refused_named"] = str(exc)
    _train(sharded, fopt, data[:4], comm)
    path = os.path.join(root, "fsdp")
    dcp.save({"model": sharded.state_dict(), "optim": fopt.state_dict()}, checkpoint_id=path)
    _train(sharded, fopt, data[4:STEPS], comm)
    out["fsdp"] = flat(sharded)
    out["fsdp_window"] = fopt.ihvp.dim
    after = [fopt.state_dict()["state"][0]["window"], fopt.steps]
    # Restore from the checkpoint into fresh objects: the same steps, bit for bit.
    again = make_model(seed=1)
    fully_shard(again, mesh=mesh)
    aopt = MFAC(again.parameters(), **OPTIONS)
    state = {"model": again.state_dict(), "optim": aopt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    again.load_state_dict(state["model"])
    aopt.load_state_dict(state["optim"])
    _train(again, aopt, data[4:STEPS], comm)
    out["restored"] = flat(again)
    # The same through torch.distributed.checkpoint.state_dict's API (sharded, FQN keys).
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    third = make_model(seed=2)
    fully_shard(third, mesh=mesh)
    topt = MFAC(third.parameters(), **OPTIONS)
    _train(third, topt, data[:4], comm)
    path = os.path.join(root, "fsdp-api")
    steps = topt.steps
    dcp.save({"optim": get_optimizer_state_dict(third, topt)}, checkpoint_id=path)
    out["api_no_step"] = topt.steps == steps == 4
    fourth = make_model(seed=3)
    fully_shard(fourth, mesh=mesh)
    fopt4 = MFAC(fourth.parameters(), **OPTIONS)
    with torch.no_grad():
        for p, q in zip(fourth.parameters(), third.parameters(), strict=True):
            p.to_local().copy_(q.to_local())
    state = {"optim": get_optimizer_state_dict(fourth, fopt4)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(fourth, fopt4, state["optim"])
    _train(third, topt, data[4:STEPS], comm)
    _train(fourth, fopt4, data[4:STEPS], comm)
    out["api_restored"] = bool(np.array_equal(flat(third), flat(fourth)))
    # Flattened (as for pipeline parallelism) and full state dicts, loaded in memory.
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    out["options_restored"] = {}
    for name, options in (
        ("flatten", StateDictOptions(flatten_optimizer_state_dict=True)),
        ("full", StateDictOptions(full_state_dict=True)),
    ):
        source = make_model(seed=4)
        fully_shard(source, mesh=mesh)
        sopt = MFAC(source.parameters(), **OPTIONS)
        _train(source, sopt, data[:3], comm)
        saved = get_optimizer_state_dict(source, sopt, options=options)
        target = make_model(seed=5)
        fully_shard(target, mesh=mesh)
        topt5 = MFAC(target.parameters(), **OPTIONS)
        with torch.no_grad():
            for p, q in zip(target.parameters(), source.parameters(), strict=True):
                p.to_local().copy_(q.to_local())
        set_optimizer_state_dict(target, topt5, saved, options=options)
        _train(source, sopt, data[3:5], comm)
        _train(target, topt5, data[3:5], comm)
        out["options_restored"][name] = bool(np.array_equal(flat(source), flat(target)))
    window, restored = after[0][aopt._shard_key], aopt.state_dict()["state"][0]["window"]
    out["same_window"] = all(
        torch.equal(torch.as_tensor(v), torch.as_tensor(restored[aopt._shard_key][k]))
        for k, v in window.items()
        if not isinstance(v, (list, int, float, bool))
    )
    # A NaN in one rank's shard of the gradient: every rank skips the step.
    x, y = data[STEPS]
    fopt.zero_grad()
    F.cross_entropy(sharded(x), y).backward()
    if comm.rank == 1:
        next(iter(sharded.parameters())).grad.to_local().view(-1)[0] = float("nan")
    before = flat(sharded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MFACStepWarning)
        fopt.step()
    out["skip"] = (
        fopt.skipped_steps,
        bool(np.array_equal(before, flat(sharded))),
        [str(w.message) for w in caught],
    )
    # Rank 1's shards without gradients (grad None): every rank steps, rank 1 moves
    # none of its shards; then no rank with one: a no-op on every rank.
    moved = []
    for absent in ((1,), (0, 1)):
        fopt.zero_grad()
        F.cross_entropy(sharded(x), y).backward()
        if comm.rank in absent:
            for p in sharded.parameters():
                p.grad = None
        mine = [p.to_local().clone() for p in sharded.parameters()]
        fopt.step()
        moved.append(
            any(
                not torch.equal(p.to_local(), q)
                for p, q in zip(sharded.parameters(), mine, strict=True)
            )
        )
    out["absent"] = (moved, fopt.steps)
    # Rank 1's lr edited into a string, then only halved (a scheduler stepped there
    # only): every rank raises, promptly (it waited for gloo's timeout), and no rank moves.
    group, before = fopt.param_groups[0], flat(sharded)
    out["one_rank"] = []
    for edited in ("0.05", OPTIONS["lr"] / 2):
        fopt.zero_grad()
        F.cross_entropy(sharded(x), y).backward()
        if comm.rank == 1:
            group["lr"] = edited
        try:
            fopt.step()
        except (TypeError, RuntimeError) as exc:
            out["one_rank"].append(type(exc).__name__)
        group["lr"] = OPTIONS["lr"]
    out["one_rank"].append(bool(np.array_equal(before, flat(sharded))) and fopt.steps)
    return out


def test_ddp_and_fsdp2_over_gloo() -> None:
    pytest.importorskip("torch.distributed.fsdp")
    from _spmd import spawn

    with tempfile.TemporaryDirectory() as root:
        results = spawn(_gloo_optimizer, 2, root, timeout=60)
    for r in results:
        assert isinstance(r, dict), r
    want = reference()
    for r in results:
        np.testing.assert_array_equal(r["ddp"], results[0]["ddp"])
        assert_params_close(r["ddp"], want)
        assert_params_close(r["fsdp"], want)
        np.testing.assert_array_equal(r["restored"], r["fsdp"])
        np.testing.assert_array_equal(r["fsdp_layers"], r["fsdp"])
        assert r["meshes"] == 2, r["meshes"]
        assert r["api_no_step"] and r["api_restored"]
        assert r["options_restored"] == {"flatten": True, "full": True}, r["options_restored"]
        assert r["same_window"]
        assert r["skip"][:2] == (1, True), r["skip"]
    for key in ("fsdp_refused", "fsdp_refused_named"):
        assert "MFAC failed on 1 other rank(s) of 2" in results[0][key]
        assert "damp must be finite and > 0, got -1.0" in results[1][key]
    assert [r["absent"] for r in results] == [
        ([True, False], STEPS + 1),
        ([False, False], STEPS + 1),
    ]
    assert [r["one_rank"] for r in results] == [["TypeError", "RuntimeError", STEPS + 1]] * 2
    # FSDP2 shards each parameter's rows: the window holds this rank's local shards only.
    assert sum(r["fsdp_window"] for r in results) == want.size


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_two_byte_windows_are_not_distributed(grad_dtype: torch.dtype) -> None:
    from mfac_core.distributed import SingleProcessComm

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="not available for a distributed optimizer"):
        MFAC(
            model.parameters(), lr=0.1, num_grads=4, grad_dtype=grad_dtype, comm=SingleProcessComm()
        )


def test_two_byte_parameters_are_told_the_float32_window_that_works() -> None:
    # Regression: 2-byte parameters (whose window is 2-byte by default) were refused with
    # "use float32 or float64 parameters and no 2-byte grad_dtype", which names no way out
    # for the parameters given, while grad_dtype=torch.float32 works for them.
    from mfac_core.distributed import SingleProcessComm

    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"grad_dtype=torch\.float32"):
        MFAC(model.parameters(), lr=0.1, num_grads=4, comm=SingleProcessComm())
    opt = MFAC(
        model.parameters(), lr=0.1, num_grads=4, comm=SingleProcessComm(), grad_dtype=torch.float32
    )
    assert opt.ihvp.dtype == torch.float32 and opt.ihvp.storage_dtype is None


def test_distributed_window_is_the_sharded_class() -> None:
    from mfac_core import DynamicIHVP, ShardedDynamicIHVP
    from mfac_core.distributed import SingleProcessComm

    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated spelling inside
        opt = MFAC(model.parameters(), lr=0.1, num_grads=4, comm=SingleProcessComm())
        single = MFAC(torch.nn.Linear(3, 2).parameters(), lr=0.1, num_grads=4)
    assert type(opt.ihvp) is ShardedDynamicIHVP and opt.ihvp.comm is opt._comm
    assert type(single.ihvp) is DynamicIHVP
