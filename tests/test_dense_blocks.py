"""Tests of the host set-up of dense blocks (mfac_core._dense_blocks) against the general one."""

from __future__ import annotations

import threading
import time
import warnings

import array_api_compat
import numpy as np
import pytest

from mfac_core import FactorizationError, IllConditionedWarning, StaticIHVP, _dense_blocks, _fused
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


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("bs", [1, 4])
def test_matches_oracle_and_general_path(chunked, rng, dtype, bs):
    if dtype == "bfloat16":  # NumPy's is ml_dtypes'
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    # bs = 4: five full blocks (three chunks) and a ragged one of 3; bs = 1: 23 blocks.
    m, d = 6, 23
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
    # Both round one float64 result to the result dtype (float32 for 2-byte G).
    eps = np.finfo(op.dtype).eps
    assert np.linalg.norm(y - want) <= 4 * eps * np.linalg.norm(want)
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


def test_progress_does_not_go_back_where_the_general_path_redoes_a_group(chunked):
    # The kernels report the first two chunks (16 columns), fail on the third, and the
    # general path redoes the group from its first column: the user's done stays monotone.
    G = np.ones((6, 23), dtype=np.float32)
    G[2, 17] = np.nan  # the third chunk's
    calls = []
    with pytest.raises(FactorizationError, match=r"G\[2, 17\]"):
        StaticIHVP(
            G, damp=1.0, block_size=4, check_finite=False, progress=lambda *a: calls.append(a)
        )
    done = [c[0] for c in calls]
    assert done[:2] == [8, 16] and done[-1] == 20  # the general path went on past 16
    assert done == sorted(done)


def _warned_kappa(caught):
    assert [w.category for w in caught] == [IllConditionedWarning]
    return float(str(caught[0].message).split("kappa >= ")[1].split(",")[0])


def test_hopeless_warning_and_lower_bound(chunked, rng):
    G = rng.standard_normal((6, 24))
    # Block 1 is exactly rank one, S_1 = s 11^T (s = 2^-40, every product exact), so
    # lambda_min(F_1) = damp and kappa_1 = 1 + 4 s / damp = 1 + 2^53: hopeless, yet
    # F_1's pivots (damp's share, 2^-51 of s) stay positive in float64.
    G[:, 4:8] = 2.0**-20
    s, damp = 2.0**-40, 2.0**-91
    kappa = 1 + 4 * s / damp
    with warnings.catch_warnings(record=True) as new:
        warnings.simplefilter("always")
        StaticIHVP(G, damp=damp, block_size=4)
    with warnings.catch_warnings(record=True) as old:
        warnings.simplefilter("always")
        _general(G, damp=damp, block_size=4)
    # Both bounds lie between 0.75 kappa (the exact 1 / max_j (F_1^{-1})_jj below) and
    # kappa: F_1's last pivot is damp's share of s, known to about eps s / damp = 1/2 of
    # itself, so the two set-ups' roundings need not agree closer (printed to 3 digits).
    for lo_warned in (_warned_kappa(new), _warned_kappa(old)):
        assert 0.75 * kappa * (1 - 1e-2) <= lo_warned <= kappa * (1 + 1e-2)
    out = np.empty((6, 4, 4))
    lo, hi = _dense_blocks.fill_block_inverses(G, BlockGroup(0, 6, 4), out, damp=damp)
    assert kappa * (1 - 1e-12) <= hi
    assert lo <= kappa * (1 + 1e-6)
    # The power iterations find lambda_max(S_1) = 4 s (its largest diagonal entry is a
    # quarter of it); 1 / max_j (F_1^{-1})_jj bounds lambda_min(F_1) at damp / (3/4).
    assert lo >= 0.75 * kappa * (1 - 1e-6)


def test_hopeless_cluster_beside_the_largest_column_warns_on_both_paths(chunked, rng):
    # Each block of 8 columns: column 0 orthogonal to 7 nearly collinear ones of a slightly
    # smaller norm, so e_0, the start of the power iterations at S_b's largest diagonal
    # entry, is an eigenvector of lambda_max(S_b) / 7. Regression: kappa = 5.4e14 (eps kappa
    # = 0.12) was estimated from that eigenvalue as 3.3e13, below the dense rule's 1/32 (1.4e14),
    # and did not warn.
    from mfac_core.testing import condition_number

    m, s = 12, 8
    blocks = []
    for _ in range(2):
        u = rng.standard_normal(m)
        u /= np.linalg.norm(u)
        Gb = u[:, None] + 1e-7 * rng.standard_normal((m, s))
        w = rng.standard_normal(m)
        w -= (w @ u) * u
        Gb[:, 0] = 1.01 * w / np.linalg.norm(w)
        blocks.append(Gb)
    G = np.hstack(blocks)
    top = max(float(np.linalg.eigvalsh(b.T @ b / m)[-1]) for b in blocks)
    damp = top / 1.2e15
    kappa = condition_number(G, damp, block_size=s)
    assert 2.0**-52 * kappa >= 1 / 16
    for build in (StaticIHVP, _general):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build(G, damp=damp, block_size=s)
        # The bound is lambda_max(F_b) over max_j (F_b^{-1})_jj's bound of lambda_min.
        assert kappa / 4 <= _warned_kappa(caught) <= kappa * 1.01


