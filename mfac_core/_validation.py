"""Input checks shared by the operators: each failure names what was wrong."""

from __future__ import annotations

import math
import numbers
from typing import Any

from ._compat import array_namespace, device, is_array_api_obj, namespace_name

__all__ = [
    "check_damp",
    "check_finite",
    "check_floating",
    "check_same_space",
    "namespace_of",
]


def namespace_of(x: Any, name: str) -> Any:
    """The array namespace of ``x``, or a ``TypeError`` naming the argument."""
    if not is_array_api_obj(x):
        raise TypeError(
            f"{name} must be an array of an Array-API library (NumPy, CuPy, PyTorch, JAX, "
            f"array-api-strict), got {type(x).__name__}"
        )
    return array_namespace(x)


def check_floating(xp: Any, x: Any, name: str) -> None:
    """Accept only real floating dtypes; integers and complex numbers are refused."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float32 or float64), got {x.dtype}"
        )


def check_finite(xp: Any, x: Any, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinity."""
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} must not contain NaN or infinity")


def check_damp(damp: Any) -> float:
    """The damping as a Python float; it must be finite and strictly positive."""
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real):
        raise TypeError(f"damp must be a real number, got {damp!r}")
    value = float(damp)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"damp must be finite and > 0, got {damp!r}")
    return value


def check_same_space(
    xp: Any, dev: Any, dtype: Any, x: Any, name: str, *, owner: str = "the operator"
) -> None:
    """Refuse arrays from another library, another device or with another dtype.

    The operators never move data between libraries or devices behind the
    user's back, and never change precision silently: such a mismatch is an
    error that says how to fix it.
    """
    xp_x = namespace_of(x, name)
    if xp_x is not xp:
        raise TypeError(
            f"{name} is a {namespace_name(xp_x)} array but {owner} works on "
            f"{namespace_name(xp)} arrays; convert it explicitly first"
        )
    dev_x = device(x)
    if dev_x != dev:
        raise ValueError(
            f"{name} is on device {dev_x!r} but {owner} lives on device {dev!r}; "
            "move it explicitly first"
        )
    if x.dtype != dtype:
        check_floating(xp, x, name)
        raise TypeError(
            f"{name} has dtype {x.dtype} but {owner} has dtype {dtype}; cast it explicitly "
            "first (no silent change of precision)"
        )
