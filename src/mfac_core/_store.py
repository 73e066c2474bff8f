"""Gradients that do not fit in memory: filling G, a row or a batch at a time.

For ``StaticIHVP.from_gradients`` (docs/guidance.rst, "Gradients larger than
memory"): the static operator stores no m x d array of its own (it reads G in
every product), so G is the only array of that size, and it may be a ``.npy``
file opened as a memmap.

- :func:`gather_gradients`: fills an ``(m, d)`` store (a new array, a new
  ``.npy`` file opened as a memmap, or an array the user passes) from an
  iterable of gradients or batches, with clear errors for too few, too many,
  mis-shaped or non-finite gradients. A store this module created is removed
  again when the collection fails, and an iterator it abandons is closed; a
  complete file is kept when the set-up after it fails (the error says so).
- :func:`progress_callback` and :class:`TextProgress`: the ``progress=``
  argument of ``from_gradients`` (a text bar on stderr, or the user's callable).
"""

from __future__ import annotations

import contextlib
import decimal
import errno
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from ._compat import (
    Array,
    array_namespace,
    device,
    is_jax_namespace,
    namespace_name,
    stored,
)
from ._dtypes import byte_order_note, half_dtype_name, numpy_bfloat16, untyped_note
from ._errors import add_note, close_abandoned, user_stacklevel
from ._validation import (
    check_block_size,
    check_count,
    check_damp,
    check_flag,
    check_same_space,
    check_writeable,
    namespace_of,
    short_repr,
)

__all__ = [
    "GradientStore",
    "TextProgress",
    "built_from_gradients",
    "gather_gradients",
    "kept_file_note",
    "open_store",
    "progress_callback",
]

#: The dtypes a gradient store may have (the operator's storage dtypes; bfloat16 is
#: ml_dtypes', JAX's bfloat16 in NumPy).
STORE_DTYPES = ("float16", "bfloat16", "float32", "float64")


# -- progress ------------------------------------------------------------------------------


@dataclass
class TextProgress:
    """A text progress bar on a stream (stderr), redrawn when its percentage changes."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    width: int = 30
    _last: tuple[str, int] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        percent = 100 if total <= 0 else min(100, 100 * done // total)
        if self._last == (stage, percent):
            return
        self._last = (stage, percent)
        filled = self.width * percent // 100
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if percent == 100 else ""
        self.stream.write(f"\r{stage:>9s} [{bar}] {percent:3d}% ({done}/{total}){end}")
        self.stream.flush()

    def close(self) -> None:
        """End a bar left unfinished by a failed call, so that its error starts a line."""
        if self._last is not None and self._last[1] < 100:
            self.stream.write("\n")
            self.stream.flush()
        self._last = None


def progress_callback(progress: Any) -> Callable[[str, int, int], None] | None:
    """``None``, the built-in text bar (``True``), or the user's callable."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return TextProgress()
    if callable(progress):
        return progress
    raise TypeError(
        "progress must be None, True (a text bar on stderr) or a callable "
        f"progress(stage, done, total), got {type(progress).__name__}"
    )


# -- the gradient store --------------------------------------------------------------------


#: The first bytes of a ``.npy`` file that :func:`gather_gradients` is still filling:
#: NumPy's magic string with its first byte zeroed. A file left by a process killed
#: half-way (SIGKILL, the out-of-memory killer, a batch system's time limit), which nothing
#: can remove and whose unfilled rows read as zeros, is then refused by ``numpy.load``
#: instead of loaded as complete gradients.
UNFINISHED_MAGIC = b"\x00NUMPY"


#: What fsync says where the file system cannot sync (then the mark is only written).
_NO_SYNC = frozenset(
    getattr(errno, code) for code in ("EINVAL", "ENOTSUP", "EOPNOTSUPP") if hasattr(errno, code)
)


def _sync(fh: Any) -> None:
    """Write ``fh`` out to the disk; a file system that cannot sync is no error."""
    fh.flush()
    try:
        os.fsync(fh.fileno())
    except OSError as exc:
        if exc.errno not in _NO_SYNC:  # a disk error is said; no sync is not one
            raise


