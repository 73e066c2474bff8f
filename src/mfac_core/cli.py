"""The ``mfac-core`` command line (also ``python -m mfac_core``).

Two commands:

``mfac-core ihvp GRADS.npy VECS.npy -o OUT.npy --damp D``
    Multiply one vector, or each row of a stack of vectors, by the inverse of
    the damped empirical Fisher ``F = D I + G^T G / m`` of the gradients in the
    rows of ``GRADS.npy``, and save the results with the shape of ``VECS.npy``.
``mfac-core demo``
    Run :class:`~mfac_core.StaticIHVP` on a built-in problem, check each
    product against a dense inverse and the error bound of its docstring, and
    print errors and timings next to this machine's floors, with a legend.

User errors (missing files, wrong shapes, an output that is an input, NaN or
infinity in the inputs, a bad damping, a factorisation that fails) print
``mfac-core: error: <message>`` and exit with status 2, as :mod:`argparse` does
for bad arguments; a failed demo check exits with 1. Warnings are printed once
each, before the summary line of ``ihvp``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, TextIO

import numpy as np

from . import __version__
from ._cli_input import UserError, load
from ._validation import check_damp

__all__ = ["main"]

PROG = "mfac-core"

#: Exit status of user errors (as argparse uses for bad arguments).
EXIT_USAGE = 2

#: ``-o``'s name for standard output, as most tools take it (a file so named is ``./-``).
STDOUT = "-"

# -- argument types ------------------------------------------------------------------------


def _damp(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    # The library's own check, so that the command line and the API refuse the same values
    # with the same message.
    try:
        return check_damp(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


#: Negative numbers as Python's float() writes them, exponents included.
_NEGATIVE_NUMBER = re.compile(
    r"^-(?:(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?|inf|infinity|nan)$",
    re.IGNORECASE,
)


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that reads ``-1e-5`` as a value, not as an option.

    Before Python 3.13 argparse recognises only ``-1`` and ``-1.5`` as negative
    numbers, so ``--damp -1e-5`` failed with "expected one argument" instead of
    saying what is wrong with the value. No option of ``mfac-core`` looks like a
    number, so every such word is a value. (The subparsers are of this class too.)
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``mfac-core``.

    Returns
    -------
    argparse.ArgumentParser
        With the subcommands ``ihvp`` and ``demo``.
    """
    from ._demo import DEFAULT_DAMP, MAX_DEMO_GRADS, MAX_DENSE_DIM, SINGLE_BOUND

    parser = _ArgumentParser(
        prog=PROG,
        description="Matrix-free inverse-Fisher-vector products (M-FAC).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ihvp = sub.add_parser(
        "ihvp",
        help="multiply vectors by the inverse of the damped empirical Fisher",
        description=(
            "Compute F^-1 v for F = damp*I + G^T G / m, with the m gradients in the rows of "
            "GRADS (an .npy file of shape (m, d)), for one vector (d,) or each row of a stack "
            "(k, d) in VECS. The results are saved to OUT with the shape of VECS."
        ),
    )
    ihvp.add_argument("grads", metavar="GRADS.npy", help="gradients, shape (m, d)")
    ihvp.add_argument("vecs", metavar="VECS.npy", help="one vector (d,) or a stack (k, d)")
    ihvp.add_argument(
        "-o",
        "--output",
        metavar="OUT.npy",
        required=True,
        help="where to save the results (.npy): a file, '-' for standard output, or a named "
        "pipe or character device such as /dev/null, which is written to",
    )
    ihvp.add_argument(
        "--damp",
        type=_damp,
        required=True,
        help="the damping lambda > 0 (absolute; the M-FAC paper uses 1e-5)",
    )
    ihvp.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        metavar="B",
        help="use a block-diagonal F over blocks of B consecutive coordinates",
    )
    ihvp.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="precision of the products and of OUT (default: that of GRADS "
        "if it is float32 or float64, else float64); GRADS is read in place if it has "
        "this dtype, or is float16 with float32, else converted into memory",
    )
    ihvp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (by default an existing OUT is an error)",
    )
    ihvp.add_argument(
        "--progress",
        action="store_true",
        help="show the set-up progress bar on stderr even when it is not a terminal",
    )
    ihvp.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print nothing but warnings and errors (overrides --progress)",
    )

    demo = sub.add_parser(
        "demo",
        help="check StaticIHVP against a dense inverse on a built-in problem",
        description=(
            "Build per-sample gradients of a logistic-regression model on synthetic data "
            "(no download), run StaticIHVP (full and block-wise, float32 and float64), compare "
            "with the float64 dense inverse and print errors, timings and this machine's "
            "floors; the output explains its columns. Exits with 0 only if, for every test "
            "vector x, the relative error is within its bound (StaticIHVP's docstring, "
            f"Notes, Precision): {SINGLE_BOUND:g} * eps(float32) + eps(float64) * kappa^1.5 "
            "in float32, C * eps(float64) * sqrt(kappa) * ||x|| / (damp * ||F^-1 x||) in "
            "float64 (C is printed)."
        ),
    )
    demo.add_argument(
        "--m",
        type=_positive_int,
        default=64,
        help=f"number of gradients (64; at most {MAX_DEMO_GRADS})",
    )
    demo.add_argument(
        "--d",
        type=_positive_int,
        default=2000,
        help=f"number of parameters (2000; at most {MAX_DENSE_DIM})",
    )
    demo.add_argument(
        "--seed", type=_nonnegative_int, default=0, help="seed of the synthetic data (0)"
    )
    demo.add_argument(
        "--damp", type=_damp, default=DEFAULT_DAMP, help=f"damping lambda ({DEFAULT_DAMP:g})"
    )
    return parser


