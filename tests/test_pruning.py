"""mfac_core.pruning against brute force: saliencies, selection, OBS updates, schedules."""

from __future__ import annotations

import doctest
import itertools
import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfac_core import EmpiricalFisher, SpectralIHVP, StaticIHVP, pruning
from mfac_core.pruning import (
    PruneResult,
    gradual_prune,
    magnitude_saliency,
    obd_saliency,
    obs_saliency,
    obs_update,
    prune,
    select_pruned,
    sparsity_schedule,
)
from mfac_core.testing import to_numpy

# -- dense references ---------------------------------------------------------------------


def dense_fisher(G: np.ndarray, damp: float, block_size: int | None = None) -> np.ndarray:
    """``damp I + G^T G / m``, with the couplings between blocks removed."""
    m, d = G.shape
    F = damp * np.eye(d) + G.T @ G / m
    if block_size is not None:
        blocks = np.arange(d) // block_size
        F = np.where(blocks[:, None] == blocks[None, :], F, 0.0)
    return F


def constrained_minimiser(F: np.ndarray, theta: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """``theta + delta`` for ``argmin delta^T F delta / 2`` s.t. ``(theta + delta)_P = 0``.

    Solved as one dense KKT system in float64 (the textbook OBS problem).
    """
    d = theta.size
    P = np.flatnonzero(removed)
    E = np.eye(d)[:, P]
    K = np.block([[F, E], [E.T, np.zeros((P.size, P.size))]])
    rhs = np.concatenate([np.zeros(d), -theta[P]])
    return theta + np.linalg.solve(K, rhs)[:d]


def quadratic_cost(F: np.ndarray, delta: np.ndarray) -> float:
    return 0.5 * float(delta @ F @ delta)


def tolerance(dtype: str, G: np.ndarray, damp: float) -> float:
    kappa = 1.0 + np.linalg.norm(G, 2) ** 2 / (G.shape[0] * damp)
    eps = np.finfo(dtype).eps
    return 100 * eps * kappa


def problem(rng: np.random.Generator, m: int = 6, d: int = 17, pruned: float = 0.2):
    G = rng.standard_normal((m, d))
    theta = rng.standard_normal(d)
    mask = rng.random(d) >= pruned
    # Keep a weight in every block of >= 3 and in a ragged last block, so that no block of
    # G is entirely zero (see test_fully_pruned_block for that case).
    mask[::3] = True
    mask[-1] = True
    theta = np.where(mask, theta, 0.0)
    return G * mask, theta, mask


# -- saliencies ---------------------------------------------------------------------------


def test_obs_saliency_matches_dense_inverse(xp_device, dtype, rng):
    G, theta, _ = problem(rng)
    damp = 0.3
    for block_size in (None, 4):
        ihvp = StaticIHVP(xp_device.asarray(G, dtype), damp=damp, block_size=block_size)
        rho = obs_saliency(xp_device.asarray(theta, dtype), ihvp)
        Finv = np.linalg.inv(dense_fisher(G, damp, block_size))
        want = theta**2 / (2 * np.diag(Finv))
        assert rho.dtype == xp_device.dtype(dtype)
        np.testing.assert_allclose(to_numpy(rho), want, rtol=tolerance(dtype, G, damp), atol=0)


def test_obd_and_magnitude_saliencies(xp_device, rng):
    G, theta, _ = problem(rng)
    got = obd_saliency(xp_device.asarray(theta), xp_device.asarray(G), damp=0.5)
    want = theta**2 * (0.5 + np.mean(G**2, axis=0)) / 2
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12)
    np.testing.assert_array_equal(to_numpy(magnitude_saliency(xp_device.asarray(theta))), theta**2)


@pytest.mark.parametrize("damp", [1e-8, 1e8])
def test_saliencies_where_theta_squared_leaves_the_float32_range(rng, damp):
    # damp = 1e-8 (tiny gradients): theta = 1e19..1e20 has theta^2 beyond float32's
    # range, the saliencies (~1e30) are not; damp = 1e8: theta = 1e-22 has a subnormal
    # theta^2 (2 bits), the saliencies (~1e-37) are normal numbers.
    from mfac_core.testing import dense_inverse

    G = (rng.standard_normal((8, 4)) * (1e-6 if damp < 1 else 1.0)).astype(np.float32)
    theta = np.array([1e20, -3e19, 1.0, 0.0] if damp < 1 else [1e-22, 3e-23, 1.0, -0.0])
    theta = theta.astype(np.float32)
    t64 = theta.astype(np.float64)
    Finv = dense_inverse(G, damp)
    fisher = damp + np.mean(G.astype(np.float64) ** 2, axis=0)
    eps = np.finfo(np.float32).eps
    for got, want in (
        (obs_saliency(theta, StaticIHVP(G, damp=damp)), t64**2 / (2 * np.diag(Finv))),
        (obd_saliency(theta, G, damp=damp), t64**2 * fisher / 2),
        (pruning.damping_sweep(theta, G, [damp], sparsity=0.5).saliency[0], None),
    ):
        want = t64**2 / (2 * np.diag(Finv)) if want is None else want
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=8 * eps, atol=0)


