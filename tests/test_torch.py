"""mfac_core.torch: the MFAC optimizer against dense NumPy steps, checkpoints, the pruner."""

from __future__ import annotations

import copy
import io
import logging
import math
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _torch_models import batches, make_model, train  # noqa: E402

from mfac_core import FactorizationError, IllConditionedWarning, pruning  # noqa: E402
from mfac_core.torch import MFAC, MFACPruner, MFACStepWarning  # noqa: E402

nn = torch.nn
F = torch.nn.functional


def dense_step(
    window: list[np.ndarray], g: np.ndarray, damp: float, m: int, zero_init: bool
) -> np.ndarray:
    """``F^{-1} g`` with the dense inverse of the window's damped Fisher (float64)."""
    d = g.size
    rows = np.array(window[-m:]).reshape(-1, d)
    scale = m if zero_init else rows.shape[0]
    Fm = damp * np.eye(d) + rows.T @ rows / scale
    return np.linalg.solve(Fm, g)


def flat_params(params) -> np.ndarray:
    return np.concatenate([p.detach().numpy().reshape(-1) for p in params])


# -- the optimizer ------------------------------------------------------------------------


@pytest.mark.parametrize("zero_init", [True, False])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.01)])
def test_step_matches_dense_inverse(zero_init, momentum, weight_decay):
    model = make_model()
    params = list(model.parameters())
    m, damp, lr = 3, 1e-2, 0.05
    opt = MFAC(
        params,
        lr=lr,
        num_grads=m,
        damp=damp,
        momentum=momentum,
        weight_decay=weight_decay,
        zero_init=zero_init,
    )
    window: list[np.ndarray] = []
    buf = np.zeros(opt.dim)
    for x, y in batches(1, 6):  # more steps than the window holds
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        theta = flat_params(params)
        g = np.concatenate([p.grad.numpy().reshape(-1) for p in params]) + weight_decay * theta
        window.append(g)
        s = dense_step(window, g, damp, m, zero_init)
        buf = momentum * buf + s
        opt.step()
        np.testing.assert_allclose(flat_params(params), theta - lr * buf, rtol=1e-9, atol=1e-11)
    assert opt.steps == 6


def test_per_group_learning_rate():
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = MFAC([{"params": first}, {"params": second, "lr": 0.5}], lr=0.1, num_grads=4, damp=1e-2)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    window = []
    for x, y in batches(2, 3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = flat_params(first + second)
        g = np.concatenate([p.grad.numpy().reshape(-1) for p in first + second])
        window.append(g)
        s = dense_step(window, g, 1e-2, 4, True)
        opt.step()
        n1 = sum(p.numel() for p in first)
        lr = np.where(np.arange(opt.dim) < n1, 0.1, 0.5)
        np.testing.assert_allclose(
            flat_params(first + second), before - lr * s, rtol=1e-9, atol=1e-11
        )


def test_params_without_grad_contribute_zeros_and_stay():
    model = make_model()
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    params = [*model.parameters(), unused]
    opt = MFAC(params, lr=0.1, num_grads=4, damp=1e-2)
    window = []
    for x, y in batches(3, 3):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        assert unused.grad is None
        before = flat_params(params)
        g = np.concatenate([p.grad.numpy().reshape(-1) for p in params[:-1]] + [np.zeros(2)])
        window.append(g)
        s = dense_step(window, g, 1e-2, 4, True)
        opt.step()
        want = before - 0.1 * s
        want[-2:] = 1.0  # not moved
        np.testing.assert_allclose(flat_params(params), want, rtol=1e-9, atol=1e-11)


def test_closure_and_float32():
    model = make_model(dtype=torch.float32)
    opt = MFAC(model.parameters(), lr=1e-2, num_grads=4, damp=1e-3)
    x, y = batches(4, 1, dtype=torch.float32)[0]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(10):
        last = opt.step(closure)
    assert last < first
    assert opt.ihvp.dtype == torch.float32 and opt.ihvp.device == torch.device("cpu")


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_state_dict_resumes_bit_for_bit(momentum):
    data = batches(5, 14)
    kw = {"lr": 0.05, "num_grads": 4, "damp": 1e-3, "momentum": momentum, "weight_decay": 1e-3}
    model = make_model(7)
    opt = MFAC(model.parameters(), **kw)
    train(model, opt, data[:6])  # past the window size: incremental updates happen
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[6:])

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    fresh = make_model(99)  # different initial weights, overwritten by the checkpoint
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = MFAC(fresh.parameters(), **kw)
    fresh_opt.load_state_dict(ckpt["opt"])
    assert fresh_opt.steps == 6
    train(fresh, fresh_opt, data[6:])
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_is_a_snapshot():
    model = make_model()
    opt = MFAC(model.parameters(), lr=0.1, num_grads=3, damp=1e-2, momentum=0.9)
    train(model, opt, batches(6, 2))
    state = opt.state_dict()
    grads = state["state"][0]["window"]["grads"].clone()
    mom = state["state"][0]["momentum_buffer"].clone()
    train(model, opt, batches(7, 2))
    assert torch.equal(state["state"][0]["window"]["grads"], grads)
    assert torch.equal(state["state"][0]["momentum_buffer"], mom)


def test_optimizer_errors():
    a = nn.Parameter(torch.zeros(3))
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        MFAC([a, meta], num_grads=2)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        MFAC([torch.zeros(3, dtype=torch.int64)], num_grads=2)
    with pytest.raises(ValueError, match="empty"):
        MFAC([], num_grads=2)
    with pytest.raises(ValueError, match="lr"):
        MFAC([a], lr=-1.0, num_grads=2)
    with pytest.raises(ValueError, match="momentum"):
        MFAC([a], momentum=1.0, num_grads=2)
    with pytest.raises(ValueError, match="num_grads"):
        MFAC([a], num_grads=0)
    with pytest.raises(ValueError, match="damp"):
        MFAC([a], damp=0.0, num_grads=2)
    with pytest.raises(ValueError, match="errors"):
        MFAC([a], num_grads=2, errors="ignore")
    # Per-group values are checked like the defaults; window options are not per group.
    with pytest.raises(ValueError, match="lr of the parameter group"):
        MFAC([{"params": [a], "lr": -1.0}], num_grads=2)
    with pytest.raises(ValueError, match="momentum of the parameter group"):
        MFAC([{"params": [a], "momentum": 1.5}], num_grads=2)
    with pytest.raises(ValueError, match="whole MFAC optimizer"):
        MFAC([{"params": [a], "damp": 1e-3}], num_grads=2)
    opt = MFAC([a], num_grads=2)
    with pytest.raises(ValueError, match="dtype"):  # would make the steps float64
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1, dtype=torch.float64))]})
    assert len(opt.param_groups) == 1 and opt.dim == 3
    state = opt.state_dict()
    del state["state"][0]
    with pytest.raises(ValueError, match="under the id of one parameter"):
        opt.load_state_dict(state)
    other = MFAC([nn.Parameter(torch.zeros(4))], num_grads=2)
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())


def test_meta_parameters_are_refused_clearly():
    # Regression: "Tensor.item() cannot be called on meta tensors" from the window's
    # factorisation, deep inside the constructor.
    model = nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match=r"meta device.*materialise the model"):
        MFAC(model.parameters(), num_grads=2)
    with pytest.raises(ValueError, match=r"meta device.*materialise the model"):
        MFACPruner(model)


def test_pruner_refuses_weights_without_entries():
    # Regression: built over a model whose only weight had no entries, sparsity() raised
    # ZeroDivisionError and prune() named an internal "theta". A zero-size weight beside
    # others is pruned with them (it has nothing to prune).
    with pytest.raises(ValueError, match=r"hold no entries \('0' all of size 0\)"):
        MFACPruner(nn.Sequential(nn.Linear(0, 3)))
    pruner = MFACPruner(nn.Sequential(nn.Linear(0, 3), nn.Linear(3, 2)))
    assert pruner.dim == 6 and pruner.sparsity() == 0.0


def test_pruner_names_the_layer_of_a_non_finite_kept_weight():
    # Regression: named by its place in the flat vector of all weights ("theta[37] is
    # nan"), which the pruner's user never sees. A pruned weight may hold anything.
    model = make_model(6)
    pruner = MFACPruner(model, num_grads=4, block_size=8)
    with torch.no_grad():
        model[2].weight[1, 2] = float("nan")
    weights = {name: w.detach().clone() for name, w in pruner.weights.items()}
    with pytest.raises(ValueError, match=r"weight '2'\[1, 2\] is nan \(a weight that its mask"):
        pruner.prune(loader(), F.cross_entropy, sparsity=0.5)
    for name, w in pruner.weights.items():  # as before the call
        assert torch.equal(w.nan_to_num(), weights[name].nan_to_num()), name
    pruner.masks["2"][1, 2] = False
    pruner.prune(loader(), F.cross_entropy, sparsity=0.5)
    assert model[2].weight[1, 2] == 0


def test_pruner_checks_num_grads_as_its_load_and_the_optimizer_do():
    # Regression: a num_grads that is not an int (2.0, True, None) was a ValueError, unlike
    # MFAC's, DynamicIHVP's and the pruner's own load_state_dict's TypeError, and a NumPy
    # integer (from a grid of options) was refused as "must be an int >= 1, got np.int64(8)".
    model = nn.Linear(3, 2)
    for bad in (2.0, True, None, "8"):
        with pytest.raises(TypeError, match="num_grads must be an int"):
            MFACPruner(model, num_grads=bad)
    with pytest.raises(ValueError, match="num_grads must be >= 1, got 0"):
        MFACPruner(model, num_grads=0)
    pruner = MFACPruner(model, num_grads=np.int64(8))
    assert pruner.num_grads == 8 and type(pruner.num_grads) is int
    assert pruner.state_dict()["options"]["num_grads"] == 8


def test_pruner_refuses_a_damping_whose_shift_overflows_when_built():
    # Regression: accepted, then refused by the first prune() after its m forward and
    # backward passes (m damp, the capacitance's shift, beyond float64's range).
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^damp=1e\+307 is too large for 64 gradients"):
        MFACPruner(model, num_grads=64, damp=1e307)
    assert MFACPruner(model, num_grads=2, damp=1e307).damp == 1e307
    # A grid of dampings: refused by prune() before the loader is read.
    pruner = MFACPruner(model, num_grads=64)

    def loader():
        raise AssertionError("the loader was read")
        yield

    with pytest.raises(ValueError, match=r"^dampings\[1\]=1e\+307 is too large for 64"):
        pruner.prune(loader(), F.mse_loss, sparsity=0.5, dampings=[1e-3, 1e307], select_damp=len)


