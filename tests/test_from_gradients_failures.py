"""``StaticIHVP.from_gradients`` when something fails: a complete file of gradients is
kept when the set-up after the collection fails (the error says where it is), an
unfinished one is removed, and an iterator the call abandons is closed
(mfac_core._store)."""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest

from mfac_core import FactorizationError, StaticIHVP
from mfac_core._errors import add_note
from mfac_core.testing import assert_close, condition_number


def _singular(rng, m, d, dtype):
    """m copies of one gradient of small integers (exact in every dtype): the Gram is
    exactly singular, and no damping of 1e-300 factorises it."""
    return np.tile(rng.integers(-3, 4, d).astype(np.float64), (m, 1)).astype(dtype)


def _interrupt_at(stage):
    def progress(name, done, total):
        if name == stage:
            raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize(
    ("dtype", "failure"),
    [("float32", "damp"), ("float64", "interrupt"), ("float16", "damp"), ("bfloat16", "damp")],
)
def test_a_complete_file_is_kept_when_the_set_up_fails(tmp_path, rng, dtype, failure):
    # Regression: a set-up that failed after the last gradient (a damping too small to
    # factorise, Ctrl-C) removed the complete file, and with it the collection.
    if dtype == "bfloat16":
        stored = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    else:
        stored = np.dtype(dtype)
    m, d = 5, 30
    G = _singular(rng, m, d, np.float32).astype(stored)
    path = tmp_path / "G.npy"
    if failure == "damp":
        options, exc = {"damp": 1e-300}, FactorizationError
    else:
        options, exc = {"damp": 0.1, "progress": _interrupt_at("set-up")}, KeyboardInterrupt
    with pytest.raises(exc) as info:
        StaticIHVP.from_gradients(
            iter(G), num_grads=m, dim=d, dtype=dtype, grads_out=path, **options
        )
    assert type(info.value) is exc  # the error itself, a note added
    (note,) = info.value.__notes__
    where = str(path.resolve())
    assert f"{where} is complete and has been kept" in note
    assert f"StaticIHVP(numpy.load({where!r}, mmap_mode='r')" in note
    assert os.listdir(tmp_path) == ["G.npy"]
    kept = np.load(path, mmap_mode="r")
    if dtype == "bfloat16":
        # .npy records bfloat16 as raw 2-byte values: the note says to view them back,
        # and not to use the command line, which refuses such a file.
        assert ".view(ml_dtypes.bfloat16)" in note and "mfac-core" not in note
        kept = kept.view(stored)
    else:
        assert f"mfac-core ihvp {where} VECS.npy" in note
    np.testing.assert_array_equal(kept.view(np.uint8), G.view(np.uint8))
    # The operator built from the kept file, as the note says, is that of the gradients.
    damp = 0.1
    op = StaticIHVP(kept, damp=damp)
    x = rng.standard_normal(d).astype(op.dtype)
    G64 = G.astype(np.float64)
    F = damp * np.eye(d) + G64.T @ G64 / m
    kappa = condition_number(G64, damp)
    assert_close(op.matvec(x), np.linalg.solve(F, x.astype(np.float64)), kappa=kappa)


@pytest.mark.parametrize("failure", ["interrupt", "nan"])
def test_an_unfinished_file_is_still_removed(tmp_path, rng, failure):
    # The contrast: a collection that fails leaves no file (its rows are missing), and its
    # error carries no note.
    m, d = 5, 30
    G = rng.standard_normal((m, d))
    options = {}
    if failure == "interrupt":
        exc, options = KeyboardInterrupt, {"progress": _interrupt_at("gradients")}
    else:
        exc, G[2, 3] = ValueError, np.nan
    with pytest.raises(exc) as info:
        StaticIHVP.from_gradients(
            iter(G), num_grads=m, dim=d, damp=0.1, grads_out=tmp_path / "G.npy", **options
        )
    assert os.listdir(tmp_path) == []
    assert not getattr(info.value, "__notes__", None)


def test_a_set_up_failure_into_memory_or_an_array_adds_no_note(rng):
    m, d = 5, 30
    G = _singular(rng, m, d, np.float64)
    for store in (None, np.empty((m, d))):
        with pytest.raises(FactorizationError) as info:
            StaticIHVP.from_gradients(iter(G), num_grads=m, dim=d, damp=1e-300, grads_out=store)
        assert not getattr(info.value, "__notes__", None)
    np.testing.assert_array_equal(store, G)  # the user's array keeps the gradients


