"""The static set-up's float64 Gram pieces written by the C extension's threads
(``_engine.gram_widener``, ``_fused.widen64``): the same Gram, bit for bit, as NumPy's and
PyTorch's casts of the pieces."""

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


def _factor(xp, G, *, widen, block_size=None, monkeypatch):
    """The float64 factor stacks of the set-up, with or without the widener."""
    if not widen:
        monkeypatch.setattr(_engine, "gram_widener", lambda xp, G: None)
    d = G.shape[1]
    result = _setup.factorize_gform_groups(
        xp, G, block_groups(d, block_size or d), damp=1e-3, dtype=np.float32,
        check_finite=True, progress=None,
    )  # fmt: skip
    monkeypatch.undo()
    return [np.asarray(f.factor.U) for f in result.factors]


@pytest.mark.parametrize(
    ("name", "block_size"),
    [(NAMES[0], None), (NAMES[0], 1000), (NAMES[1], None), (NAMES[2], None), (NAMES[3], 1000)],
)
def test_gram_pieces_widened_by_the_kernels_give_the_same_factor(monkeypatch, name, block_size):
    """Every bit of the set-up's factors (so of its Grams) is the same with the pieces cast
    by ``xp.astype`` and written by ``widen64``, for the full set-up and blocks wider than
    a piece (a ragged last block too), and the widener serves each case."""
    xp, G = _case(name)
    calls = []
    widener = _engine.gram_widener

    def spy(xp, G):
        widen = widener(xp, G)
        assert widen is not None
        return lambda lo, hi: calls.append(hi - lo) or widen(lo, hi)

    before = _factor(xp, G, widen=False, block_size=block_size, monkeypatch=monkeypatch)
    monkeypatch.setattr(_engine, "gram_widener", spy)
    after = _factor(xp, G, widen=True, block_size=block_size, monkeypatch=monkeypatch)
    assert sum(calls) == G.shape[1]
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.view(np.uint64), b.view(np.uint64))


def test_gram_widener_leaves_what_it_does_not_serve():
    """float64 G (no cast to do) and a PyTorch tensor that needs its gradient keep the
    cast of ``xp.astype``."""
    G = np.ones((3, 50))
    assert _engine.gram_widener(np, G) is None
    torch = pytest.importorskip("torch")
    t = torch.ones(3, 50, requires_grad=True)
    assert _engine.gram_widener(array_namespace(t), t) is None


def test_non_finite_g_is_still_reported_where_it_is():
    """The finite check reads the Gram's diagonal: a NaN that the kernels widened is
    reported with its place, as before."""
    G = np.ones((4, 3000), np.float32)
    G[2, 2500] = np.nan
    with pytest.raises(ValueError, match=r"G\[2, 2500\] is nan"):
        StaticIHVP(G, damp=1e-3)
