"""The construction of :class:`~mfac_core.DynamicIHVP`: its settings, dtypes and buffers.

Every buffer is created once, here, in the window's namespace and on its
device; ``from_window`` fills a new window with one float64 Gram product and
one factorisation.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import numpy as np

from . import _engine, _host_rows, _pieces
from ._capacitance import check_window_damp
from ._compat import (
    Array,
    array_namespace,
    is_dask_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    stored,
)
from ._compat import device as device_of
from ._deprecation import (
    DYNAMIC_LEGACY,
    NOT_GIVEN,
    legacy_options,
    legacy_refactor_every,
    warn_deprecated,
)
from ._dtypes import HALF_DTYPES, compute_dtype, half_dtype_name, numpy_bfloat16, untyped_note
from ._dynamic_factor import completed, factorized
from ._finite import check_finite, non_finite_entry
from ._gram import rows_gram
from ._layout import BlockGroup, chunk_gram, pieces
from ._operator import LinearOperator
from ._store import check_store_size
from ._validation import (
    check_count,
    check_damp,
    check_flag,
    check_writeable,
    namespace_of,
    resolved_device,
)


@dataclasses.dataclass(frozen=True)
class WindowOptions:
    """The rarely changed options of a sliding window (``options=`` of its constructors).

    For :class:`~mfac_core.DynamicIHVP` and
    :class:`~mfac_core.ShardedDynamicIHVP`. Each value is checked here, as the
    constructors check it: a bad one raises where it is written.

    Parameters
    ----------
    zero_init : bool, optional
        Reproduce the authors' convention: the window starts as ``num_grads``
        zero gradients and the normalisation is fixed at ``1/num_grads``.
        Removing a gradient then sets it to zero. Default False.
    refactor_every : int, optional
        Refactorise in full after this many incremental edits (default m),
        which bounds the drift of the factor; a cheap drift check after each
        edit refactorises earlier if needed. Each incremental edit changes the
        float64 Cholesky factor of the m x m capacitance matrix in O(m^2) per
        replaced gradient; ``0`` refactorises it at every update in O(m^3),
        as a reference.
    check_finite : bool, optional
        Refuse gradients and vectors holding NaN or infinity (default True).
    refine : int, optional
        Steps of iterative refinement in every product (default 0), each with
        the residual ``x - F y`` computed from the window in float64. For a
        float64 window one step brings the error of vectors near the window's
        span (such as its mean) down to ``eps * kappa``; float32 and 2-byte
        products are already at float32's rounding. A step costs about two
        more products and two float64 passes over the window.

    Examples
    --------
    >>> from mfac_core import DynamicIHVP, WindowOptions
    >>> op = DynamicIHVP(
    ...     4, 50, damp=0.1, dtype="float64", options=WindowOptions(zero_init=True, refine=1)
    ... )
    >>> len(op), op.refine
    (4, 1)
    """

    zero_init: bool = False
    refactor_every: int | None = None
    check_finite: bool = True
    refine: int = 0

    def __post_init__(self) -> None:
        # Refused where they are written; kept as Python bools and ints (NumPy ones are
        # taken), which the constructors then use as they are.
        every = self.refactor_every
        checked = {
            "zero_init": check_flag(self.zero_init, "zero_init"),
            "refactor_every": None
            if every is None
            else check_count(every, "refactor_every", minimum=0),
            "check_finite": check_flag(self.check_finite, "check_finite"),
            "refine": check_count(self.refine, "refine", minimum=0),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: the dataclass's own way


#: The fields of ``WindowOptions`` that were the constructors' own keywords.
WINDOW_FIELDS = tuple(f.name for f in dataclasses.fields(WindowOptions))


def window_options(owner: str, options: Any, deprecated: dict[str, Any]) -> WindowOptions:
    """``options`` with the deprecated keywords of ``owner``'s constructor merged in.

    Each of the old keywords (``zero_init=`` ... ``refine=``, ``update_method=``)
    warns, naming its ``WindowOptions`` spelling; an unknown keyword is a TypeError.
    """
    legacy = legacy_options(owner, deprecated, DYNAMIC_LEGACY)
    if options is None:
        options = WindowOptions()
    elif not isinstance(options, WindowOptions):
        raise TypeError(f"options must be a WindowOptions, got {type(options).__name__}")
    given = {name: legacy[name] for name in WINDOW_FIELDS if legacy[name] is not NOT_GIVEN}
    if given:
        spelled = ", ".join(f"{name}={value!r}" for name, value in given.items())
        warn_deprecated(
            f"{owner}(..., {spelled})", f"{owner}(..., options=WindowOptions({spelled}))"
        )
        options = dataclasses.replace(options, **given)
    every = legacy_refactor_every(legacy["update_method"], options.refactor_every)
    return dataclasses.replace(options, refactor_every=every)


def default_namespace() -> Any:
    """NumPy's array namespace, the default of a window built without ``xp``."""
    import numpy as np

    return array_namespace(np.empty(0))


