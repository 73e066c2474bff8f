"""The C extension ``_passes`` as it loaded (or ``None``), and what its callers name.

The one place that imports the extension: the wrappers of :mod:`mfac_core._fused` (the
passes) and :mod:`mfac_core._fused._rows` (a window's row writes) both call it through
:data:`passes`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ISAS", "STORAGES", "available", "best_isa", "isa_code", "passes"]

# Imported by name: the module exists only where the extension was built, and type checkers
# run on source trees with or without it.
passes: Any
try:
    passes = importlib.import_module("._passes", __package__)
except ImportError:  # not built: no C compiler at install time, or another compiler
    passes = None

#: The kernels' instruction sets by name, slowest first; "base" is the compiler's baseline.
ISAS = {"base": 1, "avx2": 2, "avx512": 3}

#: The storage dtypes of project64 and combine64 by name, with the kernels' codes.
STORAGES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}


def available() -> bool:
    """Whether the C extension was built and loads."""
    return passes is not None


def best_isa() -> str | None:
    """The fastest instruction set the kernels run on this CPU, or ``None`` without them."""
    if passes is None:
        return None
    code = passes.best_isa()
    return next(name for name, c in ISAS.items() if c == code)


def isa_code(isa: str | None) -> int:
    """The kernels' code of the instruction set ``isa``; 0 (the fastest) for ``None``."""
    if isa is None:
        return 0
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {sorted(ISAS)} or None, got {isa!r}")
    return ISAS[isa]
