"""The static set-up's Gram summed by the C extension from G in its storage dtype
(``_engine.gram_kernel``, ``_fused.rows_gram64``): the factors of the float64 Gram that
NumPy's and PyTorch's casts and BLAS give, to float64's rounding, and what it does not serve."""

from __future__ import annotations

import numpy as np
import pytest

from mfac_core import StaticIHVP, _engine, _fused, _setup
from mfac_core._compat import array_namespace
from mfac_core._layout import block_groups

pytestmark = pytest.mark.skipif(
    not _fused.available(), reason="the C extension mfac_core._fused._passes was not built"
)


NAMES = ["numpy-float32", "numpy-float16", "torch-float32", "torch-bfloat16"]


def _case(name):
    """``(xp, G)`` of one storage: 65 pieces of 37 columns (vector columns and a tail),
    rows of very different size, a -0 and a float32 subnormal."""
    rng = np.random.default_rng(3)
    m, d = 6, 64 * 37 + 5
    V = rng.standard_normal((m, d)) * np.logspace(0, -30, m)[:, None]
    V[0, 5] = -0.0
    V[1, 7] = 1e-41
    if name.startswith("numpy"):
        return np, V.astype(name.split("-")[1])
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(V.astype(np.float32)).to(getattr(torch, name.split("-")[1]))
    return array_namespace(t), t


def _grams(xp, G, *, kernel, block_size=None, monkeypatch):
    """The set-up's float64 Grams (from its factors, ``U^T U`` less the shift), with or
    without the kernel."""
    if not kernel:
        monkeypatch.setattr(_engine, "gram_kernel", lambda xp, G: None)
    d, m = G.shape[1], G.shape[0]
    result = _setup.factorize_gform_groups(
        xp, G, block_groups(d, block_size or d), damp=1e-3, dtype=np.float32,
        check_finite=True, progress=None,
    )  # fmt: skip
    monkeypatch.undo()
    out = []
    for f in result.factors:
        U = np.asarray(f.factor.U, np.float64)
        out.append(np.swapaxes(U, -1, -2) @ U - m * 1e-3 * np.eye(m))
    return out


@pytest.mark.parametrize(
    ("name", "block_size"),
    [(NAMES[0], None), (NAMES[0], 1000), (NAMES[1], None), (NAMES[2], None), (NAMES[3], 1000)],
)
def test_the_kernels_gram_is_the_cast_pieces_gram(monkeypatch, name, block_size):
    """The set-up's Grams with the kernel are those of ``xp.astype`` and BLAS to float64's
    rounding (relative to each entry's row and column norms: the rows differ by 1e30), for
    the full set-up and blocks wider than a piece (a ragged last block too), and the kernel
    serves each case, every column once, up to eight pieces of one block a call."""
    xp, G = _case(name)
    calls = []
    kernel = _engine.gram_kernel

    def spy(xp, G):
        gram = kernel(xp, G)
        assert gram is not None
        return lambda lo, hi: calls.append(hi - lo) or gram(lo, hi)

    before = _grams(xp, G, kernel=False, block_size=block_size, monkeypatch=monkeypatch)
    monkeypatch.setattr(_engine, "gram_kernel", spy)
    after = _grams(xp, G, kernel=True, block_size=block_size, monkeypatch=monkeypatch)
    assert sum(calls) == G.shape[1]
    if block_size is None:  # 64 pieces of 37 columns and one of 5, eight pieces a call
        assert calls == [8 * 37] * 8 + [5]
    assert len(before) == len(after)
    d, eps = G.shape[1], np.finfo(np.float64).eps
    for a, b in zip(before, after, strict=True):
        norms = np.sqrt(np.abs(np.diagonal(a, axis1=-2, axis2=-1)))
        scale = norms[..., :, None] * norms[..., None, :]
        assert np.all(np.abs(a - b) <= 8 * d * eps * scale + 1e-3 * 6 * 64 * eps)


def test_gram_kernel_leaves_what_it_does_not_serve():
    """float64 G (BLAS sums it in place), more rows than the kernel's tiles keep in cache,
    and a PyTorch tensor that needs its gradient keep ``xp.astype`` and ``@``."""
    assert _engine.gram_kernel(np, np.ones((3, 50))) is None
    wide = np.ones((_engine.GRAM_KERNEL_MAX_ROWS + 1, 8), np.float32)
    assert _engine.gram_kernel(np, wide) is None
    assert _engine.gram_kernel(np, wide[:-1]) is not None
    torch = pytest.importorskip("torch")
    t = torch.ones(3, 50, requires_grad=True)
    assert _engine.gram_kernel(array_namespace(t), t) is None


@pytest.mark.parametrize("where", [(2, 2500), (0, 0), (3, 2999)])
def test_non_finite_g_is_still_reported_where_it_is(where):
    """The finite check reads the Gram's diagonal: a NaN that the kernel summed is reported
    with its place, as before."""
    G = np.ones((4, 3000), np.float32)
    G[where] = np.nan
    with pytest.raises(ValueError, match=rf"G\[{where[0]}, {where[1]}\] is nan"):
        StaticIHVP(G, damp=1e-3)


def _shared_mean_pair(d):
    """Two float32 gradients of one sign and nearly one size (a shared mean, sign noise):
    every product of a Gram entry is about the same number, which a running sum over the
    columns rounds the same way at every step."""
    rng = np.random.default_rng(2)
    a = np.array([1.2616, 1.2985], np.float32)
    return (a[:, None] + 2.0**-9 * rng.choice([-1.0, 1.0], size=(2, d))).astype(np.float32)


def test_kernel_gram_rounding_does_not_grow_with_the_columns():
    """Regression: each entry was one running sum over the columns, 15600 eps(float64) of
    the terms' sum off at d = 2e5 (dsyrk 37). The chunks' sums are now summed in levels
    (kc, a span of chunks, the spans: a few hundred terms each way), well inside the bound
    of 1000 terms summed, where one sum over d = 2e5 columns is not."""
    d = 200_000
    G = _shared_mean_pair(d)
    out = np.empty((2, 2))
    _fused.rows_gram64(G, out, start=0, stop=d)
    Gl = G.astype(np.longdouble)
    err = np.abs(out.astype(np.longdouble) - Gl @ Gl.T).astype(np.float64)
    terms = np.abs(G.astype(np.float64)) @ np.abs(G.astype(np.float64)).T
    assert np.all(err <= 1000 * np.finfo(np.float64).eps * terms), np.max(err / terms)


def test_product_of_the_mean_is_exact_in_float32_for_a_shared_mean_pair():
    """The same gradients at kappa = 1e6: the product of their mean was 85 eps(float32) off
    the exact inverse of their Fisher (the Gram's rounding, amplified by kappa^1.5)."""
    from mfac_core.testing import condition_number, extended_precision_inverse

    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("numpy.longdouble is float64 here: no reference beyond float64")
    G = _shared_mean_pair(200_000)
    G64 = G.astype(np.float64)
    damp = float(np.linalg.norm(G64, 2) ** 2 / (2 * (1e6 - 1)))
    assert condition_number(G64, damp) == pytest.approx(1e6, rel=1e-6)
    x = G.mean(axis=0)
    want = extended_precision_inverse(G64, damp, x.astype(np.float64))
    got = StaticIHVP(G, damp=damp) @ x
    err = np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want)
    assert err <= 8 * np.finfo(np.float32).eps, err / np.finfo(np.float32).eps
