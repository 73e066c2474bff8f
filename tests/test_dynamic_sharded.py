"""ShardedDynamicIHVP: against the unsharded DynamicIHVP and the oracle.

Every rank holds its columns of the window; the m x m state must stay the same
bits on every rank, every reduction is counted, and an error on one rank is an
error on every rank that leaves every window as it was. Threads
(``run_spmd_threads``) run the many cases; gloo processes (``tests/_spmd.py``) a
few, with TorchComm.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
from conftest import check_product_overflowing_on_rank_0
from hypothesis import given, settings
from hypothesis import strategies as st

from mfac_core import (
    DynamicIHVP,
    FactorizationError,
    IllConditionedWarning,
    ShardedDynamicIHVP,
    WindowOptions,
)
from mfac_core.distributed import CommCall, Communicator, CountingComm
from mfac_core.testing import SpectralOracle, assert_close, condition_number, run_spmd_threads


def _starts(widths: list[int]) -> list[int]:
    return [sum(widths[:r]) for r in range(len(widths) + 1)]


def _even_widths(d: int, size: int) -> list[int]:
    return [d // size + (r < d % size) for r in range(size)]


def _ok(results: list[Any]) -> list[Any]:
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _kappa(G: np.ndarray, damp: float) -> float:
    if G.shape[0] == 0:
        return 1.0
    return 1.0 + float(np.linalg.norm(G, 2)) ** 2 / (G.shape[0] * damp)


def _replicated(state: dict[str, Any]) -> dict[str, Any]:
    """The parts of a state_dict that every rank holds alike."""
    return {k: v for k, v in state.items() if k not in ("grads", "dim", "shard_rank")}


def _assert_same_replicated(states: list[dict[str, Any]]) -> None:
    first = _replicated(states[0])
    for state in states[1:]:
        other = _replicated(state)
        assert other.keys() == first.keys()
        for key, value in first.items():
            if isinstance(value, np.ndarray):
                assert value.tobytes() == other[key].tobytes(), key  # bit for bit
            else:
                assert value == other[key], key


# -- many sequences of operations on threads, against the unsharded operator ------------------


@st.composite
def _scenarios(draw: Any) -> dict[str, Any]:
    size = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(0, 9), min_size=size, max_size=size))
    if sum(widths) == 0:
        widths[0] = 1
    ops = draw(
        st.lists(
            st.sampled_from(["update", "step", "remove", "matvec", "matmat", "damp"]),
            min_size=1,
            max_size=14,
        )
    )
    return {
        "widths": widths,
        "m": draw(st.integers(1, 5)),
        "dtype": draw(st.sampled_from(["float64", "float32"])),
        "zero_init": draw(st.booleans()),
        "method": draw(st.sampled_from(["incremental", "refactor"])),
        "refine": draw(st.integers(0, 1)),
        "ops": ops,
        "seed": draw(st.integers(0, 2**16)),
    }


def _play(op: DynamicIHVP, sc: dict[str, Any], lo: int, hi: int) -> list[Any]:
    """Run the scenario's operations on ``op`` (columns lo:hi); return what they give."""
    rng = np.random.default_rng(sc["seed"])
    d = sum(sc["widths"])
    dtype = np.dtype(sc["dtype"])
    out: list[Any] = []
    for name in sc["ops"]:
        g = rng.standard_normal(d).astype(dtype)
        X = rng.standard_normal((d, 2)).astype(dtype)
        pick = int(rng.integers(0, 1000))
        damp = float(rng.uniform(0.2, 1.0))
        if name == "update":
            op.update(g[lo:hi])
        elif name == "step":
            out.append(("step", op.update_and_matvec(g[lo:hi])))
        elif name == "remove" and len(op):
            op.remove(op.slots[pick % len(op)])
        elif name == "matvec":
            out.append(("matvec", op.matvec(X[lo:hi, 0])))
        elif name == "matmat":
            out.append(("matmat", op.matmat(X[lo:hi])))
        elif name == "damp":
            op.set_damp(damp)
    return out


@settings(max_examples=40)
@given(sc=_scenarios())
def test_threads_match_the_unsharded_operator(sc: dict[str, Any]) -> None:
    widths, m = sc["widths"], sc["m"]
    starts = _starts(widths)
    d = starts[-1]
    options = {
        "damp": 0.5,
        "dtype": sc["dtype"],
        "options": WindowOptions(
            zero_init=sc["zero_init"],
            refactor_every=0 if sc["method"] == "refactor" else None,
            refine=sc["refine"],
        ),
    }

    def rank(comm: Communicator) -> tuple[Any, ...]:
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        op = ShardedDynamicIHVP(m, hi - lo, comm=comm, **options)
        out = _play(op, sc, lo, hi)
        return out, op.state_dict(), op.window(), op.slots, op.refactor_count

    results = _ok(run_spmd_threads(rank, len(widths)))
    ref = DynamicIHVP(m, d, **options)
    want = _play(ref, sc, 0, d)
    window = np.asarray(ref.window(), dtype=np.float64)
    for r in results:
        assert r[3] == ref.slots
        assert r[4] == ref.refactor_count  # the same refactorisation decisions
    _assert_same_replicated([r[1] for r in results])
    # The gathered window is the unsharded one exactly; the Gram to rounding.
    gathered = np.concatenate([r[2] for r in results], axis=1)
    np.testing.assert_array_equal(gathered, ref.window())
    kappa = _kappa(window, ref.damp)
    gram = results[0][1]["gram"]
    assert_close(gram, ref.state_dict()["gram"], factor=4.0 * d, dtype=sc["dtype"], atol=1e-300)
    for i, (kind, y) in enumerate(want):
        got = np.concatenate([r[0][i][1] for r in results], axis=0)
        assert results[0][0][i][0] == kind
        assert_close(got, y, kappa=kappa, dtype=sc["dtype"], factor=64.0 * max(d, 1))
    # And the final operator against the dense float64 oracle.
    x = np.random.default_rng(1).standard_normal(d)
    rows = list(window)
    if sc["zero_init"]:
        rows = [np.zeros(d)] * (m - len(rows)) + rows
    G = np.array(rows, dtype=np.float64).reshape(len(rows), d)
    oracle = SpectralOracle(G, ref.damp).matvec(x) if G.shape[0] else x / ref.damp

    def product(comm: Communicator, state: dict[str, Any]) -> np.ndarray:
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        op = ShardedDynamicIHVP(m, hi - lo, comm=comm, **{**options, "damp": state["damp"]})
        op.load_state_dict(state)
        return op.matvec(x[lo:hi].astype(sc["dtype"]))

    states = [r[1] for r in results]

    def loaded(comm: Communicator) -> np.ndarray:
        return product(comm, states[comm.rank])

    y = np.concatenate(_ok(run_spmd_threads(loaded, len(widths))))
    assert_close(y, oracle, kappa=kappa, dtype=sc["dtype"], factor=64.0 * max(d, 1))