def local_gram(xp: Any, G: Array) -> Array:
    """``G G^T`` of the rows of ``G`` (of a shard: of its columns), accumulated in float64.

    O(m^2 d): the C extension's Gram from G in its storage dtype where it serves
    (``_engine.gram_kernel``, summed in levels as the static set-up's is), else column
    pieces of G converted to float64 (:func:`_pieces.piece_width`), one BLAS-3 product
    each; products of float32 or 2-byte values are exact in float64. (BLAS's sum over a
    piece of 2e6 columns left two float32 gradients with a shared mean 30 eps(float32) off
    at kappa = 1e6, d = 4e6; the kernel's levels 1.2.)
    """
    m, d = G.shape
    if not d:  # a shard without columns
        return xp.zeros((m, m), dtype=xp.float64, device=device_of(G))
    whole = BlockGroup(0, 1, d)
    chunk = list(pieces(whole, _pieces.piece_width(xp, G, m, host=_pieces.LARGE_PIECE_ENTRIES)))
    gram = _engine.gram_kernel(xp, G)
    return chunk_gram(xp, G, whole, chunk, lambda X: rows_gram(xp, X), gram=gram)[0, ...]


def window_dtypes(xp: Any, dtype: Any) -> tuple[Any, Any, str | None]:
    """The buffer's dtype, the compute dtype and the 2-byte storage name (or None).

    float32 and float64 windows compute in their own dtype; a 2-byte window
    (docs/mathematics.rst, "2-byte storage") stores float16 or bfloat16 and
    computes in float32.
    """
    wanted = "float32 or float64, or float16/bfloat16 storage where the library has it"
    if isinstance(dtype, str):
        if dtype not in ("float32", "float64", "float16", "bfloat16"):
            raise TypeError(f"dtype must be {wanted}, got {dtype!r}")
        named = getattr(xp, dtype, None)
        if named is None and dtype == "bfloat16" and is_numpy_namespace(xp):
            named = numpy_bfloat16()
        if named is None or (
            dtype in ("float16", "bfloat16") and half_dtype_name(xp, named) is None
        ):
            raise TypeError(
                f"dtype {dtype!r}: this array library ({xp.__name__}) has no {dtype} "
                "storage that DynamicIHVP supports (NumPy has float16, and bfloat16 "
                "where ml_dtypes is installed; CuPy float16; PyTorch float16 and bfloat16)"
            )
        dtype = named
    if dtype in (xp.float32, xp.float64):
        return dtype, dtype, None
    name = half_dtype_name(xp, dtype)
    if name is None:
        hint = ""
        if getattr(type(dtype), "__module__", "").split(".")[0] == "torch":
            # torch.float32 given with the default (NumPy) namespace: the dtype names
            # another library than xp, which only xp=torch can mean.
            hint = f" (the namespace is {xp.__name__}: pass xp=torch for PyTorch buffers)"
        elif is_jax_namespace(xp) and str(dtype) in HALF_DTYPES:
            # from_window(G) of JAX's 2-byte G: the dtype is NumPy's too (ml_dtypes').
            hint = (
                " (a window is edited in place, which JAX's arrays cannot be: build it in "
                "NumPy, which keeps JAX's 2-byte gradients as they are, "
                "from_window(numpy.asarray(G)))"
            )
        elif isinstance(dtype, np.dtype) and not dtype.isnative:
            # A big-endian dtype prints as the native one where it has a name (bfloat16).
            hint = (
                f" ({dtype.newbyteorder('=').name} in the byte order that is not this "
                "machine's, which the window does not store: pass dtype.newbyteorder('='), "
                "and to from_window G.astype(G.dtype.newbyteorder('=')), a copy)"
            )
        elif untyped_note("G", dtype):
            # from_window(numpy.load(path)) of a window saved with numpy.save (bfloat16).
            hint = untyped_note("G", dtype)
        raise TypeError(f"dtype must be {wanted}{hint}, got {dtype!r}")
    return dtype, xp.float32, name