@pytest.mark.parametrize("update", ["single", "joint"])
def test_an_update_whose_coefficients_overflow_names_them(update):
    # Regression: float32 gradients of ~1e20 (a well-conditioned F, damping scaled with
    # them) overflowed theta_q / [F^-1]_qq, refused as "x must not contain NaN or
    # infinity: x[3] is inf", an x the caller never passed.
    rng = np.random.default_rng(14)
    G = (rng.standard_normal((40, 20)) * 1e20).astype(np.float32)
    theta = rng.standard_normal(20).astype(np.float32)
    with pytest.raises(ValueError, match=r"coefficients .* overflow float32"):
        with warnings.catch_warnings():  # NumPy's own, of the overflowing division
            warnings.simplefilter("ignore", RuntimeWarning)
            prune(theta, G, sparsity=0.5, damp=1e38, update=update)


@pytest.mark.parametrize(
    ("dtype", "scale"), [("float32", 1e20), ("float32", 1e-25), ("float64", 1e160)]
)
def test_selection_ranks_saliencies_beyond_the_dtypes_range(rng, dtype, scale):
    # |theta| sqrt(F_jj) ~ 1e20 puts theta^2 / (2 [F^{-1}]_jj) beyond float32's range (and
    # 1e160 beyond float64's): the saliencies all became inf, and the selection took the
    # first weights by index. 1e-25 puts them below float32's smallest subnormal (0).
    from mfac_core.testing import dense_inverse

    d = 6
    G = rng.standard_normal((8, d)).astype(dtype)
    theta = (scale * np.array([3.0, 1.0, 2.0, 0.5, 4.0, 6.0])).astype(dtype)
    F64 = dense_fisher(G.astype(np.float64), 1.0)
    # log saliencies (float64 holds the logs of saliencies it cannot hold), spread by > 0.5
    log_obs = 2 * np.log(np.abs(theta.astype(np.float64))) - np.log(
        2 * np.diag(dense_inverse(G, 1.0))
    )
    log_obd = 2 * np.log(np.abs(theta.astype(np.float64))) + np.log(np.diag(F64) / 2)
    for saliency, logs in (("obs", log_obs), ("obd", log_obd)):
        want = np.zeros(d, dtype=bool)
        want[np.argsort(logs)[:3]] = True
        got = prune(theta, G, sparsity=0.5, damp=1.0, saliency=saliency, update="none")
        np.testing.assert_array_equal(~got.mask, want, err_msg=saliency)
        if saliency == "obs":
            with np.errstate(over="ignore"):  # its saliencies (theta's dtype) overflow
                sweep = pruning.damping_sweep(theta, G, [1.0], sparsity=0.5)
            np.testing.assert_array_equal(sweep.selected[0], want)
            choice = pruning.select_damping(
                theta, G, [1.0], sparsity=0.5, loss=lambda dp, r: 0.0, update="none"
            )
            np.testing.assert_array_equal(~choice.result.mask, want)


@pytest.mark.parametrize(
    ("library", "half"), [("torch", "float16"), ("torch", "bfloat16"), ("numpy", "bfloat16")]
)
def test_obd_saliency_of_2_byte_gradients_sums_in_float64(library, half):
    # The squares of 2**-13 (2**-26 each) fall below half a float32 ulp of 1: summed
    # in float32 after the row of ones they all vanish (128 eps32 at m = 1025). NumPy's
    # bfloat16 is ml_dtypes'.
    m, d, damp = 1025, 4, 2.0**-20
    G = np.full((m, d), 2.0**-13)
    G[0] = 1.0
    theta = np.array([1.0, 2.0, -0.5, 0.25])
    if library == "torch":
        torch = pytest.importorskip("torch")
        theta_in = torch.asarray(theta, dtype=torch.float32)
        G_in = torch.asarray(G, dtype=getattr(torch, half))
    else:
        theta_in = theta.astype(np.float32)
        G_in = G.astype(pytest.importorskip("ml_dtypes").bfloat16)
    got = obd_saliency(theta_in, G_in, damp=damp)
    want = theta**2 * (damp + np.sum(G * G, axis=0) / m) / 2
    eps32 = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(to_numpy(got).astype(np.float64), want, rtol=8 * eps32, atol=0)


@pytest.mark.parametrize(
    ("library", "dtype"),
    [
        ("numpy", "float32"),
        ("numpy", "float16"),
        ("numpy", "bfloat16"),
        ("torch", "float32"),
        ("torch", "bfloat16"),
    ],
)
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_obd_saliency_refuses_non_finite_gradients_of_every_dtype(library, dtype, bad):
    # 2-byte G skips EmpiricalFisher (summed apart in float64): it is refused all the same.
    # NumPy's bfloat16 is ml_dtypes'.
    G = np.ones((3, 4))
    G[1, 2] = bad
    theta = np.ones(4, dtype=np.float32)
    if library == "torch":
        torch = pytest.importorskip("torch")
        G_in, theta_in = torch.tensor(G).to(getattr(torch, dtype)), torch.asarray(theta)
    elif dtype == "bfloat16":
        G_in, theta_in = G.astype(pytest.importorskip("ml_dtypes").bfloat16), theta
    else:
        G_in, theta_in = G.astype(dtype), theta
    with pytest.raises(ValueError, match=r"^G must not contain NaN or infinity"):
        obd_saliency(theta_in, G_in, damp=0.5)
    with pytest.raises(ValueError, match=r"^G must not contain NaN or infinity"):
        prune(theta_in, G_in, sparsity=0.5, damp=0.5, saliency="obd", update="none")


