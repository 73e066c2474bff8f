"""Choosing the damping by a held-out loss: select_damping, gradual_prune and MFACPruner."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

from mfac_core import SpectralIHVP, StaticIHVP, pruning
from mfac_core.pruning import DampingChoice, gradual_prune, prune, select_damping
from mfac_core.testing import to_numpy


def regression(rng: np.random.Generator, d: int = 24, n: int = 160, m: int = 48):
    """Correlated least squares: weights, per-sample gradients, a held-out loss."""
    base = rng.standard_normal((n, 5))
    X = base @ rng.standard_normal((5, d)) + 0.3 * rng.standard_normal((n, d))
    y = X @ rng.standard_normal(d) + 0.1 * rng.standard_normal(n)
    theta = np.linalg.lstsq(X[:m], y[:m], rcond=None)[0]
    G = (X[:m] @ theta - y[:m])[:, None] * X[:m]
    X_val, y_val = X[m:], y[m:]

    def val_loss(t: np.ndarray) -> float:
        return float(np.mean((X_val @ t - y_val) ** 2))

    return theta, G, val_loss


def brute_force(theta, G, grid, val_loss, **options):
    """A full prune (a Cholesky set-up) per damping: the losses and results."""
    results = [prune(theta, G, damp=dp, **options) for dp in grid]
    return [val_loss(r.theta) for r in results], results


@pytest.mark.parametrize("bs", [None, 8])
@pytest.mark.parametrize("update", ["single", "none"])
def test_select_damping_equals_brute_force(xp_device, rng, bs, update):
    theta, G, val_loss = regression(rng)
    mask = np.ones(theta.size, dtype=bool)
    mask[[2, 11]] = False
    theta, G = np.where(mask, theta, 0.0), G * mask
    scale = np.linalg.norm(G, 2) ** 2 / G.shape[0]
    grid = [scale * 10.0**e for e in (-4, -2, -1, 0, 2)]
    kappa = 1.0 + scale / min(grid)
    rtol = 1e-10 * kappa  # float64, both forms lose about eps * kappa
    options = {"sparsity": 0.5, "block_size": bs, "update": update, "mask": mask}
    want_losses, want = brute_force(theta, G, grid, val_loss, **options)
    best = int(np.argmin(want_losses))
    # The test means something only if the grid's losses are told apart, or tie exactly: without
    # an update, dampings that select the same weights give the same weights.
    ties = [k for k, v in enumerate(want_losses) if v <= (1 + 100 * rtol) * want_losses[best]]
    assert all(np.array_equal(want[k].theta, want[best].theta) for k in ties), ties

    be = xp_device
    seen = []

    def loss(dp, result):
        seen.append(dp)
        return val_loss(to_numpy(result.theta))

    options["mask"] = be.asarray(mask)
    choice = select_damping(be.asarray(theta), be.asarray(G), grid, loss=loss, **options)
    assert isinstance(choice, DampingChoice)
    assert seen == grid and choice.dampings == tuple(grid)
    assert choice.damp == grid[best]
    np.testing.assert_allclose(choice.losses, want_losses, rtol=rtol)
    np.testing.assert_array_equal(to_numpy(choice.result.mask) != 0, want[best].mask)
    np.testing.assert_allclose(
        to_numpy(choice.result.theta),
        want[best].theta,
        rtol=0,
        atol=rtol * np.abs(theta).max(),
    )


def test_select_damping_picks_the_first_lowest_loss_and_its_candidate(rng):
    theta, G, _ = regression(rng)
    grid = [1e-3, 1e-2, 1e-1, 1.0]
    values = {1e-3: 3.0, 1e-2: 1.0, 1e-1: 1.0, 1.0: 2.0}
    candidates = {}

    def loss(dp, result):
        candidates[dp] = result
        return np.float32(values[dp])  # NumPy scalars are real numbers too

    choice = select_damping(theta, G, grid, sparsity=0.4, loss=loss)
    assert choice.damp == 1e-2
    assert choice.losses == (3.0, 1.0, 1.0, 2.0)
    assert choice.result is candidates[1e-2]
    # A 0-d array is accepted as well, and the minimum moves with the values.
    values[1.0] = 0.5
    choice = select_damping(theta, G, grid, sparsity=0.4, loss=lambda dp, r: np.array(values[dp]))
    assert choice.damp == 1.0


def test_select_damping_builds_one_operator(monkeypatch, rng):
    theta, G, val_loss = regression(rng)
    built = []

    class Counting(SpectralIHVP):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("damp"))
            super().__init__(*args, **kwargs)

    def no_cholesky(*args, **kwargs):
        raise AssertionError("select_damping must not build a Cholesky operator per damping")

    monkeypatch.setattr(pruning, "SpectralIHVP", Counting)
    monkeypatch.setattr(pruning, "static_ihvp", no_cholesky)
    grid = [10.0**e for e in range(-6, 2)]
    choice = select_damping(theta, G, grid, sparsity=0.5, loss=lambda dp, r: val_loss(r.theta))
    assert len(built) == 1 and len(choice.losses) == 8


@pytest.mark.parametrize(
    ("grid", "error", "match"),
    [
        ([], ValueError, "at least one damping"),
        ([1e-2, -1.0], ValueError, r"dampings\[1\] must be finite"),
        ("0.1", TypeError, "sequence of real numbers"),
        ([1e-2, "x"], TypeError, "real number"),
    ],
)
@pytest.mark.parametrize("which", ["damping_sweep", "select_damping"])
def test_bad_grids_fail_before_the_set_up(monkeypatch, rng, grid, error, match, which):
    """The dampings are checked before the O(d m^2) spectral set-up, not by it."""
    theta, G, _ = regression(rng)

    def no_set_up(*args, **kwargs):
        raise AssertionError("the set-up ran before the dampings were checked")

    monkeypatch.setattr(pruning, "SpectralIHVP", no_set_up)
    with pytest.raises(error, match=match):
        if which == "damping_sweep":
            pruning.damping_sweep(theta, G, grid, sparsity=0.5)
        else:
            select_damping(theta, G, grid, sparsity=0.5, loss=lambda dp, r: 0.0)


@pytest.mark.parametrize("which", ["damping_sweep", "select_damping"])
def test_bad_array_grids_fail_before_the_set_up(monkeypatch, rng, which):
    theta, G, _ = regression(rng)

    def no_set_up(*args, **kwargs):
        raise AssertionError("the set-up ran before the dampings were checked")

    monkeypatch.setattr(pruning, "SpectralIHVP", no_set_up)
    bad = [
        (np.array([[1e-2, 1e-1]]), ValueError, r"1-d array of dampings, got shape \(1, 2\)"),
        (np.array(1e-2), TypeError, "sequence of real numbers"),
        (np.array([1e-2, np.nan]), ValueError, r"dampings\[1\] must be finite"),
        (np.array([1e-2, 0.0]), ValueError, r"dampings\[1\] must be finite and > 0"),
        (np.array([True, True]), TypeError, r"dampings\[0\] must be a real number"),
        (np.array([1e-2 + 1j]), TypeError, r"dampings\[0\] must be a real number"),
        (np.array(["0.1"]), TypeError, r"dampings\[0\] must be a real number"),
        (np.array([], dtype=float), ValueError, "at least one damping"),
    ]
    for grid, error, match in bad:
        with pytest.raises(error, match=match):
            if which == "damping_sweep":
                pruning.damping_sweep(theta, G, grid, sparsity=0.5)
            else:
                select_damping(theta, G, grid, sparsity=0.5, loss=lambda dp, r: 0.0)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (float("nan"), ValueError, r"damp=0\.01 is nan; it must be finite"),
        (float("inf"), ValueError, "finite"),
        ("0.5", TypeError, "real number"),
        ([0.5], TypeError, "real number"),
        (None, TypeError, "real number"),
        (True, TypeError, "real number"),
        ("pair", TypeError, "real number"),
        ("complex", TypeError, "real number"),
    ],
)
def test_bad_loss_values(rng, value, error, match):
    # Arrays are made here: a parameter that is an array confuses the fixtures' lookups.
    if isinstance(value, str) and value in ("pair", "complex"):
        value = {"pair": np.array([0.5, 0.7]), "complex": np.array(0.5 + 1j)}[value]
    theta, G, _ = regression(rng)
    before = theta.copy()
    with pytest.raises(error, match=match):
        select_damping(
            theta, G, [1e-3, 1e-2], sparsity=0.5, loss=lambda dp, r: 1.0 if dp < 1e-2 else value
        )
    np.testing.assert_array_equal(theta, before)


def test_select_damping_validation(rng):
    theta, G, val_loss = regression(rng)

    def loss(dp, r):
        return val_loss(r.theta)

    with pytest.raises(TypeError, match="loss must be callable"):
        select_damping(theta, G, [0.1], sparsity=0.5, loss=0.5)
    with pytest.raises(ValueError, match="joint"):
        select_damping(theta, G, [0.1], sparsity=0.5, loss=loss, update="joint")
    with pytest.raises(ValueError, match="update"):
        select_damping(theta, G, [0.1], sparsity=0.5, loss=loss, update="both")
    with pytest.raises(ValueError, match="damp"):
        select_damping(theta, G, [0.1, 0.0], sparsity=0.5, loss=loss)
    with pytest.raises(ValueError, match="at least one"):
        select_damping(theta, G, [], sparsity=0.5, loss=loss)
    with pytest.raises(ValueError, match=r"^dampings\[1\]=1e\+307 is too large for"):
        select_damping(theta, G, [0.1, 1e307], sparsity=0.5, loss=loss)
    with pytest.raises(ValueError, match="sparsity"):
        select_damping(theta, G, [0.1], sparsity=1.0, loss=loss)
    with pytest.raises(TypeError, match="dtype"):
        select_damping(theta.astype(np.float32), G, [0.1], sparsity=0.5, loss=loss)


def test_gradual_prune_with_a_grid_is_select_damping_per_step(rng):
    theta, _, val_loss = regression(rng)
    X = rng.standard_normal((40, theta.size))
    y = X @ theta + 0.5 * rng.standard_normal(40)

    def grad_fn(t, mask):
        return (X @ t - y)[:, None] * X

    grid = [1e-4, 1e-2, 1.0, 100.0]
    calls = []

    def loss(dp, r):
        calls.append(dp)
        return val_loss(r.theta)

    res = gradual_prune(theta, grad_fn, sparsity=0.75, steps=3, damp=grid, select_damp=loss)
    assert calls == grid * 3
    # The same steps by hand.
    cur = pruning.PruneResult(theta, np.ones(theta.size, dtype=bool))
    for target in pruning.sparsity_schedule(0.0, 0.75, 3):
        cur = select_damping(
            cur.theta,
            grad_fn(cur.theta, cur.mask),
            grid,
            sparsity=target,
            loss=lambda dp, r: val_loss(r.theta),
            mask=cur.mask,
        ).result
    np.testing.assert_array_equal(res.mask, cur.mask)
    np.testing.assert_array_equal(res.theta, cur.theta)


def test_arrays_of_dampings_are_grids(rng):
    # A NumPy grid (np.logspace, the usual way to write one) or a tuple works wherever a
    # list does, with the same results.
    theta, G, val_loss = regression(rng, d=12, n=60, m=20)
    grid = [1e-3, 1e-1, 10.0]

    def loss(dp, r):
        return val_loss(r.theta)

    want = select_damping(theta, G, grid, sparsity=0.5, loss=loss)
    want_sweep = pruning.damping_sweep(theta, G, grid, sparsity=0.5)
    for given in (np.array(grid), tuple(grid)):
        got = select_damping(theta, G, given, sparsity=0.5, loss=loss)
        assert got.damp == want.damp and got.losses == want.losses
        assert got.dampings == tuple(float(dp) for dp in given)
        sweep = pruning.damping_sweep(theta, G, given, sparsity=0.5)
        np.testing.assert_array_equal(sweep.saliency, want_sweep.saliency)

    def grad_fn(t, mask):
        return G

    res = gradual_prune(
        theta, grad_fn, sparsity=0.5, steps=2, damp=np.array(grid), select_damp=loss
    )
    ref = gradual_prune(theta, grad_fn, sparsity=0.5, steps=2, damp=grid, select_damp=loss)
    np.testing.assert_array_equal(res.theta, ref.theta)
    with pytest.raises(ValueError, match="select_damp"):
        gradual_prune(theta, grad_fn, sparsity=0.5, steps=2, damp=np.array(grid))
    # A NumPy scalar is one damping, not a grid.
    one = gradual_prune(theta, grad_fn, sparsity=0.5, steps=2, damp=np.float64(0.1))
    two = gradual_prune(theta, grad_fn, sparsity=0.5, steps=2, damp=0.1)
    np.testing.assert_array_equal(one.theta, two.theta)


def test_gradual_prune_grid_errors_come_before_any_gradient(rng):
    theta, G, val_loss = regression(rng)
    asked = []

    def grad_fn(t, mask):
        asked.append(1)
        return G

    def loss(dp, r):
        return val_loss(r.theta)

    bad = [
        ({"damp": [1e-3, 1e-2]}, ValueError, "select_damp"),
        ({"damp": 1e-3, "select_damp": loss}, TypeError, "sequence of dampings"),
        ({"damp": [1e-3], "select_damp": 0.5}, TypeError, "callable"),
        ({"damp": [1e-3, -1.0], "select_damp": loss}, ValueError, "damp"),
        ({"damp": [], "select_damp": loss}, ValueError, "at least one"),
        ({"damp": [1e-3], "select_damp": loss, "saliency": "magnitude"}, ValueError, "OBS"),
        ({"damp": [1e-3], "select_damp": loss, "update": "joint"}, ValueError, "joint"),
    ]
    for options, error, match in bad:
        with pytest.raises(error, match=match):
            gradual_prune(theta, grad_fn, sparsity=0.5, steps=2, **options)
    assert not asked


# -- MFACPruner -----------------------------------------------------------------------------


def _torch_problem():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    data = [
        (torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(16)
    ]
    x_val = torch.randn(64, 6, generator=gen)
    y_val = torch.randint(0, 3, (64,), generator=gen)

    @torch.no_grad()
    def val_loss(m):
        return torch.nn.functional.cross_entropy(m(x_val), y_val)  # a 0-d tensor

    return torch, model, data, val_loss


def test_mfac_pruner_picks_the_damping_of_brute_force():
    torch, model, data, val_loss = _torch_problem()
    from mfac_core.torch import MFACPruner

    loss_fn = torch.nn.functional.cross_entropy
    grid = [1e-4, 1e-2, 1.0, 100.0]
    options = {"num_grads": 16, "block_size": 32, "dtype": torch.float64}
    brute = []
    for dp in grid:
        m = copy.deepcopy(model)
        MFACPruner(m, damp=dp, **options).prune(data, loss_fn, sparsity=0.6)
        brute.append((float(val_loss(m)), m))
    losses = [b[0] for b in brute]
    best = int(np.argmin(losses))
    assert sorted(losses)[1] > 1.001 * losses[best]

    pruner = MFACPruner(model, **options)
    pruner.prune(data, loss_fn, sparsity=0.6, dampings=grid, select_damp=val_loss)
    assert pruner.selected_damps == [grid[best]]
    for a, b in zip(model.parameters(), brute[best][1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert abs(pruner.sparsity() - 0.6) < 0.01

    pruner.prune(data, loss_fn, sparsity=0.8, steps=2, dampings=grid, select_damp=val_loss)
    assert len(pruner.selected_damps) == 2 and set(pruner.selected_damps) <= set(grid)


def test_mfac_pruner_restores_the_model_when_the_selection_fails():
    torch, model, data, val_loss = _torch_problem()
    from mfac_core.torch import MFACPruner

    loss_fn = torch.nn.functional.cross_entropy
    pruner = MFACPruner(model, num_grads=8, block_size=32)
    pruner.prune(data, loss_fn, sparsity=0.3)
    weights = [p.detach().clone() for p in model.parameters()]
    masks = {k: v.clone() for k, v in pruner.masks.items()}
    calls = []

    def flaky(m):
        calls.append(1)
        return float("nan") if len(calls) == 3 else val_loss(m)

    with pytest.raises(ValueError, match="finite"):
        pruner.prune(data, loss_fn, sparsity=0.6, dampings=[1e-3, 1e-2, 1e-1], select_damp=flaky)
    assert len(calls) == 3
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
    for k, v in masks.items():
        assert torch.equal(pruner.masks[k], v)
    with pytest.raises(ValueError, match="both"):
        pruner.prune(data, loss_fn, sparsity=0.6, dampings=[1e-3])


def test_mfac_pruner_refuses_a_select_damp_that_is_not_callable_before_any_gradient():
    """Wrapped in a callable by prune(), it passed gradual_prune's check and failed as
    "'float' object is not callable", after the gradients' forward and backward passes."""
    torch, model, data, _ = _torch_problem()
    from mfac_core.torch import MFACPruner

    batches = []

    def loss_fn(out, y):
        batches.append(1)
        return torch.nn.functional.cross_entropy(out, y)

    pruner = MFACPruner(model, num_grads=8, block_size=32)
    with pytest.raises(TypeError, match="select_damp must be callable, got float"):
        pruner.prune(data, loss_fn, sparsity=0.5, dampings=[1e-3, 1e-2], select_damp=0.5)
    assert batches == [] and pruner.sparsity() == 0.0


