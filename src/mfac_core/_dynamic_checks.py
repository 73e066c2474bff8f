"""The checks of a gradient inserted into a :class:`~mfac_core.DynamicIHVP` window.

Shape, library and dtype are checked at once; the value checks (NaN, infinity,
the range of 2-byte storage) need one number read from the device, which a step
may defer to read with its other checks in one transfer (``_dynamic_factor.judge``).
"""

from __future__ import annotations

import math
from typing import Any

from ._compat import Array, detached
from ._validation import check_operand


class Refused(ValueError):
    """A gradient refused for its values; ``finite`` tells a range error from NaN/infinity."""

    def __init__(op, message: str, *, finite: bool) -> None:
        super().__init__(message)
        op.finite = finite


def check_gradient(op: Any, g: Array, *, deferred: bool = False, finite: bool = False) -> Any:
    """``g`` checked (shape, library, dtype; NaN, infinity and range where asked).

    NaN and infinity are refused with ``check_finite`` or ``finite``. With
    ``deferred``, returns ``(g, pending)``: the value checks need a number read
    from the device, which ``pending`` (``(g, max |g|, refuse NaN)``, the maximum
    a 0-d array; or None) leaves to ``_dynamic_factor.judge``, so that a step reads all its
    checks at once.
    """
    # The window stores gradients, never their autograd history.
    g = detached(check_operand(op._xp, op.device, op.dtype, g, "g", owner=repr(op)))
    if g.ndim != 1 or g.shape[0] != op.dim:
        raise ValueError(f"g must have shape ({op.dim},), got {tuple(g.shape)}")
    finite = finite or op.check_finite
    needed = finite or op.storage_dtype is not None
    # A rank of a sharded window may hold no coordinates: nothing to check.
    pending = (g, op._xp.max(op._xp.abs(g)), finite) if needed and g.shape[0] else None
    if deferred:
        return g, pending
    if pending is not None:
        judge_gradient(op, g, float(pending[1]), finite=finite)
    return g


def judge_gradient(op: Any, g: Array, biggest: float, *, finite: bool) -> None:
    """Raise if ``g``, whose largest magnitude is ``biggest``, is refused.

    NaN and infinity propagate to ``biggest``: one number decides both checks.
    They are refused with ``finite``, and always by a 2-byte window.
    """
    if finite and not math.isfinite(biggest):
        raise Refused("g must not contain NaN or infinity", finite=False)
    if op.storage_dtype is not None:
        check_representable(op, g, biggest)


def check_representable(op: Any, g: Array, biggest: float) -> None:
    """Refuse a gradient that the 2-byte storage would turn into infinity."""
    xp = op._xp
    info = xp.finfo(op._G.dtype)
    top, eps = float(info.max), float(info.eps)
    # Magnitudes from the largest finite value plus half its spacing upwards round
    # to infinity (the spacing there is 2**emax * eps, and top = (2 - eps) 2**emax).
    limit = top + top * eps / (2 * (2 - eps))
    if not biggest < limit:
        if not math.isfinite(biggest):  # a NaN or infinity given is reported as such
            raise Refused("g must not contain NaN or infinity", finite=False)
        raise Refused(
            f"g does not fit the window's {op.storage_dtype} storage: an entry "
            f"({biggest:g}) overflows its range (largest finite {top:g}); scale the "
            "gradients or store them in a wider dtype",
            finite=True,
        )
