"""Input checks shared by the operators, ``pruning``, ``torch`` and the command line.

One helper per rule, and one exception type per kind of mistake:

- ``TypeError`` for a wrong *type*: not an array, an array of another library,
  an integer or complex dtype where floats are needed (or floats where indices
  are), a non-integer count, a non-boolean flag, a lossy change of precision;
- ``ValueError`` for a wrong *value*: a shape, a range, NaN or infinity, an
  array on another device, an unknown option;
- ``IndexError`` for an index outside its range.

Every message names the argument and says what was expected.
"""

from __future__ import annotations

import decimal
import fractions
import functools
import math
import numbers
import operator
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._compat import (
    FUNCTIONALIZE_REFUSAL,
    Array,
    array_namespace,
    canonical_device,
    device,
    functionalizing,
    is_array_api_obj,
    is_jax_array,
    is_jax_namespace,
    is_torch_array,
    is_torch_namespace,
    is_vmapped,
    is_writeable_array,
    namespace_name,
    same_device,
)
from ._dtypes import (
    FLOATING_DTYPES,
    bfloat16_library_note,
    byte_order_note,
    half_dtype_name,
    jax_two_byte_note,
    untyped_note,
)
from ._finite import check_finite

__all__ = [
    "check_block_size",
    "check_choice",
    "check_count",
    "check_damp",
    "check_dampings",
    "largest_damp",
    "check_flag",
    "check_floating",
    "check_fraction",
    "check_gradients",
    "check_index_array",
    "check_number",
    "check_operand",
    "check_same_space",
    "check_strided",
    "check_writeable",
    "reciprocal_factor",
    "scale_factor",
    "non_real_factor_error",
    "numpy_matrix_error",
    "short_repr",
    "resolved_device",
    "described",
    "finite_or_inf",
    "is_number_list",
    "namespace_of",
    "real_scalar_error",
]

# PyTorch's meta tensors have shapes and dtypes but no values: every product would fail deep
# inside (".item() cannot be called on meta tensors", "Cannot copy out of meta tensor").
_META_HOLDS_NOTHING = (
    "which holds shapes but no values; the operators compute with the values: use a "
    "device with storage ('cpu', 'cuda', ...)"
)


def numpy_matrix_error(name: str, x: Any) -> TypeError | None:
    """The refusal of a :class:`numpy.matrix` ``x`` (which SciPy's operators take), or None.

    It is no Array-API array: it was refused as "an array of an Array-API library ... got
    matrix", though it is NumPy's, or met Python's "unsupported operand" on the left of ``@``.
    """
    if not isinstance(x, np.matrix):
        return None
    return TypeError(
        f"{name} is a numpy.matrix, whose shapes (always 2-D) and * (a matrix product) the "
        f"operators do not follow; pass a plain array, np.asarray({name})"
    )


def namespace_of(x: Array, name: str) -> Any:
    """The array namespace of ``x``, or a ``TypeError`` naming the argument."""
    matrix = numpy_matrix_error(name, x)
    if matrix is not None:
        raise matrix
    # NumPy's functions would read the masked entries' values (or fail deep inside on the
    # mask's broadcasting): the mask is the caller's to resolve. numpy.ma is imported
    # lazily; where it is not, x is no masked array.
    ma = sys.modules.get("numpy.ma")
    if ma is not None and isinstance(x, ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma.MaskedArray, whose mask the operators would ignore; "
            f"pass a plain array, e.g. np.ma.filled({name}, value) with the value that its "
            "masked entries stand for"
        )
    if not is_array_api_obj(x):
        raise TypeError(
            f"{name} must be an array of an Array-API library (NumPy, CuPy, PyTorch, JAX, "
            f"array-api-strict), got {type(x).__name__}"
        )
    check_strided(x, name)
    if is_torch_array(x) and functionalizing():
        # Refused at the door: the set-up read a plain G's values through its own
        # intermediates, which hold none there, and failed as "not positive definite".
        raise TypeError(FUNCTIONALIZE_REFUSAL)
    if getattr(x, "is_meta", False) is True:
        raise ValueError(f"{name} is a PyTorch tensor on the meta device, {_META_HOLDS_NOTHING}")
    return array_namespace(x)