#: Every entry point that takes gradients, each refusing a non-finite G in the same words.
_G_ENTRY_POINTS = {
    "EmpiricalFisher": lambda theta, G: EmpiricalFisher(G, damp=0.5),
    "obd_saliency": lambda theta, G: obd_saliency(theta, G, damp=0.5),
    "prune": lambda theta, G: prune(theta, G, sparsity=0.5, damp=0.5),
    "prune_obd": lambda theta, G: prune(
        theta, G, sparsity=0.5, damp=0.5, saliency="obd", update="none"
    ),
    "prune_masked": lambda theta, G: prune(
        theta, G, sparsity=0.5, damp=0.5, mask=np.arange(4) != 0
    ),
    "gradual_prune": lambda theta, G: gradual_prune(
        theta, lambda th, mask: G, sparsity=0.5, steps=1, damp=0.5
    ),
    "damping_sweep": lambda theta, G: pruning.damping_sweep(theta, G, [0.5], sparsity=0.5),
    "select_damping": lambda theta, G: pruning.select_damping(
        theta, G, [0.5, 1.0], sparsity=0.5, loss=lambda dp, res: 0.0
    ),
}


@pytest.mark.parametrize("entry", sorted(_G_ENTRY_POINTS))
@pytest.mark.parametrize(("dtype", "bad"), [("float64", np.nan), ("float16", -np.inf)])
def test_every_entry_point_names_the_first_non_finite_gradient_entry(entry, dtype, bad):
    # One wording everywhere, saying where: the first entry in row-major order.
    G = np.ones((3, 4))
    G[2, 1] = G[1, 3] = bad
    theta = np.ones(4, dtype=np.float32 if dtype == "float16" else np.float64)
    message = f"G must not contain NaN or infinity: G[1, 3] is {bad}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _G_ENTRY_POINTS[entry](theta, G.astype(dtype))


# -- selection ----------------------------------------------------------------------------


def brute_select(scores, sparsity, mask, block_size):
    d = scores.size
    B = d if block_size is None else min(block_size, d)
    out = np.zeros(d, dtype=bool)
    for b0 in range(0, d, B):
        s, k = scores[b0 : b0 + B], mask[b0 : b0 + B]
        n = s.size
        want = int(np.floor(sparsity * n + 1e-9)) - int((~k).sum())
        if want <= 0:
            continue
        candidates = [i for i in np.argsort(s, kind="stable") if k[i]]
        out[b0 + np.array(candidates[:want], dtype=int)] = True
    return out


@given(
    d=st.integers(1, 40),
    sparsity=st.floats(0.0, 0.99),
    block_size=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_select_matches_brute_force(d, sparsity, block_size, seed, ties):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, d).astype(float) if ties else rng.random(d)
    mask = rng.random(d) > 0.3
    got = select_pruned(scores, sparsity=sparsity, mask=mask, block_size=block_size)
    want = brute_select(scores, sparsity, mask, block_size)
    np.testing.assert_array_equal(got, want)
    assert not np.any(got & ~mask), "a pruned weight was selected again"


def test_select_on_every_backend(xp_device, rng):
    scores = rng.random(23)
    mask = rng.random(23) > 0.25
    for block_size in (None, 5):
        got = select_pruned(
            xp_device.asarray(scores),
            sparsity=0.6,
            mask=xp_device.asarray(mask, "bool"),
            block_size=block_size,
        )
        assert got.dtype == xp_device.xp.bool
        np.testing.assert_array_equal(
            to_numpy(got).astype(bool), brute_select(scores, 0.6, mask, block_size)
        )


def test_select_count_and_already_sparse():
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    kept = np.array([True, True, True, True, True, False])
    np.testing.assert_array_equal(np.flatnonzero(select_pruned(scores, count=2, mask=kept)), [1, 3])
    # Already at 1/6 sparsity: asking for 10% selects nothing, never un-prunes.
    assert not select_pruned(scores, sparsity=0.1, mask=kept).any()
    # Per block: one new weight in each block of 3 (the second block has 2 kept).
    np.testing.assert_array_equal(
        np.flatnonzero(select_pruned(scores, count=1, mask=kept, block_size=3)), [1, 3]
    )
    with pytest.raises(ValueError, match="count=3"):
        select_pruned(scores, count=3, mask=kept, block_size=3)
    with pytest.raises(ValueError, match="count=6"):
        select_pruned(scores, count=6, mask=kept)


def test_sparsity_counts_are_exact_for_large_groups():
    """``floor(sparsity * n)`` of the decimal sparsity given, at the sizes of real models.

    A fixed slack of 1e-9 over the float product fell short from about 4e7 weights:
    0.282 of 10**8 weights gave 28_199_999.
    """
    from mfac_core._pruning_obs import _target_count

    for n in (10, 4 * 10**7, 10**8, 123_456_789, 10**10):
        for permille in range(1000):
            assert _target_count(permille / 1000, n) == permille * n // 1000, (n, permille)
    # Nor is a product that is not near an integer rounded up.
    for n in (3, 10**8 + 1, 2**33 + 1):
        assert _target_count(0.5, n) == n // 2
        assert _target_count(0.75, n) == 3 * n // 4