# -- progress bar --------------------------------------------------------------------------


class ProgressBar:
    """A one-line text progress bar, redrawn in place with carriage returns.

    Parameters
    ----------
    stream : file-like
        Where the bar is written (standard error).
    label : str
        The text before the bar.
    width : int, optional
        The number of characters of the bar itself.
    """

    def __init__(self, stream: TextIO, label: str, width: int = 30) -> None:
        self.stream, self.label, self.width = stream, label, width
        self._shown = -1
        self._start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        frac = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
        percent = int(frac * 100)
        if percent == self._shown:
            return
        self._shown = percent
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self._start
        self.stream.write(f"\r{self.label} [{bar}] {percent:3d}% {elapsed:6.1f} s")
        self.stream.flush()

    def close(self) -> None:
        if self._shown >= 0:
            self.stream.write("\n")
            self.stream.flush()


def _wants_progress(args: argparse.Namespace, stream: TextIO) -> bool:
    if args.quiet:
        return False
    if args.progress:
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# -- ihvp ----------------------------------------------------------------------------------


def _same_file(a: str, b: str) -> bool:
    try:
        # The same device and inode: through symbolic links, hard links, "..", case-
        # insensitive file systems; a path that does not exist names no input.
        return os.path.samefile(a, b)
    except OSError:
        return False


class _Terminated(BaseException):
    """SIGTERM, raised in the run as SIGINT raises ``KeyboardInterrupt``."""


