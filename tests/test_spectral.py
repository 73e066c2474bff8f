"""Tests of SpectralIHVP (mfac_core._spectral) against dense float64 oracles."""

from __future__ import annotations

import math
import pickle
import sys
import warnings

import numpy as np
import pytest
from conftest import check_space, rounded
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac_core import (
    DynamicIHVP,
    FactorizationError,
    IllConditionedWarning,
    SpectralIHVP,
    StaticIHVP,
)
from mfac_core.testing import (
    SpectralOracle,
    assert_close,
    condition_number,
    empirical_fisher_dense,
    problems,
    to_numpy,
)

# (m, d, block_size): full operators, blocks wider and narrower than m, ragged last blocks.
LAYOUTS = {
    "full": (5, 23, None),
    "full-d<m": (6, 4, None),
    "m=1-d=1": (1, 1, None),
    "wide-blocks+ragged": (3, 23, 7),
    "narrow-blocks+ragged": (6, 23, 4),
    "wide-blocks": (2, 12, 4),
}


def error_scale(G: np.ndarray, damp: float, block_size: int | None) -> float:
    """``max_b 1 + ||G_b||_2^2 / (m damp)``: the spectral form's rounding scale (see Notes)."""
    m, d = G.shape
    B = d if block_size is None else block_size
    top = max(
        float(np.linalg.eigvalsh(G[:, s : s + B] @ G[:, s : s + B].T)[-1]) for s in range(0, d, B)
    )
    return 1.0 + max(top, 0.0) / (m * damp)


def dense_power(G: np.ndarray, damp: float, block_size: int | None, power: float) -> np.ndarray:
    """``F ** power`` (block-diagonal) from ``eigh`` of the dense float64 F."""
    F = empirical_fisher_dense(G, damp, block_size=block_size)
    w, Q = np.linalg.eigh(F)
    return (Q * w**power) @ Q.T


def spectrum_logdet(G: np.ndarray, damp: float, block_size: int | None) -> float:
    """``log det F`` from the singular values of each block (float64, no Gram)."""
    m, d = G.shape
    B = d if block_size is None else block_size
    total = 0.0
    for s in range(0, d, B):
        sv = np.linalg.svd(G[:, s : s + B], compute_uv=False)
        width = min(B, d - s)
        total += width * math.log(damp) + float(np.sum(np.log1p(sv**2 / (m * damp))))
    return total


def _data(rng, m, d, dtype, rel=1e-2):
    G = rounded(rng.standard_normal((m, d)), dtype)
    return G, rel * float(np.linalg.norm(G, 2)) ** 2 / m


