"""Where an array holds NaN or infinity: the check, and the one wording of its refusal.

``check_finite`` refuses an input that is not finite, naming its first such entry
(``x[4] is nan``, ``G[2, 5] is inf``); the operators' float64 sums that find a NaN or an
infinity (a Gram's diagonal) say the same through ``raise_non_finite``, reading the
array again only then. Large arrays are scanned in bounded pieces (``SCAN_ENTRIES``).

A finite result beyond float32's range, which a float32 operator returns as infinity,
is said once per call (``FLOAT32_OVERFLOW``, a ``RuntimeWarning``): the C extension's
passes report it from their floating-point flags, ``narrowed`` from NumPy's cast or a
PyTorch CPU tensor's extremes, and ``float32_overflow_once`` gathers the reports of one
public call into one warning (``docs/mathematics.rst``, "Results beyond float32's
range").

A float64 result beyond float64's range (infinity, or NaN where a sum inside the
product overflowed first) is said the same way (``FLOAT64_OVERFLOW``): the public call
tests its host float64 result with one sum (a NaN or an infinity makes it non-finite;
only then are the result and the inputs read entry by entry), and NumPy's own
"overflow encountered" warnings from the library's float64 arithmetic give way to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ._compat import Array, detached, is_finite_array, is_torch_array
from ._errors import user_stacklevel
from ._jax_mode import check_operator_mode
from ._torch_compile import eager_under_torch_compile

__all__ = [
    "FLOAT32_OVERFLOW",
    "FLOAT64_OVERFLOW",
    "SCAN_ENTRIES",
    "check_finite",
    "first_non_finite",
    "float32_overflow_noted",
    "float32_overflow_once",
    "float32_overflow_said_by_caller",
    "float32_overflow_said_now",
    "host_results_stand_for_a_device",
    "narrowed",
    "non_finite_entry",
    "non_finite_error",
    "note_arithmetic_overflow",
    "note_float32_overflow",
    "note_intermediate",
    "note_result_overflow",
    "raise_non_finite",
    "shard_overflow_once",
]


def check_finite(
    xp: Any, x: Array, name: str, *, shard: tuple[int, int | None] | None = None
) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinity, naming its first such entry.

    ``shard`` is ``(axis, start)`` for one rank's shard of an array (the argument the
    user passed on this rank), whose coordinates run along ``axis`` from the global
    ``start`` (None where not yet known): the entry is named by its index in the shard,
    and its global coordinate, ``x[4] (global coordinate 17) is nan``.
    """
    # Inside host_results_stand_for_a_device, the route of a GPU's tensors (no NumPy view).
    if is_finite_array(xp, x, host_view=_torch_cpu_checked[0]):
        return
    if shard is None:
        raise_non_finite(xp, x, name)
        return
    found = first_non_finite(xp, x)
    if found is None:  # an overflow of the check's own sums: the general wording
        raise_non_finite(xp, x, name)
        return
    index, value = found
    axis, start = shard
    where = f" (global coordinate {start + index[axis]})" if start is not None and index else ""
    raise entry_error(name, entry_name(name, index, value, note=where))


#: Entries of the pieces in which :func:`non_finite_entry` scans a 2-D array: its
#: temporaries stay bounded (a few MiB) for a G of any size, memory-mapped G included.
SCAN_ENTRIES = 2**22


def non_finite_entry(xp: Any, x: Array, name: str, *, offset: int = 0) -> str | None:
    """``"G[2, 5] is nan"`` for the first NaN or infinity of ``x``, or None where it is finite.

    The first in row-major order; ``x`` may be the columns of a larger array that start
    at column ``offset`` (the last axis), which the index then counts in. A 2-D ``x`` is
    read in bands of rows (and a row that is too long in pieces), each at most
    :data:`SCAN_ENTRIES` entries, so that nothing the size of ``x`` is ever made (a
    memory-mapped G is read piece by piece); the scan stops at the first band with such
    an entry. One more read of ``x``: for failures only.
    """
    found = first_non_finite(xp, x)
    if found is None:
        return None
    index, value = found
    if index:
        index[-1] += offset
    return entry_name(name, index, value)


def entry_name(name: str, index: list[int], value: float, *, note: str = "") -> str:
    """``"G[2, 5] is nan"``: the entry ``index`` of ``name``, which holds ``value``.

    ``note`` goes after the index: ``"x[2] (global coordinate 6) is nan"``.
    """
    where = f"{name}[{', '.join(map(str, index))}]" if index else name
    return f"{where}{note} is {value}"