class _Source:
    """A generator of ``items`` that records whether it was closed (its ``finally`` ran)."""

    def __init__(self, items, *, fail_on_close=False):
        self.items, self.fail_on_close = list(items), fail_on_close
        self.closed = self.finished = False

    def __iter__(self):
        try:
            yield from self.items
            self.finished = True
        finally:
            self.closed = True
            if self.fail_on_close and not self.finished:
                raise RuntimeError("the loader's clean-up failed")


def _cases(G):
    nan = G.copy()
    nan[2, 3] = np.nan
    return {
        "too many": ([*G, G[0]], {}, ValueError, "exceed"),
        "trailing None": ([*G, None], {}, ValueError, "yielded None"),
        "wrong shape": ([G[0], G[1, :-1], *G[2:]], {}, ValueError, "shape"),
        "non-finite": (list(nan), {}, ValueError, "holds NaN"),
        "mixed dtypes": ([G[0], G[1].astype(np.float32), *G[2:]], {}, TypeError, "dtype="),
        "interrupt": (list(G), {"progress": _interrupt_at("gradients")}, KeyboardInterrupt, None),
    }


@pytest.mark.parametrize("case", ["too many", "trailing None", "wrong shape", "non-finite",
                                  "mixed dtypes", "interrupt"])  # fmt: skip
@pytest.mark.parametrize("into", ["memory", "file"])
def test_an_abandoned_generator_is_closed(tmp_path, rng, case, into):
    # Regression: the generator was left suspended, its finally blocks and with
    # statements (an open file, a loader's workers) put off until it was collected,
    # which the caller's own reference (or the kept error) could put off for ever.
    G = rng.standard_normal((6, 20))
    items, options, exc, match = _cases(G)[case]
    source = _Source(items)
    loader = iter(source)
    grads_out = tmp_path / "G.npy" if into == "file" else None
    with pytest.raises(exc, match=match):
        StaticIHVP.from_gradients(
            loader, num_grads=6, dim=20, damp=0.1, grads_out=grads_out, **options
        )
    assert source.closed and not source.finished
    assert os.listdir(tmp_path) == []


def test_an_exhausted_iterator_is_not_closed(rng):
    # Only an iterator the call abandons is closed; one it read to its end is not
    # (harmless, but not asked for), whether the call then succeeds or fails.
    G = rng.standard_normal((4, 20))

    class Iterator:
        def __init__(self, items):
            self.items, self.closes = iter(items), 0

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.items)

        def close(self):
            self.closes += 1

    exact, few, many = Iterator(G), Iterator(G[:3]), Iterator([*G, G[0]])
    StaticIHVP.from_gradients(exact, num_grads=4, dim=20, damp=0.1)
    with pytest.raises(ValueError, match="ended after 3"):
        StaticIHVP.from_gradients(few, num_grads=4, dim=20, damp=0.1)
    with pytest.raises(FactorizationError):  # after the collection: nothing abandoned
        StaticIHVP.from_gradients(Iterator(_singular(rng, 4, 20, float)), num_grads=4, dim=20,
                                  damp=1e-300)  # fmt: skip
    with pytest.raises(ValueError, match="exceed"):
        StaticIHVP.from_gradients(many, num_grads=4, dim=20, damp=0.1)
    assert (exact.closes, few.closes, many.closes) == (0, 0, 1)


def test_an_error_of_close_does_not_hide_the_first_one(rng):
    G = rng.standard_normal((4, 20))
    G[1, 5] = np.inf
    source = _Source(G, fail_on_close=True)
    with pytest.raises(ValueError, match="gradient 1 holds NaN or infinity") as info:
        StaticIHVP.from_gradients(iter(source), num_grads=4, dim=20, damp=0.1)
    assert source.closed
    (note,) = info.value.__notes__
    assert "RuntimeError: the loader's clean-up failed" in note


def test_an_abandoned_iterator_without_close_is_let_go(rng):
    # An iterator without close() (a DataLoader's, whose workers stop when it is
    # collected) was kept alive by the collecting frame, which the error's traceback
    # holds, for as long as the error was kept (a notebook's last error).
    G = rng.standard_normal((4, 20))
    made = []

    class Iterator:
        def __init__(self):
            self.items = iter([*G, G[0]])

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.items)

    class Loader:
        def __iter__(self):
            it = Iterator()
            made.append(weakref.ref(it))
            return it

    gc.disable()  # let go by reference counting, with the error still held
    try:
        with pytest.raises(ValueError, match="exceed") as info:
            StaticIHVP.from_gradients(Loader(), num_grads=4, dim=20, damp=0.1)
        assert info.value.__traceback__ is not None
        assert made and made[0]() is None
    finally:
        gc.enable()


