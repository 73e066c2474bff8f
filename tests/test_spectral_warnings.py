"""SpectralIHVP's IllConditionedWarning from its exact spectrum (mfac_core._spectral_setup).

The Woodbury forms' rule, eps64 kappa**1.5 >= 1, is the first-order worst case of the float64
rounding's amplification ``a = sqrt(t_1) max_j sqrt(t_j) / (1 + t_j)`` (``t_j m damp`` the
Gram's eigenvalues): SpectralIHVP knows its ``t_j`` and warns where ``eps64 kappa a >= 1/32``
as well (docs/mathematics.rst, "When the set-up fails or warns").
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from mfac_core import IllConditionedWarning, SpectralIHVP, StaticIHVP
from mfac_core.testing import extended_precision_inverse

EPS64 = 2.0**-52


def _warned(make) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
    return any(w.category is IllConditionedWarning for w in caught)


def _amplification(G: np.ndarray, damp: float) -> tuple[float, float]:
    """``(kappa, a)`` of the full operator, from the Gram's eigenvalues (the tests' own)."""
    m = G.shape[0]
    t = np.clip(np.linalg.eigvalsh(G @ G.T), 0.0, None) / (m * damp)
    delta = m * EPS64 * t[-1]
    g = np.sqrt(t + delta) / (1.0 + np.clip(t - delta, 0.0, None))
    return 1.0 + t[-1], float(np.sqrt(t[-1] + delta) * np.max(g))


@pytest.mark.parametrize(
    ("near_one", "k", "warns"),
    [
        # An eigenvalue t_2 = 1 (a = sqrt(t_1) / 2, the worst case): the old rule decides,
        # eps64 kappa**1.5 = 4 and 2**-2.5.
        (True, 36, True),
        (True, 34, False),
        # One gradient (a = 1): eps64 kappa a = 1/4 and 1/64 (against 1/32), where
        # eps64 kappa**1.5 is 2**23 and 2**17 (the old rule warned of both).
        (False, 50, True),
        (False, 46, False),
    ],
)
def test_warns_from_the_exact_amplification(near_one, k, warns):
    # Orthogonal rows: the Gram is diagonal and its eigenvalues exact, t_1 = 2**k.
    damp = 2.0**-k
    m = 2 if near_one else 1  # no second row: an eigenvalue 0 is known only to eps t_1
    G = np.zeros((m, 6))
    G[0, 0] = np.sqrt(m)  # t_1 = m / (m damp)
    if near_one:
        G[1, 1] = np.sqrt(2.0 * damp)  # t_2 = 1
    op = SpectralIHVP(G, damp=1.0)
    for make in (
        lambda: SpectralIHVP(G, damp=damp),
        lambda: SpectralIHVP(G, damp=damp, block_size=3),  # blocks wider than m
        lambda: op.with_damp(damp),
        lambda: op.sweep(G[0], damps=[1.0, damp]),
        lambda: op.diagonal(damps=[damp, 1.0]),
    ):
        assert _warned(make) == warns
    # StaticIHVP's Cholesky factor has no spectrum to look at: the worst case's rule.
    assert _warned(lambda: StaticIHVP(G, damp=damp)) == (EPS64 * (1.0 + 2.0**k) ** 1.5 >= 1)


def test_well_spread_gradients_keep_digits_unwarned(rng):
    # Regression: evenly spread gradients were warned of from kappa 2.7e10 (the worst case
    # of eigenvalues near m damp) where their products keep digits: at kappa 1e12 a stored
    # gradient's product is 8e-4 off (2 eps64 kappa a; up to 3.1 measured), and no warning
    # comes; at 1e15 (eps64 kappa a = 0.37) it does, and the product is 67 % off.
    m = 8
    G = rng.standard_normal((m, 64))
    top = float(np.linalg.eigvalsh(G @ G.T)[-1])
    quiet, loud = top / m / 1e12, top / m / 1e15
    kappa, a = _amplification(G, quiet)
    assert EPS64 * kappa**1.5 > 100 and EPS64 * kappa * a < 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = SpectralIHVP(G, damp=quiet)
    for x in (G[0], G[m - 1]):
        want = extended_precision_inverse(G, quiet, x)
        err = np.linalg.norm(op @ x - want) / np.linalg.norm(want)
        assert err <= 4.0 * EPS64 * kappa * a
    for make in (
        lambda: SpectralIHVP(G, damp=loud),
        lambda: op.with_damp(loud),
        lambda: op.sweep(G[0], damps=[quiet, loud]),
    ):
        with pytest.warns(IllConditionedWarning, match="spectrum's amplification"):
            make()


def test_gradients_whose_spread_decays_are_still_warned_of(rng):
    # Eigenvalues of the Gram spread over eight decades: one lies near m damp at every
    # damping between, and products lose every digit from about kappa 1e11 (up to
    # 0.7 eps64 kappa a measured): the warning must stay.
    m = 4
    G = rng.standard_normal(32) + rng.standard_normal((m, 32)) * np.logspace(0, -8, m)[:, None]
    top = float(np.linalg.eigvalsh(G @ G.T)[-1])
    damp = top / m / 1e11
    kappa, a = _amplification(G, damp)
    assert EPS64 * kappa * a > 1.0
    with pytest.warns(IllConditionedWarning, match="spectrum's amplification"):
        SpectralIHVP(G, damp=damp)


def test_a_ragged_dense_block_is_judged_by_the_dense_rule(rng):
    # Regression: a last block no wider than m (F_b's own eigenpairs) beside blocks wider
    # than m was judged by the Woodbury forms' rule on the operator's largest kappa: a
    # rank-deficient ragged block at kappa 1e12 warned, its products ~1e-5 off (about
    # 0.2 eps64 kappa). It keeps eps64 kappa >= 1/32 now.
    m = 4
    G = rng.standard_normal((m, 10)) * 1e-3
    G[:, 6:9] = rng.standard_normal((m, 3))  # the ragged block (columns 6..9), rank 3
    G[:, 9] = 0.0
    ragged = G[:, 6:]
    top = float(np.linalg.eigvalsh(ragged.T @ ragged)[-1])
    damp = top / m / 1e12  # the ragged block's kappa (its smallest eigenvalue is damp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = SpectralIHVP(G, damp=damp, block_size=6)
    x = rng.standard_normal(10)
    for sl in (slice(0, 6), slice(6, 10)):
        want = extended_precision_inverse(G[:, sl], damp, x[sl])
        got = (op @ x)[sl]
        assert np.linalg.norm(got - want) <= EPS64 * 1e12 * np.linalg.norm(want)
    with pytest.warns(IllConditionedWarning, match="eps \\* kappa >= 1/32"):
        op.with_damp(top / m / 2e14)


def test_long_blocks_count_the_grams_summation(rng):
    # Regression: the rule took the Gram's rounding as eps64 |G G^T|, but its float64 sums
    # over B coordinates round to up to about sqrt(B)/4 eps64 of it (gradients of float32
    # values, whose squares are exact: 72 eps64 at B = 1e6, 2300 at 1e8, OpenBLAS), and each
    # such eps64 costs t_1 in a product. One such float64 gradient of 10**6 entries at kappa
    # 1.26e14 gave its own product 210 % off (eps64 kappa a = 0.028 < 1/32), unwarned.
    g = rng.standard_normal(10**6, dtype=np.float32).astype(np.float64)
    norm2 = math.fsum((g**2).tolist())  # exact squares, exactly rounded sum
    for kappa in (1e10, 1.26e14):
        damp = norm2 / kappa  # m = 1: F = damp I + g g^T, F^{-1} g = g / (damp + |g|^2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op = SpectralIHVP(g[None, :], damp=damp)
        warned = any(w.category is IllConditionedWarning for w in caught)
        want = g / (damp + norm2)
        err = np.linalg.norm(op @ g - want) / np.linalg.norm(want)
        # Unwarned products are within 10 % (at kappa 1e10 about 1e-4 at most).
        assert warned or err <= 0.1, (kappa, err)
        assert warned == (kappa > 1e12)