# -- what crosses the wire -------------------------------------------------------------------


def test_each_operation_costs_one_reduction_of_the_stated_size() -> None:
    m, d, size = 6, 40, 3
    widths = _even_widths(d, size)
    starts = _starts(widths)
    rng = np.random.default_rng(0)
    gs = rng.standard_normal((3 * m, d))
    X = rng.standard_normal((d, 3))

    def rank(comm: Communicator) -> dict[str, list[CommCall]]:
        counting = CountingComm(comm)
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        seen: dict[str, list[CommCall]] = {}

        def record(name: str, call: Any) -> None:
            counting.reset()
            call()
            seen.setdefault(name, []).extend(counting.calls)

        op = ShardedDynamicIHVP(m, hi - lo, damp=0.1, dtype="float64", comm=counting)
        for g in gs:  # fills the window, then replaces (incremental edits)
            record("step", lambda g=g: op.update_and_matvec(g[lo:hi]))
            record("update", lambda g=g: op.update(g[lo:hi]))
        record("matvec", lambda: op.matvec(X[lo:hi, 0]))
        record("matmat", lambda: op.matmat(X[lo:hi]))
        record("remove", lambda: op.remove(op.slots[2]))
        record("set_damp", lambda: op.set_damp(0.2))
        op.refine = 1
        record("refined matvec", lambda: op.matvec(X[lo:hi, 0]))
        return seen

    for seen in _ok(run_spmd_threads(rank, size)):
        f64 = "float64"
        S = 20  # the status word: failed ranks per exception class, two digests
        assert seen["step"] == [CommCall((m + S,), f64, 8 * (m + S))] * len(gs)
        assert seen["update"] == [CommCall((m + S,), f64, 8 * (m + S))] * len(gs)
        assert seen["matvec"] == [CommCall((m + S,), f64, 8 * (m + S))]
        # matmat: the status word alone first (X checked, k compared between the ranks).
        assert seen["matmat"] == [
            CommCall((S,), f64, 8 * S),
            CommCall((3 * m + S,), f64, 8 * (3 * m + S)),
        ]
        assert seen["remove"] == [CommCall((size + S,), f64, 8 * (size + S))]
        assert seen["set_damp"] == [CommCall((size + S,), f64, 8 * (size + S))]
        # The product, then per step a residual and a product without status word.
        assert [c.shape for c in seen["refined matvec"]] == [(m + S,), (m,), (m,)]


def test_strict_step_decides_through_the_callers_reduction() -> None:
    """A strict step (MFAC(errors="raise")) asks the caller's collective (``agree``) whether
    its product is finite, before the commit: no reduction of its own beside the row's;
    refused, the window is as it was; accepted, the product is the plain step's, bit for bit."""
    from mfac_core._dynamic_window import update_and_matvec_finite

    m, d, size = 3, 20, 2
    starts = _starts(_even_widths(d, size))
    gs = np.random.default_rng(4).standard_normal((m + 2, d))

    def rank(comm: Communicator) -> Any:
        counting = CountingComm(comm)
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        strict, plain = (
            ShardedDynamicIHVP(m, hi - lo, damp=0.1, dtype="float64", comm=counting)
            for _ in range(2)
        )
        for g in gs[:-1]:
            strict.update(g[lo:hi])
            plain.update(g[lo:hi])
        before = strict.state_dict()
        g = gs[-1][lo:hi]
        seen: list[Any] = []
        counting.reset()
        refused = update_and_matvec_finite(strict, g, agree=lambda s: seen.append(s) or False)
        calls = [c.shape for c in counting.calls]
        after = strict.state_dict()
        counting.reset()
        s = update_and_matvec_finite(strict, g, agree=lambda s: True)
        accepted = [c.shape for c in counting.calls]
        want = plain.update_and_matvec(g)
        counting.reset()
        own = update_and_matvec_finite(plain, gs[0][lo:hi])  # no agree: a flag reduced
        return (
            refused,
            seen,
            calls,
            before,
            after,
            (s, want, accepted),
            own,
            [c.shape for c in counting.calls],
        )

    for refused, seen, calls, before, after, step, own, flagged in _ok(
        run_spmd_threads(rank, size)
    ):
        assert refused is None and len(seen) == 1 and calls == [(m + 20,)]
        assert before.keys() == after.keys()
        for key, value in before.items():
            np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(value), err_msg=key)
        s, want, accepted = step
        np.testing.assert_array_equal(s, want)
        assert accepted == [(m + 20,)]
        assert own is not None and flagged == [(m + 20,), (1,)]


def test_strict_step_leaves_finiteness_to_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``agree`` decides (a sharded strict step), the product is not also read for
    a local finiteness it would override: while the window fills, on a row edit and at a
    refactorisation; the products are the plain steps', bit for bit."""
    from mfac_core import _host_rows
    from mfac_core._dynamic_window import update_and_matvec_finite

    m, d, size = 3, 20, 2
    starts = _starts(_even_widths(d, size))
    gs = np.random.default_rng(5).standard_normal((3 * m, d))
    read: list[Any] = []
    all_finite = _host_rows.all_finite

    def counted(xp: Any, s: Any) -> Any:
        read.append(s)
        return all_finite(xp, s)

    monkeypatch.setattr(_host_rows, "all_finite", counted)
    options = WindowOptions(refactor_every=2)

    def rank(comm: Communicator) -> Any:
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        strict, plain = (
            ShardedDynamicIHVP(m, hi - lo, damp=0.1, dtype="float64", comm=comm, options=options)
            for _ in range(2)
        )
        steps = []
        for g in gs:
            s = update_and_matvec_finite(strict, g[lo:hi], agree=lambda s: True)
            steps.append((s, plain.update_and_matvec(g[lo:hi])))
        return steps

    for steps in _ok(run_spmd_threads(rank, size)):
        for s, want in steps:
            np.testing.assert_array_equal(s, want)
            assert not any(r is s for r in read)