def check_window_size(owner: str, num_grads: int, dim: int, itemsize: int) -> None:
    """Refuse a window or Gram matrix larger than one array can address, before either is made.

    Past that NumPy (beneath PyTorch's CPU windows and array-api-strict's too) said only
    "Maximum allowed dimension exceeded" or "array is too big", naming no argument.
    The m x m float64 Gram matrix (and the factors' buffers of its size) is checked as
    well: with d < m it is the larger one.
    """
    check_store_size((num_grads, dim), itemsize, f"{owner}'s window", what="one array")
    check_store_size(
        (num_grads, num_grads),
        8,
        f"{owner}'s float64 Gram matrix",
        sizes=("num_grads", "num_grads"),
        what="one array",
    )


def build(
    op: Any,
    num_grads: int,
    dim: int,
    *,
    damp: float,
    dtype: Any,
    xp: Any,
    device: Any,
    options: WindowOptions,
    sharded: bool = False,
) -> None:
    """Check the constructor's arguments and create the buffers of ``op``, then empty it.

    ``sharded``: ``op`` holds one rank's columns, which may be none.
    """
    num_grads = check_count(num_grads, "num_grads")
    op.refine = options.refine  # the options were checked where they were built
    # A shard may hold no column (more ranks than coordinates).
    dim = check_count(dim, "dim", minimum=0 if sharded else 1)
    op.damp = check_damp(damp)
    op.refactor_every = num_grads if options.refactor_every is None else options.refactor_every
    op.zero_init = options.zero_init
    if xp is None:
        xp = default_namespace()
    else:
        try:
            xp = array_namespace(xp.empty(0))
        except (AttributeError, TypeError):
            raise TypeError(
                f"xp must be an array namespace or library module (numpy, "
                f"torch, cupy, ...), got {xp!r}"
            ) from None
    if is_dask_namespace(xp) and not sharded:  # sharded, every rank refuses it alike
        # The window is edited in place, row by row, which a Dask graph cannot be.
        raise TypeError(
            "DynamicIHVP takes no Dask arrays: its window is edited in place at every "
            "update. Use NumPy, CuPy or PyTorch arrays, or DaskStaticIHVP for a fixed G"
        )
    dtype, _, storage = window_dtypes(xp, dtype)
    check_window_damp(xp, dtype, num_grads, op.zero_init, op.damp)
    # 2-byte storage, or the float32 or float64 the window is.
    itemsize = 2 if storage else (4 if dtype == xp.float32 else 8)
    check_window_size(type(op).__name__, num_grads, dim, itemsize)
    # A name or None as the namespace means it (JAX's zeros take no name).
    device = resolved_device(xp, device)
    G = _host_rows.zeros(xp, (num_grads, dim), dtype=dtype, device=device)
    check_writeable(G, "window buffer", why="DynamicIHVP (a window edited in place)")
    op.storage_dtype = storage
    LinearOperator.__init__(
        op,
        shape=(dim, dim),
        # The library's dtype object, as G's, whatever form was given.
        dtype=compute_dtype(xp, G),
        xp=xp,
        device=device_of(G),
        symmetric=True,
        check_finite=options.check_finite,
    )
    op.num_grads, op.dim = num_grads, dim
    op._G = G
    op._gram = xp.zeros((num_grads, num_grads), dtype=xp.float64, device=op.device)
    # Whether every Gram entry was accumulated in float64 (float64 storage, an empty
    # window, from_window, or a Gram recomputed after a failed edit; see _place).
    op._exact_gram = True
    # Once the window is full, factors ping-pong between two C-ordered buffers
    # created once: no allocation per step, and row-wise writes.
    op._buffers = None
    # Counts the edits of the replicated state (see _tag); reset adds one.
    op._version = 0
    op.reset()


