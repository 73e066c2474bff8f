"""The ``mfac-core`` command line: ``ihvp``, ``demo``, ``--version`` and its errors."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import mfac_core
from mfac_core import IllConditionedWarning, StaticIHVP
from mfac_core._demo import BOUND_CONSTANT, SINGLE_BOUND
from mfac_core.cli import ProgressBar, UserError, _nonfinite_rows, main
from mfac_core.testing import assert_close, condition_number

M, D = 6, 40
DAMP = 1e-2


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(7)
    arrays = {
        "G": rng.standard_normal((M, D)),
        "G32": rng.standard_normal((M, D)).astype(np.float32),
        "v": rng.standard_normal(D),
        "V": rng.standard_normal((3, D)),
        "V32": rng.standard_normal((3, D)).astype(np.float32),
        "short": rng.standard_normal((2, D - 1)),
        "cube": rng.standard_normal((2, 2, D)),
        "empty_stack": np.zeros((0, D)),
        "Gnan": np.full((M, D), np.nan),
    }
    paths = {}
    for name, arr in arrays.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], arr)
    paths["npz"] = tmp_path / "archive.npz"
    np.savez(paths["npz"], G=arrays["G"])
    paths["text"] = tmp_path / "text.npy"
    paths["text"].write_text("not an array\n")
    paths["out"] = tmp_path / "out.npy"
    return paths


def run(args: list[str | Path]) -> int:
    return main([str(a) for a in args])


def assert_user_error(capsys: pytest.CaptureFixture[str], status: int, *words: str) -> str:
    """Exit status 2, one ``mfac-core...error:`` message and no traceback."""
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert "error:" in err
    for word in words:
        assert word in err, err
    return err


# -- ihvp ----------------------------------------------------------------------------------


def test_ihvp_one_vector_equals_library(files, capsys):
    status = run(["ihvp", files["G"], files["v"], "-o", files["out"], "--damp", DAMP])
    assert status == 0
    G, v = np.load(files["G"]), np.load(files["v"])
    got = np.load(files["out"])
    assert got.shape == v.shape and got.dtype == np.float64
    # Normwise: an entry of F^{-1} v may be small by cancellation.
    assert_close(got, StaticIHVP(G, damp=DAMP).matvec(v), kappa=condition_number(G, DAMP))
    # A summary on stderr, nothing on stdout; no progress bar when stderr is not a TTY.
    out, err = capsys.readouterr()
    assert out == ""
    assert "wrote" in err and "[" not in err


def test_ihvp_stack_equals_library(files):
    assert run(["ihvp", files["G"], files["V"], "-o", files["out"], "--damp", DAMP, "-q"]) == 0
    G, V = np.load(files["G"]), np.load(files["V"])
    got = np.load(files["out"])
    assert got.shape == V.shape
    expected = StaticIHVP(G, damp=DAMP).matmat(V.T).T
    np.testing.assert_array_equal(got, expected)
    # The products are F^{-1} v: F times them gives back V.
    F = DAMP * np.eye(D) + G.T @ G / M
    assert_close(got @ F, V, kappa=condition_number(G, DAMP))


@pytest.mark.parametrize("block_size", [1, 4, 7, 13, D, 2 * D])
def test_ihvp_block_size_equals_library(files, block_size):
    args = [
        "ihvp",
        files["G"],
        files["V"],
        "-o",
        files["out"],
        "--damp",
        DAMP,
        "--block-size",
        block_size,
        "--quiet",
    ]
    assert run(args) == 0
    G, V = np.load(files["G"]), np.load(files["V"])
    expected = StaticIHVP(G, damp=DAMP, block_size=block_size).matmat(V.T).T
    np.testing.assert_array_equal(np.load(files["out"]), expected)


def dense_block_inverse_times(G, damp, block_size, V):
    """``V @ F^{-1}`` for the block-diagonal F, with a dense float64 solve per block."""
    m, d = G.shape
    out = np.empty_like(V, dtype=np.float64)
    for lo in range(0, d, block_size):
        Gb = G[:, lo : lo + block_size]
        Fb = damp * np.eye(Gb.shape[1]) + Gb.T @ Gb / m
        out[..., lo : lo + block_size] = np.linalg.solve(Fb, V[..., lo : lo + block_size].T).T
    return out


@pytest.mark.parametrize("block_size", [1, 4, 10, 13, D])
@pytest.mark.parametrize("vecs", ["v", "V"])
def test_ihvp_block_size_matches_dense_inverse(files, block_size, vecs):
    # Independent of the library: a dense solve per block, for one vector and a stack.
    assert (
        run(
            [
                "ihvp",
                files["G"],
                files[vecs],
                "-o",
                files["out"],
                "--damp",
                DAMP,
                "--block-size",
                block_size,
                "-q",
            ]
        )
        == 0
    )
    G, V = np.load(files["G"]), np.load(files[vecs])
    expected = dense_block_inverse_times(G, DAMP, block_size, V)
    # Both sides err by about eps * kappa relative to ||F^{-1} V||, not to each entry.
    assert_close(
        np.load(files["out"]), expected, kappa=condition_number(G, DAMP, block_size=block_size)
    )


def test_ihvp_float32_input_keeps_float32(files):
    assert run(["ihvp", files["G32"], files["V32"], "-o", files["out"], "--damp", DAMP, "-q"]) == 0
    got = np.load(files["out"])
    assert got.dtype == np.float32
    G, V = np.load(files["G32"]), np.load(files["V32"])
    np.testing.assert_array_equal(got, StaticIHVP(G, damp=DAMP).matmat(V.T).T)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ihvp_dtype_option_casts(files, dtype):
    assert (
        run(
            [
                "ihvp",
                files["G"],
                files["V32"],
                "-o",
                files["out"],
                "--damp",
                DAMP,
                "--dtype",
                dtype,
                "-q",
            ]
        )
        == 0
    )
    got = np.load(files["out"])
    assert got.dtype == np.dtype(dtype)
    G = np.load(files["G"]).astype(dtype)
    V = np.load(files["V32"]).astype(dtype)
    np.testing.assert_array_equal(got, StaticIHVP(G, damp=DAMP).matmat(V.T).T)


def test_ihvp_float16_grads_are_read_in_place_for_float32(tmp_path):
    # The operator reads float16 storage itself (float32 products): a float32 copy of
    # the mapped file (twice its size) is not needed.
    import tracemalloc

    from mfac_core import _fused

    if not _fused.available():
        # Without the C extension the passes widen column pieces to float64, a piece of
        # at least a few MiB: this G (0.8 MB) is one piece.
        pytest.skip("the C extension mfac_core._fused._passes was not built")

    rng = np.random.default_rng(3)
    m, d = 8, 50_000
    G16 = (rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float16)
    np.save(tmp_path / "G16.npy", G16)
    np.save(tmp_path / "v.npy", G16.astype(np.float32).mean(axis=0))
    out = tmp_path / "out.npy"
    args = ["ihvp", tmp_path / "G16.npy", tmp_path / "v.npy", "-o", out, "--damp", DAMP, "-q"]
    assert run([*args, "--dtype", "float32"]) == 0  # lazy imports are not the run's memory
    tracemalloc.start()
    try:
        assert run([*args, "--dtype", "float32", "--overwrite"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < m * d * 4 / 2, (peak, m * d * 4)
    got = np.load(out)
    assert got.dtype == np.float32
    v = np.load(tmp_path / "v.npy")
    np.testing.assert_array_equal(got, StaticIHVP(G16, damp=DAMP).matvec(v))


def test_ihvp_big_endian_float32_grads_give_float32(files, tmp_path):
    # "The default is the dtype of GRADS when it is float32": in either byte order.
    G = np.load(files["G32"])
    np.save(tmp_path / "big.npy", G.astype(">f4"))
    assert (
        run(["ihvp", tmp_path / "big.npy", files["V32"], "-o", files["out"], "--damp", DAMP, "-q"])
        == 0
    )
    got = np.load(files["out"])
    assert got.dtype == np.float32
    V = np.load(files["V32"])
    np.testing.assert_array_equal(got, StaticIHVP(G, damp=DAMP).matmat(V.T).T)


def test_ihvp_does_not_modify_inputs(files):
    before = files["G"].read_bytes(), files["V"].read_bytes()
    assert run(["ihvp", files["G"], files["V"], "-o", files["out"], "--damp", DAMP, "-q"]) == 0
    assert (
        run(
            [
                "ihvp",
                files["G"],
                files["V"],
                "-o",
                files["out"],
                "--damp",
                DAMP,
                "-q",
                "--dtype",
                "float32",
                "--overwrite",
            ]
        )
        == 0
    )
    assert (files["G"].read_bytes(), files["V"].read_bytes()) == before


def test_ihvp_empty_stack(files):
    assert (
        run(["ihvp", files["G"], files["empty_stack"], "-o", files["out"], "--damp", DAMP, "-q"])
        == 0
    )
    assert np.load(files["out"]).shape == (0, D)


def test_ihvp_overwrite(files, capsys):
    args = ["ihvp", files["G"], files["v"], "-o", files["out"], "--damp", DAMP, "-q"]
    assert run(args) == 0
    capsys.readouterr()
    assert_user_error(capsys, run(args), "exists", "--overwrite")
    assert run([*args, "--overwrite", "--damp", 2 * DAMP]) == 0
    G, v = np.load(files["G"]), np.load(files["v"])
    assert_close(
        np.load(files["out"]),
        StaticIHVP(G, damp=2 * DAMP).matvec(v),
        kappa=condition_number(G, 2 * DAMP),
    )
    # No temporary files are left beside the output.
    assert not [p for p in files["out"].parent.iterdir() if p.name.startswith(".mfac-core-")]


def test_ihvp_progress_bar(files, capsys):
    assert (
        run(["ihvp", files["G"], files["V"], "-o", files["out"], "--damp", DAMP, "--progress"]) == 0
    )
    err = capsys.readouterr().err
    assert "set-up [" in err and "100%" in err and "\r" in err


def test_ihvp_quiet_prints_nothing(files, capsys):
    assert run(["ihvp", files["G"], files["V"], "-o", files["out"], "--damp", DAMP, "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_progress_bar_draws_each_percent_once():
    class Stream:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    stream = Stream()
    bar = ProgressBar(stream, "set-up", width=10)
    for done in range(0, 2001):
        bar(done, 2000)
    bar.close()
    assert stream.text.count("\r") == 101
    assert stream.text.endswith("\n")
    assert "[##########] 100%" in stream.text


@pytest.mark.parametrize(
    ("grads", "vecs", "extra", "words"),
    [
        ("missing", "v", [], ["GRADS", "not found"]),
        ("G", "missing", [], ["VECS", "not found"]),
        ("G", "short", [], ["d=39", "d=40"]),
        ("G", "cube", [], ["VECS", "shape"]),
        ("v", "v", [], ["GRADS", "(m, d)"]),
        ("npz", "v", [], [".npz"]),
        ("text", "v", [], ["not an .npy"]),
        ("Gnan", "v", [], ["Gnan.npy row 0 holds NaN or infinity", f"{M} such rows"]),
        ("G", "v", ["--damp", "0"], ["--damp"]),
        ("G", "v", ["--damp", "-1"], ["--damp"]),
        ("G", "v", ["--damp", "nan"], ["--damp"]),
        ("G", "v", ["--damp", "abc"], ["--damp"]),
        ("G", "v", ["--block-size", "0"], ["--block-size"]),
        ("G", "v", ["--dtype", "int32"], ["--dtype"]),
    ],
)
def test_ihvp_user_errors_exit_2_without_traceback(files, capsys, grads, vecs, extra, words):
    def path(name):
        return files.get(name, files["out"].parent / f"{name}.npy")

    args = ["ihvp", path(grads), path(vecs), "-o", files["out"]]
    if "--damp" not in extra:
        args += ["--damp", DAMP]
    status = run(args + extra)
    assert_user_error(capsys, status, *words)
    assert not files["out"].exists()


@pytest.mark.parametrize("which", ["G", "v"])
@pytest.mark.parametrize(
    "how",
    [
        "same path",
        "another spelling",
        "symlink to the input",
        "input is a symlink to it",
        "hard link",
    ],
)
def test_ihvp_refuses_an_output_that_is_an_input(files, capsys, which, how):
    source = files[which]
    before = {name: files[name].read_bytes() for name in ("G", "v")}
    if how == "same path":
        out = source
    elif how == "another spelling":
        out = source.parent / "sub" / ".." / source.name
        (source.parent / "sub").mkdir()
    elif how == "symlink to the input":
        out = source.parent / "link.npy"
        out.symlink_to(source)
    elif how == "input is a symlink to it":
        # Replacing out would change what the input names.
        out = source.parent / "real.npy"
        source.rename(out)
        source.symlink_to(out)
    else:
        out = source.parent / "hard.npy"
        os.link(source, out)
    status = run(["ihvp", files["G"], files["v"], "-o", out, "--damp", DAMP, "--overwrite"])
    assert_user_error(
        capsys, status, str(out), "GRADS" if which == "G" else "VECS", "another output"
    )
    assert {name: files[name].read_bytes() for name in ("G", "v")} == before
    assert out.is_symlink() == (how == "symlink to the input")


def test_ihvp_output_beside_an_input_of_the_same_name(files, tmp_path):
    # Same file name in another folder is another file: not refused.
    other = tmp_path / "other"
    other.mkdir()
    out = other / files["G"].name
    assert run(["ihvp", files["G"], files["v"], "-o", out, "--damp", DAMP, "-q"]) == 0
    assert np.load(out).shape == (D,)


@pytest.mark.parametrize(
    "damp",
    [
        ["--damp", "-1e-5"],
        ["--damp=-1e-5"],
        ["--damp", "-1E-05"],
        ["--damp", "-.5"],
        ["--damp", "-inf"],
        ["--damp", "-0"],
    ],
)
@pytest.mark.parametrize("command", ["ihvp", "demo"])
def test_negative_damp_reaches_the_library_check(files, capsys, damp, command):
    # argparse before 3.13 reads -1e-5 as an option ("expected one argument").
    args = ["ihvp", files["G"], files["v"], "-o", files["out"]] if command == "ihvp" else ["demo"]
    status = run([*args, *damp])
    value = float(damp[-1].split("=")[-1])
    with pytest.raises(ValueError) as library:
        StaticIHVP(np.load(files["G"]), damp=value)
    err = assert_user_error(capsys, status, "--damp", str(library.value))
    assert "damp must be finite and > 0" in err and "expected one argument" not in err
    assert not files["out"].exists()


def test_negative_number_values_leave_options_alone(files, capsys):
    # A value that looks like a negative number does not turn real options into values.
    status = run(["ihvp", files["G"], files["v"], "--damp", "1e-2", "-o", files["out"], "-q"])
    assert status == 0 and files["out"].exists()
    assert_user_error(
        capsys, run(["ihvp", files["G"], files["v"], "-o", files["out"], "--damp", "-q"]), "--damp"
    )


def test_ihvp_names_the_file_and_row_of_a_nan(files, capsys):
    G = np.load(files["G"])
    G[3, 7], G[5, 0] = np.nan, -np.inf
    np.save(files["out"].parent / "bad.npy", G)
    status = run(
        ["ihvp", files["out"].parent / "bad.npy", files["v"], "-o", files["out"], "--damp", DAMP]
    )
    assert_user_error(capsys, status, "bad.npy row 3 holds NaN or infinity", "2 such rows")
    V = np.load(files["V"])
    V[1, -1] = np.inf
    np.save(files["out"].parent / "badV.npy", V)
    status = run(
        ["ihvp", files["G"], files["out"].parent / "badV.npy", "-o", files["out"], "--damp", DAMP]
    )
    err = assert_user_error(capsys, status, "badV.npy row 1 holds NaN or infinity")
    assert "such rows" not in err
    v = np.load(files["v"])
    v[4] = np.nan
    np.save(files["out"].parent / "badv.npy", v)
    status = run(
        ["ihvp", files["G"], files["out"].parent / "badv.npy", "-o", files["out"], "--damp", DAMP]
    )
    assert_user_error(capsys, status, "badv.npy holds NaN or infinity")
    assert not files["out"].exists()


def test_ihvp_names_the_row_that_overflows_the_dtype(files, capsys):
    G = np.load(files["G"])
    G[2, 1] = 1e39  # finite in float64, infinite in float32
    np.save(files["out"].parent / "big.npy", G)
    status = run(
        [
            "ihvp",
            files["out"].parent / "big.npy",
            files["v"],
            "-o",
            files["out"],
            "--damp",
            DAMP,
            "--dtype",
            "float32",
        ]
    )
    err = assert_user_error(capsys, status, "big.npy row 2", "range of float32", "--dtype float64")
    # The library's error alone: not NumPy's "overflow encountered in cast" before it.
    assert "warning" not in err and len(err.splitlines()) == 1, err
    V = np.load(files["V"])
    V[1, 3] = -1e39
    np.save(files["out"].parent / "bigv.npy", V)
    args = ["ihvp", files["G"], files["out"].parent / "bigv.npy", "-o", files["out"]]
    status = run([*args, "--damp", DAMP, "--dtype", "float32"])
    err = assert_user_error(capsys, status, "bigv.npy row 1", "range of float32")
    assert "warning" not in err and len(err.splitlines()) == 1, err
    assert not files["out"].exists()


def test_ihvp_explains_untyped_2_byte_values(files, capsys):
    # numpy.save writes ml_dtypes' bfloat16 (JAX's arrays in NumPy) as raw 2-byte values,
    # "|V2", which read as a dtype of no meaning.
    raw = files["out"].parent / "bf16.npy"
    with open(raw, "wb") as fh:  # the header ml_dtypes' bfloat16 gets (without importing it)
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<V2", "fortran_order": False, "shape": (M, D)}
        )
        fh.write(bytes(2 * M * D))
    for args in ([raw, files["v"]], [files["G"], raw]):
        status = run(["ihvp", *args, "-o", files["out"], "--damp", DAMP])
        assert_user_error(capsys, status, "raw 2-byte values", "bfloat16", "float32")


def test_nonfinite_rows_reads_in_pieces():
    A = np.zeros((7, 5))
    A[4, 2], A[6, 0] = np.nan, np.inf
    for piece in (1, 5, 9, 10, 35, 1 << 20):  # pieces of 1, 1, 1, 2, 7 and 7 rows
        assert _nonfinite_rows(A, np.dtype(np.float64), piece) == (4, 2, False)
    assert _nonfinite_rows(np.zeros((3, 0)), np.dtype(np.float64)) is None
    assert _nonfinite_rows(np.zeros((0, 4)), np.dtype(np.float64)) is None
    B = np.ones((3, 4))
    B[1, 3] = 1e300
    assert _nonfinite_rows(B, np.dtype(np.float64)) is None
    assert _nonfinite_rows(B, np.dtype(np.float32), 4) == (1, 1, True)


def test_nonfinite_rows_reads_long_rows_in_pieces():
    # One piece held whole rows: a row of d = 1e9 float32 values was cast to float64
    # (8 GB) and masked (1 GB) at once, to name the row holding a NaN.
    import tracemalloc

    d = 2**22
    A = np.zeros((2, d), dtype=np.float32)
    A[1, d - 1] = np.nan
    bad = ~np.isfinite(A).all(axis=1)
    want = (int(np.argmax(bad)), int(bad.sum()), False)
    tracemalloc.start()
    try:
        got = _nonfinite_rows(A, np.dtype(np.float64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == want
    assert peak < d * 8 / 2  # half of one row in float64


def test_ihvp_warnings_come_before_the_summary(tmp_path, capsys):
    # kappa ~ 1e18: eps64 * kappa > 1, so StaticIHVP warns (float64 still factorises
    # m damp I + G G^T, whose Gram is well conditioned).
    rng = np.random.default_rng(3)
    np.save(tmp_path / "G.npy", rng.standard_normal((M, D)).astype(np.float32))
    np.save(tmp_path / "v.npy", rng.standard_normal(D).astype(np.float32))
    status = run(
        [
            "ihvp",
            tmp_path / "G.npy",
            tmp_path / "v.npy",
            "-o",
            tmp_path / "o.npy",
            "--damp",
            "1e-17",
        ]
    )
    assert status == 0
    lines = capsys.readouterr().err.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("mfac-core: warning:")]
    wrote = [i for i, line in enumerate(lines) if line.startswith("mfac-core: wrote")]
    assert len(warned) == 1 and len(wrote) == 1, lines
    assert "ill-conditioned" in lines[warned[0]]
    assert warned[0] < wrote[0]
    with pytest.warns(IllConditionedWarning):  # the warning the command printed
        StaticIHVP(np.load(tmp_path / "G.npy"), damp=1e-17)
    # --quiet keeps the warnings (results with no correct digits), as its help says.
    args = ["ihvp", tmp_path / "G.npy", tmp_path / "v.npy", "-o", tmp_path / "o.npy"]
    assert run([*args, "--damp", "1e-17", "--overwrite", "-q"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mfac-core: warning:"), lines
    assert main(["ihvp", "--help"]) == 0
    assert "print nothing but warnings and errors" in " ".join(capsys.readouterr().out.split())


def test_ihvp_truncated_file_is_not_out_of_memory(files, capsys):
    # A 1 KB file whose header claims 800 GB: a corrupt file, found before any mapping
    # or allocation, for GRADS (mapped) and VECS (read).
    big = files["out"].parent / "big.npy"
    with open(big, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f8", "fortran_order": False, "shape": (100_000, 1_000_000)}
        )
        fh.write(bytes(1000))
    for args in ([big, files["v"]], [files["G"], big]):
        status = run(["ihvp", *args, "-o", files["out"], "--damp", DAMP])
        err = assert_user_error(capsys, status, "truncated or corrupt", "800000000000 bytes")
        assert "memory" not in err
    # One byte short is as corrupt.
    short = files["out"].parent / "short_by_one.npy"
    short.write_bytes(files["G"].read_bytes()[:-1])
    status = run(["ihvp", short, files["v"], "-o", files["out"], "--damp", DAMP])
    assert_user_error(capsys, status, "truncated or corrupt", f"{M * D * 8} bytes of data")
    assert not files["out"].exists()


@pytest.mark.parametrize(
    ("header", "said"),
    [
        (b"(-6, 20)", "negative dimension"),  # failed deep inside np.load's mapping
        (b"(-1, 10)", "negative dimension"),  # from a pipe: read as 12 x 10, exit 0
        (b"(6, 2**9", "truncated or corrupt"),  # tokenize's error, not NumPy's
        (b"(0, %d)" % 2**70, "beyond any array's size"),  # OverflowError in np.memmap
        (b"(True, 20)", "not an integer"),
    ],
)
def test_ihvp_corrupt_header_shape_is_a_user_error(files, capsys, header, said):
    from mfac_core._cli_input import parse_stream

    G = np.random.default_rng(0).standard_normal((6, 20))
    bad = files["out"].parent / "bad.npy"
    with io.BytesIO() as buf:
        np.save(buf, G)
        data = buf.getvalue()
    # The same header length: the new shape takes (or gives back) padding before its "\n".
    end = data.index(b"\n")
    text = data[:end].replace(b"(6, 20)", header)
    text = text[:end] if len(text) >= end else text.ljust(end)
    data = text + data[end:]
    bad.write_bytes(data)
    np.save(files["out"].parent / "v20.npy", G[0])
    status = run(["ihvp", bad, files["out"].parent / "v20.npy", "-o", files["out"], "--damp", DAMP])
    assert_user_error(capsys, status, said)
    assert not files["out"].exists()
    with pytest.raises(UserError, match=said):  # the path of a pipe
        parse_stream(io.BytesIO(data), "/dev/stdin", "GRADS")


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd (process substitution)")
def test_ihvp_reads_pipes(files, tmp_path):
    # <(cat G.npy) and /dev/stdin are pipes: read once, not probed and then reopened.
    G = np.asfortranarray(np.load(files["G"]))  # a Fortran-order header too
    np.save(tmp_path / "GF.npy", G)
    want = tmp_path / "want.npy"
    # The same files read from disk: G's layout decides the BLAS calls, and so the last bits.
    assert run(["ihvp", tmp_path / "GF.npy", files["V"], "-o", want, "--damp", DAMP]) == 0
    pipes = []
    for name in ("GF.npy", "V.npy"):
        r, w = os.pipe()
        os.write(w, (tmp_path / name).read_bytes())  # small: fits the pipe's buffer
        os.close(w)
        pipes.append(r)
    try:
        status = run(["ihvp", *(f"/dev/fd/{r}" for r in pipes), "-o", files["out"], "--damp", DAMP])
    finally:
        for r in pipes:
            os.close(r)
    assert status == 0
    np.testing.assert_array_equal(np.load(files["out"]), np.load(want))


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd (pipes by path)")
def test_ihvp_one_pipe_for_both_inputs_and_empty_inputs(files, tmp_path, capsys):
    # Regression: "VECS file /dev/stdin is not an .npy file": GRADS had read the pipe.
    r, w = os.pipe()
    os.write(w, files["G"].read_bytes())  # small: fits the pipe's buffer
    os.close(w)
    try:
        pipe = f"/dev/fd/{r}"
        status = run(["ihvp", pipe, pipe, "-o", files["out"], "--damp", DAMP])
        assert_user_error(capsys, status, "GRADS and VECS are the same pipe", "read only once")
        # Refused before anything was read: the pipe still holds G for one input.
        status = run(["ihvp", pipe, files["G"], "-o", files["out"], "--damp", DAMP])
        assert status == 0, capsys.readouterr()
    finally:
        os.close(r)
    # The same file twice is read twice: G's rows as the vectors.
    status = run(["ihvp", files["G"], files["G"], "-o", tmp_path / "GG.npy", "--damp", DAMP])
    assert status == 0
    # An empty input is said to be empty, a file or a pipe.
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    status = run(["ihvp", empty, files["v"], "-o", tmp_path / "e.npy", "--damp", DAMP])
    assert_user_error(capsys, status, "GRADS file", "is empty (0 bytes)")
    r, w = os.pipe()
    os.close(w)
    try:
        status = run(["ihvp", files["G"], f"/dev/fd/{r}", "-o", tmp_path / "e.npy", "--damp", DAMP])
    finally:
        os.close(r)
    assert_user_error(capsys, status, "VECS file", "is empty (0 bytes)")


def test_ihvp_empty_output_names_the_option(files, capsys):
    status = run(["ihvp", files["G"], files["v"], "-o", "", "--damp", DAMP])
    err = assert_user_error(capsys, status, "-o/--output is empty")
    assert "mfac-core-" not in err and "Errno" not in err


def test_ihvp_missing_output_folder(files, capsys):
    out = files["out"].parent / "no" / "such" / "out.npy"
    status = run(["ihvp", files["G"], files["v"], "-o", out, "--damp", DAMP])
    assert_user_error(capsys, status, "folder")
    # Said before the inputs are read (and the operator built), as an existing output is.
    status = run(["ihvp", files["text"], files["v"], "-o", out, "--damp", DAMP])
    err = assert_user_error(capsys, status, "output folder does not exist")
    assert "not an .npy file" not in err
    # A "folder" that is a file exists: it is said to be a file.
    status = run(["ihvp", files["G"], files["v"], "-o", files["G"] / "out.npy", "--damp", DAMP])
    assert_user_error(capsys, status, "which is a file, not a folder")
    # So is one further up: no folder can be made below it.
    out = files["G"] / "sub" / "out.npy"
    status = run(["ihvp", files["G"], files["v"], "-o", out, "--damp", DAMP])
    err = assert_user_error(capsys, status, "which is a file, not a folder")
    assert f"inside {files['G']}," in err


def test_ihvp_output_is_a_directory(files, capsys):
    status = run(
        ["ihvp", files["G"], files["v"], "-o", files["out"].parent, "--damp", DAMP, "--overwrite"]
    )
    assert_user_error(capsys, status, "directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_ihvp_output_that_is_a_named_pipe_is_written_through(files, capsys):
    # Regression: with --overwrite the pipe was replaced by a regular file (the rename of
    # the temporary output), so a reader of the pipe waited for ever; then it was refused.
    # It is written to, as np.save writes to it, with or without --overwrite.
    fifo = files["out"].parent / "pipe.npy"
    os.mkfifo(fifo)
    want = StaticIHVP(np.load(files["G"]), damp=DAMP).matvec(np.load(files["v"]))
    for extra in ([], ["--overwrite"]):
        # Opened by its reader first (without waiting for a writer); the output is far
        # smaller than the pipe's buffer, so the writer never waits for the reader.
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            status = run(["ihvp", files["G"], files["v"], "-o", fifo, "--damp", DAMP, *extra])
            data = os.read(reader, 1 << 16)
        finally:
            os.close(reader)
        assert status == 0, capsys.readouterr().err
        np.testing.assert_array_equal(np.load(io.BytesIO(data)), want)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_ihvp_writes_to_standard_output_and_devices(files, capsys):
    # Regression: -o /dev/stdout into a pipe said "output file exists": the pipe's
    # /proc/self/fd link resolves to no path (pipe:[...]), so it was taken for a file.
    want = StaticIHVP(np.load(files["G"]), damp=DAMP).matvec(np.load(files["v"]))
    r, w = os.pipe()
    try:
        status = run(["ihvp", files["G"], files["v"], "-o", f"/dev/fd/{w}", "--damp", DAMP])
        os.close(w)
        data = os.read(r, 1 << 16)  # far smaller than the pipe's buffer
    finally:
        os.close(r)
        with contextlib.suppress(OSError):
            os.close(w)
    assert status == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.load(io.BytesIO(data)), want)
    # A character device is written to, not replaced.
    if os.path.exists(os.devnull) and stat.S_ISCHR(os.stat(os.devnull).st_mode):
        assert run(["ihvp", files["G"], files["v"], "-o", os.devnull, "--damp", DAMP]) == 0
        assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="needs /dev/stdout")
def test_ihvp_dash_is_standard_output(files):
    # "-o -" wrote a file named "-" beside the inputs, where most tools write to stdout.
    want = StaticIHVP(np.load(files["G"]), damp=DAMP).matvec(np.load(files["v"]))
    cwd = files["G"].parent
    argv = ["ihvp", str(files["G"]), str(files["v"]), "-o", "-", "--damp", str(DAMP)]
    env = dict(os.environ)
    root = str(Path(mfac_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "mfac_core", *argv], cwd=cwd, capture_output=True, env=env
    )
    assert proc.returncode == 0, proc.stderr.decode()
    np.testing.assert_array_equal(np.load(io.BytesIO(proc.stdout)), want)
    assert not (cwd / "-").exists()


def test_ihvp_dash_into_a_redirected_file(files, tmp_path):
    # Regression: "-o -" reopened /dev/stdout, which for "> out.npy" is that file:
    # refused as existing ("pass --overwrite"), and with --overwrite renamed over,
    # which for ">> log" dropped what the log held.
    want = StaticIHVP(np.load(files["G"]), damp=DAMP).matvec(np.load(files["v"]))
    env = dict(os.environ)
    root = str(Path(mfac_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    argv = ["ihvp", str(files["G"]), str(files["v"]), "-o", "-", "--damp", str(DAMP)]
    log = tmp_path / "log"
    log.write_bytes(b"before\n")
    with open(log, "ab") as out:  # the shell's >>
        proc = subprocess.run(
            [sys.executable, "-m", "mfac_core", *argv], stdout=out, stderr=subprocess.PIPE, env=env
        )
    assert proc.returncode == 0, proc.stderr.decode()
    data = log.read_bytes()
    assert data.startswith(b"before\n")
    np.testing.assert_array_equal(np.load(io.BytesIO(data[len(b"before\n") :])), want)
    assert b"wrote standard output" in proc.stderr


@pytest.mark.parametrize(("which", "mode"), [("G", "ab"), ("v", "r+b")])
def test_ihvp_dash_redirected_onto_an_input_is_refused(files, which, mode):
    # Regression: "-o -" skipped the output-is-an-input check: ">> G.npy" appended the
    # result to GRADS and "1<> v.npy" overwrote VECS in place, with exit status 0.
    env = dict(os.environ)
    root = str(Path(mfac_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    argv = ["ihvp", str(files["G"]), str(files["v"]), "-o", "-", "--damp", str(DAMP)]
    before = files[which].read_bytes()
    with open(files[which], mode) as out:  # the shell's >> and 1<>
        proc = subprocess.run(
            [sys.executable, "-m", "mfac_core", *argv], stdout=out, stderr=subprocess.PIPE, env=env
        )
    assert proc.returncode == 2
    what = {"G": "GRADS", "v": "VECS"}[which]
    assert f"standard output (-o -) is the {what} file" in proc.stderr.decode()
    assert files[which].read_bytes() == before


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_ihvp_terminated_leaves_no_temporary_file(files, tmp_path):
    # Regression: SIGTERM while the output was written left its hidden temporary file
    # (.mfac-core-XXXX.npy, up to the output's size) in the output's folder.
    env = dict(os.environ)
    root = str(Path(mfac_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    folder = tmp_path / "out"
    folder.mkdir()
    stalled = tmp_path / "stalled.py"  # np.save waits, so the signal comes mid-write
    stalled.write_text(
        "import sys, time, numpy as np\n"
        "save = np.save\n"
        "def slow(file, arr, **kw):\n"
        "    print('saving', flush=True); time.sleep(60); save(file, arr, **kw)\n"
        "np.save = slow\n"
        "from mfac_core.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["ihvp", str(files["G"]), str(files["v"]), "-o", str(folder / "o.npy"), "-q"]
    proc = subprocess.Popen(
        [sys.executable, str(stalled), *argv, "--damp", str(DAMP)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout.readline() == b"saving\n"
    assert len(list(folder.glob(".mfac-core-*"))) == len(list(folder.iterdir())) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    assert err.decode().endswith("mfac-core: error: terminated\n")
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets here")
def test_ihvp_output_that_is_a_socket_is_refused(files, capsys, tmp_path):
    path = tmp_path / "s.npy"
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.bind(str(path))
        except OSError:
            pytest.skip("cannot bind a Unix socket here")
        for extra in ([], ["--overwrite"]):
            status = run(["ihvp", files["G"], files["v"], "-o", path, "--damp", DAMP, *extra])
            assert_user_error(capsys, status, "is a socket, which cannot be opened as a file")
            assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_ihvp_output_through_a_symbolic_link_replaces_its_target(files, capsys):
    # As np.save and cp: the link stays, the file it points to gets the output. Before,
    # --overwrite replaced the link itself with a regular file.
    target, link = files["out"].parent / "target.npy", files["out"].parent / "link.npy"
    np.save(target, np.zeros(1))
    link.symlink_to(target)
    args = ["ihvp", files["G"], files["v"], "-o", link, "--damp", DAMP, "-q"]
    assert_user_error(capsys, run(args), "exists", "--overwrite")
    assert run([*args, "--overwrite"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    want = StaticIHVP(np.load(files["G"]), damp=DAMP).matvec(np.load(files["v"]))
    assert_close(np.load(target), want)
    # A dangling link is an existing output too; with --overwrite its target is made.
    target.unlink()
    assert_user_error(capsys, run(args), "exists", "--overwrite")
    assert run([*args, "--overwrite"]) == 0
    assert link.is_symlink() and target.is_file()


def test_ihvp_factorization_error_is_a_user_error(tmp_path, capsys):
    # Many duplicated gradients with a tiny damping: C = m damp I + G G^T is singular in
    # float64, which the library reports as FactorizationError (a LinAlgError).
    g = np.random.default_rng(0).standard_normal(30) * 1e8
    np.save(tmp_path / "G.npy", np.tile(g, (40, 1)))
    np.save(tmp_path / "v.npy", np.ones(30))
    status = run(
        [
            "ihvp",
            tmp_path / "G.npy",
            tmp_path / "v.npy",
            "-o",
            tmp_path / "o.npy",
            "--damp",
            "1e-30",
        ]
    )
    assert_user_error(capsys, status, "positive definite", "damp=1e-30")


def test_missing_command_and_bad_arguments(capsys):
    assert main([]) == 2
    assert "command" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["ihvp"]) == 2
    assert "required" in capsys.readouterr().err


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mfac-core {mfac_core.__version__}"
    assert main(["--help"]) == 0
    assert "ihvp" in capsys.readouterr().out
    assert main(["ihvp", "--help"]) == 0
    assert "--block-size" in capsys.readouterr().out


def test_demo_help_states_the_bounds_it_checks(capsys):
    # The bounds of _demo.error_ratios: float32's does not grow with ||x|| / ||F^-1 x||,
    # float64's grows with sqrt(kappa), not kappa.
    assert main(["demo", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{SINGLE_BOUND:g} * eps(float32) + eps(float64) * kappa^1.5 in float32" in help_text
    assert "C * eps(float64) * sqrt(kappa) * ||x|| / (damp * ||F^-1 x||) in float64" in help_text


# -- demo ----------------------------------------------------------------------------------


def test_demo_runs_and_passes(capsys):
    assert main(["demo", "--m", "8", "--d", "120", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "all errors within their bounds" in out
    for variant in ("full", "blocks B=32", "blocks B=4"):
        assert variant in out
    assert len(re.findall(r" yes\*?$", out, flags=re.M)) == 6
    assert not re.search(r" NO$", out, flags=re.M)
    # The output explains its columns, and states the constant of the bound.
    assert "columns:" in out
    for column in ("variant", "kappa", "err/bound", "rel.err", "bound", "set-up", "IHVP", "ok"):
        assert f"\n  {column} " in out, column
    assert f"C = {BOUND_CONSTANT:g}" in out and f"{SINGLE_BOUND:g} eps(float32)" in out


@pytest.mark.parametrize(
    ("damp", "words"),
    [
        ("1e-30", ["kappa = ", "larger --damp"]),  # exited 1: "FAILED", the reference's fault
        ("1e-300", ["kappa = ", "larger --damp"]),  # an OverflowError's traceback
        ("1e300", ["at most", "float32"]),  # NaN errors, "FAILED"
    ],
)
def test_demo_refuses_dampings_its_reference_cannot_check(damp, words, capsys):
    # Beyond kappa ~ 1e14 the demo's refined dense reference has no correct digits, and
    # beyond damp ~ 1e38 its float32 products underflow: it reported the library as failing.
    status = main(["demo", "--m", "8", "--d", "60", "--damp", damp])
    assert_user_error(capsys, status, *words)


def test_demo_fails_when_an_error_exceeds_its_bound(capsys, monkeypatch):
    # A bound 1e6 times too tight must fail the check: "ok" depends on the bound, for
    # each dtype's constant.
    import mfac_core._demo as demo

    for name, value in (("BOUND_CONSTANT", BOUND_CONSTANT), ("SINGLE_BOUND", SINGLE_BOUND)):
        with monkeypatch.context() as patch:
            patch.setattr(demo, name, value * 1e-6)
            assert main(["demo", "--m", "8", "--d", "120", "--seed", "3"]) == 1
        out = capsys.readouterr().out
        dtype = "float32" if name == "SINGLE_BOUND" else "float64"
        assert re.search(rf" {dtype} .* NO$", out, flags=re.M), (name, out)
        assert "FAILED: an error exceeds its bound" in out


@pytest.mark.parametrize(
    ("m", "d"), [(8, 120), (8, 500), (64, 120), (64, 500), (128, 64), (200, 100)]
)
@pytest.mark.parametrize("damp", [1e-2, 1e-4, 1e-6, 1e-8])
def test_demo_bound_holds_with_margin(m, d, damp):
    # Part of the sweep that chose BOUND_CONSTANT (see its comment): every vector's error is
    # within half the documented bound, in float32 and float64, full and block-wise, against
    # the refined reference of the stored gradients (kappa up to about 1e7). With m >= d
    # the full F is one dense block, held to the dense bound: the Woodbury one failed the
    # demo there (err/bound 1.8 at m = 200, d = 100).
    import mfac_core._demo as demo

    for seed in range(2):
        G64 = demo.demo_gradients(m, d, seed)
        rng = np.random.default_rng(seed + 1)
        X64 = np.concatenate(
            [rng.standard_normal((d, 2)), G64.T @ rng.standard_normal((m, 2))], axis=1
        )
        for block in sorted({d, 4 * m, max(1, m // 2)}):
            if block > d:
                continue
            for dtype in (np.float32, np.float64):
                G, X = G64.astype(dtype), X64.astype(dtype)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", IllConditionedWarning)
                    op = StaticIHVP(G, damp=damp, block_size=None if block == d else block)
                reference = demo.reference_products(G, X, damp=damp, block=block)
                kappa = demo.block_kappa(G.astype(np.float64), damp, block)
                error, bound = demo.error_ratios(
                    op.matmat(X),
                    reference,
                    X,
                    damp=damp,
                    kappa=kappa,
                    dtype=dtype,
                    dense=block <= m,
                )
                assert np.all(error <= bound / 2), (seed, block, dtype, kappa, error / bound)


def _exact_inverse_products(G, X, damp):
    """``F^{-1} X`` in rational arithmetic (Woodbury over the m x m system), rounded once."""
    from fractions import Fraction

    m, d = G.shape
    g = [[Fraction(float(v)) for v in row] for row in G]
    lam = Fraction(damp)
    out = np.empty(X.shape)
    for j in range(X.shape[1]):
        x = [Fraction(float(v)) for v in X[:, j]]
        # (m lam I + G G^T) c = G x, by Gaussian elimination (the matrix is SPD).
        A = [
            [sum(a * b for a, b in zip(g[i], g[k], strict=True)) for k in range(m)]
            for i in range(m)
        ]
        for i in range(m):
            A[i][i] += m * lam
        c = [sum(a * b for a, b in zip(g[i], x, strict=True)) for i in range(m)]
        for p in range(m):
            for r in range(p + 1, m):
                f = A[r][p] / A[p][p]
                A[r] = [a - f * b for a, b in zip(A[r], A[p], strict=True)]
                c[r] -= f * c[p]
        for p in reversed(range(m)):
            c[p] = (c[p] - sum(A[p][k] * c[k] for k in range(p + 1, m))) / A[p][p]
        out[:, j] = [float((x[i] - sum(c[k] * g[k][i] for k in range(m))) / lam) for i in range(d)]
    return out


def test_demo_reference_is_within_its_own_bound():
    # Against rational arithmetic, at kappa > 1e6 for vectors in the gradients' span: the
    # refined reference is within float64's rounding plus eps(longdouble) ||x|| / (damp ||y||)
    # (the term error_ratios adds to the float64 bound), where the float64 dense inverse
    # alone is off by orders of magnitude more.
    import mfac_core._demo as demo

    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("long double is float64 here: the refinement gains nothing to test")
    m, d, damp = 4, 40, 1e-8
    G = demo.demo_gradients(m, d, 0)
    X = G.T @ np.random.default_rng(1).standard_normal((m, 2))
    kappa = demo.block_kappa(G, damp, d)
    assert kappa > 1e6
    exact = _exact_inverse_products(G, X, damp)
    norm = np.linalg.norm(exact, axis=0)
    span = np.linalg.norm(X, axis=0) / (damp * norm)
    own = 2 * np.finfo(np.float64).eps + 4 * float(np.finfo(np.longdouble).eps) * span
    refined = np.linalg.norm(demo.reference_products(G, X, damp=damp, block=d) - exact, axis=0)
    raw = demo._apply_blocks(demo._dense_block_inverse(G, damp, d), X)
    unrefined = np.linalg.norm(raw - exact, axis=0)
    assert np.all(refined <= own * norm), (refined / norm, own)
    assert np.all(unrefined > 100 * refined), (unrefined / norm, refined / norm)


def test_demo_passes_under_prescott():
    """The demo in a fresh interpreter with OpenBLAS's Prescott kernels (another order of
    summation): the bounds hold there too."""
    env = dict(os.environ, OPENBLAS_CORETYPE="Prescott")
    root = str(Path(mfac_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run_ = subprocess.run(
        [sys.executable, "-m", "mfac_core", "demo", "--m", "16", "--d", "300"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert run_.returncode == 0, run_.stdout + run_.stderr
    assert "all errors within their bounds" in run_.stdout


def test_demo_is_deterministic():
    from mfac_core._demo import demo_gradients

    a, b = demo_gradients(5, 30, seed=1), demo_gradients(5, 30, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, 30) and np.all(np.isfinite(a))
    assert not np.array_equal(a, demo_gradients(5, 30, seed=2))
    assert demo_gradients(3, 1).shape == (3, 1)


def test_demo_rejects_too_large_sizes(capsys):
    assert_user_error(capsys, main(["demo", "--d", "100000"]), "--d")
    assert_user_error(capsys, main(["demo", "--m", "100000", "--d", "10"]), "--m")
    assert_user_error(capsys, main(["demo", "--m", "0"]), "--m")


def test_integer_options_say_what_they_take(capsys):
    # One parser for the counts (>= 1) and the seed (>= 0): each names its bound.
    assert_user_error(capsys, main(["demo", "--m", "0"]), "--m", "must be >= 1, got '0'")
    assert_user_error(capsys, main(["demo", "--seed", "-1"]), "--seed", "must be >= 0, got '-1'")
    assert_user_error(capsys, main(["demo", "--d", "2.5"]), "--d", "not an integer: '2.5'")


def test_quiet_overrides_progress(files, capsys):
    assert (
        run(
            [
                "ihvp",
                files["G"],
                files["v"],
                "-o",
                files["out"],
                "--damp",
                DAMP,
                "--progress",
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr() == ("", "")


# -- README ----------------------------------------------------------------------------------


def test_readme_quickstart_runs():
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not beside the tests")
    text = readme.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python code block"
    for block in blocks:
        exec(compile(block, str(readme), "exec"), {})
    # Every shell block is one command on one line, and the set-up section has two: install
    # and demo, install and tests.
    commands = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    assert commands and all(c.count("\n") == 1 for c in commands), commands
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "pip install . && mfac-core demo\n" in setup
    assert 'pip install ".[test]" && python -m pytest -q -n auto --dist loadfile tests\n' in setup
    # The examples' torch comes from the CPU index: the extra does not pull the CUDA build.
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup


#: The ``.. code-block:: python`` examples of docs/*.rst that run as they are (NumPy and
#: SciPy only, no GPU, cluster or loader of the reader's): (page, a line of the block).
RUNNABLE_DOC_BLOCKS = [
    ("index.rst", "Finv = StaticIHVP(G, damp=1e-3)"),
    ("guidance.rst", "op = StaticIHVP.from_gradients("),
    ("gpu.rst", 'previous = mfac_core.set_cupy_linalg("kernels")'),
]


@pytest.mark.parametrize(("page", "line"), RUNNABLE_DOC_BLOCKS)
def test_docs_python_examples_run(page, line, tmp_path, monkeypatch):
    """The self-contained Python examples of the documentation run (in a scratch folder)."""
    doc = Path(__file__).resolve().parent.parent / "docs" / page
    if not doc.exists():
        pytest.skip("docs/ is not beside the tests")
    blocks = re.findall(
        r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", doc.read_text(encoding="utf-8")
    )
    (block,) = [b for b in blocks if line in b]
    code = "\n".join(row[3:] for row in block.splitlines())
    monkeypatch.chdir(tmp_path)  # guidance.rst's example writes G.npy to the current folder
    exec(compile(code, str(doc), "exec"), {})


def test_examples_readme_quotes_the_results_verbatim():
    """examples/README.md quotes each summary the scripts wrote to examples/results, unchanged."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    if not (examples / "README.md").exists():
        pytest.skip("examples/ is not beside the tests")
    text = (examples / "README.md").read_text(encoding="utf-8")
    quoted = re.findall(r"<!-- begin (\S+) \(.*?\) -->\n(.*?)<!-- end \1 -->", text, flags=re.S)
    assert {name for name, _ in quoted} == {
        "train_digits.md",
        "train_digits-tune.md",
        "prune_digits.md",
        "damp_and_m.md",
        "damping_selection_digits.md",
    }
    for name, body in quoted:
        written = (examples / "results" / name).read_text(encoding="utf-8")
        assert body == written, f"examples/README.md quotes an old {name}; run examples/_common.py"
        # Each summary names the command that wrote it and the versions it ran with.
        assert written.startswith("Written by `python examples/") and "mfac_core " in written


