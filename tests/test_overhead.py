"""The fixed cost of small calls: what a product or a window step must not pay per call.

At small d a product's passes take microseconds, and the calls around them decide its
time (benchmarks/overhead.py). These tests pin the cheap routes down: the float64
triangular solves of NumPy operators call LAPACK directly (bit for bit SciPy's result),
and a small pass of the C extension neither reads the environment nor starts a thread.
"""

from __future__ import annotations

import os
import pickle
import threading
import time

import numpy as np
import pytest
import scipy.linalg

from mfac_core import DynamicIHVP, SpectralIHVP, StaticIHVP, WindowOptions, _fused
from mfac_core._compat import array_namespace, cumulative_sum, take
from mfac_core._linalg import _numpy as numpy_linalg
from mfac_core._timing import other_threads_cpu_ms


def _factors(rng: np.random.Generator, n: int, batch: tuple[int, ...]) -> np.ndarray:
    """Lower Cholesky factors of random SPD matrices, shape ``batch + (n, n)``."""
    A = rng.standard_normal((*batch, n, n))
    spd = A @ np.swapaxes(A, -1, -2) + n * np.eye(n)
    return np.linalg.cholesky(spd)


@pytest.mark.parametrize("batch", [(), (1,), (3,), (2, 2)])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("trans", [False, True])
def test_numpy_solve_is_scipys_bit_for_bit(batch, order, lower, trans):
    # The direct LAPACK call must give SciPy's values and memory layout, whatever the
    # factor's order (SciPy solves a C-ordered one as its transpose).
    rng = np.random.default_rng(len(batch) + 2 * lower + 4 * trans)
    n = 7
    L = _factors(rng, n, batch)
    T = L if lower else np.swapaxes(L, -1, -2)
    T = np.asfortranarray(T) if order == "F" and not batch else T
    rhs = [rng.standard_normal((*batch, n, 3)), rng.standard_normal((*batch, n, 1))]
    if not batch:
        rhs.append(rng.standard_normal(n))
    for B in rhs:
        want = scipy.linalg.solve_triangular(
            T, B, lower=lower, trans=int(trans), check_finite=False
        )
        got = numpy_linalg.trtrs(T, B, lower, trans)
        assert got is not None
        assert got.shape == want.shape and got.strides == want.strides
        if B.ndim > 1 and B.shape[-1] > 1:  # a column at a time: each column's own solve
            want = np.concatenate(
                [
                    scipy.linalg.solve_triangular(
                        T, B[..., j : j + 1], lower=lower, trans=int(trans), check_finite=False
                    )
                    for j in range(B.shape[-1])
                ],
                axis=-1,
            )
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("many", ["columns", "work"])
def test_numpy_solve_for_many_columns_is_scipys_whole_solve(many):
    # Past ONE_THREAD_COLUMNS or ONE_THREAD_WORK the columns go to LAPACK together (BLAS's
    # threads pay then; a call per column would cost more).
    rng = np.random.default_rng(5)
    n = 16 if many == "columns" else 2100
    L = _factors(rng, 16, ()) if many == "columns" else np.eye(n) + np.tril(np.ones((n, n))) / n
    k = numpy_linalg.ONE_THREAD_COLUMNS + 1
    if many == "work":
        k = min(k - 1, numpy_linalg.ONE_THREAD_WORK // (n * n) + 1)
        assert n * n * k > numpy_linalg.ONE_THREAD_WORK
    B = rng.standard_normal((n, k))
    want = scipy.linalg.solve_triangular(L, B, lower=True, check_finite=False)
    got = numpy_linalg.trtrs(L, B, True, False)
    assert got.strides == want.strides
    np.testing.assert_array_equal(got, want)


def test_numpy_solve_leaves_other_systems_to_scipy():
    rng = np.random.default_rng(0)
    L = _factors(rng, 4, ())
    assert (
        numpy_linalg.trtrs(L.astype(np.float32), np.ones((4, 1), np.float32), True, False) is None
    )
    assert numpy_linalg.trtrs(L, np.ones((0, 1)), True, False) is None  # empty
    assert numpy_linalg.trtrs(L, np.ones((2, 4, 1)), True, False) is None  # broadcast
    assert numpy_linalg.trtrs(L[None], np.ones((4, 1)), True, False) is None


@pytest.mark.parametrize("shape", [(3,), (3, 2)])
def test_numpy_solve_of_a_singular_factor_raises_as_scipy(shape):
    T = np.eye(3)
    T[1, 1] = 0.0
    with pytest.raises(np.linalg.LinAlgError, match="singular matrix") as want:
        scipy.linalg.solve_triangular(T, np.ones(shape), lower=True, check_finite=False)
    with pytest.raises(np.linalg.LinAlgError) as got:
        numpy_linalg.trtrs(T, np.ones(shape), True, False)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_calls_take_no_scipy_solve_no_environment_and_no_thread(monkeypatch, dtype):
    rng = np.random.default_rng(1)
    m, d = 8, 300
    G = rng.standard_normal((m, d)).astype(dtype)
    x = rng.standard_normal(d).astype(dtype)
    g = rng.standard_normal(d).astype(dtype)
    op = StaticIHVP(G, damp=0.1)
    window = DynamicIHVP(m, d, damp=0.1, dtype=np.dtype(dtype).name)
    for row in G:
        window.update(row)
    twin = pickle.loads(pickle.dumps(window))
    want_y, want_s = op @ x, twin.update_and_matvec(g)

    def refused(*args, **kwargs):
        raise AssertionError("a small call paid for this")

    monkeypatch.setattr(scipy.linalg, "solve_triangular", refused)
    monkeypatch.setattr(threading.Thread, "start", refused)
    monkeypatch.setattr(_fused, "max_threads", refused)
    np.testing.assert_array_equal(op @ x, want_y)
    np.testing.assert_array_equal(window.update_and_matvec(g), want_s)


def test_factors_pickle_after_their_namespace_was_found():
    # The factors find their namespace (a module) once and keep it: pickles and deep
    # copies must leave it out, and find it again.
    rng = np.random.default_rng(2)
    G = rng.standard_normal((4, 50)).astype(np.float32)
    x = rng.standard_normal(50).astype(np.float32)
    for op in (StaticIHVP(G, damp=0.1), StaticIHVP(G, damp=0.1, block_size=3)):
        y = op @ x  # every factor has its namespace now
        assert all("xp" in f.__dict__ for f in op._factors)
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(op)) @ x, y)