def first_non_finite(xp: Any, x: Array) -> tuple[list[int], float] | None:
    """The index (a list) and value of ``x``'s first NaN or infinity in row-major order.

    None where ``x`` is finite; read as :func:`non_finite_entry` says.
    """
    if x.ndim != 2:
        return _first_in_piece(xp, x)
    rows, cols = (int(n) for n in x.shape)
    width = max(1, min(cols, SCAN_ENTRIES))
    band = max(1, SCAN_ENTRIES // width)
    for r0 in range(0, rows, band):
        r1 = min(r0 + band, rows)
        # Row-major order: the first such entry of the band is the earliest of its column
        # pieces' first ones (one piece unless a row is longer than SCAN_ENTRIES).
        hits = []
        for c0 in range(0, cols, width):
            hit = _first_in_piece(xp, x[r0:r1, c0 : c0 + width])
            if hit is not None:
                (i, j), value = hit
                hits.append(([r0 + i, c0 + j], value))
        if hits:
            return min(hits, key=lambda hit: hit[0])
    return None


def _first_in_piece(xp: Any, x: Array) -> tuple[list[int], float] | None:
    bad = ~xp.isfinite(x)
    if not bool(xp.any(bad)):
        return None
    flat = int(xp.argmax(xp.reshape(xp.astype(bad, xp.int8), (-1,))))
    index = []
    for size in reversed(x.shape):
        flat, i = divmod(flat, int(size))
        index.append(i)
    index.reverse()
    return index, float(detached(x[tuple(index)]))


def non_finite_error(xp: Any, x: Array, name: str, *, offset: int = 0) -> ValueError | None:
    """The one wording of an array holding NaN or infinity, or None where ``x`` is finite.

    It names the first such entry in row-major order, e.g. ``G[2, 5] is nan``
    (:func:`non_finite_entry`, which also says how ``x`` is read).
    """
    entry = non_finite_entry(xp, x, name, offset=offset)
    if entry is None:
        return None
    return entry_error(name, entry)


def entry_error(name: str, entry: str) -> ValueError:
    """The error of :func:`non_finite_error` for ``entry``, as :func:`entry_name` says it."""
    return ValueError(f"{name} must not contain NaN or infinity: {entry}")


def raise_non_finite(xp: Any, x: Array, name: str, *, offset: int = 0) -> None:
    """Say where ``x`` holds NaN or infinity; for a finite ``x`` that its squares overflow.

    For the checks that find non-finite values in float64 sums over ``x`` (sums of
    squares, a Gram's diagonal), so that they cost no pass of their own: only on
    failure is ``x`` read again, to say where.
    """
    error = non_finite_error(xp, x, name, offset=offset)
    if error is not None:
        raise error
    raise ValueError(
        f"the squared norms of {name}'s rows or columns overflow float64: {name} is finite "
        "but too large; rescale the gradients (the damping scales with them)"
    )


# -- results beyond float32's range ----------------------------------------------------------

#: The one wording of a float32 result whose exact value is beyond float32's range.
FLOAT32_OVERFLOW = (
    "a result exceeds float32's range (largest finite value 3.4e38) and is returned as "
    "infinity (or NaN where a step inside the product overflowed first): the results of "
    "float32 and 2-byte gradients are float32 (their sums are "
    "float64, rounded once). Scale the input down (products are linear in it), or give "
    "the gradients as float64, whose results are float64"
)

#: The one wording of a float64 result whose exact value is beyond float64's range.
FLOAT64_OVERFLOW = (
    "a result exceeds float64's range (largest finite value 1.8e308) and is returned as "
    "infinity, or as NaN where a sum inside the product overflowed first. Scale the input "
    "down (products are linear in it), or the gradients and the damping (c G at c**2 damp "
    "scales the inverse by 1/c**2)"
)


@dataclass
class _Call:
    """What the public call in progress (``_gathered``) has noted, said at its end."""

    #: Whether it says its overflow (``float32_overflow_once``) or its caller does
    #: (``float32_overflow_said_by_caller``).
    says: bool
    float32: bool = False  # a float32 result overflowed
    float64: bool = False  # a float64 result overflowed
    #: A step inside overflowed (NumPy's flags, or a non-finite float64 coefficient:
    #: ``note_intermediate``): the call tests a float32 result too.
    suspect: bool = False
    #: The steps test their own results, not the call (``shard_overflow_once``).
    steps_test: bool = False
    #: NumPy flagged an operation of this call (on this rank): ``shard_overflow_once``
    #: then tests the result against the inputs.
    flagged: bool = False

    def say_noted(self) -> None:
        """Warn of each overflow noted, once."""
        for dtype, message in (("float32", FLOAT32_OVERFLOW), ("float64", FLOAT64_OVERFLOW)):
            if getattr(self, dtype):
                setattr(self, dtype, False)
                _warn(message)


#: The call in progress (this thread's, or this task's); None outside every such call.
_pending: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "mfac_core_float32_overflow", default=None
)