def _write_unfinished_header(fh: Any, dt: np.dtype, shape: tuple[int, int]) -> int:
    """Write the ``.npy`` header of ``shape`` and ``dt`` marked unfinished; its length.

    NumPy's header (the version 1.0 that ``numpy.save`` writes for such a shape) with
    the mark in its first byte, on the disk before any row: written and marked in two
    steps (NumPy's ``open_memmap``, then the mark), a process killed between them, or a
    machine that went down with the header written back and the mark not, left a
    complete-looking file, its rows zeros.
    """
    header = {
        "descr": np.lib.format.dtype_to_descr(dt),
        "fortran_order": False,
        "shape": tuple(int(n) for n in shape),
    }
    np.lib.format.write_array_header_1_0(fh, header)
    offset = fh.tell()
    fh.seek(0)
    fh.write(UNFINISHED_MAGIC[:1])
    _sync(fh)
    return offset


def _mark_finished(path: str) -> None:
    """Give the ``.npy`` file ``path`` back NumPy's first byte (see :data:`UNFINISHED_MAGIC`)."""
    with open(path, "r+b") as fh:
        fh.write(b"\x93")


@dataclass
class GradientStore:
    """An ``(m, d)`` array to write into, and the file this module created for it (or None)."""

    array: Any
    created: str | None = None

    def finish(self) -> None:
        """Mark the file this module created as complete (a ``.npy`` file again)."""
        if self.created is not None:
            # The rows are written out first: the map's pages reach the disk (or a network
            # file system's server) whenever the system writes them back, the mark at once,
            # so a crash, or a reader on another machine, could find the file marked
            # complete with rows still missing.
            self.array.flush()
            _mark_finished(self.created)

    def discard(self) -> None:
        """Remove the file this module created (after a failure); arrays are let go."""
        self.array = None
        if self.created is not None:
            try:
                os.remove(self.created)
            except FileNotFoundError:
                pass
            self.created = None


def _numpy_dtype(dtype: Any, name: str) -> np.dtype:
    if isinstance(dtype, str) and dtype == "bfloat16":
        # NumPy knows the name only once ml_dtypes has been imported (by anyone).
        bfloat16 = numpy_bfloat16()
        if bfloat16 is None:
            raise TypeError(
                f"{name}='bfloat16' is ml_dtypes' NumPy bfloat16, and ml_dtypes is not "
                "installed (it comes with JAX); install it, or pass another dtype"
            )
        return bfloat16
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a NumPy dtype or its name, got {dtype!r}") from None
    if dt.name not in STORE_DTYPES:
        raise TypeError(f"{name} must be one of {', '.join(STORE_DTYPES)}, got {dt.name}")
    return _native(dt)  # ">f4" too: the operator reads the machine's byte order only


def is_path(target: Any) -> bool:
    """Whether ``target`` names a file (a string or an ``os.PathLike``)."""
    return isinstance(target, (str, os.PathLike))