def test_nearly_collinear_rows_are_exact_in_one_reduction() -> None:
    # Nearly collinear float32 gradients, their differences below float32's resolution of
    # the Gram: each rank's row is summed in float64 (docs/mathematics.rst, "Exact
    # passes"), so the reduced row is exact and every update is one reduction of m + 20
    # numbers, on every rank alike (a rank without columns included).
    m, d, damp = 8, 120, 1e-2
    rng = np.random.default_rng(3)
    base = rng.standard_normal(d) * 1e3
    gs = [(base * (1 + 1e-6 * rng.standard_normal(d))).astype(np.float32) for _ in range(2 * m)]
    starts = _starts([60, 0, 60])
    size = 3

    def rank(comm: Communicator) -> tuple[list[list[tuple[int, ...]]], Any, Any]:
        counting = CountingComm(comm)
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        op = ShardedDynamicIHVP(m, hi - lo, damp=damp, dtype="float32", comm=counting)
        shapes = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IllConditionedWarning)
            for g in gs:
                counting.reset()
                op.update(g[lo:hi])
                shapes.append([c.shape for c in counting.calls])
        return shapes, op.state_dict(), op.slots

    results = _ok(run_spmd_threads(rank, size))
    _assert_same_replicated([r[1] for r in results])
    shapes = results[0][0]
    assert all(r[0] == shapes for r in results)
    assert all(s == [(m + 20,)] for s in shapes)
    # The stored Gram is the float64 Gram of the stored gradients.
    G = np.array([g.astype(np.float64) for g in gs[-m:]])
    slots = results[0][2]
    gram = results[0][1]["gram"][np.ix_(slots, slots)]
    np.testing.assert_allclose(gram, G @ G.T, rtol=1e-12)


@pytest.mark.parametrize(("dtype", "big"), [("float64", 1e308), ("float32", 3e38)])
@pytest.mark.parametrize("warning", ["ignore", "error"])
@pytest.mark.parametrize("method", ["matvec", "matmat"])
def test_refinement_of_a_product_that_overflows_on_one_rank_only(
    dtype: str, big: float, warning: str, method: str
) -> None:
    # Rank 0's shard of F^-1 x is beyond the dtype's range, rank 1's is finite: rank 0
    # stopped before refining and rank 1 waited in the residual's reduction (a hang), or,
    # with warnings as errors, rank 0 raised in the middle of the call. Every rank now
    # learns it from the residual's reduced G Y and keeps its product, as the
    # single-process window keeps its finite coordinates; the warning is said at the end.
    G = (np.random.default_rng(3).standard_normal((3, 6)) * 0.01).astype(dtype)
    x = np.array([big] * 3 + [1.0] * 3, dtype=dtype)
    options = WindowOptions(refine=1)

    def fn(comm: Communicator) -> np.ndarray:
        s = slice(3 * comm.rank, 3 * comm.rank + 3)
        op = ShardedDynamicIHVP(3, 3, comm=comm, damp=0.5, dtype=dtype, options=options)
        for g in G:
            op.update(g[s])
        return op.matvec(x[s]) if method == "matvec" else op.matmat(x[s, None])[:, 0]

    single = DynamicIHVP(3, 6, damp=0.5, dtype=dtype, options=options)
    for g in G:
        single.update(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = single.matvec(x)
    check_product_overflowing_on_rank_0(
        fn, want, dtype=dtype, warning=warning, kappa=condition_number(G.astype(np.float64), 0.5)
    )


def test_a_nan_on_one_rank_is_no_overflow_on_the_others() -> None:
    # Unchecked, rank 0's NaN reaches rank 1's shard through the reduction; rank 1 took it
    # for an overflow of its own and raised its warning (an error in this suite) in the
    # middle of the refined call, while rank 0 waited in the residual's reduction.
    G = np.random.default_rng(0).standard_normal((3, 6))
    options = WindowOptions(check_finite=False, refine=1)

    def fn(comm: Communicator) -> np.ndarray:
        s = slice(3 * comm.rank, 3 * comm.rank + 3)
        op = ShardedDynamicIHVP(3, 3, comm=comm, damp=0.5, dtype="float64", options=options)
        for g in G:
            op.update(g[s])
        return op.matvec(np.full(3, np.nan if comm.rank == 0 else 1.0))

    results = run_spmd_threads(fn, 2, timeout=10)
    assert all(isinstance(r, np.ndarray) and np.all(np.isnan(r)) for r in results), results


def test_row_edits_bound_kappa_alike_on_every_rank() -> None:
    # Gradients u, -u, u, ... (|u|^2 = 1e10 m damp each, short of the warning alone) make
    # the window hopeless with the third; a full window's row edit bounds kappa from the
    # reduced Gram row, so every rank decides alike, and as the unsharded window does.
    m, d, damp = 8, 24, 1e-2
    rng = np.random.default_rng(5)
    base = rng.standard_normal(d)
    base *= (1e10 * m * damp) ** 0.5 / np.linalg.norm(base)
    signs = (-1.0) ** np.arange(m)[:, None]
    gs = [*rng.standard_normal((m, d)), *(signs * (base + 1e-6 * rng.standard_normal((m, d))))]
    starts = _starts([10, 0, 14])
    options = WindowOptions(refactor_every=1000)

    def rank(comm: Communicator) -> list[bool]:
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        op = ShardedDynamicIHVP(m, hi - lo, damp=damp, dtype="float64", comm=comm, options=options)
        noted = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IllConditionedWarning)
            for g in gs:
                op.update(g[lo:hi])
                noted.append(op._warned_hopeless)  # what the edit decided
        return noted

    results = _ok(run_spmd_threads(rank, 3))
    assert all(r == results[0] for r in results)
    assert results[0].index(True) == m + 2
    whole = DynamicIHVP(m, d, damp=damp, dtype="float64", options=options)
    noted = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        for g in gs:
            whole.update(g)
            noted.append(whole._warned_hopeless)
    assert noted == results[0]