def check_strided(x: Array, name: str) -> None:
    """Refuse a PyTorch sparse, nested or vmapped tensor (``TypeError`` naming the argument).

    They are tensors to array-api-compat, but the operators' slicing, checks and passes
    need strided memory: they failed deep inside (NotImplementedError "Could not run
    'aten::ne.Scalar' ... 'SparseCPU' backend"); a nested tensor's ``shape`` raises
    RuntimeError ("NestedTensorImpl doesn't support sizes"), so a caller that reads the
    shape of an array before :func:`namespace_of` calls this first.
    """
    if is_torch_array(x) and x.is_nested:
        raise TypeError(
            f"{name} is a nested PyTorch tensor; the operators take dense (strided) "
            f"tensors: stack its components, e.g. torch.stack({name}.unbind())"
        )
    if is_vmapped(x):
        # Its first read on the host failed deep inside: "Cannot access data pointer".
        raise vmapped_error(name)
    if is_torch_array(x) and str(x.layout) != "torch.strided":
        raise TypeError(
            f"{name} is a PyTorch tensor of layout {x.layout}; the operators take dense "
            f"(strided) tensors: pass {name}.to_dense()"
        )


def vmapped_error(name: str) -> TypeError:
    """The one wording of an argument batched by ``torch.func.vmap`` (see ``is_vmapped``)."""
    return TypeError(
        f"{name} is batched by torch.func.vmap, which the operators cannot take: their "
        "checks and factorisations read values on the host. Call them outside of vmap "
        "(products of several vectors are one call: A.matmat(X.T).T for "
        "torch.vmap(A.matvec)(X), A.rmatmat(X.T).T for torch.vmap(A.rmatvec)(X))"
    )


def _dtype_name(xp: Any, dtype: Any) -> str | None:
    for name in FLOATING_DTYPES:
        if dtype == getattr(xp, name):
            return name
    return None


def check_floating(xp: Any, x: Array, name: str) -> None:
    """Accept float32 and float64 only: integers, complex numbers and other widths are refused.

    float16, bfloat16 and extended precision are refused rather than given a
    precision nobody stated.
    """
    if _dtype_name(xp, x.dtype) is None:
        raise floating_dtype_error(name, x.dtype)


def floating_dtype_error(name: str, dtype: Any, *, two_byte: bool = False) -> TypeError:
    """The one wording of a dtype other than float32 or float64.

    With ``two_byte`` it names the library's 2-byte floats too, which an operand may be.
    """
    also = ", or the library's float16/bfloat16, widened exactly" if two_byte else ""
    return TypeError(
        f"{name} must have a real floating dtype (float32 or float64{also}), got {dtype}"
        f"{byte_order_note(name, dtype)}"
    )


def finite_or_inf(value: Any) -> float:
    """``float(value)``, with infinity for an integer beyond float64's range.

    ``float`` raises ``OverflowError`` for such an int (``10**400``); as infinity it is
    refused by the same range check, with the same message, as ``float("inf")``.
    """
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def scale_factor(value: Any, what: str = "the scalar multiplying an operator") -> float:
    """``value`` as a finite Python float, the factor of a scaled operator (``A * value``).

    An infinite or NaN factor (or an int beyond float64's range) would make every
    product of the operator NaN or infinite, inputs checked for finiteness or not.
    The refusal shows a huge int by its size, not by its hundreds of digits.

    Parameters
    ----------
    value : real number
        The factor (the caller has checked it is a real number, not a bool).
    what : str
        What ``value`` is, for the message.

    Returns
    -------
    float
        ``value``, finite.

    Raises
    ------
    ValueError
        If ``value`` is NaN or infinite, or an int beyond float64's range, or a nonzero
        value that float64 rounds to 0 (``Fraction(1, 10**400)``).
    """
    alpha = finite_or_inf(value)
    if not math.isfinite(alpha):
        raise ValueError(
            f"{what} must be finite, got {short_repr(value)}: every product of the "
            "scaled operator would be NaN or infinite"
        )
    if alpha == 0.0 and value != 0:
        # As 1 / 10**400 is refused by reciprocal_factor: a zero operator nobody asked for.
        raise ValueError(
            f"{what}, {short_repr(value)}, is not 0 but underflows float64 to 0: every "
            "product of the scaled operator would be 0; multiply by 0.0 if that is meant"
        )
    return alpha


