"""The exceptions and warnings of :mod:`mfac_core`, at the ground floor of the package.

Every module that raises or catches them imports them from here, so that no
module reaches into another's private names for its error types.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FactorizationError", "IllConditionedWarning", "NotPositiveDefinite"]


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