def test_torch_gradients_abandoned_are_closed(tmp_path, rng):
    torch = pytest.importorskip("torch")
    G = torch.tensor(rng.standard_normal((4, 20)))
    G[2, 1] = float("nan")
    source = _Source(G)
    loader = iter(source)  # held, as a caller holds its generator
    with pytest.raises(ValueError, match="gradient 2 holds NaN"):
        StaticIHVP.from_gradients(
            loader, num_grads=4, dim=20, damp=0.1, grads_out=torch.empty(4, 20)
        )
    assert source.closed and not source.finished
    # Torch gradients into a .npy path: refused with the first one, the file never made.
    source = _Source(G)
    loader = iter(source)
    with pytest.raises(TypeError, match=r"grads_out names a \.npy file"):
        StaticIHVP.from_gradients(
            loader, num_grads=4, dim=20, damp=0.1, grads_out=tmp_path / "G.npy"
        )
    assert source.closed and os.listdir(tmp_path) == []


def test_add_note_without_notes_support():
    # Python 3.10 has no BaseException.add_note: the note goes to __notes__ all the same.
    class Old(ValueError):
        add_note = None

    exc = Old("bad")
    add_note(exc, "first")
    add_note(exc, "second")
    assert exc.__notes__ == ["first", "second"] and str(exc) == "bad"
    new = ValueError("bad")
    add_note(new, "first")
    assert new.__notes__ == ["first"]


def test_a_relative_file_is_the_same_file_when_the_loader_changes_directory(
    tmp_path, rng, monkeypatch
):
    # Regression: the store kept its relative name. A data loader that changed the working
    # directory made the failed collection remove the user's file of that name there (and
    # leave its own, unfinished), and a complete one marked the user's file's first byte
    # and named it in the note.
    m, d = 3, 20
    (tmp_path / "data").mkdir()
    theirs = tmp_path / "data" / "G.npy"
    monkeypatch.chdir(tmp_path)

    def moving(G, fail):
        yield G[0]
        os.chdir("data")
        yield from G[1:]
        if fail:
            raise RuntimeError("the loader failed")

    G = rng.standard_normal((m, d))
    theirs.write_bytes(b"the user's own file")
    with pytest.raises(RuntimeError, match="the loader failed"):
        StaticIHVP.from_gradients(
            moving([*G, G[0]], True), num_grads=m + 1, dim=d, damp=0.1, grads_out="G.npy"
        )
    assert theirs.read_bytes() == b"the user's own file"
    assert sorted(os.listdir(tmp_path)) == ["data"]
    os.chdir(tmp_path)
    S = _singular(rng, m, d, np.float64)
    with pytest.raises(FactorizationError) as info:
        StaticIHVP.from_gradients(
            moving(S, False), num_grads=m, dim=d, damp=1e-300, grads_out="G.npy"
        )
    assert theirs.read_bytes() == b"the user's own file"
    (note,) = info.value.__notes__
    assert f"{os.path.realpath(tmp_path / 'G.npy')} is complete" in note
    np.testing.assert_array_equal(np.load(tmp_path / "G.npy"), S)


def test_the_kept_file_note_names_the_file_through_a_link_and_a_bytes_path(tmp_path, rng):
    # Regression: the note named os.path.abspath's file, which drops "link/.." without
    # following the link (another file, or none), and a path that os.fspath gives as
    # bytes failed the note itself (shlex.quote), a TypeError in place of the error.
    m, d = 3, 20
    S = _singular(rng, m, d, np.float64)
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")

    class BytesPath(os.PathLike):
        def __fspath__(self):
            return os.fsencode(tmp_path / "bytes.npy")

    for grads_out, where in (
        (str(tmp_path / "link" / ".." / "G.npy"), tmp_path / "real" / "G.npy"),
        (BytesPath(), tmp_path / "bytes.npy"),
    ):
        with pytest.raises(FactorizationError) as info:
            StaticIHVP.from_gradients(iter(S), num_grads=m, dim=d, damp=1e-300, grads_out=grads_out)
        (note,) = info.value.__notes__
        assert f"numpy.load({os.path.realpath(where)!r}, mmap_mode='r')" in note
        np.testing.assert_array_equal(np.load(where), S)