@pytest.mark.parametrize("xp_name", ["numpy", "torch"])
@pytest.mark.parametrize("block_size", [None, 4])
def test_blocks_spanned_by_the_gradients_do_not_warn(rng, xp_name, block_size):
    # m = 20 gradients span each block of <= 8 coordinates: kappa(F_b) is about 10 for
    # any damp, and the dense inverse is exact to float32; the Woodbury-form estimate
    # 1 + lambda_max(S_b) / damp (here ~1e17) does not bound it from below.
    from mfac_core.testing import condition_number, dense_inverse

    G = rng.standard_normal((20, 8)).astype(np.float32)
    damp = 1e-17
    assert condition_number(G, damp, block_size=block_size) < 100
    Gx = G
    if xp_name == "torch":
        torch = pytest.importorskip("torch")
        Gx = torch.from_numpy(G)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        op = StaticIHVP(Gx, damp=damp, block_size=block_size)
    Finv = dense_inverse(G, damp, block_size=block_size)
    x = G.mean(axis=0)
    y = np.asarray(op.matvec(Gx.mean(0) if xp_name == "torch" else x), dtype=np.float64)
    want = Finv @ x.astype(np.float64)
    eps = np.finfo(np.float32).eps
    assert np.linalg.norm(y - want) <= 8 * eps * np.linalg.norm(want)
    diag = np.asarray(op.diagonal(), dtype=np.float64)
    assert np.all(np.abs(diag - np.diag(Finv)) <= 8 * eps * np.diag(Finv))


def test_blocks_of_gradients_whose_squared_norms_overflow_are_refused_without_warning():
    # A block's Gram trace overflows before the set-up's check of G's squared norms:
    # the blocks' kappa bound must not warn (RuntimeWarning, an error here) ahead of
    # that check's ValueError.
    G = np.random.default_rng(0).standard_normal((8, 16)) * 2.0**510.25
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="squared norms"):
            StaticIHVP(G, damp=1e304, block_size=4)


def test_serves_only_numpy_dense_blocks():
    G = np.ones((4, 12), dtype=np.float32)
    xp = array_api_compat.array_namespace(G)
    assert _dense_blocks.serves(xp, G, BlockGroup(0, 3, 4))
    assert not _dense_blocks.serves(xp, G, BlockGroup(0, 2, 6))  # wider than m: Woodbury
    assert not _dense_blocks.serves(xp, G.astype(np.complex64), BlockGroup(0, 3, 4))


needs_kernels = pytest.mark.skipif(
    not _fused.supports_blocks(np.ones((1, 1), np.float32)),
    reason="the C extension's dense blocks' kernels were not built",
)


def _isas():
    best = _fused.ISAS[_fused.best_isa()] if _fused.available() else 0
    return [name for name, code in _fused.ISAS.items() if code <= best]