# -- every backend and dtype ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_products_and_diagonal_against_oracle(layout, xp_device, dtype, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    op = SpectralIHVP(be.asarray(G, dtype), damp=damp, block_size=bs)
    oracle = SpectralOracle(G, damp, block_size=bs)
    kappa = error_scale(G, damp, bs)
    assert op.shape == (d, d) and op.power == -1.0
    assert (op.num_grads, op.dim, op.damp, op.block_size) == (m, d, damp, min(bs or d, d))
    assert op.kappa == pytest.approx(oracle.kappa, rel=1e-8)
    assert op.error_scale == pytest.approx(kappa, rel=1e-8)

    X = rounded(rng.standard_normal((d, 3)), dtype)
    Y = op.matmat(be.asarray(X, dtype))
    check_space(Y, be, dtype)
    assert_close(Y, oracle.matmat(X), kappa=kappa)
    assert_close(op.matvec(be.asarray(X[:, 0], dtype)), oracle.matvec(X[:, 0]), kappa=kappa)
    # A vector in the gradients' span: the hard case of the cancellation.
    g = G[0]
    assert_close(op @ be.asarray(g, dtype), oracle.matvec(g), kappa=kappa)
    diag = op.diagonal()
    check_space(diag, be, dtype)
    assert_close(diag, oracle.diagonal(), kappa=kappa)


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_spectrum_against_dense(layout, xp_device, dtype, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    op = SpectralIHVP(xp_device.asarray(G, dtype), damp=damp, block_size=bs)
    F = empirical_fisher_dense(G, damp, block_size=bs)
    eps = float(np.finfo(np.float64).eps)
    sign, ref = np.linalg.slogdet(F)
    assert sign == 1.0
    # All spectral quantities are float64 sums of m terms: a few eps of their magnitude.
    assert op.logdet() == pytest.approx(-ref, rel=100 * eps, abs=100 * eps * d)
    assert op.inverse().logdet() == pytest.approx(ref, rel=100 * eps, abs=100 * eps * d)
    assert op.sqrt().logdet() == pytest.approx(-ref / 2, rel=100 * eps, abs=100 * eps * d)
    Finv = dense_power(G, damp, bs, -1.0)
    assert op.trace() == pytest.approx(np.trace(Finv), rel=100 * eps)
    assert op.trace_inverse() == pytest.approx(np.trace(F), rel=100 * eps)
    assert op.inv_sqrt().trace() == pytest.approx(
        np.trace(dense_power(G, damp, bs, 0.5)), rel=100 * eps
    )
    assert op.sqrt().trace_inverse() == pytest.approx(
        np.trace(dense_power(G, damp, bs, 0.5)), rel=100 * eps
    )


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_roots_and_forward(layout, xp_device, dtype, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    op = SpectralIHVP(be.asarray(G, dtype), damp=damp, block_size=bs)
    kappa = error_scale(G, damp, bs)
    X = rounded(rng.standard_normal((d, 2)), dtype)
    Xb = be.asarray(X, dtype)
    for derived, power in (
        (op.sqrt(), -0.5),
        (op.inv_sqrt(), 0.5),
        (op.inverse(), 1.0),
        (op.inverse().sqrt(), 0.5),
        (op.inverse().inv_sqrt(), -0.5),
    ):
        assert derived.power == power
        Y = derived @ Xb
        check_space(Y, be, dtype)
        assert_close(Y, dense_power(G, damp, bs, power) @ X, kappa=kappa, err_msg=f"power {power}")
        assert_close(derived.diagonal(), np.diag(dense_power(G, damp, bs, power)), kappa=kappa)
    half = op.sqrt()
    assert_close(
        half @ (half @ Xb),
        SpectralOracle(G, damp, block_size=bs).matmat(X),
        kappa=kappa,
        err_msg="F^{-1/2} F^{-1/2} = F^{-1}",
    )
    with pytest.raises(ValueError, match="powers"):
        half.sqrt()
    with pytest.raises(ValueError, match="powers"):
        half.inv_sqrt()


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_dampings_in_one_pass(layout, xp_device, dtype, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    op = SpectralIHVP(be.asarray(G, dtype), damp=damp, block_size=bs)
    damps = [damp * 10.0**k for k in (-1, 0, 1, 3)]
    X = rounded(rng.standard_normal((d, 2)), dtype)
    Y = op.sweep(be.asarray(X, dtype), damps=damps)
    y = op.sweep(be.asarray(X[:, 0], dtype), damps=damps)
    D = op.diagonal(damps=damps)
    check_space(Y, be, dtype)
    assert tuple(Y.shape) == (4, d, 2) and tuple(y.shape) == (4, d)
    assert tuple(D.shape) == (4, d)
    for j, dp in enumerate(damps):
        kappa = error_scale(G, dp, bs)
        oracle = SpectralOracle(G, dp, block_size=bs)
        assert_close(Y[j, ...], oracle.matmat(X), kappa=kappa, err_msg=f"damp {dp:g}")
        assert_close(y[j, ...], oracle.matvec(X[:, 0]), kappa=kappa)
        assert_close(D[j, ...], oracle.diagonal(), kappa=kappa)
        other = op.with_damp(dp)
        assert other.damp == dp and other._groups is op._groups  # shared, not copied
        assert_close(other @ be.asarray(X, dtype), oracle.matmat(X), kappa=kappa)
    # The inverse's sweep is F_j itself, for every damping.
    Fs = op.inverse().sweep(be.asarray(X, dtype), damps=damps)
    for j, dp in enumerate(damps):
        assert_close(
            Fs[j, ...],
            empirical_fisher_dense(G, dp, block_size=bs) @ X,
            kappa=error_scale(G, dp, bs),
        )


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_bilinear_and_quadratic(layout, xp_device, dtype, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    op = SpectralIHVP(be.asarray(G, dtype), damp=damp, block_size=bs)
    kappa = error_scale(G, damp, bs)
    Finv = SpectralOracle(G, damp, block_size=bs).todense()
    # Rows mixing random vectors and the gradients themselves (the ill-conditioned direction).
    Q = rounded(np.vstack([rng.standard_normal((2, d)), G[:1]]), dtype)
    R = rounded(np.vstack([rng.standard_normal((4, d)), G]), dtype)
    for batch in (None, 1, 3):
        B = op.bilinear(be.asarray(Q, dtype), be.asarray(R, dtype), batch_size=batch)
        check_space(B, be, dtype)
        ref = Q @ Finv @ R.T
        # Entry-wise error: eps * kappa * ||q|| ||r|| / damp, scaled per entry pair, not by one
        # entry that may cancel.
        scale = np.outer(np.linalg.norm(Q, axis=1), np.linalg.norm(R, axis=1)) / damp
        err = np.abs(to_numpy(B).astype(np.float64) - ref)
        assert np.all(err <= 100 * np.finfo(dtype).eps * kappa * scale), batch
        q = op.quadratic(be.asarray(R, dtype), batch_size=batch)
        check_space(q, be, dtype)
        assert_close(q, np.einsum("ij,jk,ik->i", R, Finv, R), kappa=kappa)
    half = op.sqrt()
    assert_close(
        half.quadratic(be.asarray(R, dtype)),
        np.einsum("ij,jk,ik->i", R, dense_power(G, damp, bs, -0.5), R),
        kappa=kappa,
    )
    empty = op.bilinear(be.asarray(Q, dtype), be.asarray(np.zeros((0, d)), dtype))
    assert tuple(empty.shape) == (3, 0)


# -- Hypothesis: condition numbers up to 1e12 in float64 ----------------------------------------


@settings(max_examples=40)
@given(problem=problems(dtype="float64", max_m=6, max_d=24), log_kappa=st.floats(0.0, 12.0))
def test_hypothesis_float64_up_to_kappa_1e12(problem, log_kappa):
    G, bs = problem.G, problem.block_size
    m = G.shape[0]
    top = float(np.linalg.eigvalsh(G @ G.T)[-1])
    damp = max(top, 1e-300) / (m * max(10.0**log_kappa - 1.0, 1e-8))
    op = SpectralIHVP(G, damp=1.0, block_size=bs).with_damp(damp)
    oracle = SpectralOracle(G, damp, block_size=bs)
    kappa = error_scale(G, damp, bs)
    eps = float(np.finfo(np.float64).eps)
    x = problem.x
    assert_close(op @ x, oracle.matvec(x), kappa=kappa, atol=0.0)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=kappa)
    half = op.sqrt()
    assert_close(half @ (half @ x), oracle.matvec(x), kappa=kappa)
    assert_close(op.inverse() @ x, empirical_fisher_dense(G, damp, block_size=bs) @ x, kappa=kappa)
    # log det: each of the k = min(B, m) terms log1p(Lambda / (m damp)) has an absolute error
    # of about eps * kappa (Lambda's error is eps * Lambda_max), the d log(damp) part eps.
    ref = spectrum_logdet(G, damp, bs)
    assert abs(op.inverse().logdet() - ref) <= 100 * eps * (abs(ref) + kappa * G.size)
    # The trace of F^{-1}: a sum of positive terms 1 / (damp + mu), each with relative error
    # eps * kappa at worst (mu's absolute error eps * Lambda_max / m, over damp + mu >= damp).
    ref_tr = float(np.trace(oracle.todense()))
    assert abs(op.trace() - ref_tr) <= 100 * eps * kappa * ref_tr


# -- sampling ----------------------------------------------------------------------------------


def _rng_for(backend, seed):
    if backend.name == "torch":
        import torch

        return torch.Generator(device="cpu").manual_seed(seed)
    if backend.name == "jax":
        import jax

        return jax.random.key(seed)
    if backend.name == "cupy":
        import cupy

        return cupy.random.default_rng(seed)
    return np.random.default_rng(seed)


def test_sample_covariance_converges_at_root_n(xp_device, rng):
    """The sample covariance of ``sample(n)`` approaches ``F^{-1}`` like ``1/sqrt(n)``.

    For ``x ~ N(0, S)`` and ``S_n = X^T X / n`` (known zero mean), each entry has
    ``Var([S_n]_ij) = (S_ij^2 + S_ii S_jj) / n`` exactly, so
    ``z_ij = sqrt(n) ([S_n]_ij - S_ij) / sqrt(S_ij^2 + S_ii S_jj)`` is about standard
    normal. With 21 distinct entries, ``max |z| > 5`` has probability about
    ``21 * 5.7e-7``: a correct sampler passes, while a wrong covariance (a missing
    square root, a wrong damping) gives ``|z|`` growing like ``sqrt(n)``. The seed is
    fixed, so the test is deterministic. ``E ||S_n - S||_F^2 = (||S||_F^2 + tr(S)^2) / n``
    exactly; the normalised squared error ``r_n`` has mean 1 at every n, which is the
    1/sqrt(n) rate: checked to stay below 5 (Markov: probability < 0.2 each, and the
    z bound already holds).
    """
    m, d = 3, 6
    G = rng.standard_normal((m, d))
    damp = 0.05 * float(np.linalg.norm(G, 2)) ** 2 / m
    be = xp_device
    op = SpectralIHVP(be.asarray(G, "float64"), damp=damp)
    S = SpectralOracle(G, damp).todense()
    sd = np.sqrt(S**2 + np.outer(np.diag(S), np.diag(S)))
    norm2 = float(np.sum(S**2) + np.trace(S) ** 2)
    errs = []
    for k, n in enumerate((1_000, 8_000, 64_000)):
        X = op.sample(n, rng=_rng_for(be, 1234 + k))
        check_space(X, be, "float64")
        assert tuple(X.shape) == (n, d)
        Xn = to_numpy(X)
        Sn = Xn.T @ Xn / n
        z = np.sqrt(n) * (Sn - S) / sd
        assert np.max(np.abs(z)) < 5.0, (n, z)
        r = n * float(np.sum((Sn - S) ** 2)) / norm2
        assert r < 5.0, (n, r)
        errs.append(float(np.linalg.norm(Sn - S)))
    # 64x the samples: the error falls by about 8x; a floor (a biased sampler) would not.
    assert errs[-1] < errs[0] / 2.5, errs


def test_sample_float32_and_seeds(xp_device, rng):
    G = rounded(rng.standard_normal((4, 10)), "float32")
    be = xp_device
    op = SpectralIHVP(be.asarray(G, "float32"), damp=0.3)
    seed = 7
    a, b = op.sample(5, rng=seed), op.sample(5, rng=seed)
    check_space(a, be, "float32")
    assert np.array_equal(to_numpy(a), to_numpy(b))  # an int seed is reproducible
    assert tuple(op.sample(0, rng=seed).shape) == (0, 10)
    with pytest.raises(TypeError, match="rng"):
        op.sample(2, rng="not a generator")
    # The error is sample()'s, not that of the sqrt() it calls inside.
    for root in (op.sqrt(), op.inv_sqrt()):
        with pytest.raises(
            ValueError, match=r"^sample\(\) draws from N\(0, A\) for A = F\^-1 or F"
        ):
            root.sample(2, rng=seed)


# -- validation, pickling, the Cholesky form -----------------------------------------------------


def test_arrays_of_dampings(rng):
    # sweep and diagonal take a 1-d array (np.logspace) or a tuple as they take a list.
    G = rng.standard_normal((3, 8))
    op = SpectralIHVP(G, damp=0.1)
    damps = [0.01, 0.1, 1.0]
    x = rng.standard_normal(8)
    for grid in (np.array(damps), tuple(damps), np.array(damps, dtype=np.float32)):
        want = [float(dp) for dp in grid]
        np.testing.assert_array_equal(op.sweep(x, damps=grid), op.sweep(x, damps=want))
        np.testing.assert_array_equal(op.diagonal(damps=grid), op.diagonal(damps=want))


def test_unchecked_nan_is_a_factorization_error(rng):
    # check_finite=False skips the check, not the error: StaticIHVP's FactorizationError
    # (a LinAlgError and ValueError), not eigh's bare "Eigenvalues did not converge".
    G = rng.standard_normal((3, 8))
    G[1, 2] = np.nan
    for bs in (None, 2):
        with pytest.raises(
            FactorizationError, match="Gram matrix of these gradients is not finite"
        ):
            SpectralIHVP(G, damp=0.1, check_finite=False, block_size=bs)


def test_validation(numpy_backend, rng):
    G = rng.standard_normal((3, 8))
    op = SpectralIHVP(G, damp=0.1)
    with pytest.raises(TypeError, match="damps"):
        op.sweep(np.ones(8), damps=0.1)
    with pytest.raises(ValueError, match="at least one"):
        op.diagonal(damps=[])
    with pytest.raises(ValueError, match=r"1-d array of dampings, got shape \(2, 1\)"):
        op.diagonal(damps=np.ones((2, 1)))
    with pytest.raises(ValueError, match=r"damps\[1\] must be finite"):
        op.sweep(np.ones(8), damps=np.array([0.1, np.inf]))
    with pytest.raises(TypeError, match=r"damps\[0\] must be a real number"):
        op.sweep(np.ones(8), damps=np.array([False]))
    with pytest.raises(ValueError, match="damp"):
        op.with_damp(0.0)
    with pytest.raises(TypeError, match="damp"):
        op.with_damp("1")
    with pytest.raises(ValueError, match="shape"):
        op.bilinear(np.ones((2, 7)), np.ones((2, 8)))
    with pytest.raises(ValueError, match="NaN"):
        op.quadratic(np.full((1, 8), np.nan))
    with pytest.raises(TypeError, match="dtype"):
        SpectralIHVP(G.astype(np.float32), damp=0.1).quadratic(np.ones((1, 8)))
    with pytest.raises(ValueError, match="NaN"):
        bad = G.copy()
        bad[1, 2] = np.inf
        SpectralIHVP(bad, damp=0.1)
    with pytest.raises(ValueError, match="damp"):
        SpectralIHVP(G, damp=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        op.quadratic(np.ones((1, 8)), batch_size=0)


def test_repr_tells_the_powers_and_dampings_apart(rng):
    # sqrt(), inverse() and with_damp() share the class and the set-up: the repr
    # printed the same for F^-1, F^-1/2, F and another damping.
    op = SpectralIHVP(rng.standard_normal((3, 8)), damp=0.1)
    texts = [repr(op), repr(op.sqrt()), repr(op.inv_sqrt()), repr(op.inverse())]
    texts.append(repr(op.with_damp(0.25)))
    assert len(set(texts)) == 5, texts
    assert texts[0] == (
        "<8x8 SpectralIHVP with power=-1, num_grads=3, damp=0.1, dtype=float64, "
        "namespace=numpy, device='cpu'>"
    )
    assert "power=-0.5, num_grads=3, damp=0.1," in texts[1]
    assert "power=1, num_grads=3, damp=0.1," in texts[3]
    assert "power=-1, num_grads=3, damp=0.25," in texts[4]
    blocked = SpectralIHVP(rng.standard_normal((3, 8)), damp=1e-3, block_size=4)
    assert "power=-1, num_grads=3, damp=0.001, block_size=4, dtype=float64" in repr(blocked)


def test_other_device_refused(strict_device1, make_backend, rng):
    G = rng.standard_normal((3, 8))
    op = SpectralIHVP(strict_device1.asarray(G, "float64"), damp=0.1)
    other = make_backend("strict-cpu").asarray(np.ones((1, 8)), "float64")
    with pytest.raises(ValueError, match="device"):
        op.quadratic(other)


def test_pickle_keeps_results(rng):
    G = rng.standard_normal((4, 30))
    op = SpectralIHVP(G, damp=0.2, block_size=8).sqrt()
    back = pickle.loads(pickle.dumps(op))
    x = rng.standard_normal(30)
    assert np.array_equal(back @ x, op @ x) and back.logdet() == op.logdet()


def test_agrees_with_cholesky_form(xp_device, dtype, rng):
    m, d = 6, 40
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    X = be.asarray(rounded(rng.standard_normal((d, 2)), dtype), dtype)
    spec = SpectralIHVP(be.asarray(G, dtype), damp=damp, block_size=16)
    chol = StaticIHVP(be.asarray(G, dtype), damp=damp, block_size=16)
    kappa = error_scale(G, damp, 16)
    assert_close(spec @ X, to_numpy(chol @ X).astype(np.float64), kappa=kappa)


# -- pruning: the damping sweep -----------------------------------------------------------------


@pytest.mark.parametrize("bs", [None, 8], ids=["full", "blocks"])
def test_damping_sweep_against_brute_force(bs, xp_device, dtype, rng):
    from mfac_core.pruning import damping_sweep, obs_saliency, select_pruned

    m, d = 5, 30
    G = rounded(rng.standard_normal((m, d)), dtype)
    theta = rounded(rng.standard_normal(d), dtype)
    top = float(np.linalg.norm(G, 2)) ** 2 / m
    dampings = [top * 10.0**e for e in (-2, -1, 0, 2)]
    be = xp_device
    kept = np.ones(d, dtype=bool)
    kept[[3, 17]] = False
    res = damping_sweep(
        be.asarray(theta, dtype),
        be.asarray(G, dtype),
        dampings,
        sparsity=0.4,
        block_size=bs,
        mask=be.asarray(kept),
    )
    assert res.dampings == tuple(dampings)
    check_space(res.saliency, be, dtype)
    assert tuple(res.selected.shape) == (4, d)
    sel = to_numpy(res.selected) != 0  # to_numpy gives float64 for booleans
    for k, dp in enumerate(dampings):
        kappa = error_scale(G, dp, bs)
        # Brute force: a Cholesky-form operator per damping, in float64 on the host, of the
        # gradients zeroed at the pruned weights (as prune() decouples them).
        rho = to_numpy(obs_saliency(theta, StaticIHVP(G * kept, damp=dp, block_size=bs)))
        assert_close(res.saliency[k, ...], rho, kappa=kappa)
        want = select_pruned(rho, sparsity=0.4, mask=kept)
        assert np.array_equal(sel[k], want), dp
        assert not np.any(sel[k] & ~kept)
        assert int(sel[k].sum()) == 12 - 2
        assert_close(res.loss_increase[k], np.sum(rho[want]), kappa=kappa)
    # A larger damping makes the diagonal of F^{-1} smaller and every saliency larger.
    s = to_numpy(res.saliency).astype(np.float64)
    assert np.all(np.diff(s, axis=0) >= -100 * np.finfo(dtype).eps * s[1:])


def test_damping_sweep_validation(rng):
    from mfac_core.pruning import damping_sweep

    G, theta = rng.standard_normal((3, 10)), rng.standard_normal(10)
    with pytest.raises(ValueError, match="damp"):
        damping_sweep(theta, G, [0.1, -1.0], sparsity=0.5)
    with pytest.raises(TypeError, match="dampings must be a sequence"):
        damping_sweep(theta, G, 0.1, sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        damping_sweep(theta, G, [0.1], sparsity=1.0)
    with pytest.raises(ValueError, match="shape"):
        damping_sweep(theta[:9], G, [0.1], sparsity=0.5)
    with pytest.raises(TypeError, match="dtype"):
        damping_sweep(theta.astype(np.float32), G, [0.1], sparsity=0.5)
    # m damp beyond float64's range: named as the caller's argument, before the set-up.
    with pytest.raises(ValueError, match=r"^dampings\[1\]=1e\+308 is too large for 3 gradients"):
        damping_sweep(theta, G, [0.1, 1e308], sparsity=0.5)


def test_docstring_examples():
    import doctest

    import mfac_core._spectral

    result = doctest.testmod(
        mfac_core._spectral, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0 and result.attempted > 20


def test_sample_takes_numpy_integer_seeds_and_refuses_bools(rng):
    op = SpectralIHVP(rng.standard_normal((4, 20)), damp=0.5)
    np.testing.assert_array_equal(op.sample(2, rng=np.int64(3)), op.sample(2, rng=3))
    with pytest.raises(TypeError, match="rng must be"):
        op.sample(2, rng=True)


@pytest.mark.parametrize(
    ("library", "where", "bits"),
    [
        ("numpy", ">= 0", None),
        ("torch", r"in \[0, 2\*\*64\)", 64),
        ("jax", r"in \[0, 2\*\*63\)", 63),
    ],
)
def test_sample_refuses_seeds_its_library_cannot_take(library, where, bits, rng):
    # NumPy said "expected non-negative integer", PyTorch "Overflow when unpacking long
    # long", JAX "Python int too large to convert to C long"; PyTorch and JAX took -1.
    G = rng.standard_normal((4, 6))
    if library == "torch":
        G = pytest.importorskip("torch").asarray(G)
    elif library == "jax":
        G = pytest.importorskip("jax.numpy").asarray(G)
    op = SpectralIHVP(G, damp=0.5)
    for seed in [-1, np.int64(-2)] + ([] if bits is None else [2**bits, 2**70]):
        with pytest.raises(ValueError, match=rf"^rng as an int seed must be {where} for {library}"):
            op.sample(1, rng=seed)
    good = 2**70 if bits is None else 2**bits - 1
    assert tuple(op.sample(1, rng=good).shape) == (1, 6)


@pytest.mark.parametrize("layout", ["full-d<m", "narrow-blocks+ragged", "wide-blocks"])
def test_no_columns_and_no_samples_give_empty_results(layout):
    # Blocks no wider than m (and the engine's blocked pass) once reshaped with -1,
    # which is ambiguous for k = 0 columns: sample(0) and a (d, 0) matmat raised.
    m, d, bs = LAYOUTS[layout]
    op = SpectralIHVP(np.random.default_rng(0).standard_normal((m, d)), damp=0.5, block_size=bs)
    assert op.sample(0, rng=0).shape == (0, d)
    assert op.matmat(np.zeros((d, 0))).shape == (d, 0)
    assert op.sweep(np.zeros((d, 0)), damps=[0.5, 2.0]).shape == (2, d, 0)


@pytest.mark.parametrize("layout", ["full-d<m", "narrow-blocks+ragged"])
def test_forms_of_blocks_no_wider_than_m_hold_at_small_damping(layout):
    # F is well-conditioned (kappa < 1e4) whatever the damping when the blocks are no
    # wider than m, yet the forms once summed f(damp) |r|^2 with weights f(F) - f(damp):
    # at damp = 1e-10 they cancelled to 1e-6 relative, where products stay at 1e-15.
    m, d, bs = LAYOUTS[layout]
    rng = np.random.default_rng(5)
    G, Q, R = rng.standard_normal((m, d)), rng.standard_normal((2, d)), rng.standard_normal((3, d))
    op = SpectralIHVP(G, damp=1e-10, block_size=bs)
    FR = SpectralOracle(G, 1e-10, block_size=bs).matmat(R.T)  # F^{-1} R^T
    assert op.kappa < 1e4  # independent of the damping
    assert_close(op.bilinear(Q, R, batch_size=2), Q @ FR, kappa=op.kappa, dtype="float64")
    assert_close(op.quadratic(R), np.sum(R.T * FR, axis=0), kappa=op.kappa, dtype="float64")


@pytest.mark.parametrize("scale", [1e100, 1e-100])
@pytest.mark.parametrize("block_size", [None, 3])
def test_f_inverse_at_a_damping_beyond_1e154_or_below_1e_154(scale, block_size, rng):
    # Regression: F^{-1}'s weights h = -1 / (damp (m damp + lam)) left float64's range
    # where the damping's square does (damp ~ 1e199 or 1e-201 here): products and
    # diagonals were 65% off (h underflowed to 0) or NaN (h overflowed). Scaling G by c and
    # the damping by c^2 scales every result exactly; the other powers always held.
    G, x, R = rng.standard_normal((4, 10)), rng.standard_normal(10), rng.standard_normal((3, 10))
    ref = SpectralIHVP(G, damp=0.1, block_size=block_size)
    op = SpectralIHVP(G * scale, damp=0.1 * scale**2, block_size=block_size)
    for got, want in [
        (op @ x, ref @ x),
        (op @ np.stack([x, -x], axis=1), ref @ np.stack([x, -x], axis=1)),
        (op.diagonal(), ref.diagonal()),
        (op.sweep(x, damps=[0.1 * scale**2, scale**2]), ref.sweep(x, damps=[0.1, 1.0])),
        (op.quadratic(R), ref.quadratic(R)),
        (op.bilinear(R, R[:2]), ref.bilinear(R, R[:2])),
    ]:
        # Both sides carry their own rounding (G * scale is rounded), eps kappa each.
        assert_close(got * scale**2, want, kappa=condition_number(G, 0.1, block_size=block_size))


def _aligned(rng: np.random.Generator, m: int = 8, d: int = 40) -> np.ndarray:
    """Gradients sharing one direction: the Gram's largest eigenvalue is about m |g|^2."""
    return rng.standard_normal(d) + 0.1 * rng.standard_normal((m, d))


@pytest.mark.parametrize("exponent", [-498, -250, 250, 498])  # c = 2**e, about 1e+-150
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_scale_free_from_1e_150_to_1e150(exponent, dtype, rng):
    # The operators of c G at the damping c^2 lambda are those of G at lambda scaled by
    # c^-2 (each power p by c^(2p)): with c a power of two every stored value is exact,
    # so the results agree to the rounding of each side. x is gradient-sized (c y), as an
    # optimizer's or a pruner's vectors are, so that its squared products are c^4 y^2.
    # float32 takes c**(e/10), about 1e+-15, where its results (c^-2 diag F^{-1}) stay in range.
    c = 2.0 ** (exponent if dtype == "float64" else exponent // 10)
    G = rounded(_aligned(rng), dtype)
    y, lam = rounded(rng.standard_normal(G.shape[1]), dtype), 1e-2
    ref = SpectralIHVP(G, damp=lam, block_size=None)
    op = SpectralIHVP((G * c).astype(dtype), damp=c * c * lam)
    x = (y * c).astype(dtype)
    kappa = ref.kappa
    for got, want in [
        (op @ x * c, ref @ y),
        (op.sweep(x, damps=[c * c * lam, 4 * c * c * lam])[1] * c, ref.with_damp(4 * lam) @ y),
        (op.diagonal() * c * c, ref.diagonal()),
        (op.quadratic(x[None, :]), ref.quadratic(y[None, :])),
        (op.sqrt() @ x, ref.sqrt() @ y),
        (op.inverse() @ (y / c).astype(dtype) / c, ref.inverse() @ y),
        (np.array([op.trace() * c * c]), np.array([ref.trace()])),
    ]:
        assert_close(got, want, kappa=kappa, dtype=dtype)
    assert math.isclose(op.logdet(), ref.logdet() - G.shape[1] * math.log(c * c), rel_tol=1e-12)
    assert math.isclose(op.kappa, kappa, rel_tol=1e-12)
    for other in (StaticIHVP, DynamicIHVP.from_window):
        got = other((G * c).astype(dtype), damp=c * c * lam) @ x * c
        assert_close(got, ref @ y, kappa=kappa, dtype=dtype)


def test_gradients_at_the_top_of_float64s_range(rng):
    # Regression: with squared norms of ~8e306 (m = 8 aligned gradients), the bound of
    # kappa summed the Gram's entries past float64's range: StaticIHVP and
    # DynamicIHVP.from_window warned "kappa >= inf" for kappa ~ 1e3. Twice larger, the
    # Gram's largest eigenvalue (~ m |g|^2) overflows, and SpectralIHVP, which warned and
    # then weighed that direction by 0, refuses G instead.
    G, y, lam = _aligned(rng), rng.standard_normal(40), 1e-2
    c = 2.0**507
    ref = StaticIHVP(G, damp=lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no IllConditionedWarning
        for build in (StaticIHVP, SpectralIHVP, DynamicIHVP.from_window):
            op = build(G * c, damp=c * c * lam)
            assert_close(op @ (y * c) * c, ref @ y, kappa=condition_number(G, lam))
    with pytest.raises(ValueError, match="largest eigenvalue of G's Gram matrix overflows"):
        SpectralIHVP(G * (2 * c), damp=c * c * lam)


def test_weights_at_the_largest_damping(rng):
    # Regression: SpectralIHVP's weights 1 / (m damp + Lambda) overflowed to 0 where that
    # sum does although each term is finite (m damp a quarter of float64's largest number
    # and the Gram's largest eigenvalue 0.8 of it): products 10% off (kappa 4), silently.
    m, c = 4, 2.0**510
    top = sys.float_info.max / 4 / m  # the largest damping for m = 4 (exact)
    G = _aligned(rng, m, 10)
    G = G / np.linalg.norm(G, axis=1, keepdims=True) * math.sqrt(0.2 * sys.float_info.max)
    y = rng.standard_normal(10)
    for block_size in (None, 5):
        op = SpectralIHVP(G, damp=top, block_size=block_size)
        want = SpectralIHVP(G / c, damp=top / c / c, block_size=block_size)
        assert want.kappa > 2.0  # the gradients' term is far above the rounding
        assert_close(op @ (y * c) * c, want @ y, kappa=want.kappa)
        assert_close(op.diagonal() * c * c, want.diagonal(), kappa=want.kappa)


@pytest.mark.parametrize("block_size", [None, 1])
def test_one_gradient_whose_eigenvalue_and_damping_overflow_is_refused(block_size):
    # Regression: for m = 1, F's largest eigenvalue damp + |g|^2 overflows float64 with
    # each term finite (damp up to a quarter of the range): its weight became 0, so the
    # product and diagonal along g were 1 / damp, 4.8x the exact 1 / (damp + |g|^2), and
    # trace() dropped that term (7 % off), silently; kappa was inf with NumPy's overflow
    # warning. StaticIHVP refuses such a G and damping; so does SpectralIHVP, at every
    # damping that reaches it (with_damp, sweep, diagonal), leaving the operator as it was.
    G = np.zeros((1, 4))
    G[0, 0] = math.sqrt(0.94 * sys.float_info.max)  # the Gram's eigenvalue 0.94 of the range
    top = sys.float_info.max / 4  # the largest damping for m = 1
    match = "overflows float64"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clear error, no NumPy warning before it
        with pytest.raises(ValueError, match=match):
            SpectralIHVP(G, damp=top, block_size=block_size)
        op = SpectralIHVP(G, damp=top / 8, block_size=block_size)  # in range: exact
        x = np.array([1.0, 0.0, 0.0, 0.0])
        want = 1.0 / (top / 8 + G[0, 0] ** 2)
        assert (op @ x)[0] == pytest.approx(want, rel=1e-12)
        before = (op.damp, op.kappa, op.error_scale)
        for call in (
            lambda: op.with_damp(top),
            lambda: op.sweep(x, damps=[1.0, top]),
            lambda: op.diagonal(damps=[top, 1.0]),
        ):
            with pytest.raises(ValueError, match=match):
                call()
        assert (op.damp, op.kappa, op.error_scale) == before


@pytest.mark.parametrize("block_size", [None, 7, 3])
def test_forms_of_vectors_whose_squares_pass_float64s_range(rng, block_size):
    # Regression: the forms of blocks wider than m summed damp**power * Q_b R_b^T with the
    # power applied after the products: vectors of 4e159 (whose squares overflow) at damp
    # 1e300 gave inf and "a result exceeds float64's range" for forms of 1e21, where the
    # products, and blocks no wider than m, were right. c a power of two: exact scaling.
    G, R, c = rng.standard_normal((4, 10)), rng.standard_normal((3, 10)), 2.0**530
    op = SpectralIHVP(G, damp=1e300, block_size=block_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow to report
        q, B = op.quadratic(R * c), op.bilinear(R * c, R[:2] * c)
    assert_close(q / c / c, op.quadratic(R), kappa=op.kappa, dtype="float64")
    assert_close(B / c / c, op.bilinear(R, R[:2]), kappa=op.kappa, dtype="float64")


def test_sweeps_warn_at_a_hopeless_damping_as_with_damp_does(rng):
    # Regression: sweep() and diagonal(damps=...) at a damping where eps(float64) kappa
    # >= 1 gave no IllConditionedWarning where with_damp() and the constructor warn, and
    # their results there are garbage: a stored gradient's product 9e2 and a diagonal
    # entry 2e2 relative off at damp 1e-17 (kappa 3e18), silently.
    G = (rng.standard_normal((5, 30)) + 1).astype(np.float32)
    op, x, hopeless = SpectralIHVP(G, damp=1.0), G[0], 1e-17
    with pytest.warns(IllConditionedWarning, match="damp=1e-17"):
        op.with_damp(hopeless)
    for call in (lambda d: op.sweep(x, damps=d), lambda d: op.diagonal(damps=d)):
        with pytest.warns(IllConditionedWarning, match="damp=1e-17"):
            call([1.0, hopeless])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # none where every damping is well conditioned
            call([1.0, 1e-3, 10.0])


@pytest.mark.parametrize("block_size", [None, 3, 5])
def test_logdet_where_the_spectrum_over_the_damping_passes_float64s_range(rng, block_size):
    # Regression: log det F summed log1p(Lambda / (m damp)), which is log1p(inf) = inf once
    # the ratio passes float64's range: gradients of 1e5 at damp 1e-300 gave a logdet of
    # F^{-1} of -inf (with NumPy's overflow warnings) for a finite -4052.
    G, damp = rng.standard_normal((4, 10)) * 1e5, 1e-300
    B = block_size or 10
    want = 0.0  # the blocks' singular values: log(damp + s^2 / m), no ratio to overflow
    for lo in range(0, 10, B):
        sv = np.linalg.svd(G[:, lo : lo + B], compute_uv=False)
        want += (min(B, 10 - lo) - sv.size) * math.log(damp)
        want += float(np.sum(np.log(damp + sv**2 / 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)  # for the products
        op = SpectralIHVP(G, damp=damp, block_size=block_size)
    assert math.isfinite(op.logdet())
    assert op.inverse().logdet() == pytest.approx(want, rel=1e-12)
    assert op.logdet() == -op.inverse().logdet()


@pytest.mark.parametrize(("d", "block_size"), [(8, None), (16, 8)])
def test_dense_blocks_warn_by_the_dense_rule_as_static_ones_do(rng, d, block_size):
    # Regression: SpectralIHVP warned of blocks no wider than m by the Woodbury forms' rule
    # (eps kappa**1.5 >= 1), where StaticIHVP's dense blocks warn from eps kappa >= 1/32:
    # 8 gradients spanning d = 8 at kappa 1e13 warned although their products were 5e-4
    # off (0.2 eps kappa, against an oracle in 60 digits), and the same G's StaticIHVP did
    # not. Both now say the same: Spectral's dense blocks lose about eps kappa too.
    m = 8
    G = rng.standard_normal(d) + rng.standard_normal((m, d)) * np.logspace(0, -8, m)[:, None]
    top = max(
        float(np.linalg.eigvalsh(G[:, b : b + m].T @ G[:, b : b + m] / m)[-1])
        for b in range(0, d, m)
    )
    eps = np.finfo(np.float64).eps
    quiet, loud = top * eps * 1e3, top * eps * 2  # eps kappa ~ 1e-3 and ~ 1/2
    assert eps * condition_number(G, quiet, block_size=block_size) ** 1.5 > 1e3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = SpectralIHVP(G, damp=quiet, block_size=block_size)
        StaticIHVP(G, damp=quiet, block_size=block_size)
        op.with_damp(quiet * 2)
        op.sweep(G[0], damps=[quiet, quiet * 2])
    for call in (
        lambda: SpectralIHVP(G, damp=loud, block_size=block_size),
        lambda: op.with_damp(loud),
        lambda: op.sweep(G[0], damps=[quiet, loud]),
        lambda: op.diagonal(damps=[loud]),
    ):
        with pytest.warns(IllConditionedWarning, match="eps \\* kappa >= 1/32"):
            call()