def test_damping_sweep_with_a_mask_selects_what_prune_selects(rng):
    # G is not zeroed at the pruned weights by the caller: damping_sweep must decouple
    # them itself (as prune does), or its saliencies describe another Fisher.
    theta, G, _ = regression(rng)
    mask = np.ones(theta.size, dtype=bool)
    mask[[1, 5, 17]] = False
    grid = [1e-3, 1e-1, 10.0]
    res = pruning.damping_sweep(theta, G, grid, sparsity=0.5, mask=mask)
    for k, dp in enumerate(grid):
        want = prune(theta, G, sparsity=0.5, damp=dp, mask=mask, update="none")
        assert np.array_equal(res.selected[k], mask & ~want.mask), dp
        rho = pruning.obs_saliency(theta, StaticIHVP(G * mask, damp=dp))
        kappa = 1.0 + np.linalg.norm(G, 2) ** 2 / (G.shape[0] * dp)
        np.testing.assert_allclose(res.saliency[k][mask], rho[mask], rtol=1e-12 * kappa)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_grids_take_two_byte_gradients(rng, storage):
    # The input check accepts 2-byte G with float32 theta; the grid functions must too
    # (they once raised TypeError from the spectral set-up), matching prune on the same G.
    torch = pytest.importorskip("torch")
    theta, G, val_loss = regression(rng)
    t32 = torch.tensor(theta, dtype=torch.float32)
    G2 = torch.tensor(G).to(getattr(torch, storage))
    grid = [1e-2, 1.0]
    sweep = pruning.damping_sweep(t32, G2, grid, sparsity=0.5)
    choice = select_damping(
        t32, G2, grid, sparsity=0.5, loss=lambda dp, r: val_loss(r.theta.double().numpy())
    )
    for k, dp in enumerate(grid):
        want = prune(t32, G2, sparsity=0.5, damp=dp)
        assert sweep.saliency.dtype == torch.float32
        assert torch.equal(sweep.selected[k], ~want.mask)
    assert choice.damp in grid and choice.result.theta.dtype == torch.float32