def check_new_path(target: Any, name: str) -> str:
    """The path of a store to create; an existing file is refused, not overwritten."""
    path = os.fspath(target)
    if not path:
        # Joined to the working directory it named that folder, which the system
        # refused (EISDIR) only after the first gradient.
        raise ValueError(f"{name} is an empty path; pass the path of a new .npy file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{name}: {path!r} is a folder; pass the path of a new .npy file")
    # A trailing separator names a folder: the system refuses to create a file of that
    # name (EISDIR), which was said only when the store was made, after the first gradient,
    # without naming grads_out.
    text = os.fsdecode(path)
    seps = os.sep + (os.altsep or "")
    named_folder = text.rstrip(seps) if text.endswith(tuple(seps)) else None
    # lexists: a dangling symbolic link is an existing name too. Followed, it made the
    # file at the link's target, and a failure then removed the link and left the file.
    if os.path.lexists(path) or (named_folder and os.path.lexists(named_folder)):
        raise FileExistsError(
            f"{name}: {path!r} exists; remove it first or pass another path (an existing "
            "file is not overwritten)"
        )
    if named_folder is not None:
        raise FileNotFoundError(
            f"{name}: {path!r} names a folder (it ends in a separator), and that folder does "
            f"not exist: {os.path.abspath(text)}; pass the path of a new .npy file"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        # Said before the data loader is read, not when the first gradient is stored.
        if os.path.exists(folder):  # "G.npy/out.npy": "does not exist" was untrue
            raise NotADirectoryError(
                f"{name}: {path!r} is inside {folder}, which is a file, not a folder"
            )
        raise FileNotFoundError(f"{name}: the folder of {path!r} does not exist: {folder}")
    return path


def _absolute(path: str | bytes) -> str:
    """``path`` as a ``str`` naming the same file from any working directory.

    The store's file is removed, marked complete and named by its error notes later,
    and a data loader may change the working directory meanwhile: a relative name then
    removed (or marked) a file of that name in the new one, the user's, and left its
    own. Joined to the working directory, not normalised (``os.path.abspath``): with a
    symbolic link, ``link/../G.npy`` is not ``G.npy``. A ``bytes`` name (an
    ``os.PathLike`` may give one) is decoded as ``os`` does, so that messages are text.
    """
    text = os.fsdecode(path)
    return text if os.path.isabs(text) else os.path.join(os.getcwd(), text)


def open_store(target: Any, shape: tuple[int, int], dtype: Any, name: str) -> GradientStore:
    """A new NumPy array (``target`` None) or ``.npy`` memmap file (a path) of ``shape``.

    A file is marked unfinished (:data:`UNFINISHED_MAGIC`) until
    :meth:`GradientStore.finish`.
    """
    dt = _numpy_dtype(dtype, "dtype")
    nbytes = check_store_size(shape, dt.itemsize, name)
    if target is None:
        return GradientStore(np.empty(shape, dtype=dt))
    path = _absolute(check_new_path(target, name))
    try:
        # Made here, exclusively, and written through this descriptor: a file made by
        # someone else since the check above is refused (and left alone), not truncated.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        raise FileExistsError(
            f"{name}: {path!r} exists; remove it first or pass another path (an existing "
            "file is not overwritten)"
        ) from None
    try:
        try:
            with os.fdopen(fd, "r+b") as fh:
                offset = _write_unfinished_header(fh, dt, shape)
            array = np.memmap(path, dtype=dt, mode="r+", offset=offset, shape=shape)
        except OSError as exc:
            # The file system's own limit ("File too large"), said with what was asked.
            raise OSError(
                exc.errno,
                f"{name}: cannot make {path!r}, {nbytes} bytes of {dt.name} gradients "
                f"{shape} ({exc.strerror or exc})",
            ) from None
        _reserve(path, name)
    except BaseException:
        # Not left behind, even half-written (a full disk can fail the header already).
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        raise
    return GradientStore(array, created=path)


def check_store_size(
    shape: tuple[int, int],
    itemsize: int,
    name: str,
    *,
    at_least: bool = False,
    sizes: tuple[str, str] = ("num_grads", "dim"),
    what: str = "one array (or .npy file)",
) -> int:
    """The bytes of an ``(m, d)`` store of ``itemsize``-byte values; refused beyond NumPy's limit.

    ``at_least``: the dtype is not known yet and ``itemsize`` is the smallest one.
    ``sizes``: the arguments that gave ``m`` and ``d``, which the error names; ``what``
    the kind of buffer. Past the limit NumPy said only "array is too big", "Maximum
    allowed dimension exceeded" or, for a file, an overflow warning and "[Errno 22]
    Invalid argument".
    """
    m, d = shape
    nbytes = m * d * itemsize
    if nbytes > np.iinfo(np.intp).max:
        # Decimal: an int of any size in a few digits (float() of 10**400 overflows).
        size = f"{'at least ' if at_least else ''}{itemsize}"
        rows, cols = sizes
        raise ValueError(
            f"{name}: {rows}={short_repr(m)} x {cols}={short_repr(d)} values of {size} bytes "
            f"take {decimal.Decimal(nbytes):.3e} bytes, more than {what} "
            f"can address ({np.iinfo(np.intp).max:.3e})"
        )
    return nbytes


