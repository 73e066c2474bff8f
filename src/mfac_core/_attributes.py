"""The attributes an operator is built with, which cannot be assigned afterwards.

An operator's factors, set-up checks and bounds were computed with its sizes, dtype
and damping. One assigned afterwards would be reported (``repr``) and used by part of a
product (a refinement's residual, the damping's scale) while the factors still hold the
old value: a silently wrong product. So they are read-only once set, as lineax's and
equinox's modules are frozen; the methods that change one (``DynamicIHVP.set_damp``, a
state's load) recompute what depends on it and set it through :func:`reassign`.
"""

from __future__ import annotations

from typing import Any

#: The attributes every operator of gradients is built with.
BUILT_WITH = ("shape", "dtype", "device", "damp", "num_grads", "dim", "block_size", "storage_dtype")


def set_unless_fixed(obj: Any, name: str, value: Any) -> None:
    """``obj.name = value``, refused for a name of ``type(obj)._fixed`` once it is set.

    The ``__setattr__`` of :class:`~mfac_core.LinearOperator`; classes without
    ``_fixed`` (the composites) set every attribute as usual.

    Parameters
    ----------
    obj : object
        The operator.
    name : str
        The attribute.
    value : object
        Its value.

    Raises
    ------
    AttributeError
        For an attribute of ``_fixed`` that ``obj`` already holds, or one of
        :data:`BUILT_WITH` that its class is not built with (a window's ``block_size``,
        which ``repr`` would then report as if the window were block-wise).
    """
    fixed = getattr(type(obj), "_fixed", None)
    if fixed is not None:
        if name in fixed and name in obj.__dict__:
            raise AttributeError(_refusal(obj, name, "assigned"))
        if name in BUILT_WITH and name not in fixed:
            raise AttributeError(
                f"{type(obj).__name__}.{name} cannot be assigned: the operator is not built "
                "with one"
            )
    object.__setattr__(obj, name, value)


def delete_unless_fixed(obj: Any, name: str) -> None:
    """``del obj.name``, refused for a name of ``type(obj)._fixed``.

    The ``__delattr__`` of :class:`~mfac_core.LinearOperator`: a fixed attribute deleted
    could then be assigned anew, as :func:`set_unless_fixed` refuses only a held one.

    Parameters
    ----------
    obj : object
        The operator.
    name : str
        The attribute.

    Raises
    ------
    AttributeError
        For an attribute of ``_fixed``.
    """
    if name in getattr(type(obj), "_fixed", ()):
        raise AttributeError(_refusal(obj, name, "deleted"))
    object.__delattr__(obj, name)


def reassign(obj: Any, name: str, value: Any) -> None:
    """Set a fixed attribute, once what depends on it is recomputed."""  # numpydoc ignore=PR01
    object.__setattr__(obj, name, value)


def _refusal(obj: Any, name: str, done: str) -> str:
    cls = type(obj).__name__
    message = f"{cls}.{name} cannot be {done}: the operator was built with it"
    if name != "damp":
        return f"{message}; build another operator"
    if hasattr(obj, "set_damp"):
        return f"{message}; set_damp() changes the damping (and refactorises the window)"
    if hasattr(obj, "with_damp"):
        return f"{message}; with_damp() returns the operator of another damping"
    return f"{message}; build another operator (SpectralIHVP.sweep applies several dampings)"