# -- one gradient preparation for every entry point ------------------------------------------

_ENTRY_POINTS = {
    "prune": lambda t, G, mask: prune(t, G, sparsity=0.5, damp=1e-2, mask=mask),
    "prune-obd": lambda t, G, mask: prune(
        t, G, sparsity=0.5, damp=1e-2, mask=mask, saliency="obd", update="none"
    ),
    "damping_sweep": lambda t, G, mask: pruning.damping_sweep(
        t, G, [1e-2, 1.0], sparsity=0.5, mask=mask
    ),
    "select_damping": lambda t, G, mask: select_damping(
        t, G, [1e-2, 1.0], sparsity=0.5, mask=mask, loss=lambda dp, r: float(r.theta.sum())
    ),
    "gradual_prune": lambda t, G, mask: gradual_prune(
        t, lambda theta, kept: G, sparsity=0.5, steps=2, damp=1e-2, mask=mask
    ),
    "gradual_prune-grid": lambda t, G, mask: gradual_prune(
        t,
        lambda theta, kept: G,
        sparsity=0.5,
        steps=2,
        damp=[1e-2, 1.0],
        select_damp=lambda dp, r: float(r.theta.sum()),
        mask=mask,
    ),
}


def _arrays(out):
    """The arrays of an entry point's result, flattened into one list."""
    if hasattr(out, "shape"):
        return [out]
    if isinstance(out, tuple):
        return [a for part in out for a in _arrays(part)]
    return []


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    ("library", "storage"), [("torch", "float16"), ("torch", "bfloat16"), ("numpy", "bfloat16")]
)
@pytest.mark.parametrize("which", list(_ENTRY_POINTS))
def test_every_entry_point_prepares_two_byte_gradients_and_masks_alike(
    which, library, storage, masked
):
    # Every entry point checks G, zeros it where the mask prunes (NaN there included: the
    # pruned coordinates must not matter) and keeps 2-byte G in 2 bytes, so each gives
    # what it gives for the same values in float32 with zeros at the pruned coordinates.
    # NumPy's bfloat16 is ml_dtypes'.
    rng = np.random.default_rng(7)
    d, m = 24, 6
    theta = rng.standard_normal(d).astype(np.float32)
    G = rng.standard_normal((m, d))
    keep = np.arange(d) % 4 != 1
    if library == "torch":
        torch = pytest.importorskip("torch")
        theta, keep = torch.tensor(theta), torch.tensor(keep)
        G2 = torch.tensor(G).to(getattr(torch, storage))
        where, reference = torch.where, G2.float()
    else:
        G2 = G.astype(pytest.importorskip("ml_dtypes").bfloat16)
        where, reference = np.where, G2.astype(np.float32)
    mask = None
    if masked:
        mask = keep
        G2[:, ~mask] = float("nan")
        reference = where(mask, reference, 0.0)
        theta = where(mask, theta, 0.0)
    fn = _ENTRY_POINTS[which]
    got, want = _arrays(fn(theta, G2, mask)), _arrays(fn(theta, reference, mask))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        exact = str(a.dtype) in ("bool", "torch.bool")  # the masks and selections
        a, b = to_numpy(a), to_numpy(b)
        if exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_mfac_pruner_takes_two_byte_gradients(storage):
    # The pruner's Fisher dtype may be 2-byte: the gradients are stored in 2 bytes and
    # the weights go through the pruning functions in float32 (it raised TypeError).
    torch, model, data, _ = _torch_problem()
    from mfac_core.torch import MFACPruner

    loss_fn = torch.nn.functional.cross_entropy
    dt = getattr(torch, storage)
    pruner = MFACPruner(model, num_grads=8, block_size=32, damp=1e-2, dtype=dt)
    pruner.prune(data, loss_fn, sparsity=0.3)  # a mask for the step checked next
    theta, mask = pruner.flat_weights(), pruner.flat_mask()
    G = pruner.collect_grads(data, loss_fn)
    assert theta.dtype == torch.float32 and G.dtype == dt
    assert torch.all(G[:, ~mask] == 0)
    want = prune(theta, G, sparsity=0.6, damp=1e-2, block_size=32, mask=mask)
    pruner.prune(data, loss_fn, sparsity=0.6)
    assert torch.equal(pruner.flat_mask(), want.mask)
    torch.testing.assert_close(pruner.flat_weights(), want.theta, rtol=0, atol=0)
    assert model[0].weight.dtype == torch.float32


