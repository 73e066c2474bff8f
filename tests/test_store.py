"""Gradients larger than memory: ``StaticIHVP(G, out=W)``, read-only memmaps and
``StaticIHVP.from_gradients`` (mfac_core._store), against the float64 oracles."""

from __future__ import annotations

import io
import itertools
import os
import tracemalloc

import numpy as np
import pytest
from conftest import rounded

import mfac_core._gform
from mfac_core import StaticIHVP
from mfac_core._group_factors import WoodburyFactor
from mfac_core._store import TextProgress
from mfac_core.testing import (
    SpectralOracle,
    assert_close,
    condition_number,
    dense_inverse,
    to_numpy,
)

# (m, d, block_size): layouts with a Woodbury group (W is written) and without.
LAYOUTS = {
    "full": (5, 40, None),
    "woodbury-blocks+dense-ragged": (3, 23, 7),
    "woodbury-blocks+woodbury-ragged": (3, 14, 5),
    "dense-blocks": (6, 23, 4),
}


def _data(rng, m, d, dtype):
    G = rounded(rng.standard_normal((m, d)), dtype)
    return G, 1e-2 * float(np.linalg.norm(G, 2)) ** 2 / m


def _memmap(path, G, dtype, *, read_only=True):
    """G written to a .npy file, reopened as a memmap (read-only by default)."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=G.shape)
    mm[...] = G
    mm.flush()
    del mm
    return np.load(path, mmap_mode="r" if read_only else "r+")


def _warm_up():
    # Lazy imports (SciPy's LAPACK, numpy.ma) must not count as the set-up's memory.
    for dt in (np.float32, np.float16):
        op = StaticIHVP(np.ones((2, 40), dt), damp=1.0, refine=1)
        op.matvec(np.ones(40, np.float32))
        op.matmat(np.ones((40, 2), np.float32))
        op.diagonal()


def _peak(call):
    """``call()`` and the peak of the memory NumPy allocated during it (tracemalloc)."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _W(op):
    return next(f.W for f in op._factors if isinstance(f, WoodburyFactor))


# -- out= ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_out_receives_W(xp_device, dtype, layout, rng):
    m, d, bs = LAYOUTS[layout]
    G, damp = _data(rng, m, d, dtype)
    be = xp_device
    Gb = be.asarray(G, dtype)
    out = be.asarray(np.zeros((m, d)), dtype)
    if not be.mutable:
        with pytest.raises(ValueError, match="writeable"):
            StaticIHVP(Gb, damp=damp, block_size=bs, out=out)
        return
    op = StaticIHVP(Gb, damp=damp, block_size=bs, out=out)
    ref = StaticIHVP(be.asarray(G, dtype), damp=damp, block_size=bs)
    oracle = SpectralOracle(G, damp, block_size=bs)
    X = rounded(rng.standard_normal((d, 2)), dtype)
    assert_close(op.matmat(be.asarray(X, dtype)), oracle.matmat(X), kappa=oracle.kappa)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    np.testing.assert_array_equal(to_numpy(Gb), G)  # G is kept
    if layout == "dense-blocks":
        assert not np.any(to_numpy(out))  # no W needed: out untouched
        return
    # out holds W (the Woodbury columns), and the operator reads it there.
    W_ref = np.hstack([to_numpy(f.W) for f in ref._factors if isinstance(f, WoodburyFactor)])
    wood = W_ref.shape[1]
    np.testing.assert_array_equal(to_numpy(out)[:, :wood], W_ref)
    assert not np.any(to_numpy(out)[:, wood:])
    if be.is_numpy:
        assert np.shares_memory(_W(op), out)


def test_out_is_G_with_overwrite_G(rng):
    G, damp = _data(rng, 4, 30, "float64")
    Gw = G.copy()
    op = StaticIHVP(Gw, damp=damp, out=Gw, overwrite_G=True)
    assert np.shares_memory(_W(op), Gw)
    assert_close(op.diagonal(), np.diag(dense_inverse(G, damp)), kappa=op.kappa_bound)


