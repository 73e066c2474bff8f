"""DynamicIHVP against the oracles: window bookkeeping, updates, products, checkpoints."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import close_where_promised
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import mfac_core._linalg
from mfac_core import (
    DynamicIHVP,
    FactorizationError,
    IllConditionedWarning,
    StaticIHVP,
    WindowOptions,
)
from mfac_core._errors import NotPositiveDefinite
from mfac_core.testing import (
    SpectralOracle,
    assert_close,
    paper_dynamic,
    to_numpy,
)


def condition_number(G: np.ndarray, damp: float) -> float:
    """The error scale of the Woodbury form, ``1 + ||G||_2^2 / (m damp)``.

    DynamicIHVP always uses the low-rank form, so even when d <= m its
    rounding errors scale with this, not with the (smaller) cond(F).
    """
    G = np.asarray(G, dtype=np.float64)
    if G.size == 0:
        return 1.0
    return 1.0 + float(np.linalg.norm(G, 2)) ** 2 / (G.shape[0] * damp)


def _window_matrix(window: list[np.ndarray], capacity: int, dim: int, zero_init: bool):
    """The gradients that define F: the window, padded with zero rows under zero_init."""
    rows = list(window)
    if zero_init:
        rows = [np.zeros(dim)] * (capacity - len(rows)) + rows
    return np.array(rows, dtype=np.float64).reshape(len(rows), dim)


def _oracle_product(window, capacity, dim, zero_init, damp, x):
    G = _window_matrix(window, capacity, dim, zero_init)
    if G.shape[0] == 0:
        return x / damp, 1.0
    return SpectralOracle(G, damp).matvec(x), condition_number(G, damp)


# -- the backend matrix ------------------------------------------------------------------------


@pytest.mark.parametrize("zero_init", [False, True], ids=["window", "zero-init"])
def test_updates_match_oracle_on_every_backend(xp_device, dtype, rng, zero_init):
    xp_device.skip_if_immutable()
    m, d, damp = 5, 23, 0.3
    op = DynamicIHVP(
        m,
        d,
        damp=damp,
        dtype=dtype,
        xp=xp_device.xp,
        device=xp_device.device,
        options=WindowOptions(zero_init=zero_init),
    )
    assert op.shape == (d, d) and op.device == xp_device.device
    window: list[np.ndarray] = []
    for step in range(3 * m + 2):
        g = rng.standard_normal(d).astype(dtype)
        y = op.update_and_matvec(xp_device.asarray(g, dtype))
        window = ([*window, g.astype(np.float64)])[-m:]
        assert type(y) is type(xp_device.asarray(g, dtype))
        assert y.dtype == xp_device.dtype(dtype) and y.shape == (d,)
        want, kappa = _oracle_product(window, m, d, zero_init, damp, g.astype(np.float64))
        assert_close(y, want, kappa=kappa, err_msg=f"step {step}")
    assert len(op) == m and op.is_full
    x = rng.standard_normal((d, 3)).astype(dtype)
    Y = op.matmat(xp_device.asarray(x, dtype))
    G = _window_matrix(window, m, d, zero_init)
    assert_close(
        Y, SpectralOracle(G, damp).matmat(x.astype(np.float64)), kappa=condition_number(G, damp)
    )
    assert_close(op.window(), np.array(window), dtype="float64", factor=1)


def test_dynamic_equals_static_on_the_same_window(xp_device, rng):
    xp_device.skip_if_immutable()
    m, d, damp = 4, 30, 0.05
    op = DynamicIHVP(m, d, damp=damp, dtype="float64", xp=xp_device.xp, device=xp_device.device)
    for _ in range(7):
        op.update(xp_device.asarray(rng.standard_normal(d), "float64"))
    static = StaticIHVP(op.window(), damp=damp)
    x = xp_device.asarray(rng.standard_normal(d), "float64")
    kappa = condition_number(to_numpy(op.window()), damp)
    assert_close(op.matvec(x), to_numpy(static.matvec(x)), kappa=kappa)
    assert_close(op.todense(), to_numpy(static.todense()), kappa=kappa)


def test_update_and_matvec_equals_update_then_matvec(numpy_backend, rng):
    m, d, damp = 6, 40, 1e-2
    a = DynamicIHVP(m, d, damp=damp, dtype="float64")
    b = DynamicIHVP(m, d, damp=damp, dtype="float64")
    for _ in range(2 * m + 1):
        g = rng.standard_normal(d)
        y1 = a.update_and_matvec(g)
        b.update(g)
        y2 = b.matvec(g)
        assert_close(y1, y2, kappa=condition_number(to_numpy(b.window()), damp))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_newest_gradient_in_span_is_accurate(dtype, rng):
    """x = the newest gradient: F^{-1} x is small and cancels; tolerance scales with kappa."""
    m, d = 8, 200
    damp = 1e-3 if dtype == "float64" else 1e-1
    op = DynamicIHVP(m, d, damp=damp, dtype=dtype)
    window = []
    for _ in range(3 * m):
        g = (rng.standard_normal(d) * rng.uniform(0.5, 2.0)).astype(dtype)
        y = op.update_and_matvec(g)
        window = [*window, g.astype(np.float64)][-m:]
    G = np.array(window)
    kappa = condition_number(G, damp)
    assert kappa > 10  # the check is about cancellation, not a trivially damped case
    assert_close(y, SpectralOracle(G, damp).matvec(G[-1]), kappa=kappa)


def test_zero_init_matches_the_papers_dynamic_algorithm(rng):
    m, d, damp = 5, 17, 0.2
    op = DynamicIHVP(m, d, damp=damp, dtype="float64", options=WindowOptions(zero_init=True))
    window = []
    for _ in range(m + 3):
        g = rng.standard_normal(d)
        op.update(g)
        window = [*window, g][-m:]
    x = rng.standard_normal(d)
    # The paper keeps the buffer in slot order; F does not depend on the order.
    reference = paper_dynamic(_window_matrix(window, m, d, True), damp)
    assert_close(op.matvec(x), reference.matvec(x), kappa=condition_number(reference.G, damp))


def test_from_window_equals_inserting_one_by_one(xp_device, rng):
    xp_device.skip_if_immutable()
    m, d, damp = 6, 25, 0.1
    G = rng.standard_normal((4, d))
    for zero_init in (False, True):
        a = DynamicIHVP.from_window(
            xp_device.asarray(G, "float64"),
            damp=damp,
            num_grads=m,
            options=WindowOptions(zero_init=zero_init),
        )
        b = DynamicIHVP(
            m,
            d,
            damp=damp,
            dtype="float64",
            xp=xp_device.xp,
            device=xp_device.device,
            options=WindowOptions(zero_init=zero_init),
        )
        for g in G:
            b.update(xp_device.asarray(g, "float64"))
        assert a.slots == b.slots and len(a) == len(b)
        x = xp_device.asarray(rng.standard_normal(d), "float64")
        assert_close(a.matvec(x), to_numpy(b.matvec(x)))
        g = xp_device.asarray(rng.standard_normal(d), "float64")
        assert_close(a.update_and_matvec(g), to_numpy(b.update_and_matvec(g)))


# -- incremental factor against refactorisation -------------------------------------------------


def _factor_drift(op: DynamicIHVP) -> float:
    U = to_numpy(op._factor.factor.U)
    perm = list(op._factor.slots)
    gram = to_numpy(op._gram)[np.ix_(perm, perm)]
    C = gram + op._shift(len(perm)) * np.eye(len(perm))
    return float(np.abs(U.T @ U - C).max() / np.abs(C).max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_long_run_drift_stays_bounded(dtype, rng):
    """10 m incremental updates, never refactorised: the factor stays accurate."""
    m, d, damp = 16, 64, 1e-2
    inc = DynamicIHVP(m, d, damp=damp, dtype=dtype, options=WindowOptions(refactor_every=10**9))
    ref = DynamicIHVP(m, d, damp=damp, dtype=dtype, options=WindowOptions(refactor_every=0))
    worst = 0.0
    for step in range(10 * m):
        g = (rng.standard_normal(d) * rng.uniform(0.1, 10.0)).astype(dtype)
        y_inc = inc.update_and_matvec(g)
        y_ref = ref.update_and_matvec(g)
        if step >= m:
            worst = max(worst, _factor_drift(inc))
            kappa = condition_number(to_numpy(inc.window()), damp)
            assert_close(y_inc, y_ref, kappa=kappa, err_msg=f"step {step}")
    # Filling the window refactorises (the 1/k normalisation changes); after that
    # every update was an O(m^2) edit.
    assert inc.refactor_count == m + 1
    assert worst < 1e-13


def test_periodic_and_drift_triggered_refactorisation(rng):
    m, d = 4, 12
    op = DynamicIHVP(m, d, damp=0.5, dtype="float64", options=WindowOptions(refactor_every=3))
    for _ in range(m):
        op.update(rng.standard_normal(d))
    before = op.refactor_count
    for _ in range(8):
        op.update(rng.standard_normal(d))
    # 8 replacements with a refactorisation after every 3 edits.
    assert op.refactor_count - before == 2


def test_refactor_method_refactorises_every_update(rng):
    op = DynamicIHVP(3, 10, damp=0.5, dtype="float64", options=WindowOptions(refactor_every=0))
    for _ in range(7):
        op.update(rng.standard_normal(10))
    assert op.refactor_count == 8  # reset() + one per update


# -- removal, reset ------------------------------------------------------------------------------


def test_remove_and_reset(rng):
    m, d, damp = 5, 20, 0.1
    op = DynamicIHVP(m, d, damp=damp, dtype="float64")
    grads = [rng.standard_normal(d) for _ in range(7)]
    for g in grads:
        op.update(g)
    window = grads[-m:]
    slots = op.slots
    op.remove(slots[2])
    del window[2]
    op.remove_oldest()
    del window[0]
    assert len(op) == 3
    x = rng.standard_normal(d)
    assert_close(
        op.matvec(x),
        SpectralOracle(np.array(window), damp).matvec(x),
        kappa=condition_number(np.array(window), damp),
    )
    g = rng.standard_normal(d)
    op.update(g)  # goes to a free slot; nothing is dropped
    window.append(g)
    assert len(op) == 4
    assert_close(
        op.matvec(x),
        SpectralOracle(np.array(window), damp).matvec(x),
        kappa=condition_number(np.array(window), damp),
    )
    op.reset()
    assert len(op) == 0
    assert_close(op.matvec(x), x / damp)
    with pytest.raises(ValueError, match="empty"):
        op.remove_oldest()


def test_zero_init_removal_zeroes_the_slot_and_it_is_replaced_next(rng):
    m, d, damp = 4, 9, 0.3
    op = DynamicIHVP(m, d, damp=damp, dtype="float64", options=WindowOptions(zero_init=True))
    grads = [rng.standard_normal(d) for _ in range(m)]
    for g in grads:
        op.update(g)
    victim = op.slots[2]
    op.remove(victim)
    assert len(op) == m and op.slots[0] == victim
    rows = [np.zeros(d), grads[0], grads[1], grads[3]]
    x = rng.standard_normal(d)
    assert_close(
        op.matvec(x),
        SpectralOracle(np.array(rows), damp).matvec(x),
        kappa=condition_number(np.array(rows), damp),
    )
    op.update(grads[2])
    assert op.slots[-1] == victim


# -- checkpoints ---------------------------------------------------------------------------------


def test_state_dict_round_trip_is_bit_for_bit(xp_device, rng):
    xp_device.skip_if_immutable()
    m, d = 5, 16
    kw = {"damp": 0.1, "dtype": "float32", "xp": xp_device.xp, "device": xp_device.device}
    a = DynamicIHVP(m, d, **kw)
    grads = [xp_device.asarray(rng.standard_normal(d), "float32") for _ in range(12)]
    for g in grads[:8]:
        a.update(g)
    b = DynamicIHVP(m, d, **kw)
    b.load_state_dict(a.state_dict())
    for g in grads[8:]:
        np.testing.assert_array_equal(
            to_numpy(a.update_and_matvec(g)), to_numpy(b.update_and_matvec(g))
        )
    assert a.slots == b.slots
    # The state holds copies: changing the source afterwards changes nothing.
    state = a.state_dict()
    a.update(grads[0])
    b.load_state_dict(state)
    assert b.slots != a.slots


def test_load_state_dict_refuses_mismatches(rng):
    a = DynamicIHVP(4, 10, damp=0.1, dtype="float64")
    a.update(rng.standard_normal(10))
    state = a.state_dict()
    with pytest.raises(ValueError, match="num_grads, dim"):
        DynamicIHVP(5, 10, damp=0.1, dtype="float64").load_state_dict(state)
    with pytest.raises(ValueError, match="damp"):
        DynamicIHVP(4, 10, damp=0.2, dtype="float64").load_state_dict(state)
    with pytest.raises(TypeError, match="dtype"):
        DynamicIHVP(4, 10, damp=0.1, dtype="float32").load_state_dict(state)
    bad = dict(state, grads=np.zeros((4, 11)))
    with pytest.raises(ValueError, match="shape"):
        DynamicIHVP(4, 10, damp=0.1, dtype="float64").load_state_dict(bad)
    bad = dict(state, window_slots=[0, 0])
    with pytest.raises(ValueError, match="inconsistent"):
        DynamicIHVP(4, 10, damp=0.1, dtype="float64").load_state_dict(bad)
    with pytest.raises(ValueError, match="not a DynamicIHVP state_dict"):
        DynamicIHVP(4, 10, damp=0.1, dtype="float64").load_state_dict({"grads": 1})


# -- bad input -----------------------------------------------------------------------------------


def test_constructor_refuses_bad_arguments():
    for kwargs, exc, match in [
        ({"damp": 0.0}, ValueError, "damp"),
        ({"damp": -1.0}, ValueError, "damp"),
        ({"damp": math.nan}, ValueError, "damp"),
        ({"damp": 1.0, "dtype": "int32"}, TypeError, "dtype"),
        ({"damp": 1.0, "update_method": "fast"}, ValueError, "update_method"),
    ]:
        kwargs.setdefault("dtype", "float64")
        with pytest.raises(exc, match=match):
            DynamicIHVP(3, 5, **kwargs)
    with pytest.raises(ValueError, match="refactor_every"):  # where the options are built
        DynamicIHVP(3, 5, damp=1.0, dtype="float64", options=WindowOptions(refactor_every=-1))
    with pytest.raises(ValueError, match="num_grads"):
        DynamicIHVP(0, 5, damp=1.0, dtype="float64")
    with pytest.raises(ValueError, match="dim"):
        DynamicIHVP(3, 0, damp=1.0, dtype="float64")
    with pytest.raises(TypeError, match="num_grads"):
        DynamicIHVP(2.5, 5, damp=1.0, dtype="float64")


def test_a_window_or_gram_no_array_can_hold_is_refused_naming_its_sizes():
    # NumPy (beneath PyTorch's CPU windows and array-api-strict's) said only "Maximum
    # allowed dimension exceeded" or "array is too big", naming no argument; each case
    # is checked before either buffer is made (nothing is allocated).
    torch = pytest.importorskip("torch")
    strict = pytest.importorskip("array_api_strict")
    huge, big = 10**19, 10**10
    window = r"window: num_grads=2 x dim=10000000000000000000 values of {} bytes"
    gram = r"Gram matrix: num_grads=10000000000 x num_grads=10000000000 values of 8 bytes"
    cases = [
        (2, huge, "float32", None, window.format(4)),
        (2, huge, "float64", strict, window.format(8)),
        (2, huge, torch.float32, torch, window.format(4)),
        (2, huge, "float16", None, window.format(2)),
        (2, huge, torch.bfloat16, torch, window.format(2)),
        (big, big, "float32", None, r"window: num_grads=10000000000 x dim=10000000000"),
        # A window small enough to allocate beside a Gram matrix that is not.
        (big, 1, "float64", None, gram),
        (big, 1, "float32", strict, gram),
        (big, 1, torch.float16, torch, gram),
    ]
    for m, d, dtype, xp, match in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=match):
                DynamicIHVP(m, d, damp=0.1, dtype=dtype, xp=xp)


def test_bad_gradients_are_refused_and_leave_the_window_unchanged(rng, strict_device1):
    op = DynamicIHVP(3, 6, damp=0.1, dtype="float64")
    for _ in range(4):
        op.update(rng.standard_normal(6))
    state = op.state_dict()
    x = rng.standard_normal(6)
    before = op.matvec(x)
    torch = pytest.importorskip("torch")
    for g, exc, match in [
        (rng.standard_normal(5), ValueError, "shape"),
        (rng.standard_normal((6, 1)), ValueError, "shape"),
        (np.arange(6), TypeError, "floating"),
        (np.array([1.0, np.nan, 0, 0, 0, 0]), ValueError, "NaN"),
        (np.array([1.0, np.inf, 0, 0, 0, 0]), ValueError, "NaN"),
        (torch.zeros(6, dtype=torch.float64), TypeError, "torch"),
        ([0.0] * 6, TypeError, "array"),
    ]:
        with pytest.raises(exc, match=match):
            op.update(g)
        with pytest.raises(exc, match=match):
            op.update_and_matvec(g)
    np.testing.assert_array_equal(op.matvec(x), before)
    assert op.slots == state["window_slots"]
    single = DynamicIHVP(3, 6, damp=0.1, dtype="float32")
    single.update(rng.standard_normal(6).astype(np.float32))
    before32 = single.state_dict()
    with pytest.raises(TypeError, match="dtype"):  # float64 into float32 would lose precision
        single.update(rng.standard_normal(6))
    assert single.slots == before32["window_slots"]
    strict = DynamicIHVP(3, 6, damp=0.1, dtype="float64", xp=strict_device1.xp)
    with pytest.raises(ValueError, match="device"):
        strict.update(strict_device1.asarray(rng.standard_normal(6), "float64"))


def test_remove_refuses_unknown_slots(rng):
    op = DynamicIHVP(3, 4, damp=0.1, dtype="float64")
    op.update(rng.standard_normal(4))
    for slot in (1, -1, 3, np.int64(2)):
        with pytest.raises(ValueError, match="holds no gradient"):
            op.remove(slot)
    for slot in (0.0, True, "0", None):  # slot 0 holds the gradient: the type is what is wrong
        with pytest.raises(TypeError, match=r"slot must be an int .*\[0\]"):
            op.remove(slot)
    assert op.slots == [0]
    op.remove(np.int64(0))
    assert op.slots == []


def test_a_damping_mismatch_on_load_prints_every_digit():
    # Regression: a 0-d tensor damping printed as tensor(0.0010) (and was refused).
    torch = pytest.importorskip("torch")
    op = DynamicIHVP(2, 4, damp=1e-3, dtype="float64")
    op.update(np.ones(4))
    state = op.state_dict()
    state["damp"] = torch.tensor(1.0000001e-3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"damp=0\.0010000001, this operator damp=0\.001;"):
        op.load_state_dict(state)
    assert op.load_state_dict(state, damp=1e-3) is None and op.damp == 1e-3


def test_gradient_with_hopeless_damping_fails_cleanly():
    """kappa far above 1/eps(float64): a clear error, and the window is unchanged.

    The gradient alone makes the window hopeless (|g|^2 / (m damp) = 2.7e28), so it
    is refused before a duplicate of it could make the factorisation fail.
    """
    g = np.full(8, 1e8)
    op = DynamicIHVP(3, 8, damp=1e-12, dtype="float64", options=WindowOptions(zero_init=True))
    op.update(np.full(8, 1e-3))
    before = op.state_dict()
    with pytest.raises(ValueError, match=r"too large for this window.*kappa >= 2.67e\+28"):
        op.update(g)
    after = op.state_dict()
    assert after["window_slots"] == before["window_slots"]
    np.testing.assert_array_equal(after["factor"], before["factor"])
    np.testing.assert_array_equal(after["grads"], before["grads"])


# -- stateful property test ---------------------------------------------------------------------


class WindowMachine(RuleBasedStateMachine):
    """Random inserts, replacements and removals against a plain list of the window."""

    def __init__(self) -> None:
        super().__init__()
        self.rng = np.random.default_rng(0)

    @initialize(
        m=st.integers(1, 6),
        d=st.integers(1, 12),
        log_damp=st.floats(-3.0, 1.0),
        zero_init=st.booleans(),
        method=st.sampled_from(["incremental", "refactor"]),
    )
    def setup(self, m, d, log_damp, zero_init, method):
        self.m, self.d, self.damp, self.zero_init = m, d, 10.0**log_damp, zero_init
        self.op = DynamicIHVP(
            m,
            d,
            damp=self.damp,
            dtype="float64",
            options=WindowOptions(
                zero_init=zero_init,
                refactor_every=0 if method == "refactor" else max(1, m // 2 + 1),
            ),
        )
        self.window: list[tuple[int, np.ndarray]] = []  # (slot, gradient), oldest first

    def _insert(self, g: np.ndarray, with_product: bool) -> None:
        y = self.op.update_and_matvec(g) if with_product else self.op.update(g)
        if len(self.window) == self.m:
            self.window.pop(0)
        elif self.zero_init:
            pass
        self.window.append((self.op.slots[-1], g))
        if with_product:
            want, kappa = self._oracle(g)
            close_where_promised(y, want, kappa=kappa)

    def _rows(self) -> list[np.ndarray]:
        return [g for _, g in self.window]

    def _oracle(self, x: np.ndarray):
        """``F^{-1} x`` and the error scale of its product: ``kappa * ||x|| / (damp ||y||)``.

        The amplification ``||x|| / (damp ||y||)`` (between 1 and kappa) is part of the
        documented bound (docs/mathematics.rst, "Precision"): the windows drawn here have
        more gradients than coordinates, so random vectors lie in their span.
        """
        want, kappa = _oracle_product(self._rows(), self.m, self.d, self.zero_init, self.damp, x)
        norm = float(np.linalg.norm(want))
        amplification = float(np.linalg.norm(x)) / (self.damp * norm) if norm > 0 else 1.0
        return want, kappa * max(1.0, amplification)

    @rule(scale=st.floats(1e-2, 1e2), product=st.booleans())
    def insert_random(self, scale, product):
        self._insert(self.rng.standard_normal(self.d) * scale, product)

    @precondition(lambda self: self.window)
    @rule(which=st.integers(0, 10), product=st.booleans())
    def insert_duplicate(self, which, product):
        self._insert(self._rows()[which % len(self.window)].copy(), product)

    @rule()
    def insert_zero(self):
        self._insert(np.zeros(self.d), False)

    @precondition(lambda self: self.window)
    @rule(which=st.integers(0, 10))
    def remove_slot(self, which):
        slot, _ = self.window.pop(which % len(self.window))
        self.op.remove(slot)

    @precondition(lambda self: self.window)
    @rule()
    def remove_oldest(self):
        if self.zero_init:
            # In zero_init mode the oldest slot may hold a zero gradient that the
            # model does not list; remove the model's oldest explicitly.
            slot, _ = self.window.pop(0)
            self.op.remove(slot)
        else:
            self.window.pop(0)
            self.op.remove_oldest()

    @rule()
    def reset(self):
        self.op.reset()
        self.window.clear()

    # -- failures: each must leave the operator exactly as the model says ----------------

    def _unchanged_after(self, call, exc) -> None:
        before = self.op.state_dict()
        with pytest.raises(exc):
            call()
        _assert_same_state(self.op.state_dict(), before)

    @rule(
        bad=st.sampled_from([np.nan, np.inf, -np.inf]),
        where=st.integers(0, 11),
        product=st.booleans(),
    )
    def insert_non_finite(self, bad, where, product):
        g = self.rng.standard_normal(self.d)
        g[where % self.d] = bad
        self._unchanged_after(
            lambda: self.op.update_and_matvec(g) if product else self.op.update(g), ValueError
        )

    @rule(product=st.booleans())
    def insert_with_failing_factorisation(self, product):
        # Every factorisation and row edit fails: the insertion must raise
        # FactorizationError and put back the row it had written.
        g = self.rng.standard_normal(self.d)

        def fail(*args, **kwargs):
            raise NotPositiveDefinite("injected")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mfac_core._linalg, "cholesky", fail)
            mp.setattr(mfac_core._linalg, "replace_row", fail)
            self._unchanged_after(
                lambda: self.op.update_and_matvec(g) if product else self.op.update(g),
                FactorizationError,
            )

    @precondition(lambda self: self.window and not self.zero_init)
    @rule(which=st.integers(0, 10))
    def remove_with_failing_factorisation(self, which):
        slot, _ = self.window[which % len(self.window)]

        def fail(*args, **kwargs):
            raise NotPositiveDefinite("injected")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mfac_core._linalg, "cholesky", fail)
            if len(self.window) > 1:
                self._unchanged_after(lambda: self.op.remove(slot), FactorizationError)

    @rule(
        corruption=st.sampled_from(
            [
                "missing",
                "permuted",
                "nan-factor",
                "gram",
                "grads-shape",
                "slots",
                "version",
                "dtype",
            ]
        )
    )
    def load_corrupted_state(self, corruption):
        state = self.op.state_dict()
        bad = _corrupt(state, corruption)
        if bad is None:
            return  # this corruption needs a window of at least two gradients
        self._unchanged_after(lambda: self.op.load_state_dict(bad), (ValueError, TypeError))

    @invariant()
    def matches_oracle(self):
        if not hasattr(self, "op"):
            return
        if not self.zero_init:
            assert len(self.op) == len(self.window)
            assert self.op.slots == [s for s, _ in self.window]
        x = self.rng.standard_normal(self.d)
        want, kappa = self._oracle(x)
        close_where_promised(self.op.matvec(x), want, kappa=kappa)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def _corrupt(state: dict, how: str) -> dict | None:
    """A copy of a DynamicIHVP state dict with one kind of damage (None if not applicable)."""
    bad = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    k = len(bad["window_slots"])
    if how == "missing":
        del bad["factor"]
    elif how == "permuted":
        if k < 2 or len(set(bad["factor_slots"])) < 2:
            return None
        slots = list(bad["factor_slots"])
        slots[0], slots[-1] = slots[-1], slots[0]
        gram = bad["gram"][np.ix_(slots, slots)]
        if np.allclose(
            gram,
            bad["gram"][np.ix_(bad["factor_slots"], bad["factor_slots"])],
            rtol=1e-6,
            atol=1e-12 * max(1.0, float(np.abs(gram).max())),
        ):
            return None  # swapping two equal gradients changes nothing
        bad["factor_slots"] = slots
    elif how == "nan-factor":
        if not k:
            return None
        bad["factor"][-1, -1] = np.nan
    elif how == "gram":
        if not k or not np.any(bad["grads"]):
            return None
        slot = bad["window_slots"][-1]
        bad["gram"][slot, slot] = 4 * bad["gram"][slot, slot] + 1.0
    elif how == "grads-shape":
        bad["grads"] = bad["grads"][:, :-1]
    elif how == "slots":
        bad["window_slots"] = list(bad["window_slots"]) + list(bad["window_slots"][:1] or [0])
    elif how == "version":
        bad["version"] = 99
    elif how == "dtype":
        bad["grads"] = bad["grads"].astype(np.float32)
    return bad


WindowMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_window_state_machine = WindowMachine.TestCase


# -- checkpoints that do not add up ------------------------------------------------------------


@pytest.mark.parametrize(
    "corruption",
    ["missing", "permuted", "nan-factor", "gram", "grads-shape", "slots", "version", "dtype"],
)
@pytest.mark.parametrize("zero_init", [False, True])
def test_load_state_dict_refuses_inconsistent_states_and_changes_nothing(
    corruption, zero_init, rng
):
    m, d = 6, 20
    src = DynamicIHVP(m, d, damp=0.1, dtype="float64", options=WindowOptions(zero_init=zero_init))
    for _ in range(9):  # wraps around: the factor order differs from the window order
        src.update(rng.standard_normal(d) * rng.uniform(0.5, 3.0))
    bad = _corrupt(src.state_dict(), corruption)
    assert bad is not None
    dst = DynamicIHVP(m, d, damp=0.1, dtype="float64", options=WindowOptions(zero_init=zero_init))
    dst.update(rng.standard_normal(d))
    before = dst.state_dict()
    x = rng.standard_normal(d)
    y = dst.matvec(x)
    with pytest.raises((ValueError, TypeError)) as info:
        dst.load_state_dict(bad)
    assert not isinstance(info.value, KeyError)
    _assert_same_state(dst.state_dict(), before)
    np.testing.assert_array_equal(dst.matvec(x), y)
    dst.load_state_dict(src.state_dict())  # a sound state still loads
    np.testing.assert_array_equal(dst.matvec(x), src.matvec(x))


def test_load_state_dict_of_version_1(rng):
    src = DynamicIHVP(4, 10, damp=0.1, dtype="float64")
    for _ in range(6):
        src.update(rng.standard_normal(10))
    state = src.state_dict()
    old = {k: v for k, v in state.items() if k not in ("window_slots", "factor_slots", "edits")}
    old.update(
        version=1,
        age_order=state["window_slots"],
        factor_order=state["factor_slots"],
        since_refactor=state["edits"],
    )
    dst = DynamicIHVP(4, 10, damp=0.1, dtype="float64")
    # A key missing from it is named as version 1 names it (it said "lacks window_slots",
    # a key that no version 1 state has).
    for key in ("age_order", "factor_order", "since_refactor"):
        partial = {k: v for k, v in old.items() if k != key}
        with pytest.raises(ValueError, match=rf"state_dict lacks {key}$"):
            dst.load_state_dict(partial)
    dst.load_state_dict(old)
    x = rng.standard_normal(10)
    np.testing.assert_array_equal(dst.matvec(x), src.matvec(x))


def test_load_state_dict_takes_its_sizes_as_ints(rng):
    # An array of sizes raised NumPy's "The truth value of an array with more than one
    # element is ambiguous", naming no key; a float size passed as the int it equals.
    src = DynamicIHVP(3, 8, damp=0.1, dtype="float64")
    src.update(rng.standard_normal(8))
    state = src.state_dict()
    dst = DynamicIHVP(3, 8, damp=0.1, dtype="float64")
    before = dst.state_dict()
    for key, value in [("num_grads", np.array([3, 3])), ("dim", 8.0), ("num_grads", True)]:
        with pytest.raises(ValueError, match=rf"^state\['{key}'\] must be an int"):
            dst.load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match=r"is for num_grads, dim = \(3, 9\)"):
        dst.load_state_dict({**state, "dim": 9})
    _assert_same_state(dst.state_dict(), before)
    dst.load_state_dict({**state, "num_grads": np.int64(3)})  # NumPy's ints are ints


def test_load_state_dict_refuses_unknown_keys(rng):
    # They were dropped unread: a misspelt "exact_gram" loaded the state with the looser
    # Gram check of states saved before it, without a word.
    src = DynamicIHVP(3, 8, damp=0.1, dtype="float64")
    for _ in range(4):
        src.update(rng.standard_normal(8))
    state = src.state_dict()
    dst = DynamicIHVP(3, 8, damp=0.1, dtype="float64")
    before = dst.state_dict()
    for key in ("exact_grams", "window"):
        with pytest.raises(ValueError, match=rf"unknown keys \['{key}'\]"):
            dst.load_state_dict({**state, key: True})
        with pytest.raises(ValueError, match="unknown keys"):
            dst.check_state_dict({**state, key: True})
        after = dst.state_dict()
        assert all(np.array_equal(after[k], before[k]) for k in before)
    dst.load_state_dict(state)
    x = rng.standard_normal(8)
    np.testing.assert_array_equal(dst.matvec(x), src.matvec(x))


def _unit_window(dtype: str, zero_init: bool = False) -> DynamicIHVP:
    # Unit-norm gradients (as after clipping): their Gram diagonal is all ones, so a
    # check of the diagonal alone cannot see a negated, swapped or replaced gradient.
    rng = np.random.default_rng(11)
    op = DynamicIHVP(5, 40, damp=1e-3, dtype=dtype, options=WindowOptions(zero_init=zero_init))
    for _ in range(7):
        g = rng.standard_normal(40)
        op.update((g / np.linalg.norm(g)).astype(dtype))
    return op


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("edit", ["negated", "swapped", "replaced"])
def test_load_state_dict_checks_the_whole_gram_against_the_gradients(dtype, edit):
    # Regression: only the Gram diagonal was compared with the stored rows, so these
    # states loaded and later products were off by up to 450x.
    src = _unit_window(dtype)
    bad = src.state_dict()
    grads = bad["grads"] = bad["grads"].copy()
    a, b = bad["window_slots"][:2]
    if edit == "negated":
        grads[a] = -grads[a]
    elif edit == "swapped":
        grads[[a, b]] = grads[[b, a]]
    else:
        g = np.random.default_rng(12).standard_normal(40)
        grads[a] = (g / np.linalg.norm(g)).astype(dtype)
    dst = _unit_window(dtype, zero_init=False)
    dst.reset()
    before = dst.state_dict()
    with pytest.raises(ValueError, match="Gram matrix does not match its gradients"):
        dst.load_state_dict(bad)
    with pytest.raises(ValueError, match="Gram matrix does not match its gradients"):
        dst.check_state_dict(bad)
    _assert_same_state(dst.state_dict(), before)
    dst.load_state_dict(src.state_dict())  # the sound state loads, bit for bit
    x = np.ones(40, dtype=dtype)
    np.testing.assert_array_equal(dst.matvec(x), src.matvec(x))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_load_state_dict_names_a_changed_gram_not_the_factor(dtype):
    # An off-diagonal Gram entry (and its mirror) changed by 1e-3 of its size: the factor,
    # computed from the Gram as it was, matches neither, and the refusal blamed the factor
    # ("a permuted slot order or a corrupted factor"), which is as saved.
    src = _unit_window(dtype)
    bad = src.state_dict()
    gram = bad["gram"] = bad["gram"].copy()
    a, b = bad["window_slots"][:2]
    gram[a, b] = gram[b, a] = gram[a, b] + 1e-3 * np.sqrt(gram[a, a] * gram[b, b])
    dst = _unit_window(dtype)
    before = dst.state_dict()
    for load in (dst.load_state_dict, dst.check_state_dict):
        with pytest.raises(ValueError, match="Gram matrix does not match its gradients"):
            load(bad)
    _assert_same_state(dst.state_dict(), before)
    # A factor changed alone is still named as the factor.
    U = src.state_dict()["factor"].copy()
    U[0, -1] += 1e-3 * np.abs(U).max()
    with pytest.raises(ValueError, match="factor does not match its Gram matrix"):
        dst.load_state_dict({**src.state_dict(), "factor": U})
    _assert_same_state(dst.state_dict(), before)


def test_load_state_dict_tolerates_the_rounding_its_gram_carries():
    # The stored Gram was summed in float64 (exact_gram): an entry off by a float64 unit
    # of the row norms loads, one off by 1e-9 does not (d = 40: the bound is 4 (d + 1)
    # eps64 = 3.6e-14). An older state, without the flag, was summed in float32 and may
    # carry float32's rounding (4 (d + 1) eps32 = 2e-5). The factor's own check allows
    # 1e-7, so the Gram check alone decides here.
    src = _unit_window("float32", zero_init=True)
    state = src.state_dict()
    assert state["exact_gram"] is True
    a, b = state["window_slots"][:2]

    def nudged(by: float, **extra) -> dict:
        gram = state["gram"].copy()
        gram[a, b] += by
        gram[b, a] += by
        return {**state, "gram": gram, **extra}

    dst = _unit_window("float32", zero_init=True)
    dst.load_state_dict(nudged(float(np.finfo(np.float64).eps)))
    with pytest.raises(ValueError, match="Gram matrix does not match its gradients"):
        dst.load_state_dict(nudged(1e-9))
    old = nudged(1e-9)
    del old["exact_gram"]
    dst.load_state_dict(old)
    assert dst._exact_gram is False  # a failed edit recomputes such a Gram in float64


# -- refinement ------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_init", [False, True])
def test_refinement_of_the_window_mean(zero_init):
    rng = np.random.default_rng(3)
    m, d = 12, 200
    G = 0.1 * rng.standard_normal((m, d)) + rng.standard_normal(d)
    damp = float(np.linalg.norm(G, 2)) ** 2 / (m * 1e8)
    ops = [
        DynamicIHVP(
            m, d, damp=damp, dtype="float64", options=WindowOptions(zero_init=zero_init, refine=k)
        )
        for k in (0, 1)
    ]
    for g in G:
        steps = [op.update_and_matvec(g) for op in ops]
    F = damp * np.eye(d) + G.T @ G / m
    eps = float(np.finfo(np.float64).eps)

    def backward_error(y, x):
        return float(
            np.linalg.norm(x - F @ y)
            / (np.linalg.norm(F, 2) * np.linalg.norm(y) + np.linalg.norm(x))
        )

    x = G.mean(axis=0)
    plain, refined = (backward_error(op.matvec(x), x) for op in ops)
    assert refined <= 10 * eps < plain
    assert backward_error(steps[1], G[-1]) <= 10 * eps


def test_hopeless_windows_warn_on_every_path(rng):
    # Regression: only StaticIHVP warned when eps * kappa >= 1 (eps64 now: the factor and
    # the passes are float64 for every storage dtype). kappa ~ 1e18 here.
    G = rng.standard_normal((6, 40)).astype(np.float32)
    with pytest.warns(IllConditionedWarning):
        DynamicIHVP.from_window(G, damp=1e-17)
    op = DynamicIHVP.from_window(G, damp=1.0)
    with pytest.warns(IllConditionedWarning):
        op.set_damp(1e-17)
    # A gradient inserted into such a window is refused instead (it cannot be stored
    # usefully), as by the JAX window; the window stays as it was.
    op = DynamicIHVP(6, 40, damp=1e-17, dtype="float32", options=WindowOptions(refactor_every=0))
    with pytest.raises(ValueError, match="too large for this window"):
        op.update(G[0])
    assert len(op) == 0


def test_a_refused_step_does_not_warn_of_the_factor_it_threw_away():
    # MFAC(errors="raise")'s step (_update_and_matvec_checked(strict=True)) refuses a
    # product that is not finite before the window commits to it. On the refactorisation
    # path the factor it threw away warned IllConditionedWarning, and the warn-once note
    # was put back, so the committed insert warned again.
    eps = np.finfo(np.float64).eps
    u = np.zeros(20)
    u[0] = 1.0
    op = DynamicIHVP(4, 20, damp=1.0, dtype="float64")
    # Collinear gradients, |g_k|^2 / damp = k t with t = eps**(-2/3) / 1.75: two keep the
    # window below the warning (eps kappa**1.5 >= 1: kappa ~ 1.5 t = 0.86 eps**(-2/3)),
    # the third takes it past (kappa ~ 2 t = 1.14 eps**(-2/3)); none is refused (that
    # takes eps kappa >= 1).
    grads = [u * math.sqrt(k * eps ** (-2 / 3) / 1.75) for k in (1, 2, 3)]
    op.update(grads[0])
    op.update(grads[1])
    before = (op.slots, op.matvec(u))
    finish = op._finish
    op._finish = lambda *a: finish(*a) + np.inf  # the product overflows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = op._update_and_matvec_checked(grads[2], strict=True).status
    del op._finish
    assert status == "step not finite"
    assert not caught, [str(w.message) for w in caught]
    assert op.slots == before[0]
    np.testing.assert_array_equal(op.matvec(u), before[1])
    with pytest.warns(IllConditionedWarning, match="ill-conditioned"):
        op.update(grads[2])  # committed: warned once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.update(grads[2])  # refactorised, still hopeless: not warned again


@pytest.mark.parametrize("zero_init", [False, True])
def test_a_row_edit_warns_of_a_gradient_that_makes_the_window_hopeless(rng, zero_init):
    # Regression: only a refactorisation warned (eps kappa**1.5 >= 1), so a full window
    # took such a gradient by a row edit in silence; the warning came at the next
    # refactorisation, from an unrelated update. Where warnings are errors, that update
    # and every later one were refused (each refactorises and warns again): the window
    # stayed stuck, the hopeless gradient in it for good.
    eps = np.finfo(np.float64).eps
    damp, d, m = 1e-2, 20, 4
    op = DynamicIHVP(
        m,
        d,
        damp=damp,
        dtype="float64",
        options=WindowOptions(zero_init=zero_init, refactor_every=8),
    )
    for g in rng.standard_normal((m, d)):
        op.update(g)
    # |g|^2 / (m damp) = eps**(-0.8): past the warning (eps kappa**1.5 >= 1), short of
    # the refusal (eps kappa >= 1).
    big = rng.standard_normal(d)
    big *= math.sqrt(eps ** (-0.8) * m * damp) / np.linalg.norm(big)
    x = rng.standard_normal(d)
    before = (op.slots, op.state_dict()["edits"], op.matvec(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(IllConditionedWarning):
            op.update(big)  # a row edit (edits < refactor_every), refused
        assert (op.slots, op.state_dict()["edits"]) == before[:2]
        np.testing.assert_array_equal(op.matvec(x), before[2])
        for g in rng.standard_normal((2 * m + 8, d)):
            op.update(g)  # the window goes on (refactorising on the way)
    with pytest.warns(IllConditionedWarning, match="ill-conditioned"):
        op.update(big)  # taken: warned as it comes in
    assert op.state_dict()["edits"] > 0  # by a row edit


def _collinear_window(zero_init, refactor_every=1000, num_grads=4):
    """A window (of 4 unless told) whose row edits (no refactorisation) are what is tested."""
    return DynamicIHVP(
        num_grads,
        20,
        damp=1e-2,
        dtype="float64",
        options=WindowOptions(zero_init=zero_init, refactor_every=refactor_every),
    )


@pytest.mark.parametrize("zero_init", [True, False])
def test_row_edits_warn_of_nearly_collinear_gradients_hopeless_together(rng, zero_init):
    # Each gradient's own bound 1 + |g|^2 / (m damp) is 1e10, short of the warning (eps
    # kappa**1.5 >= 1 from 2.7e10); four nearly collinear ones make kappa about 4e10. Row
    # edits judged the new gradient's bound only: the window took them in silence until
    # its next refactorisation.
    op = _collinear_window(zero_init)
    m, d = op.num_grads, op.dim
    for g in rng.standard_normal((m, d)):
        op.update(g)  # full: the gradients below replace these by row edits
    edits = op.state_dict()["edits"]
    base = rng.standard_normal(d)
    base *= math.sqrt(1e10 * m * op.damp) / np.linalg.norm(base)
    G = base + 1e-6 * rng.standard_normal((m, d)) * np.linalg.norm(base)
    with pytest.warns(IllConditionedWarning, match="ill-conditioned") as caught:
        for g in G:
            op.update(g)
    assert len(caught) == 1
    assert op.state_dict()["edits"] == edits + m  # each taken by a row edit
    assert np.finfo(np.float64).eps * condition_number(G, op.damp) ** 1.5 >= 1  # true


def collinear_gradients(rng, m, d, damp, signs, count):
    """``count`` gradients ``+-(u + 1e-6 |u| noise)``, ``|u|^2 = 1e10 m damp``: each
    short of the warning alone, the third nearly collinear one makes kappa about 3e10.
    ``signs``: "alternating" (``u, -u, u, ...``) or "same"."""
    base = rng.standard_normal(d)
    base *= math.sqrt(1e10 * m * damp) / np.linalg.norm(base)
    noise = 1e-6 * np.linalg.norm(base) * rng.standard_normal((count, d))
    sign = (-1.0) ** np.arange(count) if signs == "alternating" else np.ones(count)
    return sign[:, None] * (base + noise)


def first_warnings(op, window, gradients, convert=lambda g: g):
    """Update ``op`` (holding ``window``) with ``gradients``: the indices of the ones
    that warned, and of the first with which the window is truly hopeless."""
    eps = np.finfo(np.float64).eps
    warned, hopeless = [], None
    for i, g in enumerate(gradients):
        window = [*window[1:], g]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op.update(convert(g))
        if any(issubclass(w.category, IllConditionedWarning) for w in caught):
            warned.append(i)
        kappa = condition_number(np.array(window), op.damp)
        if hopeless is None and eps * kappa**1.5 >= 1:
            hopeless = i
    return warned, hopeless


@pytest.mark.parametrize("zero_init", [True, False])
@pytest.mark.parametrize("signs", ["alternating", "same"])
def test_row_edits_warn_of_collinear_gradients_spread_in_sign_or_among_others(
    rng, zero_init, signs
):
    # The edited Gram's quotient with the ones vector (the row edit's only bound beyond
    # |g|^2) cancels for gradients spread in sign, and dilutes k collinear ones among m
    # by k / m: alternating, the window took them in silence until its next
    # refactorisation (here none); of one sign, it warned at the fifth of eight, not
    # the third. The new Gram row's own quotient warns with the gradient that makes the
    # window hopeless, and only once.
    op = _collinear_window(zero_init, num_grads=8)
    m, d = op.num_grads, op.dim
    window = list(rng.standard_normal((m, d)))
    for g in window:
        op.update(g)  # full: the gradients below replace these by row edits
    edits = op.state_dict()["edits"]
    warned, hopeless = first_warnings(op, window, collinear_gradients(rng, m, d, op.damp, signs, m))
    assert hopeless == 2  # the third makes the window hopeless (2.7e10 < 3e10)
    assert warned == [hopeless]
    assert op.state_dict()["edits"] == edits + m  # each taken by a row edit


def test_a_window_that_recovered_by_row_edits_warns_of_the_next_hopeless_gradient(rng):
    # The warn-once note was cleared by a refactorisation only: after the first hopeless
    # gradient had left by row edits, a second one came in silence.
    op = _collinear_window(True)
    m, d = op.num_grads, op.dim
    eps = np.finfo(np.float64).eps

    def big():
        g = rng.standard_normal(d)
        return g * math.sqrt(eps ** (-0.8) * m * op.damp) / np.linalg.norm(g)

    with pytest.warns(IllConditionedWarning):
        op.update(big())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for g in rng.standard_normal((m, d)):
            op.update(g)  # it leaves: no warning on the way
    with pytest.warns(IllConditionedWarning):
        op.update(big())
    assert op.state_dict()["edits"] > m  # all by row edits


def test_a_far_larger_leaving_gradient_keeps_the_warn_once_note_of_a_hopeless_window(rng):
    # The host's upper bound was the old trace less the leaving entry plus the new one: a
    # leaving gradient 1e17 times the others' squared norms (possible after set_damp) took
    # their digits, the bound fell below the rule and cleared the note of a window still
    # hopeless, which then warned again at the next edit (the device's sum did not).
    m, d = 4, 16
    op = DynamicIHVP(m, d, damp=1e4, dtype="float64", options=WindowOptions(refactor_every=1000))
    big = rng.standard_normal(d)
    big *= math.sqrt(1e19) / np.linalg.norm(big)  # |g|^2 / damp = 1e15: taken
    with pytest.warns(IllConditionedWarning):
        op.update(big)
    for g in rng.standard_normal((m - 1, d)):
        op.update(g)
    with pytest.warns(IllConditionedWarning):
        op.set_damp(1e-12)  # the others alone: kappa about 1e13 (a new damping warns anew)
    edits = op.state_dict()["edits"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for g in 1e-3 * rng.standard_normal((2, d)):
            op.update(g)  # the big one leaves first: the window stays hopeless, warned of
    window = op.window()
    eps = np.finfo(np.float64).eps
    assert eps * condition_number(window, op.damp) ** 1.5 >= 1
    assert op.state_dict()["edits"] == edits + 2  # by row edits


def test_remove_takes_numpy_integers_and_copies_are_independent(rng):
    import copy

    op = DynamicIHVP(3, 20, damp=1.0, dtype="float64")
    for g in rng.standard_normal((2, 20)):
        op.update(g)
    op.remove(np.int64(op.slots[0]))  # e.g. a slot from np.argmax
    assert len(op) == 1
    twin = copy.copy(op)  # the window is edited in place: a copy must not share it
    x = rng.standard_normal(20)
    before = op.matvec(x)
    twin.update(rng.standard_normal(20))
    np.testing.assert_array_equal(op.matvec(x), before)
    assert (len(op), len(twin)) == (1, 2)


def test_deep_copies_of_a_subclass_go_through_its_pickling_state(rng):
    # Regression: DynamicIHVP.__deepcopy__ took LinearOperator's state, past a
    # subclass's __getstate__: one that left a lock out of its pickles could be pickled
    # but not copied ("cannot pickle '_thread.lock' object").
    import copy
    import threading

    class Locked(DynamicIHVP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tags = ["mine"]
            self.lock = threading.Lock()

        def __getstate__(self):
            state = super().__getstate__()
            del state["lock"]
            return state

        def __setstate__(self, state):
            super().__setstate__(state)
            self.lock = threading.Lock()

    op = Locked(3, 20, damp=0.1, dtype="float64")
    op.update(rng.standard_normal(20))
    x = rng.standard_normal(20)
    twin = copy.deepcopy(op)
    assert twin.tags == ["mine"] and twin.tags is not op.tags
    assert isinstance(twin.lock, type(op.lock)) and twin.lock is not op.lock
    np.testing.assert_array_equal(twin.matvec(x), op.matvec(x))
    twin.update(rng.standard_normal(20))  # its own buffers
    assert (len(op), len(twin)) == (1, 2)


def test_torch_dtype_without_xp_says_to_pass_xp():
    # DynamicIHVP(m, d, dtype=torch.bfloat16) defaults to NumPy buffers; the error
    # used to read as if bfloat16 were not supported at all.
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="pass xp=torch"):
        DynamicIHVP(3, 5, damp=0.1, dtype=torch.bfloat16)
    assert DynamicIHVP(3, 5, damp=0.1, dtype=torch.bfloat16, xp=torch).storage_dtype == "bfloat16"


def test_a_dask_namespace_is_refused_at_construction(rng):
    # A Dask window was built, then failed inside a matmul at the first update.
    da = pytest.importorskip("dask.array")
    with pytest.raises(TypeError, match="DynamicIHVP takes no Dask arrays"):
        DynamicIHVP(3, 5, damp=0.1, dtype=da.float64, xp=da)
    with pytest.raises(TypeError, match="DynamicIHVP takes no Dask arrays"):
        DynamicIHVP.from_window(da.from_array(rng.standard_normal((3, 5))), damp=0.1)


def test_pickles_naming_the_factor_class_in_the_operators_module_load(rng):
    # Pickles made before the operator's modules were split name the slot factor's
    # class mfac_core._dynamic._SlotFactor; they must still load, and work.
    import pickle

    op = DynamicIHVP(3, 20, damp=0.1, dtype="float64")
    for g in rng.standard_normal((4, 20)):
        op.update(g)
    new = b"cmfac_core._dynamic_factor\nSlotFactor\n"
    data = pickle.dumps(op, protocol=0)
    assert new in data
    old = pickle.loads(data.replace(new, b"cmfac_core._dynamic\n_SlotFactor\n"))
    x = rng.standard_normal(20)
    np.testing.assert_array_equal(old.matvec(x), op.matvec(x))
    g = rng.standard_normal(20)
    np.testing.assert_array_equal(old.update_and_matvec(g), op.update_and_matvec(g))


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_largest_magnitude_of_zeros_is_plus_zero_in_every_form(library):
    # The step's range check reads max|g| as max(max g, -min g); maximum of +0.0 and
    # -0.0 returned -0.0 for some signs of zero (NumPy and PyTorch differently), where
    # the generic max(abs(g)) gives +0.0.
    from array_api_compat import array_namespace

    from mfac_core._dynamic_checks import generic_largest_magnitude, largest_magnitude

    if library == "torch":
        torch = pytest.importorskip("torch")
        make = torch.tensor
    else:
        make = np.array
    for values in ([0.0, 0.0], [-0.0, -0.0], [0.0, -0.0], [-0.0, 0.0]):
        for dtype in ("float32", "float64"):
            g = make(np.array(values, dtype=dtype))
            xp = array_namespace(g)
            fast, generic = float(largest_magnitude(xp, g)), float(generic_largest_magnitude(xp, g))
            assert (fast, math.copysign(1.0, fast)) == (generic, 1.0), (values, dtype)


@pytest.mark.parametrize(("dtype", "zero_init"), [("float32", False), ("float16", True)])
def test_a_damping_no_gradient_could_enter_with_is_refused_at_the_door(dtype, zero_init, rng):
    # set_damp (and the constructor, load_state_dict) took a damping with which every
    # later update was refused as too large: now the constructor's rule, naming the
    # smallest damping that works. At it, the smallest nonzero gradient enters.
    m, d = 3, 5
    # update's rule, eps64 (1 + |g|^2 / shift) >= 1, for the smallest nonzero |g|^2 of
    # the dtype and the smallest shift of an empty window (m damp with zero_init).
    norm2, count = float(np.finfo(np.dtype(dtype)).smallest_subnormal) ** 2, m if zero_init else 1
    floor = norm2 / (count * (2.0**52 - 1.0))
    while 2.0**-52 * (1.0 + norm2 / (count * floor)) >= 1.0:
        floor = math.nextafter(floor, math.inf)
    below = math.nextafter(floor, 0.0)
    options = WindowOptions(zero_init=zero_init)
    message = rf"^damp={below!r} is too small .* smallest damping that works is {floor!r}$"
    with pytest.raises(ValueError, match=message):
        DynamicIHVP(m, d, damp=below, dtype=dtype, options=options)
    op = DynamicIHVP(m, d, damp=1.0, dtype=dtype, options=options)
    for g in rng.standard_normal((2, d)).astype(np.float32):
        op.update(g)
    state, x = op.state_dict(), rng.standard_normal(d).astype(np.float32)
    before = op.matvec(x)
    with pytest.raises(ValueError, match=message):
        op.set_damp(below)
    with pytest.raises(ValueError, match=message):
        op.load_state_dict(state, damp=below)
    assert op.damp == 1.0 and len(op) == (m if zero_init else 2)  # nothing changed
    np.testing.assert_array_equal(op.matvec(x), before)
    smallest = np.zeros(d, dtype=np.float32)
    smallest[1] = np.finfo(np.dtype(dtype)).smallest_subnormal
    low = DynamicIHVP(m, d, damp=floor, dtype=dtype, options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)  # at the edge, it may warn
        low.update(smallest)
    assert len(low) == (m if zero_init else 1)
    # float64 windows: any damping the constructor takes (float64's smallest normal
    # number and up) lets a small enough gradient in.
    tiny = DynamicIHVP(m, d, damp=2.2250738585072014e-308, dtype="float64")
    tiny.update(np.full(d, 1e-160))
    assert len(tiny) == 1


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("check_finite", [True, False])
def test_float32_row_write_in_one_loop_matches_the_librarys_own(library, check_finite, monkeypatch):
    """A float32 window's row write through the extension (``_fused.store_row``: the undo
    copy, the row and ``max |g|`` in one read of g) against the library's own copies and
    checks: the same results, the same refusals and statuses (NaN, infinity, a gradient too
    large, whose refusal comes after the row was written), and the window exactly as it was
    after each refusal; NaN with ``check_finite=False`` treated alike."""
    from mfac_core import _fused

    if not _fused.stores(None):
        pytest.skip("the C extension was not built")
    if library == "torch":
        torch = pytest.importorskip("torch")
        xp, asarray = torch, lambda a: torch.from_numpy(np.array(a, np.float32))
    else:
        xp, asarray = None, lambda a: np.array(a, np.float32)
    m, d = 3, 37
    rng = np.random.default_rng(5)
    grads = rng.standard_normal((m + 2, d)).astype(np.float32)
    bad = [grads[0].copy() for _ in range(4)]
    bad[0][4], bad[1][30], bad[2][0] = np.nan, np.inf, -np.inf
    bad[3][:] = 1e30  # finite, too large: refused after the row's write

    def run(own: bool) -> tuple[list, list, dict]:
        with monkeypatch.context() as mp:
            if own:
                mp.setattr(_fused, "stores", lambda storage: False)
            op = DynamicIHVP(m, d, damp=0.1, dtype="float32", xp=xp,
                             options=WindowOptions(check_finite=check_finite))  # fmt: skip
            out = [to_numpy(op.update_and_matvec(asarray(g))) for g in grads]
            before = op.state_dict()
            seen = []
            for b in bad:
                status = op._update_and_matvec_checked(asarray(b))
                seen.append((status.status, str(status.error)))
                try:
                    seen.append(to_numpy(op.update_and_matvec(asarray(b))))
                except ValueError as exc:
                    seen.append(str(exc))
                    after = op.state_dict()
                    for key, value in before.items():
                        if hasattr(value, "shape"):
                            np.testing.assert_array_equal(to_numpy(after[key]), to_numpy(value))
                        else:
                            assert after[key] == value, key
                    continue
                break  # accepted (NaN without the check): the window changed
            return out, seen, op.state_dict()

    out_fast, seen_fast, state_fast = run(False)
    out_own, seen_own, state_own = run(True)
    for a, b in zip(out_fast, out_own, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [s[0] for s in seen_fast[::2]][:4] == ["not finite"] * 3 + ["too large"]
    assert len(seen_fast) == len(seen_own)
    for a, b in zip(seen_fast, seen_own, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
    for key, value in state_own.items():
        if hasattr(value, "shape"):
            np.testing.assert_array_equal(to_numpy(state_fast[key]), to_numpy(value))
        else:
            assert state_fast[key] == value, key


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("extension", [True, False])
def test_a_refused_non_finite_gradient_is_named_by_its_first_bad_index(
    library, extension, monkeypatch
):
    # The refusal named no index. On the host it now names the first NaN or infinity,
    # found only once the check has failed (a window's accepted steps pay nothing; on an
    # accelerator the step's one read stays one: tests/test_gpu_budgets.py).
    from mfac_core import _fused

    if library == "torch":
        torch = pytest.importorskip("torch")
        xp, asarray = torch, torch.from_numpy
    else:
        xp, asarray = None, np.asarray
    if not extension:
        monkeypatch.setattr(_fused, "stores", lambda storage: False)
    d = 9
    cases = [
        ("float64", True, "update", 4, (np.nan,)),
        ("float32", True, "update_and_matvec", 0, (-np.inf, np.nan)),
        ("float16", False, "update", 2, (np.nan, 7e4)),  # the 2-byte range check
    ]
    for dtype, check, method, first, values in cases:
        if dtype == "float16" and library == "torch":
            dtype = "bfloat16"
        op = DynamicIHVP(2, d, damp=0.1, dtype=dtype, xp=xp,
                         options=WindowOptions(check_finite=check))  # fmt: skip
        g = np.ones(d, np.float32 if dtype != "float64" else np.float64)
        g[first : first + len(values)] = values
        shown = {np.nan: "nan", np.inf: "inf", -np.inf: "-inf"}[values[0]]
        message = rf"^g must not contain NaN or infinity: g\[{first}\] is {shown}$"
        with pytest.raises(ValueError, match=message):
            getattr(op, method)(asarray(g))
        assert len(op) == 0


@pytest.mark.parametrize("zero_init", [False, True])
@pytest.mark.parametrize("method", ["update", "update_and_matvec"])
@pytest.mark.parametrize("check_finite", [True, False])
def test_float64_gradient_whose_squared_norm_overflows_is_refused_in_words(
    zero_init, method, check_finite
):
    # Regression: a finite float64 gradient of entries ~1e300 overflowed NumPy's float64
    # pass (Gram row) and then the row edit of a full window: NumPy's RuntimeWarnings came
    # before the FactorizationError that says so, and were the error where warnings are
    # errors (pytest's configuration here). The window must be left as it was. It is
    # refused as too large (kappa is infinite), as the docs say: a FactorizationError
    # made MFAC step with the previous window, a step of the gradient's own size.
    rng = np.random.default_rng(0)
    options = WindowOptions(zero_init=zero_init, check_finite=check_finite)
    op = DynamicIHVP(3, 17, damp=1e-3, dtype="float64", options=options)
    for g in rng.standard_normal((2, 17)):
        op.update(g)
    before = op.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"too large .* squared norm overflows float64"):
            getattr(op, method)(rng.standard_normal(17) * 1e300)
    after = op.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value)
        else:
            assert after[key] == value, key


def test_load_state_dict_refuses_a_zero_init_that_is_no_bool():
    # Regression: state["zero_init"] was read with bool(), so "junk" (true) loaded into a
    # zero_init window and "" or 0.0 into another; now it is checked as the option is.
    rng = np.random.default_rng(0)
    for zero_init in (False, True):
        op = DynamicIHVP(
            3, 5, damp=1e-2, dtype=np.float64, options=WindowOptions(zero_init=zero_init)
        )
        op.update(rng.standard_normal(5))
        state = op.state_dict()
        before = op.state_dict()
        for bad in ("junk", "", 1, 0.0, None):
            with pytest.raises(ValueError, match=r"zero_init"):
                op.load_state_dict({**state, "zero_init": bad})
            after = op.state_dict()
            for key, value in before.items():
                np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(value))
        op.load_state_dict({**state, "zero_init": np.bool_(zero_init)})


def test_load_state_dict_names_malformed_slot_lists_flags_and_dtypes():
    # Regression: a slot list that was no list was refused as "'int' object is not
    # iterable"; exact_gram was read as `is True`, so "junk" loaded (as False, loosening
    # the Gram check of a float32 window); the float64 arrays' dtype read as NumPy's
    # class (`expected <class 'numpy.float64'>`).
    rng = np.random.default_rng(0)
    op = DynamicIHVP(3, 5, damp=1e-2, dtype="float32")
    op.update(rng.standard_normal(5).astype(np.float32))
    state = op.state_dict()
    before = op.state_dict()
    bad_states = [
        ({"window_slots": 0}, r"state\['window_slots'\] must be a list of slot numbers"),
        ({"free_slots": "12"}, r"state\['free_slots'\] must be a list of slot numbers"),
        ({"exact_gram": "junk"}, r"state\['exact_gram'\] must be True or False"),
        ({"exact_gram": 1}, r"state\['exact_gram'\] must be True or False"),
        ({"gram": state["gram"].astype(np.float32)}, r"float32, expected float64$"),
    ]
    for change, match in bad_states:
        with pytest.raises((ValueError, TypeError), match=match):
            op.load_state_dict({**state, **change})
        after = op.state_dict()
        for key, value in before.items():
            np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(value))
    # Absent (states saved before the flag) it is False, as a NumPy bool it is read.
    op.load_state_dict({k: v for k, v in state.items() if k != "exact_gram"})
    op.load_state_dict({**state, "exact_gram": np.True_})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_at_the_row_write_leaves_the_window_as_it_was(dtype, when, monkeypatch):
    """A KeyboardInterrupt (a signal's handler) is raised as the extension's row write
    returns: Python runs handlers only between bytecodes, so a Ctrl-C during the d-long loop
    surfaces right after it, the row written. The window is put back exactly; an interrupt
    before the write (nothing written, the undo buffer never filled) leaves it alone."""
    from mfac_core import _fused

    if dtype == "bfloat16":  # NumPy's is ml_dtypes'
        pytest.importorskip("ml_dtypes")
    if not _fused.stores(None if dtype == "float32" else dtype):
        pytest.skip("the C extension was not built")
    real = _fused.store_row
    m, d = 3, 41
    grads = np.random.default_rng(7).standard_normal((m + 1, d)).astype(np.float32)
    op = DynamicIHVP(m, d, damp=0.1, dtype=dtype)
    for g in grads[:m]:
        op.update(g)
    before = op.state_dict()

    def interrupted(*args: object, **kwargs: object) -> object:
        if when == "after":
            real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(_fused, "store_row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        op.update(grads[m])
    after = op.state_dict()
    for key, value in before.items():
        if hasattr(value, "shape"):
            np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(value), err_msg=key)
        else:
            assert after[key] == value, key
    monkeypatch.setattr(_fused, "store_row", real)
    np.testing.assert_array_equal(op.update_and_matvec(grads[m]), op.matvec(grads[m]))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_host_step_allocates_only_its_result(dtype):
    """The row write's undo buffer and a 2-byte window's first-pass rows are kept by the
    window and reused: a fresh d-long array per step cost about 1.3 ms at d = 1e6 (the
    memory faulted in again each step). In steady state a step's peak of new memory is
    its result (d float32) plus O(m) bookkeeping; pickles leave the buffers out."""
    import pickle
    import tracemalloc

    from mfac_core import _fused

    if dtype == "bfloat16":  # NumPy's is ml_dtypes'
        pytest.importorskip("ml_dtypes")
    if not _fused.stores(None if dtype == "float32" else dtype):
        pytest.skip("the C extension was not built")
    m, d = 4, 50_000
    grads = np.random.default_rng(3).standard_normal((m + 3, d)).astype(np.float32)
    op = DynamicIHVP(m, d, damp=0.1, dtype=dtype)
    for g in grads[: m + 1]:
        op.update_and_matvec(g)
    for step in (op.update_and_matvec, op._update_and_matvec_checked):
        tracemalloc.start()
        try:
            step(grads[-1])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1.25 * 4 * d, (step.__name__, peak / (4 * d))
    size = len(pickle.dumps(op))
    itemsize = 4 if dtype == "float32" else 2
    assert size < op.num_grads * d * itemsize + 2 * m * m * 8 + 10_000
    clone = pickle.loads(pickle.dumps(op))
    np.testing.assert_array_equal(clone.update_and_matvec(grads[0]), op.update_and_matvec(grads[0]))


def test_a_host_steps_scratch_is_never_shared():
    """The reused step buffers stay the window's own: no result is a view of them, and a
    deep copy (as every copy) gets none of them, so the two windows step apart."""
    import copy

    from mfac_core import _fused

    if not _fused.stores("float16"):
        pytest.skip("the C extension was not built")
    m, d = 3, 64
    grads = np.random.default_rng(5).standard_normal((m + 4, d)).astype(np.float32)
    op = DynamicIHVP(m, d, damp=0.1, dtype="float16")
    results = [op.update_and_matvec(g) for g in grads[: m + 2]]
    scratch = op.__dict__.get("_row_scratch", {})
    for r in results:
        assert not any(np.shares_memory(r, buf) for buf in scratch.values())
    twin = copy.copy(op)
    assert "_row_scratch" not in twin.__dict__
    for g in grads[m + 2 :]:
        np.testing.assert_array_equal(twin.update_and_matvec(g), op.update_and_matvec(g))
    assert not any(
        np.shares_memory(a, b)
        for a in twin.__dict__["_row_scratch"].values()
        for b in op.__dict__["_row_scratch"].values()
    )


def test_a_new_damping_or_a_loaded_state_warns_anew(rng):
    # Regression: the window warns once until it recovers, and a set_damp to a still
    # smaller damping (kappa 3e10 -> 3e14), or a state loaded into a window that had
    # warned, said nothing where a fresh window warns: each is a new set-up.
    m, d = 4, 12
    G = rng.standard_normal((m, d))
    op = DynamicIHVP.from_window(G, damp=1.0)
    good = op.state_dict()
    with pytest.warns(IllConditionedWarning):
        op.set_damp(1e-11)
    with pytest.warns(IllConditionedWarning):
        op.set_damp(1e-15)
    with pytest.warns(IllConditionedWarning):
        op.load_state_dict(good, damp=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.load_state_dict(good, damp=1.0)  # a good window: silent, its note cleared
    big = rng.standard_normal(d) * 1e6  # |g|^2 / (k damp) about 3e12: hopeless
    with pytest.warns(IllConditionedWarning):
        op.update(big)


def test_from_window_of_no_gradients_asks_for_num_grads():
    with pytest.raises(
        ValueError, match=r"G holds no gradients \(shape \(0, 5\)\): pass num_grads"
    ):
        DynamicIHVP.from_window(np.zeros((0, 5)), damp=0.1)
    assert len(DynamicIHVP.from_window(np.zeros((0, 5)), damp=0.1, num_grads=3)) == 0


def test_a_removal_that_leaves_a_hopeless_window_warns_anew(rng):
    # Regression: with one gradient just under update's limit (|g|^2 / (k damp) < 1/eps),
    # removing the others shrank the normalisation 1/k until eps(float64) kappa = 4.7:
    # products 683 % off, with no new warning (the window had warned once, at the fill).
    # A removal is a new set-up: it warns of the window it leaves, and is not refused.
    m, d = 6, 20
    op = DynamicIHVP(m, d, damp=1e-3, dtype="float64")
    big = rng.standard_normal(d)
    big *= math.sqrt(0.9 * m * 1e-3 / np.finfo(np.float64).eps) / np.linalg.norm(big)
    with pytest.warns(IllConditionedWarning):
        for g in [*rng.standard_normal((m - 1, d)), big]:
            op.update(g)
    for _ in range(2):
        with pytest.warns(IllConditionedWarning):
            op.remove(op.slots[0])
    assert len(op) == m - 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.remove(op.slots[-1])  # the large one: the rest is well conditioned