#: What posix_fallocate says where the file system cannot reserve space (then it is not).
_NO_FALLOCATE = frozenset(
    getattr(errno, code)
    for code in ("EINVAL", "EOPNOTSUPP", "ENOTSUP", "ENOSYS")
    if hasattr(errno, code)
)


def _reserve(path: str, name: str) -> None:
    """Reserve the disk blocks of the new ``.npy`` file ``path`` (it is sparse when made).

    A write into a memory map whose page has no disk block and finds the disk full is
    not an error NumPy can raise: the process dies of SIGBUS, half through the data
    loader, leaving the file behind. Reserved here, a full disk is an OSError now.
    Where the platform or file system cannot reserve space, nothing is reserved.
    """
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _NO_FALLOCATE:
            return
        raise OSError(
            exc.errno,
            f"{name}: cannot reserve the {size} bytes of {path!r} on disk "
            f"({exc.strerror}); free space or pass a path on another disk",
        ) from None
    finally:
        os.close(fd)


def _check_store_array(store: Any, shape: tuple[int, int], name: str) -> Any:
    xp = namespace_of(store, name)
    if tuple(store.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(store.shape)}")
    if half_dtype_name(xp, store.dtype) is None and store.dtype not in (xp.float32, xp.float64):
        raise TypeError(
            f"{name} must have a floating dtype (float32, float64 or a 2-byte one), "
            f"got {store.dtype}{byte_order_note(name, store.dtype)}"
            f"{untyped_note(name, store.dtype)}"
        )
    check_writeable(store, name, why="filling it with the gradients")
    return xp


#: What ``next`` returns for an exhausted iterable of gradients (None may be an item).
_END = object()


def _batches(gradients: Iterable[Any]) -> Iterator[Any]:
    # Asked of the type, not by catching iter()'s TypeError: that would also catch, and
    # hide, a TypeError raised inside the iterable's own __iter__ (a data loader's).
    # A 0-d array or NumPy scalar has the methods but no iteration (its own TypeError,
    # "iteration over a 0-d array", named nothing of ours).
    kind = type(gradients)
    scalar = getattr(gradients, "ndim", None) == 0
    if scalar or not (hasattr(kind, "__iter__") or hasattr(kind, "__getitem__")):
        raise TypeError(f"gradients must be an iterable of arrays, got {kind.__name__}")
    return iter(gradients)