def note_float32_overflow() -> None:
    """Report a float32 result beyond float32's range: once, at the end of the call.

    Inside a :func:`float32_overflow_once` call the report waits for its end; elsewhere
    it warns at once. Called on the thread that made the call (the C extension's
    worker threads hand their flags back to it).
    """
    _note("float32")


def _note(dtype: str) -> None:
    """Note a ``"float32"`` or ``"float64"`` overflow, or say it outside every call."""
    pending = _pending.get()
    if pending is None:
        _warn(FLOAT32_OVERFLOW if dtype == "float32" else FLOAT64_OVERFLOW)
    else:
        setattr(pending, dtype, True)


def float32_overflow_noted() -> bool:
    """Whether the call in progress has reported a float32 result beyond float32's range."""
    pending = _pending.get()
    return pending is not None and pending.float32


def _host_result(x: Any) -> Any:
    """The module whose ``sum`` reduces ``x`` on the host, or None where ``x`` is not tested.

    NumPy arrays, array-api-strict's (NumPy inside) and PyTorch CPU tensors; not a GPU's
    arrays (the test would wait for the device) nor JAX's (which may be traced).
    """
    if isinstance(x, np.ndarray):
        return np
    if is_torch_array(x):
        return __import__("torch") if x.device.type == "cpu" and _torch_cpu_checked[0] else None
    if _is_strict_array(x):
        return x.__array_namespace__()
    return None


def _is_strict_array(x: Any) -> bool:
    return type(x).__module__.startswith("array_api_strict")


def _is_float32(dtype: Any) -> bool:
    """Whether ``dtype`` is float32: NumPy's compared (0.2 us), others named."""
    try:
        return bool(np.dtype(dtype) == np.float32)  # dtype.name takes microseconds
    except TypeError:  # array-api-strict's or PyTorch's
        return _dtype_name(dtype) == "float32"


def _dtype_name(dtype: Any) -> str:
    """``"float32"`` for NumPy's, PyTorch's and array-api-strict's float32 (and so on)."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).rpartition(".")[2]


def note_result_overflow(result: Any, *inputs: Any) -> bool:
    """Report a float64 ``result`` that overflowed (said at the end of the call); say whether.

    A host result that is not finite, computed from ``inputs`` that are, has overflowed
    (an infinity, or a NaN where a sum of infinities met first). One sum of ``result``
    tells a finite one (a NaN or an infinity makes it NaN or infinite; a large finite
    result whose sum overflows is read again): only then are the result and the inputs
    read entry by entry. A Python float (a trace) is float64. Results of other dtypes,
    and arrays not on the host (:func:`_host_result`), are not tested.
    """
    return _overflowed(result, inputs, ("float64",))


def note_intermediate(*arrays: Any) -> None:
    """Have the call in progress test its result: a small float64 step is not finite.

    For the m x k coefficients of a product (``C^{-1} G x``, whose float64 solve
    overflows silently in LAPACK, and their scaling by ``1/damp``): a kernel that
    reads an infinity raises no overflow flag, and its float32 result would be NaN
    without a word. Host arrays only; an m x k test costs nothing next to the pass.
    """
    pending = _pending.get()
    if pending is None or pending.suspect:
        return
    for a in arrays:
        if isinstance(a, np.ndarray):
            finite = math.isfinite(a.sum())  # a large finite sum only costs the test
        else:
            mod = _host_result(a)
            finite = mod is None or is_finite_array(mod, a)
        if not finite:
            pending.suspect = True
            return


def _numpy_flagged(kind: str, flag: int) -> None:
    """NumPy's error callback inside a public call: an operation overflowed (or gave NaN)."""
    _suspect()
    pending = _pending.get()
    if pending is not None:
        pending.flagged = True


