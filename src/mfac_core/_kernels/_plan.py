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
    "STORAGES",
    "Buf",
    "Executor",
    "Kernel",
    "Launch",
    "Plan",
    "cholesky",
    "combine64",
    "execute",
    "function_names",
    "project64",
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

#: Vectors (project64) or rows of C (combine64) per launch of the passes (``MFAC_PASS_MAX_K``).
PASS_MAX_K = 8
#: float64 sums per thread of the passes (``MFAC_PASS_ACC``).
PASS_ACC = 32
#: project64: rows per row group, and row groups per block, at most (``MFAC_PASS_ROWS``,
#: ``MFAC_PASS_GROUPS``).
PASS_ROWS = 8
PASS_GROUPS = 8
#: combine64: columns per thread at most (``MFAC_PASS_COLS``).
PASS_COLS = 8
#: project64 splits a block's columns into slices until it has about this many blocks: enough
#: to fill a large GPU (132 SMs, two blocks each) a few times over, few enough that the partial
#: sums stay small next to G; then the grid no longer grows with the columns.
PASS_TARGET_BLOCKS = 1024
#: ... and leaves every lane at least this many columns of its slice, so that adding up the lanes'
#: sums (a few barriers) stays small next to the slice's own work.
PASS_MIN_LANE_COLUMNS = 64

#: Kernel-name suffix per compute dtype.
SUFFIX = {"float64": "f64", "float32": "f32"}
#: The storage dtypes of G in the passes, with their kernel-name part and C parameter kind (the
#: 2-byte ones are passed as their bits).
STORAGES = {
    "float32": ("f32", "const float*"),
    "float64": ("f64", "const double*"),
    "float16": ("f16", "const unsigned short*"),
    "bfloat16": ("bf16", "const unsigned short*"),
}
#: The dtypes of X (and of combine64's result) in the passes: kernel-name digits and C type.
PASS_FLOATS = {"float32": ("32", "float"), "float64": ("64", "double")}
#: Parameter kinds that are C types as they are (the passes' kernels have no compute dtype).
CONCRETE_KINDS = frozenset(
    {
        "const float*",
        "float*",
        "const double*",
        "double*",
        "const unsigned short*",
    }
)


@dataclass(frozen=True)
class Kernel:
    """A kernel's source file and parameter kinds.

    Kinds: ``"T*"``/``"const T*"`` (array of the compute dtype), ``"int*"``/``"const int*"``
    (int32 array), ``"int"`` (C int), ``"i64"`` (C long long), ``"T"`` (a scalar of the
    compute dtype), and the C types of :data:`CONCRETE_KINDS` (``"const double*"``, ...). The
    CPU harness generates its C++ shims from these, so a mismatch with the kernel's real
    signature is a compile error there.

    A ``typed`` kernel comes in one copy per compute dtype, ``NAME_f64`` and ``NAME_f32``,
    ``T`` standing for that dtype; an untyped one (the passes) is the one function ``NAME``,
    and its kinds name no ``T``.
    """

    source: str
    params: tuple[str, ...]
    typed: bool = True


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
    # qw, q, diag, beta, nv (row 0: q read from the first column of qw, n x 2)
    "replace_prep2": Kernel("update.cu", ("const T*", "T*", "T*", "T*", "int")),
    # U, b, rhs, k (row 0: rhs = [U[0, 1:], b], n x 2)
    "replace_gather": Kernel("update.cu", ("const T*", "const T*", "T*", "int")),
    # qw, q, diag, beta, col, n (row 0: col = K^{-T} qw[:, 1])
    "replace_column": Kernel(
        "update.cu", ("const T*", "const T*", "const T*", "const T*", "T*", "int")
    ),
    # U, out, q, diag, beta, k, p
    "replace_update": Kernel(
        "update.cu", ("const T*", "T*", "const T*", "const T*", "const T*", "int", "int")
    ),
    # out, col, c, rtol, status, k
    "replace_finish": Kernel("update.cu", ("T*", "const T*", "T", "T", "T*", "int")),
}


def _pass_kernels() -> dict[str, Kernel]:
    """The kernels of passes.cu: one per storage dtype of G, dtype of X (and of Y)."""
    kernels = {}
    for st, g_kind in STORAGES.values():
        for xs, x_c in PASS_FLOATS.values():
            # G, ldg, m, X, xb, xk, kk, size, slices, width, groups, row_tiles, out, ob, os, ok
            project = (g_kind, "i64", "int", f"const {x_c}*", "i64", "i64", "int", "i64", "int",
                       "i64", "int", "int", "double*", "i64", "i64", "i64")  # fmt: skip
            kernels[f"project64_{st}_x{xs}"] = Kernel("passes.cu", project, typed=False)
            for ys, y_c in PASS_FLOATS.values():
                # G, ldg, m, C, cb, ck, a, X, xb, xk, kk, size, total, Y, yb, yk
                combine = (g_kind, "i64", "int", "const double*", "i64", "i64", "const double*",
                           f"const {x_c}*", "i64", "i64", "int", "i64", "i64", f"{y_c}*", "i64",
                           "i64")  # fmt: skip
                kernels[f"combine64_{st}_x{xs}_y{ys}"] = Kernel("passes.cu", combine, typed=False)
    # partial, slices, per, total, P, pb
    kernels["project64_sum"] = Kernel(
        "passes.cu", ("const double*", "int", "i64", "i64", "double*", "i64"), typed=False
    )
    return kernels