def gather_gradients(
    gradients: Iterable[Array],
    *,
    num_grads: Any,
    dim: Any,
    dtype: Any,
    store: Any,
    check_finite: bool,
    progress: Callable[[str, int, int], None] | None,
) -> GradientStore:
    """Fill an ``(num_grads, dim)`` store from ``gradients``, one gradient or batch at a time.

    Each item is a gradient ``(dim,)`` or a batch ``(k, dim)`` of the store's
    library and device. The iterable must yield exactly ``num_grads``
    gradients. On any error a store this function created is removed; an
    array the caller passed keeps the rows written so far; and the iterator,
    unless it was exhausted, is closed (``_errors.close_abandoned``).
    """
    m = check_count(num_grads, "num_grads")
    d = check_count(dim, "dim")
    check_finite = check_flag(check_finite, "check_finite")
    shape = (m, d)
    given = store is not None and not is_path(store)
    if given:
        xp = _check_store_array(store, shape, "grads_out")
        if dtype is not None and dtype != store.dtype and str(dtype) != _dtype_name(store.dtype):
            raise TypeError(
                f"dtype={dtype!r} differs from grads_out's dtype {store.dtype}; drop dtype "
                "(the store's dtype is used)"
            )
    else:
        # Before the loader is read: the store's dtype is known only with the first
        # gradient, so the smallest one (2 bytes) unless dtype= says.
        itemsize = 2 if dtype is None else _numpy_dtype(dtype, "dtype").itemsize
        check_store_size(shape, itemsize, "grads_out", at_least=dtype is None)
        if store is not None:
            check_new_path(store, "grads_out")
    items = _batches(gradients)
    explicit = given or dtype is not None
    target: GradientStore | None = GradientStore(store) if given else None
    row = 0
    exhausted = False  # the iterator said StopIteration: nothing of it is left to close
    try:
        for index, item in enumerate(items):
            if target is None:
                # The store is made once the first gradient says which dtype to use.
                first = namespace_of(item, f"gradient {index}")
                if not _real_floating(first, item.dtype):
                    raise TypeError(
                        f"gradient {index} must have a real floating dtype, got {item.dtype}"
                        f"{untyped_note('g', item.dtype)}"
                    )
                if namespace_name(first) != "numpy":
                    # Said of the store there is: a path named in grads_out is one too.
                    where = (
                        "without grads_out the store is a NumPy array"
                        if store is None
                        else "grads_out names a .npy file, a NumPy store"
                    )
                    # JAX's arrays cannot be a store (immutable); NumPy keeps JAX's
                    # gradients, bfloat16 included, as they are.
                    convert = (
                        "convert each with numpy.asarray (no copy on the CPU; a bfloat16 "
                        "gradient stays bfloat16)"
                        if is_jax_namespace(first)
                        else "convert them to NumPy arrays (PyTorch: t.detach().cpu().numpy()), "
                        "or pass grads_out, an array of their library"
                    )
                    raise TypeError(
                        f"the gradients are {namespace_name(first)} arrays, but {where}; {convert}"
                    )
                if dtype is None and _native(item.dtype).name not in STORE_DTYPES:
                    raise TypeError(
                        f"gradient {index} has dtype {item.dtype}, which a NumPy store of "
                        f"gradients cannot have ({', '.join(STORE_DTYPES)}); pass dtype= "
                        "to convert them all, e.g. dtype='float32'"
                    )
                # In the machine's byte order (the operator reads no other): gradients
                # in the other order are stored converted.
                target = open_store(
                    store, shape, dtype if dtype is not None else _native(item.dtype), "grads_out"
                )
                xp = array_namespace(target.array)
            rows = _checked_rows(xp, target.array, item, index, d, explicit, check_finite, row)
            k = rows.shape[0]
            if row + k > m:
                raise ValueError(
                    f"the gradients exceed num_grads={m}: item {index} brings the count to "
                    f"{row + k} (take the first ones with itertools.islice)"
                )
            target.array[row : row + k, ...] = rows
            row += k
            if progress is not None:
                progress("gradients", row, m)
            if row == m:
                break
        else:
            exhausted = True
        if row < m:
            raise ValueError(f"the gradients ended after {row} of num_grads={m}")
        extra = next(items, _END)
        exhausted = extra is _END
        if extra is None:
            # None is no end marker: the iterable must stop (StopIteration) after m.
            raise ValueError(
                f"the iterable yielded None after the {m} gradients of num_grads={m}; it "
                "must end there (take the first ones with itertools.islice)"
            )
        if extra is not _END:
            raise ValueError(
                f"the gradients exceed num_grads={m}: the iterable yielded more after the "
                f"{m} asked for (take the first ones with itertools.islice)"
            )
        assert target is not None  # made with the first of the m >= 1 gradients
        target.finish()  # only now a .npy file that numpy.load reads
    except BaseException as exc:
        if target is not None and not given:
            target.discard()
        if not exhausted:
            close_abandoned(items, exc)
        # Not kept alive by this frame, which the exception's traceback holds: an
        # iterator without close() (a DataLoader's, whose workers stop when it is
        # collected) is then let go with the last other reference to it.
        del items
        raise
    assert target is not None
    return target