def _suspect() -> None:
    """Have the call in progress test its result against its inputs (a step overflowed)."""
    pending = _pending.get()
    if pending is not None:
        pending.suspect = True


def note_arithmetic_overflow(result: Any, *parts: Any) -> None:
    """Report a float32 or float64 ``result`` of ``parts`` (finite) that is not finite.

    For the composite operators' own arithmetic (``alpha * A x``, ``A x + B x``), which
    no kernel flag watches; tested as :func:`note_result_overflow` says.
    """
    _overflowed(result, parts, ("float64", "float32"))


#: The names of NumPy's float dtypes by their character codes.
_NAMES = {"d": "float64", "f": "float32"}


def _overflowed(result: Any, inputs: tuple[Any, ...], dtypes: tuple[str, ...]) -> bool:
    # Called inside a public call, whose errstate keeps NumPy from warning of a large
    # finite result whose sum overflows (or of a large finite m x k coefficient's).
    if isinstance(result, np.ndarray):  # the common case first, in a few microseconds
        name = _NAMES.get(result.dtype.char, "")  # dtype.name takes microseconds
        if name not in dtypes or math.isfinite(result.sum()):
            return False
        mod: Any = np
    elif isinstance(result, float):  # a Python float (a trace): float64
        if "float64" not in dtypes or math.isfinite(result):
            return False
        mod, name = None, "float64"
    else:
        mod = _host_result(result)
        name = _dtype_name(getattr(result, "dtype", ""))
        # Its value only: float() of a tensor that requires grad warns (PyTorch's).
        if mod is None or name not in dtypes or math.isfinite(float(mod.sum(detached(result)))):
            return False
    if mod is not None and is_finite_array(mod, result):
        return False  # a large finite result whose sum overflowed
    for x in inputs:
        xmod = _host_result(x)
        if xmod is not None and not is_finite_array(xmod, x):
            return False  # NaN or infinity given (check_finite=False), or said already
    _note("float32" if name == "float32" else "float64")
    return True


def float32_overflow_said_now() -> None:
    """Say the call's float32 overflow now, where reported, rather than when it returns.

    For a call that changes an object after computing its result (a window's
    ``update_and_matvec``): said before the change, a warning turned into an error
    (``warnings.filterwarnings("error", ...)``) refuses the change like any error, where
    said at the end it would fail a call that has already made it. Said once: the call's
    end then says nothing more unless a later result overflows. Inside a call whose
    caller says it in its own words (``float32_overflow_said_by_caller``), nothing.
    """
    pending = _pending.get()
    if pending is not None and pending.says:
        pending.say_noted()


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


_F = TypeVar("_F", bound=Callable[..., Any])


def float32_overflow_once(method: _F) -> _F:
    """``method`` with its reports of float32 and float64 overflow said once, when it returns.

    For the public calls, whose results may gather several roundings (the groups of
    a block-wise operator, the steps of refinement): the user is told once per call.
    A call inside another (a composite operator's products) reports to the outer one;
    one that raises says nothing of overflow. The outermost call tests a float64
    result (:func:`note_result_overflow`, one sum), and a float32 one where a step
    inside overflowed (NumPy's flags, :func:`note_intermediate`): NumPy's own
    overflow warnings inside it give way to the library's.
    """
    return _gathered(method, say=True)


def float32_overflow_said_by_caller(method: _F) -> _F:
    """``method`` with its reports of float32 and float64 overflow dropped: its caller says it.

    For the optimiser's step, which tests the step's finiteness itself and says why
    it skips a step that is not finite (``MFACStepWarning``).
    """
    return _gathered(method, say=False)


def shard_overflow_once(method: _F) -> _F:
    """``method``, a call of a column-sharded operator, with its overflow said once at its end.

    As :func:`float32_overflow_once`, except that the call's result is tested
    against its inputs only where NumPy flagged an operation of this rank: a rank's
    shard of the result is not finite where another rank's input was (a NaN spread by
    a reduction), which its own inputs cannot tell. The steps inside (``combine``: its
    result against the reduced coefficients it reads) test theirs, and the call says
    what they noted when it returns, after its last reduction: said inside, a warning
    that is an error stopped one rank while the others waited in the next reduction.
    """
    return _gathered(method, say=True, steps_test=True)