KERNELS.update(_pass_kernels())


def function_names(name: str) -> tuple[str, ...]:
    """The names of the compiled functions of ``KERNELS[name]``: one per compute dtype if typed."""
    if KERNELS[name].typed:
        return tuple(f"{name}_{suffix}" for suffix in SUFFIX.values())
    return (name,)


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

    A temporary's dtype ``"T"`` stands for the plan's compute dtype (which the untyped kernels
    of the passes do not use: their plans say ``"float64"``).
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


def _check_long(**sizes: int) -> None:
    for name, value in sizes.items():
        if not 0 <= value < 2**63:
            raise ValueError(f"{name}={value} does not fit the kernels' 64-bit sizes")


def _check_choice(name: str, value: str, choices: Mapping[str, Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


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

    Row 0 (the sliding window's edit) walks the triangle once: ``q`` and ``V^{-T} b`` are
    the two right-hand sides of one ``trsm``, and ``col = K^{-T} V^{-T} b`` follows in
    O(k) (``update.cu``); other rows solve for ``q`` and ``col`` one after the other.
    """
    _check_dtype(dtype)
    _check_sizes(k=k)
    if not 0 <= p < k:
        raise ValueError(f"p={p} is not a row of a {k} x {k} factor")
    n = k - 1
    if p == 0 and n:
        return _replace_first(k, c, dtype, rtol)
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


def _replace_first(k: int, c: float, dtype: str, rtol: float) -> Plan:
    """:func:`replace` of row 0 (k >= 2): one ``trsm`` with two right-hand sides."""
    n = k - 1
    forward_trans = trsm_flags(lower=False, trans=True)
    # V = U[1:, 1:] (leading dimension k); qw = [q, V^{-T} b] in place of [u, b].
    solve = (Buf("U", k + 1), k, 0, Buf("qw"), 2, 0, Buf("qw"), 2, 0, n, 2, 1, forward_trans)
    launches = (
        Launch("replace_gather", _ceil(n, THREADS), (Buf("U"), Buf("b"), Buf("qw"), k)),
        Launch("trsm", 1, solve),
        Launch("replace_prep2", 1, (Buf("qw"), Buf("q"), Buf("diag"), Buf("beta"), n)),
        Launch(
            "replace_update",
            _ceil(k, THREADS),
            (Buf("U"), Buf("out"), Buf("q"), Buf("diag"), Buf("beta"), k, 0),
        ),
        Launch("replace_column", 1, (Buf("qw"), Buf("q"), Buf("diag"), Buf("beta"), Buf("col"), n)),
        Launch(
            "replace_finish", 1, (Buf("out"), Buf("col"), float(c), float(rtol), Buf("status"), k)
        ),
    )
    temporaries = {
        "qw": ((2 * n,), "T", False),
        "q": ((n,), "T", False),
        "diag": ((n,), "T", False),
        "beta": ((n,), "T", False),
        "col": ((n,), "T", False),
        "status": ((2,), "T", False),
    }
    return Plan(dtype, launches, temporaries)


def pass_width(kk: int) -> int:
    """NK, the sums per row or column that the passes keep for ``kk`` vectors: 1, 2, 4 or 8."""
    if not 1 <= kk <= PASS_MAX_K:
        raise ValueError(f"kk={kk} is not between 1 and {PASS_MAX_K}")
    return 1 if kk == 1 else 2 if kk == 2 else 4 if kk <= 4 else 8


def project_rows(nk: int) -> int:
    """project64's rows per row group for NK sums per row (``mfac_pass_shape::rows``)."""
    return min(PASS_ROWS, PASS_ACC // nk)


def combine_columns(nk: int) -> int:
    """combine64's columns per thread for NK sums per column (``mfac_pass_shape::cols``)."""
    return min(PASS_COLS, PASS_ACC // nk)


@dataclass(frozen=True)
class ProjectLayout:
    """How project64's first launch covers ``count`` blocks of ``size`` columns and m rows.

    ``groups`` row groups of ``project_rows(nk)`` rows per block (a tile of rows), ``row_tiles``
    tiles, each block's columns in ``slices`` slices of ``width`` columns (the last may be
    narrower): ``count * slices * row_tiles`` blocks.
    """

    groups: int
    row_tiles: int
    slices: int
    width: int

    @property
    def lanes(self) -> int:
        """Threads per row group: they walk the columns of the slice."""
        return THREADS // self.groups


def project_layout(m: int, kk: int, count: int, size: int) -> ProjectLayout:
    """The layout of project64's first launch (see passes.cu); it depends on the shapes only."""
    rows = project_rows(pass_width(kk))
    groups = 1
    while groups < PASS_GROUPS and groups * rows < m:
        groups *= 2
    row_tiles = _ceil(m, groups * rows)
    lanes = THREADS // groups
    most = max(1, _ceil(size, lanes * PASS_MIN_LANE_COLUMNS))
    wanted = max(1, _ceil(PASS_TARGET_BLOCKS, max(1, count * row_tiles)))
    slices = min(most, wanted)
    width = max(1, _ceil(size, slices))
    return ProjectLayout(groups, row_tiles, _ceil(size, width), width)


def _pass_shape(m: int, k: int, count: int, size: int, start: int, ld: int) -> None:
    _check_sizes(m=m)
    _check_long(k=k, count=count, size=size, start=start, ld=ld)
    if start + count * size > ld:
        raise ValueError(
            f"columns {start} to {start + count * size} are not all in G's {ld} columns"
        )


@lru_cache(maxsize=_PLAN_CACHE)
def project64(
    m: int, k: int, count: int, size: int, start: int, ld: int, storage: str, x_dtype: str
) -> Plan:
    """``P[b] = G_b X[b]^T`` in float64 for the ``count`` blocks ``G_b`` of ``size`` columns.

    Binds ``G`` (m x ld, in ``storage``; block b is columns ``start + b size`` on), ``X``
    (count, k, size) of ``x_dtype`` and ``P`` (count, k, m) float64, which every launch writes
    whole (there are none when a dimension is 0: ``P`` must then be zeros). Per group of
    :data:`PASS_MAX_K` vectors, ``project64_<S>_<X>`` and, when the columns are split into
    slices, ``project64_sum``: a number of launches that depends on k alone.
    """
    _check_choice("storage", storage, STORAGES)
    _check_choice("the dtype of X", x_dtype, PASS_FLOATS)
    _pass_shape(m, k, count, size, start, ld)
    name = f"project64_{STORAGES[storage][0]}_x{PASS_FLOATS[x_dtype][0]}"
    launches = []
    partial = 0
    for k0 in range(0, k if m and count and size else 0, PASS_MAX_K):
        kk = min(PASS_MAX_K, k - k0)
        lay = project_layout(m, kk, count, size)
        _check_sizes(slices=lay.slices, row_tiles=lay.row_tiles)
        if lay.slices == 1:
            out: tuple[Any, ...] = (Buf("P", k0 * m), k * m, 0, m)
        else:
            out = (Buf("partial"), lay.slices * kk * m, kk * m, m)
            partial = max(partial, count * lay.slices * kk * m)
        args = (Buf("G", start), ld, m, Buf("X", k0 * size), k * size, size, kk, size,
                lay.slices, lay.width, lay.groups, lay.row_tiles, *out)  # fmt: skip
        launches.append(Launch(name, _grid(count * lay.slices * lay.row_tiles), args))
        if lay.slices > 1:
            launches.append(
                Launch(
                    "project64_sum",
                    _grid(_ceil(count * kk * m, THREADS)),
                    (Buf("partial"), lay.slices, kk * m, count * kk * m, Buf("P", k0 * m), k * m),
                )
            )
    return Plan("float64", tuple(launches), {"partial": ((partial,), "float64", False)})


@lru_cache(maxsize=_PLAN_CACHE)
def combine64(
    m: int,
    k: int,
    count: int,
    size: int,
    start: int,
    ld: int,
    storage: str,
    x_dtype: str,
    y_dtype: str,
    *,
    shared: bool = False,
) -> Plan:
    """``Y[b] = a[:, None] X[b] + C[b] G_b`` for the ``count`` blocks ``G_b`` of ``size`` columns.

    Binds ``G`` (as for :func:`project64`), ``C`` (count, k, m) and ``a`` (k,) float64, ``X``
    (count, k, size) of ``x_dtype``, or (count, size) shared by the k rows, and ``Y`` (count, k,
    size) of ``y_dtype``, which the launches write whole. One launch of
    ``combine64_<S>_<X>_<Y>`` per group of :data:`PASS_MAX_K` rows of C.
    """
    _check_choice("storage", storage, STORAGES)
    _check_choice("the dtype of X", x_dtype, PASS_FLOATS)
    _check_choice("the result dtype", y_dtype, PASS_FLOATS)
    _pass_shape(m, k, count, size, start, ld)
    name = f"combine64_{STORAGES[storage][0]}_x{PASS_FLOATS[x_dtype][0]}_y{PASS_FLOATS[y_dtype][0]}"
    total = count * size
    xb, xk = (size, 0) if shared else (k * size, size)
    launches = []
    for k0 in range(0, k if total else 0, PASS_MAX_K):
        kk = min(PASS_MAX_K, k - k0)
        tile = THREADS * combine_columns(pass_width(kk))
        x = Buf("X", 0 if shared else k0 * size)
        args = (Buf("G", start), ld, m, Buf("C", k0 * m), k * m, m, Buf("a", k0), x, xb, xk,
                kk, size, total, Buf("Y", k0 * size), k * size, size)  # fmt: skip
        launches.append(Launch(name, _grid(_ceil(total, tile)), args))
    return Plan("float64", tuple(launches), {})


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
        name = f"{launch.kernel}_{suffix}" if kernel.typed else launch.kernel
        executor.launch(kernel, name, launch.grid, args)
    return bound
