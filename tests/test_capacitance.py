"""The one capacitance factor (mfac_core._capacitance): kappa bounds, factor, edits, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfac_core import (
    DynamicIHVP,
    FactorizationError,
    IllConditionedWarning,
    SpectralIHVP,
    StaticIHVP,
    WindowOptions,
    _capacitance,
)
from mfac_core._capacitance import factorize, kappa_bounds, lambda_max_bounds
from mfac_core._compat import array_namespace
from mfac_core.testing import extended_precision_inverse, to_numpy

XP = array_namespace(np.zeros(1))


def _zero_sum(rng, m, d):
    """Gradients that sum to zero: the all-ones vector is in their Gram's null space."""
    G = rng.standard_normal((m, d))
    return G - G.mean(axis=0)


def _alternating(rng, m, d):
    """Pairs g, -g: every vector with equal entries in a pair is in the null space."""
    g = rng.standard_normal((m // 2, d))
    return np.concatenate([g, -g])[np.argsort(np.tile(np.arange(m // 2), 2), kind="stable")]


def _one_large(rng, m, d):
    """One gradient far larger than the rest, in the last row."""
    G = 1e-3 * rng.standard_normal((m, d))
    G[-1] *= 1e6
    return G


def _orthogonal_to_largest(rng, m, d):
    """The top eigenvector of the Gram orthogonal to the largest-norm gradient's unit vector
    is impossible; the closest is a top direction spread over many equal small gradients."""
    base = rng.standard_normal(d)
    G = np.tile(base, (m, 1)) + 1e-3 * rng.standard_normal((m, d))
    G[0] = 1.01 * np.linalg.norm(base) * np.eye(d)[0]  # the largest diagonal entry
    return G


BUILDERS = [_zero_sum, _alternating, _one_large, _orthogonal_to_largest]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_lambda_max_lower_bound_cannot_collapse(build, rng):
    G = build(rng, 8, 30)
    gram = G @ G.T
    lo, hi = (float(v) for v in lambda_max_bounds(XP, gram))
    true = float(np.linalg.eigvalsh(gram)[-1])
    assert true / 8 * (1 - 1e-12) <= lo <= true * (1 + 1e-12)
    assert true * (1 - 1e-12) <= hi


@given(
    m=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    rank=st.integers(1, 12),
    stack=st.integers(1, 3),
)
def test_lambda_max_bounds_on_stacks_of_psd_matrices(m, seed, rank, stack):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((stack, m, min(rank, m)))
    A[0] -= A[0].mean(axis=0)  # one matrix with the all-ones vector in its null space
    gram = A @ np.swapaxes(A, -1, -2)
    lo, hi = lambda_max_bounds(XP, gram)
    true = np.linalg.eigvalsh(gram)[..., -1]
    tol = 1e-12 * np.maximum(true, 1e-300)
    assert np.all(to_numpy(lo) <= true + tol) and np.all(true <= to_numpy(hi) + tol)
    assert np.all(to_numpy(lo) >= true / m - tol)


@pytest.mark.parametrize("lead", [(), (2,)])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_lambda_max_bounds_of_empty_matrices_are_zero(lib, lead):
    # Regression: a 0 x 0 Gram raised "attempt to get argmax of an empty sequence".
    if lib == "torch":
        torch = pytest.importorskip("torch")
        xp, gram = array_namespace(torch.zeros(0)), torch.zeros((*lead, 0, 0), dtype=torch.float64)
    else:
        xp, gram = XP, np.zeros((*lead, 0, 0))
    lo, hi = lambda_max_bounds(xp, gram)
    assert tuple(lo.shape) == lead and tuple(hi.shape) == lead
    assert not np.any(to_numpy(lo)) and not np.any(to_numpy(hi))


def _largest_orthogonal_to_a_cluster(rng, m, d):
    """A gradient orthogonal to m - 1 nearly collinear ones of a slightly smaller norm: the
    unit vector of the Gram's largest diagonal entry is an eigenvector of its eigenvalue
    about lambda_max / (m - 1), where power iterations started there stay."""
    G = np.zeros((m, d))
    G[1:, 1:] = rng.standard_normal(d - 1) + 1e-6 * rng.standard_normal((m - 1, d - 1))
    G[0, 0] = 1.01 * float(np.max(np.linalg.norm(G[1:], axis=1)))
    return G


def test_lambda_max_lower_bound_finds_a_cluster_beside_the_largest_entry(rng):
    # Regression: the bound was the largest diagonal entry's eigenvalue, 1/15 of lambda_max.
    gram = (lambda G: G @ G.T)(_largest_orthogonal_to_a_cluster(rng, 16, 40))
    lo, _ = (float(v) for v in lambda_max_bounds(XP, gram))
    true = float(np.linalg.eigvalsh(gram)[-1])
    assert true * (1 - 1e-6) <= lo <= true * (1 + 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hopeless_cluster_beside_the_largest_gradient_warns(rng, dtype):
    # Regression: kappa = 1e11 was estimated as 3.3e9 (the isolated gradient's eigenvalue,
    # 1/31 of lambda_max), below the rule's 2.7e10: the product of the cluster's mean came
    # back 24 % off (float64 G; 1.1e-4 for float32 G) without a warning.
    from mfac_core.testing import condition_number

    G = _largest_orthogonal_to_a_cluster(rng, 32, 120).astype(dtype)
    damp = float(np.linalg.norm(G.astype(np.float64), 2) ** 2) / (32 * 1e11)
    kappa = condition_number(G, damp)
    with pytest.warns(IllConditionedWarning, match="kappa >= ") as caught:
        StaticIHVP(G, damp=damp)
    warned = float(str(caught[0].message).split("kappa >= ")[1].split(",")[0])
    assert kappa * 0.99 <= warned <= kappa * 1.01  # printed to 3 digits


def test_hopeless_zero_sum_gradients_warn(rng):
    # Regression: a power iteration started from the all-ones vector stayed in the null
    # space of these gradients and reported kappa = 1, so no warning was given.
    G = _zero_sum(rng, 6, 40).astype(np.float32)
    damp = float(np.linalg.norm(G.astype(np.float64), 2) ** 2) / (6 * 1e17)
    with pytest.warns(IllConditionedWarning, match="kappa >= "):
        StaticIHVP(G, damp=damp)


def test_kappa_bounds_match_the_condition_number(rng):
    G = rng.standard_normal((5, 20))
    shift = 5 * 0.1
    lo, hi = kappa_bounds(XP, G @ G.T, shift=shift, scale=1.0)
    true = 1 + np.linalg.eigvalsh(G @ G.T)[-1] / shift
    assert lo <= true * (1 + 1e-12) and true <= hi * (1 + 1e-12)


def test_factor_convention_and_solves(rng):
    G = rng.standard_normal((6, 15))
    gram = G @ G.T
    f = factorize(XP, gram, shift=0.3, scale=2.0, damp=0.1)
    C = 0.3 * np.eye(6) + 2.0 * gram
    assert np.allclose(f.U.T @ f.U, C, rtol=0, atol=1e-13 * np.abs(C).max())
    assert np.all(np.tril(f.U, -1) == 0)
    P = rng.standard_normal((6, 2))
    assert np.allclose(C @ f.solve(P), P, atol=1e-12 * np.linalg.norm(P))
    assert np.allclose(f.inverse() @ C, np.eye(6), atol=1e-12 * np.linalg.cond(C))
    Linv = f.lower_inverse()
    assert np.allclose(Linv.T @ Linv, f.inverse(), atol=1e-12 * np.linalg.cond(C))


def test_one_wording_of_the_error_for_both_operators():
    # |g|^2 / (2 damp) = 4.4e15, just below 1/eps(float64): the window takes g (a larger
    # ratio would refuse it as too large), and its duplicate fails the factorisation.
    g = np.full(8, 1e8)
    G = np.stack([g, g])
    with pytest.raises(FactorizationError) as static:
        StaticIHVP(G, damp=9.0)
    op = DynamicIHVP(2, 8, damp=9.0, dtype="float64", options=WindowOptions(zero_init=True))
    with pytest.warns(IllConditionedWarning, match="ill-conditioned"):
        op.update(g)
    with pytest.raises(FactorizationError) as dynamic:
        op.update(g.copy())
    for err in (static.value, dynamic.value):
        assert "not numerically positive definite" in str(err)
        assert "damp=9," in str(err) and "kappa between" in str(err)


def test_dynamic_float32_error_names_the_gram_dtype_and_a_correct_kappa(rng):
    # Duplicated float32 gradients and a hopeless damping: the window's Gram is float64
    # (docs/mathematics.rst, "Mixed-precision Gram"), so the error does not blame float32
    # accumulation, and its kappa bounds enclose the condition number of the window. The
    # damping is set after the duplicate is in: inserted with it, g alone would be
    # refused as too large for the window (eps(float64) kappa >= 1).
    g = rng.standard_normal(50).astype(np.float32)
    op = DynamicIHVP(4, 50, damp=1.0, dtype="float32", options=WindowOptions(zero_init=True))
    op.update(g)
    op.update(g.copy())
    with pytest.raises(FactorizationError) as info:
        op.set_damp(1e-16)
    assert op.damp == 1.0
    message = str(info.value)
    assert "accumulated in float32" not in message
    lo, hi = (float(x) for x in message.split("kappa between ")[1].split(")")[0].split(" and "))
    true = 1 + 2 * float(g.astype(np.float64) @ g) / (4 * 1e-16)
    assert lo <= true * 1.01 and true <= hi * 1.01  # the message rounds to 3 digits
    assert hi <= 4 * lo  # the trace bound is within a factor k of the power iteration


def test_overflowing_gram_is_not_called_nan():
    with pytest.raises(ValueError, match="overflow"), np.errstate(over="ignore"):
        StaticIHVP(np.full((3, 20), 1e160), damp=1.0)


@pytest.mark.parametrize("block_size", [None, 2, 10], ids=["full", "dense-blocks", "woodbury"])
def test_overflowing_kappa_of_a_finite_gram_is_not_called_a_non_finite_gram(block_size):
    # Duplicated gradients of squared norm 3e9 and the smallest normal damping: the Gram is
    # finite, only kappa = 1 + lambda_max / (m damp) overflows. The error said "the Gram
    # matrix of these gradients is not finite ... hold NaN or infinity, or are so large
    # that their squared norms overflow", none of which is so.
    G = np.full((4, 30), 1e4)
    damp = float(np.finfo(np.float64).tiny)
    with pytest.raises(FactorizationError) as static:
        StaticIHVP(G, damp=damp, block_size=block_size)
    errors = [static.value]
    if block_size is None:
        with pytest.raises(FactorizationError) as window:
            DynamicIHVP.from_window(G, damp=damp)
        errors.append(window.value)
    for err in errors:
        message = str(err)
        assert "not numerically positive definite" in message, message
        assert "not finite" not in message and "overflow" not in message, message
        assert "kappa beyond float64's range" in message and "increase damp" in message


@pytest.mark.parametrize("k", [1, 7, 50])
def test_cholesky_inverse_of_a_stack(xp_device, rng, dtype, k):
    # What the dense blocks of StaticIHVP store: (U^T U)^{-1}, symmetric, rounded once.
    from mfac_core import _linalg

    X = rng.standard_normal((3, 2 * k, k))
    C = np.swapaxes(X, -1, -2) @ X + 0.1 * np.eye(k)
    U = np.swapaxes(np.linalg.cholesky(C), -1, -2)
    xp = xp_device.xp
    want = np.linalg.inv(C)
    got = _linalg.cholesky_inverse(xp, xp_device.asarray(U, "float64"), xp_device.dtype(dtype))
    assert got.dtype == xp_device.dtype(dtype)
    got = to_numpy(got).astype(np.float64)
    assert np.array_equal(got, np.swapaxes(got, -1, -2))
    eps = np.finfo(dtype).eps
    assert np.abs(got - want).max() <= 10 * eps * np.linalg.cond(C).max() * np.abs(want).max()
    if xp_device.mutable:
        out = xp.zeros((3, k, k), dtype=xp_device.dtype(dtype), device=xp_device.device)
        res = _linalg.cholesky_inverse(
            xp, xp_device.asarray(U, "float64"), xp_device.dtype(dtype), out=out
        )
        assert res is out and np.array_equal(to_numpy(out).astype(np.float64), got)


def test_ill_conditioned_warnings_name_the_callers_line() -> None:
    # Each operator finds the condition at another depth of the package; the warning
    # must still point at the user's call (stacklevel found by walking out of mfac_core).
    import warnings

    from mfac_core import DynamicIHVP, IllConditionedWarning, SpectralIHVP, StaticIHVP

    rng = np.random.default_rng(0)
    G = rng.standard_normal((4, 50)).astype(np.float32)
    # kappa ~ 1e19: past float64 (the static and dynamic operators' factor and passes),
    # while the Gram itself is well conditioned, so the factor exists.
    window = DynamicIHVP.from_window(G, damp=1.0)
    # A window fed gradients it takes one by one (|g|^2 / (m damp) = 2e15 each), nearly
    # parallel, so that together they give kappa ~ 8e15: found at the refactorisation
    # after m edits. (With damp=1e-17 each gradient alone would be refused.)
    P = (1.0 + 1e-3 * rng.standard_normal((8, 50))).astype(np.float32)
    norm2 = max(float(p.astype(np.float64) @ p) for p in P)
    filled = DynamicIHVP(
        4, 50, damp=norm2 / (4 * 2e15), dtype=np.float32, options=WindowOptions(zero_init=True)
    )
    calls = [
        lambda: StaticIHVP(G, damp=1e-17),
        lambda: DynamicIHVP.from_window(G, damp=1e-17),
        lambda: SpectralIHVP(G, damp=1e-17),
        lambda: window.set_damp(1e-17),
        lambda: [filled.update(p) for p in P],
    ]
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        ill = [w for w in caught if issubclass(w.category, IllConditionedWarning)]
        assert ill, "no IllConditionedWarning"
        assert {w.filename for w in ill} == {__file__}, [(w.filename, w.lineno) for w in ill]


@pytest.mark.parametrize(("damp", "warns"), [(2.0**-36, True), (2.0**-33, False)])
def test_the_woodbury_forms_warn_from_eps64_kappa_to_the_three_halves_at_one(damp, warns):
    # The capacitance factor's backward error reaches vectors near the span amplified by
    # up to kappa**1.5 / 2: gradients whose spread decays over decades lost every digit
    # while eps64 kappa was still far below the old rule's 1/32 (test below). kappa =
    # 1 + 1 / damp here: eps64 kappa**1.5 = 4 and 2**-2.5.
    G = np.zeros((1, 4))
    G[0, 0] = 1.0
    makers = [
        lambda: StaticIHVP(G, damp=damp),
        lambda: StaticIHVP(G, damp=damp, block_size=2),  # blocks wider than m: Woodbury
    ]
    # SpectralIHVP knows its spectrum: one gradient amplifies by about 1, not kappa**0.5 / 2,
    # and it warns from eps64 kappa >= 1/16 here (tests/test_spectral_warnings.py).
    for make in makers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make()
        assert any(w.category is IllConditionedWarning for w in caught) == warns
    # A window warns as well, but refuses a gradient only from eps64 kappa >= 1.
    window = DynamicIHVP(1, 4, damp=damp, dtype="float64")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        window.update(G[0])
    assert len(window) == 1
    assert any(w.category is IllConditionedWarning for w in caught) == warns
    assert _capacitance.is_imprecise(1.0 + 1.0 / damp, eps=_capacitance.EPS64) == warns
    assert not _capacitance.is_hopeless(1.0 + 1.0 / damp, eps=_capacitance.EPS64)


@pytest.mark.parametrize(("damp", "warns"), [(2.0**-50, True), (2.0**-45, False)])
def test_dense_blocks_warn_from_eps64_kappa_at_one_thirty_second(damp, warns):
    # A dense block factorises F_b itself: its products lose up to about c eps64 kappa,
    # not kappa**1.5 (7 % at eps64 kappa = 0.44), so it keeps the earlier rule and does
    # not warn at kappa where the Woodbury forms do. kappa = 1 + 1 / damp for the first
    # block (rows 1 and 0 over m = 2): eps64 kappa = 1/4 and 1/128.
    G = np.zeros((2, 4))
    G[0, 0] = np.sqrt(2.0)
    for make in (StaticIHVP, SpectralIHVP):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make(G, damp=damp, block_size=2)  # blocks no wider than m: dense
        assert any(w.category is IllConditionedWarning for w in caught) == warns
    kappa = 1.0 + 1.0 / damp
    assert _capacitance.is_imprecise(kappa, eps=_capacitance.EPS64, dense=True) == warns
    assert _capacitance.is_imprecise(kappa, eps=_capacitance.EPS64)  # the Woodbury rule


@pytest.mark.parametrize("make", [StaticIHVP, SpectralIHVP, DynamicIHVP.from_window])
def test_gradients_spread_over_decades_warn_before_their_products_lose_every_digit(make):
    # Four float32 gradients around a shared direction whose spread decays over eight
    # decades: at kappa = 1e11 (eps64 kappa = 2.2e-5, far below 1/32) a stored gradient's
    # product was 13-47 % off with no warning; eps64 kappa**1.5 = 7 now warns.
    rng = np.random.default_rng(2)
    G = rng.standard_normal(300) + rng.standard_normal((4, 300)) * np.logspace(0, -8, 4)[:, None]
    G = (G / (np.linalg.norm(G, 2) / 2.0)).astype(np.float32)
    G64 = G.astype(np.float64)
    damp = float(np.linalg.norm(G64, 2) ** 2 / (4 * (1e11 - 1)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = make(G, damp=damp)
    assert any(w.category is IllConditionedWarning for w in caught)
    want = extended_precision_inverse(G64, damp, G64[0])
    got = np.asarray(op.matvec(G[0]), dtype=np.float64)
    # The warning was due: the result is hundreds of float32 roundings off, where the bound
    # of a trusted product is 8 (how far exactly, 0.4 to 47 % here, rests on the rounding of
    # the Gram's and the passes' sums, which their order sets).
    assert np.linalg.norm(got - want) > 1e-4 * np.linalg.norm(want)