def test_mfac_pruner_reports_the_damping_select_damping_chose():
    # Regression: MFACPruner took its own argmin over the values select_damp returned,
    # read after the step. A held-out loss returned in one reused tensor then read the
    # last value for every damping, and the pruner reported the first damping while the
    # weights were pruned at the one select_damping chose.
    torch, model, data, _ = _torch_problem()
    from mfac_core.torch import MFACPruner

    loss_fn = torch.nn.functional.cross_entropy
    grid = [1e-4, 1e-2, 1.0]
    twin = copy.deepcopy(model)
    buffer = torch.zeros(())
    values = iter([3.0, 1.0, 2.0])

    def reused(m):
        return buffer.fill_(next(values))

    pruner = MFACPruner(model, num_grads=8, block_size=32)
    pruner.prune(data, loss_fn, sparsity=0.5, dampings=grid, select_damp=reused)
    assert pruner.selected_damps == [grid[1]]
    MFACPruner(twin, num_grads=8, block_size=32, damp=grid[1]).prune(data, loss_fn, sparsity=0.5)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("which", ["damping_sweep", "select_damping"])
def test_grids_warn_for_their_own_dampings_only(rng, which):
    # Regression: both built their SpectralIHVP at damp=1 whatever the grid: gradients of
    # norm ~1e10 with a grid of 1e18 (kappa ~1e3) warned "kappa >= 4e21, damp=1", and a
    # grid damping of 1e-20 (kappa ~3e21, saliencies 100 % off) did not warn at all.
    from mfac_core import IllConditionedWarning

    theta, G = rng.standard_normal(30), rng.standard_normal((6, 30)) + 1
    run = {
        "damping_sweep": lambda G, grid: pruning.damping_sweep(theta, G, grid, sparsity=0.5),
        "select_damping": lambda G, grid: select_damping(
            theta, G, grid, sparsity=0.5, loss=lambda dp, r: float(np.sum(r.theta**2))
        ),
    }[which]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(G * 1e10, [1e18, 1e19])
    with pytest.warns(IllConditionedWarning, match="damp=1e-20"):
        run(G, [1e-20, 1.0])
