"""Launch plans: which kernels run, in what order, on what grid, with what arguments.

Pure Python (no CuPy). The CuPy launcher and the CPU harness execute the same plans through an
*executor*, so the tests on the CPU cover the sequencing, grid sizes and arguments as well as the
kernels themselves. The constants below mirror the ``#define`` of the ``.cu`` files; the CPU
harness checks them with ``static_assert`` when it compiles the kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

__all__ = [
    "KERNELS",
    "Buf",
    "Executor",
    "Kernel",
    "Launch",
    "Plan",
    "cholesky",
    "execute",
    "replace",
    "trsm",
]

#: Threads per block of every kernel (``MFAC_THREADS``).
THREADS = 256
#: Edge of diagonal blocks, panels and tiles (``MFAC_TILE``).
TILE = 64
#: Rows below the diagonal block per block of ``chol_panel`` (``MFAC_PANEL_ROWS``).
PANEL_ROWS = 16
#: Right-hand-side columns per block of ``trsm`` (``MFAC_TRSM_RHS``).
TRSM_RHS = 16
#: ``trsm`` flags (``MFAC_TRSM_*``).
TRSM_FORWARD, TRSM_TRANS, TRSM_IDENTITY = 1, 2, 4
#: CUDA's limit on ``gridDim.x``; sizes are passed as C ``int`` and must fit it too.
MAX_GRID = 2**31 - 1
MAX_INT = 2**31 - 1
#: The appended pivot must exceed this times ``|c|``: the threshold of the generic row edit.
PIVOT_RTOL = 1e-13

#: Kernel-name suffix per compute dtype.
SUFFIX = {"float64": "f64", "float32": "f32"}


@dataclass(frozen=True)
class Kernel:
    """A kernel's source file and parameter kinds.

    Kinds: ``"T*"``/``"const T*"`` (array of the compute dtype), ``"int*"``/``"const int*"``
    (int32 array), ``"int"`` (C int), ``"i64"`` (C long long), ``"T"`` (a scalar of the
    compute dtype). The CPU harness generates its C++ shims from these, so a mismatch with
    the kernel's real signature is a compile error there.
    """

    source: str
    params: tuple[str, ...]


KERNELS: dict[str, Kernel] = {
    # A, n, k0, chunks, info, diag
    "chol_panel": Kernel("cholesky.cu", ("T*", "int", "int", "int", "int*", "T*")),
    # A, n, k0, tiles, info, diag
    "chol_syrk": Kernel("cholesky.cu", ("T*", "int", "int", "int", "const int*", "const T*")),
    # T, ldt, stride_t, B, ldb, stride_b, X, ldx, stride_x, m, k, chunks, flags
    "trsm": Kernel(
        "trsm.cu",
        (
            "const T*",
            "i64",
            "i64",
            "const T*",
            "i64",
            "i64",
            "T*",
            "i64",
            "i64",
            "int",
            "int",
            "int",
            "int",
        ),
    ),
    # q, diag, beta, nv
    "replace_prep": Kernel("update.cu", ("const T*", "T*", "T*", "int")),
    # U, out, q, diag, beta, k, p
    "replace_update": Kernel(
        "update.cu", ("const T*", "T*", "const T*", "const T*", "const T*", "int", "int")
    ),
    # out, col, c, rtol, status, k
    "replace_finish": Kernel("update.cu", ("T*", "const T*", "T", "T", "T*", "int")),
}


@dataclass(frozen=True)
class Buf:
    """An array argument: the array bound to ``name``, from element ``offset`` on."""

    name: str
    offset: int = 0


@dataclass(frozen=True)
class Launch:
    """One launch: ``grid`` blocks of :data:`THREADS` threads; ``args`` match the kernel."""

    kernel: str
    grid: int
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Plan:
    """Launches in order, and the temporaries they need: name -> (shape, dtype, zeroed).

    A temporary's dtype ``"T"`` stands for the plan's compute dtype.
    """

    dtype: str
    launches: tuple[Launch, ...]
    temporaries: Mapping[str, tuple[tuple[int, ...], str, bool]]


class Executor(Protocol):
    """What :func:`execute` needs from an array library and a way to launch kernels."""

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any: ...

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any: ...

    def launch(self, kernel: Kernel, name: str, grid: int, args: tuple[Any, ...]) -> None:
        """Launch ``name`` (e.g. ``"trsm_f64"``); ``args`` hold ``(array, offset)`` pairs
        for the array parameters and plain numbers for the others."""


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _grid(blocks: int) -> int:
    if blocks > MAX_GRID:
        raise ValueError(
            f"the problem needs {blocks} blocks in one launch, more than CUDA's "
            f"limit of {MAX_GRID}; split the stack"
        )
    return blocks


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not 0 <= value <= MAX_INT:
            raise ValueError(f"{name}={value} does not fit the kernels' 32-bit sizes")


def _check_dtype(dtype: str) -> None:
    if dtype not in SUFFIX:
        raise ValueError(f"compute dtype must be 'float64' or 'float32', got {dtype!r}")


# Plans are immutable and cheap, but a launch sequence is planned at every call: cache the
# common ones to keep the Python overhead per call low.
_PLAN_CACHE = 256


@lru_cache(maxsize=_PLAN_CACHE)
def cholesky(n: int, batch: int, dtype: str) -> Plan:
    """Factor ``A`` (``batch`` contiguous n x n matrices) in place; writes ``info``.

    Right-looking by panels of :data:`TILE` columns: ``chol_panel`` then, unless it was the
    last panel, ``chol_syrk`` on the lower triangle of tiles of the trailing matrix plus one
    block per matrix that moves the parked diagonal block into place (see cholesky.cu).
    """
    _check_dtype(dtype)
    _check_sizes(n=n, batch=batch)
    launches = []
    for k0 in range(0, n, TILE):
        nb = min(TILE, n - k0)
        below = n - k0 - nb
        chunks = max(1, _ceil(below, PANEL_ROWS))
        launches.append(
            Launch(
                "chol_panel",
                _grid(batch * chunks),
                (Buf("A"), n, k0, chunks, Buf("info"), Buf("diag")),
            )
        )
        if below:
            t = _ceil(below, TILE)
            tiles = t * (t + 1) // 2
            launches.append(
                Launch(
                    "chol_syrk",
                    _grid(batch * (tiles + 1)),
                    (Buf("A"), n, k0, tiles, Buf("info"), Buf("diag")),
                )
            )
    temporaries = {
        "info": ((batch,), "int32", True),
        "diag": ((batch, TILE) if n > TILE else (0,), "T", False),
    }
    return Plan(dtype, tuple(launches), temporaries)


def trsm_flags(*, lower: bool, trans: bool, identity: bool = False) -> int:
    """The ``trsm`` flags for ``op(T) = T`` or ``T^T`` of a lower or upper ``T``."""
    forward = lower != trans  # op(T) is lower triangular
    return (
        (TRSM_FORWARD if forward else 0)
        | (TRSM_TRANS if trans else 0)
        | (TRSM_IDENTITY if identity else 0)
    )


@lru_cache(maxsize=_PLAN_CACHE)
def trsm(
    m: int,
    k: int,
    batch: int,
    dtype: str,
    *,
    lower: bool,
    trans: bool,
    identity: bool = False,
    broadcast_t: bool = False,
) -> Plan:
    """``X = op(T)^{-1} B`` for ``batch`` systems (``op(T)^{-1}`` itself with ``identity``).

    ``T`` holds ``batch`` contiguous m x m matrices, or one when ``broadcast_t``; ``B`` and
    ``X`` hold ``batch`` contiguous m x k matrices (``B`` is not read with ``identity``, and
    may be ``X`` itself).
    """
    _check_dtype(dtype)
    _check_sizes(m=m, k=k, batch=batch)
    chunks = _ceil(k, TRSM_RHS)
    flags = trsm_flags(lower=lower, trans=trans, identity=identity)
    stride_t = 0 if broadcast_t else m * m
    b = Buf("X") if identity else Buf("B")
    args = (Buf("T"), m, stride_t, b, k, m * k, Buf("X"), k, m * k, m, k, chunks, flags)
    launches = (Launch("trsm", _grid(batch * chunks), args),) if batch and m and k else ()
    return Plan(dtype, launches, {})


def replace(k: int, p: int, c: float, dtype: str, *, rtol: float = PIVOT_RTOL) -> Plan:
    """Delete row/column ``p`` of the upper factor ``U`` (k x k), append ``[b; c]``.

    Binds ``U`` (read), ``out`` (k x k, written) and ``b`` (k - 1 entries); writes
    ``status = [pivot, failed]``. The same steps as the generic row edit: ``q = V^{-T} u``
    for ``V = U[p+1:, p+1:]``, ``u = U[p, p+1:]``; the closed-form rank-one update; the new
    column ``col = out[:n, :n]^{-T} b`` and its pivot ``c - col.col``.
    """
    _check_dtype(dtype)
    _check_sizes(k=k)
    if not 0 <= p < k:
        raise ValueError(f"p={p} is not a row of a {k} x {k} factor")
    n = k - 1
    nv = n - p  # size of the trailing block V
    forward_trans = trsm_flags(lower=False, trans=True)
    launches = []
    if nv:
        launches.append(
            Launch(
                "trsm",
                1,
                (
                    Buf("U", (p + 1) * k + p + 1),
                    k,
                    0,  # V, a view with leading dimension k
                    Buf("U", p * k + p + 1),
                    1,
                    0,  # u, one entry per row
                    Buf("q"),
                    1,
                    0,
                    nv,
                    1,
                    1,
                    forward_trans,
                ),
            )
        )
        launches.append(Launch("replace_prep", 1, (Buf("q"), Buf("diag"), Buf("beta"), nv)))
    launches.append(
        Launch(
            "replace_update",
            _ceil(k, THREADS),
            (Buf("U"), Buf("out"), Buf("q"), Buf("diag"), Buf("beta"), k, p),
        )
    )
    if n:
        launches.append(
            Launch(
                "trsm",
                1,
                (Buf("out"), k, 0, Buf("b"), 1, 0, Buf("col"), 1, 0, n, 1, 1, forward_trans),
            )
        )
    launches.append(
        Launch(
            "replace_finish", 1, (Buf("out"), Buf("col"), float(c), float(rtol), Buf("status"), k)
        )
    )
    temporaries = {
        "q": ((nv,), "T", False),
        "diag": ((nv,), "T", False),
        "beta": ((nv,), "T", False),
        "col": ((n,), "T", False),
        "status": ((2,), "T", False),
    }
    return Plan(dtype, tuple(launches), temporaries)


def execute(plan: Plan, executor: Executor, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """Allocate the plan's temporaries, run its launches in order; return every array by name."""
    bound = dict(arrays)
    for name, (shape, dtype, zeroed) in plan.temporaries.items():
        dtype = plan.dtype if dtype == "T" else dtype
        bound[name] = (executor.zeros if zeroed else executor.empty)(shape, dtype)
    suffix = SUFFIX[plan.dtype]
    for launch in plan.launches:
        kernel = KERNELS[launch.kernel]
        if len(launch.args) != len(kernel.params):
            raise AssertionError(
                f"{launch.kernel}: {len(launch.args)} arguments for {len(kernel.params)} parameters"
            )
        args = tuple((bound[a.name], a.offset) if isinstance(a, Buf) else a for a in launch.args)
        executor.launch(kernel, f"{launch.kernel}_{suffix}", launch.grid, args)
    return bound