# -- the OBS update -----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [None, 4, 5, 40])
def test_joint_update_is_the_constrained_minimiser(xp_device, dtype, rng, block_size):
    m, damp = 7, 0.05
    G, theta, mask = problem(rng, m=m, d=23)
    selected = (rng.random(23) < 0.4) & mask
    ihvp = StaticIHVP(xp_device.asarray(G, dtype), damp=damp, block_size=block_size)
    got = obs_update(
        xp_device.asarray(theta, dtype),
        ihvp,
        xp_device.asarray(selected, "bool"),
        joint=True,
        mask=xp_device.asarray(mask, "bool"),
    )
    F = dense_fisher(G, damp, block_size)
    want = constrained_minimiser(F, theta, selected | ~mask)
    got = to_numpy(got)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got[selected | ~mask], 0.0)
    tol = tolerance(dtype, G, damp) * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def refined_minimiser(G: np.ndarray, damp: float, theta: np.ndarray, removed: np.ndarray):
    """:func:`constrained_minimiser` refined in long double: the reference for a KKT system
    whose float64 solve alone is off by eps64 times its condition number."""
    d, P = theta.size, np.flatnonzero(removed)
    Gl = G.astype(np.longdouble)
    Fl = damp * np.eye(d, dtype=np.longdouble) + Gl.T @ Gl / G.shape[0]
    E = np.eye(d)[:, P]
    Kl = np.block([[Fl, E], [E.T, np.zeros((P.size, P.size))]])
    K = Kl.astype(np.float64)
    rhs = np.concatenate([np.zeros(d), -theta[P].astype(np.longdouble)])
    x = np.linalg.solve(K, rhs.astype(np.float64)).astype(np.longdouble)
    for _ in range(3):
        x += np.linalg.solve(K, (rhs - Kl @ x).astype(np.float64))
    return Fl, x[:d]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_joint_update_error_is_bounded_by_the_conditioning_of_the_pruned_block(dtype):
    # [F^{-1}]_PP of cond 1e6 to 7e6 over the 4 pruned weights, coupled to the 4 others.
    # The k x k system is solved in float64; a float32 operator gives its entries, and
    # takes the coefficients, in float32: the update is within a few eps32 cond([F^{-1}]_PP)
    # of the exact one (measured: at most 0.06 of that over 20 seeds), relative to the
    # magnitudes |theta| + |delta|; a float64 operator's within a few eps64 cond.
    m, d, k, damp = 16, 8, 4, 1e-9
    eps = np.finfo(dtype).eps
    for seed in range(4):
        rng = np.random.default_rng(seed)
        U = np.linalg.qr(rng.standard_normal((m, d)))[0]
        V = np.zeros((d, d))  # the spectrum's extremes within P, then P and Q mixed a little
        V[:k, :k] = np.linalg.qr(rng.standard_normal((k, k)))[0]
        V[k:, k:] = np.linalg.qr(rng.standard_normal((k, k)))[0]
        A = rng.standard_normal((d, d))
        V = np.linalg.qr(np.eye(d) + 0.1 * (A - A.T))[0] @ V
        s = np.array([1, 1e-1, 1e-2, 3e-4, 0.5, 0.3, 0.2, 0.1])
        G = ((np.sqrt(m) * U * s) @ V.T).astype(dtype)
        theta = rng.standard_normal(d).astype(dtype)
        removed = np.arange(d) < k
        Fl, delta = refined_minimiser(G, damp, theta, removed)
        Finv = np.linalg.inv(Fl.astype(np.float64))
        cond = np.linalg.cond(Finv[np.ix_(removed, removed)])
        assert cond > 1e6  # the regime this is about
        assert np.abs(delta[k:]).max() > 1e-2 * np.abs(theta).max()  # the others move
        want = (theta + delta).astype(np.float64)
        want[removed] = 0.0
        got = obs_update(theta, StaticIHVP(G, damp=damp), removed, joint=True)
        scale = float(np.abs(theta).max() + np.abs(delta).max())
        err = float(np.abs(got.astype(np.float64) - want).max())
        assert err <= 2 * eps * cond * scale, (seed, cond, err / (eps * cond * scale))


def test_joint_update_within_smaller_blocks_is_exact_for_that_block_diagonal(rng):
    # The operator is the full F, the joint systems are per block of 4: exact for the
    # block-diagonal F only when the operator is block-diagonal too; with a full operator
    # the update still zeroes the selected weights.
    G, theta, mask = problem(rng, d=16)
    selected = (rng.random(16) < 0.5) & mask
    ihvp = StaticIHVP(G, damp=0.1, block_size=4)
    got = obs_update(theta, ihvp, selected, joint=True, block_size=4, mask=mask)
    want = constrained_minimiser(dense_fisher(G, 0.1, 4), theta, selected | ~mask)
    np.testing.assert_allclose(
        got, want, rtol=0, atol=tolerance("float64", G, 0.1) * np.abs(want).max()
    )
    full = obs_update(theta, StaticIHVP(G, damp=0.1), selected, joint=True, block_size=4, mask=mask)
    np.testing.assert_array_equal(full[selected | ~mask], 0.0)


def test_single_update_is_the_summed_obs_formula(xp_device, dtype, rng):
    G, theta, mask = problem(rng)
    damp = 0.2
    selected = (rng.random(17) < 0.3) & mask
    ihvp = StaticIHVP(xp_device.asarray(G, dtype), damp=damp)
    got = to_numpy(
        obs_update(
            xp_device.asarray(theta, dtype),
            ihvp,
            xp_device.asarray(selected, "bool"),
            mask=xp_device.asarray(mask, "bool"),
        )
    )
    Finv = np.linalg.inv(dense_fisher(G, damp))
    coef = np.where(selected, theta / np.diag(Finv), 0.0)
    want = theta - Finv @ coef
    want[selected | ~mask] = 0.0
    np.testing.assert_array_equal(got[selected | ~mask], 0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(dtype, G, damp))