# -- python -m mfac_core -------------------------------------------------------------------


def test_python_m_subprocess(files):
    """One end-to-end run in a fresh interpreter, as a user would."""
    env = dict(os.environ)
    root = str(Path(mfac_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "mfac_core",
            "ihvp",
            str(files["G"]),
            str(files["V"]),
            "-o",
            str(files["out"]),
            "--damp",
            str(DAMP),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr and ok.stdout == ""
    G, V = np.load(files["G"]), np.load(files["V"])
    np.testing.assert_array_equal(np.load(files["out"]), StaticIHVP(G, damp=DAMP).matmat(V.T).T)


@pytest.mark.parametrize(
    ("raised", "status", "message"),
    [(MemoryError, 1, "out of memory"), (KeyboardInterrupt, 130, "interrupted")],
)
def test_ihvp_out_of_memory_and_interrupt_exit_statuses(
    files, capsys, monkeypatch, raised, status, message
):
    # The statuses docs/cli.rst lists, one line each, and no output (partial or not).
    import mfac_core._static

    def failing(*args, **kwargs):
        raise raised()

    monkeypatch.setattr(mfac_core._static, "StaticIHVP", failing)
    got = run(["ihvp", files["G"], files["v"], "-o", files["out"], "--damp", DAMP])
    out, err = capsys.readouterr()
    assert got == status
    assert err == f"mfac-core: error: {message}\n" and out == ""
    assert sorted(os.listdir(files["out"].parent)) == sorted(
        p.name for p in files.values() if p != files["out"]
    )


def test_ihvp_out_of_memory_while_reading_is_the_out_of_memory_status(files, capsys, monkeypatch):
    # Regression: out of memory while GRADS was mapped or read exited 2 with "cannot read
    # GRADS file ...: [Errno 12] Cannot allocate memory"; the docs give 1 and "out of memory".
    import errno

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(np, "load", no_memory)
    got = run(["ihvp", files["G"], files["v"], "-o", files["out"], "--damp", DAMP])
    out, err = capsys.readouterr()
    assert got == 1 and err == "mfac-core: error: out of memory\n" and out == ""
    assert not files["out"].exists()


_MAP_LARGER_THAN_ALLOWED = """
import resource, sys
from mfac_core._cli_input import load

# The process may hold 256 MiB of private writable memory more than it does now; the
# file is 1 GiB. A private ("c") map counts in full, a read-only one does not.
with open("/proc/self/status") as f:
    data = next(int(line.split()[1]) for line in f if line.startswith("VmData:")) * 1024
hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
resource.setrlimit(resource.RLIMIT_DATA, (data + 2**28, hard))
G = load(sys.argv[1], "GRADS", mmap=True)
print(G.shape, G.flags.writeable)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA counts maps on Linux")
def test_grads_larger_than_the_memory_allowed_are_mapped(tmp_path):
    # GRADS was mapped copy-on-write, which the system charges in full at once: a file
    # larger than memory failed with "cannot read GRADS file ...: Cannot allocate memory".
    # A sparse 1 GiB file stands for it, against a limit on the process's private memory.
    path = tmp_path / "G.npy"
    m, d = 4, 2**26
    with open(path, "wb") as fh:
        header = {"descr": "<f4", "fortran_order": False, "shape": (m, d)}
        np.lib.format.write_array_header_1_0(fh, header)
        fh.truncate(fh.tell() + m * d * 4)
    env = dict(os.environ)
    root = str(Path(mfac_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run_ = subprocess.run(
        [sys.executable, "-c", _MAP_LARGER_THAN_ALLOWED, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert run_.returncode == 0, run_.stderr
    assert run_.stdout.split() == ["(4,", "67108864)", "False"]


def test_an_unfinished_gradient_file_is_named_so(tmp_path, capsys):
    # The file that from_gradients leaves when its process is killed while filling it.
    from mfac_core._store import UNFINISHED_MAGIC

    path = tmp_path / "G.npy"
    np.save(path, np.zeros((3, D)))
    with open(path, "r+b") as fh:
        fh.write(UNFINISHED_MAGIC)
    np.save(tmp_path / "v.npy", np.ones(D))
    status = run(["ihvp", path, tmp_path / "v.npy", "-o", tmp_path / "o.npy", "--damp", DAMP])
    # It may be still being filled (another process, now): said too, not only "stopped".
    assert_user_error(
        capsys, status, "G.npy is unfinished", "from_gradients", "still filling", "again"
    )