# -- collective errors -------------------------------------------------------------------------


def _failing_call(comm: Communicator, case: str) -> Any:
    m, d, size = 4, 12, comm.size
    starts = _starts(_even_widths(d, size))
    lo, hi = starts[comm.rank], starts[comm.rank + 1]
    rng = np.random.default_rng(0)
    op = ShardedDynamicIHVP(
        m, hi - lo, damp=0.1, dtype="float64", comm=comm, options=WindowOptions(zero_init=False)
    )
    for _ in range(m + 1):
        op.update(rng.standard_normal(d)[lo:hi])
    before = op.state_dict()
    g = rng.standard_normal(d)[lo:hi]
    bad = comm.rank == size - 1
    try:
        if case == "nan":
            op.update(np.where(bad, np.nan, g))
        elif case == "nan-step":
            op.update_and_matvec(np.where(bad, np.nan, g))
        elif case == "shape":
            op.update(g[:-1] if bad else g)
        elif case == "dtype":
            op.update_and_matvec(g.astype(np.int64) if bad else g)
        elif case == "library":
            op.matvec(list(g) if bad else g)
        elif case == "matvec-nan":
            op.matvec(np.where(bad, np.inf, g))
        elif case == "matmat-shape":
            op.matmat(np.ones((hi - lo + bad, 2)))
        elif case == "remove":
            op.remove(op.slots[1 if bad else 0])
        elif case == "set_damp":
            op.set_damp(-1.0 if bad else 0.2)
        elif case == "hopeless":
            # Duplicates with a damping far below float64's resolution of their Gram
            # (as test_precision's test_dynamic_failure_changes_nothing): each gradient
            # alone makes the window hopeless (eps(float64) kappa >= 1), which every rank
            # finds from the reduced Gram row, before a repeat could fail the factorisation.
            base = (rng.standard_normal((3, d)) * 1e4).astype(np.float32)
            op = ShardedDynamicIHVP(8, hi - lo, damp=1e-30, dtype="float32", comm=comm)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IllConditionedWarning)
                for step in range(24):
                    before = op.state_dict()
                    op.update(base[step % 3, lo:hi])
        elif case == "unchecked-nan":
            op.check_finite = False
            op.update(np.where(bad, np.nan, g))
        else:
            raise AssertionError(case)
    except Exception as exc:  # what each rank raised, and whether its state was kept
        after = op.state_dict()
        same = all(
            np.array_equal(np.asarray(before[k]), np.asarray(after[k]), equal_nan=True)
            for k in before
        )
        return type(exc), str(exc), same
    return "no error"


@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("nan", ValueError),
        ("nan-step", ValueError),
        ("shape", ValueError),
        ("dtype", TypeError),
        ("library", TypeError),
        ("matvec-nan", ValueError),
        ("matmat-shape", ValueError),
        ("remove", ValueError),
        ("set_damp", ValueError),
        ("hopeless", ValueError),
        ("unchecked-nan", FactorizationError),
    ],
)
def test_an_error_on_one_rank_is_an_error_on_every_rank(case: str, kind: type) -> None:
    results = _ok(run_spmd_threads(_failing_call, 3, case, timeout=20))
    for r in results:
        assert r != "no error"
        raised, message, unchanged = r
        assert issubclass(raised, kind), (raised, message)
        assert unchanged, f"{case}: a rank's window changed ({message})"


def _mismatched_call(comm: Communicator, case: str) -> Any:
    m, d, size = 4, 12, comm.size
    starts = _starts(_even_widths(d, size))
    lo, hi = starts[comm.rank], starts[comm.rank + 1]
    rng = np.random.default_rng(1)
    op = ShardedDynamicIHVP(
        m, hi - lo, damp=0.1, dtype="float64", comm=comm, options=WindowOptions(zero_init=False)
    )
    for _ in range(m + 1):
        op.update(rng.standard_normal(d)[lo:hi])
    g = rng.standard_normal(d)[lo:hi]
    if case == "reset" and comm.rank == 0:
        op.reset()
    saved = op.state_dict()
    if case == "check-vs-load":
        op.update(g)
    before = op.state_dict()
    try:
        if case == "check-vs-load":
            # Same length and tag once: the others loaded while rank 0 checked, silently.
            if comm.rank == 0:
                op.check_state_dict(saved)
            else:
                op.load_state_dict(saved)
        elif case == "update-vs-matvec" and comm.rank == 0:
            op.update(g)  # m + 20 numbers, as the others' matvec
        elif case == "step-vs-matvec" and comm.rank == 0:
            op.update_and_matvec(g)
        else:
            op.matvec(g)
    except Exception as exc:
        after = op.state_dict()
        same = all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)
        return type(exc), str(exc), same
    return "no error"


@pytest.mark.parametrize("case", ["update-vs-matvec", "step-vs-matvec", "reset", "check-vs-load"])
def test_different_operations_or_diverged_states_raise_on_every_rank(case: str) -> None:
    # Same reduction length (m + 20) on every rank: without the tag in the status
    # word the sums would mix and some ranks return a wrong answer silently.
    results = _ok(run_spmd_threads(_mismatched_call, 3, case, timeout=20))
    for r in results:
        assert r != "no error"
        raised, message, unchanged = r
        assert raised is RuntimeError, message
        assert "different collective operations" in message
        assert unchanged, f"{case}: a rank's window changed"
    # The same message on every rank, after the name of the rank's own operation.
    assert len({r[1].split(": ", 1)[1] for r in results}) == 1


