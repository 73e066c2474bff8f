"""mfac_core: matrix-free inverse-Fisher-vector products (M-FAC) for any Array-API library.

The two algorithms of Frantar, Kurtic & Alistarh, "M-FAC: Efficient
Matrix-Free Approximations of Second-Order Information" (NeurIPS 2021), as
linear operators with SciPy's interface over NumPy, CuPy, PyTorch, JAX and
array-api-strict arrays.
"""

# Registers StaticIHVP's implementation for Dask arrays (dask itself is imported on use).
from . import _dask  # noqa: F401
from ._dynamic import DynamicIHVP
from ._errors import FactorizationError, IllConditionedWarning
from ._linalg import CUPY_LINALG_CHOICES, get_cupy_linalg, set_cupy_linalg
from ._operator import LinearOperator
from ._spectral import SpectralIHVP
from ._static import EmpiricalFisher, StaticIHVP
from ._version import __version__

__all__ = [
    "CUPY_LINALG_CHOICES",
    "DynamicIHVP",
    "EmpiricalFisher",
    "FactorizationError",
    "IllConditionedWarning",
    "LinearOperator",
    "SpectralIHVP",
    "StaticIHVP",
    "__version__",
    "get_cupy_linalg",
    "set_cupy_linalg",
]