def _tested(pending: _Call, result: Any, inputs: tuple[Any, ...]) -> None:
    """Test ``result`` of a call with ``inputs`` (a float64 sum that overflows flags too)."""
    note_result_overflow(result, *inputs)
    if pending.suspect:
        _overflowed(result, inputs, ("float32",))


def _gathered(method: _F, *, say: bool, steps_test: bool = False) -> _F:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # An operator's call (inside another's too: a user's operator): a JAX one may have
        # been built in jax.enable_x64. The engine's calls (a namespace first) are not.
        if args and not isinstance(args[0], types.ModuleType):
            check_operator_mode(args[0])
        outer = _pending.get()
        if outer is not None:
            result = method(*args, **kwargs)
            if outer.steps_test:
                _tested(outer, result, (*args, *kwargs.values()))
            return result
        pending = _Call(says=say, steps_test=steps_test)
        token = _pending.set(pending)
        try:
            # NumPy's warnings ("overflow encountered in multiply", one per operation)
            # give way to the library's: each calls _numpy_flagged, and the result is
            # then tested, float32 too. Inner errstates (narrowed's) still hold.
            with np.errstate(over="call", invalid="call", call=_numpy_flagged):
                result = method(*args, **kwargs)
                if say and not steps_test:
                    _tested(pending, result, (*args, *kwargs.values()))
                elif say and pending.flagged:  # this rank's step overflowed (projection)
                    _overflowed(result, (*args, *kwargs.values()), ("float64", "float32"))
        finally:
            _pending.reset(token)
        if say:
            pending.say_noted()
        return result

    # A public call: under torch.compile it runs eagerly too (its checks decide on the host).
    return eager_under_torch_compile(wrapper)  # type: ignore[return-value]


#: Whether :func:`narrowed` tests PyTorch CPU results: not where they stand for a GPU's.
_torch_cpu_checked = [True]


@contextlib.contextmanager
def host_results_stand_for_a_device() -> Iterator[None]:
    """Inside: PyTorch CPU results are not tested, as a GPU's are not (tests only).

    For ``_pieces.simulate_device``, whose CPU tensors take a GPU's route: the test
    would be a transfer that the device route does not make. Not thread-safe.
    """
    previous = _torch_cpu_checked[0]
    _torch_cpu_checked[0] = False
    try:
        yield
    finally:
        _torch_cpu_checked[0] = previous


def narrowed(xp: Any, Y: Array, dtype: Any) -> Array:
    """``xp.astype(Y, dtype)``, reporting a float32 result beyond float32's range.

    ``Y`` holds float64 values (sums, or a float64 diagonal). For a float32 ``dtype``
    and NumPy, NumPy's own cast finds the overflow (its flag, no pass of its own: the
    cast is redone only then, and its warning gives way to the library's; for
    array-api-strict's arrays too, which are NumPy's inside); for a
    PyTorch CPU tensor, the result's extremes (one reduction) and, only where one is
    infinite or NaN, a comparison with ``Y`` (where ``Y`` is not finite itself, the call
    tests its result against its inputs at its end). Elsewhere (a GPU, where the test would
    wait for the device, JAX, which may be tracing) the cast is not checked.
    """
    if isinstance(Y, np.ndarray) or _is_strict_array(Y):  # NumPy's cast, either way
        if not _is_float32(dtype):
            return xp.astype(Y, dtype)
        with np.errstate(over="raise"):
            try:
                return xp.astype(Y, dtype)
            except FloatingPointError:
                pass
        with np.errstate(over="ignore"):
            out = xp.astype(Y, dtype)
        note_float32_overflow()
        return out
    out = xp.astype(Y, dtype)
    if (
        _torch_cpu_checked[0]
        and is_torch_array(out)
        and out.device.type == "cpu"
        and str(out.dtype) == "torch.float32"
        and not is_finite_array(xp, out)
    ):
        import torch

        if bool(torch.any(torch.isinf(out) & ~torch.isinf(Y))):
            note_float32_overflow()
        else:
            # Y itself is not finite: a float64 step overflowed (PyTorch raises no flag),
            # or an input held NaN or infinity. The call tells them apart, at its end.
            _suspect()
    return out
