"""A NumPy-backed operator as a :class:`scipy.sparse.linalg.LinearOperator` (``to_scipy``)."""

from __future__ import annotations

from typing import Any

__all__ = ["SciPyProduct", "scipy_operator"]


def scipy_operator(op: Any) -> Any:
    """SciPy's operator over ``op``'s products, with its shape and dtype.

    The checks (a NumPy-backed operator, not column-sharded) are the caller's.

    Parameters
    ----------
    op : LinearOperator
        A NumPy-backed operator.

    Returns
    -------
    scipy.sparse.linalg.LinearOperator
        Calling ``op``'s ``matvec``, ``matmat``, ``rmatvec`` and ``rmatmat``.
    """
    import scipy.sparse.linalg

    # Module-level callables of bound methods, not closures, so that the result pickles
    # (SciPy's operator keeps them as attributes) whenever the operator does.
    return scipy.sparse.linalg.LinearOperator(
        op.shape,
        matvec=SciPyProduct(op.matvec, op.dtype),
        rmatvec=SciPyProduct(op.rmatvec, op.dtype),
        matmat=SciPyProduct(op.matmat, op.dtype),
        rmatmat=SciPyProduct(op.rmatmat, op.dtype),
        dtype=op.dtype,
    )


class SciPyProduct:
    """One product of a NumPy-backed operator as :meth:`LinearOperator.to_scipy` exports it.

    SciPy's solvers hand in float64 (or complex) work vectors: they are cast to
    the operator's dtype, and a complex one is applied to its real and
    imaginary parts (the operators are real). A class rather than a closure, so
    that the exported operator can be pickled.
    """

    __slots__ = ("apply", "dtype")

    def __init__(self, apply: Any, dtype: Any) -> None:
        self.apply = apply
        self.dtype = dtype

    def __call__(self, x: Any) -> Any:
        import numpy as np

        x = np.asarray(x)
        if np.iscomplexobj(x):
            # A real operator acts on both parts; casting would drop the imaginary one.
            re = self.apply(self._cast(x.real, "the real part of x"))
            im = self.apply(self._cast(x.imag, "the imaginary part of x"))
            return re + 1j * im
        return self.apply(self._cast(x, "x"))

    def _cast(self, x: Any, name: str) -> Any:
        """``x`` in the operator's dtype; a finite value that overflows it is refused.

        Cast to float32 a float64 entry beyond float32's range would become infinity
        (NumPy's warning only), which the operator would then refuse as an infinity
        that ``x`` does not hold, or with ``check_finite=False`` turn into a product
        of infinities and NaN.
        """
        import numpy as np

        narrowing = x.dtype.kind == "f" and x.dtype.itemsize > np.dtype(self.dtype).itemsize
        if not narrowing:
            return np.asarray(x, dtype=self.dtype)
        try:
            # The cast reports its own overflow (an infinity in x is no overflow): nothing
            # more is read on the way through.
            with np.errstate(over="raise"):
                return np.asarray(x, dtype=self.dtype)
        except FloatingPointError:
            with np.errstate(over="ignore"):
                over = np.isinf(np.asarray(x, dtype=self.dtype)) & np.isfinite(x)
        where = np.unravel_index(int(np.argmax(over)), x.shape)
        index = ", ".join(map(str, where))
        raise ValueError(
            f"{name} holds {float(x[where])!r} at [{index}], beyond the range of "
            f"{np.dtype(self.dtype)}, the operator's dtype, to which SciPy's "
            "vectors are cast; rescale the problem, or build the operator in float64"
        ) from None