def test_a_group_that_would_change_the_window_dtype_says_so():
    # Regression: "would change the step's dtype from torch.float32 to torch.float32
    # (or the window's)": the step's dtype did not change, the window's did.
    opt = MFAC([nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], num_grads=2)
    extra = {"params": [nn.Parameter(torch.zeros(2))]}
    with pytest.raises(ValueError, match=r"window's storage dtype from torch\.bfloat16 to"):
        opt.add_param_group(dict(extra))
    assert (opt.dim, len(opt.param_groups), opt.grad_dtype) == (3, 1, torch.bfloat16)
    kept = MFAC(
        [nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))],
        num_grads=2,
        grad_dtype=torch.bfloat16,
    )
    kept.add_param_group(dict(extra))
    assert (kept.dim, kept.grad_dtype) == (5, torch.bfloat16)


def test_a_step_after_model_double_is_refused():
    # Regression: the float32 window and step rounded every update of the now float64
    # parameters to float32, silently. A half() model is stepped in float32, as built.
    model = nn.Linear(3, 2)
    opt = MFAC(model.parameters(), lr=0.1, num_grads=2)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    opt.step()
    model.double()
    model(x.double()).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"parameter 0 of group 0 \(shape \(2, 3\)\) is float64"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.steps == 1
    model.half()
    opt.zero_grad()
    model(x.half()).sum().backward()
    opt.step()
    assert opt.steps == 2


def test_a_step_after_a_parameter_was_resized_is_refused():
    # Regression: "The size of tensor a (6) must match the size of tensor b (12)".
    for masked in (False, True):
        model = nn.Linear(3, 2)
        masks = {model.weight: torch.ones(2, 3, dtype=torch.bool)} if masked else None
        opt = MFAC(model.parameters(), lr=0.1, num_grads=2, masks=masks)
        with torch.no_grad():
            model.weight.data = torch.randn(4, 3)
            model.bias.data = torch.randn(4)
        model(torch.randn(5, 3)).sum().backward()
        with pytest.raises(
            RuntimeError, match=r"parameter 0 of group 0 .* had shape \(2, 3\) when"
        ):
            opt.step()
        assert opt.steps == 0


def test_a_step_after_a_parameter_was_reshaped_is_refused():
    # Regression: an unmasked parameter's size alone was compared; a transposed .data of
    # the same size stepped in other coordinates than the window's (46 % off, no error).
    for masked in (False, True):
        model = nn.Linear(3, 4)
        masks = {model.weight: torch.ones(4, 3, dtype=torch.bool)} if masked else None
        opt = MFAC(model.parameters(), lr=0.1, num_grads=2, masks=masks)
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
        with torch.no_grad():
            model.weight.data = model.weight.data.t().contiguous()
        model.weight.grad = torch.randn(3, 4)
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(RuntimeError, match=r"\(shape \(3, 4\)\) had shape \(4, 3\) when"):
            opt.step()
        # Nor through a copy, or a state loaded into an optimizer built over the new shape.
        twin = copy.deepcopy(opt)  # its parameters are copies, without gradients
        for p in twin.param_groups[0]["params"]:
            p.grad = torch.randn(p.shape)
        with pytest.raises(RuntimeError, match=r"had shape \(4, 3\) when"):
            twin.step()
        fresh = MFAC(model.parameters(), lr=0.1, num_grads=2, masks=None)
        with pytest.raises(ValueError, match="the MFAC state is of other parameters"):
            fresh.load_state_dict(opt.state_dict())
        extra = nn.Parameter(torch.zeros(2))
        with pytest.raises(RuntimeError, match=r"of shape \(3, 4\) had shape \(4, 3\) when"):
            opt.add_param_group({"params": [extra]})
        assert opt.steps == 1 and len(opt.param_groups) == 1
        after = opt.state_dict()
        assert after["param_groups"] == before["param_groups"]
        was, now = before["state"][0], after["state"][0]
        assert torch.equal(now["momentum_buffer"], was["momentum_buffer"])
        assert torch.equal(now["window"]["grads"], was["window"]["grads"])


def test_parameters_whose_entries_share_memory_are_refused_before_anything_changes():
    # Regression: an expanded parameter (stride 0) failed in the middle of the step with
    # torch's in-place error, after the window had taken the gradient and the parameters
    # before it had moved (steps not counted: a retry inserted the gradient twice).
    gen = torch.Generator().manual_seed(0)
    q = nn.Parameter(torch.randn(4, generator=gen))
    expanded = nn.Parameter(torch.randn(3, 1, generator=gen).expand(3, 4))
    share = r"parameter 1 of group 0 \(shape \(3, 4\), strides \(1, 0\)\) has entries that share"
    with pytest.raises(ValueError, match=share):
        MFAC([q, expanded], lr=0.1, num_grads=2)
    opt = MFAC([q], lr=0.1, num_grads=2)
    with pytest.raises(
        ValueError, match=share.replace("group 0", "group 1").replace("1 of", "0 of")
    ):
        opt.add_param_group({"params": [expanded]})
    assert len(opt.param_groups) == 1 and opt.dim == 4
    # Made so after construction (its .data replaced): refused by the step, unchanged.
    p = nn.Parameter(torch.randn(3, 4, generator=gen))
    opt = MFAC([q, p], lr=0.1, num_grads=2, damp=1e-2)
    p.data = torch.randn(3, 1, generator=gen).expand(3, 4)
    q.grad, p.grad = torch.randn(4, generator=gen), torch.randn(3, 4, generator=gen)
    before = copy.deepcopy((opt.state_dict(), q.detach().clone()))
    with pytest.raises(RuntimeError, match=r"parameter 1 of group 0 .* share memory .* nothing"):
        opt.step()
    after = (opt.state_dict(), q.detach())
    assert torch.equal(after[1], before[1]) and opt.steps == 0
    assert torch.equal(
        after[0]["state"][0]["window"]["grads"], before[0]["state"][0]["window"]["grads"]
    )
    assert after[0]["state"][0]["window"]["edits"] == before[0]["state"][0]["window"]["edits"]
    p.data = p.data.clone()  # memory of its own: the same step goes through, once
    opt.step()
    assert opt.steps == 1
    # A stride 0 along a dimension of size 1 shares nothing (torch writes it): accepted;
    # so are a tensor without entries and a frozen expanded one, which no step writes
    # (a fixed positional table), as they were before.
    MFAC([nn.Parameter(torch.randn(3, 1).expand(3, 1))], lr=0.1, num_grads=2).step()
    empty = nn.Parameter(torch.zeros(1, 0).expand(4, 0))
    table = nn.Parameter(torch.randn(1, 4, generator=gen).expand(6, 4), requires_grad=False)
    opt = MFAC([q, empty, table], lr=0.1, num_grads=2)
    q.grad = torch.randn(4, generator=gen)
    opt.step()
    assert opt.steps == 1


@pytest.mark.parametrize("kind", ["nested", "sparse_coo", "sparse_csr"])
def test_parameters_that_are_not_dense_are_refused_clearly(kind: str) -> None:
    # Regression: a nested parameter failed deep inside the construction ("Internal
    # error: NestedTensorImpl doesn't support sizes"); a sparse one was taken, and then
    # every step refused its (sparse) gradient.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nested and CSR are prototypes/beta
        if kind == "nested":
            data = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])
        else:
            data = (
                torch.randn(3, 3).to_sparse_csr()
                if kind == "sparse_csr"
                else torch.randn(3).to_sparse()
            )
    bad = nn.Parameter(data)
    dense = nn.Parameter(torch.zeros(2))
    message = rf"MFAC needs dense \(torch.strided\) parameters, got a {kind} tensor"
    with pytest.raises(TypeError, match=message + r" \(parameter 1 of group 0\)"):
        MFAC([dense, bad], lr=0.1, num_grads=2)
    with pytest.raises(TypeError, match=message):  # before the masks read its shape
        MFAC([dense, bad], lr=0.1, num_grads=2, masks={bad: torch.ones(3, dtype=torch.bool)})
    opt = MFAC([dense], lr=0.1, num_grads=2)
    with pytest.raises(TypeError, match=message):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1 and opt.dim == 2


def test_inference_mode_calls_leave_an_optimizer_that_trains_on():
    # Regression: MFAC(...), step() (once it refactorised), load_state_dict() or
    # add_param_group() under torch.inference_mode() made inference tensors of its
    # buffers, and the next step outside failed with "Inplace update to inference tensor
    # outside InferenceMode is not allowed". Each run must equal the one outside.
    data = batches(3, 6)

    def run(inference: bool):
        model = make_model(3)
        head, tail = list(model.parameters())[:2], list(model.parameters())[2:]
        with torch.inference_mode(inference):
            opt = MFAC(head, lr=0.05, num_grads=2, momentum=0.9, zero_init=False)
        for x, y in data[:3]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with torch.inference_mode(inference):
                opt.step()
        with torch.inference_mode(inference):
            opt.load_state_dict(opt.state_dict())
            opt.add_param_group({"params": tail})
        train(model, opt, data[3:])
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


def test_a_step_after_param_groups_were_edited_is_refused():
    # Regression: a parameter appended to group["params"] was silently left out of the
    # window and never moved (torch's optimizers step it); a group appended to
    # param_groups failed with "zip() argument 2 is shorter than argument 1".
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    opt = MFAC([a], lr=0.1, num_grads=2)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.param_groups[0]["params"].append(b)
    with pytest.raises(RuntimeError, match=r"\[1\] per group, now \[2\].*add_param_group"):
        opt.step()
    opt.param_groups[0]["params"].pop()
    opt.param_groups.append({**opt.param_groups[0], "params": [b]})
    with pytest.raises(RuntimeError, match=r"\[1\] per group, now \[1, 1\]"):
        opt.step()
    assert opt.steps == 0 and not a.any()
    opt.param_groups.pop()
    opt.add_param_group({"params": [b]})
    opt.step()
    assert opt.steps == 1 and bool(b.ne(0).all())


def test_parameters_without_entries_are_refused_clearly():
    # Regression: "dim must be >= 1, got 0", a message about the window's internals.
    for params in (
        [nn.Parameter(torch.zeros(0))],
        [nn.Parameter(torch.zeros(0, 3)), nn.Parameter(torch.zeros(2, 0))],
    ):
        with pytest.raises(ValueError, match=r"hold no entries .*all of size 0: shapes \(0"):
            MFAC(params)


def test_import_mfac_core_does_not_import_torch():
    code = "import sys, mfac_core, mfac_core.pruning; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- copies, pickles and checkpoints -------------------------------------------------------


