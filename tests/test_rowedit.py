"""The one O(k^2) row edit of a Cholesky factor (mfac_core._linalg._rowedit), both forms.

``_linalg.replaced_row`` (a pure function of arrays: the JAX window's edit) and
``_linalg.replace_row`` (written into a buffer: DynamicIHVP's) are the same edit;
they agree with each other and with a fresh factorisation on every backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from mfac_core import _linalg
from mfac_core._errors import NotPositiveDefinite
from mfac_core._linalg import _rowedit
from mfac_core.testing import to_numpy

#: Order 37: one full panel of PANEL_ROWS = 32 rows and a ragged one of 4 below row 0.
K = 37


def _problem(rng: np.random.Generator, p: int, k: int = K):
    """A factor U of C (k x k) and the row [b; c] that replaces row/column p; the oracle."""
    G = rng.standard_normal((k + 1, 3 * k))
    C = G @ G.T / (3 * k) + 0.5 * np.eye(k + 1)
    U = np.linalg.cholesky(C[:k, :k]).T.copy()
    keep = [i for i in range(k) if i != p] + [k]
    edited = C[np.ix_(keep, keep)]
    return U, edited[-1, :-1].copy(), float(edited[-1, -1]), np.linalg.cholesky(edited).T


@pytest.mark.parametrize("p", [0, 17, K - 1], ids=["first", "middle", "last"])
def test_functional_edit_matches_the_in_place_one(xp_device, rng, p):
    if not xp_device.mutable:
        pytest.skip("JAX compiles per shape: its edit is checked under jit below")
    U, b, c, oracle = _problem(rng, p)
    xp = xp_device.xp
    Ux, bx = xp_device.asarray(U, "float64"), xp_device.asarray(b, "float64")
    new, margin = _linalg.replaced_row(xp, Ux, p, bx, c)
    out = xp.zeros((K, K), dtype=xp.float64, device=xp_device.device)
    in_place = to_numpy(_linalg.replace_row(xp, Ux, p, bx, c, out))
    new = to_numpy(new)
    scale = np.abs(oracle).max()
    assert float(margin) > 0
    assert np.array_equal(np.triu(new), new)
    assert np.abs(new - in_place).max() <= 1e-13 * scale
    assert np.abs(new - oracle).max() <= 1e-13 * scale


def test_functional_and_in_place_edits_refuse_the_same_dependent_row(rng):
    U, b, _, _ = _problem(rng, 0)
    # The new row repeats the last remaining one: C is singular, the pivot 0 up to rounding.
    C = U.T @ U
    b, c = C[-1, 1:].copy(), float(C[-1, -1])
    new, margin = _linalg.replaced_row(np, U, 0, b, c)
    assert not float(margin) > 0
    assert new[-1, -1] == 1.0 and np.isfinite(new).all()  # finite, to be discarded
    out = np.full_like(U, 7.0)
    with pytest.raises(NotPositiveDefinite, match="pivot not positive"):
        _linalg.replace_row(np, U, 0, b, c, out)
    _, deferred = _linalg.replace_row(np, U, 0, b, c, np.zeros_like(U), deferred=True)
    assert float(deferred) == float(margin)


def test_replaced_traces_under_jit_and_matches_numpy(rng):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    solve = _linalg._backend_for(jnp).solve_triangular
    first, middle = _problem(rng, 0, k=9), _problem(rng, 4, k=9)

    def edits(U0, b0, c0, U4, b4, c4):
        # The JAX backend's loop (the window's edit, p = 0), the generic panels traced
        # (block 4: two panels and a ragged one), and the loop below a kept row (p = 4).
        return (
            _linalg.replaced_row(jnp, U0, 0, b0, c0),
            _rowedit.replaced(jnp, solve, U0, 0, b0, c0, block=4),
            _linalg.replaced_row(jnp, U4, 4, b4, c4),
        )

    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in (*first[:3], *middle[:3])]
        results = jax.jit(edits)(*args)
    for (new, margin), (p, (U, b, c, oracle)) in zip(
        results, [(0, first), (0, first), (4, middle)], strict=True
    ):
        ref = _linalg.replace_row(np, U, p, b, c, np.zeros_like(U))
        assert float(margin) > 0
        assert np.abs(np.asarray(new) - ref).max() <= 1e-13 * np.abs(oracle).max()


def test_jax_transposed_solve_broadcasts_as_the_others(rng):
    # The JAX backend solves U^T x = b with lax's solve, which neither broadcasts batch
    # dimensions nor takes a vector: both as jax.scipy.linalg.solve_triangular does.
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from mfac_core._linalg import solve_triangular

    U = np.triu(rng.standard_normal((5, 5))) + 5 * np.eye(5)
    Us = np.stack([U, U + np.eye(5)])
    B = rng.standard_normal((3, 5, 2))
    with jax.enable_x64(True):
        for t, b in ((U, B), (Us, B[0]), (Us[:, None], B), (U, B[0, :, 0])):
            got = solve_triangular(jnp, jnp.asarray(t), jnp.asarray(b), lower=False, trans=True)
            want = solve_triangular(np, t, b, lower=False, trans=True)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=0)


def test_a_torch_cpu_edit_runs_in_numpy_on_the_same_memory(rng):
    """PyTorch CPU factors are edited through NumPy views (no copy): PyTorch's small
    products run on its OpenMP team, whose threads spin on the passes' cores and, under
    load, wait for each other. Same bits as NumPy's edit; no torch operation runs; a
    dependent row is refused the same way, ``out`` only written."""
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    class Recorded(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    U, b, c, _ = _problem(rng, 17)
    want = _linalg.replace_row(np, U, 17, b, c, np.zeros_like(U))
    Ut, bt = torch.from_numpy(U.copy()), torch.from_numpy(b.copy())
    out = torch.zeros(U.shape, dtype=torch.float64)
    with Recorded() as seen:
        got = _linalg.replace_row(torch, Ut, 17, bt, c, out)
    assert got is out and np.array_equal(out.numpy(), want)
    assert not any(name in ("matmul", "__matmul__", "solve_triangular") for name in seen.names)
    C = U.T @ U
    dependent = torch.from_numpy(C[-1, 1:].copy())
    with pytest.raises(NotPositiveDefinite, match="pivot not positive"):
        _linalg.replace_row(torch, Ut, 0, dependent, float(C[-1, -1]), out)
    assert np.array_equal(Ut.numpy(), U)