def test_single_and_joint_agree_for_one_weight_and_joint_is_best(rng):
    G, theta, _ = problem(rng, d=20, pruned=0.0)
    ihvp = StaticIHVP(G, damp=0.05)
    one = np.zeros(20, dtype=bool)
    one[7] = True
    joint = obs_update(theta, ihvp, one, joint=True)
    np.testing.assert_allclose(
        obs_update(theta, ihvp, one),
        joint,
        rtol=0,
        atol=tolerance("float64", G, 0.05) * np.abs(joint).max(),
    )
    # For several weights the joint update has the least quadratic cost of the three.
    F = dense_fisher(G, 0.05)
    sel = select_pruned(obs_saliency(theta, ihvp), count=8)
    costs = {
        "none": quadratic_cost(F, np.where(sel, 0.0, theta) - theta),
        "single": quadratic_cost(F, obs_update(theta, ihvp, sel) - theta),
        "joint": quadratic_cost(F, obs_update(theta, ihvp, sel, joint=True) - theta),
    }
    assert costs["joint"] <= costs["single"] * (1 + 1e-12)
    assert costs["joint"] <= costs["none"] * (1 + 1e-12)


def test_update_with_nothing_selected_only_zeroes_the_mask(rng):
    G, theta, mask = problem(rng)
    theta_dirty = theta + (~mask) * 3.0  # pruned coordinates that drifted
    none = np.zeros(17, dtype=bool)
    out = obs_update(theta_dirty, StaticIHVP(G, damp=0.1), none, mask=mask, joint=True)
    np.testing.assert_array_equal(out, np.where(mask, theta, 0.0))


def test_fully_pruned_block(rng):
    # Pruning can empty a whole block; its masked gradients are zero there and F = damp I.
    G, theta, _ = problem(rng, d=12, pruned=0.0)
    mask = np.ones(12, dtype=bool)
    mask[4:8] = False
    res = prune(
        np.where(mask, theta, 0.0),
        G,
        sparsity=0.5,
        damp=0.1,
        block_size=4,
        update="joint",
        mask=mask,
    )
    want = constrained_minimiser(
        dense_fisher(G * mask, 0.1, 4), np.where(mask, theta, 0.0), ~res.mask
    )
    np.testing.assert_allclose(
        res.theta, want, rtol=0, atol=tolerance("float64", G * mask, 0.1) * np.abs(want).max()
    )


def test_joint_refuses_huge_systems(rng):
    G, theta, _ = problem(rng, d=30, pruned=0.0)
    sel = np.ones(30, dtype=bool)
    with pytest.raises(ValueError, match="max_joint_size"):
        obs_update(theta, StaticIHVP(G, damp=0.1), sel, joint=True, max_joint_size=10)


def test_obs_update_checks_joint_and_max_joint_size():
    """``joint="no"`` ran the joint update (a truthy string); ``max_joint_size=2.5`` let a
    2 x 2 system through and ``"abc"`` failed in a comparison deep inside."""
    rng = np.random.default_rng(0)
    G, theta = rng.standard_normal((4, 6)), rng.standard_normal(6)
    op = StaticIHVP(G, damp=0.1)
    sel = np.array([True, True, False, False, False, False])
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="joint must be True or False"):
            obs_update(theta, op, sel, joint=bad)
    for bad, error in ((2.5, TypeError), ("abc", TypeError), (0, ValueError), (-1, ValueError)):
        with pytest.raises(error, match="max_joint_size must be"):
            obs_update(theta, op, sel, joint=True, max_joint_size=bad)
    np.testing.assert_array_equal(
        obs_update(theta, op, sel, joint=np.bool_(True), max_joint_size=np.int64(2)),
        obs_update(theta, op, sel, joint=True),
    )


# -- prune and gradual_prune --------------------------------------------------------------


@pytest.mark.parametrize(
    ("saliency", "update"),
    [
        ("obs", "single"),
        ("obs", "joint"),
        ("obs", "none"),
        ("obd", "none"),
        ("magnitude", "none"),
        ("magnitude", "single"),
    ],
)
def test_prune_bookkeeping(xp_device, rng, saliency, update):
    G, theta, mask = problem(rng, m=8, d=40, pruned=0.1)
    xp = xp_device.xp
    res = prune(
        xp_device.asarray(theta),
        xp_device.asarray(G),
        sparsity=0.7,
        damp=1e-2,
        block_size=8,
        saliency=saliency,
        update=update,
        mask=xp_device.asarray(mask, "bool"),
    )
    assert isinstance(res, PruneResult)
    assert res.mask.dtype == xp.bool
    new_theta, new_mask = to_numpy(res.theta), to_numpy(res.mask).astype(bool)
    assert (~new_mask).sum() == 28
    assert not np.any(new_mask & ~mask), "a pruned weight came back"
    np.testing.assert_array_equal(new_theta[~new_mask], 0.0)
    if update == "none":
        np.testing.assert_array_equal(new_theta[new_mask], theta[new_mask])


def test_prune_masks_the_gradients(rng):
    # Gradients with garbage at pruned coordinates give the same result as clean ones.
    G, theta, mask = problem(rng, d=30, pruned=0.3)
    dirty = G + (~mask) * rng.standard_normal(G.shape)
    a = prune(theta, G, sparsity=0.6, damp=1e-2, mask=mask)
    b = prune(theta, dirty, sparsity=0.6, damp=1e-2, mask=mask)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(
        a.theta, b.theta, rtol=0, atol=tolerance("float64", G, 1e-2) * np.abs(b.theta).max()
    )


def test_prune_magnitude_needs_no_gradients_and_selection_blocks():
    theta = np.array([0.1, -3.0, 0.2, 0.3, 4.0, -0.05, 1.0, 2.0])
    res = prune(
        theta, None, sparsity=0.5, saliency="magnitude", update="none", selection_block_size=4
    )
    np.testing.assert_array_equal(res.mask, [False, True, False, True, True, False, False, True])
    np.testing.assert_array_equal(res.theta, np.where(res.mask, theta, 0.0))