def _two_windows_in_different_orders(comm: Communicator) -> Any:
    m, d = 3, 8
    lo, hi = 4 * comm.rank, 4 * comm.rank + 4
    rng = np.random.default_rng(14)
    Gs = [rng.standard_normal((m, d)) for _ in range(2)]
    a, b = (ShardedDynamicIHVP.from_window(G[:, lo:hi], damp=0.1, comm=comm) for G in Gs)
    first = a if comm.rank == 0 else b
    before = [w.state_dict() for w in (a, b)]
    try:
        first.update_and_matvec(rng.standard_normal(d)[lo:hi])
    except RuntimeError as exc:
        after = [w.state_dict() for w in (a, b)]
        same = all(
            np.array_equal(np.asarray(x[k]), np.asarray(y[k]))
            for x, y in zip(before, after, strict=True)
            for k in x
        )
        return str(exc), same
    return "no error"


def test_two_windows_applied_in_different_orders_raise_on_every_rank() -> None:
    # Two windows of one shape with the same count of edits: only their identity in the
    # tag keeps rank 0's Gram row of one from adding to rank 1's of the other.
    for r in _ok(run_spmd_threads(_two_windows_in_different_orders, 2, timeout=20)):
        assert r != "no error"
        message, unchanged = r
        assert "different collective operations" in message
        assert unchanged


def _a_window_and_its_copy_in_different_orders(comm: Communicator) -> Any:
    m, d = 3, 8
    lo, hi = 4 * comm.rank, 4 * comm.rank + 4
    rng = np.random.default_rng(17)
    a = ShardedDynamicIHVP.from_window(rng.standard_normal((m, d))[:, lo:hi], damp=0.1, comm=comm)
    b = copy.deepcopy(a)
    g, h, x = rng.standard_normal((3, d))[:, lo:hi]
    a.update(g)  # the two diverge, at the same count of edits
    b.update(h)
    first = a if comm.rank == 0 else b
    try:
        first.matvec(x)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_a_window_and_its_deep_copy_applied_in_different_orders_raise_on_every_rank() -> None:
    # A deep copy kept the original's identity: once updates made the two differ, rank
    # 0's product with the original added rank 1's sums of the copy, without a word.
    for r in _ok(run_spmd_threads(_a_window_and_its_copy_in_different_orders, 2, timeout=20)):
        assert "different collective operations" in r, r


def test_a_nan_in_one_ranks_window_is_named_there() -> None:
    # As every operator names it: the entry of the rank's own G (its global column is not
    # known yet: the widths are summed in the same reduction).
    def rank(comm: Communicator) -> Any:
        G = np.random.default_rng(comm.rank).standard_normal((3, 4))
        if comm.rank == 1:
            G[1, 3] = np.inf
        with pytest.raises(ValueError) as info:
            ShardedDynamicIHVP.from_window(G, damp=0.1, comm=comm)
        return str(info.value)

    results = _ok(run_spmd_threads(rank, 2, timeout=20))
    assert results[1] == "G must not contain NaN or infinity: G[1, 3] is inf"
    assert "failed on 1 other rank" in results[0]


def test_dask_windows_are_refused_on_every_rank() -> None:
    # The window over Dask failed deep inside its first product (a matmul of mismatched
    # core dimensions); a Dask array cannot cross a communicator either.
    da = pytest.importorskip("dask.array")
    G = np.random.default_rng(16).standard_normal((3, 8))

    def rank(comm: Communicator) -> Any:
        lo, hi = 4 * comm.rank, 4 * comm.rank + 4
        messages = []
        for build in (
            lambda: ShardedDynamicIHVP(
                3, 4, damp=0.1, dtype="float64", xp=da if comm.rank else None, comm=comm
            ),
            lambda: ShardedDynamicIHVP.from_window(
                da.from_array(G[:, lo:hi]) if comm.rank else G[:, lo:hi], damp=0.1, comm=comm
            ),
        ):
            with pytest.raises(TypeError) as info:
                build()
            messages.append(str(info.value))
        return messages

    results = _ok(run_spmd_threads(rank, 2, timeout=20))
    assert all("failed on 1 other rank" in m for m in results[0]), results[0]
    assert all("takes no Dask arrays" in m for m in results[1]), results[1]


def _after_local_resets(comm: Communicator, resets: dict[int, int]) -> Any:
    m, d = 4, 12
    starts = _starts(_even_widths(d, comm.size))
    lo, hi = starts[comm.rank], starts[comm.rank + 1]
    rng = np.random.default_rng(1)
    op = ShardedDynamicIHVP(m, hi - lo, damp=0.1, dtype="float64", comm=comm)
    for _ in range(m + 1):
        op.update(rng.standard_normal(d)[lo:hi])
    for _ in range(resets.get(comm.rank, 0)):
        op.reset()
    before = op.state_dict()
    try:
        y = op.matvec(np.ones(hi - lo))
    except RuntimeError as exc:
        after = op.state_dict()
        same = all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)
        return str(exc), same
    return y


@pytest.mark.parametrize(
    "resets",
    [{0: 2}, {0: 4}, {0: 1, 1: 3, 2: 5}, {1: 2, 2: 6}, {0: 3, 1: 1, 2: 2}],
    ids=["2-on-one", "4-on-one", "1-3-5", "2-and-6", "3-1-2"],
)
def test_any_sequence_of_local_resets_raises_on_every_rank(resets: dict[int, int]) -> None:
    # Regression: the tag held the count of state edits modulo 4, and each reset adds
    # two, so two resets on one rank (or counts that differ by a multiple of two) passed
    # for agreement: the ranks mixed the sums of different windows, and a rank could
    # raise outside the collective while the others wait (a hang under TorchComm).
    for r in _ok(run_spmd_threads(_after_local_resets, 3, resets, timeout=20)):
        assert isinstance(r, tuple), r
        message, unchanged = r
        assert "different collective operations" in message
        assert unchanged


def test_the_same_local_resets_on_every_rank_agree() -> None:
    results = _ok(run_spmd_threads(_after_local_resets, 3, {0: 2, 1: 2, 2: 2}, timeout=20))
    for y in results:  # an empty window: x / damp
        np.testing.assert_array_equal(y, np.full(y.shape, 10.0))


