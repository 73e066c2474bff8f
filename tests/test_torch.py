"""mfac_core.torch: the MFAC optimizer against dense NumPy steps, checkpoints, the pruner."""

from __future__ import annotations

import doctest
import io
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mfac_core import pruning  # noqa: E402
from mfac_core import torch as mfac_torch  # noqa: E402
from mfac_core.torch import MFAC, MFACPruner  # noqa: E402

nn = torch.nn
F = torch.nn.functional


def dense_step(window: list[np.ndarray], g: np.ndarray, damp: float, m: int,
               zero_init: bool) -> np.ndarray:
    """``F^{-1} g`` with the dense inverse of the window's damped Fisher (float64)."""
    d = g.size
    rows = np.array(window[-m:]).reshape(-1, d)
    scale = m if zero_init else rows.shape[0]
    Fm = damp * np.eye(d) + rows.T @ rows / scale
    return np.linalg.solve(Fm, g)


def flat_params(params) -> np.ndarray:
    return np.concatenate([p.detach().numpy().reshape(-1) for p in params])


def make_model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def batches(seed: int, n: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 5, generator=gen, dtype=dtype),
             torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# -- the optimizer ------------------------------------------------------------------------


@pytest.mark.parametrize("zero_init", [True, False])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.01)])
def test_step_matches_dense_inverse(zero_init, momentum, weight_decay):
    model = make_model()
    params = list(model.parameters())
    m, damp, lr = 3, 1e-2, 0.05
    opt = MFAC(params, lr=lr, num_grads=m, damp=damp, momentum=momentum,
               weight_decay=weight_decay, zero_init=zero_init)
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
        np.testing.assert_allclose(flat_params(params), theta - lr * buf, rtol=1e-9,
                                   atol=1e-11)
    assert opt.steps == 6


def test_per_group_learning_rate():
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = MFAC([{"params": first}, {"params": second, "lr": 0.5}], lr=0.1, num_grads=4,
               damp=1e-2)
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
        np.testing.assert_allclose(flat_params(first + second), before - lr * s, rtol=1e-9,
                                   atol=1e-11)


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
    kw = {"lr": 0.05, "num_grads": 4, "damp": 1e-3, "momentum": momentum,
          "weight_decay": 1e-3}
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
    grads = state["mfac"]["window"]["grads"].clone()
    mom = state["mfac"]["momentum_buffer"].clone()
    train(model, opt, batches(7, 2))
    assert torch.equal(state["mfac"]["window"]["grads"], grads)
    assert torch.equal(state["mfac"]["momentum_buffer"], mom)


def test_optimizer_errors():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one device and one dtype"):
        MFAC([a, b])
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        MFAC([a, meta])
    with pytest.raises(TypeError, match="float32 or float64"):
        MFAC([torch.zeros(3, dtype=torch.float16, requires_grad=True)])
    with pytest.raises(ValueError, match="empty"):
        MFAC([])
    with pytest.raises(ValueError, match="lr"):
        MFAC([a], lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        MFAC([a], momentum=1.0)
    with pytest.raises(ValueError, match="num_grads"):
        MFAC([a], num_grads=0)
    with pytest.raises(ValueError, match="damp"):
        MFAC([a], damp=0.0)
    opt = MFAC([a], num_grads=2)
    with pytest.raises(ValueError, match="parameter groups"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    state = opt.state_dict()
    del state["mfac"]
    with pytest.raises(ValueError, match="window"):
        opt.load_state_dict(state)
    other = MFAC([nn.Parameter(torch.zeros(4))], num_grads=2)
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())


def test_import_mfac_core_does_not_import_torch():
    code = "import sys, mfac_core, mfac_core.pruning; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


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
    pruner = MFACPruner(model, num_grads=6, block_size=8, damp=1e-4, dtype=torch.float64,
                        update="joint")
    pruner.prune(batches(0, 6, dtype=torch.float32), F.cross_entropy, sparsity=0.5)
    assert model[0].weight.dtype == torch.float32
    opt = MFAC(model.parameters(), lr=1e-3, num_grads=4, damp=1e-3)
    pruner.attach(opt)
    train(model, opt, batches(1, 3, dtype=torch.float32))
    assert torch.all(model[0].weight[~pruner.masks["0"]] == 0)


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


def test_docstring_examples_run():
    failures, tried = doctest.testmod(mfac_torch)
    assert tried > 0 and failures == 0