def _real_floating(xp: Any, dt: Any) -> bool:
    """Whether ``dt`` is a real floating dtype, ml_dtypes' NumPy bfloat16 included.

    ``numpy.isdtype`` raises TypeError for ml_dtypes' types (the NumPy arrays of JAX's
    bfloat16 gradients); bfloat16 is recognised by name, so that ml_dtypes is not needed.
    """
    try:
        return bool(xp.isdtype(dt, "real floating"))
    except TypeError:
        # By the dtype's name: str() of a byte-swapped bfloat16 is ">V2", which from_gradients
        # stores converted as it stores ">f4".
        return getattr(dt, "name", str(dt)) == "bfloat16"


def _native(dt: Any) -> Any:
    """A NumPy dtype in the machine's byte order; other libraries' dtypes as they are."""
    return dt.newbyteorder("=") if isinstance(dt, np.dtype) else dt


def _dtype_name(dt: Any) -> str:
    return str(dt).rsplit(".", 1)[-1]


def _checked_rows(
    xp: Any,
    store: Any,
    item: Any,
    index: int,
    d: int,
    explicit: bool,
    check_finite: bool,
    row: int,
) -> Any:
    """One item as ``(k, d)`` rows in the store's dtype (G's rows from ``row``), or an error."""
    name = f"gradient {index}"
    # The store keeps values, not the autograd graph of each gradient written into it.
    item = stored(item, name)
    check_same_space(xp, device(store), item, name, owner="the gradient store")
    if item.ndim == 2 and item.shape[0] == 0 and item.shape[1] == d:
        raise ValueError(
            f"{name} is an empty batch, shape {tuple(item.shape)}: every batch must hold at "
            "least one gradient (leave empty batches out of the iterable)"
        )
    if item.ndim not in (1, 2) or item.shape[-1] != d or (item.ndim == 2 and item.shape[0] < 1):
        raise ValueError(
            f"{name} has shape {tuple(item.shape)}; expected ({d},) for one gradient or "
            f"(k, {d}) for a batch of k"
        )
    if not _real_floating(xp, item.dtype):
        raise TypeError(
            f"{name} must have a real floating dtype, got {item.dtype}"
            f"{untyped_note('g', item.dtype)}"
        )
    if item.dtype != store.dtype:
        if not explicit and _native(item.dtype) != store.dtype:
            raise TypeError(
                f"{name} has dtype {item.dtype}, the first gradient {store.dtype}; pass "
                "dtype= to convert them all to one dtype"
            )
        if check_finite and not bool(xp.all(xp.isfinite(item))):
            _raise_non_finite(xp, item, name, row)
        # Checked before the cast, which would turn such values into infinity.
        largest = float(xp.finfo(store.dtype).max)
        if check_finite and float(xp.max(xp.abs(item))) > largest:
            rows = _as_rows(item)
            where = _first_entry(xp, rows, xp.abs(rows) > largest, row)
            raise ValueError(
                f"{name} overflows the store's dtype {_dtype_name(store.dtype)} "
                f"(largest {largest:g}): {where}"
            )
        item = xp.astype(item, store.dtype)
    elif check_finite and not bool(xp.all(xp.isfinite(item))):
        _raise_non_finite(xp, item, name, row)
    return _as_rows(item)


def _as_rows(item: Any) -> Any:
    return item if item.ndim == 2 else item[None, :]


def _raise_non_finite(xp: Any, item: Any, name: str, row: int) -> None:
    """Name the first NaN or infinity of ``item`` by the entry of G it was to fill."""
    rows = _as_rows(item)
    raise ValueError(
        f"{name} holds NaN or infinity: {_first_entry(xp, rows, ~xp.isfinite(rows), row)}"
    )


def _first_entry(xp: Any, rows: Any, bad: Any, row: int) -> str:
    """``"G[6, 17] is nan"``: the first entry of ``rows`` (G's rows from ``row``) in ``bad``."""
    d = int(bad.shape[1])
    i, j = divmod(int(xp.argmax(xp.reshape(xp.astype(bad, xp.int8), (-1,)))), d)
    return f"G[{row + i}, {j}] is {float(rows[i, j]):g}"


