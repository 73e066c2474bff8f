"""Which dtypes the operators store and compute in, and what to say about the others.

The floating dtypes whose precision the operators state, the 2-byte storage dtypes of each
array library (NumPy's float16 and ml_dtypes' bfloat16, PyTorch's float16 and bfloat16),
an operator's result dtype over its storage, and the notes that the refusals of
``_validation`` append for dtypes a user can convert: another byte order, raw 2-byte values
(``numpy.save`` of bfloat16), JAX's 2-byte arrays, bfloat16 between NumPy and PyTorch.
"""

from __future__ import annotations

import ast
from typing import Any

import numpy as np

from ._compat import (
    Array,
    device,
    is_dask_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    namespace_name,
)

__all__ = [
    "FLOATING_DTYPES",
    "HALF_DTYPES",
    "bfloat16_library_note",
    "byte_order_note",
    "compute_dtype",
    "half_dtype_name",
    "is_numpy_bfloat16",
    "jax_two_byte_note",
    "numpy_bfloat16",
    "operator_dtype",
    "untyped_note",
]


#: The storage dtypes whose precision the operators state (docs/mathematics.rst).
FLOATING_DTYPES = ("float32", "float64")

#: 2-byte storage dtypes, accepted for gradients where a library has them (NumPy and
#: CuPy float16, NumPy bfloat16 of ml_dtypes, PyTorch float16 and bfloat16); the operators
#: then compute in float32
#: (docs/mathematics.rst, "2-byte storage").
HALF_DTYPES = ("float16", "bfloat16")


def half_dtype_name(xp: Any, dtype: Any) -> str | None:
    """``"float16"`` or ``"bfloat16"`` for a supported 2-byte dtype of ``xp``, else ``None``.

    JAX and array-api-strict are not among them (JAX's operators are pytrees of
    immutable arrays, array-api-strict has no 2-byte dtype).
    """
    if is_jax_namespace(xp):
        return None
    if is_dask_namespace(xp):
        # Dask's namespace names no 2-byte dtype, but its arrays hold NumPy's: a vector's
        # is widened exactly as NumPy's (DaskStaticIHVP refuses a 2-byte G itself).
        if dtype == np.float16:
            return "float16"
        return "bfloat16" if is_numpy_bfloat16(dtype) else None
    # Not ``dtype == getattr(xp, "float16", None)``: a NumPy dtype equals None (float64).
    half = getattr(xp, "float16", None)
    if half is not None and dtype == half:
        return "float16"
    if is_torch_namespace(xp):
        return "bfloat16" if dtype == getattr(xp, "bfloat16", None) else None
    if is_numpy_namespace(xp) and is_numpy_bfloat16(dtype):
        return "bfloat16"
    return None


