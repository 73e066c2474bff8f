"""One object per strategy (issue 20): the new constructors, and the deprecated spellings."""

import copy
import pickle
import warnings

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
        # __init__'s own, not a __signature__ that __new__'s might hide.
        keywords = [
            p
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        assert 0 < len(keywords) <= 6, cls


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
    with pytest.warns(DeprecationWarning, match=r"use ShardedStaticIHVP\(\.\.\., comm=comm\)"):
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


def test_deprecated_dynamic_comm() -> None:
    from mfac_core import DynamicIHVP, ShardedDynamicIHVP

    g = np.random.default_rng(1).standard_normal((3, 12))
    with pytest.warns(DeprecationWarning, match=r"use ShardedDynamicIHVP\(\.\.\., comm=comm\)"):
        op = DynamicIHVP(4, 12, damp=0.1, dtype="float64", comm=SingleProcessComm())
    assert type(op) is ShardedDynamicIHVP and op.layout is not None and op.layout.dim == 12
    with pytest.warns(DeprecationWarning, match=r"ShardedDynamicIHVP\.from_window"):
        filled = DynamicIHVP.from_window(g, damp=0.1, num_grads=4, comm=SingleProcessComm())
    assert type(filled) is ShardedDynamicIHVP and len(filled) == 3
    ref = DynamicIHVP.from_window(g, damp=0.1, num_grads=4)
    for row in g:
        op.update(row)
    x = np.arange(12.0)
    np.testing.assert_allclose(op.matvec(x), ref.matvec(x), rtol=1e-13)
    np.testing.assert_allclose(filled.matvec(x), ref.matvec(x), rtol=1e-13)
    # comm=None was the unsharded spelling: still accepted, silently, as a DynamicIHVP.
    plain = DynamicIHVP(4, 12, damp=0.1, dtype="float64", comm=None)
    assert type(plain) is DynamicIHVP
    with pytest.raises(TypeError, match="unexpected keyword argument 'comms'"):
        DynamicIHVP(4, 12, damp=0.1, dtype="float64", comms=SingleProcessComm())


def test_single_process_modules_know_no_communicator() -> None:
    """Issue 20: ``comm`` appears in no module of the single-process operators."""
    import pathlib
    import re

    import mfac_core

    src = pathlib.Path(mfac_core.__file__).parent
    single = ["_operator.py", "_capacitance.py"] + [p.name for p in src.glob("_spectral*.py")]
    single += ["_static.py", "_setup.py", "_gform.py", "_streaming.py", "_store.py", "_engine.py"]
    single += [p.name for p in src.glob("_dynamic*.py") if p.name != "_dynamic_sharded.py"]
    for name in single:
        text = (src / name).read_text()
        # No communicator, and no import of the sharded layer or of mfac_core.distributed.
        assert not re.search(r"\bcomm\b|from \.(distributed|_shard|_dynamic_sharded)", text), name


def test_deprecated_update_method() -> None:
    from mfac_core import DynamicIHVP, WindowOptions

    with pytest.warns(DeprecationWarning, match=r"use options=WindowOptions\(refactor_every=0\)"):
        ref = DynamicIHVP(3, 8, damp=0.1, dtype="float64", update_method="refactor")
    assert ref.refactor_every == 0 and ref.update_method == "refactor"
    with pytest.warns(DeprecationWarning, match="incremental edits are the default"):
        inc = DynamicIHVP(3, 8, damp=0.1, dtype="float64", update_method="incremental")
    assert inc.refactor_every == 3 and inc.update_method == "incremental"
    with pytest.raises(ValueError, match="update_method must be one of"):
        DynamicIHVP(3, 8, damp=0.1, dtype="float64", update_method="fast")
    # Contradictory spellings are refused (they were resolved silently, one way or the other).
    contradictory = [
        {"update_method": "refactor", "refactor_every": 7},
        {"update_method": "incremental", "options": WindowOptions(refactor_every=0)},
    ]
    for kw in contradictory:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with pytest.raises(ValueError, match="contradicts refactor_every"):
                DynamicIHVP(3, 8, damp=0.1, dtype="float64", **kw)
    with pytest.warns(DeprecationWarning, match="update_method"):
        agreed = DynamicIHVP(
            3,
            8,
            damp=0.1,
            dtype="float64",
            update_method="refactor",
            options=WindowOptions(refactor_every=0),
        )
    assert agreed.refactor_every == 0
    # from_window's deprecated keywords name from_window's new spelling.
    new = r"use DynamicIHVP\.from_window\(\.\.\., options=WindowOptions\(refine=2\)\)"
    with pytest.warns(DeprecationWarning, match=new):
        assert DynamicIHVP.from_window(np.eye(2, 8), damp=0.1, refine=2).refine == 2
    # refactor_every=0 is the reference: a full factorisation at every update.
    rng = np.random.default_rng(2)
    op = DynamicIHVP(3, 8, damp=0.1, dtype="float64", options=WindowOptions(refactor_every=0))
    for g in rng.standard_normal((6, 8)):
        op.update(g)
    assert op.refactor_count == 7  # the empty window's, then one per update
    # A pickle of a reference window made before refactor_every=0 loads as one.
    state = op.__getstate__()
    state.update(update_method="refactor", refactor_every=3)
    old = DynamicIHVP.__new__(DynamicIHVP)
    old.__setstate__(state)
    assert old.refactor_every == 0 and old.update_method == "refactor"


def test_from_gradients_options_are_the_operators() -> None:
    """``from_gradients`` names 6 keywords; the operator's options pass through."""
    import inspect

    keywords = [
        p
        for p in inspect.signature(StaticIHVP.from_gradients).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert len(keywords) <= 6
    G = np.random.default_rng(3).standard_normal((4, 12))
    op = StaticIHVP.from_gradients(iter(G), num_grads=4, dim=12, damp=0.1, block_size=6, refine=1)
    ref = StaticIHVP(G, damp=0.1, block_size=6, refine=1)
    assert (op.block_size, op.refine) == (6, 1)
    np.testing.assert_array_equal(op.matvec(np.ones(12)), ref.matvec(np.ones(12)))
    read: list[int] = []

    def gradients():
        for i, g in enumerate(G):
            read.append(i)
            yield g

    # An unknown keyword is refused before the data loader is read.
    with pytest.raises(TypeError, match="unexpected keyword argument 'blocksize'"):
        StaticIHVP.from_gradients(gradients(), num_grads=4, dim=12, damp=0.1, blocksize=6)
    assert read == []
    with pytest.warns(DeprecationWarning, match="out= and overwrite_G= are ignored"):
        StaticIHVP.from_gradients(iter(G), num_grads=4, dim=12, damp=0.1, overwrite_G=True)


def test_window_options_and_their_deprecated_keywords() -> None:
    """``DynamicIHVP`` names 5 keywords and ``ShardedDynamicIHVP`` 6 (issue 20)."""
    import inspect

    from mfac_core import DynamicIHVP, ShardedDynamicIHVP, WindowOptions

    for cls, most in ((DynamicIHVP, 5), (ShardedDynamicIHVP, 6)):
        keywords = [
            p
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        assert len(keywords) == most, cls
        # help() and the docs show __init__'s signature, not __new__'s (*args, **kwargs).
        shown = inspect.signature(cls).parameters
        assert "damp" in shown and "options" in shown and "args" not in shown, cls
    rng = np.random.default_rng(4)
    G = rng.standard_normal((5, 9))
    new = DynamicIHVP(
        4, 9, damp=0.1, dtype="float64", options=WindowOptions(zero_init=True, refine=1)
    )
    with pytest.warns(
        DeprecationWarning, match=r"options=WindowOptions\(zero_init=True, refine=1\)"
    ):
        old = DynamicIHVP(4, 9, damp=0.1, dtype="float64", zero_init=True, refine=1)
    for op in (new, old):
        assert (op.zero_init, op.refine, op.check_finite, op.refactor_every) == (True, 1, True, 4)
        for g in G:
            op.update(g)
    np.testing.assert_array_equal(new.matvec(np.ones(9)), old.matvec(np.ones(9)))
    # A deprecated keyword overrides the same field of options=; both are checked.
    with pytest.warns(DeprecationWarning):
        both = DynamicIHVP(
            4, 9, damp=0.1, dtype="float64", options=WindowOptions(refine=2), check_finite=False
        )
    assert (both.refine, both.check_finite) == (2, False)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="zero_init must be"):
        DynamicIHVP(4, 9, damp=0.1, dtype="float64", zero_init=None)
    with pytest.raises(TypeError, match="options must be a WindowOptions, got dict"):
        DynamicIHVP(4, 9, damp=0.1, dtype="float64", options={"refine": 1})
    # Each option is refused where it is written, with the constructors' words.
    for bad, error, words in (
        ({"zero_init": "no"}, TypeError, "zero_init must be True or False"),
        ({"refactor_every": -1}, ValueError, "refactor_every must be >= 0"),
        ({"refactor_every": 2.0}, TypeError, "refactor_every must be an int"),
        ({"check_finite": 1}, TypeError, "check_finite must be True or False"),
        ({"refine": True}, TypeError, "refine must be an int"),
    ):
        with pytest.raises(error, match=words):
            WindowOptions(**bad)
    filled = DynamicIHVP.from_window(G[:3], damp=0.1, options=WindowOptions(check_finite=False))
    assert len(filled) == 3 and not filled.check_finite