@contextlib.contextmanager
def _terminated_as_interrupted() -> Any:
    """Inside: SIGTERM raises :class:`_Terminated`, so that a run cleans up as after Ctrl-C
    (its temporary output file removed: the default action left it behind).

    Only where SIGTERM has its default action and in the main thread (a program that
    calls :func:`main` and handles SIGTERM itself keeps its handler); restored after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stdout_is(path: str) -> bool:
    """Whether standard output is the regular file ``path`` (False where it cannot tell)."""
    try:
        out = os.fstat(sys.stdout.fileno())
        return stat.S_ISREG(out.st_mode) and os.path.samestat(out, os.stat(path))
    except (AttributeError, OSError, ValueError):  # no descriptor (a StringIO), no file
        return False


def _check_output(path: str, overwrite: bool, inputs: dict[str, str]) -> None:
    if not path:
        raise UserError("-o/--output is empty: give the path of the .npy file to write")
    if path == STDOUT:
        # Whatever standard output is (a pipe, a file, >> a log), it is written to; but
        # not an input redirected there (> G.npy, >> G.npy, 1<> VECS.npy wrote into it).
        for what, source in inputs.items():
            if _stdout_is(source):
                raise UserError(
                    f"standard output (-o -) is the {what} file {source}; the inputs are "
                    "never replaced: redirect standard output elsewhere"
                )
        return
    if path.endswith(("/", os.sep)) and not os.path.isdir(path):
        raise UserError(f"-o/--output names a folder, not a file: {path}")
    for what, source in inputs.items():
        if _same_file(path, source):
            raise UserError(
                f"output {path} is the {what} file {source}; the inputs are never "
                "replaced, not even with --overwrite: choose another output"
            )
    if os.path.isdir(path):
        raise UserError(f"output is a directory, not a file: {path}")
    kind = _special_kind(path)
    if kind in _STREAM_KINDS:
        return  # written through (see _save): nothing is replaced, nothing to overwrite
    if kind is not None:
        raise UserError(
            f"output {path} is a {kind}, {_REFUSED_KINDS[kind]}: write to a file, a named "
            "pipe or a character device (/dev/stdout)"
        )
    target = _output_target(path)
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"output file exists: {path} (pass --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        # Said before the inputs are read and the operator is built, not after.
        # -o G.npy/out.npy or G.npy/sub/out.npy: "does not exist" was untrue or beside
        # the point, as no folder can be made below a file.
        above = folder
        while not os.path.exists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if os.path.exists(above) and not os.path.isdir(above):
            raise UserError(f"output {path} is inside {above}, which is a file, not a folder")
        raise UserError(f"output folder does not exist: {folder}")


def _output_target(path: str) -> str:
    """The file that ``-o path`` replaces: the file a symbolic link points to, as ``cp`` does.

    ``np.save`` and ``cp`` write through a symbolic link and keep the link, so the
    link's target is replaced (a rename in the target's folder), not the link.
    """
    return os.path.realpath(path) if os.path.islink(path) else path


#: Outputs that are written through, as ``np.save`` writes them: replacing them (the rename
#: of a temporary file) would remove the pipe or device instead of writing to it.
_STREAM_KINDS = ("named pipe (FIFO)", "character device")

#: Why the other special files are refused as outputs.
_REFUSED_KINDS = {
    "block device": "whose contents the .npy file would overwrite",
    "socket": "which cannot be opened as a file",
}


def _special_kind(path: str) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder.

    ``os.stat`` follows every link to the file itself, the links of ``/proc`` included:
    ``/dev/stdout`` into a pipe is ``/proc/self/fd/1``, whose target ``pipe:[...]`` is
    no path that :func:`os.path.realpath` could resolve.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # absent (or unreadable: the write reports it)
    kinds = (
        (stat.S_ISFIFO, "named pipe (FIFO)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    )
    return next((name for test, name in kinds if test(mode)), None)


def _nonfinite_rows(
    arr: np.ndarray,
    dtype: np.dtype,
    piece_entries: int = 1 << 20,
) -> tuple[int, int, bool] | None:
    """``(first, count, overflow)`` of the rows of ``arr`` that are not finite in ``dtype``.

    ``overflow`` is true when ``arr`` itself is finite there and only the cast to
    ``dtype`` makes it infinite. ``None`` if every row is finite. Reads ``arr``
    (possibly memory-mapped) in pieces of whole rows and about ``piece_entries``
    entries, so that the check needs no memory of the size of ``arr``.
    """
    rows = arr[None, :] if arr.ndim == 1 else arr  # one vector (d,) or rows (k, d)
    # Bands of rows, each read in column pieces: a row alone can be larger than memory
    # allows (d = 1e9: its float64 cast 8 GB, for a failure message).
    width = max(1, min(rows.shape[1], piece_entries))
    step = max(1, piece_entries // width)
    first, count, overflow = -1, 0, False
    for start in range(0, rows.shape[0], step):
        piece = rows[start : start + step]
        bad = _rows_not_all(piece, width, lambda p: np.isfinite(p.astype(dtype, copy=False)))
        n = int(np.count_nonzero(bad))
        if n and first < 0:
            first = start + int(np.argmax(bad))
            overflow = not _rows_not_all(piece[first - start : first - start + 1], width)[0]
        count += n
    return None if first < 0 else (first, count, overflow)


def _rows_not_all(
    rows: np.ndarray, width: int, ok: Callable[[np.ndarray], np.ndarray] = np.isfinite
) -> np.ndarray:
    """For each row, whether ``ok`` fails somewhere in it, read ``width`` columns at a time."""
    bad = np.zeros(rows.shape[0], dtype=bool)
    for lo in range(0, rows.shape[1], width):
        with np.errstate(over="ignore"):  # an overflow is what is looked for
            bad |= ~ok(rows[:, lo : lo + width]).all(axis=1)
    return bad


def _finiteness_error(path: str, arr: np.ndarray, dtype: np.dtype) -> UserError | None:
    """A message naming the file and the first row that holds NaN or infinity, if any."""
    found = _nonfinite_rows(arr, dtype)
    if found is None:
        return None
    first, count, overflow = found
    if arr.ndim == 1:
        where, note = f"{path} holds", ""
    else:
        where = f"{path} row {first} holds"
        note = f" (rows count from 0{f'; {count} such rows' if count > 1 else ''})"
    if overflow:
        return UserError(f"{where} values beyond the range of {dtype}{note}; pass --dtype float64")
    return UserError(f"{where} NaN or infinity{note}")


def _save(path: str, arr: np.ndarray, overwrite: bool, inputs: dict[str, str]) -> None:
    """Write ``arr`` to ``path`` as .npy, atomically (a temporary file, then a rename).

    A named pipe or a character device (``/dev/stdout``, ``/dev/null``) is written to
    directly instead; opening a named pipe waits for its reader.
    """
    _check_output(path, overwrite, inputs)
    if path == STDOUT:
        # Written to the process's own stream, not reopened as /dev/stdout: reopening
        # a file redirected with > or >> took it for an output to replace (refused as
        # existing, or with --overwrite renamed over, dropping what >> appended to).
        binary = getattr(sys.stdout, "buffer", None)
        if binary is None:  # main() called with sys.stdout replaced by a text-only stream
            raise UserError("standard output takes no bytes here: name a file with -o")
        sys.stdout.flush()
        _write_stream(lambda: contextlib.nullcontext(binary), arr, "to standard output")
        return
    if _special_kind(path) in _STREAM_KINDS:
        _write_stream(lambda: open(path, "wb"), arr, f"output {path}")
        return
    path = _output_target(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mfac-core-", suffix=".npy", dir=folder)
    except OSError as exc:
        # The temporary file is ours, not the user's: name the output and its folder.
        raise UserError(f"cannot write output {path} in {folder}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            # mkstemp makes the file private to its owner; give it the usual permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fh.fileno(), 0o666 & ~umask)
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk, a rename refused: name the output
            raise UserError(f"cannot write output {path}: {exc.strerror or exc}") from None
        raise


def _write_stream(opened: Callable[[], Any], arr: np.ndarray, where: str) -> None:
    """``arr`` as .npy into the stream ``opened()`` gives (a pipe, a device, stdout), flushed."""
    try:
        with opened() as fh:
            np.save(_Writer(fh), arr, allow_pickle=False)
            fh.flush()
    except OSError as exc:  # a reader that went away: "Broken pipe"
        raise UserError(f"cannot write {where}: {exc.strerror or exc}") from None


class _Writer:
    """A file that ``np.save`` sees as a writer of bytes only.

    Given the file itself, ``np.save`` writes the data with ``ndarray.tofile``, which asks
    for a file position that a pipe does not have ("obtaining file position failed");
    given an object that only writes, it writes the data in pieces of 16 MiB.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh

    def write(self, data: bytes) -> int:
        return self._fh.write(data)


