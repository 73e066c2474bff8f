"""The exceptions and warnings of :mod:`mfac_core`, at the ground floor of the package.

Every module that raises or catches them imports them from here, so that no
module reaches into another's private names for its error types. So do the
helpers for an error on its way to the caller: a note added to it
(:func:`add_note`), and the user's iterator it abandons closed
(:func:`close_abandoned`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import numpy as np

__all__ = [
    "FactorizationError",
    "IllConditionedWarning",
    "NotPositiveDefinite",
    "add_note",
    "close_abandoned",
    "user_stacklevel",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class FactorizationError(np.linalg.LinAlgError):
    """A matrix that should be positive definite could not be factorised.

    Subclasses :class:`numpy.linalg.LinAlgError` (and so ``ValueError``). The
    message names the damping and the condition number, the two knobs that
    decide whether the factorisation can succeed.
    """


class IllConditionedWarning(UserWarning):
    """The problem is so ill-conditioned that results may have few correct digits."""


class NotPositiveDefinite(Exception):
    """Internal signal of the linear-algebra backends: a pivot was not positive.

    It never reaches users: the capacitance factor turns it into a
    :class:`FactorizationError` that names the damping and the condition number.
    """


def add_note(exc: BaseException, note: str) -> None:
    """Add ``note`` to ``exc``'s notes, shown after its message in the traceback.

    ``BaseException.add_note`` where Python has it (3.11 and later), so that the
    exception keeps its type and message. Python 3.10 has no notes: ``note`` is
    appended to ``exc.__notes__`` all the same, where 3.11 keeps them (and where
    IPython and the ``exceptiongroup`` backport look), but its tracebacks do not
    show it.

    Parameters
    ----------
    exc : BaseException
        The exception on its way to the caller.
    note : str
        The text to add.
    """
    add = getattr(exc, "add_note", None)
    if callable(add):
        add(note)
        return
    notes = getattr(exc, "__notes__", None)
    exc.__notes__ = [*notes, note] if isinstance(notes, list) else [note]  # type: ignore[attr-defined]


def close_abandoned(items: Iterator[Any], exc: BaseException) -> None:
    """Close the iterator ``items`` that an error abandons, keeping ``exc``.

    A generator's ``finally`` blocks and ``with`` statements (an open file, a
    data loader's workers) otherwise run only when it is collected, which the
    traceback of ``exc`` can put off for as long as the error is kept (a
    notebook's last error), or never, for a generator the caller holds.
    ``close()`` is called where the iterator has one. An error it raises does
    not replace ``exc``, the error the caller needs: it becomes a note of ``exc``.

    Parameters
    ----------
    items : iterator
        The iterator of the user's iterable (a data loader's) left unfinished.
    exc : BaseException
        The error that abandons it, on its way to the caller.
    """
    close = getattr(items, "close", None)
    if not callable(close):
        return
    try:
        close()
    except Exception as error:
        add_note(
            exc,
            f"closing the iterator after this error raised too: {type(error).__name__}: {error}",
        )


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside mfac_core.

    Called by the function that then calls :func:`warnings.warn`: a warning about
    the caller's data (an ill-conditioned problem) should name the caller's line,
    however deep inside the package the condition was found. Frames of the
    frameworks' own wrappers between the user and the package (``torch.optim``'s
    step hooks, ``torch.no_grad``, JAX's tracing) are stepped over too: their
    depth depends on the framework's version, and the user's line is what the
    warning is about.

    Returns
    -------
    int
        The ``stacklevel`` argument for :func:`warnings.warn` in the caller.
    """
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and _inside(frame):
        frame = frame.f_back
        level += 1
    return level


def _inside(frame: FrameType) -> bool:
    """Whether ``frame`` runs code of this package or of a framework's wrappers."""
    if os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        return True
    module = frame.f_globals.get("__name__")
    return isinstance(module, str) and module.split(".", 1)[0] in _FRAMEWORKS


#: The packages whose frames sit between a user's call and this package's code.
_FRAMEWORKS = frozenset({"torch", "jax", "optax"})
