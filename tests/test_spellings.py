"""One object per strategy (issue 20): the new constructors, and the deprecated spellings."""

import copy
import pickle

import numpy as np
import pytest

from mfac_core import DaskStaticIHVP, LinearOperator, ShardedStaticIHVP, StaticIHVP
from mfac_core.distributed import SingleProcessComm


@pytest.fixture
def G() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 30))


def test_in_memory_signature_is_short() -> None:
    import inspect

    for cls in (StaticIHVP, ShardedStaticIHVP, DaskStaticIHVP):
        keywords = [
            p
            for p in inspect.signature(cls).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        assert len(keywords) <= 6, cls


def test_base_class_knows_no_communicator() -> None:
    assert not hasattr(LinearOperator, "comm")


def test_sharded_is_its_own_class(G: np.ndarray) -> None:
    op = ShardedStaticIHVP(G, comm=SingleProcessComm(), damp=0.1)
    x = np.ones(30)
    np.testing.assert_allclose(op.matvec(x), StaticIHVP(G, damp=0.1).matvec(x), rtol=1e-12)
    assert not isinstance(op, StaticIHVP)
    assert not hasattr(op, "streamed")  # streaming a shard cannot be spelled
    back = pickle.loads(pickle.dumps(op))
    np.testing.assert_array_equal(back.matvec(x), op.matvec(x))
    assert copy.deepcopy(op).comm is op.comm


def test_sharded_refuses_stream_to(G: np.ndarray) -> None:
    with pytest.raises(ValueError, match="not available for a column-sharded"):
        ShardedStaticIHVP(G, comm=SingleProcessComm(), damp=0.1, stream_to="cpu")


def test_unknown_keyword_is_a_type_error(G: np.ndarray) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'dampp'"):
        StaticIHVP(G, damp=0.1, dampp=1.0)


def test_deprecated_comm(G: np.ndarray) -> None:
    with pytest.warns(DeprecationWarning, match=r"ShardedStaticIHVP\(G_local, comm=comm"):
        op = StaticIHVP(G, damp=0.1, comm=SingleProcessComm())
    assert isinstance(op, ShardedStaticIHVP)


def test_deprecated_dask(G: np.ndarray) -> None:
    da = pytest.importorskip("dask.array")
    with pytest.warns(DeprecationWarning, match=r"DaskStaticIHVP\(G, damp=...\)"):
        op = StaticIHVP(da.from_array(G, chunks=(4, 15)), damp=0.1)
    assert type(op) is DaskStaticIHVP


def test_deprecated_stream_to() -> None:
    torch = pytest.importorskip("torch")
    G = torch.randn(4, 30, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match=r"StaticIHVP\.streamed\(G, device=device"):
        old = StaticIHVP(G, damp=0.1, stream_to="cpu")
    new = StaticIHVP.streamed(G, device="cpu", damp=0.1)
    x = torch.ones(30, dtype=torch.float64)
    assert torch.equal(old.matvec(x), new.matvec(x))


def test_streamed_only_on_static() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="cannot be streamed"):
        DaskStaticIHVP.streamed(torch.zeros(2, 8), device="cpu", damp=0.1)


def test_deprecated_overwrite_G(G: np.ndarray) -> None:
    with pytest.warns(DeprecationWarning, match="overwrite_G= are ignored"):
        StaticIHVP(G, damp=0.1, overwrite_G=True)


def test_deprecated_out(G: np.ndarray) -> None:
    with pytest.warns(DeprecationWarning, match="out= and overwrite_G= are ignored"):
        StaticIHVP(G, damp=0.1, out=np.empty_like(G))


def test_sharded_state_pickled_as_a_static_ihvp_loads(G: np.ndarray) -> None:
    # What pickle does with a sharded operator saved while it was a StaticIHVP.
    op = ShardedStaticIHVP(G, comm=SingleProcessComm(), damp=0.1)
    old = StaticIHVP.__new__(StaticIHVP)
    old.__setstate__(op.__getstate__())
    assert type(old) is ShardedStaticIHVP
    x = np.ones(30)
    np.testing.assert_array_equal(old.matvec(x), op.matvec(x))
