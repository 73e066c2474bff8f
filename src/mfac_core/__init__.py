"""mfac_core: matrix-free inverse-Fisher-vector products (M-FAC) for any Array-API library.

The two algorithms of Frantar, Kurtic & Alistarh, "M-FAC: Efficient
Matrix-Free Approximations of Second-Order Information" (NeurIPS 2021), as
linear operators with SciPy's interface over NumPy, CuPy, PyTorch, JAX and
array-api-strict arrays.
"""

import importlib
from typing import Any

# DaskStaticIHVP imports dask on use only.
from ._dask import DaskStaticIHVP
from ._dynamic import DynamicIHVP
from ._dynamic_setup import WindowOptions
from ._errors import FactorizationError, IllConditionedWarning
from ._linalg import CUPY_LINALG_CHOICES, get_cupy_linalg, set_cupy_linalg
from ._operator import LinearOperator
from ._sharded_dynamic import ShardedDynamicIHVP
from ._sharded_ihvp import ShardedStaticIHVP
from ._spectral import SpectralIHVP
from ._static import EmpiricalFisher, StaticIHVP
from ._version import __version__

__all__ = [
    "CUPY_LINALG_CHOICES",
    "DaskStaticIHVP",
    "DynamicIHVP",
    "EmpiricalFisher",
    "FactorizationError",
    "IllConditionedWarning",
    "LinearOperator",
    "ShardedDynamicIHVP",
    "ShardedStaticIHVP",
    "SpectralIHVP",
    "StaticIHVP",
    "WindowOptions",
    "__version__",
    "get_cupy_linalg",
    "set_cupy_linalg",
]

#: Public submodules that need nothing beyond the core dependencies: loaded on first
#: attribute access (as SciPy's are), so ``mfac_core.pruning`` works after ``import
#: mfac_core`` without the cost of importing them all up front.
_LAZY_SUBMODULES = frozenset({"cli", "distributed", "pruning", "scipy", "testing"})

#: Public submodules that need an optional library: imported explicitly, never here.
_OPTIONAL_SUBMODULES = {"torch": "PyTorch", "jax": "JAX and optax"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _OPTIONAL_SUBMODULES:
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r}: import {__name__}.{name} "
            f"explicitly (it needs {_OPTIONAL_SUBMODULES[name]})"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)