def _assert_block_factors(G, out, diag, s, count, damp, isa):
    """block_factors of ``count`` blocks of ``s`` columns from column 3 against LAPACK's."""
    m = G.shape[0]
    done = _fused.block_factors(G, out, diag, start=3, scale=1.0 / m, damp=damp, isa=isa)
    assert done == count
    G64 = G.astype(np.float64)
    for b in range(count):
        Gb = G64[:, 3 + b * s : 3 + (b + 1) * s]
        S = Gb.T @ Gb / m
        L = np.linalg.cholesky(S + damp * np.eye(s))
        # kappa(F_b) <= 1 + trace(S) / damp (at most about 40 in these tests): errors of
        # eps64 * kappa relative to |L|.
        np.testing.assert_allclose(out[b], L, rtol=0, atol=1e-13 * np.linalg.norm(L, 2))
        np.testing.assert_allclose(diag[b], np.diag(S), rtol=1e-14)
        assert not np.any(np.triu(out[b], 1))


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("order", ["C", "F"])
def test_kernels_match_the_oracle(rng, isa, order):
    # Blocks of 21 columns (padded to 32 inside) from 40 rows, starting at column 3.
    m, s, count = 40, 21, 3
    G = np.asarray(rng.standard_normal((m, 3 + count * s + 2)).astype(np.float32), order=order)
    damp = 0.5
    out, diag = np.full((count, s, s), np.nan), np.full((count, s), np.nan)
    _assert_block_factors(G, out, diag, s, count, damp, isa)
    _fused.block_inverses(out, isa=isa)
    for b in range(count):
        Gb = G.astype(np.float64)[:, 3 + b * s : 3 + (b + 1) * s]
        want = _oracle_Linv(Gb, 0, s, damp)
        np.testing.assert_allclose(out[b], want, rtol=0, atol=1e-13 * np.linalg.norm(want, 2))


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_narrow_kernels_match_the_oracle(rng, isa, order, dtype):
    # Blocks of up to 15 columns (7 without AVX2) go a group of 64 columns at a time,
    # widened 512 rows at a time: whole and ragged groups (count past a multiple of 64 // s),
    # G of one and of two row panels, widths at and past the vectors' (2, 4 and 8 doubles),
    # the limits (7, 15) and the first past them (8, 16: the register tiles).
    if dtype == "bfloat16":  # NumPy's is ml_dtypes'
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    damp = 0.5
    shapes = [(40, 1), (40, 3), (600, 2), (40, 5), (600, 7), (40, 8), (600, 11), (40, 15)]
    for m, s in [*shapes, (40, 16)]:
        count = 64 // s + 3
        G = rng.standard_normal((m, 3 + count * s + 2)).astype(dtype)
        G = np.asarray(G, order=order)
        out, diag = np.full((count, s, s), np.nan), np.full((count, s), np.nan)
        _assert_block_factors(G, out, diag, s, count, damp, isa)


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
def test_narrow_kernels_stop_at_the_failing_block_of_a_group(isa):
    G = np.ones((8, 40), dtype=np.float32)  # twenty blocks of 2, one group: rank one each
    G[3, 11] = np.nan  # block 5's
    out, diag = np.zeros((20, 2, 2)), np.zeros((20, 2))
    done = _fused.block_factors(G, out, diag, start=0, scale=1.0 / 8, damp=1.0, isa=isa)
    assert done == 5
    np.testing.assert_allclose(
        out[:5], np.broadcast_to([[2**0.5, 0], [2**-0.5, 1.5**0.5]], (5, 2, 2))
    )
    assert not np.any(out[6:]) and not np.any(diag[6:])  # later blocks of the group untouched


@needs_kernels
@pytest.mark.parametrize("bad", [np.nan, np.inf, "pivot"])
def test_kernels_stop_at_the_failing_block(bad):
    G = np.ones((8, 12), dtype=np.float64)  # three blocks of 4: rank one each
    if bad == "pivot":
        damp = -1.0  # F_1 = 11^T - I has a negative pivot
    else:
        damp = 1.0
        G[3, 5] = bad
    out, diag = np.zeros((3, 4, 4)), np.zeros((3, 4))
    done = _fused.block_factors(G, out, diag, start=0, scale=1.0 / 8, damp=damp)
    assert done == (0 if bad == "pivot" else 1)
    assert not np.any(out[done + 1 :])  # later blocks untouched


@pytest.fixture
def threaded(chunked):
    """Two threads on any work (tiny G)."""
    chunked.setattr(_dense_blocks, "_MIN_THREAD_WORK", 0)
    chunked.setenv("MFAC_CORE_NUM_THREADS", "2")
    return chunked


@needs_kernels
def test_threads_give_the_one_thread_result_and_progress_on_the_caller(threaded, rng):
    G = rng.standard_normal((6, 64)).astype(np.float32)
    results = []
    for threads in ("2", "1"):
        threaded.setenv("MFAC_CORE_NUM_THREADS", threads)
        seen, idents = [], set()

        def progress(n, seen=seen, idents=idents):
            seen.append(n)
            idents.add(threading.get_ident())

        out = np.empty((16, 4, 4))
        kappa = _dense_blocks.fill_block_inverses(
            G, BlockGroup(0, 16, 4), out, damp=0.1, progress=progress
        )
        assert sum(seen) == 64 and all(n % 8 == 0 and n > 0 for n in seen)
        assert idents == {threading.get_ident()}
        results.append((out, kappa))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


