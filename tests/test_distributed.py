"""Communicators (mfac_core.distributed) and the collective helpers of _sharding."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mfac_core._sharding import (
    MAX_AGREEMENT_RANKS,
    STATUS_LENGTH,
    ShardLayout,
    agreement,
    decode_status,
    digest,
    encode_status,
    gather_ints,
    reduce_checked,
)
from mfac_core.distributed import (
    CommCall,
    Communicator,
    CountingComm,
    SingleProcessComm,
    check_communicator,
)
from mfac_core.testing import ThreadComm, run_spmd_threads

# -- single process ------------------------------------------------------------------------


def test_single_process_comm_copies() -> None:
    comm = SingleProcessComm()
    x = np.arange(3.0)
    y = comm.allreduce_sum(x)
    assert isinstance(comm, Communicator)
    assert (comm.rank, comm.size) == (0, 1)
    np.testing.assert_array_equal(y, x)
    y[0] = 7.0
    assert x[0] == 0.0  # a new array, not a view


def test_counting_comm_records_every_call() -> None:
    comm = CountingComm(SingleProcessComm())
    comm.allreduce_sum(np.zeros((2, 3), dtype=np.float32))
    comm.allreduce_sum(np.zeros(4))
    assert comm.calls == [CommCall((2, 3), "float32", 24), CommCall((4,), "float64", 32)]
    assert (comm.num_calls, comm.num_elements, comm.num_bytes) == (2, 10, 56)
    comm.reset()
    assert comm.num_calls == 0


def test_counting_comm_counts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    comm = CountingComm(SingleProcessComm())
    comm.allreduce_sum(torch.zeros(5, dtype=torch.float64))
    assert comm.calls == [CommCall((5,), "float64", 40)]


@pytest.mark.parametrize("bad", [None, object(), [1.0, 2.0]])
def test_not_a_communicator(bad: object) -> None:
    with pytest.raises(TypeError, match="Communicator protocol"):
        check_communicator(bad)
    with pytest.raises(TypeError, match="Communicator protocol"):
        CountingComm(bad)  # type: ignore[arg-type]


def test_communicator_with_bad_rank() -> None:
    class Bad:
        rank = 2
        size = 2

        def allreduce_sum(self, x: object) -> object:
            return x

    with pytest.raises(TypeError, match="0 <= rank < size"):
        check_communicator(Bad())


def test_torch_comm_needs_an_initialised_group() -> None:
    pytest.importorskip("torch")
    import torch.distributed as dist

    from mfac_core.distributed import TorchComm

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchComm()


# -- threads -------------------------------------------------------------------------------


def test_thread_comm_sums_in_rank_order() -> None:
    # Parts whose sum depends on the order of addition: every rank must get the same bits.
    parts = [np.array([1e16]), np.array([1.0]), np.array([-1e16]), np.array([1.0])]

    def fn(comm: ThreadComm) -> np.ndarray:
        return comm.allreduce_sum(parts[comm.rank])

    results = run_spmd_threads(fn, 4)
    expected = ((parts[0] + parts[1]) + parts[2]) + parts[3]
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_thread_comm_adds_beyond_float64_without_a_warning_as_an_engine_does() -> None:
    # gloo and NCCL add inf and NaN without a word, and the operators report what they
    # find in the sum; ThreadComm's NumPy addition warned on every rank, which raised that
    # RuntimeWarning where warnings are errors (this suite's setting) instead of the
    # operator's own error.
    parts = [np.array([1e308, np.inf]), np.array([1e308, -np.inf])]

    def fn(comm: ThreadComm) -> np.ndarray:
        return comm.allreduce_sum(parts[comm.rank])

    results = run_spmd_threads(fn, 2, timeout=10)
    for r in results:
        assert isinstance(r, np.ndarray), r
        assert np.isposinf(r[0]) and np.isnan(r[1]), r


def test_thread_comm_reports_mismatched_shapes() -> None:
    def fn(comm: ThreadComm) -> np.ndarray:
        return comm.allreduce_sum(np.zeros(2 + comm.rank))

    results = run_spmd_threads(fn, 2, timeout=10)
    assert all(isinstance(r, (RuntimeError, threading.BrokenBarrierError)) for r in results)


def test_thread_comm_reports_mismatched_dtypes() -> None:
    # The protocol's "same shape and dtype": a sum that promoted would hide what gloo,
    # which exchanges bytes, cannot do.
    def fn(comm: ThreadComm) -> object:
        return comm.allreduce_sum(np.zeros(2, dtype=[np.float64, np.float32][comm.rank]))

    results = run_spmd_threads(fn, 2, timeout=10)
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert all("different dtypes" in str(r) for r in results), results


def test_thread_comm_sums_ranks_of_different_libraries_in_each_ranks_own() -> None:
    # The protocol asks for one shape and dtype, and returns each rank's sum in its own
    # namespace; TorchComm reduces a NumPy array beside a tensor. Regression: refused
    # with "different types", which also hid the operators' own errors for ranks whose
    # inputs differ (a rank whose G is not an array reduces in NumPy).
    array_api_strict = pytest.importorskip("array_api_strict")

    def fn(comm: ThreadComm) -> object:
        x = np.arange(2.0) + comm.rank
        return comm.allreduce_sum(x if comm.rank == 0 else array_api_strict.asarray(x))

    results = run_spmd_threads(fn, 2, timeout=10)
    assert isinstance(results[0], np.ndarray), results
    assert array_api_strict.isdtype(results[1].dtype, "real floating"), results
    for r in results:
        np.testing.assert_array_equal(np.from_dlpack(r), [1.0, 3.0])


def test_a_rank_raising_alone_is_seen_by_the_others() -> None:
    # The failure mode reduce_checked exists to prevent: the other rank must not hang.
    def fn(comm: ThreadComm) -> np.ndarray:
        if comm.rank == 0:
            raise ValueError("rank 0 alone")
        return comm.allreduce_sum(np.zeros(1))

    results = run_spmd_threads(fn, 2, timeout=10)
    assert isinstance(results[0], ValueError)
    assert isinstance(results[1], threading.BrokenBarrierError)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_gather_ints_and_layout(size: int) -> None:
    def fn(comm: ThreadComm) -> tuple[list[tuple[int, ...]], ShardLayout]:
        rows = gather_ints(comm, np, "cpu", [comm.rank, 10 * comm.rank + 2**40])
        return rows, ShardLayout.exchange(comm, np, "cpu", 5 + comm.rank)

    results = run_spmd_threads(fn, size)
    for rank, (rows, layout) in enumerate(results):
        assert rows == [(r, 10 * r + 2**40) for r in range(size)]
        assert layout.widths == tuple(5 + r for r in range(size))
        assert layout.start == sum(5 + r for r in range(rank))
        assert layout.stop == layout.start + 5 + rank
        assert layout.dim == sum(5 + r for r in range(size))


@pytest.mark.parametrize(
    ("failing", "kinds"),
    [
        ({1: ValueError}, {ValueError}),
        ({0: TypeError, 2: TypeError}, {TypeError}),
        ({2: IndexError}, {IndexError}),
        # Every rank raises the first class (rank 0 too, its ValueError the cause).
        ({0: ValueError, 1: TypeError}, {TypeError}),
        ({1: KeyError}, {KeyError, RuntimeError}),
    ],
)
def test_reduce_checked_raises_on_every_rank(
    failing: dict[int, type[Exception]], kinds: set[type[Exception]]
) -> None:
    size = 3

    def fn(comm: ThreadComm) -> object:
        def local() -> np.ndarray:
            if comm.rank in failing:
                raise failing[comm.rank](f"bad input on rank {comm.rank}")
            return np.full(4, float(comm.rank + 1))

        return reduce_checked(
            comm, np, local, length=4, dtype=np.float64, device="cpu", what="the product"
        )

    results = run_spmd_threads(fn, size, timeout=10)
    for rank, r in enumerate(results):
        assert isinstance(r, Exception), r
        if type(r) is failing.get(rank):
            assert f"rank {rank}" in str(r)  # its own error, with its own message
        else:
            assert type(r) in kinds
            assert "failed on" in str(r)
            if rank in failing:  # it failed with another class than the first
                assert type(r.__cause__) is failing[rank]
    # Ranks that did not fail agree on one class.
    assert len({type(r) for rank, r in enumerate(results) if rank not in failing}) <= 1


def test_reduce_checked_sums_when_all_succeed() -> None:
    def fn(comm: ThreadComm) -> np.ndarray:
        return reduce_checked(
            comm,
            np,
            # A float32 payload goes through the float64 reduction.
            lambda: np.full(3, comm.rank, dtype=np.float32),
            length=3,
            dtype=np.float64,
            device="cpu",
            what="x",
        )

    for r in run_spmd_threads(fn, 3):
        assert r.dtype == np.float64
        np.testing.assert_array_equal(r, np.full(3, 3.0))


class _ManyRanks:
    """Rank 0 of ``size`` ranks, the others' summed contribution given up front.

    Simulates a group too large to spawn: ``allreduce_sum`` adds ``others`` to
    this rank's array, in its dtype, as a reduction over the group would.
    """

    def __init__(self, size: int, others: np.ndarray) -> None:
        self.rank, self.size, self.others, self.calls = 0, size, others, []

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        self.calls.append((x.shape, x.dtype))
        return x + self.others.astype(x.dtype)


def test_status_word_counts_are_exact_for_large_groups() -> None:
    size = 2**20
    failed = {TypeError: 3, IndexError: 0, ValueError: size - 10, RuntimeError: 5}
    words = {kind: np.asarray(encode_status(kind("x"))) * n for kind, n in failed.items()}
    assert len(encode_status(None)) == STATUS_LENGTH == 20
    assert not any(encode_status(None)[:4])
    assert encode_status(None, 5) != encode_status(None, 6)
    assert encode_status(None, 5, "a")[:12] == encode_status(None, 5, "b")[:12]
    assert encode_status(KeyError("x")) == encode_status(RuntimeError("x"))
    total = sum(words.values(), np.zeros(STATUS_LENGTH))
    assert decode_status(total.tolist()) == failed


def _status_sum(codes: dict[tuple[object, object], int]) -> list[float]:
    """The reduced status word of ranks that passed (tag, agree), n ranks each, in float64."""
    total = np.zeros(STATUS_LENGTH)
    for (tag, agree), n in codes.items():
        total = total + np.asarray(encode_status(None, tag, agree)) * float(n)
    return total.tolist()


@pytest.mark.parametrize("size", [2, 3, 1000, MAX_AGREEMENT_RANKS])
def test_agreement_is_exact_up_to_the_stated_group_size(size: int) -> None:
    # One rank off among size - 1 that agree, in the tag or in the arguments only, is
    # seen at every size up to MAX_AGREEMENT_RANKS, where the float64 sums of the
    # 16-bit pieces' squares are still exact integers.
    assert size * (2**16 - 1) ** 2 < 2**53
    same = {("op", "args"): size}
    assert agreement(_status_sum(same), size) == (True, True)
    assert agreement(_status_sum({("op", "args"): size - 1, ("other", "args"): 1}), size) == (
        False,
        True,
    )
    assert agreement(_status_sum({("op", "args"): size - 1, ("op", "other"): 1}), size) == (
        True,
        False,
    )
    # The hardest case for the sums: pieces of 2**16 - 1 against 2**16 - 2 on one rank.
    top, off = np.zeros(STATUS_LENGTH), np.zeros(STATUS_LENGTH)
    top[4:6], off[4:6] = [2**16 - 1, (2**16 - 1) ** 2], [2**16 - 2, (2**16 - 2) ** 2]
    word = (top * float(size - 1) + off).tolist()
    assert agreement(word, size)[0] is False
    assert agreement((top * float(size)).tolist(), size)[0] is True


def _digest_pair(case: str) -> tuple[object, object]:
    """Two values that differ (made here: array parameters confuse the fixtures)."""
    v = np.arange(1000)
    swapped = v.copy()
    swapped[[0, 997]] = swapped[[997, 0]]  # equal weights in the former checksum
    return {
        # What the former index checksum (weights i % 997 + 1, modulo 2**23 - 15) let pass.
        "swapped 997 apart": (v, swapped),
        "offset by the modulus": (np.array([5]), np.array([5 + 2**23 - 15])),
        "dtype": (np.arange(4), np.arange(4).astype(np.int32)),
        "shape": (np.arange(4), np.arange(4).reshape(2, 2)),
        "length": (np.arange(4), np.arange(5)),
        "order": ((1, 2), (2, 1)),
        "nesting": (("a", 1), ("a1",)),
        "type": (1, 1.0),
        "sign of zero": (0.0, -0.0),
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "swapped 997 apart",
        "offset by the modulus",
        "dtype",
        "shape",
        "length",
        "order",
        "nesting",
        "type",
        "sign of zero",
    ],
)
def test_digests_differ_for_different_values(case: str) -> None:
    a, b = _digest_pair(case)
    assert digest(a) != digest(b)
    assert digest(a) == digest(a.copy() if isinstance(a, np.ndarray) else a)


def test_digests_of_torch_arrays() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).to(torch.bfloat16)
    assert digest(t) == digest(t.clone())
    assert digest(t) != digest(t.to(torch.float16))
    assert digest(torch.arange(3)) != digest(np.arange(3))  # the library's dtype name


def test_reduce_checked_raises_on_every_rank_for_different_arguments() -> None:
    def fn(comm: ThreadComm) -> object:
        try:
            reduce_checked(
                comm,
                np,
                lambda: np.ones(3),
                length=3,
                dtype=np.float64,
                device="cpu",
                what="op",
                tag="same",
                agree=lambda: np.arange(3) + (comm.rank == 2),
                disagree=(IndexError, "indices differ"),
            )
        except IndexError as exc:
            return str(exc)
        return "no error"

    assert run_spmd_threads(fn, 3) == ["indices differ"] * 3
    with pytest.raises(ValueError, match="float64"):
        reduce_checked(
            SingleProcessComm(),
            np,
            lambda: np.ones(1, dtype=np.float32),
            length=1,
            dtype=np.float32,
            device="cpu",
            what="op",
        )


@pytest.mark.parametrize("flags", [(True, True, True), (False, False, False), (True, False, True)])
def test_reduce_checked_reports_agreement_into_a_list(flags: tuple[bool, ...]) -> None:
    # agreed_into: the comparison of agree's values is reported, not raised (a flag the
    # ranks may hold differently), and the payload is summed as ever.
    def fn(comm: ThreadComm) -> object:
        same: list[bool] = []
        total = reduce_checked(
            comm,
            np,
            lambda: np.full(2, comm.rank + 1.0),
            length=2,
            dtype=np.float64,
            device="cpu",
            what="op",
            agree=lambda: flags[comm.rank],
            agreed_into=same,
        )
        return same, total.tolist()

    want = ([len(set(flags)) == 1], [6.0, 6.0])
    assert run_spmd_threads(fn, 3) == [want] * 3
    # A group too large for exact comparisons knows of no agreement, even where
    # every rank passed the same value.
    size, same = MAX_AGREEMENT_RANKS + 1, []
    word = np.asarray(encode_status(None, 0, ("agree", True))) * float(size - 1)
    reduce_checked(
        _ManyRanks(size, np.concatenate([np.zeros(1), word])),
        np,
        lambda: np.ones(1),
        length=1,
        dtype=np.float64,
        device="cpu",
        what="op",
        agree=lambda: True,
        agreed_into=same,
    )
    assert same == [False]


def test_reduce_checked_raises_on_every_rank_for_different_tags() -> None:
    def fn(comm: ThreadComm) -> object:
        try:
            reduce_checked(
                comm,
                np,
                lambda: np.ones(3),
                length=3,
                dtype=np.float64,
                device="cpu",
                what="op",
                tag=1 if comm.rank == 0 else 2,
            )
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    results = run_spmd_threads(fn, 3)
    assert all("different collective operations" in r for r in results), results
    assert len(set(results)) == 1


def test_reduce_checked_with_diverged_reports_failures_before_different_tags() -> None:
    # diverged: the tag holds the caller's state, which local() checks; a rank that
    # refused its own value (whose tag then differs) raises as for any failure, and every
    # other rank with it, in the same class; ranks that differ without failing raise
    # diverged's RuntimeError.
    def fn(comm: ThreadComm, fail: bool) -> object:
        def local() -> np.ndarray:
            if fail and comm.rank == 1:
                raise TypeError("rank 1's own refusal")
            return np.ones(3)

        try:
            reduce_checked(
                comm,
                np,
                local,
                length=3,
                dtype=np.float64,
                device="cpu",
                what="op",
                tag=("op", comm.rank == 1),
                diverged=lambda: "the states differ",
            )
        except (TypeError, RuntimeError) as exc:
            return type(exc), str(exc)
        return "no error"

    failed = run_spmd_threads(fn, 3, True)
    assert failed[1] == (TypeError, "rank 1's own refusal")
    for r in (failed[0], failed[2]):
        assert r[0] is TypeError and "failed on 1 other rank(s) of 3" in r[1], r
    assert run_spmd_threads(fn, 3, False) == [(RuntimeError, "the states differ")] * 3


def test_reduce_checked_raises_one_class_on_every_rank_where_ranks_failed_differently() -> None:
    # Rank 0 refuses a value (ValueError), rank 1 fails otherwise (RuntimeError): rank 1
    # raised its own RuntimeError while the others raised ValueError, so a caller that
    # decides from the class (a NaN skips an optimiser's step) decided differently there.
    # ValueError, the class callers recover from, comes last: every rank raises the other.
    def fn(comm: ThreadComm) -> object:
        def local() -> np.ndarray:
            if comm.rank < 2:
                raise (ValueError, RuntimeError)[comm.rank](f"rank {comm.rank}'s own")
            return np.ones(3)

        try:
            reduce_checked(comm, np, local, length=3, dtype=np.float64, device="cpu", what="op")
        except Exception as exc:
            return type(exc), str(exc), exc.__cause__
        return "no error"

    results = run_spmd_threads(fn, 3)
    assert results[1] == (RuntimeError, "rank 1's own", None)
    kind, message, cause = results[0]
    assert kind is RuntimeError and "failed on 1 other rank(s) of 3" in message
    assert "and on this rank with the error that caused this" in message
    assert isinstance(cause, ValueError) and str(cause) == "rank 0's own"
    assert results[2][0] is RuntimeError and "failed on 2 other rank(s) of 3" in results[2][1]


def test_reduce_checked_with_many_simulated_ranks() -> None:
    size = 2**20 + 7
    length = 3
    # The other ranks: all called the same operation; all succeeded but 2**20 with an
    # IndexError and 6 with a ValueError.
    status = np.asarray(encode_status(None)) * float(size - 1)
    status[1:3] += [2.0**20, 6.0]
    comm = _ManyRanks(size, np.concatenate([np.full(length, 2.0), status]))
    with pytest.raises(IndexError, match=f"failed on {2**20 + 6} other rank"):
        reduce_checked(
            comm,
            np,
            lambda: np.ones(length),
            length=length,
            dtype=np.float64,
            device="cpu",
            what="the product",
        )
    assert comm.calls == [((length + STATUS_LENGTH,), np.dtype(np.float64))]
    # Nobody failed: the payload's sum comes back.
    others = np.concatenate([np.full(length, 2.0), np.asarray(encode_status(None)) * (size - 1)])
    out = reduce_checked(
        _ManyRanks(size, others),
        np,
        lambda: np.ones(length),
        length=length,
        dtype=np.float64,
        device="cpu",
        what="x",
    )
    np.testing.assert_array_equal(out, np.full(length, 3.0))
    # One of the others called another operation: every rank raises.
    others[length:] += np.asarray(encode_status(None, 1)) - np.asarray(encode_status(None))
    with pytest.raises(RuntimeError, match="different collective operations"):
        reduce_checked(
            _ManyRanks(size, others),
            np,
            lambda: np.ones(length),
            length=length,
            dtype=np.float64,
            device="cpu",
            what="x",
        )


def test_reduce_checked_rejects_a_payload_of_the_wrong_length() -> None:
    def fn(comm: ThreadComm) -> object:
        return reduce_checked(
            comm,
            np,
            lambda: np.zeros(3 + comm.rank),
            length=3,
            dtype=np.float64,
            device="cpu",
            what="x",
        )

    results = run_spmd_threads(fn, 2, timeout=10)
    assert all(isinstance(r, RuntimeError) for r in results)


def test_run_spmd_threads_raises_what_is_not_a_ranks_exception() -> None:
    # pytest.raises or pytest.fail in a rank raise pytest's Failed, a BaseException: it
    # ended its thread unseen and the rank's result stayed None, so a check made in the
    # ranks could not fail. It is raised in the caller, after the other ranks stopped.
    def fn(comm: ThreadComm) -> object:
        if comm.rank == 1:
            pytest.fail("a check in rank 1")
        return comm.allreduce_sum(np.zeros(1))

    with pytest.raises(pytest.fail.Exception, match="a check in rank 1"):
        run_spmd_threads(fn, 2, timeout=10)


def test_run_spmd_threads_validates_size() -> None:
    with pytest.raises(ValueError, match="size"):
        run_spmd_threads(lambda comm: None, 0)


# -- processes (torch.distributed, gloo) ---------------------------------------------------


def _reduce_many(comm: Communicator) -> dict[str, object]:
    import array_api_strict
    import torch

    from mfac_core.distributed import TorchComm

    rng = np.random.default_rng(comm.rank)
    x64 = rng.standard_normal(1000) * 10.0 ** rng.uniform(-8, 8, 1000)
    x32 = x64.astype(np.float32)
    keep = x64.copy()
    out: dict[str, object] = {
        "numpy64": comm.allreduce_sum(x64),
        "numpy32": comm.allreduce_sum(x32),
        "torch": comm.allreduce_sum(torch.from_numpy(x64)).numpy(),
        "strict": np.from_dlpack(comm.allreduce_sum(array_api_strict.asarray(x64))),
        # Views with negative strides, which PyTorch's DLPack import cannot take.
        "reversed": comm.allreduce_sum(x64[::-1])[::-1],
        "strict_reversed": np.from_dlpack(comm.allreduce_sum(array_api_strict.asarray(x64)[::-1]))[
            ::-1
        ],
        "unchanged": bool(np.array_equal(x64, keep)),
    }
    assert isinstance(comm, TorchComm)
    fast = TorchComm(deterministic=False)
    out["all_reduce"] = fast.allreduce_sum(x64)
    out["all_reduce_reversed"] = fast.allreduce_sum(x64[::-1])[::-1]
    out["types"] = (
        type(out["numpy64"]).__name__,
        str(out["numpy32"].dtype),  # type: ignore[attr-defined]
    )
    return out


@pytest.mark.parametrize("nprocs", [2, 4])
def test_torch_comm_over_gloo(nprocs: int) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("array_api_strict")
    from _spmd import spawn

    results = spawn(_reduce_many, nprocs, pooled=True)
    for r in results:
        assert isinstance(r, dict), r
    parts = [np.random.default_rng(r) for r in range(nprocs)]
    xs = [p.standard_normal(1000) * 10.0 ** p.uniform(-8, 8, 1000) for p in parts]
    expected = xs[0].copy()
    for x in xs[1:]:
        expected += x  # the deterministic mode adds in rank order
    for r in results:
        assert r["types"] == ("ndarray", "float32")
        assert r["unchanged"]
        for key in ("numpy64", "torch", "strict", "reversed", "strict_reversed"):
            np.testing.assert_array_equal(r[key], expected)
        # The engine's all_reduce: the same bits on every rank, the sum to rounding.
        np.testing.assert_array_equal(r["all_reduce"], results[0]["all_reduce"])
        scale = sum(np.abs(x) for x in xs)
        for key in ("all_reduce", "all_reduce_reversed"):
            assert np.all(np.abs(r[key] - expected) <= 4 * nprocs * 2.0**-52 * scale)
        np.testing.assert_array_equal(r["numpy32"], results[0]["numpy32"])


def _lose_a_peer(comm: Communicator) -> str:
    if comm.rank == 1:
        return "left"
    comm.allreduce_sum(np.zeros(3))
    comm.allreduce_sum(np.zeros(3))
    return "no error"


def test_a_dead_peer_is_an_error_not_a_hang() -> None:
    pytest.importorskip("torch")
    from _spmd import RankError, spawn

    results = spawn(_lose_a_peer, 2, timeout=10)
    assert results[1] == "left"
    assert isinstance(results[0], RankError), results[0]