@pytest.mark.parametrize("edit", ["negated", "swapped"])
def test_load_state_dict_checks_the_reduced_gram_on_every_rank(edit: str) -> None:
    # One rank's shard of a stored gradient changed: the Gram recomputed from every
    # rank's columns (one reduction) no longer matches, and every rank refuses the state.
    def rank(comm: Communicator) -> Any:
        lo, hi = 4 * comm.rank, 4 * comm.rank + 4
        rng = np.random.default_rng(3)
        op = ShardedDynamicIHVP(3, 4, damp=0.1, dtype="float32", comm=comm)
        for _ in range(3):
            op.update(rng.standard_normal(4 * comm.size).astype(np.float32)[lo:hi])
        state = op.state_dict()
        if comm.rank == 1:
            grads = state["grads"] = state["grads"].copy()
            if edit == "negated":
                grads[0] = -grads[0]
            else:
                grads[[0, 1]] = grads[[1, 0]]
        before = op.state_dict()
        try:
            op.load_state_dict(state)
        except ValueError as exc:
            after = op.state_dict()
            same = all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)
            return str(exc), same
        return "no error"

    for r in _ok(run_spmd_threads(rank, 3, timeout=20)):
        assert r != "no error"
        assert "Gram matrix does not match its gradients" in r[0] and r[1]


def test_load_state_dict_mends_diverged_states() -> None:
    def rank(comm: Communicator) -> Any:
        lo, hi = 2 * comm.rank, 2 * comm.rank + 2
        rng = np.random.default_rng(2)
        op = ShardedDynamicIHVP(3, 2, damp=0.1, dtype="float64", comm=comm)
        for _ in range(2):
            op.update(rng.standard_normal(2 * comm.size)[lo:hi])
        state = op.state_dict()
        if comm.rank == 0:
            op.reset()
        op.load_state_dict(state)  # every rank, from one checkpoint: agreed again
        return op.matvec(np.ones(2))

    _ok(run_spmd_threads(rank, 3, timeout=20))


def test_construction_must_agree_on_every_rank() -> None:
    def rank(comm: Communicator, field: str) -> Any:
        options: dict[str, Any] = {"damp": 0.1, "dtype": "float64"}
        m = 4
        if comm.rank == 1 and field == "num_grads":
            m = 5
        if comm.rank == 1 and field == "dtype":
            options["dtype"] = "float32"
        if field == "storage":  # both compute in float32: the storage must still agree
            options["dtype"] = "float16" if comm.rank == 0 else "float32"
        if comm.rank == 1 and field == "bad damp":
            options["damp"] = -1.0
        if comm.rank == 1 and field == "refine":
            options["options"] = WindowOptions(refine=1)
        if comm.rank == 1 and field == "not options":  # refused inside the reduction
            options["options"] = {"refine": 1}
        return ShardedDynamicIHVP(m, 3, comm=comm, **options)

    cases = [
        ("num_grads", ValueError),
        ("dtype", TypeError),
        ("storage", TypeError),
        ("bad damp", ValueError),
        ("refine", ValueError),
        ("not options", TypeError),
    ]
    for field, kind in cases:
        results = run_spmd_threads(rank, 2, field, timeout=20)
        assert all(isinstance(r, kind) for r in results), (field, results)

    def empty(comm: Communicator) -> Any:
        return ShardedDynamicIHVP(2, 0, damp=0.1, dtype="float64", comm=comm)

    assert all(isinstance(r, ValueError) for r in run_spmd_threads(empty, 2, timeout=20))
    with pytest.raises(TypeError, match="Communicator"):
        ShardedDynamicIHVP(2, 3, damp=0.1, dtype="float64", comm=object())  # type: ignore[arg-type]


def test_from_window_sharded() -> None:
    m, d, size = 5, 17, 3
    G = np.random.default_rng(2).standard_normal((4, d))
    x = np.random.default_rng(3).standard_normal(d)
    starts = _starts(_even_widths(d, size))

    def rank(comm: Communicator, rows: int) -> Any:
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local = G[: (rows if comm.rank == 0 else 4), lo:hi]
        op = ShardedDynamicIHVP.from_window(local, damp=0.1, num_grads=m, comm=comm)
        return op.matvec(x[lo:hi]), op.state_dict()

    results = _ok(run_spmd_threads(rank, size, 4))
    _assert_same_replicated([r[1] for r in results])
    want = DynamicIHVP.from_window(G, damp=0.1, num_grads=m).matvec(x)
    assert_close(np.concatenate([r[0] for r in results]), want, kappa=_kappa(G, 0.1), factor=64)
    # Ranks with different numbers of gradients: every rank raises.
    bad = run_spmd_threads(rank, size, 3, timeout=20)
    assert all(isinstance(r, ValueError) and "different" in str(r) for r in bad), bad

    def nan(comm: Communicator) -> Any:
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local = G[:, lo:hi].copy()
        if comm.rank == 2:
            local[1, 0] = np.nan
        return ShardedDynamicIHVP.from_window(local, damp=0.1, comm=comm)

    assert all(isinstance(r, ValueError) for r in run_spmd_threads(nan, size, timeout=20))


# -- checkpoints and copies -------------------------------------------------------------------


def test_sharded_state_dict_round_trip_and_layout_errors() -> None:
    m, d = 4, 15
    gs = np.random.default_rng(4).standard_normal((3 * m, d))

    def rank(comm: Communicator, widths: list[int], saved: list[Any] | None) -> Any:
        starts = _starts(widths)
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        op = ShardedDynamicIHVP(m, hi - lo, damp=0.1, dtype="float64", comm=comm)
        if saved is not None:
            op.load_state_dict(saved[comm.rank])
            for g in gs[m:]:
                op.update(g[lo:hi])
            return op.state_dict()
        for g in gs[:m]:
            op.update(g[lo:hi])
        state = op.state_dict()
        for g in gs[m:]:
            op.update(g[lo:hi])
        return state, op.state_dict()

    widths = [5, 5, 5]
    results = _ok(run_spmd_threads(rank, 3, widths, None))
    states = [r[0] for r in results]
    resumed = _ok(run_spmd_threads(rank, 3, widths, states))
    for r, again in zip(results, resumed, strict=True):
        for key, value in r[1].items():  # bit for bit
            assert np.asarray(value).tobytes() == np.asarray(again[key]).tobytes(), key
    # Another layout, another world size, ranks swapped, unsharded: clear errors everywhere.
    other = run_spmd_threads(rank, 3, [6, 5, 4], states, timeout=20)
    assert all(isinstance(r, ValueError) and "same world size" in str(r) for r in other)
    swapped = run_spmd_threads(rank, 3, widths, states[::-1], timeout=20)
    assert all(isinstance(r, ValueError) for r in swapped)
    fewer = run_spmd_threads(rank, 2, [8, 7], states[:2], timeout=20)
    assert all(isinstance(r, ValueError) and "3 ranks" in str(r) for r in fewer)
    single = DynamicIHVP(m, 5, damp=0.1, dtype="float64")
    with pytest.raises(ValueError, match="not sharded"):
        single.load_state_dict(states[0])
    unsharded = DynamicIHVP(m, 5, damp=0.1, dtype="float64").state_dict()
    plain = run_spmd_threads(rank, 3, widths, [unsharded] * 3, timeout=20)
    assert all(isinstance(r, ValueError) and "unsharded" in str(r) for r in plain)
    # Ranks loading states of different steps: every rank refuses.
    mixed = [states[0], results[1][1], states[2]]
    assert all(isinstance(r, ValueError) for r in run_spmd_threads(rank, 3, widths, mixed))


