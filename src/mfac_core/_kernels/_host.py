"""Run the kernels of this folder on the CPU, against NumPy arrays (tests only).

The ``.cu`` files are compiled verbatim with g++ and ``host/cuda_host.h``, which maps the CUDA
vocabulary to host code (one fiber per CUDA thread, ``__syncthreads`` a barrier of the block's
fibers; see the header). One ``extern "C"`` shim per kernel and dtype, generated from
:data:`_plan.KERNELS`, launches a kernel over its grid; ctypes calls the shims. The plans and
the array-level operations are those of the CuPy launcher (``_plan``, ``_ops``), so a test here
covers everything but the CuPy-specific glue.

Every array the kernels touch lives in a buffer with guard zones on both sides, filled with a
pattern that is checked after each operation: a write out of bounds raises. Temporaries from
``empty`` start as NaN, so reading one before it is written shows in the results.

Needs a C++20 compiler (``g++`` by default) and the ``host/`` folder of a source checkout.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import _ops, _plan
from ._source import DIRECTORY

__all__ = ["HostKernels", "HostError", "shim_source"]

HOST_DIRECTORY = DIRECTORY / "host"
#: Guard zone on each side of a buffer, in bytes: one 64 x 64 float64 tile row and more.
_GUARD_BYTES = 4096
_GUARD_BYTE = 0xA5
#: The C++ constants that _plan mirrors, checked at compile time.
_CONSTANTS = {
    "MFAC_THREADS": _plan.THREADS,
    "MFAC_TILE": _plan.TILE,
    "MFAC_PANEL_ROWS": _plan.PANEL_ROWS,
    "MFAC_TRSM_RHS": _plan.TRSM_RHS,
    "MFAC_TRSM_FORWARD": _plan.TRSM_FORWARD,
    "MFAC_TRSM_TRANS": _plan.TRSM_TRANS,
    "MFAC_TRSM_IDENTITY": _plan.TRSM_IDENTITY,
    "MFAC_PASS_MAX_K": _plan.PASS_MAX_K,
    "MFAC_PASS_ACC": _plan.PASS_ACC,
    "MFAC_PASS_ROWS": _plan.PASS_ROWS,
    "MFAC_PASS_GROUPS": _plan.PASS_GROUPS,
    "MFAC_PASS_COLS": _plan.PASS_COLS,
}
_CTYPES_SCALARS = {"int": ctypes.c_int, "i64": ctypes.c_longlong}


class HostError(RuntimeError):
    """The CPU harness could not build, or a kernel misbehaved (barrier divergence, a write
    out of bounds)."""


def _c_param(kind: str, scalar: str) -> str:
    if kind in _plan.CONCRETE_KINDS:
        return kind
    return {
        "T*": f"{scalar}*",
        "const T*": f"const {scalar}*",
        "int*": "int*",
        "const int*": "const int*",
        "int": "int",
        "i64": "long long",
        "T": scalar,
    }[kind]


def shim_source() -> str:
    """C++ source that includes the kernels and defines ``host_<function>`` for each function.

    The functions are ``<kernel>_<f64|f32>`` for the typed kernels and ``<kernel>`` for the
    others (:func:`_plan.function_names`). Each shim is ``int host_NAME(unsigned grid, unsigned
    long long seed, int workers, ...)`` with the kernel's parameters; it returns 0 or a
    ``cuda_host`` error code.
    """
    lines = ['#include "cuda_host.h"']
    lines += [f'#include "{name}"' for name in sorted({k.source for k in _plan.KERNELS.values()})]
    lines += [
        f'static_assert({macro} == {value}, "{macro} differs from _plan.py");'
        for macro, value in _CONSTANTS.items()
    ]
    for name, kernel in _plan.KERNELS.items():
        variants = (("_f64", "double"), ("_f32", "float")) if kernel.typed else (("", ""),)
        for suffix, scalar in variants:
            params = "".join(
                f", {_c_param(kind, scalar)} a{i}" for i, kind in enumerate(kernel.params)
            )
            args = ", ".join(f"a{i}" for i in range(len(kernel.params)))
            lines += [
                f'extern "C" int host_{name}{suffix}(unsigned grid, unsigned long long seed, '
                f"int workers{params})",
                "{",
                f"    return cuda_host::launch(grid, MFAC_THREADS, [&] {{ {name}{suffix}({args}); "
                "}, seed, workers);",
                "}",
            ]
    return "\n".join(lines) + "\n"


class _Guarded:
    """NumPy arrays inside buffers with guard zones, checked on demand."""

    def __init__(self) -> None:
        self._buffers: list[tuple[np.ndarray, int, int]] = []

    def new(self, shape: tuple[int, ...], dtype: str, fill: float | None) -> np.ndarray:
        """A guarded array filled with ``fill``, or with all bits set (-1, or the largest
        unsigned integer) for ``None``."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        raw = np.full(nbytes + 2 * _GUARD_BYTES, _GUARD_BYTE, dtype=np.uint8)
        body = raw[_GUARD_BYTES : _GUARD_BYTES + nbytes].view(dt).reshape(shape)
        if fill is None:
            raw[_GUARD_BYTES : _GUARD_BYTES + nbytes] = 0xFF
        else:
            body[...] = fill
        self._buffers.append((raw, _GUARD_BYTES, nbytes))
        return body

    def check(self) -> None:
        for raw, lo, nbytes in self._buffers:
            if not (np.all(raw[:lo] == _GUARD_BYTE) and np.all(raw[lo + nbytes :] == _GUARD_BYTE)):
                raise HostError("a kernel wrote out of the bounds of an array")