@pytest.mark.parametrize("lib", ["numpy", "torch", "array_api_strict"])
def test_take_gathers_as_the_namespaces_take(lib):
    mod = pytest.importorskip(lib)
    xp = array_namespace(mod.asarray([0.0]))
    x = xp.reshape(xp.arange(12, dtype=xp.float64), (4, 3))
    for axis, idx in ((0, [3, 0, 0, 2]), (1, [2, 0])):
        i = xp.asarray(idx, dtype=xp.int64)
        got, want = take(xp, x, i, axis=axis), xp.take(x, i, axis=axis)
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
        assert bool(xp.all(got == want))
    if lib == "torch":  # PyTorch's own call refuses a negative index: never a wrong row
        with pytest.raises((IndexError, RuntimeError)):
            take(xp, x, xp.asarray([-1], dtype=xp.int64), axis=0)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_window_edit_step_takes_no_compat_gather_and_no_stack(monkeypatch, lib):
    # The steady-state step of a host window (a row edit, no refactorisation) gathers by
    # the library's own call and reads its checks without stacking them (the wrappers'
    # Python layers were most of a small step's time).
    mod = pytest.importorskip(lib)
    compat = pytest.importorskip(f"array_api_compat.{lib}")
    rng = np.random.default_rng(3)
    m, d = 6, 40
    G = rng.standard_normal((m + 2, d))
    ops = [
        DynamicIHVP(
            m, d, damp=0.1, dtype="float64", xp=mod, options=WindowOptions(refactor_every=99)
        )
        for _ in range(2)
    ]
    for op in ops:
        for row in G[:-1]:
            op.update(mod.asarray(row))
    want = ops[0].update_and_matvec(mod.asarray(G[-1]))

    def refused(*args, **kwargs):
        raise AssertionError("the step paid for a wrapper")

    monkeypatch.setattr(compat, "take", refused)
    monkeypatch.setattr(compat, "stack", refused)
    count = ops[1].refactor_count
    got = ops[1].update_and_matvec(mod.asarray(G[-1]))
    assert ops[1].refactor_count == count  # an edit, not a refactorisation
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("lib", ["numpy", "array_api_strict"])
@pytest.mark.parametrize("include_initial", [False, True])
def test_cumulative_sum_is_the_namespaces_bit_for_bit(lib, include_initial):
    mod = pytest.importorskip(lib)
    xp = array_namespace(mod.asarray([0.0]))
    x = xp.asarray(np.random.default_rng(4).standard_normal(9) ** 2)
    got = cumulative_sum(xp, x, include_initial=include_initial)
    want = xp.cumulative_sum(x, include_initial=include_initial)
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# -- PyTorch's intra-op team (docs/guidance.rst, "CPU threads") ---------------------------------