def assert_same(a, b, path="state"):
    """Equal structure, and tensors equal bit for bit with the same dtype, shape and device."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def all_params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def snapshot(opt, *, diagnostics: bool = True) -> dict:
    """Everything a load can change, as copies (the window through its state_dict).

    ``diagnostics`` adds the core's count of refactorisations, which is not state: a
    copy or a restored checkpoint starts it again.
    """
    out = {
        "state_dict": copy.deepcopy(opt.state_dict()),
        "defaults": dict(opt.defaults),
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "params": [p.detach().clone() for p in all_params(opt)],
        "counters": (opt.steps, opt.skipped_steps, opt.rejected_grads),
        "window": (len(opt.ihvp), opt.ihvp.slots, opt.ihvp.damp),
        # Keyed by position: a copy's parameters are other objects.
        # The live window (opt.state[first]["window"]) is compared through its state_dict.
        "state": {
            i: copy.deepcopy({k: v for k, v in opt.state[q].items() if k != "window"})
            for i, q in enumerate(all_params(opt))
            if q in opt.state
        },
        "live_window": opt.state[all_params(opt)[0]]["window"] is opt.ihvp,
        "state_keys": len(opt.state),
        "repr": repr(opt),
    }
    if diagnostics:
        out["refactor_count"] = opt.ihvp.refactor_count
    return out


def torch_roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIERS = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": torch_roundtrip,
}


@pytest.mark.parametrize("how", list(COPIERS))
@pytest.mark.parametrize(
    ("dtype", "zero_init", "momentum", "steps"),
    [
        (torch.float64, True, 0.0, 0),  # a fresh optimizer
        (torch.float64, False, 0.9, 2),  # a window still filling up
        (torch.float32, True, 0.9, 6),  # past the window: incremental edits
        (torch.float32, False, 0.0, 6),
    ],
)
def test_copies_equal_the_original_and_continue_like_it(how, dtype, zero_init, momentum, steps):
    data = batches(8, steps + 5, dtype=dtype)
    model = make_model(8, dtype=dtype)
    opt = MFAC(
        model.parameters(),
        lr=0.05,
        num_grads=4,
        damp=1e-3,
        momentum=momentum,
        weight_decay=1e-3,
        zero_init=zero_init,
    )
    train(model, opt, data[:steps])
    model2, opt2 = COPIERS[how]((model, opt))
    # The copy optimizes the copied model, not the original one.
    assert all(p is q for p, q in zip(all_params(opt2), model2.parameters(), strict=True))
    assert not any(p is q for p in all_params(opt2) for q in model.parameters())
    assert opt2.ihvp is not opt.ihvp
    assert_same(snapshot(opt2, diagnostics=False), snapshot(opt, diagnostics=False))
    # The copy trains first: a buffer shared with the original would change the original's run.
    train(model2, opt2, data[steps:])
    train(model, opt, data[steps:])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same(snapshot(opt2, diagnostics=False), snapshot(opt, diagnostics=False))


@pytest.mark.parametrize("how", list(COPIERS))
def test_copies_after_freezing_or_unfreezing_a_layer(how):
    # Regression: "dictionary changed size during iteration" when the first parameter
    # that requires grad (the state's holder) was another one than at construction.
    data = batches(8, 5)
    for frozen_at_first in (False, True):
        model = make_model(8)
        model[0].weight.requires_grad_(not frozen_at_first)
        opt = MFAC(model.parameters(), lr=0.05, num_grads=3, momentum=0.9)
        train(model, opt, data[:2])
        model[0].weight.requires_grad_(frozen_at_first)
        model2, opt2 = COPIERS[how]((model, opt))
        train(model2, opt2, data[2:])
        train(model, opt, data[2:])
        for a, b in zip(model.parameters(), model2.parameters(), strict=True):
            assert torch.equal(a, b)
        assert opt2.steps == opt.steps == 5 and len(opt2.state) == 1


def trained(seed: int, steps: int, **kw):
    kw = {"lr": 0.05, "num_grads": 4, "damp": 1e-3, "momentum": 0.9, "weight_decay": 1e-3, **kw}
    model = make_model(seed)
    opt = MFAC(model.parameters(), **kw)
    train(model, opt, batches(seed, steps))
    return model, opt


def _set(path, value):
    def edit(state):
        *head, last = path
        target = state
        for key in head:
            target = target[key]
        target[last] = value(target[last]) if callable(value) else value
        return state

    return edit


def _delete(*path):
    def edit(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return state

    return edit


def _nan_at(*path):
    def edit(state):
        t = state
        for key in path:
            t = t[key]
        t.view(-1)[0] = float("nan")
        return state

    return edit


W = ("state", 0, "window")
MALFORMED = {
    "not a dict": (lambda s: [s], "expected a dict"),
    "no state": (_delete("state"), "state"),
    "no param_groups": (_delete("param_groups"), "param_groups"),
    "no mfac state": (_delete("state", 0), "under the id of one parameter"),
    "extra group": (
        lambda s: (s["param_groups"].append({**s["param_groups"][0], "params": []}), s)[1],
        "2 parameter groups|1 parameter groups",
    ),
    "short group": (lambda s: (s["param_groups"][0]["params"].pop(), s)[1], "parameters"),
    "group without lr": (_delete("param_groups", 0, "lr"), "lr"),
    "lr NaN": (_set(("param_groups", 0, "lr"), float("nan")), "lr of .* must be finite"),
    "momentum infinite": (_set(("param_groups", 0, "momentum"), math.inf), "momentum of"),
    "lr tensor NaN": (_set(("param_groups", 0, "lr"), torch.tensor(math.nan)), "lr of"),
    "lr not a number": (_set(("param_groups", 0, "lr"), "fast"), "lr"),
    "mfac state not a dict": (_set(("state", 0), None), "must be a dict"),
    "no steps": (_delete("state", 0, "steps"), "steps"),
    "no momentum": (_delete("state", 0, "momentum_buffer"), "momentum_buffer"),
    "negative steps": (_set(("state", 0, "steps"), -1), "steps"),
    "fractional steps": (_set(("state", 0, "steps"), 2.5), "steps"),
    "negative counter": (_set(("state", 0, "skipped_steps"), -3), "skipped_steps"),
    "momentum shape": (_set(("state", 0, "momentum_buffer"), lambda t: t[:-1]), "momentum"),
    "momentum not a tensor": (_set(("state", 0, "momentum_buffer"), [0.0]), "momentum"),
    "momentum NaN": (_nan_at("state", 0, "momentum_buffer"), "momentum.*NaN"),
    "window not a dict": (_set(W, 3), "window"),
    "other damp": (_set((*W, "damp"), lambda d: 2 * d), "damp="),
    "zero damp": (_set((*W, "damp"), 0.0), "damp"),
    "other num_grads": (_set((*W, "num_grads"), 5), "num_grads"),
    "other dim": (_set((*W, "dim"), lambda d: d + 1), "dim"),
    "other zero_init": (_set((*W, "zero_init"), False), "zero_init"),
    "other version": (_set((*W, "version"), 99), "version"),
    "grads dtype": (_set((*W, "grads"), lambda t: t.float()), "grads.*float32.*grad_dtype"),
    "grads shape": (_set((*W, "grads"), lambda t: t[:, :-1]), "grads"),
    "grads NaN": (_nan_at(*W, "grads"), "grads.*NaN"),
    "gram shape": (_set((*W, "gram"), lambda t: t[:-1]), "gram"),
    "factor shape": (_set((*W, "factor"), lambda t: t[:-1, :-1]), "factor"),
    "factor infinite": (_set((*W, "factor"), lambda t: t / 0), "factor.*NaN"),
    "slot lists": (_set((*W, "window_slots"), lambda a: [a[0]] * len(a)), "slot lists"),
    "slot not an int": (_set((*W, "free_slots"), [0.5]), "free_slots"),
    "edits": (_set((*W, "edits"), "never"), "edits"),
    # Unknown keys in the window were dropped unread, where the entry's are refused.
    "window unknown key": (_set((*W, "exact_grams"), True), r"unknown keys \['exact_grams'\]"),
    "entry unknown key": (_set(("state", 0, "window_size"), 4), r"unknown keys \['window_size'\]"),
}


@pytest.mark.parametrize(
    "key",
    [
        "version",
        "num_grads",
        "dim",
        "damp",
        "zero_init",
        "grads",
        "gram",
        "factor",
        "window_slots",
        "free_slots",
        "factor_slots",
        "edits",
    ],
)
def test_every_window_key_is_required(key):
    _, source = trained(1, 6)
    assert key in source.state_dict()["state"][0]["window"]  # the list is the saved keys
    _, target = trained(2, 3)
    before = snapshot(target)
    state = _delete(*W, key)(source.state_dict())
    with pytest.raises(ValueError, match=key):
        target.load_state_dict(state)
    assert_same(snapshot(target), before)


def test_failed_loads_leave_the_optimizer_as_it_was():
    model, source = trained(1, 6)
    good = source.state_dict()
    target_model, target = trained(2, 3)  # another state: a partial load would show
    before = snapshot(target)
    for name, (edit, match) in MALFORMED.items():
        bad = edit(copy.deepcopy(good))
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        assert_same(snapshot(target), before, f"after {name!r}")
    # It still loads a good state, and then continues exactly like the source.
    target_model.load_state_dict(model.state_dict())
    target.load_state_dict(good)
    data = batches(3, 4)
    train(model, source, data)
    train(target_model, target, data)
    for a, b in zip(model.parameters(), target_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_load_of_other_sizes_names_them():
    # Regression: "'window_slots' must be a 1-D integer tensor of length num_grads=4" for
    # another num_grads, "the momentum buffer must be ... of shape (5,)" for other sizes.
    a = nn.Parameter(torch.ones(3))
    opt = MFAC([a], num_grads=2)
    a.grad = torch.ones(3)
    opt.step()
    state = opt.state_dict()
    # A state saved before MFAC recorded its parameters' shapes (which name a parameter
    # of another size first: below) is refused for its window's sizes.
    earlier = copy.deepcopy(state)
    del earlier["state"][0]["param_shapes"]
    for other, sizes in (
        (MFAC([nn.Parameter(torch.ones(3))], num_grads=4), "num_grads=4 and dim=3"),
        (MFAC([nn.Parameter(torch.ones(5))], num_grads=2), "num_grads=2 and dim=5"),
    ):
        with pytest.raises(ValueError, match=f"num_grads=2 gradients of dim=3 .*{sizes}"):
            other.load_state_dict(earlier)
        assert other.steps == 0
    other = MFAC([nn.Parameter(torch.ones(5))], num_grads=2)
    with pytest.raises(ValueError, match=r"parameter 0 of group 0 has shape \(3,\) in the state"):
        other.load_state_dict(state)
    assert other.steps == 0


def test_a_load_of_another_window_dtype_names_the_option():
    # Regression: only the core's "state['grads'] has dtype torch.float32, expected
    # torch.float64", which did not say which option of the optimizer differs.
    a = nn.Parameter(torch.ones(3))
    opt = MFAC([a], num_grads=2)
    a.grad = torch.ones(3)
    opt.step()
    other = MFAC([nn.Parameter(torch.ones(3, dtype=torch.float64))], num_grads=2)
    with pytest.raises(ValueError, match=r"stored in torch\.float32.*window in torch\.float64"):
        other.load_state_dict(opt.state_dict())
    assert other.steps == 0


def test_old_checkpoints_without_counters_load():
    _, source = trained(1, 6)
    state = source.state_dict()
    del state["state"][0]["skipped_steps"], state["state"][0]["rejected_grads"]
    _, target = trained(2, 3)
    target.load_state_dict(state)
    assert (target.steps, target.skipped_steps, target.rejected_grads) == (6, 0, 0)


# -- autograd --------------------------------------------------------------------------------


def assert_no_history(opt):
    state = opt.state_dict()["state"][0]
    probe = torch.ones(opt.dim, dtype=opt.dtype)
    tensors = [
        opt.ihvp.window(),
        opt.ihvp @ probe,
        state["momentum_buffer"],
        *(v for v in state["window"].values() if isinstance(v, torch.Tensor)),
    ]
    for t in tensors:
        assert t is not None and not t.requires_grad and t.grad_fn is None
    for p in all_params(opt):
        assert p.is_leaf and p.grad_fn is None


def set_grads(model, x, y, how):
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    if how == "create_graph":
        grads = torch.autograd.grad(loss, params, create_graph=True)
    else:
        grads = [
            g.detach().requires_grad_(how == "requires_grad")
            for g in torch.autograd.grad(loss, params)
        ]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", ["create_graph", "requires_grad", "load_state_dict"])
def test_buffers_never_record_autograd_history(dtype, how):
    kw = {"lr": 0.05, "num_grads": 3, "damp": 1e-3, "momentum": 0.9}
    model, ref_model = make_model(9, dtype), make_model(9, dtype)
    opt, ref = MFAC(model.parameters(), **kw), MFAC(ref_model.parameters(), **kw)
    data = batches(9, 6, dtype=dtype)
    for i, (x, y) in enumerate(data):
        grads = set_grads(model, x, y, "plain" if how == "load_state_dict" else how)
        assert all(g.requires_grad for g in grads) == (how != "load_state_dict")
        set_grads(ref_model, x, y, "plain")
        opt.step()
        ref.step()
        if how == "load_state_dict" and i == 2:
            state = opt.state_dict()
            for t in (
                state["state"][0]["momentum_buffer"],
                *(
                    v
                    for v in state["state"][0]["window"].values()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()
                ),
            ):
                t.requires_grad_(True)
            opt.load_state_dict(state)
        assert_no_history(opt)
    # The values are those of the same run with plain gradients.
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    opt.ihvp.reset()
    assert_no_history(opt)


# -- window options, memory and damping -------------------------------------------------------


def test_defaults_are_the_measured_ones():
    # docs/guidance.rst: m = 32-64 captures most of the gain; damp=1e-3 trained best.
    opt = MFAC(make_model().parameters())
    assert (opt.num_grads, opt.damp) == (64, 1e-3)
    assert (opt.defaults["num_grads"], opt.defaults["damp"]) == (64, 1e-3)


@pytest.mark.parametrize(
    ("dtype", "m", "shapes"),
    [
        (torch.float32, 8, [(5, 4), (3,)]),
        (torch.float64, 1, [(7,)]),
        (torch.float64, 33, [(2, 3, 4), (1,)]),
    ],
)
def test_window_memory_is_logged_once(caplog, dtype, m, shapes):
    params = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    d = sum(p.numel() for p in params)
    with caplog.at_level(logging.INFO, logger="mfac_core.torch"):
        MFAC(params, num_grads=m, damp=1e-4)
    records = [r for r in caplog.records if r.name == "mfac_core.torch"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "\n" not in message
    assert f"num_grads={m} x dim={d} {str(dtype).removeprefix('torch.')}" in message
    window = int(re.search(r": (\d+) bytes", message).group(1))
    small = int(re.search(r"plus (\d+) bytes", message).group(1))
    assert window == m * d * torch.empty((), dtype=dtype).element_size()
    assert small == 3 * m * m * 8


def test_docs_torch_rst_quotes_the_log_line_of_its_example(caplog):
    """docs/torch.rst quotes the line that its first example's optimizer logs, unchanged."""
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "torch.rst"
    if not doc.exists():
        pytest.skip("docs/ is not beside the tests")
    quoted = re.search(r"wrapped here\)::\n\n   (.*?)\n   (.*?)\n", doc.read_text()).groups()
    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10)  # the page's example
    with caplog.at_level(logging.INFO, logger="mfac_core.torch"):
        MFAC(model.parameters(), lr=1e-3)
    (record,) = [r for r in caplog.records if r.name == "mfac_core.torch"]
    assert " ".join(quoted) == record.getMessage()