def test_out_refused_before_anything_is_written(numpy_backend, strict_device1, rng):
    G, damp = _data(rng, 4, 30, "float64")
    zeros = np.zeros((4, 30))
    read_only = np.zeros((4, 30))
    read_only.setflags(write=False)
    torch = pytest.importorskip("torch")
    cases = [
        (np.zeros((4, 31)), ValueError, "shape"),
        (np.zeros((4, 30), np.float32), TypeError, "dtype"),
        (read_only, ValueError, "writeable"),
        (torch.zeros(4, 30, dtype=torch.float64), TypeError, "torch"),
    ]
    for out, exc, match in cases:
        with pytest.raises(exc, match=match):
            StaticIHVP(G, damp=damp, out=out)
    with pytest.raises(ValueError, match="device"):
        StaticIHVP(
            strict_device1.asarray(G, "float64"),
            damp=damp,
            out=strict_device1.xp.zeros((5, 30), dtype=strict_device1.xp.float64),
        )
    # Overlapping G: a view of the same buffer, G itself without overwrite_G, or both.
    buf = np.zeros((8, 30))
    Gv = buf[:4]
    Gv[...] = G
    for out, kwargs, match in [
        (buf[2:6], {}, "overlaps G"),
        (Gv, {}, "overwrite_G=True"),
        (zeros, {"overwrite_G": True}, "one or the other"),
    ]:
        before = buf.copy()
        with pytest.raises(ValueError, match=match):
            StaticIHVP(Gv, damp=damp, out=out, **kwargs)
        np.testing.assert_array_equal(buf, before)
    assert not np.any(zeros)
    with pytest.raises(ValueError, match="2-byte"):
        StaticIHVP(G.astype(np.float16), damp=damp, out=np.zeros((4, 30), np.float16))


def test_out_overlap_torch(rng):
    torch = pytest.importorskip("torch")
    G, damp = _data(rng, 3, 20, "float64")
    buf = torch.zeros(6, 20, dtype=torch.float64)
    buf[:3] = torch.tensor(G)
    with pytest.raises(ValueError, match="overlaps G"):
        StaticIHVP(buf[:3], damp=damp, out=buf[3:])  # one storage: refused (conservative)
    op = StaticIHVP(buf[:3], damp=damp, out=torch.zeros(3, 20, dtype=torch.float64))
    assert_close(op.diagonal(), np.diag(dense_inverse(G, damp)), kappa=op.kappa_bound)


def test_read_only_memmap_G_with_memmap_W_keeps_md_out_of_memory(tmp_path, rng):
    m, d, damp = 16, 60_000, 1e-3
    G64 = rounded(rng.standard_normal((m, d)) / np.sqrt(d), "float32")
    G = _memmap(tmp_path / "G.npy", G64, np.float32)
    assert not G.flags.writeable
    W = np.lib.format.open_memmap(tmp_path / "W.npy", mode="w+", dtype=np.float32, shape=(m, d))
    size = m * d * 4
    _warm_up()
    op, peak = _peak(lambda: StaticIHVP(G, damp=damp, out=W))
    # Without out the set-up allocates an m x d W (size); with it only bounded pieces.
    assert peak < size / 8, (peak, size)
    _, peak_without = _peak(lambda: StaticIHVP(G, damp=damp))
    assert peak_without >= size
    x = rounded(rng.standard_normal(d), "float32")
    y, peak = _peak(lambda: op.matvec(x.astype(np.float32)))
    assert peak < size / 4, (peak, size)  # a few vectors, no m x d temporary
    assert type(y) is np.ndarray
    oracle = SpectralOracle(G64, damp)
    assert_close(y, oracle.matvec(x), kappa=oracle.kappa)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    # W is on disk: a fresh read-only map of the file serves the same products.
    W.flush()
    again = np.load(tmp_path / "W.npy", mmap_mode="r")
    np.testing.assert_array_equal(again, W)


def test_half_read_only_memmap_end_to_end(tmp_path, rng, monkeypatch):
    # Float32 pieces of 2**14 entries, so that G spans many of them.
    monkeypatch.setattr(mfac_core._gform, "COMPUTE_ENTRIES", 2**14)
    m, d, damp = 12, 50_000, 1e-3
    G = _memmap(tmp_path / "G16.npy", rng.standard_normal((m, d)) / np.sqrt(d), np.float16)
    G64 = np.asarray(G, dtype=np.float64)
    size = m * d * 2
    _warm_up()
    op, peak = _peak(lambda: StaticIHVP(G, damp=damp))
    assert op.storage_dtype == "float16" and op._factors[0].G is G
    assert peak < size / 8, (peak, size)
    x = rounded(rng.standard_normal(d), "float32")
    y, peak = _peak(lambda: op.matvec(x.astype(np.float32)))
    assert peak < size, (peak, size)  # float32 pieces and vectors, no float32 copy of G (2 size)
    oracle = SpectralOracle(G64, damp)
    assert_close(y, oracle.matvec(x), kappa=oracle.kappa)
    refined = StaticIHVP(G, damp=damp, refine=1)
    assert_close(refined.matvec(x.astype(np.float32)), oracle.matvec(x), kappa=oracle.kappa)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)


# -- from_gradients ------------------------------------------------------------------------