def _others_cpu_ms(calls) -> float:
    """CPU ms of the threads that outlive ``calls``, each followed by 30 ms of sleep.

    A woken OpenMP team spins (libgomp's default waits about 5-10 ms), then sleeps.
    """
    spent = other_threads_cpu_ms(calls, pause=0.03)
    assert spent is not None  # Linux: checked by the caller
    return spent


def test_pytorch_cpu_operators_leave_pytorchs_intra_op_team_asleep():
    # A PyTorch operation on the team (a reduction over x, a 64 x 64 x 2 product, a solve
    # for two right-hand sides) wakes it; its threads then spin on the cores that the
    # passes' threads want, 3-6 ms of a 10**6-entry product on 2 cores
    # (benchmarks/torch_cpu.py). The library does that small work with NumPy and SciPy on
    # the calling thread instead.
    torch = pytest.importorskip("torch")
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux's per-thread CPU counters")
    if not _fused.available():
        # Without the C extension the passes are PyTorch's own float64 products of column
        # pieces (docs/design.rst), which run on its team by design.
        pytest.skip("the C extension mfac_core._fused._passes was not built")
    threads = torch.get_num_threads()  # 1 in a parallel test worker (conftest.py)
    torch.set_num_threads(max(2, threads))  # a team of 2 at least, as on any multi-core CPU
    try:
        _check_pytorchs_team_stays_asleep(torch)
    finally:
        torch.set_num_threads(threads)


def _check_pytorchs_team_stays_asleep(torch) -> None:
    wake = torch.ones(2**20, dtype=torch.float32)
    woken = _others_cpu_ms([lambda: wake + 1.0] * 10)
    if woken < 30.0:  # OMP_WAIT_POLICY=passive, or a team that never spins: nothing to see
        pytest.skip(f"PyTorch's team does not spin after a call here ({woken:.0f} ms)")
    # m = 64: PyTorch multiplies a 64 x 64 x 2 product and solves two right-hand sides
    # on its team (at m = 8 it need not); d: more entries than PyTorch's grain.
    m, d = 64, 2**15
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(m + 8, d, generator=gen)
    X = torch.randn(d, 3, generator=gen)
    xp = array_namespace(G)
    op, spectral = StaticIHVP(G[:m], damp=0.1), SpectralIHVP(G[:m], damp=0.1)
    windows = [DynamicIHVP(m, d, damp=0.1, dtype=dt, xp=xp) for dt in ("float32", "bfloat16")]
    # A window that refactorises at every update (its Cholesky factor and kappa bounds).
    windows.append(
        DynamicIHVP(m, d, damp=0.1, dtype="float32", xp=xp, options=WindowOptions(refactor_every=0))
    )
    for window in windows:
        for row in G[:m]:  # a full window: its steps edit a row of the factor
            window.update(row)
    filling = DynamicIHVP(m, d, damp=0.1, dtype="float32", xp=xp)
    filling.update(G[0])
    calls = [lambda: op @ G[0], lambda: op @ X, lambda: op.T @ X, lambda: spectral @ X]
    calls += [lambda: filling.update(G[m + 1]), lambda: windows[0].set_damp(0.2)]
    for window in windows:
        calls += [lambda w=window: w.update_and_matvec(G[m]), lambda w=window: w.update(G[2])]
        calls += [lambda w=window: w @ X]
    for call in calls:
        call()  # first calls: anything made once
    time.sleep(0.2)  # whatever the set-up woke (OpenBLAS's threads spin 0.1 s) sleeps
    spent = _others_cpu_ms(calls * 2)
    # Each wake costs 5-10 ms of spinning here (``woken`` / 10); a clock tick is 10 ms.
    assert spent < max(30.0, woken / 2), (spent, woken)