def reciprocal_factor(divisor: Any) -> float:
    """``1 / divisor`` as a finite, nonzero Python float, the factor of ``A / divisor``.

    An int (or a fraction) is inverted exactly, then rounded once: ``10**400`` means a
    scale by 1e-400, which is not refused as an infinite divisor but as what it is, a
    factor that underflows float64 to 0 (as does any int beyond about ``2**1075``); and
    ``Fraction(1, 10**400)``, whose float is 0.0, is not refused as a zero divisor but
    as a factor that overflows.

    Parameters
    ----------
    divisor : real number
        The divisor (the caller has checked it is a real number, not a bool).

    Returns
    -------
    float
        ``1 / divisor``, finite and nonzero.

    Raises
    ------
    ZeroDivisionError
        If ``divisor`` is zero.
    ValueError
        If ``divisor`` is NaN or infinite, or ``1 / divisor`` overflows float64 (a
        subnormal divisor, a tiny fraction) or underflows it to 0 (a huge int or
        fraction).
    """
    if isinstance(divisor, numbers.Integral):
        if divisor == 0:
            raise ZeroDivisionError("cannot divide an operator by zero")
        # Python's int division rounds the exact quotient once, and never overflows.
        alpha = 1 / int(divisor)
    elif isinstance(divisor, numbers.Rational):
        if divisor == 0:
            raise ZeroDivisionError("cannot divide an operator by zero")
        # Inverted exactly, then rounded once: Fraction(1, 10**400) is no zero divisor
        # (its float is 0.0), but a factor of 10**400 that overflows float64.
        alpha = finite_or_inf(fractions.Fraction(int(divisor.denominator), int(divisor.numerator)))
    elif divisor != 0 and finite_or_inf(divisor) == 0.0:
        # A nonzero divisor below float64's range (a longdouble): its inverse overflows.
        alpha = math.inf if divisor > 0 else -math.inf
    else:
        d = scale_factor(divisor, "the divisor of an operator")
        if d == 0.0:
            raise ZeroDivisionError("cannot divide an operator by zero")
        alpha = 1.0 / d
    if alpha == 0.0:
        raise ValueError(
            f"1 / {short_repr(divisor)} underflows float64 to 0: every product of the "
            "scaled operator would be 0; multiply by 0.0 if that is meant"
        )
    return scale_factor(alpha, f"1 / {short_repr(divisor)}")


def non_real_factor_error(expression: str, value: Any) -> TypeError:
    """The refusal of a scalar factor that is a number but not a real one (complex, bool).

    SciPy's operators take a complex factor (their result is complex). Without this
    refusal a complex factor fell through to the handling of arrays: NumPy's
    ``np.complex128(2) * A`` was told that "scalar operands are not allowed with @, use *
    instead", and ``A * 2j`` that a scalar was expected. ``expression`` shows the
    operation, with ``A`` for the operator and ``c`` for the factor.
    """
    if isinstance(value, (bool, np.bool_)):
        why = "a bool is no factor; pass 0.0 or 1.0"
    else:
        scipy_form = expression.replace("A", "A.to_scipy()")
        why = (
            "mfac_core operators are real, and so are their factors; SciPy's operators "
            f"take complex ones: {scipy_form} (A NumPy-backed)"
        )
    return TypeError(f"{expression} with c = {value!r}, a {type(value).__name__}: {why}")


