"""The command line's .npy inputs: files (memory-mapped) and pipes, checked before reading.

A header is checked against the file's size, so that a truncated or corrupt file is an
error that says so, not a mapping or an allocation of the size its header claims; a pipe is
read once, into memory, and parsed from there. Errors are :class:`UserError`, which
:mod:`mfac_core.cli` prints as one line.
"""

from __future__ import annotations

import errno
import io
import math
import os
import tokenize
from typing import BinaryIO, NamedTuple

import numpy as np
import numpy.lib.format as npy_format

from ._store import UNFINISHED_MAGIC

__all__ = ["UserError", "load", "parse_stream"]

#: The first bytes of every .npy file.
_NPY_MAGIC = b"\x93NUMPY"

#: Bytes read at a time from a pipe.
_STREAM_CHUNK = 1 << 20

#: A bound on the magic, version, length and header of an .npy file (numpy refuses
#: headers over 10000 bytes unless told otherwise).
_MAX_HEADER_BYTES = 1 << 16


class UserError(Exception):
    """An error of the user's input: the command prints it as one line, no traceback."""


def load(path: str, what: str, mmap: bool) -> np.ndarray:
    """The array of the .npy file ``path``, memory-mapped if ``mmap`` and ``path`` is a file.

    Parameters
    ----------
    path : str
        The file, or a pipe (``/dev/stdin``, ``<(cat G.npy)``), which cannot be mapped nor
        read twice: it is read once, into memory, and parsed from there.
    what : str
        How the messages name it (``"GRADS"``, ``"VECS"``).
    mmap : bool
        Whether to map a file read-only instead of reading it.

    Returns
    -------
    numpy.ndarray
        The array as the file holds it.

    Raises
    ------
    UserError
        For a missing, unreadable, truncated or corrupt file, or one that is not an
        ``.npy`` file of real numbers.
    MemoryError
        Where the system has no memory to map or read it.
    """
    if not os.path.exists(path):
        raise UserError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"{what} is a directory, not an .npy file: {path}")
    arr: np.ndarray | None = None
    try:
        with open(path, "rb") as fh:
            if not fh.seekable():
                arr = parse_stream(fh, path, what)
            else:
                _check_npy_header(fh, path, what, os.fstat(fh.fileno()).st_size)
    except OSError as exc:
        raise UserError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if arr is not None:
        return arr
    try:
        try:
            # Read-only: a copy-on-write ("c") map is private and writeable, so the
            # system charges all of it to the process's memory at once and refuses a
            # GRADS larger than memory (ENOMEM), which is what the map is for.
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError:
            if not mmap:
                raise
            arr = np.load(path, allow_pickle=False)  # e.g. an empty array cannot be mapped
    except (ValueError, OSError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
            # Out of memory when mapped or read, as anywhere else: exit 1, not 2.
            raise MemoryError(f"reading {what} file {path}") from None
        raise UserError(f"cannot read {what} file {path}: {exc}") from None
    return arr


#: The types that numpy.save writes as untyped ("void") values of 1 or 2 bytes.
_UNTYPED = {
    2: "bfloat16",
    1: "the 8-bit floats (float8_e4m3fn, float8_e5m2, ...) and small integers",
}


class _NpyHeader(NamedTuple):
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int  # of the data, from the start of the file


def _check_npy_header(fh: BinaryIO, path: str, what: str, size: int) -> _NpyHeader:
    """The .npy header at the start of ``fh``, checked against the file's ``size`` in bytes.

    The data must be as long as the header says: a truncated or corrupt file would
    otherwise be mapped or allocated at the size its header claims (a 1 KB file whose
    header says 800 GB read as "out of memory").
    """
    magic = fh.read(len(_NPY_MAGIC))
    if size == 0:
        raise UserError(f"{what} file {path} is empty (0 bytes), not an .npy file")
    if magic[:2] == b"PK":
        raise UserError(
            f"{what} file {path} is an .npz archive; save a single array with numpy.save"
        )
    if magic == UNFINISHED_MAGIC:
        raise UserError(
            f"{what} file {path} is unfinished, rows are missing: StaticIHVP.from_gradients "
            "is still filling it (wait for it to return), or its process stopped before the "
            "last gradient (killed, or out of time: collect the gradients again into a new "
            "file)"
        )
    if magic != _NPY_MAGIC:
        raise UserError(f"{what} file {path} is not an .npy file (written by numpy.save)")
    try:
        fh.seek(0)
        major, _ = npy_format.read_magic(fh)
        if major == 1:
            shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
    except (ValueError, EOFError, tokenize.TokenError) as exc:
        # NumPy tokenizes the header before it parses it: an unbalanced bracket is
        # tokenize's error, not NumPy's ValueError.
        raise UserError(
            f"{what} file {path} has a truncated or corrupt .npy header: {exc}"
        ) from None
    # NumPy's header check takes any ints: a negative count would pass the size check below
    # and be read as "the rest" by a reshape; a bool, or a count beside a zero that no array
    # can have, would fail deep inside the mapping.
    limit = np.iinfo(np.intp).max
    if any(type(n) is not int or n < 0 for n in shape):
        raise UserError(
            f"{what} file {path} has a corrupt .npy header: shape {shape} has a negative "
            "dimension or one that is not an integer"
        )
    if math.prod(n for n in shape if n) > limit:
        raise UserError(
            f"{what} file {path} has a corrupt .npy header: shape {shape} is beyond any "
            f"array's size ({limit} items)"
        )
    if dtype.kind == "V" and dtype.fields is None and dtype.itemsize in _UNTYPED:
        raise UserError(
            f"{what} in {path} holds raw {dtype.itemsize}-byte values (dtype {dtype}), as "
            f"numpy.save writes {_UNTYPED[dtype.itemsize]} of ml_dtypes (JAX's arrays "
            "converted to NumPy); the file does not record which type: save them as "
            "float32, e.g. numpy.save(path, numpy.asarray(x, dtype=numpy.float32))"
        )
    if dtype.hasobject or dtype.kind not in "fiub" or dtype.itemsize > 8:
        raise UserError(f"{what} in {path} must hold real numbers, got dtype {dtype}")
    offset = fh.tell()
    need = math.prod(shape) * dtype.itemsize
    if size - offset < need:
        raise UserError(
            f"{what} file {path} is truncated or corrupt: its header says shape {shape} of "
            f"{dtype} ({need} bytes of data), but {max(size - offset, 0)} bytes follow the header"
        )
    return _NpyHeader(shape, fortran, dtype, offset)


def parse_stream(fh: BinaryIO, path: str, what: str) -> np.ndarray:
    """The array of an .npy stream (a pipe), read once into memory, without a second copy.

    Parameters
    ----------
    fh : binary file
        The stream, at its start.
    path, what : str
        Its name, and how the messages name it, as for :func:`load`.

    Returns
    -------
    numpy.ndarray
        A writeable view of the bytes read.

    Raises
    ------
    UserError
        As :func:`load`.
    """
    data = bytearray()
    while chunk := fh.read(_STREAM_CHUNK):
        data += chunk
    # The header is at most numpy's own limit on header sizes; parse a copy of that prefix.
    head = _check_npy_header(io.BytesIO(bytes(data[:_MAX_HEADER_BYTES])), path, what, len(data))
    count = math.prod(head.shape)
    if count == 0:
        return np.empty(head.shape, dtype=head.dtype)
    # A view of the bytearray: writeable, as the mapped file is, and no copy of the data.
    flat = np.frombuffer(data, dtype=head.dtype, count=count, offset=head.offset)
    return flat.reshape(head.shape, order="F" if head.fortran_order else "C")