def is_numpy_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` is ml_dtypes' NumPy bfloat16 (its dtype or scalar type), native order.

    The NumPy arrays of JAX's bfloat16 gradients have it. It is recognised by name, so that
    ml_dtypes is not needed; the byte order must be the machine's, which the passes read
    (``dtype.newbyteorder(">")`` is a bfloat16 too).
    """
    if isinstance(dtype, type) and getattr(dtype, "__name__", None) == "bfloat16":
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            return False
    return (
        isinstance(dtype, np.dtype)
        and dtype.kind == "V"  # before dtype.name, which costs microseconds
        and dtype.name == "bfloat16"
        and dtype.isnative
    )


def numpy_bfloat16() -> np.dtype | None:
    """ml_dtypes' NumPy bfloat16 dtype, for the name ``"bfloat16"``; None without ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def compute_dtype(xp: Any, G: Array) -> Any:
    """The dtype of an operator's results over ``G``: G's own, float32 for 2-byte storage.

    As the library's dtype object, as ``G.dtype`` is (NumPy's ``dtype('float32')``,
    not the scalar type ``numpy.float32``, which has no ``itemsize`` and prints as
    ``<class 'numpy.float32'>``).
    """
    if half_dtype_name(xp, G.dtype) is None:
        return G.dtype
    return xp.empty(0, dtype=xp.float32, device=device(G)).dtype


def operator_dtype(xp: Any, dtype: Any) -> Any:
    """``dtype``, an operator's, as its library's dtype object; a real floating one only.

    A name (``"float64"``, as SciPy's operators take it) or a scalar type
    (``numpy.float64``) becomes the dtype object that arrays report, as
    :func:`compute_dtype` gives it, so that an operand's promotion (float32 to a float64
    operator) and ``repr`` see the one object. A complex or integer dtype is refused:
    the operators' transpose is their adjoint, which holds for real ones only (a complex
    operator's ``A.T`` and ``x @ A`` would be silently conjugated), and their arithmetic
    (``2.5 * A``) has floating results.
    """
    numpy = is_numpy_namespace(xp)
    if isinstance(dtype, str) and not numpy and dtype in (*FLOATING_DTYPES, *HALF_DTYPES):
        dtype = getattr(xp, dtype, dtype)
    if isinstance(dtype, type) or (numpy and isinstance(dtype, str)):
        # NumPy's names and scalar types, and CuPy's and JAX's (their arrays' dtypes are NumPy's).
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            pass
    try:
        real = half_dtype_name(xp, dtype) is not None or bool(xp.isdtype(dtype, "real floating"))
    except (TypeError, ValueError, AttributeError):  # not a dtype of xp (None, a name)
        real = False
    if not real:
        hint = (
            " (SciPy's dtype=None, inferred from a product, is not taken)" if dtype is None else ""
        )
        raise TypeError(
            f"dtype must be a real floating dtype of {namespace_name(xp)} (float32 or float64, "
            f"or a 2-byte float), got {dtype!r}{hint}: the operators are real (their "
            "transpose is their adjoint, and their arithmetic has floating results)"
        )
    return dtype


def untyped_note(name: str, dtype: Any) -> str:
    """What to do about raw 2-byte values (``|V2``), or ``""``.

    ``numpy.save`` writes ml_dtypes' bfloat16 (JAX's bfloat16 in NumPy) as untyped 2-byte
    values, which is what ``numpy.load`` then gives back; a view reads them as bfloat16.
    """
    # ml_dtypes' own types are of kind "V" too, but not np.void.
    untyped = isinstance(dtype, np.dtype) and dtype.type is np.void and dtype.itemsize == 2
    if not untyped or dtype.fields is not None:
        return ""
    return (
        f" (raw 2-byte values, as numpy.save writes ml_dtypes' bfloat16: if they are "
        f"bfloat16, read them as such without a copy, {name}.view(ml_dtypes.bfloat16))"
    )


def jax_two_byte_note(xp: Any, name: str, dtype: Any) -> str:
    """What to do about JAX's 2-byte gradients given to a core operator, or ``""``.

    The core operators keep them as 2-byte storage as NumPy arrays (``numpy.asarray`` of a
    JAX array on the CPU shares its memory; its bfloat16 is ml_dtypes', which NumPy's
    operators read); JAX's own 2-byte dtypes are not a storage of the JAX namespace.
    """
    if not is_jax_namespace(xp) or str(dtype) not in HALF_DTYPES:
        return ""
    return (
        f" (JAX's {dtype} gradients are 2-byte storage as a NumPy array: pass "
        f"numpy.asarray({name}), no copy on the CPU)"
    )


def bfloat16_library_note(name: str, x: Any, xp_x: Any, xp: Any) -> str:
    """How to move bfloat16 ``x`` (of ``xp_x``) between NumPy and PyTorch for ``xp``, or ``""``.

    The two libraries' bfloat16 are the same bits, but neither converts the other's:
    ``torch.as_tensor`` refuses ml_dtypes' bfloat16 arrays and ``Tensor.numpy()``
    torch.bfloat16 tensors, so "convert it explicitly" alone leaves a user without a way.
    Both read the bits through a 2-byte integer view, without a copy.
    """
    dtype = getattr(x, "dtype", None)
    # The conversion is code to copy: a name that is no Python expression ("gradient 3")
    # stands there as "x".
    code, which = (name, "") if _is_expression(name) else ("x", ", x being it")
    if is_numpy_namespace(xp_x) and is_torch_namespace(xp) and is_numpy_bfloat16(dtype):
        return (
            f" ({name} holds ml_dtypes' NumPy bfloat16, which torch.as_tensor does not "
            "take; torch's bfloat16 has the same bits: "
            f"torch.from_numpy({code}.view(numpy.int16)).view(torch.bfloat16){which}, "
            "no copy)"
        )
    if is_torch_namespace(xp_x) and is_numpy_namespace(xp) and str(dtype) == "torch.bfloat16":
        return (
            f" ({name} holds torch.bfloat16, which Tensor.numpy() does not convert; "
            "ml_dtypes' NumPy bfloat16 has the same bits: "
            f"{code}.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16){which})"
        )
    return ""


def _is_expression(text: str) -> bool:
    """Whether ``text`` is a Python expression (``x``, ``state['grads']``)."""
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return True


def byte_order_note(name: str, dtype: Any) -> str:
    """What to do about a NumPy dtype in the byte order that is not the machine's, or ``""``.

    ``>f4`` is float32 to the reader, but the passes read the machine's byte order only
    (a big-endian ``.npy`` file opened with ``numpy.load(..., mmap_mode="r")``).
    """
    if not isinstance(dtype, np.dtype) or dtype.isnative:
        return ""
    native = dtype.newbyteorder("=")
    order = "big" if dtype.byteorder == ">" else "little"
    return (
        f" ({native.name} in {order}-endian byte order; the operators read this machine's "
        f"only: convert it once with {name}.astype({name}.dtype.newbyteorder('=')), a copy "
        "in memory)"
    )