def short_repr(value: Any) -> str:
    """``repr(value)``, or for a number with an int of more than 20 digits its size.

    A message that shows ``10**400`` shows it as "an int of 401 digits (1.000e+400)",
    not its 401 digits (the repr of an int beyond ``sys.get_int_max_str_digits()``
    digits raises ``ValueError``); ``Fraction(10**400, 3)`` likewise, as "a Fraction of
    401 / 1 digits (3.333e+399)".
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Rational):
        return repr(value)
    if isinstance(value, numbers.Integral):
        n = decimal.Decimal(int(value))
        digits = n.adjusted() + 1
        if digits > 20:
            return f"an int of {digits} digits ({n:.3e})"
        return repr(value)
    num, den = decimal.Decimal(int(value.numerator)), decimal.Decimal(int(value.denominator))
    num_digits, den_digits = num.adjusted() + 1, den.adjusted() + 1
    if max(num_digits, den_digits) <= 20:
        return repr(value)
    # Decimal's exponent range holds any quotient of ints Python can hold in memory.
    with decimal.localcontext(
        decimal.Context(prec=4, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
    ):
        quotient = num / den
    return f"a {type(value).__name__} of {num_digits} / {den_digits} digits ({quotient:.3e})"


def check_number(
    value: Any,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A real number (not a bool) in the given interval, as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = finite_or_inf(value)
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    if not (math.isfinite(v) and above and below):
        # An infinite end is open: the value must be finite ("[0, inf]" contradicted that).
        opening = "(" if low_open or low == -math.inf else "["
        closing = ")" if high_open or high == math.inf else "]"
        interval = f"{opening}{low:g}, {high:g}{closing}"
        raise ValueError(f"{name} must be finite and lie in {interval}, got {short_repr(value)}")
    return v


#: The smallest damping accepted: float64's smallest normal number. Below it ``1 / damp``
#: overflows and the damping has lost significant bits (a subnormal), so that the operators
#: would fail deep inside (an OverflowError) or compute with a damping other than the one
#: given.
SMALLEST_DAMP = 2.2250738585072014e-308


def scalar_value(value: Any) -> Any:
    """A 0-d array's value as a Python scalar (``item()``); anything else as it is.

    A 0-d real array (``np.array(1e-3)``, ``torch.tensor(1e-3)``) is one number, as a
    NumPy scalar is. A traced value, which has no concrete value, is returned as it is.
    """
    if isinstance(value, numbers.Number) or getattr(value, "ndim", None) != 0:
        return value
    item = getattr(value, "item", None)
    if not callable(item):
        return standard_scalar(value)
    try:
        return item()
    except TypeError:  # e.g. a JAX tracer (ConcretizationTypeError)
        return value


def standard_scalar(value: Any) -> Any:
    """A 0-d array with no ``item()`` as a Python scalar, by the array API's conversions.

    The standard's arrays (array-api-strict) convert with ``bool()``, ``int()`` and
    ``float()`` by their dtype; a complex or unknown one is returned as it is.
    """
    try:
        xp = array_namespace(value)
        kinds = (("bool", bool), ("integral", int), ("real floating", float))
        for kind, convert in kinds:
            if xp.isdtype(value.dtype, kind):
                return convert(value)
    except (TypeError, ValueError, AttributeError):
        pass
    return value


def described(value: Any) -> str:
    """``value`` as a message shows it: an array by its shape and dtype, else its repr.

    An array's repr may be long, and on a GPU it reads the array back to the host.
    """
    if isinstance(value, (numbers.Number, np.generic)):
        return repr(value)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return repr(value)
    return f"an array of shape {tuple(shape)} and dtype {dtype}"


def real_scalar_error(name: str, value: Any) -> TypeError:
    """The one wording of a hyper-parameter that is neither a real number nor a 0-d real array."""
    return TypeError(f"{name} must be a real number or a 0-d real array, got {described(value)}")


def largest_damp(num_grads: int) -> float:
    """The largest damping whose capacitance shift ``num_grads * damp`` is finite in float64.

    Every operator over m gradients adds ``m damp`` to the diagonal of its m x m
    capacitance matrix (``C = m damp I + G G^T``); beyond this damping that shift is
    infinite and the products NaN, however well-conditioned F is. The shift is kept to
    a quarter of float64's largest number, so that the gradients' squared norms have
    room beside it, and C's entries stay below half of it, where XLA's Cholesky
    factorisation (the JAX window's) overflows.
    """
    value = sys.float_info.max / 4 / num_grads
    while num_grads * value > sys.float_info.max / 4:
        value = math.nextafter(value, 0.0)
    return value


def check_damp(damp: Any, name: str = "damp", *, num_grads: int | None = None) -> float:
    """The damping as a Python float; it must be finite and at least float64's smallest normal.

    A real number or a 0-d real array (bools and complex numbers are refused). With
    ``num_grads`` (m), also at most :func:`largest_damp`: ``m damp`` must stay within a
    quarter of float64's range.
    """
    if is_vmapped(damp):  # its item() raised PyTorch's vmap error, naming no argument
        raise vmapped_error(name)
    given = damp
    damp = scalar_value(damp)
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real):
        raise real_scalar_error(name, given)
    shown = short_repr(damp)
    value = finite_or_inf(damp)
    # damp itself against 0: Fraction(1, 10**400) is > 0, and float64 rounds it to 0.
    if not math.isfinite(value) or damp <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {shown}")
    if value < SMALLEST_DAMP:
        size = "underflows float64 to 0" if value == 0.0 else "is subnormal in float64"
        raise ValueError(
            f"{name}={shown} {size} (its inverse overflows); the smallest "
            f"damping that works is {SMALLEST_DAMP!r}, float64's smallest normal number"
        )
    if num_grads is not None and value > largest_damp(num_grads):
        raise ValueError(
            f"{name}={shown} is too large for {num_grads} gradients: m * damp, the shift of "
            f"the capacitance matrix, must stay within a quarter of float64's range, beside "
            f"the gradients' squared norms; the largest damping that works is "
            f"{largest_damp(num_grads)!r}"
        )
    return value


def is_number_list(value: Any) -> bool:
    """Whether ``value`` is a sequence or array of numbers, as :func:`check_dampings` takes.

    A sequence other than a string, or an array (NumPy, PyTorch, JAX, CuPy: anything
    with ``ndim`` and ``tolist``; or the standard's) of one dimension or more, which
    :func:`check_dampings` refuses with a message unless it is 1-d. Not a 0-d array or
    NumPy scalar: that is one number.
    """
    if isinstance(value, (str, bytes)):
        return False
    if isinstance(value, Sequence):
        return True
    ndim = getattr(value, "ndim", None)
    listable = callable(getattr(value, "tolist", None)) or is_array_api_obj(value)
    return isinstance(ndim, int) and ndim >= 1 and listable


def check_dampings(damps: Any, name: str = "damps", *, num_grads: int | None = None) -> list[float]:
    """A non-empty sequence or 1-d array of dampings (:func:`check_damp`), as Python floats."""
    if is_vmapped(damps):  # its tolist() failed deep inside ("Cannot access data pointer")
        raise vmapped_error(name)
    if not is_number_list(damps):
        raise TypeError(
            f"{name} must be a sequence of real numbers (or a 1-d array), "
            f"got {type(damps).__name__}"
        )
    if not isinstance(damps, Sequence):
        if damps.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-d array of dampings, got shape {tuple(damps.shape)}"
            )
        # tolist() gives Python scalars (a bool or complex array gives bools or complex
        # numbers, which check_damp refuses), whatever the array library and device;
        # the standard's arrays (array-api-strict) have no tolist(): entry by entry.
        if callable(getattr(damps, "tolist", None)):
            damps = damps.tolist()
        else:
            damps = [standard_scalar(damps[i]) for i in range(damps.shape[0])]
    if len(damps) == 0:
        raise ValueError(f"{name} must hold at least one damping")
    return [check_damp(dp, f"{name}[{i}]", num_grads=num_grads) for i, dp in enumerate(damps)]


def check_fraction(value: Any, name: str) -> float:
    """A fraction in ``[0, 1)`` (a sparsity), as a Python float."""
    return check_number(value, name, low=0.0, high=1.0, high_open=True)


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (Python or NumPy integers; not bools, not floats)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {short_repr(count)}")
    return count


def check_block_size(block_size: Any, dim: int) -> int:
    """``block_size`` as an int in ``[1, dim]`` (``None``: one block of ``dim``)."""
    if block_size is None:
        return dim
    return min(check_count(block_size, "block_size"), dim)


def check_flag(value: Any, name: str) -> bool:
    """A boolean (Python or NumPy); strings such as ``"no"`` are refused, not taken as true."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_writeable(x: Array, name: str, *, why: str) -> None:
    """Refuse a read-only array (or one of a library with immutable arrays) for ``why``."""
    if not is_writeable_array(x):
        raise ValueError(
            f"{why} needs a writeable array; this {name} is read-only (or from a "
            "library with immutable arrays such as JAX)"
        )


def check_same_space(xp: Any, dev: Any, x: Array, name: str, *, owner: object) -> None:
    """Refuse an array of another library (``TypeError``) or on another device (``ValueError``).

    The operators never move data between libraries or devices behind the
    user's back: such a mismatch is an error that says how to fix it. ``owner``
    is named in the message as ``str(owner)``: an operator itself, whose repr is
    then built only for a message, not on every call.
    """
    if type(x) is np.ndarray and xp is _numpy_namespace() and dev == "cpu":
        # What the checks below find for a plain NumPy array (no subclass: a masked
        # array is refused there), without their lookups: a product at small d is
        # mostly its fixed cost.
        return
    xp_x = namespace_of(x, name)
    if is_jax_array(x) and device(x) is None:
        raise TypeError(
            f"{name} is a traced JAX value (inside jax.jit, vmap or grad), but "
            f"{owner} is not a JAX transformation; use mfac_core.jax, whose "
            "operators are pytrees"
        )
    if xp_x is not xp:
        raise TypeError(
            f"{name} is a {namespace_name(xp_x)} array but {owner} works on "
            f"{namespace_name(xp)} arrays; convert it explicitly first"
            f"{bfloat16_library_note(name, x, xp_x, xp)}"
        )
    dev_x = device(x)
    if not same_device(dev_x, dev):
        raise ValueError(
            f"{name} is on device {dev_x!r} but {owner} lives on device {dev!r}; "
            "move it explicitly first"
        )


def resolved_device(xp: Any, dev: Any) -> Any:
    """``dev`` as the arrays that namespace ``xp`` creates on it report their device.

    ``None`` means the namespace's default device, and a name (``"cpu"``) what the
    namespace means by it: the device of an empty array created there (NumPy's
    ``"cpu"``, PyTorch's ``torch.device("cpu")``, a JAX ``Device``). A device the
    operators store is then compared with their inputs' devices as they report
    them; stored as given, ``None`` or a name refused every input. Called once per
    operator built, never per product. A device object is returned as
    :func:`canonical_device` gives it, without creating an array.

    Parameters
    ----------
    xp : module
        The array namespace (as :func:`array_namespace` returns it, or ``jax.numpy``).
    dev : object
        A device of ``xp``, its name, or ``None``.

    Returns
    -------
    object
        The device, as ``xp``'s arrays on it report it.

    Raises
    ------
    ValueError
        If ``xp`` has no device of that name (or refuses ``dev``).
    """
    if dev is not None and not isinstance(dev, str):
        if is_torch_namespace(xp) and getattr(dev, "type", None) == "meta":
            raise ValueError(f"device {dev!r} is PyTorch's meta device, {_META_HOLDS_NOTHING}")
        return canonical_device(dev)
    if is_jax_namespace(xp):
        return _jax_device(dev)
    try:
        made = xp.empty((0,), device=dev)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"device {dev!r} is not a {namespace_name(xp)} device: {e}") from None
    if getattr(made, "is_meta", False) is True:
        raise ValueError(f"device {dev!r} is PyTorch's meta device, {_META_HOLDS_NOTHING}")
    return canonical_device(device(made))


def _jax_device(name: str | None) -> Any:
    """JAX's default device (``None``), or its first local device of platform ``name``.

    JAX takes no device names; a platform's default device is the default one where
    that is of the platform. The probe array is made concrete even inside a trace
    (``jax.jit``), where an empty array would otherwise be a tracer with no device.
    """
    import jax

    with jax.ensure_compile_time_eval():
        default = device(jax.numpy.empty((0,)))
    if name is None or default.platform == name:
        return default
    try:
        return jax.local_devices(backend=name)[0]
    except RuntimeError as e:
        raise ValueError(f"device {name!r} is not a JAX device: {e}") from None


@functools.cache
def _numpy_namespace() -> Any:
    """The namespace :func:`namespace_of` finds for a NumPy array."""
    return array_namespace(np.empty(0))


def check_operand(xp: Any, dev: Any, dtype: Any, x: Array, name: str, *, owner: object) -> Any:
    """``x`` in the operator's library, device and dtype, promoted where that is lossless.

    A float32 array given to a float64 operator is promoted to float64 (as the
    Array API's promotion rules do); the lossy direction is a ``TypeError``,
    never a silent loss of precision.
    """
    check_same_space(xp, dev, x, name, owner=owner)
    if x.dtype == dtype:
        return x
    if half_dtype_name(xp, x.dtype) is not None and dtype in (xp.float32, xp.float64):
        return xp.astype(x, dtype)  # lossless: every 2-byte value is a float32 value
    if _dtype_name(xp, x.dtype) is None:
        half = getattr(xp, "float16", None)
        two_byte = half is not None and half_dtype_name(xp, half) is not None
        raise floating_dtype_error(name, x.dtype, two_byte=two_byte)
    if x.dtype == xp.float32 and dtype == xp.float64:
        return xp.astype(x, xp.float64)
    raise dtype_mismatch_error(name, x.dtype, owner=owner, dtype=dtype)


def dtype_mismatch_error(name: str, got: Any, *, owner: object, dtype: Any) -> TypeError:
    """The one wording of an operand whose dtype the operator will not convert to silently."""
    return TypeError(
        f"{name} has dtype {got} but {owner} has dtype {dtype}; cast it explicitly "
        "first (no silent loss of precision)"
    )


def check_gradients(G: Array, *, require_finite: bool, name: str = "G", half: bool = False) -> Any:
    """A non-empty 2-D float32/float64 array of gradients (rows); returns its namespace.

    With ``half``, the 2-byte dtypes of :func:`half_dtype_name` are accepted too.
    """
    xp = namespace_of(G, name)
    if G.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (m, d), one gradient per row; "
            f"got shape {tuple(G.shape)}"
        )
    if G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(
            f"{name} must hold at least one gradient of at least one coordinate; "
            f"got shape {tuple(G.shape)}"
        )
    if not (half and half_dtype_name(xp, G.dtype) is not None):
        if half and _dtype_name(xp, G.dtype) is None:
            raise TypeError(
                f"{name} must have a real floating dtype (float32 or float64, or "
                f"float16/bfloat16 storage where the library has it), got {G.dtype}"
                f"{byte_order_note(name, G.dtype)}{untyped_note(name, G.dtype)}"
                f"{jax_two_byte_note(xp, name, G.dtype)}"
            )
        check_floating(xp, G, name)
    if require_finite:
        check_finite(xp, G, name)
    return xp


def check_index_array(idx: Array, name: str, *, xp: Any, device: Any, bound: int) -> Any:
    """Integer indices in ``[0, bound)`` of the given library and device, as int64.

    Any integer dtype is accepted; the result is int64 so that offsets computed
    from it cannot wrap around (an int8 index times a block size would).
    """
    check_same_space(xp, device, idx, name, owner="the operator")
    if not xp.isdtype(idx.dtype, "integral"):
        raise TypeError(f"{name} must have an integer dtype, got {idx.dtype}")
    if math.prod(idx.shape):
        lo, hi = int(xp.min(idx)), int(xp.max(idx))
        if lo < 0 or hi >= bound:
            raise IndexError(
                f"{name} holds an index out of range [0, {bound}): {lo if lo < 0 else hi}"
            )
    return xp.astype(idx, xp.int64)