def test_pruner_logs_its_gradient_matrix(caplog):
    model = make_model(1)
    pruner = MFACPruner(model, num_grads=5, block_size=None, damp=1e-3)
    with caplog.at_level(logging.INFO, logger="mfac_core.torch"):
        pruner.collect_grads(loader(), F.cross_entropy)
    (record,) = [r for r in caplog.records if r.name == "mfac_core.torch"]
    assert f"{5 * pruner.dim * 8} bytes" in record.getMessage()


def test_defaults_and_repr_show_the_window_options():
    model = make_model()
    opt = MFAC(model.parameters(), lr=0.1, num_grads=5, damp=2e-3, zero_init=False, errors="raise")
    assert opt.defaults == {
        "lr": 0.1,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "num_grads": 5,
        "damp": 2e-3,
        "zero_init": False,
        "errors": "raise",
        "grad_dtype": None,
    }
    assert (opt.num_grads, opt.damp) == (5, 2e-3)
    text = repr(opt)
    for part in (
        "num_grads: 5",
        "damp: 0.002",
        "zero_init: False",
        "errors: 'raise'",
        f"dim: {opt.dim}",
        "Parameter Group 0",
        "lr: 0.1",
    ):
        assert part in text
    # The window options are not per group: changing a group's copy would do nothing.
    assert all("damp" not in g and "num_grads" not in g for g in opt.param_groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_init", [True, False])
@pytest.mark.parametrize("steps", [2, 7])  # window filling up, and full
def test_resume_with_another_damping(dtype, zero_init, steps):
    m, damp, new_damp, lr = 4, 1e-3, 3e-2, 0.05
    kw = {"lr": lr, "num_grads": m, "zero_init": zero_init}
    model = make_model(5, dtype)
    opt = MFAC(model.parameters(), damp=damp, **kw)
    data = batches(5, steps + 1, dtype=dtype)
    train(model, opt, data[:steps])
    state = opt.state_dict()
    window = opt.ihvp.window().double().numpy()

    # Without the option another damping is refused, and nothing changes.
    other = MFAC(make_model(6, dtype).parameters(), damp=new_damp, **kw)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"damp=\.\.\."):
        other.load_state_dict(state)
    assert_same(snapshot(other), before)

    # With it, the window is refactorised for the new damping.
    resumed_model = make_model(6, dtype)
    resumed_model.load_state_dict(model.state_dict())
    resumed = MFAC(resumed_model.parameters(), damp=damp, **kw)
    resumed.load_state_dict(state, damp=new_damp)
    assert resumed.damp == resumed.defaults["damp"] == new_damp == resumed.ihvp.damp
    assert f"damp: {new_damp!r}" in repr(resumed)
    x, y = data[steps]
    resumed.zero_grad()
    F.cross_entropy(resumed_model(x), y).backward()
    params = list(resumed_model.parameters())
    g = np.concatenate([p.grad.double().numpy().reshape(-1) for p in params])
    theta = flat_params(params).astype(np.float64)
    s = dense_step([*window, g], g, new_damp, m, zero_init)
    resumed.step()
    # Relative to the step's size: float32 rounds at about eps * kappa.
    tol = (1e-10 if dtype == torch.float64 else 1e-4) * np.abs(s).max()
    np.testing.assert_allclose(flat_params(params), theta - lr * s, rtol=0, atol=lr * tol)

    # Asking for the state's own damping restores it bit for bit, whatever the optimizer's.
    same_model = make_model(7, dtype)
    same_model.load_state_dict(model.state_dict())
    same = MFAC(same_model.parameters(), damp=new_damp, **kw)
    same.load_state_dict(state, damp=damp)
    assert same.damp == damp
    train(model, opt, data[steps:])
    train(same_model, same, data[steps:])
    for a, b in zip(model.parameters(), same_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_damping_that_cannot_factorise_the_window_changes_nothing():
    w = nn.Parameter(torch.zeros(16, dtype=torch.float64))
    opt = MFAC([w], lr=0.1, num_grads=3, damp=1e-2)
    for _ in range(2):  # the same gradient twice: fine with damp=1e-2, singular without
        w.grad = torch.ones(16, dtype=torch.float64)
        opt.step()
    assert opt.rejected_grads == 0
    state = opt.state_dict()
    before = snapshot(opt)
    with pytest.raises(FactorizationError):
        opt.load_state_dict(state, damp=1e-30)
    assert_same(snapshot(opt), before)


# -- bad gradients ----------------------------------------------------------------------------


def poison(model, which: int, value: float) -> None:
    list(model.parameters())[which].grad.view(-1)[-1] = value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("zero_init", [True, False])
def test_training_through_nonfinite_gradients(dtype, bad, zero_init):
    kw = {
        "lr": 0.05,
        "num_grads": 3,
        "damp": 1e-3,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "zero_init": zero_init,
    }
    data = batches(11, 9, dtype=dtype)
    poisoned = {2, 3, 7}
    model, clean_model = make_model(11, dtype), make_model(11, dtype)
    opt, clean = MFAC(model.parameters(), **kw), MFAC(clean_model.parameters(), **kw)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i in poisoned:
            poison(model, 1, bad)
            before = snapshot(opt)
            with pytest.warns(MFACStepWarning, match="parameter 1 of group 0") as record:
                opt.step()
            assert record[0].filename == __file__  # the warning points at opt.step()
            after = snapshot(opt)
            # Only the counter of skipped steps moved.
            assert after["counters"] == (before["counters"][0], before["counters"][1] + 1, 0)
            after["state_dict"]["state"][0]["skipped_steps"] -= 1
            after["state"][0]["skipped_steps"] -= 1
            assert_same({**after, "counters": None}, {**before, "counters": None})
            continue
        opt.step()
    train(clean_model, clean, [b for i, b in enumerate(data) if i not in poisoned])
    # Skipping left no trace: the run equals the one without those batches.
    for a, b in zip(model.parameters(), clean_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (opt.steps, opt.skipped_steps, opt.rejected_grads) == (6, 3, 0)
    assert opt.state_dict()["state"][0]["skipped_steps"] == 3


def test_a_nonfinite_weight_decay_term_is_named():
    model = make_model(3)
    opt = MFAC(model.parameters(), num_grads=2, weight_decay=0.1)
    x, y = batches(3, 1)[0]
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model[2].bias[0] = float("inf")
    with pytest.warns(MFACStepWarning, match="weight-decayed gradient of parameter 3"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.steps == 0


def test_a_nonfinite_step_is_skipped(monkeypatch):
    """A finite gradient whose step overflows: the parameters and momentum stay."""
    model = make_model(4, torch.float32)
    opt = MFAC(model.parameters(), lr=0.1, num_grads=2, momentum=0.5)
    train(model, opt, batches(4, 2, dtype=torch.float32))
    # The window's product overflows (its finiteness is read with the step's checks).
    finish = opt.ihvp._finish
    monkeypatch.setattr(opt.ihvp, "_finish", lambda *a: finish(*a) * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    momentum = opt.state_dict()["state"][0]["momentum_buffer"]
    x, y = batches(5, 1, dtype=torch.float32)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(MFACStepWarning, match="preconditioned step"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], momentum)
    assert (opt.steps, opt.skipped_steps) == (2, 1)


# Good steps before the failed one, and whether that one refactorises: the window
# filling up (1/k changes), a row edit of the full window, and the refactorisation
# after refactor_every = m edits.
ROLLBACK_PATHS = {"filling up": (1, 1), "row edit": (4, 0), "refactorisation": (6, 1)}


def overflowing_optimizer(construction: str, good_steps: int):
    """An MFAC(errors="raise") after good steps, and a finite gradient whose step overflows.

    ``"bfloat16"``: gradients of 1e-30 with a damping of 1e-74 (kappa ~ 3e14, taken):
    stored ones step by about k g / |g|^2, but the part of a gradient that rounding to
    bfloat16 loses (2^-9 |g|) is outside the window, and F^{-1} scales it by 1 / damp,
    beyond float32's range. ``"float64"``: a float64 window whose product is made to
    overflow (its last step, through the optimizer's window).
    """
    gen = torch.Generator().manual_seed(0)
    if construction == "bfloat16":
        w = nn.Parameter(torch.zeros(8))
        opt = MFAC(
            [w],
            lr=1e-30,
            num_grads=3,
            damp=1e-74,
            momentum=0.9,
            zero_init=False,
            grad_dtype=torch.bfloat16,
            errors="raise",
        )

        def gradient(stored: bool) -> torch.Tensor:
            g = torch.randn(8, generator=gen) * 1e-30
            return g.to(torch.bfloat16).float() if stored else g

    else:
        w = nn.Parameter(torch.zeros(8, dtype=torch.float64))
        opt = MFAC(
            [w], lr=0.1, num_grads=3, damp=1e-3, momentum=0.9, zero_init=False, errors="raise"
        )

        def gradient(stored: bool) -> torch.Tensor:
            return torch.randn(8, generator=gen, dtype=torch.float64)

    for _ in range(good_steps):
        w.grad = gradient(True)
        opt.step()
    w.grad = gradient(False)
    return w, opt, gradient


def window_scalars(opt) -> dict:
    """The window's attributes that are numbers (counters, flags), state or not."""
    return {k: v for k, v in vars(opt.ihvp).items() if isinstance(v, (bool, int, float))}


def overflow(construction: str, opt) -> None:
    """Make the float64 construction's product overflow (the bfloat16 one does)."""
    if construction == "float64":
        refined = opt.ihvp._refined
        opt.ihvp._refined = lambda *a: refined(*a) * float("inf")


# The bfloat16 construction's kappa (~3e14) is past the warning (eps64 kappa**1.5 >= 1), which
# this test is not about.
@pytest.mark.filterwarnings("ignore::mfac_core.IllConditionedWarning")
@pytest.mark.parametrize("construction", ["bfloat16", "float64"])
@pytest.mark.parametrize("path", list(ROLLBACK_PATHS))
def test_errors_raise_refuses_a_nonfinite_step_with_its_gradient(construction, path):
    """A finite gradient whose step is not finite: errors="raise" changes nothing.

    Regression: the gradient was in the window (its row, Gram row and factor, the slot
    lists and the edit count) when FloatingPointError was raised. errors="skip" keeps
    it, as documented; the twin below shows that it reaches the path named.
    """
    good_steps, refactorisations = ROLLBACK_PATHS[path]
    w, opt, gradient = overflowing_optimizer(construction, good_steps)
    twin, reference = copy.deepcopy(opt), copy.deepcopy(opt)
    twin.param_groups[0]["params"][0].grad = w.grad  # a Parameter's copy has none
    twin.defaults["errors"] = "skip"
    overflow(construction, twin)
    start = twin.ihvp.refactor_count
    with pytest.warns(MFACStepWarning, match="preconditioned step holds NaN"):
        twin.step()
    assert twin.ihvp.refactor_count - start == refactorisations
    assert not torch.equal(twin.ihvp._G, opt.ihvp._G)  # errors="skip" keeps the gradient

    overflow(construction, opt)
    before, scalars = snapshot(opt), window_scalars(opt)
    message = rf"MFAC step {good_steps + 1}: the preconditioned step holds NaN.*window unchanged"
    with pytest.raises(FloatingPointError, match=message):
        opt.step()
    assert_same(snapshot(opt), before)
    assert window_scalars(opt) == scalars
    # The optimizer goes on as one that never saw the call.
    opt.ihvp.__dict__.pop("_refined", None)
    w.grad = reference.param_groups[0]["params"][0].grad = gradient(True)
    opt.step()
    reference.step()
    assert_same(snapshot(opt, diagnostics=False), snapshot(reference, diagnostics=False))


def window_state(opt):
    return {k: v for k, v in opt.state_dict()["state"][0]["window"].items() if k != "edits"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_init", [True, False])
@pytest.mark.parametrize("shape", [(16,), (2, 3, 2)])
def test_training_through_a_collinear_window(dtype, zero_init, shape):
    """The same gradient again and again with a hopeless damping: the run goes on.

    The gradient alone makes the window hopeless (|g|^2 over a shift far below
    float64's resolution of it: eps(float64) kappa >= 1), and a repeat of it would
    make the capacitance matrix singular, so every insertion is refused (the first
    one too, since it would have given steps without a correct digit), and every
    step skipped: with the window as it was it would be g / damp, 4e16 per entry.
    """
    # m * damp is below half an ulp of |g|^2 >= 192: the shift vanishes in float64.
    m, damp, lr = 3, 1e-16, 1e-3
    w = nn.Parameter(torch.zeros(shape, dtype=dtype))
    c = torch.full(shape, 4.0, dtype=dtype)  # L(w) = <c, w>: the gradient is always c
    opt = MFAC([w], lr=lr, num_grads=m, damp=damp, zero_init=zero_init)
    for _ in range(6):
        opt.zero_grad()
        (w * c).sum().backward()
        window = window_state(opt)
        with pytest.warns(MFACStepWarning, match="too large .* step is skipped") as record:
            opt.step()
        assert record[0].filename == __file__
        assert_same(window_state(opt), window)
        assert not w.detach().any()
    assert (opt.steps, opt.skipped_steps, opt.rejected_grads) == (0, 6, 0)
    assert opt.state_dict()["state"][0]["skipped_steps"] == 6
    assert len(opt.ihvp) == (m if zero_init else 0)


@pytest.mark.parametrize("zero_init", [True, False])
def test_a_rejected_gradient_is_stepped_with_the_previous_window(zero_init, monkeypatch):
    """The fallback's step is F^{-1} g of the window without g (a well-conditioned case)."""
    m, damp, lr = 3, 1e-2, 0.05
    model = make_model(13)
    params = list(model.parameters())
    opt = MFAC(params, lr=lr, num_grads=m, damp=damp, momentum=0.5, zero_init=zero_init)
    data = batches(13, 6)
    window, buf = [], np.zeros(opt.dim)
    insert = opt.ihvp._update_and_matvec_checked  # what MFAC calls
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        g = np.concatenate([p.grad.numpy().reshape(-1) for p in params])
        theta = flat_params(params)
        if i in (2, 4):

            def refuse(_g, *, strict=False):
                raise FactorizationError("injected")

            monkeypatch.setattr(opt.ihvp, "_update_and_matvec_checked", refuse)
            s = dense_step(window, g, damp, m, zero_init)
            with pytest.warns(MFACStepWarning, match="injected"):
                opt.step()
            monkeypatch.setattr(opt.ihvp, "_update_and_matvec_checked", insert)
        else:
            window.append(g)
            s = dense_step(window, g, damp, m, zero_init)
            opt.step()
        buf = 0.5 * buf + s
        np.testing.assert_allclose(
            flat_params(params), theta - lr * buf, rtol=1e-9, atol=1e-9 * lr * np.abs(buf).max()
        )
    assert len(opt.ihvp) == (m if zero_init else min(m, 4))
    assert (opt.steps, opt.rejected_grads) == (6, 2)


def test_errors_raise_leaves_the_optimizer_as_it_was():
    model = make_model(12)
    opt = MFAC(model.parameters(), lr=0.05, num_grads=3, damp=1e-3, momentum=0.9, errors="raise")
    data = batches(12, 4)
    train(model, opt, data[:3])
    x, y = data[3]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    poison(model, 0, float("nan"))
    before = snapshot(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FloatingPointError, match="parameter 0 of group 0"):
            opt.step()
    assert_same(snapshot(opt), before)

    # A gradient too large for the window (|g|^2 / (m damp) = 2.7e18 >= 1/eps(float64)):
    # refused, where it used to be stored with one warning (or, repeated, fail the
    # factorisation). A duplicate below that threshold factorises.
    w = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    opt = MFAC([w], lr=1e-3, num_grads=3, damp=1e-14, errors="raise")
    w.grad = torch.full((8,), 1.0, dtype=torch.float64)
    with pytest.warns(IllConditionedWarning):  # |g|^2 / (m damp) = 2.7e14: taken, warned
        opt.step()
    w.grad = torch.full((8,), 100.0, dtype=torch.float64)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"too large for this window.*2\.67e\+18"):
        opt.step()
    assert_same(snapshot(opt), before)


# -- cost of the fill-up ---------------------------------------------------------------------


def test_default_fill_up_edits_the_factor_instead_of_refactorising():
    """Filling the window must not cost one O(k^3) factorisation per gradient."""
    m, d = 32, 50
    gen = torch.Generator().manual_seed(0)
    counts = {}
    for zero_init in (None, False):
        w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        options = {} if zero_init is None else {"zero_init": zero_init}
        opt = MFAC([w], num_grads=m, damp=1e-3, **options)
        start = opt.ihvp.refactor_count
        for _ in range(m):
            w.grad = torch.randn(d, dtype=torch.float64, generator=gen)
            opt.step()
        counts[zero_init] = opt.ihvp.refactor_count - start
    # The default: O(m^2) edits, with a full refactorisation every m edits.
    assert counts[None] <= 2
    # The 1/k convention refactorises at every insertion while the window fills.
    assert counts[False] == m


# -- the pruner ---------------------------------------------------------------------------


def loader(seed: int = 0, n: int = 6):
    return batches(seed, n)


def test_pruner_one_shot_matches_the_array_api_functions():
    model = make_model(1)
    pruner = MFACPruner(model, num_grads=6, block_size=None, damp=1e-3)
    assert set(pruner.weights) == {"0", "2"}
    data = loader()
    theta = pruner.flat_weights()
    G = pruner.collect_grads(data, F.cross_entropy)
    assert G.shape == (6, 5 * 4 + 4 * 3)
    want = pruning.prune(theta, G, sparsity=0.5, damp=1e-3)
    pruner.prune(data, F.cross_entropy, sparsity=0.5)
    assert torch.equal(pruner.flat_mask(), want.mask)
    torch.testing.assert_close(pruner.flat_weights(), want.theta, rtol=0, atol=1e-12)
    assert pruner.sparsity() == 0.5
    for name, w in pruner.weights.items():
        assert torch.all(w[~pruner.masks[name]] == 0)


@pytest.mark.parametrize("update", ["single", "joint", "none"])
def test_pruner_gradual_keeps_masks_monotone(update):
    model = make_model(2)
    pruner = MFACPruner(model, num_grads=6, block_size=8, damp=1e-3, update=update)
    pruner.prune(loader(1), F.cross_entropy, sparsity=0.4)
    first = pruner.flat_mask().clone()
    pruner.prune(loader(2), F.cross_entropy, sparsity=0.75, steps=3, schedule="cubic")
    second = pruner.flat_mask()
    assert not torch.any(second & ~first)
    assert (~second).sum() == 24
    assert torch.all(pruner.flat_weights()[~second] == 0)


def test_pruner_keeps_masks_after_optimizer_steps():
    model = make_model(3)
    pruner = MFACPruner(model, layers=["0"], num_grads=4, block_size=16, damp=1e-3)
    assert list(pruner.weights) == ["0"]
    pruner.prune(loader(), F.cross_entropy, sparsity=0.6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = pruner.attach(opt)
    train(model, opt, loader(4))
    assert torch.all(model[0].weight[~pruner.masks["0"]] == 0)
    handle.remove()
    train(model, opt, loader(5))
    assert torch.any(model[0].weight[~pruner.masks["0"]] != 0)
    pruner.apply_masks()
    assert torch.all(model[0].weight[~pruner.masks["0"]] == 0)


def test_pruner_with_mfac_optimizer_and_float64_fisher():
    model = make_model(4, dtype=torch.float32)
    pruner = MFACPruner(
        model, num_grads=6, block_size=8, damp=1e-4, dtype=torch.float64, update="joint"
    )
    pruner.prune(batches(0, 6, dtype=torch.float32), F.cross_entropy, sparsity=0.5)
    assert model[0].weight.dtype == torch.float32
    opt = MFAC(model.parameters(), lr=1e-3, num_grads=4, damp=1e-3)
    pruner.attach(opt)
    train(model, opt, batches(1, 3, dtype=torch.float32))
    assert torch.all(model[0].weight[~pruner.masks["0"]] == 0)


@pytest.mark.parametrize("update", ["none", "single"])
def test_pruner_changes_float64_weights_by_a_float32_update_only(update):
    # Regression: with float64 weights and dtype=torch.float32 the weights went through
    # float32 and back, so the kept ones were rounded (1e-7 relative) even unchanged.
    model = make_model(6)
    with torch.no_grad():  # weights that float32 does not hold (make_model's are float32's)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64) / 2)
    start = torch.cat([w.detach().reshape(-1).clone() for w in (model[0].weight, model[2].weight)])
    pruner = MFACPruner(
        model, num_grads=6, block_size=8, damp=1e-3, dtype=torch.float32, update=update
    )
    theta32 = pruner.flat_weights()
    assert theta32.dtype == torch.float32 and not torch.equal(theta32.double(), start)
    G = pruner.collect_grads(loader(), F.cross_entropy)
    want = pruning.prune(theta32, G, sparsity=0.5, damp=1e-3, block_size=8, update=update)
    pruner.prune(loader(), F.cross_entropy, sparsity=0.5)
    kept, got = (
        pruner.flat_mask(),
        torch.cat([w.detach().reshape(-1) for w in pruner.weights.values()]),
    )
    assert got.dtype == torch.float64 and torch.equal(kept, want.mask)
    assert torch.all(got[~kept] == 0)
    # Each kept weight moved by the float32 computation's change, added in float64.
    change = want.theta.double() - theta32.double()
    assert torch.equal(got[kept], (start + change)[kept])
    if update == "none":
        assert torch.equal(got[kept], start[kept])
    else:
        assert torch.any(change[kept] != 0)


@pytest.mark.parametrize(
    ("dtype", "fisher", "big", "scale", "gain", "steps"),
    [
        (torch.float16, None, 4e4, 1e-3, 1.0, 1),
        (torch.float16, None, 4e4, 1e-3, 1.0, 2),
        (torch.bfloat16, None, 2e38, 1e-35, 4e15, 1),  # inputs, loss scaled: finite gradients
        (torch.float32, None, 2e38, 1e-35, 4e15, 1),
        (torch.float64, torch.float32, 2e38, 1e-35, 4e15, 1),  # the Fisher's theta overflows
    ],
)
def test_pruner_refuses_an_update_that_leaves_the_weights_dtype(
    dtype, fisher, big, scale, gain, steps
):
    # Regression: a float16 model's kept weight that the update moved past 65504 became
    # infinity, silently (the next prune then refused the model); so did a bfloat16 or
    # float32 one past float32's range, where the update itself overflowed. Now a
    # ValueError names it, and the weights and masks are as before the call.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[big, 0.975 * big, 0.5, 0.25]]))
    # Inputs 0 and 1 equal: pruning weight 1 moves weight 0 by about as much again.
    data = []
    for _ in range(4):
        x = torch.randn(8, 1)
        data.append(
            ((torch.cat([x, x, torch.randn(8, 2)], 1) * scale).to(dtype), torch.zeros(8, 1))
        )

    def loss(out, y):
        return (((out.float() - y) * gain) ** 2).mean()

    pruner = MFACPruner(model, num_grads=4, block_size=None, damp=1e-6, dtype=fisher)
    weight, mask = model[0].weight.detach().clone(), pruner.masks["0"]
    wider = "the weights" if fisher is None else r"the Fisher \(dtype=\)"
    match = rf"{fisher or dtype}'s range .*weight '0'\[0, 0\] is .* keep {wider} in a wider"
    with pytest.raises(ValueError, match=match):
        pruner.prune(data, loss, sparsity=0.75, steps=steps)
    assert torch.equal(model[0].weight, weight) and torch.equal(pruner.masks["0"], mask)


def _batch_norm_model():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model.double().train()
    return model


def _buffers_and_modes(model):
    return (
        {k: b.clone() for k, b in model.named_buffers()},
        {k: m.training for k, m in model.named_modules()},
    )


def _assert_buffers_and_modes(model, saved):
    buffers, modes = _buffers_and_modes(model)
    assert modes == saved[1]
    assert buffers.keys() == saved[0].keys()
    for k, b in buffers.items():
        assert torch.equal(b, saved[0][k]), k


def test_pruner_gradients_leave_batch_norm_statistics_as_they_were():
    # Regression: collect_grads ran the forward passes in train mode and left batch
    # norm's running statistics moved by num_grads batches.
    model = _batch_norm_model()
    saved = _buffers_and_modes(model)
    pruner = MFACPruner(model, num_grads=4, block_size=8, damp=1e-3)
    G = pruner.collect_grads(loader(), F.cross_entropy)
    _assert_buffers_and_modes(model, saved)
    # Taken in train mode (the batch's statistics), the mode the model was in.
    x, y = loader()[0]
    twin = copy.deepcopy(model)
    want = torch.autograd.grad(F.cross_entropy(twin(x), y), twin[0].weight)[0]
    torch.testing.assert_close(G[0, : want.numel()], want.reshape(-1), rtol=0, atol=0)
    pruner.prune(loader(), F.cross_entropy, sparsity=0.5, steps=2)
    _assert_buffers_and_modes(model, saved)
    saved = _buffers_and_modes(model)

    calls = []

    def failing_on_the_second_batch(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("loss failed")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="loss failed"):
        pruner.collect_grads(loader(), failing_on_the_second_batch)
    _assert_buffers_and_modes(model, saved)


def test_pruner_scores_each_damping_and_takes_each_step_from_the_model_as_it_was():
    # Regression: prune() put the modes and buffers back only when it returned, so a
    # held-out loss that left the model in eval mode (and ran batch norm in train mode on
    # the held-out data first) had the next step's gradients taken in eval mode, from
    # moved statistics, and the next damping scored from the model the last one left.
    model = _batch_norm_model()
    saved = _buffers_and_modes(model)
    x_val, y_val = loader(seed=1, n=1)[0]
    seen, modes_seen = [], []

    def loss_fn(out, y):
        # After the batch's forward pass, which moved the statistics: the modes only.
        modes_seen.append(_buffers_and_modes(model)[1])
        return F.cross_entropy(out, y)

    @torch.no_grad()
    def val_loss(m):
        seen.append(_buffers_and_modes(m))
        m(x_val)  # train mode: moves the running statistics
        m.eval()
        return float(F.cross_entropy(m(x_val), y_val))

    pruner = MFACPruner(model, num_grads=4, block_size=8, damp=1e-3)
    pruner.prune(
        loader(), loss_fn, sparsity=0.6, steps=2, dampings=[1e-3, 1e-1], select_damp=val_loss
    )
    assert len(seen) == 2 * 2 and len(modes_seen) == 2 * 4
    assert all(modes == saved[1] for modes in modes_seen)
    for buffers, modes in seen:
        assert modes == saved[1]
        assert all(torch.equal(b, saved[0][k]) for k, b in buffers.items())
    _assert_buffers_and_modes(model, saved)


def test_pruner_failing_leaves_the_model_exactly_as_it_was():
    # Regression: a failed prune() restored the weights and masks only: batch norm's
    # running statistics stayed moved, and a select_damp's model.eval() stayed.
    model = _batch_norm_model()
    pruner = MFACPruner(model, num_grads=4, block_size=8, damp=1e-3)
    pruner.prune(loader(), F.cross_entropy, sparsity=0.25)
    saved = _buffers_and_modes(model)
    weights = {k: p.clone() for k, p in model.named_parameters()}
    masks = {k: m.clone() for k, m in pruner.masks.items()}
    calls = []

    def failing_loss(out, y):
        calls.append(1)
        if len(calls) == 7:  # in the second step's gradients
            raise RuntimeError("loss failed")
        return F.cross_entropy(out, y)

    def evaluating_then_failing(m):
        m.eval()
        raise RuntimeError("select_damp failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        pruner.prune(loader(), failing_loss, sparsity=0.5, steps=2)
    with pytest.raises(RuntimeError, match="select_damp failed"):
        pruner.prune(
            loader(),
            F.cross_entropy,
            sparsity=0.5,
            dampings=[1e-3],
            select_damp=evaluating_then_failing,
        )
    _assert_buffers_and_modes(model, saved)
    for k, p in model.named_parameters():
        assert torch.equal(p, weights[k]), k
    assert all(torch.equal(pruner.masks[k], m) for k, m in masks.items())


class _TiedModel(nn.Module):
    """An embedding and an output layer sharing one weight (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def _token_batches(seed, n):
    """n batches of 5 token ids in [0, 6) and as many targets."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 6, (5,), generator=gen), torch.randint(0, 6, (5,), generator=gen))
        for _ in range(n)
    ]


def test_pruner_prunes_a_tied_weight_once():
    # Regression: a weight shared by two chosen layers was two blocks of theta (d = 48,
    # not 24), its gradient counted twice in the Fisher and each copy pruned and updated
    # as if independent of the other, the second copy's values written last.
    data = _token_batches(0, 6)
    results = []
    for layers in (["emb", "out"], ["emb"]):
        torch.manual_seed(0)
        model = _TiedModel()
        pruner = MFACPruner(model, num_grads=6, block_size=None, damp=1e-2, layers=layers)
        assert list(pruner.weights) == ["emb"] and pruner.dim == 24
        pruner.prune(data, F.cross_entropy, sparsity=0.5)
        assert int((model.emb.weight == 0).sum()) == 12
        results.append(model.emb.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_pruner_errors():
    model = make_model()
    with pytest.raises(ValueError, match="no layer named 'fc9'"):
        MFACPruner(model, layers=["fc9"])
    with pytest.raises(ValueError, match="no weight"):
        MFACPruner(model, layers=["1"])
    with pytest.raises(ValueError, match="no Linear or Conv"):
        MFACPruner(nn.Sequential(nn.Tanh()))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        MFACPruner(object())
    pruner = MFACPruner(model, num_grads=2)
    for bad in (1.0, -0.5, 2):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            pruner.prune(loader(), F.cross_entropy, sparsity=bad)
    with pytest.raises(ValueError, match="no batches"):
        pruner.prune([], F.cross_entropy, sparsity=0.5)
    with pytest.raises(ValueError, match="saliency"):
        MFACPruner(model, saliency="random")


def test_pruner_collects_sparse_gradients_densely():
    # Regression: "reshape is not implemented for sparse tensors".
    data = _token_batches(1, 4)
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(6, 3, sparse=sparse), nn.Linear(3, 6))
        pruner = MFACPruner(model, num_grads=4, layers=["0", "1"], damp=1e-2)
        grads.append(pruner.collect_grads(data, F.cross_entropy))
        pruner.prune(data, F.cross_entropy, sparsity=0.5)
        assert int((model[0].weight == 0).sum()) + int((model[1].weight == 0).sum()) == 18
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_pruner_explains_what_stops_its_gradients():
    # Regression: autograd's errors from deep inside collect_grads, and "the data loader
    # yielded no batches" for a one-shot iterator that yielded some.
    model = make_model()
    pruner = MFACPruner(model, num_grads=4, block_size=8, damp=1e-3)
    before = {name: w.detach().clone() for name, w in pruner.weights.items()}
    with pytest.raises(ValueError, match=r"yielded 2 batches and then none .* num_grads=4"):
        pruner.prune(iter(loader(n=2)), F.cross_entropy, sparsity=0.5)
    with pytest.raises(ValueError, match=r"no batches .*steps > 1 iterates the loader again"):
        pruner.prune(iter(loader(n=4)), F.cross_entropy, sparsity=0.5, steps=2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pruner.prune(loader(), F.cross_entropy, sparsity=0.5)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layers \['0'\] do not require grad"):
        pruner.prune(loader(), F.cross_entropy, sparsity=0.5)
    for name, w in pruner.weights.items():
        assert torch.equal(w, before[name]) and bool(pruner.masks[name].all())


def test_pruner_closes_the_loader_an_error_abandons():
    # Regression: a loss, a non-finite gradient or an interrupt that stopped the
    # gradients left the caller's generator suspended, its finally blocks and with
    # statements (an open file, a loader's workers) put off until it was collected.
    def generator(record, n):
        try:
            yield from loader(n=n)
        finally:
            record.append("closed")

    def failing(kind):
        calls = []

        def loss_fn(out, y):
            calls.append(1)
            if len(calls) == 2:
                if kind == "interrupt":
                    raise KeyboardInterrupt
                if kind == "loss":
                    raise RuntimeError("the loss failed")
                return F.cross_entropy(out, y) * float("nan")
            return F.cross_entropy(out, y)

        return loss_fn

    model = make_model()
    pruner = MFACPruner(model, num_grads=4, block_size=8, damp=1e-3)
    for kind, exc in (
        ("interrupt", KeyboardInterrupt),
        ("loss", RuntimeError),
        ("nan", ValueError),
    ):
        record = []
        held = generator(record, 6)
        with pytest.raises(exc):
            pruner.prune(held, failing(kind), sparsity=0.5)
        assert record == ["closed"], kind
    # A generator with batches left after num_grads is not closed: prune()'s next step
    # reads on from it.
    record = []
    held = generator(record, 8)
    pruner.prune(held, F.cross_entropy, sparsity=0.5, steps=2)
    assert record == [] and next(held, None) is None and record == ["closed"]


def test_pruner_refuses_a_parametrized_weight():
    # Regression: weight_norm's weight is recomputed by every forward pass, so its
    # gradients were taken at a stale copy (all zero) and the pruned values written into
    # that copy: sparsity() said 0.5 and the layer was not pruned at all.
    model = make_model()
    nn.utils.parametrizations.weight_norm(model[0])
    for layers in (None, ["0"]):
        with pytest.raises(ValueError, match="weight of layer '0' is not a parameter"):
            MFACPruner(model, layers=layers)
    pruner = MFACPruner(model, layers=["2"], num_grads=4, block_size=8, damp=1e-3)
    pruner.prune(loader(), F.cross_entropy, sparsity=0.5)
    assert int((model[2].weight == 0).sum()) == model[2].weight.numel() // 2
    # A weight that is a buffer is said to be one (was: "computed from others").
    layer = nn.Module()
    layer.register_buffer("weight", torch.ones(3, 3))
    with pytest.raises(ValueError, match="weight of layer '0' is a buffer of the layer"):
        MFACPruner(nn.Sequential(layer), layers=["0"])


def test_pruner_names_a_gradient_beyond_float16():
    # Regression: "G must not contain NaN or infinity: G[0, 1] is -inf", about an
    # array the user never made, for finite gradients that float16 storage overflowed.
    model = make_model()
    before = [w.detach().clone() for w in model.parameters()]
    pruner = MFACPruner(model, num_grads=2, block_size=8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"layer '0' for batch 0 .* beyond float16's range"):
        pruner.prune(loader(n=2), lambda out, y: 1e6 * F.cross_entropy(out, y), sparsity=0.5)
    assert all(torch.equal(w, b) for w, b in zip(model.parameters(), before, strict=True))


def test_pruner_reads_assigned_masks_by_name_and_checks_them():
    # masks is public and may be assigned (from a checkpoint): a dict in another order was
    # read in its own order, so the masks fell on the wrong weights: kept weights of one
    # layer were zeroed and the other's pruned ones counted as kept.
    model = make_model(4)
    data = loader()
    pruner = MFACPruner(model, num_grads=6, block_size=8, saliency="magnitude", update="none")
    with torch.no_grad():
        model[2].weight.zero_()
    before = [w.detach().clone() for w in model.parameters()]
    w2 = model[2].weight
    pruner.masks = {
        "2": torch.zeros_like(w2, dtype=torch.bool),
        "0": torch.ones_like(model[0].weight, dtype=torch.bool),
    }
    assert pruner.sparsity() == w2.numel() / pruner.dim
    pruner.prune(data, F.cross_entropy, sparsity=w2.numel() / pruner.dim)  # reached already
    assert all(torch.equal(w, b) for w, b in zip(model.parameters(), before, strict=True))
    assert not pruner.masks["2"].any() and pruner.masks["0"].all()
    # Anything else is refused by every method that reads them, naming the layer, and a
    # prune() refused so changes nothing.
    good = dict(pruner.masks)
    cases = [
        ({**good, "0": torch.ones(3, dtype=torch.bool)}, ValueError, r"masks\['0'\] .*got \(3,\)"),
        ({**good, "0": good["0"].float()}, TypeError, r"masks\['0'\] must be a boolean"),
        ({**good, "0": good["0"].to("meta")}, ValueError, r"masks\['0'\] .* on meta"),
        ({"0": good["0"]}, ValueError, r"missing \['2'\]"),
        ({**good, "1": good["0"]}, ValueError, r"not pruned \['1'\]"),
        (None, TypeError, "masks must be a dict"),
    ]
    for masks, exc, match in cases:
        pruner.masks = masks
        for call in (
            pruner.sparsity,
            pruner.apply_masks,
            pruner.param_masks,
            pruner.flat_mask,
            lambda: pruner.collect_grads(data, F.cross_entropy),
            lambda: pruner.prune(data, F.cross_entropy, sparsity=0.5),
        ):
            with pytest.raises(exc, match=match):
                call()
        assert all(torch.equal(w, b) for w, b in zip(model.parameters(), before, strict=True))


def _pruner_checkpoint(model, pruner):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dampings", [None, [1e-4, 1e-2]])
def test_pruner_state_dict_round_trip_continues_the_run(dampings):
    # A run checkpointed between prune() calls (model weights + pruner state), loaded into
    # a fresh model and a pruner built with other options, continues bit for bit as the
    # original does.
    kw = {"num_grads": 4, "block_size": 8, "damp": 1e-3, "update": "joint"}
    if dampings is not None:
        kw["update"] = "single"
    select = None if dampings is None else (lambda m: float(F.cross_entropy(*_eval(m))))
    model = make_model(5)
    pruner = MFACPruner(model, **kw, dtype=torch.float32)
    pruner.prune(loader(1), F.cross_entropy, sparsity=0.3, dampings=dampings, select_damp=select)
    saved = _pruner_checkpoint(model, pruner)
    assert set(saved["pruner"]) == {"masks", "selected_damps", "options"}
    pruner.prune(
        loader(2), F.cross_entropy, sparsity=0.6, steps=2, dampings=dampings, select_damp=select
    )

    fresh = make_model(6)  # other weights, replaced by the checkpoint's
    fresh.load_state_dict(saved["model"])
    other = MFACPruner(fresh, num_grads=2, block_size=None, damp=0.5, saliency="obd")
    other.load_state_dict(saved["pruner"])
    assert (other.num_grads, other.block_size, other.damp, other.update) == (
        4,
        8,
        1e-3,
        kw["update"],
    )
    assert other.dtype == torch.float32
    assert other.selected_damps == saved["pruner"]["selected_damps"]
    other.prune(
        loader(2), F.cross_entropy, sparsity=0.6, steps=2, dampings=dampings, select_damp=select
    )
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], other.masks[name])
    assert other.selected_damps == pruner.selected_damps
    # The loaded masks are the pruner's own copies, not the checkpoint's tensors.
    assert all(other.masks[n] is not saved["pruner"]["masks"][n] for n in other.masks)


def _eval(model):
    x, y = batches(9, 1)[0]
    with torch.no_grad():
        return model(x), y


def test_pruner_load_state_dict_refuses_a_bad_state_and_changes_nothing():
    model = make_model(7)
    pruner = MFACPruner(model, num_grads=4, block_size=8, damp=1e-3)
    pruner.prune(loader(), F.cross_entropy, sparsity=0.4)
    good = pruner.state_dict()
    target = MFACPruner(make_model(7), num_grads=3, damp=1e-2, update="none")
    before = target.state_dict()

    def edited(path, value):
        state = copy.deepcopy(good)
        _set(path, value)(state)
        return state

    mask0 = good["masks"]["0"]
    cases = [
        ([1, 2], ValueError, "not an MFACPruner state_dict: expected a dict, got list"),
        ({"masks": good["masks"]}, ValueError, r"missing \['selected_damps', 'options'\]"),
        ({**good, "steps": 3}, ValueError, r"unknown \['steps'\]"),
        (edited(("masks", "0"), mask0.float()), TypeError, r"masks\['0'\] must be a boolean"),
        (edited(("masks", "0"), mask0[:2]), ValueError, r"masks\['0'\] must have the shape"),
        (edited(("masks", "0"), mask0.to("meta")), ValueError, r"masks\['0'\] .* on meta"),
        (edited(("masks",), {"0": mask0}), ValueError, r"missing \['2'\]"),
        (edited(("masks", "1"), mask0), ValueError, r"not pruned \['1'\]"),
        (edited(("masks",), None), TypeError, "masks must be a dict"),
        (edited(("selected_damps",), "abc"), ValueError, "must be a list of dampings"),
        (edited(("selected_damps",), [1e-3, -1.0]), ValueError, r"selected_damps'\]\[1\]"),
        (edited(("options", "damp"), 0.0), ValueError, r"options'\]\['damp'\] must be finite"),
        (edited(("options", "num_grads"), 2.5), TypeError, r"\['num_grads'\] must be an int"),
        (edited(("options", "block_size"), 0), ValueError, r"\['block_size'\] must be >= 1"),
        (edited(("options", "update"), "both"), ValueError, r"\['update'\] must be one of"),
        (edited(("options", "dtype"), "int8"), ValueError, r"\['dtype'\] must be one of"),
        (edited(("options",), {"damp": 1e-3}), ValueError, r"missing \['num_grads'"),
        (edited(("options", "lr"), 1.0), ValueError, r"unknown \['lr'\]"),
    ]
    for state, exc, match in cases:
        with pytest.raises(exc, match=match):
            target.load_state_dict(state)
        after = target.state_dict()
        assert after["options"] == before["options"]
        assert after["selected_damps"] == before["selected_damps"]
        assert all(torch.equal(after["masks"][n], before["masks"][n]) for n in before["masks"])
    target.load_state_dict(good)  # the state itself loads
    assert target.sparsity() == pruner.sparsity()


def test_pruner_refuses_weights_replaced_since_it_was_built():
    # Regression: after load_state_dict(..., assign=True) (or a layer replaced) the pruner
    # pruned its old tensors: the model kept its weights, and sparsity() said 0.5.
    data = loader()
    for replace in (
        lambda model: model.load_state_dict(make_model(7).state_dict(), assign=True),
        lambda model: model.__setitem__(2, nn.Linear(4, 3)),
    ):
        model = make_model(6)
        pruner = MFACPruner(model, num_grads=6, block_size=8, damp=1e-3)
        replace(model)
        before = [w.detach().clone() for w in model.parameters()]
        for call, args in (
            (pruner.prune, (data, F.cross_entropy)),
            (pruner.collect_grads, (data, F.cross_entropy)),
            (pruner.apply_masks, ()),
        ):
            kwargs = {"sparsity": 0.5} if call == pruner.prune else {}
            with pytest.raises(ValueError, match=r"no longer the parameter this MFACPruner"):
                call(*args, **kwargs)
        assert all(torch.equal(w, b) for w, b in zip(model.parameters(), before, strict=True))
    # Loading in place (the default) keeps the parameters: nothing to refuse.
    model = make_model(6)
    pruner = MFACPruner(model, num_grads=6, block_size=8, damp=1e-3)
    model.load_state_dict(make_model(7).state_dict())
    pruner.prune(data, F.cross_entropy, sparsity=0.5)
    assert sum(int((w == 0).sum()) for w in pruner.weights.values()) == pruner.dim // 2


def test_pruner_takes_a_held_out_loss_that_requires_grad():
    # A select_damp computed without torch.no_grad(): its value, without PyTorch's
    # UserWarning about converting a tensor that requires grad (an error under -W error).
    model = make_model(8)
    x, y = batches(9, 1)[0]
    pruner = MFACPruner(model, num_grads=6, block_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.prune(
            loader(),
            F.cross_entropy,
            sparsity=0.5,
            dampings=[1e-4, 1e-1],
            select_damp=lambda model: F.cross_entropy(model(x), y),
        )
    assert len(pruner.selected_damps) == 1


def test_pruner_names_the_layer_and_batch_of_a_non_finite_gradient():
    # Was "G must not contain NaN or infinity: G[0, 1] is nan", of an array the user
    # never made. NaN at a pruned weight is dropped, as the pruning functions drop it.
    model = make_model(5)
    before = [w.detach().clone() for w in model.parameters()]
    pruner = MFACPruner(model, num_grads=4, block_size=8, damp=1e-3)

    calls = []

    def loss(out, y):  # not finite for the second batch
        calls.append(1)
        return F.cross_entropy(out, y) * (math.nan if len(calls) == 2 else 1.0)

    with pytest.raises(ValueError, match=r"gradient of layer '0' for batch 1 holds nan"):
        pruner.prune(loader(n=4), loss, sparsity=0.5)
    assert all(torch.equal(w, b) for w, b in zip(model.parameters(), before, strict=True))
    # A NaN gradient only at pruned weights: pruned by a mask, kept out of G.
    mask0 = torch.ones_like(model[0].weight, dtype=torch.bool)
    mask0[0, 0] = False
    pruner.masks["0"] = mask0
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0

    def hook(grad):
        grad = grad.clone()
        grad[0, 0] = math.nan
        return grad

    handle = model[0].weight.register_hook(hook)
    try:
        pruner.prune(loader(n=4), F.cross_entropy, sparsity=0.5)
    finally:
        handle.remove()
    assert pruner.sparsity() == 0.5 and not pruner.masks["0"][0, 0]


def test_pruner_checks_its_options_when_built():
    # Regression: they were accepted and failed at the first prune(), after the
    # gradients were collected; a bad selection_block_size was reported as "block_size",
    # a dtype given as a string as "Invalid device string".
    model = make_model()
    bad = [
        ({"damp": -1.0}, ValueError, "damp must be finite and > 0"),
        ({"damp": float("nan")}, ValueError, "damp must be finite and > 0"),
        ({"block_size": 0}, ValueError, "block_size must be >= 1"),
        ({"block_size": 7.5}, TypeError, "block_size must be an int"),
        ({"selection_block_size": -3}, ValueError, "selection_block_size must be >= 1"),
        ({"dtype": torch.int32}, TypeError, "dtype must be None"),
        ({"dtype": "float64"}, TypeError, "dtype must be None"),
        ({"saliency": "OBS"}, ValueError, "saliency must be one of"),
        ({"update": "Joint"}, ValueError, "update must be one of"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            MFACPruner(model, **kwargs)
    assert MFACPruner(model, block_size=np.int64(8), damp=np.float32(1e-3)).block_size == 8


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mfac_defaults_descend_on_every_step(dtype):
    # torch's own optimizer check ("goes right direction"): with the default damping
    # (kappa up to ~1e8 here), every step s satisfies g . s > 0. Before the passes summed
    # in float64, float32 steps pointed uphill on every seed (|F s - g| / |g| = 60).
    dt = getattr(torch, dtype)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        A = torch.randn(64, 10, generator=gen, dtype=dt) * 10
        b = torch.randn(64, generator=gen, dtype=dt)
        w = torch.randn(10, generator=gen, dtype=dt).requires_grad_()
        opt = MFAC([w], num_grads=8)
        for _ in range(24):
            rows = torch.randint(0, 64, (8,), generator=gen)
            opt.zero_grad()
            loss = ((A[rows] @ w - b[rows]) ** 2).sum() / 2
            loss.backward()
            g, before = w.grad.detach().clone(), w.detach().clone()
            opt.step()
            s = before - w.detach()
            assert float(g @ s) > 0, (seed, float(g @ s))


def test_ill_conditioned_warning_of_a_step_names_the_callers_line():
    # The warning is raised deep in the window's factor, below torch.optim's step hooks
    # and no_grad wrapper: it must name the line that called opt.step(), not torch's.
    # Each gradient alone keeps eps(float64) kappa < 1 (|g|^2 / (m damp) = 2e15), so the
    # window takes it; four nearly parallel ones give kappa ~ 8e15, which the
    # refactorisation after m edits finds: float64 keeps no digit.
    p = nn.Parameter(torch.zeros(50, dtype=torch.float64))
    opt = MFAC([p], num_grads=4, damp=1e-3)
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(IllConditionedWarning) as record:
        for _ in range(10):
            p.grad = 4e5 + torch.randn(50, generator=gen, dtype=torch.float64)
            opt.step()
    assert opt.rejected_grads == 0
    assert {w.filename for w in record if w.category is IllConditionedWarning} == {__file__}


def test_parameters_made_under_inference_mode_are_stepped_there_as_torchs_optimizers_do():
    # Regression: the step left inference mode, where writes to such parameters are
    # refused: torch's error came after the window and momentum had changed and the
    # parameters before had moved (steps not counted). torch.optim.Adam steps them.
    def run(inference: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        with torch.inference_mode(inference):
            params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(5))]
            opt = MFAC(params, lr=0.1, num_grads=2, damp=1e-2, momentum=0.5)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape)
                opt.step()
        assert opt.steps == 3
        return [p.detach().clone() for p in params]

    for got, want in zip(run(True), run(False), strict=True):
        assert torch.equal(got, want)


def test_uninitialised_lazy_parameters_are_refused_in_words():
    with pytest.raises(ValueError, match=r"is not initialised yet .* run one forward pass"):
        MFAC(nn.LazyLinear(3).parameters(), lr=0.1)