@pytest.mark.parametrize("block_size", [None, 25])
def test_pytorch_cpu_results_stay_on_the_cpu_under_a_default_device(block_size):
    # Results that NumPy computed come back on the operands' device, not PyTorch's
    # default one (``torch.device("meta")`` here: a result there has no values).
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(1)
    G, X = torch.randn(8, 100, generator=gen), torch.randn(100, 3, generator=gen)
    op = StaticIHVP(G, damp=0.1, block_size=block_size)
    window = DynamicIHVP(8, 100, damp=0.1, dtype="float32", xp=array_namespace(G))
    for row in G:
        window.update(row)
    want = [op @ X, op @ X[:, 0], window @ X]
    with torch.device("meta"):
        got = [op @ X, op @ X[:, 0], window @ X]
    for y, w in zip(got, want, strict=True):
        assert y.device.type == "cpu"
        torch.testing.assert_close(y, w, rtol=0, atol=0)


# PyTorch's forward-mode AD scripts some of its helpers with torch.jit, which 2.13 deprecates.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_pytorch_forward_mode_tangents_are_not_dropped_by_the_host_routes():
    # A dual tensor of forward-mode AD does not require grad; NumPy views of it would
    # drop its tangent. The operators are linear: the tangent along X is A @ X itself.
    torch = pytest.importorskip("torch")
    forward_ad = pytest.importorskip("torch.autograd.forward_ad")
    gen = torch.Generator().manual_seed(2)
    G = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    X = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    window = DynamicIHVP(8, 40, damp=1e-2, dtype="float64", xp=array_namespace(G))
    for row in G:
        window.update(row)
    ops = [
        StaticIHVP(G, damp=1e-2),
        StaticIHVP(G, damp=1e-2, block_size=10),
        SpectralIHVP(G, damp=1e-2),
        window,
    ]
    for op in ops:
        want = op @ X
        with forward_ad.dual_level():
            primal, tangent = forward_ad.unpack_dual(op @ forward_ad.make_dual(X, X))
        assert tangent is not None, type(op).__name__
        scale = float(torch.linalg.norm(want))  # normwise: an entry may cancel to zero
        assert float(torch.linalg.norm(primal - want)) <= 1e-12 * scale, type(op).__name__
        assert float(torch.linalg.norm(tangent - want)) <= 1e-12 * scale, type(op).__name__


def test_the_simulated_device_route_checks_finiteness_as_a_gpu_does():
    # Where CPU tensors stand for a GPU's (the tests' device path), the finiteness check
    # takes a GPU tensor's route (one reduction, one read), not the host's NumPy view.
    pytest.importorskip("torch")
    import torch
    from _counting import counting, device_path

    gen = torch.Generator().manual_seed(3)
    G, x = torch.randn(8, 100, generator=gen), torch.randn(100, generator=gen)
    op = StaticIHVP(G, damp=0.1)
    with device_path(), counting() as count:
        op @ x
    assert count.names["aminmax"] >= 1, count.names
