"""The exceptions and warnings of :mod:`mfac_core`, at the ground floor of the package.

Every module that raises or catches them imports them from here, so that no
module reaches into another's private names for its error types.
"""

from __future__ import annotations

import os
import sys
from types import FrameType

import numpy as np

__all__ = ["FactorizationError", "IllConditionedWarning", "NotPositiveDefinite", "user_stacklevel"]

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