def test_sharded_copies_share_the_communicator() -> None:
    def rank(comm: Communicator) -> Any:
        op = ShardedDynamicIHVP(3, 4, damp=0.1, dtype="float64", comm=comm)
        op.update(np.ones(4))
        twin = copy.copy(op)
        assert twin.comm is comm and twin.layout == op.layout
        twin.update(np.full(4, 2.0))
        assert len(op) == 1 and len(twin) == 2
        with pytest.raises(TypeError, match="pickled"):
            pickle.dumps(op)
        return twin.matvec(np.ones(4))

    _ok(run_spmd_threads(rank, 2))


def test_a_shard_no_array_can_hold_is_refused_on_every_rank() -> None:
    # One rank's columns beyond what an array can address: NumPy's "Maximum allowed
    # dimension exceeded" named no argument; now every rank raises, the others saying so.
    def rank(comm: Communicator) -> Any:
        dim = 10**19 if comm.rank else 4
        with pytest.raises(ValueError) as info:
            ShardedDynamicIHVP(3, dim, damp=0.1, dtype="float64", comm=comm)
        return str(info.value)

    results = _ok(run_spmd_threads(rank, 2, timeout=20))
    assert "window: num_grads=3 x dim=10000000000000000000" in results[1], results[1]
    assert "failed on 1 other rank" in results[0], results[0]


def test_todense_and_arithmetic_are_refused_when_sharded() -> None:
    def rank(comm: Communicator) -> Any:
        op = ShardedDynamicIHVP(3, 4 + comm.rank, damp=0.1, dtype="float64", comm=comm)
        # As ShardedStaticIHVP(comm=) and every operation that would mix shards: a TypeError.
        with pytest.raises(TypeError, match=r"todense.*column-sharded"):
            op.todense()
        with pytest.raises(TypeError, match="column-sharded"):
            op.to_scipy()
        with pytest.raises(TypeError, match="column-sharded"):
            2.0 * op
        # Unlike StaticIHVP's global shape, a sharded window's shape is this rank's.
        assert op.shape == op.local_shape == (4 + comm.rank,) * 2
        assert op.layout is not None and op.layout.dim == 9

    _ok(run_spmd_threads(rank, 2))


# -- processes: gloo, TorchComm ------------------------------------------------------------


def _gloo_operator(comm: Communicator, d: int) -> dict[str, Any]:
    import torch

    size = comm.size
    starts = _starts(_even_widths(d, size))
    lo, hi = starts[comm.rank], starts[comm.rank + 1]
    m = 6
    rng = np.random.default_rng(11)
    gs = torch.from_numpy(rng.standard_normal((4 * m, d)))
    op = ShardedDynamicIHVP(m, hi - lo, damp=0.05, dtype=torch.float64, xp=torch, comm=comm)
    steps = [op.update_and_matvec(g[lo:hi]).numpy() for g in gs[:-4]]
    saved = op.state_dict()
    tail = [op.update_and_matvec(g[lo:hi]).numpy() for g in gs[-4:]]
    out: dict[str, Any] = {"steps": steps + tail, "state": _numpy_state(op.state_dict())}
    # Round trip: a fresh operator loads the saved shard and continues bit for bit.
    again = ShardedDynamicIHVP(m, hi - lo, damp=0.05, dtype=torch.float64, xp=torch, comm=comm)
    again.load_state_dict(saved)
    out["resumed"] = [again.update_and_matvec(g[lo:hi]).numpy() for g in gs[-4:]]
    # A NaN in one rank's shard: every rank raises, every window is kept.
    g = gs[0][lo:hi].clone()
    if comm.rank == size - 1:
        g[0] = float("nan")
    try:
        op.update(g)
    except ValueError as exc:
        out["nan"] = ("ValueError", bool(torch.equal(op.window(), again.window())), str(exc))
    # matmat with another k on the last rank: every rank raises (gloo aborted the process
    # on payloads of different lengths before k was compared first).
    try:
        op.matmat(torch.ones((hi - lo, 2 + (comm.rank == size - 1)), dtype=torch.float64))
    except ValueError as exc:
        out["columns"] = str(exc)
    # Another world size: the state of this layout does not load into a 1-rank layout.
    try:
        widths = [d] if comm.rank == 0 else [0]
        ShardedDynamicIHVP(
            m, widths[0], damp=0.05, dtype=torch.float64, xp=torch, comm=comm
        ).load_state_dict(saved)
    except ValueError as exc:
        out["layout"] = str(exc)
    return out


def _numpy_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.numpy() if hasattr(v, "numpy") else v for k, v in state.items()}