#: The keywords that ``StaticIHVP.from_gradients`` passes on to the operator, with their
#: defaults, and the deprecated ones it ignores.
OPERATOR_OPTIONS: dict[str, Any] = {"block_size": None, "check_finite": True, "refine": 0}
IGNORED_OPTIONS: dict[str, Any] = {"out": None, "overwrite_G": False}


def built_from_gradients(
    build: Callable[..., Any],
    gradients: Iterable[Array],
    *,
    num_grads: int,
    dim: int,
    damp: float,
    dtype: Any,
    grads_out: Any,
    progress: Any,
    options: dict[str, Any],
) -> Any:
    """The body of :meth:`StaticIHVP.from_gradients` (see there); ``build`` is the class."""
    for name in options:
        if name not in OPERATOR_OPTIONS and name not in IGNORED_OPTIONS:
            raise TypeError(f"from_gradients() got an unexpected keyword argument {name!r}")
    opts = {**OPERATOR_OPTIONS, **IGNORED_OPTIONS, **options}
    report = progress_callback(progress)
    # What can be checked before the gradients are read is, so that a mistake
    # does not cost a pass over the data loader.
    check_damp(damp, num_grads=check_count(num_grads, "num_grads"))
    check_block_size(opts["block_size"], check_count(dim, "dim"))
    check_count(opts["refine"], "refine", minimum=0)
    if check_flag(opts["overwrite_G"], "overwrite_G") or opts["out"] is not None:
        warnings.warn(
            "StaticIHVP stores no W any more: out= and overwrite_G= are ignored and "
            "will be removed (no file is made for out)",
            DeprecationWarning,
            stacklevel=user_stacklevel(),
        )
    try:
        # A failed collection removes a file it made (its rows are missing).
        store = gather_gradients(
            gradients,
            num_grads=num_grads,
            dim=dim,
            dtype=dtype,
            store=grads_out,
            check_finite=opts["check_finite"],
            progress=report,
        )
        try:
            return build(
                store.array,
                damp=damp,
                block_size=opts["block_size"],
                check_finite=opts["check_finite"],
                refine=opts["refine"],
                progress=None if report is None else _stage(report, "set-up"),
            )
        except BaseException as exc:
            # The complete file is kept: a mistake in one option (a damping too small
            # to factorise) must not cost the collection, hours of backward passes.
            if store.created is not None:
                add_note(exc, kept_file_note(build, store.created, store.array.dtype))
            store.array = None  # the map is not held open by the traceback's frames
            raise
    except BaseException:
        if isinstance(report, TextProgress):  # not "75% (3/4)Traceback ..."
            report.close()
        raise


def kept_file_note(build: Any, path: str, dtype: Any) -> str:
    """The note of a set-up's error: where the complete gradients are, and how to use them."""
    name = getattr(build, "__name__", "StaticIHVP")
    # Resolved as the system does (a link's "..", which abspath would only drop).
    where = os.path.realpath(os.fsdecode(path))
    load = f"numpy.load({where!r}, mmap_mode='r')"
    if getattr(dtype, "name", None) == "bfloat16":
        # .npy records bfloat16 as raw 2-byte values, which the command line refuses.
        load += ".view(ml_dtypes.bfloat16)"
        cli = ""
    else:
        command = f"mfac-core ihvp {shlex.quote(where)} VECS.npy -o OUT.npy --damp D"
        cli = f", or from the command line: {command}"
    return (
        f"The gradients were all collected: {where} is complete and has been kept. "
        f"Build the operator from it without collecting them again: {name}({load}, "
        f"damp=...) with the other options as you need them{cli}. Delete the file if "
        "you do not need it."
    )


def _stage(report: Callable[[str, int, int], None], stage: str) -> Callable[[int, int], None]:
    """The set-up's ``progress(done, total)`` as one stage of a staged report."""

    def call(done: int, total: int) -> None:
        report(stage, done, total)

    return call
