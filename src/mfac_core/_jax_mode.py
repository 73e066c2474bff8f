"""JAX's 64-bit mode, which the operators' m x m work needs: the one check and its wording.

Without the mode JAX turns float64 into float32 with only a warning. The mode is
read again at each public call (:mod:`mfac_core._finite`'s call wrapper), not only
at construction: an operator built inside ``jax.enable_x64(True)`` and used after it
would otherwise compute its float64 sums in float32, silently.
"""

from __future__ import annotations

from typing import Any

from ._compat import is_jax_namespace

__all__ = ["check_float64_available", "check_operator_mode", "x64_off_error"]


def check_float64_available(xp: Any) -> None:
    """Refuse a JAX namespace without 64-bit mode: the m x m work needs float64.

    Without it JAX turns float64 into float32 with only a warning, which would
    factorise the capacitance matrix in float32, never what the precision
    statements assume.
    """
    if not is_jax_namespace(xp):
        return
    import jax

    if not jax.config.read("jax_enable_x64"):
        raise x64_off_error("mfac_core")


def check_operator_mode(op: Any) -> None:
    """:func:`check_float64_available` for a call of ``op``, if it holds gradients.

    An operator of gradients (it has ``num_grads``), or a composite of one (its ``A`` or
    ``args``), does float64 work; another subclass of ``LinearOperator`` (a user's)
    computes as it likes.
    """
    xp = getattr(op, "_xp", None)
    if xp is not None and is_jax_namespace(xp) and _holds_gradients(op):
        check_float64_available(xp)


def _holds_gradients(op: Any) -> bool:
    if getattr(op, "num_grads", None) is not None:
        return True
    parts = (*getattr(op, "args", ()), getattr(op, "A", None))
    return any(_holds_gradients(part) for part in parts if part is not None)


def x64_off_error(what: str) -> RuntimeError:
    """The one wording of JAX's 64-bit mode being off, for the function ``what``."""
    return RuntimeError(
        f"{what} does its m x m work in float64, which needs JAX's 64-bit mode; it is "
        'off. Enable it at start-up with jax.config.update("jax_enable_x64", True), or '
        "around both the tracing and the calls (or the operator's construction) with "
        "`with jax.enable_x64(True): ...`. float32 gradients and parameters stay float32 "
        "in that mode."
    )