@pytest.mark.parametrize("nprocs", [2, 4])
def test_sharded_operator_over_gloo(nprocs: int) -> None:
    torch = pytest.importorskip("torch")
    from _spmd import spawn

    d = 37
    results = spawn(_gloo_operator, nprocs, d, pooled=True)
    _ok(results)
    _assert_same_replicated([r["state"] for r in results])
    rng = np.random.default_rng(11)
    gs = torch.from_numpy(rng.standard_normal((24, d)))
    ref = DynamicIHVP(6, d, damp=0.05, dtype=torch.float64, xp=torch)
    for i, g in enumerate(gs):
        want = ref.update_and_matvec(g).numpy()
        got = np.concatenate([r["steps"][i] for r in results])
        window = np.asarray(ref.window())
        assert_close(got, want, kappa=_kappa(window, 0.05), factor=64.0 * d)
    for r in results:
        for a, b in zip(r["resumed"], r["steps"][-4:], strict=True):
            np.testing.assert_array_equal(a, b)
        assert r["nan"][:2] == ("ValueError", True), r["nan"]
        assert "same world size" in r["layout"]
        assert "same number of columns" in r["columns"]


@pytest.mark.parametrize("other", ["k", "1-D"])
def test_matmat_with_another_k_on_one_rank_raises_on_every_rank(other: str) -> None:
    # The payload's length is m k: ranks whose k differed reduced arrays of different
    # lengths, which gloo cannot report (it aborted the process; the others waited).
    G = np.random.default_rng(4).standard_normal((3, 8))
    X = np.random.default_rng(5).standard_normal((8, 2))

    def rank(comm: Communicator) -> Any:
        lo, hi = 4 * comm.rank, 4 * comm.rank + 4
        op = ShardedDynamicIHVP.from_window(G[:, lo:hi], damp=0.1, comm=comm)
        before = op.state_dict()
        bad = np.ones((4, 3)) if other == "k" else np.ones(4)
        try:
            op.matmat(bad if comm.rank == 1 else X[lo:hi])
        except ValueError as exc:
            _assert_same_replicated([before, op.state_dict()])
            return str(exc), op.matmat(X[lo:hi])
        return None

    results = _ok(run_spmd_threads(rank, 2, timeout=20))
    want = "same number of columns" if other == "k" else "X must"
    assert want in results[1][0]
    for r in results:
        assert isinstance(r, tuple), r
    Y = np.concatenate([r[1] for r in results])
    ref = DynamicIHVP.from_window(G, damp=0.1)
    assert_close(Y, ref.matmat(X), kappa=_kappa(G, 0.1))


@pytest.mark.parametrize(
    ("lib", "dtype"), [("numpy", "float16"), ("numpy", "bfloat16"), ("torch", "bfloat16")]
)
def test_two_byte_window_with_an_empty_rank(lib: str, dtype: str) -> None:
    # A rank with no coordinates must take part in the 2-byte window's reductions:
    # its overflow check and float32 pieces used to fail on zero columns. NumPy's
    # bfloat16 is ml_dtypes'.
    if lib == "numpy" and dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    if lib == "torch":
        torch = pytest.importorskip("torch")
        xp: Any = torch
        conv: Any = torch.from_numpy
        back: Any = lambda t: t.numpy()  # noqa: E731
    else:
        xp, conv, back = None, (lambda a: a), (lambda a: a)
    rng = np.random.default_rng(11)
    m, widths = 3, [4, 0, 5]
    d, starts = sum(widths), _starts(widths)
    grads = rng.standard_normal((5, d)).astype(np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    ref = DynamicIHVP(m, d, damp=0.1, dtype=dtype, xp=xp)
    for g in grads:
        ref.update(conv(g))
    expected = back(ref.update_and_matvec(conv(x)))

    def rank(comm: Communicator) -> Any:
        cols = slice(starts[comm.rank], starts[comm.rank + 1])
        op = ShardedDynamicIHVP(m, widths[comm.rank], damp=0.1, dtype=dtype, xp=xp, comm=comm)
        for g in grads:
            op.update(conv(g[cols]))
        return back(op.update_and_matvec(conv(x[cols])))

    got = np.concatenate(_ok(run_spmd_threads(rank, len(widths), timeout=10)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "how", ["update", "update_and_matvec", "torch.func.jvp", "matvec", "from_window"]
)
def test_derivatives_through_the_sums_over_ranks_are_refused_on_every_rank(how: str) -> None:
    # A Communicator sums values only (TorchComm detaches): over two gloo ranks the
    # tangent of a product through a window's updates was 70-110 % off, with no error.
    # Now refused on every rank, and every window is left as it was.
    torch = pytest.importorskip("torch")
    fwAD = torch.autograd.forward_ad
    rng = np.random.default_rng(4)
    G, x = rng.standard_normal((3, 10)), rng.standard_normal(10)
    starts = [0, 4, 10]

    def fn(comm: Communicator) -> Any:
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        G_local, x_local = torch.asarray(G[:, lo:hi]), torch.asarray(x[lo:hi])
        bad = comm.rank == 1
        op = ShardedDynamicIHVP.from_window(G_local[:2], comm=comm, damp=0.1, num_grads=3)
        before = op.state_dict()
        with pytest.raises(TypeError) as info:
            if how == "matvec":
                op.matvec(x_local.clone().requires_grad_() if bad else x_local)
            elif how == "torch.func.jvp":  # the row put back was refused by the transform
                g = G_local[2]
                if bad:
                    torch.func.jvp(op.update_and_matvec, (g,), (torch.ones_like(g),))
                else:
                    op.update_and_matvec(g)
            else:  # one dual level at a time in a process: rank 1's
                with fwAD.dual_level() if bad else contextlib.nullcontext():
                    g = (
                        fwAD.make_dual(G_local[2], torch.ones_like(G_local[2]))
                        if bad
                        else G_local[2]
                    )
                    if how == "from_window":
                        ShardedDynamicIHVP.from_window(g[None], comm=comm, damp=0.1)
                    else:
                        getattr(op, how)(g)
        after = op.state_dict()
        same = all(
            torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k])) for k in before
        )
        return str(info.value), same

    results = _ok(run_spmd_threads(fn, 2, timeout=30))
    for message, same in results:
        assert same, f"a refused {how} changed a window ({message})"
    name = {"matvec": "x", "from_window": "G"}.get(how, "g")
    assert results[1][0].startswith(f"{name} carries derivatives"), results[1][0]
    assert "comm.allreduce_sum" in results[1][0] and f"{name}.detach()" in results[1][0]
    assert "failed on 1 other rank" in results[0][0], results[0][0]
