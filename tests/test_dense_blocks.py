"""Tests of the host set-up of dense blocks (mfac_core._dense_blocks) against the general one."""

from __future__ import annotations

import warnings

import array_api_compat
import numpy as np
import pytest

from mfac_core import FactorizationError, IllConditionedWarning, StaticIHVP, _dense_blocks
from mfac_core._capacitance import kappa_bounds
from mfac_core._layout import BlockGroup


@pytest.fixture
def chunked(monkeypatch):
    """Chunks of two blocks of 4 x 4: every code path on tiny G."""
    monkeypatch.setattr(_dense_blocks, "_CHUNK_BYTES", 2 * 8 * 4 * 4)
    return monkeypatch


def _general(G, **kwargs):
    """The operator through the general (batched-array) set-up."""
    real = _dense_blocks.serves
    _dense_blocks.serves = lambda *a: False
    try:
        return StaticIHVP(G, **kwargs)
    finally:
        _dense_blocks.serves = real


def _oracle_Linv(G64, start, size, damp):
    F = G64[:, start : start + size].T @ G64[:, start : start + size] / G64.shape[0]
    return np.linalg.inv(np.linalg.cholesky(F + damp * np.eye(size)))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_matches_oracle_and_general_path(chunked, rng, dtype):
    m, d, bs = 6, 23, 4  # five full blocks (three chunks) and a ragged one of 3
    G = rng.standard_normal((m, d)).astype(dtype)
    G64 = G.astype(np.float64)
    damp = 1e-2 * float(np.linalg.norm(G64, 2)) ** 2 / m
    calls = []
    op = StaticIHVP(G, damp=damp, block_size=bs, progress=lambda *a: calls.append(a))
    ref = _general(G, damp=damp, block_size=bs)
    for new, old in zip(op._factors, ref._factors, strict=True):
        g = new.group
        assert isinstance(new, type(old)) and g == old.group
        for b in range(g.count):
            want = _oracle_Linv(G64, g.start + b * g.size, g.size, damp)
            scale = np.linalg.norm(want, 2)
            # kappa(F_b) <= 101 here; the factor's error is eps64 * kappa relative.
            np.testing.assert_allclose(new.Linv[b], want, rtol=0, atol=1e-12 * scale)
            np.testing.assert_allclose(new.Linv[b], old.Linv[b], rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(op.kappa_bound, ref.kappa_bound, rtol=1e-12)
    x = rng.standard_normal(d).astype(dtype)
    y, want = np.asarray(op @ x, np.float64), np.asarray(ref @ x, np.float64)
    assert np.linalg.norm(y - want) <= 4 * np.finfo(dtype).eps * np.linalg.norm(want)
    assert calls[-1] == (d, d)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_progress_after_each_chunk(chunked, rng):
    G = rng.standard_normal((8, 64)).astype(np.float32)
    seen = []
    out = np.empty((16, 4, 4))
    _dense_blocks.fill_block_inverses(
        G,
        BlockGroup(0, 16, 4),
        out,
        damp=0.1,
        progress=seen.append,
    )
    assert seen == [8] * 8  # eight chunks of two blocks of 4 columns


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradients_raise_as_the_general_path(chunked, bad):
    G = np.ones((6, 23), dtype=np.float32)
    G[2, 13] = bad
    with pytest.raises(ValueError, match=r"NaN or infinity: G\[2, 13\]"):
        StaticIHVP(G, damp=1.0, block_size=4)
    with pytest.raises(FactorizationError) as new:
        StaticIHVP(G, damp=1.0, block_size=4, check_finite=False)
    with pytest.raises(FactorizationError) as old:
        _general(G, damp=1.0, block_size=4, check_finite=False)
    assert str(new.value) == str(old.value)
    # The failure leaves the group to the general path: the kernels report it.
    out = np.empty((5, 4, 4))
    assert _dense_blocks.fill_block_inverses(G, BlockGroup(0, 5, 4), out, damp=1.0) is None


def test_hopeless_warning_and_lower_bound(chunked, rng):
    # kappa ~ 1e17: the power iterations sharpen the lower bound, as the general path's.
    G = rng.standard_normal((6, 24))
    # Block 1 is nearly rank one: lambda_max is about four times its largest diagonal
    # entry, and its smallest eigenvalue, ~1e-6, keeps F_1 positive definite in float64.
    G[:, 4:8] = G[:, 0:1] + 1e-3 * rng.standard_normal((6, 4))
    damp = 1e-16
    with warnings.catch_warnings(record=True) as new:
        warnings.simplefilter("always")
        StaticIHVP(G, damp=damp, block_size=4)
    with warnings.catch_warnings(record=True) as old:
        warnings.simplefilter("always")
        _general(G, damp=damp, block_size=4)
    assert [w.category for w in new] == [IllConditionedWarning]
    assert [w.category for w in old] == [IllConditionedWarning]
    lo_new = float(str(new[0].message).split("kappa >= ")[1].split(",")[0])
    lo_old = float(str(old[0].message).split("kappa >= ")[1].split(",")[0])
    assert lo_new == pytest.approx(lo_old, rel=1e-2)
    out = np.empty((6, 4, 4))
    lo, hi = _dense_blocks.fill_block_inverses(G, BlockGroup(0, 6, 4), out, damp=damp)
    grams = np.stack([G[:, b : b + 4].T @ G[:, b : b + 4] for b in range(0, 24, 4)])
    kappa = 1 + np.linalg.eigvalsh(grams / 6)[:, -1] / damp
    assert max(kappa) * (1 - 1e-12) <= hi
    assert lo <= max(kappa) * (1 + 1e-12)
    # The power iterations find lambda_max of the nearly rank-one block (its largest
    # diagonal entry alone is about a quarter of it), as the general path's do.
    assert lo >= kappa[1] * (1 - 1e-10)
    assert lo == pytest.approx(kappa_bounds(np, grams, shift=damp, scale=1 / 6)[0], rel=1e-10)


def test_serves_only_numpy_dense_blocks():
    G = np.ones((4, 12), dtype=np.float32)
    xp = array_api_compat.array_namespace(G)
    assert _dense_blocks.serves(xp, G, BlockGroup(0, 3, 4))
    assert not _dense_blocks.serves(xp, G, BlockGroup(0, 2, 6))  # wider than m: Woodbury
    assert not _dense_blocks.serves(xp, G.astype(np.complex64), BlockGroup(0, 3, 4))
