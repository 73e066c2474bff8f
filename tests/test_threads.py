"""Tests of the library's own CPU threads (mfac_core._fused._threads): their count from the
environment, and how a call shares work among them, stops and joins them."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

from mfac_core import StaticIHVP, _fused
from mfac_core._fused import _threads

_VARIABLES = ("MFAC_CORE_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


@pytest.fixture
def env(monkeypatch):
    """No thread variable set, no bad value reported yet."""
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_threads, "_reported", set())
    return monkeypatch


def _cpus() -> int:
    return _threads._blas_count()[0]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"MFAC_CORE_NUM_THREADS": "3", "OMP_NUM_THREADS": "7"}, 3),
        ({"MFAC_CORE_NUM_THREADS": " 3 ", "OMP_NUM_THREADS": "7"}, 3),
        ({"MFAC_CORE_NUM_THREADS": "3,1"}, 3),
        ({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "7"}, 2),
        ({"OMP_NUM_THREADS": "4,2"}, 4),
        # OpenBLAS reads both with C's atoi: leading blanks and "+", then the digits.
        ({"OPENBLAS_NUM_THREADS": "2.5", "OMP_NUM_THREADS": "7"}, 2),
        ({"OPENBLAS_NUM_THREADS": " +5x", "OMP_NUM_THREADS": "7"}, 5),
        ({"OPENBLAS_NUM_THREADS": "-2", "OMP_NUM_THREADS": "7"}, 7),
        ({"OPENBLAS_NUM_THREADS": "0", "OMP_NUM_THREADS": "x"}, None),
        ({"OPENBLAS_NUM_THREADS": "", "OMP_NUM_THREADS": "6"}, 6),
    ],
)
def test_max_threads_follows_the_variables(env, values, expected):
    for name, value in values.items():
        env.setenv(name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bad values of the BLAS variables are followed silently
        assert _fused.max_threads() == (_cpus() if expected is None else expected)


@pytest.mark.parametrize("value", ["0", "x", "-2", "2.5", "\u00b2", "9" * 5000])
def test_a_bad_value_of_our_variable_is_reported_once(env, value):
    env.setenv("MFAC_CORE_NUM_THREADS", value)
    env.setenv("OPENBLAS_NUM_THREADS", "3")
    with pytest.warns(RuntimeWarning) as record:
        assert _fused.max_threads() == 3
    assert len(record) == 1
    text = str(record[0].message)
    assert f"MFAC_CORE_NUM_THREADS={value!r}" in text and "3 threads" in text
    assert "OPENBLAS_NUM_THREADS" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fused.max_threads() == 3  # once per value, not per call
    env.setenv("OPENBLAS_NUM_THREADS", "x")
    env.setenv("MFAC_CORE_NUM_THREADS", value + "!")  # another value: said too
    with pytest.warns(RuntimeWarning, match="the CPUs"):
        assert _fused.max_threads() == _cpus()


@pytest.mark.parametrize("value", ["", "  "])
def test_a_blank_value_is_unset(env, value):
    env.setenv("MFAC_CORE_NUM_THREADS", value)
    env.setenv("OMP_NUM_THREADS", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fused.max_threads() == 2


def test_the_variables_are_read_per_call(env):
    env.setenv("MFAC_CORE_NUM_THREADS", "2")
    assert _fused.max_threads() == 2
    env.setenv("MFAC_CORE_NUM_THREADS", "5")
    assert _fused.max_threads() == 5


@pytest.mark.skipif(not _fused.available(), reason="the C extension was not built")
def test_a_bad_value_leaves_the_results_bits(env, rng):
    env.setattr(_fused, "_PIECE_WORK", 2**10)
    env.setattr(_fused, "_MIN_THREAD_WORK", 1)
    G = rng.standard_normal((12, 3_000)).astype(np.float32)
    X = rng.standard_normal((3, 3_000))
    env.setenv("MFAC_CORE_NUM_THREADS", "1")
    want = _fused.project64(G, X, start=0, stop=3_000)
    env.setenv("MFAC_CORE_NUM_THREADS", "two")
    env.setenv("OPENBLAS_NUM_THREADS", "2")
    with pytest.warns(RuntimeWarning, match="'two' is not a positive integer"):
        got = _fused.project64(G, X, start=0, stop=3_000)
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not _fused.available(), reason="the C extension was not built")
def test_a_bad_value_is_said_at_the_users_line(env, rng):
    # Read deep inside a public call (a pass's pieces): the warning names the line that
    # made the call, as the library's other warnings do, not the pass's own line.
    env.setattr(_fused, "_PIECE_WORK", 2**10)
    env.setattr(_fused, "_MIN_THREAD_WORK", 1)
    G = rng.standard_normal((12, 3_000)).astype(np.float32)
    op = StaticIHVP(G, damp=1.0)
    env.setenv("MFAC_CORE_NUM_THREADS", "two")
    with pytest.warns(RuntimeWarning, match="'two' is not a positive integer") as record:
        op.matvec(G[0, :])
    assert [w.filename for w in record] == [__file__]


def _items(done: list[tuple[int, float]], helper_seconds: float = 0.0):
    """A ``share`` call that records when each item ends; a helper's items take a while,
    and the calling thread's first waits until a helper is inside one (on a busy machine
    the calling thread could otherwise take every item first)."""
    running = threading.Event()

    def call(i: int, on_caller: bool) -> None:
        if on_caller:
            assert running.wait(5)
        else:
            running.set()
            time.sleep(helper_seconds)
        done.append((i, time.perf_counter()))

    return call, running


def _no_work_after(done: list[tuple[int, float]], returned: float) -> None:
    seen = len(done)
    time.sleep(0.05)  # a helper left running would end an item by now
    assert len(done) == seen
    assert all(t <= returned for _, t in done)


def test_an_interrupt_while_starting_the_helpers_stops_them(monkeypatch):
    done: list[tuple[int, float]] = []
    call, running = _items(done, helper_seconds=0.005)
    real_start = threading.Thread.start

    def start(self):
        real_start(self)
        assert running.wait(5)  # the first helper is inside an item
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)
    before = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        _threads.share(call, 200, 3)
    returned = time.perf_counter()
    assert threading.active_count() == before  # the started helper was joined
    _no_work_after(done, returned)
    assert 1 <= len(done) < 200  # it stopped at its next item


def test_an_interrupt_while_joining_the_helpers_waits_for_them(monkeypatch):
    done: list[tuple[int, float]] = []
    call, running = _items(done, helper_seconds=0.03)
    real_join = threading.Thread.join
    joins = []

    def join(self, timeout=None):
        joins.append(self)
        if len(joins) == 1:
            assert running.wait(5)  # the helper is inside its item
            raise KeyboardInterrupt
        return real_join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", join)
    before = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        _threads.share(call, 4, 2)
    returned = time.perf_counter()
    assert threading.active_count() == before
    _no_work_after(done, returned)


def test_the_first_error_stops_every_thread_and_minor_errors_yield(monkeypatch):
    class Minor(Exception):
        pass

    both = threading.Barrier(2, timeout=5)

    def call(i: int, on_caller: bool) -> None:
        both.wait()  # each thread in its first item
        if on_caller:
            time.sleep(0.01)  # the helper's Minor is recorded first
            raise MemoryError("caller")
        raise Minor

    with pytest.raises(MemoryError, match="caller"):
        _threads.share(call, 10, 2, minor=(Minor,))
    both.reset()
    with pytest.raises(Minor):
        _threads.share(call, 10, 2)


def test_one_thread_runs_every_item_in_order_on_the_caller():
    seen = []
    _threads.share(lambda i, on_caller: seen.append((i, on_caller)), 4, 1)
    assert seen == [(0, True), (1, True), (2, True), (3, True)]