def test_prune_magnitude_orders_by_abs_theta_where_theta_squared_leaves_the_range():
    # float32 theta^2 is 0 for |theta| < 3.7e-23 and inf beyond 1.8e19: the magnitude
    # saliency tied these weights, and the lower index was pruned, not the smaller weight.
    theta = np.array([3e-30, -1e-30, 1.0, -5e19, 4e19, 2.0], dtype=np.float32)
    for sparsity, kept in ((1 / 6, [0, 2, 3, 4, 5]), (5 / 6, [3])):
        res = prune(theta, None, sparsity=sparsity, saliency="magnitude", update="none")
        np.testing.assert_array_equal(np.flatnonzero(res.mask), kept)
        assert res.theta.dtype == np.float32
        np.testing.assert_array_equal(res.theta, np.where(res.mask, theta, 0))


def test_sparsity_schedule():
    assert sparsity_schedule(0.0, 0.8, 4) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    cubic = sparsity_schedule(0.2, 0.9, 5, schedule="cubic")
    assert cubic[-1] == 0.9 and all(b > a for a, b in itertools.pairwise(cubic))
    assert cubic[0] - 0.2 > (0.9 - 0.2) / 5  # front-loaded
    expo = sparsity_schedule(0.0, 0.75, 2, schedule="exponential")
    assert expo == pytest.approx([0.5, 0.75])
    with pytest.raises(ValueError, match="below"):
        sparsity_schedule(0.5, 0.4, 2)
    with pytest.raises(ValueError, match="steps"):
        sparsity_schedule(0.0, 0.4, 0)


def test_gradual_prune_recomputes_at_each_step(xp_device, rng):
    d = 24
    X = rng.standard_normal((48, d))
    y = X @ rng.standard_normal(d)
    theta0 = np.linalg.lstsq(X, y, rcond=None)[0]
    Xb, yb = xp_device.asarray(X), xp_device.asarray(y)
    calls = []

    def grad_fn(theta, mask):
        calls.append((to_numpy(theta), to_numpy(mask).astype(bool)))
        r = Xb @ theta - yb
        return r[:, None] * Xb

    history = []
    res = gradual_prune(
        xp_device.asarray(theta0),
        grad_fn,
        sparsity=0.75,
        steps=3,
        damp=1e-4,
        block_size=8,
        update="joint",
        callback=lambda t, r: history.append(to_numpy(r.mask).astype(bool)),
    )
    assert len(calls) == 3
    assert [int((~h).sum()) for h in history] == [6, 12, 18]
    for (theta_seen, mask_seen), prev in zip(calls[1:], history[:-1], strict=True):
        np.testing.assert_array_equal(mask_seen, prev)  # grad_fn sees the current mask
        np.testing.assert_array_equal(theta_seen[~mask_seen], 0.0)
    for a, b in itertools.pairwise(history):
        assert not np.any(b & ~a)
    np.testing.assert_array_equal(to_numpy(res.theta)[~history[-1]], 0.0)