class _HostExecutor:
    """The :class:`_ops.ArrayExecutor` of the CPU harness."""

    def __init__(self, kernels: HostKernels) -> None:
        self._kernels = kernels
        self.guarded = _Guarded()

    def empty(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return self.guarded.new(shape, dtype, np.nan if np.dtype(dtype).kind == "f" else None)

    def zeros(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return self.guarded.new(shape, dtype, 0)

    def full(self, shape: tuple[int, ...], value: float, dtype: str) -> np.ndarray:
        return self.guarded.new(shape, dtype, value)

    def copy(self, a: Any, dtype: str) -> np.ndarray:
        out = self.empty(tuple(np.shape(a)), dtype)
        out[...] = a
        return out

    def contiguous(self, a: Any, dtype: str) -> np.ndarray:
        return self.copy(a, dtype)  # always a guarded copy

    def broadcast_to(self, a: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(a, shape)

    def to_host(self, a: Any) -> np.ndarray:
        return np.array(a)

    def may_share_memory(self, a: Any, b: Any) -> bool:
        return bool(np.may_share_memory(a, b))

    def launch(self, kernel: _plan.Kernel, name: str, grid: int, args: tuple[Any, ...]) -> None:
        scalar = ctypes.c_double if name.endswith("_f64") else ctypes.c_float
        converted: list[Any] = []
        for kind, value in zip(kernel.params, args, strict=True):
            if kind.endswith("*"):
                array, offset = value
                if not (array.flags.c_contiguous and array.flags.writeable):
                    raise HostError(f"{name}: arrays must be C-contiguous and writeable")
                converted.append(ctypes.c_void_p(array.ctypes.data + offset * array.itemsize))
            elif kind == "T":
                converted.append(scalar(value))
            else:
                converted.append(_CTYPES_SCALARS[kind](value))
        self._kernels.call(name, grid, converted)


class HostKernels:
    """The kernels compiled for the CPU, with the operations of the CuPy launcher.

    Parameters
    ----------
    library : path
        A shared library made by :meth:`build`.
    seed : int
        Seed of the order in which the CUDA threads of a block run between barriers (0: in
        thread order). Results must not depend on it.
    workers : int, optional
        OS threads that run blocks in parallel (default: the number of CPUs, at most 4).
    """

    def __init__(
        self, library: str | os.PathLike[str], *, seed: int = 1, workers: int | None = None
    ) -> None:
        self._lib = ctypes.CDLL(os.fspath(library))
        self.seed = seed
        self.workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        self.launches: list[tuple[str, int]] = []  # (kernel, grid) of every launch, in order

    @staticmethod
    def build(
        directory: str | os.PathLike[str],
        *,
        compiler: str = "g++",
        extra_sources: tuple[str, ...] = (),
    ) -> Path:
        """Compile the kernels and their shims into ``directory``; return the library's path.

        ``extra_sources`` are more C++ snippets appended to the generated source (tests use
        this for kernels that exercise the harness itself).
        """
        if shutil.which(compiler) is None:
            raise HostError(f"no C++ compiler {compiler!r} on PATH")
        if not (HOST_DIRECTORY / "cuda_host.h").is_file():
            raise HostError(
                f"{HOST_DIRECTORY / 'cuda_host.h'} is missing: the CPU harness "
                "needs a source checkout of mfac_core"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = directory / "mfac_host_shims.cpp"
        source.write_text(shim_source() + "".join(extra_sources))
        library = directory / "libmfac_host.so"
        command = [
            compiler,
            "-O1",
            "-std=c++20",
            "-pthread",
            "-shared",
            "-fPIC",
            "-Wall",
            f"-I{HOST_DIRECTORY}",
            f"-I{DIRECTORY}",
            str(source),
            "-o",
            str(library),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise HostError(f"{' '.join(command)} failed:\n{result.stderr}")
        return library

    def call(self, name: str, grid: int, args: list[Any]) -> None:
        """Launch the shim of kernel ``name`` (e.g. ``"trsm_f64"``) over ``grid`` blocks."""
        function = getattr(self._lib, f"host_{name}")
        function.restype = ctypes.c_int
        self.launches.append((name, grid))
        status = function(
            ctypes.c_uint(grid), ctypes.c_ulonglong(self.seed), ctypes.c_int(self.workers), *args
        )
        if status == 1:
            raise HostError(
                f"{name}: divergent __syncthreads (some threads of a block exited "
                "while others waited at a barrier)"
            )
        if status != 0:
            raise HostError(f"{name}: launch failed with status {status}")

    def _run(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ex = _HostExecutor(self)
        try:
            return operation(ex, *args, **kwargs)
        finally:
            ex.guarded.check()

    # The operations of the CuPy launcher, on NumPy arrays; results are NumPy arrays.

    def potrf(self, a: np.ndarray, *, dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
        factor, info = self._run(_ops.potrf, a, dtype=dtype)
        return np.array(factor), np.array(info)

    def cholesky(self, a: np.ndarray, *, dtype: Any = None) -> np.ndarray:
        return np.array(self._run(_ops.cholesky, a, dtype=dtype))

    def solve_triangular(
        self,
        t: np.ndarray,
        b: np.ndarray,
        *,
        lower: bool = True,
        trans: bool = False,
        dtype: Any = None,
    ) -> np.ndarray:
        return np.array(
            self._run(_ops.solve_triangular, t, b, lower=lower, trans=trans, dtype=dtype)
        )

    def triangular_inverse(
        self, t: np.ndarray, *, lower: bool = True, dtype: Any = None
    ) -> np.ndarray:
        return np.array(self._run(_ops.triangular_inverse, t, lower=lower, dtype=dtype))

    def replace(
        self, U: np.ndarray, p: int, b: np.ndarray, c: float, out: np.ndarray | None = None
    ) -> np.ndarray:
        def run(ex: _HostExecutor) -> np.ndarray:
            target = ex.copy(out if out is not None else np.zeros_like(U), U.dtype.name)
            _ops.replace(ex, U, p, b, c, target)
            return np.array(target)

        return self._run(run)

    def project64(
        self, G: np.ndarray, X: np.ndarray, *, start: int, stop: int, storage: str | None = None
    ) -> np.ndarray:
        return np.array(self._run(_ops.project64, G, X, start=start, stop=stop, storage=storage))

    def combine64(
        self,
        G: np.ndarray,
        C: np.ndarray,
        alpha: Any,
        X: np.ndarray,
        *,
        start: int,
        stop: int,
        dtype: Any,
        storage: str | None = None,
    ) -> np.ndarray:
        return np.array(
            self._run(
                _ops.combine64, G, C, alpha, X, start=start, stop=stop, dtype=dtype, storage=storage
            )
        )

    def project64_blocks(
        self,
        G: np.ndarray,
        X: np.ndarray,
        *,
        start: int,
        block_size: int,
        storage: str | None = None,
    ) -> np.ndarray:
        return np.array(
            self._run(
                _ops.project64_blocks, G, X, start=start, block_size=block_size, storage=storage
            )
        )

    def combine64_blocks(
        self,
        G: np.ndarray,
        C: np.ndarray,
        alpha: Any,
        X: np.ndarray,
        *,
        start: int,
        block_size: int,
        dtype: Any,
        storage: str | None = None,
    ) -> np.ndarray:
        return np.array(
            self._run(
                _ops.combine64_blocks,
                G,
                C,
                alpha,
                X,
                start=start,
                block_size=block_size,
                dtype=dtype,
                storage=storage,
            )
        )