def emptied(op: Any) -> None:
    """The body of :meth:`DynamicIHVP.reset` (see there)."""
    m = op.num_grads
    xp = op._xp
    gram = xp.zeros((m, m), dtype=xp.float64, device=op.device)
    window = deque(range(m)) if op.zero_init else deque()
    factor = factorized(op, gram, list(window), warn=False)  # no gradients: not hopeless
    version = op._version + 1
    free = [] if op.zero_init else list(range(m - 1, -1, -1))

    def commit() -> None:
        op._G[...] = 0
        op._gram = gram
        op._exact_gram = True
        op._edits = 0
        op._version = version
        op.refactor_count = 0
        op._warned_hopeless = False
        op._window, op._free = deque(window), list(free)
        op._commit(factor, refactored=True)

    completed(commit)


def filled(
    cls: Any, G: Array, *, damp: float, num_grads: int | None, options: dict[str, Any]
) -> Any:
    """The body of :meth:`DynamicIHVP.from_window` in one process (see there)."""
    xp = namespace_of(G, "G")
    if G.ndim != 2:
        raise ValueError(f"G must be 2-D (k, d), got shape {tuple(G.shape)}")
    k, d = G.shape
    num_grads = window_size(G, num_grads)
    if k > num_grads:
        raise ValueError(f"G holds {k} gradients, more than num_grads={num_grads}")
    # The deprecated keywords merged here, so that their warnings name from_window.
    legacy = {k: v for k, v in options.items() if k != "options"}
    merged = window_options(f"{cls.__name__}.from_window", options.get("options"), legacy)
    op = cls(num_grads, d, damp=damp, dtype=G.dtype, xp=xp, device=device_of(G), options=merged)
    if op.check_finite and k:
        check_finite(xp, G, "G")
    fill(op, xp, G, checked=True)
    return op


def window_size(G: Array, num_grads: Any) -> int:
    """``from_window``'s ``num_grads`` checked, or G's row count where it is None."""
    if num_grads is not None:
        return check_count(num_grads, "num_grads")
    if G.shape[0] == 0:
        raise ValueError(
            f"G holds no gradients (shape {tuple(G.shape)}): pass num_grads, the window's "
            "size, to start from an empty window"
        )
    return int(G.shape[0])


def fill(op: Any, xp: Any, G: Array, *, checked: bool = False) -> None:
    """Put the k gradients in the rows of ``G`` into the new, empty window ``op``.

    The set-up of :meth:`DynamicIHVP.from_window`: ``G`` (k x d, in the window's
    namespace ``xp``, device and dtype) was checked for its shape, and for NaN
    and infinity if ``checked`` (a shard's G, inside a reduction); an empty ``G``
    leaves the window empty.
    """
    k, num_grads = G.shape[0], op.num_grads
    if k == 0:
        return
    if op.check_finite and not checked:
        check_finite(xp, G, "G")
    G = stored(G, "G")
    gram = op._summed(local_gram(xp, G))
    # Both conventions put the k gradients into slots 0..k-1, oldest first.
    if op.zero_init:
        window = list(range(k, num_grads)) + list(range(k))
        free: list[int] = []
    else:
        window, free = list(range(k)), list(range(num_grads - 1, k - 1, -1))
    full_gram = xp.zeros((num_grads, num_grads), dtype=xp.float64, device=op.device)
    full_gram[:k, :k] = gram
    # Raises before anything changes; with check_finite=False, a Gram that is not finite
    # names G's first NaN or infinity (not a shard's, whose indices are local).
    locate = None if op._collective_checks else (lambda: non_finite_entry(xp, G, "G"))
    factor = factorized(op, full_gram, window, locate=locate)
    op._G[:k, ...] = G
    op._gram = full_gram
    op._exact_gram = True
    op._window, op._free = deque(window), free
    op._commit(factor, refactored=True)