def test_from_gradients_in_memory_single_and_batches(rng):
    m, d = 10, 30
    G, damp = _data(rng, m, d, "float64")
    items = [G[0], G[1:4], G[4], G[5:10]]  # single gradients and batches, mixed
    op = StaticIHVP.from_gradients(iter(items), num_grads=m, dim=d, damp=damp)
    assert op.dtype == np.float64
    assert_close(
        op.todense(), dense_inverse(G, damp), kappa=condition_number(G, damp), err_msg="F^-1"
    )


def test_from_gradients_to_files(tmp_path, rng):
    m, d = 8, 500
    G, damp = _data(rng, m, d, "float32")
    calls = []
    op = StaticIHVP.from_gradients(
        (g for g in G),
        num_grads=m,
        dim=d,
        damp=damp,
        dtype="float32",
        grads_out=tmp_path / "G.npy",
        out=str(tmp_path / "W.npy"),
        progress=lambda *a: calls.append(a),
    )
    stored = np.load(tmp_path / "G.npy", mmap_mode="r")
    np.testing.assert_array_equal(stored, G)  # the gradients, reopenable
    np.testing.assert_array_equal(np.load(tmp_path / "W.npy", mmap_mode="r"), _W(op))
    assert isinstance(_W(op), np.memmap)
    assert [c[1:] for c in calls if c[0] == "gradients"] == [(i, m) for i in range(1, m + 1)]
    setup = [c[1:] for c in calls if c[0] == "set-up"]
    assert setup[-1] == (2 * d, 2 * d) and [s for s, _ in setup] == sorted(s for s, _ in setup)
    assert calls.index(next(c for c in calls if c[0] == "set-up")) == m  # stages in order
    oracle = SpectralOracle(G, damp)
    assert_close(op.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    # overwrite_G: one file, G's then W's; float16 storage: the G-form over the file.
    op1 = StaticIHVP.from_gradients(
        iter(G), num_grads=m, dim=d, damp=damp, grads_out=tmp_path / "GW.npy", overwrite_G=True
    )
    assert_close(np.load(tmp_path / "GW.npy"), _W(op), kappa=oracle.kappa, dtype="float32")
    assert_close(op1.diagonal(), oracle.diagonal(), kappa=oracle.kappa)
    op2 = StaticIHVP.from_gradients(
        iter(G), num_grads=m, dim=d, damp=damp, dtype=np.float16, grads_out=tmp_path / "H.npy"
    )
    assert op2.storage_dtype == "float16"
    G16 = G.astype(np.float16).astype(np.float64)
    assert_close(op2.diagonal(), np.diag(dense_inverse(G16, damp)), kappa=oracle.kappa)


def test_from_gradients_into_a_torch_tensor(rng):
    torch = pytest.importorskip("torch")
    m, d = 6, 40
    G, damp = _data(rng, m, d, "float64")
    store = torch.empty(m, d, dtype=torch.float32)
    op = StaticIHVP.from_gradients(
        (torch.tensor(g) for g in G), num_grads=m, dim=d, damp=damp, grads_out=store
    )  # float64 gradients into the float32 store the user chose
    assert op.dtype == torch.float32
    np.testing.assert_array_equal(store.numpy(), G.astype(np.float32))
    with pytest.raises(TypeError, match="grads_out"):  # torch gradients, NumPy store
        StaticIHVP.from_gradients(iter(torch.tensor(G)), num_grads=m, dim=d, damp=damp)


def test_from_gradients_text_bar():
    stream = io.StringIO()
    bar = TextProgress(stream, width=10)
    for i in range(1, 5):
        bar("gradients", i, 4)
    bar("set-up", 10, 10)
    text = stream.getvalue()
    assert "[##########] 100% (4/4)\n" in text and "set-up" in text
    assert text.count("\r") == 5


def _bad_cases(G):
    m, d = G.shape
    nan = G.copy()
    nan[3, 7] = np.nan
    return [
        ("too few", lambda: iter(G[:-1]), {}, ValueError, f"ended after {m - 1} of"),
        ("too many", lambda: iter(np.vstack([G, G[:1]])), {}, ValueError, "exceed"),
        ("batch too many", lambda: iter([G[:5], G[3:]]), {}, ValueError, "exceed"),
        ("wrong shape", lambda: iter([G[0], G[1, :-1]]), {}, ValueError, r"gradient 1 .*shape"),
        ("3-D", lambda: iter([G[None]]), {}, ValueError, "shape"),
        ("non-finite", lambda: iter(nan), {}, ValueError, "gradient 3 holds NaN"),
        ("integers", lambda: iter(np.ones((m, d), int)), {}, TypeError, "floating"),
        (
            "mixed dtypes",
            lambda: iter([G[0]] + [g.astype(np.float32) for g in G[1:]]),
            {},
            TypeError,
            "dtype=",
        ),
        (
            "float16 overflow",
            lambda: iter(G * 1e6),
            {"dtype": "float16"},
            ValueError,
            "overflows",
        ),
        ("not iterable", lambda: 3, {}, TypeError, "iterable"),
        ("bad damp", lambda: iter(G), {"damp": -1.0}, ValueError, "damp"),
        ("bad dtype", lambda: iter(G), {"dtype": "int8"}, TypeError, "dtype"),
        ("bad progress", lambda: iter(G), {"progress": "yes"}, TypeError, "progress"),
        (
            "W twice",
            lambda: iter(G),
            {"out": "W.npy", "overwrite_G": True},
            ValueError,
            "one or the other",
        ),
    ]


@pytest.mark.parametrize("case", range(14))
def test_from_gradients_errors_leave_nothing_behind(case, tmp_path, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    G, damp = _data(rng, 8, 20, "float64")
    name, make, kwargs, exc, match = _bad_cases(G)[case]
    consumed = []

    def gradients():
        for g in make():
            consumed.append(1)
            yield g

    source = make() if name == "not iterable" else gradients()
    opts = {"num_grads": 8, "dim": 20, "damp": damp, "grads_out": tmp_path / "G.npy"}
    opts.update(kwargs)
    with pytest.raises(exc, match=match):
        StaticIHVP.from_gradients(source, **opts)
    assert os.listdir(tmp_path) == []  # the files it had created are removed
    if name in ("bad damp", "bad dtype", "bad progress", "W twice"):
        assert not consumed  # refused before the data loader was touched


def test_from_gradients_user_arrays_and_existing_files(tmp_path, rng):
    G, damp = _data(rng, 4, 20, "float64")
    (tmp_path / "G.npy").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        StaticIHVP.from_gradients(
            iter(G), num_grads=4, dim=20, damp=damp, grads_out=tmp_path / "G.npy"
        )
    with pytest.raises(FileExistsError):
        StaticIHVP.from_gradients(iter(G), num_grads=4, dim=20, damp=damp, out=tmp_path / "G.npy")
    assert (tmp_path / "G.npy").read_bytes() == b"precious"
    with pytest.raises(ValueError, match="same file"):
        StaticIHVP.from_gradients(
            iter(G), num_grads=4, dim=20, damp=damp, grads_out="a.npy", out="a.npy"
        )
    # A store the caller passes: checked first, keeps the rows read before a failure.
    with pytest.raises(ValueError, match="shape"):
        StaticIHVP.from_gradients(
            iter(G), num_grads=4, dim=20, damp=damp, grads_out=np.zeros((4, 21))
        )
    with pytest.raises(TypeError, match="differs"):
        StaticIHVP.from_gradients(
            iter(G), num_grads=4, dim=20, damp=damp, grads_out=np.zeros((4, 20)), dtype="float32"
        )
    store = np.zeros((4, 20))
    with pytest.raises(ValueError, match="ended after 3"):
        StaticIHVP.from_gradients(iter(G[:3]), num_grads=4, dim=20, damp=damp, grads_out=store)
    np.testing.assert_array_equal(store[:3], G[:3])
    # islice takes the first num_grads of a longer (here endless) iterable.
    op = StaticIHVP.from_gradients(
        itertools.islice(itertools.cycle(G), 4), num_grads=4, dim=20, damp=damp
    )
    assert_close(op.todense(), dense_inverse(G, damp), kappa=condition_number(G, damp))


def _guidance_example() -> str:
    """The code block of docs/guidance.rst's section "Gradients larger than memory"."""
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs" / "guidance.rst"
    if not docs.exists():
        pytest.skip("docs/ is not beside the tests")
    text = docs.read_text(encoding="utf-8").split("Gradients larger than memory\n", 1)[1]
    block = text.split(".. code-block:: python\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("   "):
            break  # the block ends at the first line that is not indented
        lines.append(line[3:])
    return "\n".join(lines)


def test_guidance_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_guidance_example(), "guidance.rst", "exec"), ns)
    assert "100%" in capsys.readouterr().err  # the text bar
    assert sorted(os.listdir(tmp_path)) == ["G.npy", "W.npy", "W2.npy"]
    G = np.load(tmp_path / "G.npy").astype(np.float64)
    theta, damp = ns["theta"].astype(np.float64), ns["damp"]
    oracle = SpectralOracle(G, damp)
    assert_close(ns["rho"], theta**2 / (2 * oracle.diagonal()), kappa=oracle.kappa)
    selected = np.asarray(ns["selected"])
    assert selected.sum() == len(theta) // 2
    assert np.all(ns["theta_new"][selected] == 0)
    assert_close(ns["op2"].diagonal(), SpectralOracle(G, 10 * damp).diagonal(), kappa=oracle.kappa)