@needs_kernels
def test_an_error_in_any_chunk_stops_every_thread_and_is_raised(threaded, rng):
    G = rng.standard_normal((6, 64)).astype(np.float32)
    calls = []
    real = _dense_blocks._KernelBlocks.factor

    def factor(self, b0, b1):
        calls.append(b0)
        if b0 == 4:
            raise MemoryError("chunk 2")
        return real(self, b0, b1)

    threaded.setattr(_dense_blocks._KernelBlocks, "factor", factor)
    before = threading.active_count()
    with pytest.raises(MemoryError, match="chunk 2"):
        _dense_blocks.fill_block_inverses(G, BlockGroup(0, 16, 4), np.empty((16, 4, 4)), damp=0.1)
    assert threading.active_count() == before  # the helper was joined
    assert len(calls) < 8  # the others stopped at their next chunk


@needs_kernels
def test_a_failed_chunk_on_threads_goes_to_the_general_path(threaded):
    G = np.ones((6, 64), dtype=np.float32)
    G[2, 61] = np.nan  # the last chunk's
    assert (
        _dense_blocks.fill_block_inverses(G, BlockGroup(0, 16, 4), np.empty((16, 4, 4)), damp=1.0)
        is None
    )
    with pytest.raises(FactorizationError) as new:
        StaticIHVP(G, damp=1.0, block_size=4, check_finite=False)
    with pytest.raises(FactorizationError) as old:
        _general(G, damp=1.0, block_size=4, check_finite=False)
    assert str(new.value) == str(old.value)


def test_lapack_path_where_the_kernels_do_not_serve(chunked, rng, monkeypatch):
    # Without the extension (or its dense blocks' kernels), the blocks go through LAPACK on
    # the calling thread: the same factors to rounding, the same kappa bounds' meaning.
    G = rng.standard_normal((6, 23)).astype(np.float32)
    group = BlockGroup(0, 5, 4)
    out = np.empty((5, 4, 4))
    kappa = _dense_blocks.fill_block_inverses(G, group, out, damp=0.1)
    monkeypatch.setattr(_fused, "supports_blocks", lambda G: False)
    seen = []
    out2 = np.empty((5, 4, 4))
    kappa2 = _dense_blocks.fill_block_inverses(G, group, out2, damp=0.1, progress=seen.append)
    assert seen == [8, 8, 4]
    scale = max(np.linalg.norm(Linv, 2) for Linv in out2)
    np.testing.assert_allclose(out, out2, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(kappa, kappa2, rtol=1e-12)


@needs_kernels
def test_wide_blocks_go_through_lapack(rng, monkeypatch):
    # The kernels' factorisation and inverse are unblocked: past 256 columns LAPACK's
    # blocked calls are faster (1.3x at 512 x 512, 4.1x at 2048 x 2048 on one core), and
    # their BLAS threads pay.
    used = []
    for cls in (_dense_blocks._KernelBlocks, _dense_blocks._LapackBlocks):
        real = cls.factor

        def factor(self, b0, b1, real=real, cls=cls):
            used.append((cls.__name__, self.group.size))
            return real(self, b0, b1)

        monkeypatch.setattr(cls, "factor", factor)
    G = rng.standard_normal((300, 257)).astype(np.float32)
    for size in (256, 257):
        out = np.empty((1, size, size))
        assert _dense_blocks.fill_block_inverses(G, BlockGroup(0, 1, size), out, damp=1.0)
        want = _oracle_Linv(G.astype(np.float64), 0, size, 1.0)
        np.testing.assert_allclose(out[0], want, rtol=0, atol=1e-13 * np.linalg.norm(want, 2))
    assert used == [("_KernelBlocks", 256), ("_LapackBlocks", 257)]


@needs_kernels
def test_an_interrupt_is_not_lost_to_a_failed_chunk_of_another_thread(threaded, rng):
    # A helper's failed chunk (which sends the group to the general path) must not hide the
    # calling thread's KeyboardInterrupt (or any other error), whichever came first.
    G = rng.standard_normal((6, 64)).astype(np.float32)
    busy, failed, caller = threading.Event(), threading.Event(), threading.get_ident()

    def factor(self, b0, b1):
        if threading.get_ident() == caller:
            busy.set()
            assert failed.wait(5)
            time.sleep(0.02)  # the helper's failure is recorded first
            raise KeyboardInterrupt
        assert busy.wait(5)  # both threads in a chunk
        failed.set()
        raise _dense_blocks._Failed

    threaded.setattr(_dense_blocks._KernelBlocks, "factor", factor)
    with pytest.raises(KeyboardInterrupt):
        _dense_blocks.fill_block_inverses(G, BlockGroup(0, 16, 4), np.empty((16, 4, 4)), damp=0.1)