def test_gradual_obs_beats_magnitude_on_least_squares(rng):
    # Correlated features: OBS with recomputations keeps the fit far better.
    d, n = 30, 200
    base = rng.standard_normal((n, 6))
    X = base @ rng.standard_normal((6, d)) + 0.1 * rng.standard_normal((n, d))
    y = X @ rng.standard_normal(d)
    theta = np.linalg.lstsq(X, y, rcond=None)[0]

    def grad_fn(theta, mask):
        return (X @ theta - y)[:, None] * X

    def loss(t):
        return float(np.mean((X @ t - y) ** 2))

    obs = gradual_prune(theta, grad_fn, sparsity=0.8, steps=4, damp=1e-6)
    mag = prune(theta, None, sparsity=0.8, saliency="magnitude", update="none")
    assert loss(obs.theta) < 0.5 * loss(mag.theta)


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(bad, rng):
    G, theta, _ = problem(rng)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune(theta, G, sparsity=bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_pruned(theta, sparsity=bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        gradual_prune(theta, lambda t, m: G, sparsity=bad, steps=2)


def test_obs_update_names_what_selected_means(rng):
    # Regression: its refusal said "(True = kept)", the mask's meaning, not selected's.
    G, theta, _ = problem(rng)
    with pytest.raises(TypeError, match=r"selected must be a boolean array \(True = removed\)"):
        obs_update(theta, StaticIHVP(G, damp=0.1), np.array([2, 5]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_kept_weights_are_refused_by_name(rng, bad):
    # Regression: a NaN weight was refused as "scores must not contain NaN" (a name the
    # caller never gave); an infinite one was kept, unpruned, in the result.
    G, theta, mask = problem(rng)
    kept = int(np.flatnonzero(mask)[1])
    theta = theta.copy()
    theta[kept] = bad
    want = rf"theta must not contain NaN or infinity: theta\[{kept}\] is {bad}"
    calls = {
        "prune": lambda: prune(theta, G, sparsity=0.8, damp=0.1, mask=mask),
        "gradual_prune": lambda: gradual_prune(
            theta, lambda t, m: G, sparsity=0.8, steps=2, damp=0.1, mask=mask
        ),
        "damping_sweep": lambda: pruning.damping_sweep(
            theta, G, [0.1, 1.0], sparsity=0.8, mask=mask
        ),
        "select_damping": lambda: pruning.select_damping(
            theta, G, [0.1, 1.0], sparsity=0.8, loss=lambda dp, r: 0.0, mask=mask
        ),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=want):
            call()
    # At a weight the mask prunes already it is set to zero, as any value there is.
    theta[kept] = 0.0
    pruned = int(np.flatnonzero(~mask)[0])  # problem() prunes some weights
    clean = prune(theta, G, sparsity=0.8, damp=0.1, mask=mask)
    theta[pruned] = bad
    res = prune(theta, G, sparsity=0.8, damp=0.1, mask=mask)
    np.testing.assert_array_equal(res.theta, clean.theta)
    np.testing.assert_array_equal(res.mask, clean.mask)


@pytest.mark.parametrize("joint", [False, True])
def test_obs_update_leaves_pruned_weights_out_and_names_non_finite_kept_ones(rng, joint):
    # Regressions: a NaN or infinity at a weight that mask prunes, selected again, failed
    # with "x must not contain NaN or infinity: x[i] is nan" (the product's argument); at
    # a kept weight it was passed on to the result (not selected) or failed the same way.
    G, theta, mask = problem(rng)
    G = np.where(mask, G, 0.0)  # obs_update's precondition: zero gradients where pruned
    ihvp = StaticIHVP(G, damp=0.1)
    pruned = int(np.flatnonzero(~mask)[0])
    kept = np.flatnonzero(mask)
    selected = np.zeros_like(mask)
    selected[kept[:3]] = True
    clean = theta.copy()
    clean[pruned] = 0.0
    want = obs_update(clean, ihvp, selected, mask=mask, joint=joint)
    again = selected.copy()
    again[pruned] = True
    for value in (0.0, 3.0, np.nan, np.inf):
        dirty = clean.copy()
        dirty[pruned] = value
        for sel in (selected, again):
            got = obs_update(dirty, ihvp, sel, mask=mask, joint=joint)
            np.testing.assert_array_equal(got, want)
    for i in (kept[0], kept[-1]):  # selected, and not selected
        bad = clean.copy()
        bad[i] = np.nan
        with pytest.raises(ValueError, match=rf"theta\[{i}\] is nan \(a weight that mask keeps"):
            obs_update(bad, ihvp, selected, mask=mask, joint=joint)


def test_bad_shapes_and_types(rng):
    G, theta, mask = problem(rng)
    ihvp = StaticIHVP(G, damp=0.1)
    with pytest.raises(ValueError, match="1-D"):
        obs_saliency(theta[:, None], ihvp)
    with pytest.raises(ValueError, match=r"17 weights|shape"):
        obs_saliency(theta[:5], ihvp)
    with pytest.raises(ValueError, match="shape"):
        prune(theta, G[:, :5], sparsity=0.5)
    with pytest.raises(ValueError, match="mask"):
        prune(theta, G, sparsity=0.5, mask=mask[:3])
    with pytest.raises(TypeError, match="bool"):
        prune(theta, G, sparsity=0.5, mask=mask.astype(np.int64))
    with pytest.raises(TypeError, match="dtype"):  # float64 weights, float32 operator: lossy
        obs_saliency(theta, StaticIHVP(G.astype(np.float32), damp=0.1))
    # Named: SpectralIHVP has matvec and diagonal, so "not an operator" said nothing.
    with pytest.raises(TypeError, match=r"got SpectralIHVP, which lacks entries$"):
        obs_update(theta, SpectralIHVP(G, damp=0.1), mask)
    with pytest.raises(TypeError, match=r"got ndarray, which lacks .*matvec"):
        obs_saliency(theta, G)
    promoted = obs_saliency(theta.astype(np.float32), ihvp)  # lossless: promoted
    assert promoted.dtype == np.float64
    with pytest.raises(TypeError):
        prune(list(theta), G, sparsity=0.5)
    with pytest.raises(TypeError, match="floating"):
        magnitude_saliency(np.arange(3))
    with pytest.raises(ValueError, match="exactly one"):
        select_pruned(theta, sparsity=0.5, count=2)
    with pytest.raises(ValueError, match="NaN"):
        select_pruned(np.array([1.0, np.nan]), count=1)
    with pytest.raises(ValueError, match="saliency"):
        prune(theta, G, sparsity=0.5, saliency="random")
    with pytest.raises(ValueError, match="update"):
        prune(theta, G, sparsity=0.5, update="full")
    with pytest.raises(ValueError, match="needs the gradients"):
        prune(theta, None, sparsity=0.5)
    with pytest.raises(ValueError, match="selected"):
        obs_update(theta, ihvp, np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        gradual_prune(theta, lambda t, m: G[:, :4], sparsity=0.5, steps=2)
    with pytest.raises(TypeError, match="callable"):
        gradual_prune(theta, G, sparsity=0.5, steps=2)


def test_mismatched_namespaces(rng):
    torch = pytest.importorskip("torch")
    G, theta, mask = problem(rng)
    ihvp = StaticIHVP(torch.asarray(G), damp=0.1)
    with pytest.raises(TypeError, match=r"numpy|torch"):
        obs_saliency(theta, ihvp)
    with pytest.raises(TypeError, match=r"numpy|torch"):
        prune(torch.asarray(theta), G, sparsity=0.5)
    with pytest.raises(TypeError, match=r"numpy|torch"):
        select_pruned(theta, sparsity=0.5, mask=torch.asarray(mask))


def test_mismatched_devices(strict_device1, rng):
    import array_api_strict as strict

    G, theta, _ = problem(rng)
    theta_cpu = strict.asarray(theta)
    with pytest.raises(ValueError, match="device"):
        prune(theta_cpu, strict_device1.asarray(G), sparsity=0.5)


def test_docstring_examples_run():
    failures, tried = doctest.testmod(pruning, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0


def test_a_bad_selection_block_size_is_refused_by_its_name_before_any_work():
    """It used to be refused by ``select_pruned`` as its ``block_size``, after the set-up
    (and, in gradual_prune, after the first gradients)."""
    rng = np.random.default_rng(0)
    theta, G = rng.standard_normal(10), rng.standard_normal((4, 10))
    calls = []

    def grad_fn(theta, mask):
        calls.append(1)
        return G

    for bad, error in ((-3, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="selection_block_size must be"):
            prune(theta, G, sparsity=0.3, damp=0.1, selection_block_size=bad)
        with pytest.raises(error, match="selection_block_size must be"):
            gradual_prune(theta, grad_fn, sparsity=0.3, steps=2, selection_block_size=bad)
        with pytest.raises(error, match="selection_block_size must be"):
            pruning.select_damping(
                theta, G, [0.1, 1.0], sparsity=0.3, loss=lambda d, r: 1.0,
                selection_block_size=bad,
            )  # fmt: skip
    assert calls == []


def test_gradual_prune_checks_every_option_before_the_first_gradients():
    """A bad damping, block size, choice or callback was refused by the first step, after
    ``grad_fn`` (m forward and backward passes for MFACPruner); a bad ``joint_block_size``
    was named ``block_size``, and in ``prune`` refused after the set-up."""
    rng = np.random.default_rng(0)
    theta, G = rng.standard_normal(10), rng.standard_normal((4, 10))
    calls = []

    def grad_fn(theta, mask):
        calls.append(1)
        return G

    cases = [
        (dict(damp=-1.0), ValueError, "damp must be finite and > 0"),
        (dict(damp="1e-3"), TypeError, "damp must be a real number"),
        (dict(block_size=0), ValueError, "block_size must be >= 1"),
        (dict(saliency="OBS"), ValueError, "saliency must be one of"),
        (dict(update="Joint"), ValueError, "update must be one of"),
        (dict(update="joint", joint_block_size=0), ValueError, "joint_block_size must be"),
        (dict(update="joint", joint_block_size=2.5), TypeError, "joint_block_size must be"),
        (dict(callback=3), TypeError, "callback must be callable"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            gradual_prune(theta, grad_fn, sparsity=0.3, steps=2, **kwargs)
        if "callback" not in kwargs:
            with pytest.raises(error, match=message):
                prune(theta, G, sparsity=0.3, **kwargs)
    assert calls == []
    # Options a step does not use are not checked, as before: no gradients, no damping.
    res = gradual_prune(
        theta, grad_fn, sparsity=0.3, steps=2, saliency="magnitude", update="none", damp=-1.0
    )
    assert calls == [] and int((~res.mask).sum()) == 3


def test_prune_computes_the_diagonal_once(monkeypatch):
    """The OBS saliency and the summed update divide by the same diagonal of F^{-1}, an
    O(d m^2) pass over G: prune computed it twice, the cost of the step's set-up again."""
    rng = np.random.default_rng(0)
    G, theta = rng.standard_normal((6, 40)), rng.standard_normal(40)
    mask = rng.random(40) > 0.2
    op = StaticIHVP(G * mask, damp=1e-2, block_size=16)
    want_sel = select_pruned(obs_saliency(theta, op), sparsity=0.5, mask=mask)
    want = obs_update(theta, op, want_sel, mask=mask)
    calls = []
    diagonal = StaticIHVP.diagonal
    monkeypatch.setattr(StaticIHVP, "diagonal", lambda self: calls.append(1) or diagonal(self))
    res = prune(theta, G, sparsity=0.5, damp=1e-2, block_size=16, mask=mask)
    assert len(calls) == 1
    np.testing.assert_array_equal(res.mask, mask & ~want_sel)
    np.testing.assert_array_equal(res.theta, want)  # the same arithmetic, bit for bit


def test_gradients_zero_at_the_pruned_coordinates_are_not_copied(monkeypatch):
    """With a mask, every entry point copied G to zero it there, one more m x d array for
    as long as the operator lives, though MFACPruner's gradients are zero there already
    (its peak memory was twice the logged gradient matrix). Only G that is not zero
    there (a value, a NaN) is copied now, and G is never written."""
    from mfac_core import _pieces

    rng = np.random.default_rng(0)
    theta, mask = rng.standard_normal(40), rng.random(40) > 0.3
    clean = rng.standard_normal((5, 40)) * mask
    seen = []
    static_ihvp = pruning.static_ihvp
    monkeypatch.setattr(
        pruning, "static_ihvp", lambda G, **kw: seen.append(G) or static_ihvp(G, **kw)
    )
    monkeypatch.setattr(_pieces, "LARGE_PIECE_ENTRIES", 5 * 3)  # pieces of 3 columns
    first, last = np.flatnonzero(~mask)[[0, -1]]
    results = []
    for where, value in ((None, 0.0), (last, 1.0), (last, np.nan), (first, -0.0)):
        G = clean.copy()
        if where is not None:
            G[2, where] = value
        given = G.copy()
        results.append(prune(theta, G, sparsity=0.6, damp=1e-2, mask=mask))
        assert (seen[-1] is G) == (value == 0.0), (where, value)
        np.testing.assert_array_equal(seen[-1], clean)  # -0.0 equals 0.0
        np.testing.assert_array_equal(G, given)
    for res in results[1:]:  # copied or not, the same arithmetic
        np.testing.assert_array_equal(res.mask, results[0].mask)
        np.testing.assert_array_equal(res.theta, results[0].theta)