def _product_dtype(stored: np.dtype, option: str | None) -> np.dtype:
    """``--dtype``, else the stored float32 or float64 (in either byte order), else float64."""
    if option is not None:
        return np.dtype(option)
    native = stored.newbyteorder("=")
    return native if native in (np.float32, np.float64) else np.dtype(np.float64)


def _operator_gradients(G: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """G as the operator reads it for products in ``dtype``: the mapped file where it can.

    The operator reads G in its storage dtype, float16 included (its products are then
    float32); any other dtype, or a byte order not the machine's (which the operator
    refuses), is converted into memory. The mapped file itself is never written.
    """
    if G.dtype == dtype or (G.dtype == np.float16 and dtype == np.float32):
        return G
    return _cast(G, dtype)


def _cast(arr: np.ndarray, dtype: np.dtype, *, contiguous: bool = False) -> np.ndarray:
    """``arr`` as ``dtype`` (C-contiguous if asked), without NumPy's overflow warning.

    A value beyond the range of ``dtype`` becomes infinity, which the library then
    refuses and :func:`_finiteness_error` names (file, row, "pass --dtype float64"):
    NumPy's "overflow encountered in cast" would be printed before that error.
    """
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(arr, dtype=dtype) if contiguous else arr.astype(dtype)


def _cmd_ihvp(
    args: argparse.Namespace, stdout: TextIO, stderr: TextIO, flush_warnings: Callable[[], None]
) -> int:
    from ._static import StaticIHVP

    inputs = {"GRADS": args.grads, "VECS": args.vecs}
    if _same_file(args.grads, args.vecs) and _special_kind(args.grads) in _STREAM_KINDS:
        # Read once by GRADS, the pipe was empty for VECS ("not an .npy file").
        raise UserError(
            f"GRADS and VECS are the same pipe ({args.grads}), which can be read only once: "
            "save one of them to a file"
        )
    _check_output(args.output, args.overwrite, inputs)
    G = G_file = load(args.grads, "GRADS", mmap=True)
    V = V_file = load(args.vecs, "VECS", mmap=False)
    if G.ndim != 2:
        raise UserError(
            f"GRADS must have shape (m, d), one gradient per row; {args.grads} has shape {G.shape}"
        )
    m, d = G.shape
    if V.ndim not in (1, 2):
        raise UserError(f"VECS must have shape (d,) or (k, d); {args.vecs} has shape {V.shape}")
    if V.shape[-1] != d:
        raise UserError(
            f"VECS has d={V.shape[-1]} coordinates ({args.vecs}, shape {V.shape}) "
            f"but GRADS has d={d} ({args.grads}, shape {G.shape})"
        )
    dtype = _product_dtype(G.dtype, args.dtype)
    G = _operator_gradients(G, dtype)
    V = _cast(V, dtype, contiguous=True)

    bar = ProgressBar(stderr, "set-up") if _wants_progress(args, stderr) else None
    t0 = time.perf_counter()
    try:
        op = StaticIHVP(G, damp=args.damp, block_size=args.block_size, progress=bar)
    except ValueError:
        # The library finds a NaN without a pass of its own but cannot say where; only
        # now, on failure, is the file read once more to name the row.
        error = _finiteness_error(args.grads, G_file, dtype)
        if error is None:
            raise
        raise error from None
    finally:
        if bar is not None:
            bar.close()
    t1 = time.perf_counter()
    try:
        if V.ndim == 1:
            out = op.matvec(V)
        elif V.shape[0] == 0:
            out = np.empty_like(V)
        else:
            out = op.matmat(V.T).T
    except ValueError:
        error = _finiteness_error(args.vecs, V_file, dtype)
        if error is None:
            raise
        raise error from None
    t2 = time.perf_counter()
    _save(args.output, np.ascontiguousarray(out), args.overwrite, inputs)
    # Warnings (an ill-conditioned F, ...) qualify the results: they come before the line
    # that announces them.
    flush_warnings()
    if not args.quiet:
        k = 1 if V.ndim == 1 else V.shape[0]
        blocks = "" if args.block_size is None else f", block size {op.block_size}"
        where = "standard output" if args.output == STDOUT else args.output
        print(
            f"{PROG}: wrote {where}: {k} vector{'' if k == 1 else 's'}, m={m}, d={d}"
            f"{blocks}, {dtype}, kappa <= {op.kappa_bound:.3g}; set-up {t1 - t0:.3g} s, "
            f"products {t2 - t1:.3g} s",
            file=stderr,
        )
    return 0


# -- demo ----------------------------------------------------------------------------------


def _cmd_demo(
    args: argparse.Namespace, stdout: TextIO, stderr: TextIO, flush_warnings: Callable[[], None]
) -> int:
    from ._demo import run_demo

    passed = run_demo(m=args.m, d=args.d, seed=args.seed, damp=args.damp, out=stdout)
    return 0 if passed else 1


# -- entry point ---------------------------------------------------------------------------

#: Exceptions that the library raises for bad input; reported without a traceback.
_USER_ERRORS = (
    UserError,
    ValueError,
    TypeError,
    IndexError,
    FileNotFoundError,
    np.linalg.LinAlgError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mfac-core`` with the arguments ``argv`` (default: ``sys.argv[1:]``).

    Parameters
    ----------
    argv : sequence of str, optional
        The command-line arguments, without the program name.

    Returns
    -------
    int
        The exit status: 0 on success, 1 if the demo's check fails, 2 for a
        usage or input error (the message goes to stderr, without a traceback),
        130 when interrupted, 143 when terminated (SIGTERM, where it has its
        default action: it is handled during the run, and restored).
    """
    stdout, stderr = sys.stdout, sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse's own errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if args.command is None:
        parser.print_usage(stderr)
        print(
            f"{PROG}: error: a command is required (ihvp or demo); see {PROG} --help", file=stderr
        )
        return EXIT_USAGE
    command = {"ihvp": _cmd_ihvp, "demo": _cmd_demo}[args.command]
    error = None
    seen: set[tuple[type[Warning], str]] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def flush_warnings() -> None:
            """Print the warnings caught so far, each distinct one once, in order."""
            for w in caught:
                key = (w.category, str(w.message))
                if key not in seen:
                    seen.add(key)
                    print(f"{PROG}: warning: {w.message}", file=stderr)
            caught.clear()

        try:
            with _terminated_as_interrupted():
                status = command(args, stdout, stderr, flush_warnings)
        except _USER_ERRORS as exc:
            status, error = EXIT_USAGE, str(exc) or type(exc).__name__
        except MemoryError:
            status, error = 1, "out of memory"
        except KeyboardInterrupt:
            status, error = 130, "interrupted"
        except _Terminated:
            status, error = 128 + signal.SIGTERM, "terminated"
        flush_warnings()
    if error is not None:
        print(f"{PROG}: error: {error}", file=stderr)
    return status
