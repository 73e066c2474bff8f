"""The deprecated keywords of the static operators' constructors (issue 20's renames)."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from typing import Any

from ._errors import user_stacklevel
from ._validation import check_choice

__all__ = [
    "DYNAMIC_LEGACY",
    "LEGACY_DEFAULTS",
    "NOT_GIVEN",
    "STATIC_LEGACY",
    "legacy_options",
    "legacy_refactor_every",
    "register_sharded_form",
    "sharded_class",
    "sharded_form",
    "show_init_signature",
    "warn_deprecated",
    "warn_no_w",
]

#: The "not used" value of a deprecated keyword for which every value means something.
NOT_GIVEN: Any = object()

#: Keywords that the constructors accept only for the deprecated spellings, with the
#: value that means "not used" (passing it is accepted silently).
LEGACY_DEFAULTS: dict[str, Any] = {
    "overwrite_G": False,
    "out": None,
    "stream_to": None,
    "comm": None,
    "update_method": None,
    # The window's options, now WindowOptions fields: any value given is checked.
    "zero_init": NOT_GIVEN,
    "refactor_every": NOT_GIVEN,
    "check_finite": NOT_GIVEN,
    "refine": NOT_GIVEN,
}

#: The keywords that ``StaticIHVP`` accepts only for the deprecated spellings.
STATIC_LEGACY = ("overwrite_G", "out", "stream_to", "comm")

#: The keywords that ``DynamicIHVP`` accepts only for the deprecated spellings.
DYNAMIC_LEGACY = (
    "comm",
    "update_method",
    "zero_init",
    "refactor_every",
    "check_finite",
    "refine",
)

#: The sharded class of each single-process operator class, registered by the sharded
#: class's module (at package import), so that the single-process modules import none.
_SHARDED_FORMS: dict[type, type[Any]] = {}


def warn_deprecated(old: str, new: str) -> None:
    """A ``DeprecationWarning`` that ``old`` will be removed, naming ``new``, at the user's line.

    Parameters
    ----------
    old, new : str
        The deprecated spelling and the one to use instead.
    """
    warnings.warn(
        f"{old} is deprecated and will be removed; use {new}",
        DeprecationWarning,
        stacklevel=user_stacklevel(),
    )


def legacy_options(owner: str, options: dict[str, Any], accepted: Iterable[str]) -> dict[str, Any]:
    """The deprecated keywords in ``options``, with a ``TypeError`` for any other.

    Parameters
    ----------
    owner : str
        The class's name, for the message.
    options : dict
        The keywords beyond the signature's.
    accepted : iterable of str
        The deprecated keywords that ``owner`` still accepts.

    Returns
    -------
    dict
        Every name of ``accepted`` with its value (its "not used" value when absent).

    Raises
    ------
    TypeError
        For a keyword that is not one of ``accepted``.
    """
    accepted = tuple(accepted)
    for name in options:
        if name not in accepted:
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
    return {name: options.get(name, LEGACY_DEFAULTS[name]) for name in accepted}


def warn_no_w() -> None:
    """The deprecation of ``out=`` and ``overwrite_G=`` (no W is stored), at the user's line."""
    warnings.warn(
        "StaticIHVP stores no W any more (its products read the gradients themselves, "
        "summed in float64): out= and overwrite_G= are ignored and will be removed; G is "
        "kept by reference and must not be modified while the operator is in use",
        DeprecationWarning,
        stacklevel=user_stacklevel(),
    )


def legacy_refactor_every(update_method: Any, refactor_every: Any) -> Any:
    """``refactor_every`` for the deprecated ``update_method=`` (None: not given).

    Parameters
    ----------
    update_method : {None, "incremental", "refactor"}
        The deprecated keyword's value.
    refactor_every : int or None
        The ``refactor_every`` given with it (``None``: not given).

    Returns
    -------
    int or None
        ``0`` (a full factorisation at every update) for ``"refactor"``, else
        ``refactor_every``.

    Raises
    ------
    ValueError
        For another ``update_method``, or a ``refactor_every`` that contradicts it
        (``"refactor"`` with one other than 0, ``"incremental"`` with 0).
    """
    if update_method is None:
        return refactor_every
    check_choice(update_method, "update_method", ("incremental", "refactor"))
    if refactor_every is not None and (update_method == "refactor") != (refactor_every == 0):
        raise ValueError(
            f"update_method={update_method!r} contradicts refactor_every={refactor_every!r} "
            '(update_method="refactor" means refactor_every=0, a full factorisation at '
            'every update; "incremental" means edits): give '
            "options=WindowOptions(refactor_every=...) alone"
        )
    if update_method == "refactor":
        warn_deprecated(
            'update_method="refactor"',
            "options=WindowOptions(refactor_every=0) (a full factorisation at every update)",
        )
        return 0
    warn_deprecated(
        'update_method="incremental"', "the call without it (incremental edits are the default)"
    )
    return refactor_every


def register_sharded_form(single: type, sharded: type) -> None:
    """Let the deprecated ``single(..., comm=comm)`` build ``sharded``.

    Parameters
    ----------
    single, sharded : type
        The single-process operator class and its column-sharded class.
    """
    _SHARDED_FORMS[single] = sharded


def sharded_class(single: type) -> type[Any] | None:
    """The registered sharded class of ``single``, or None.

    Parameters
    ----------
    single : type
        A single-process operator class.

    Returns
    -------
    type or None
        Its column-sharded class.
    """
    return _SHARDED_FORMS.get(single)


def sharded_form(cls: type, spelling: str, options: dict[str, Any]) -> type[Any] | None:
    """The sharded class that the deprecated ``spelling(..., comm=comm)`` builds, or None.

    Warns (``DeprecationWarning``, at the user's line) when ``options`` holds a
    communicator and ``cls`` is a single-process class with a sharded form.

    Parameters
    ----------
    cls : type
        The class called.
    spelling : str
        The deprecated call, for the message (e.g. ``"DynamicIHVP.from_window"``).
    options : dict
        The call's keywords.

    Returns
    -------
    type or None
        The sharded class to build instead of ``cls``.
    """
    sharded = _SHARDED_FORMS.get(cls)
    if sharded is None or options.get("comm") is None:
        return None
    new = spelling.replace(cls.__name__, sharded.__name__, 1)
    warn_deprecated(f"{spelling}(..., comm=comm)", f"{new}(..., comm=comm)")
    return sharded


def show_init_signature(cls: type) -> None:
    """Make help() and the docs show ``cls.__init__``'s signature, not its ``__new__``'s.

    The ``__new__`` of a class with deprecated spellings takes ``*args, **kwargs``.

    Parameters
    ----------
    cls : type
        The class (e.g. :class:`StaticIHVP`, :class:`DynamicIHVP` or a subclass).
    """
    signature = inspect.signature(cls.__dict__["__init__"])
    cls.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:],
        return_annotation=inspect.Signature.empty,
    )
