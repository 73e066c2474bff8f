"""mfac_core: matrix-free inverse-Fisher-vector products (M-FAC) for any Array-API library.

The two algorithms of Frantar, Kurtic & Alistarh, "M-FAC: Efficient
Matrix-Free Approximations of Second-Order Information" (NeurIPS 2021), as
linear operators with SciPy's interface over NumPy, CuPy, PyTorch, JAX and
array-api-strict arrays.
"""

from ._dynamic import DynamicIHVP
from ._linalg import FactorizationError, IllConditionedWarning
from ._operator import LinearOperator
from ._static import EmpiricalFisher, StaticIHVP

__version__ = "0.1.0"

__all__ = [
    "DynamicIHVP",
    "EmpiricalFisher",
    "FactorizationError",
    "IllConditionedWarning",
    "LinearOperator",
    "StaticIHVP",
    "__version__",
]
