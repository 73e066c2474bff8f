"""Communicators (mfac_core.distributed) and the collective helpers of _sharding."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mfac_core._sharding import (
    MAX_TAG,
    MAX_TAG_RANKS_FLOAT32,
    STATUS_LENGTH,
    ShardLayout,
    decode_status,
    encode_status,
    gather_ints,
    reduce_checked,
    tags_agree,
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


def test_thread_comm_reports_mismatched_shapes() -> None:
    def fn(comm: ThreadComm) -> np.ndarray:
        return comm.allreduce_sum(np.zeros(2 + comm.rank))

    results = run_spmd_threads(fn, 2, timeout=10)
    assert all(isinstance(r, (RuntimeError, threading.BrokenBarrierError)) for r in results)


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
        ({0: ValueError, 1: TypeError}, {ValueError, TypeError}),
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
        if rank in failing:
            assert type(r) is failing[rank]  # its own error, with its own message
            assert f"rank {rank}" in str(r)
        else:
            assert type(r) in kinds
            assert "failed on" in str(r)
    # Ranks that did not fail agree on one class.
    assert len({type(r) for rank, r in enumerate(results) if rank not in failing}) <= 1


def test_reduce_checked_sums_when_all_succeed() -> None:
    def fn(comm: ThreadComm) -> np.ndarray:
        return reduce_checked(
            comm,
            np,
            lambda: np.full(3, comm.rank, dtype=np.float32),
            length=3,
            dtype=np.float32,
            device="cpu",
            what="x",
        )

    for r in run_spmd_threads(fn, 3):
        assert r.dtype == np.float32
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_status_word_counts_are_exact_for_large_groups(dtype: type) -> None:
    # 2**20 ranks: the former single number, sum of (size + 1)**class, lost the
    # counts in float32 from 62 ranks on.
    size = 2**20
    failed = {TypeError: 3, IndexError: 0, ValueError: size - 10, RuntimeError: 5}
    words = {
        kind: np.asarray(encode_status(kind("x")), dtype=dtype) * n for kind, n in failed.items()
    }
    assert len(encode_status(None)) == STATUS_LENGTH and not any(encode_status(None))
    assert encode_status(None, 5)[-2:] == [5.0, 25.0]
    assert encode_status(KeyError("x")) == encode_status(RuntimeError("x"))
    total = sum(words.values(), np.zeros(STATUS_LENGTH, dtype=dtype))
    assert total.dtype == dtype
    assert decode_status(total.tolist()) == failed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [2, 3, 1000, MAX_TAG_RANKS_FLOAT32])
def test_tag_check_is_exact_up_to_the_stated_group_size(dtype: type, size: int) -> None:
    # S1**2 == size * S2 exactly when all tags agree; the largest tags and a single
    # rank off by one are the hardest cases for the float32 sums.
    assert size * (MAX_TAG - 1) ** 2 < 2**24
    for common, odd in [(MAX_TAG - 1, MAX_TAG - 2), (0, 1), (17, 16), (1, 0), (5, None)]:
        tags = [common] * (size - 1) + [common if odd is None else odd]
        counts = {t: tags.count(t) for t in set(tags)}
        total = np.zeros(STATUS_LENGTH, dtype=dtype)
        for t, n in counts.items():  # n ranks at once, as the float32 reduction sums them
            total = total + np.asarray(encode_status(None, t), dtype=dtype) * dtype(n)
        assert total.dtype == dtype
        assert tags_agree(total.tolist(), size) == (odd is None)
        assert decode_status(total.tolist()) == dict.fromkeys(decode_status(total.tolist()), 0)
    with pytest.raises(ValueError, match="internal error"):
        encode_status(None, MAX_TAG)


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reduce_checked_with_many_simulated_ranks(dtype: type) -> None:
    size = 2**20 + 7
    length = 3
    # The other ranks: all succeeded but 2**20 with an IndexError and 6 with a ValueError.
    status = np.asarray([0.0, 2.0**20, 6.0, 0.0, 0.0, 0.0])
    comm = _ManyRanks(size, np.concatenate([np.full(length, 2.0), status]))
    with pytest.raises(IndexError, match=f"failed on {2**20 + 6} other rank"):
        reduce_checked(
            comm,
            np,
            lambda: np.ones(length, dtype=dtype),
            length=length,
            dtype=dtype,
            device="cpu",
            what="the product",
        )
    assert comm.calls == [((length + STATUS_LENGTH,), np.dtype(dtype))]
    # Nobody failed: the payload's sum comes back.
    comm = _ManyRanks(size, np.concatenate([np.full(length, 2.0), np.zeros(STATUS_LENGTH)]))
    out = reduce_checked(
        comm,
        np,
        lambda: np.ones(length, dtype=dtype),
        length=length,
        dtype=dtype,
        device="cpu",
        what="x",
    )
    np.testing.assert_array_equal(out, np.full(length, 3.0, dtype=dtype))


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
        "unchanged": bool(np.array_equal(x64, keep)),
    }
    assert isinstance(comm, TorchComm)
    fast = TorchComm(deterministic=False)
    out["all_reduce"] = fast.allreduce_sum(x64)
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

    results = spawn(_reduce_many, nprocs)
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
        for key in ("numpy64", "torch", "strict"):
            np.testing.assert_array_equal(r[key], expected)
        # The engine's all_reduce: the same bits on every rank, the sum to rounding.
        np.testing.assert_array_equal(r["all_reduce"], results[0]["all_reduce"])
        scale = sum(np.abs(x) for x in xs)
        assert np.all(np.abs(r["all_reduce"] - expected) <= 4 * nprocs * 2.0**-52 * scale)
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
