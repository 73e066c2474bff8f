"""The NumPy float64 oracles of :mod:`mfac_core.testing`: dense, spectral and extended-precision.

:func:`to_numpy`, :func:`empirical_fisher_dense`, :func:`dense_inverse`,
:func:`extended_precision_inverse`, :func:`condition_number` and
:class:`SpectralOracle` are public, re-exported and documented by
:mod:`mfac_core.testing`; :func:`as_grads`, :func:`index_numpy` and :func:`blocks`
are the conversions the other oracles (``_testing_paper``) share.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._compat import (
    array_namespace,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_torch_namespace,
)
from ._finite import non_finite_error
from ._summation import sum_in_pairs
from ._validation import check_block_size, check_damp, check_number, scalar_value

# -- conversion ---------------------------------------------------------------------------


def to_numpy(x: Any) -> np.ndarray:
    """An array of any supported library as a NumPy array on the host.

    For tests only: it moves data off devices and out of other libraries,
    which the operators themselves never do. NumPy floating arrays of 4
    bytes or more are returned as they are (no copy); other arrays are copied.

    Parameters
    ----------
    x : array or scalar
        A NumPy, PyTorch, CuPy, JAX or array-api-strict array (on any of
        its devices), or anything :func:`numpy.asarray` accepts.

    Returns
    -------
    numpy.ndarray
        Real floating arrays keep their precision (``float16`` and
        ``bfloat16`` become ``float32``); integer and boolean arrays become
        ``float64``.

    Raises
    ------
    TypeError
        If ``x`` is not numeric (``None``, strings, objects).
    """
    out = _on_host(x, reals=True)
    if out.dtype == np.float16:
        out = out.astype(np.float32)
    elif not np.issubdtype(out.dtype, np.inexact):
        out = out.astype(np.float64)
    return out


def _on_host(x: Any, *, reals: bool = False) -> np.ndarray:
    # ``x`` as a NumPy array of its own dtype, for to_numpy and index_numpy (bfloat16,
    # PyTorch's or ml_dtypes', and PyTorch's float16 become float32). With ``reals``, Python's own
    # real numbers that NumPy holds as objects (an int beyond int64, a Fraction) become
    # float64, as they did before object arrays were refused.
    if isinstance(x, np.ndarray | np.generic | float | int | list | tuple):
        out = np.asarray(x)
    else:
        try:
            xp = array_namespace(x)
        except TypeError:
            xp = None
        if xp is not None and is_torch_namespace(xp):
            t = x.detach().cpu()
            if t.dtype.is_floating_point and t.element_size() < 4:
                t = t.float()
            out = t.numpy()
        elif xp is not None and is_cupy_namespace(xp):
            out = x.get()
        elif xp is not None and is_array_api_strict_namespace(xp):
            import array_api_strict

            out = np.asarray(x.to_device(array_api_strict.Device("CPU_DEVICE")))
        else:  # NumPy, JAX and anything with __array__ or the buffer protocol
            out = np.asarray(x)
    if (
        reals
        and out.dtype == object
        and out.size
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in out.flat)
    ):
        out = out.astype(np.float64)
    if out.dtype.name == "bfloat16":
        # ml_dtypes' (JAX's bfloat16 in NumPy), of kind "V": float32 holds it exactly, as
        # it holds PyTorch's bfloat16 above.
        out = out.astype(np.float32)
    if out.dtype.kind not in "biufc":
        # None, a string or a ragged list: an object array became NaN as float64 (and
        # assert_close(None, None) said "desired holds NaN").
        raise TypeError(
            f"expected an array of numbers, got {type(x).__name__} of dtype {out.dtype}"
        )
    return out


def real_numpy(x: Any, name: str) -> np.ndarray:
    """:func:`to_numpy` of ``x``, refusing a complex array (``TypeError``).

    The oracles compute in real float64; converting a complex array to it would
    drop the imaginary part with only NumPy's ``ComplexWarning``, and a wrong
    complex result would then be compared by its real part alone.

    Parameters
    ----------
    x : array or scalar
        What :func:`to_numpy` accepts.
    name : str
        The argument's name, for the message.

    Returns
    -------
    numpy.ndarray
        ``to_numpy(x)``.

    Raises
    ------
    TypeError
        If ``x`` is complex.
    """
    out = to_numpy(x)
    if np.iscomplexobj(out):
        raise TypeError(
            f"{name} must be real (the oracles and the operators are real), got {out.dtype}"
        )
    return out


def index_numpy(x: Any, name: str, bound: int) -> np.ndarray:
    """Integer indices in ``[0, bound)`` of any library as an int64 NumPy array.

    Refused as the operators' ``entries`` refuse them: a float index is not
    truncated (2.7 is not taken as 2), nor a bool taken as 0 or 1, nor a negative
    index counted from the end.

    Parameters
    ----------
    x : array or scalar
        Of any library :func:`to_numpy` accepts (Python ints and lists of them too).
    name : str
        The argument's name, for the messages.
    bound : int
        The number of rows (and columns) indexed.

    Returns
    -------
    numpy.ndarray
        ``x`` as int64.

    Raises
    ------
    TypeError
        If ``x`` does not have an integer dtype (a bool or float one included).
    IndexError
        For an index outside ``[0, bound)``.
    """
    out = _on_host(x)
    if out.dtype == np.bool_ or not np.issubdtype(out.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {out.dtype}")
    if out.size:
        # The bounds are compared as Python ints: a uint64 index beyond int64's range
        # must not wrap to a negative one first.
        lo, hi = int(out.min()), int(out.max())
        if lo < 0 or hi >= bound:
            raise IndexError(
                f"{name} holds an index out of range [0, {bound}): {lo if lo < 0 else hi}"
            )
    return out.astype(np.int64)


def as_grads(G: Any) -> np.ndarray:
    """Return gradients of any library as a non-empty float64 NumPy array.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row, of any library :func:`to_numpy` accepts.

    Returns
    -------
    numpy.ndarray, shape (m, d)
        ``G`` in float64 on the host.

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array, or holds NaN or infinity.
    TypeError
        If ``G`` is complex.
    """
    G = np.asarray(real_numpy(G, "G"), dtype=np.float64)
    if G.ndim != 2 or G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(f"G must be a non-empty 2-D array (m, d), got shape {G.shape}")
    # As the operators refuse them: NaN gradients gave condition_number 1.0 (max(1.0, nan)),
    # a NaN dense inverse, and a "singular" extended solve.
    error = non_finite_error(np, G, "G")
    if error is not None:
        raise error
    return G


def blocks(d: int, block_size: int | None) -> Iterator[slice]:
    """Consecutive blocks of ``block_size`` coordinates; the last may be shorter.

    Parameters
    ----------
    d : int
        The number of coordinates.
    block_size : int or None
        The block size, or ``None`` for one block of all ``d``.

    Yields
    ------
    slice
        The coordinates of each block, in order.

    Raises
    ------
    ValueError
        If ``block_size`` is below 1.
    TypeError
        If ``block_size`` is not an int (a float is not truncated, a bool not taken as 1).
    """
    b = check_block_size(block_size, d)
    for start in range(0, d, b):
        yield slice(start, min(start + b, d))


# -- dense oracles -------------------------------------------------------------------------


def empirical_fisher_dense(G: Any, damp: float, *, block_size: int | None = None) -> np.ndarray:
    """The damped empirical Fisher ``F = damp I + G^T G / m`` as a dense float64 matrix.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda``.
    block_size : int, optional
        Keep only the diagonal blocks of this many consecutive coordinates
        (the last block may be shorter); ``None`` keeps the full matrix.

    Returns
    -------
    numpy.ndarray, shape (d, d)
        ``F`` in float64, zero outside the diagonal blocks.

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array or holds NaN or infinity,
        ``block_size < 1``, or ``damp`` is NaN or infinite (0 and negative
        dampings are taken).
    TypeError
        If ``G`` is complex, or ``damp`` is not a real number.
    """
    G = as_grads(G)
    # Any finite damping, 0 and negative ones included (a test of a singular F); NaN
    # or infinity gave a NaN or infinite F without an error.
    damp = check_number(scalar_value(damp), "damp")
    m, d = G.shape
    F = np.zeros((d, d))
    for s in blocks(d, block_size):
        Gb = G[:, s]
        F[s, s] = Gb.T @ Gb / m
    F[np.diag_indices(d)] += damp
    return F


def dense_inverse(G: Any, damp: float, *, block_size: int | None = None) -> np.ndarray:
    """The dense float64 inverse of :func:`empirical_fisher_dense`, block by block.

    Accurate to about ``eps(float64) * kappa``; use :class:`SpectralOracle`
    when the condition number is large.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda``.
    block_size : int, optional
        Invert only the diagonal blocks of this many consecutive coordinates
        (the last block may be shorter); ``None`` inverts the full matrix.

    Returns
    -------
    numpy.ndarray, shape (d, d)
        ``F^{-1}`` in float64, symmetrised block by block and zero outside
        the diagonal blocks.

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array or holds NaN or infinity,
        ``block_size < 1``, or ``damp`` is NaN or infinite.
    TypeError
        If ``G`` is complex, or ``damp`` is not a real number.
    numpy.linalg.LinAlgError
        If a block of ``F`` is exactly singular in float64, as it can be
        for ``damp <= 0``, or for a damping below ``eps(float64)`` times the
        gradients' squared norms where they are rank-deficient.
    """
    F = empirical_fisher_dense(G, damp, block_size=block_size)
    out = np.zeros_like(F)
    for s in blocks(F.shape[0], block_size):
        Fb = F[s, s]
        inv = np.linalg.solve(Fb, np.eye(Fb.shape[0]))
        out[s, s] = (inv + inv.T) / 2
    return out


def extended_precision_inverse(
    G: Any, damp: float, x: Any, *, block_size: int | None = None
) -> np.ndarray:
    """Apply ``F^{-1}`` to ``x`` in extended precision, for an error reference.

    All in ``numpy.longdouble`` (80-bit extended precision on x86-64, about 3
    more digits than float64; on platforms where ``longdouble`` is float64 it
    is no better than float64), block by block, each block in the form that
    is stable for it at any damping:

    - a block of ``B > m`` coordinates by Woodbury's identity,
      ``F_b^{-1} x_b = (x_b - G_b^T C^{-1} G_b x_b) / damp`` with the
      ``m x m`` capacitance matrix ``C = G_b G_b^T + m damp I``;
    - a block of ``B <= m`` coordinates by solving with the ``B x B`` block
      ``F_b = damp I + G_b^T G_b / m`` itself. Woodbury's subtraction would
      cancel there: for gradients of full column rank ``F_b^{-1} x_b`` is of
      the size ``m ||x_b|| / mu_min(G_b^T G_b)``, far below the two terms'
      ``||x_b|| / damp`` when the damping is tiny.

    Both systems are symmetric positive definite and solved by Gaussian
    elimination without pivoting. The sums over the coordinates (``G_b G_b^T``
    and ``G_b x_b``) go in levels: products of 256 coordinates, added in pairs.
    The relative error is a small multiple of ``eps(longdouble) * kappa``, with
    ``kappa`` from :func:`condition_number` with the same ``block_size``, for
    any ``d``. Costs ``O(m d min(m, b))`` arithmetic, with ``b`` the block
    size (``d`` for the full matrix), in NumPy's ``longdouble`` loops rather
    than BLAS: for small problems.

    Parameters
    ----------
    G : array_like, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda > 0``.
    x : array_like, shape (d,)
        The vector.
    block_size : int, optional
        Apply the inverse of the block-diagonal F over consecutive blocks of
        this many coordinates (the last block may be shorter), as
        :func:`dense_inverse` does; ``None`` applies the full matrix's.

    Returns
    -------
    numpy.ndarray, shape (d,)
        ``F^{-1} x`` rounded to float64.

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array or holds NaN or infinity, ``x``
        has another shape than ``(d,)``, ``damp`` is not finite and positive,
        or ``block_size < 1``.
    TypeError
        If ``damp`` is not a real number, ``block_size`` not an int, or ``G``
        or ``x`` is complex.
    numpy.linalg.LinAlgError
        If a block's system is singular in extended precision (a pivot that
        is not positive): only where ``eps(longdouble) * kappa`` is about 1
        or more, and no digit of the result could be trusted.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core.testing import dense_inverse, extended_precision_inverse
    >>> G = np.random.default_rng(0).standard_normal((3, 8))
    >>> x = np.ones(8)
    >>> bool(np.allclose(extended_precision_inverse(G, 0.5, x), dense_inverse(G, 0.5) @ x))
    True
    >>> got = extended_precision_inverse(G, 0.5, x, block_size=2)
    >>> bool(np.allclose(got, dense_inverse(G, 0.5, block_size=2) @ x))
    True
    """
    LD = np.longdouble
    Gl = as_grads(G).astype(LD)
    damp = check_damp(damp)
    xl = np.asarray(real_numpy(x, "x"), dtype=LD)
    m, d = Gl.shape
    if xl.shape != (d,):
        raise ValueError(f"x must have shape ({d},), got {xl.shape}")
    lam = LD(damp)
    out = np.empty(d, dtype=LD)
    for s in blocks(d, block_size):
        Gb, xb = Gl[:, s], xl[s]
        size = Gb.shape[1]
        if size <= m:
            Fb = (Gb.T @ Gb) / LD(m) + lam * np.eye(size, dtype=LD)
            out[s] = _solve_spd(Fb, xb.copy())
        else:
            C, p = _gram_and_projection(Gb, xb)
            C += LD(m) * lam * np.eye(m, dtype=LD)
            out[s] = (xb - Gb.T @ _solve_spd(C, p)) / lam
    return np.asarray(out, dtype=np.float64)


#: Coordinates of one partial product of :func:`_gram_and_projection`.
_TERMS = 256


def _gram_and_projection(Gb: np.ndarray, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # NumPy's longdouble matmul sums an entry's d products one after the other. Where they
    # have one sign and size (gradients with a shared mean, x near their span) the roundings
    # lean one way: two float32 gradients at d = 4e6 left the reference 180 eps(float32) off
    # at kappa = 1e7, more than the operators it judged. So: products of _TERMS
    # coordinates, summed as a balanced tree.
    def parts() -> Iterator[np.ndarray]:
        for c in range(0, Gb.shape[1], _TERMS):
            Gc = Gb[:, c : c + _TERMS]
            yield np.concatenate((Gc @ Gc.T, (Gc @ xb[c : c + _TERMS])[:, None]), axis=1)

    total = sum_in_pairs(parts())
    return total[:, :-1], total[:, -1]


def _solve_spd(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    # A z = b for a symmetric positive definite A by Gaussian elimination without pivoting
    # (stable for such A), in A's dtype: NumPy's solvers have no longdouble. A and b are
    # overwritten. A pivot that is not positive means A is singular to this precision:
    # refused, where dividing by it gave NaN or infinity with only a RuntimeWarning.
    n = A.shape[0]
    for k in range(n):
        if not A[k, k] > 0:
            raise np.linalg.LinAlgError(
                "F is singular in extended precision (a pivot of its solve is not positive): "
                "its condition number is about 1 / eps(longdouble) or more"
            )
        f = A[k + 1 :, k] / A[k, k]
        A[k + 1 :, k:] -= f[:, None] * A[k, k:]
        b[k + 1 :] -= f * b[k]
    z = np.zeros(n, dtype=A.dtype)
    for k in range(n - 1, -1, -1):
        z[k] = (b[k] - A[k, k + 1 :] @ z[k + 1 :]) / A[k, k]
    return z


def condition_number(G: Any, damp: float, *, block_size: int | None = None) -> float:
    """The exact 2-norm condition number of F (the largest over its blocks), in float64.

    With blocks this is the largest condition number of a diagonal block, not
    ``cond(F)`` of the assembled block-diagonal matrix (which can be larger):
    the rounding errors of each block's product scale with its own condition
    number, so this is the scale of the normwise error.

    For a block with a null space (more coordinates than gradients, or
    rank-deficient gradients) this is ``1 + lambda_max(G_b G_b^T) / (m damp)``,
    the scale of the rounding errors of the M-FAC products. A block of
    ``B <= m`` coordinates whose gradients have full column rank is better
    conditioned: ``(damp + mu_max / m) / (damp + mu_min / m)`` with ``mu`` the
    eigenvalues of ``G_b^T G_b``; that is what is returned for it. A
    computation in the Woodbury form does not profit from that: its errors
    scale with ``1 + lambda_max(G_b G_b^T) / (m damp)`` on every block
    (:func:`paper_static`, :func:`paper_dynamic`, and
    :class:`~mfac_core.DynamicIHVP`, which always takes it), which is the
    ``kappa`` to give :func:`assert_close` for them.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row.
    damp : float
        The damping ``lambda > 0``.
    block_size : int, optional
        Consider the diagonal blocks of this many consecutive coordinates
        (the last block may be shorter); ``None`` takes the full matrix.

    Returns
    -------
    float
        The condition number, at least 1: the largest over the blocks.

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array or holds NaN or infinity,
        ``block_size < 1``, or ``damp`` is not finite and positive.
    TypeError
        If ``G`` is complex.
    """
    G = as_grads(G)
    m, d = G.shape
    lam = check_damp(damp)  # at 0 the ratio divides by zero; below, it is no kappa
    kappa = 1.0
    # The singular values over sqrt(m damp), squared: (1 + t_max^2) / (1 + t_min^2) is kappa
    # without forming G_b^T G_b, which overflowed for gradients of 1e160 (kappa inf where it
    # is 1e21 at damp 1e300) and resolves mu_min only to eps * mu_max (a rank-deficient
    # block's came out as rounding above the damping: 1.25e17 where kappa is 2.1e17).
    root = math.sqrt(m) * math.sqrt(lam)
    for s in blocks(d, block_size):
        Gb = G[:, s]
        sv = np.linalg.svd(Gb, compute_uv=False)
        with np.errstate(over="ignore"):  # a kappa beyond float64's range is inf
            t = sv / root
            hi = float(np.square(t[0]))
        lo = float(np.square(t[-1])) if Gb.shape[1] <= m else 0.0
        kappa = max(kappa, (1.0 + hi) / (1.0 + lo) if math.isfinite(hi) else math.inf)
    return kappa


@dataclass(frozen=True)
class _SpectralBlock:
    sl: slice
    V: np.ndarray  # (size, r), orthonormal columns
    coef: np.ndarray  # (r,), the eigenvalues of F_b^{-1} on span(V)
    projector: bool  # whether F_b^{-1} also has the eigenvalue 1/damp on span(V)^perp


class SpectralOracle:
    r"""``F^{-1}`` in float64 from the eigen-decomposition of each block's Gram matrix.

    For a block of ``B > m`` coordinates, ``G_b G_b^T = U diag(sigma) U^T``
    (``m x m``, ``eigh``); with ``V = G_b^T U diag(sigma)^{-1/2}``
    (eigenvalues at most ``max(m, B) * eps * sigma_max`` are dropped: they
    lie in the null space of ``G_b`` to working precision),

    .. math::

        F_b^{-1} = \lambda^{-1} (I - V V^T)
                   + V \,\mathrm{diag}\big(1 / (\lambda + \sigma/m)\big)\, V^T ,

    a form without cancellation between the two terms' coefficients. Its
    relative error is a small multiple of ``eps(float64) * kappa``,
    whatever the damping, unlike a dense solve with F. A block of
    ``B <= m`` coordinates may have no null space, and then the projector
    ``I - V V^T`` would only add rounding errors of size ``eps / lambda``;
    such a block uses the eigenvectors ``Q`` of the ``B x B`` block
    (``eigh``) and ``F_b^{-1} = Q diag(1/f) Q^T`` with the eigenvalues
    recomputed as ``f_i = lambda + ||G_b q_i||^2 / m``, accurate to a small
    multiple of ``eps(float64) * kappa`` too: the damping is added to values
    computed without it, so that a null space of rank-deficient gradients
    keeps the eigenvalue ``1 / lambda`` however small the damping, and a
    generic vector's result stays accurate there as well.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row (converted to NumPy float64).
    damp : float
        The damping ``lambda > 0``.
    block_size : int, optional
        Block-diagonal F over consecutive blocks of this many coordinates.

    Attributes
    ----------
    shape : tuple
        ``(d, d)``.
    kappa : float
        The exact 2-norm condition number of F, the largest over the blocks
        (:func:`condition_number`).
    damp, num_grads, dim, block_size
        lambda, m, d and the block size (``d`` for the full matrix).

    Raises
    ------
    ValueError
        If ``G`` is not a non-empty 2-D array or holds NaN or infinity,
        ``damp`` is not finite and positive, or ``block_size < 1``.
    TypeError
        If ``G`` is complex, or ``block_size`` is not an int.
    """

    def __init__(self, G: Any, damp: float, *, block_size: int | None = None) -> None:
        G = as_grads(G)
        m, d = G.shape
        lam = check_damp(damp)
        self.damp, self.num_grads, self.dim = lam, m, d
        self.block_size = check_block_size(block_size, d)
        self.shape = (d, d)
        eps = float(np.finfo(np.float64).eps)
        self._blocks: list[_SpectralBlock] = []
        for s in blocks(d, block_size):
            Gb = G[:, s]
            size = Gb.shape[1]
            if size <= m:
                Fb = Gb.T @ Gb / m
                Fb[np.diag_indices(size)] += lam
                _, Q = np.linalg.eigh(Fb)
                # The eigenvalues as damp + |G_b q|^2 / m, not eigh's: where the gradients
                # are rank-deficient, F_b's smallest eigenvalue (damp) is lost in rounding
                # at a tiny damping and came out 0 or negative (1 / f divided by zero or
                # flipped a sign), and even at kappa 4e11 it was off enough to cost a generic
                # vector's result log10(kappa) digits. |G_b q| of a null-space q is only
                # rounding, so damp is kept there; elsewhere it is accurate to eps relatively.
                f = lam + np.sum((Gb @ Q) ** 2, axis=0) / m
                self._blocks.append(_SpectralBlock(s, Q, 1.0 / f, False))
                continue
            sigma, U = np.linalg.eigh(Gb @ Gb.T)
            smax = max(float(sigma[-1]), 0.0)
            keep = sigma > max(m, size) * eps * smax
            sigma, U = sigma[keep], U[:, keep]
            V = (Gb.T @ U) / np.sqrt(sigma)
            self._blocks.append(_SpectralBlock(s, V, 1.0 / (lam + sigma / m), True))
        # Not f[-1] / f[0] of the eigenvalues of F_b: where the gradients are rank-deficient
        # and the damping tiny, f[0] (damp) is lost in rounding and may come out negative,
        # which made kappa 1 where it is 4e16 (condition_number keeps the null space's damp).
        self.kappa = condition_number(G, lam, block_size=block_size)

    def matmat(self, X: Any) -> np.ndarray:
        """Apply ``F^{-1}`` to the columns of a matrix.

        Parameters
        ----------
        X : array, shape (d, k)
            Of any supported library (converted to NumPy float64).

        Returns
        -------
        numpy.ndarray, shape (d, k)
            ``F^{-1} X`` in float64.

        Raises
        ------
        ValueError
            If ``X`` does not have shape ``(d, k)``.
        TypeError
            If ``X`` is complex.
        """
        X = np.asarray(real_numpy(X, "X"), dtype=np.float64)
        if X.ndim != 2 or X.shape[0] != self.dim:
            raise ValueError(f"X must have shape ({self.dim}, k), got {X.shape}")
        out = np.empty_like(X)
        for b in self._blocks:
            Xb = X[b.sl]
            P = b.V.T @ Xb
            out[b.sl] = b.V @ (b.coef[:, None] * P)
            if b.projector:
                out[b.sl] += (Xb - b.V @ P) / self.damp
        return out

    def matvec(self, x: Any) -> np.ndarray:
        """Apply ``F^{-1}`` to a vector.

        Parameters
        ----------
        x : array, shape (d,) or (d, 1)
            Of any supported library (converted to NumPy float64).

        Returns
        -------
        numpy.ndarray, shape (d,) or (d, 1)
            ``F^{-1} x`` in float64, in the shape of ``x``.

        Raises
        ------
        ValueError
            If ``x`` has another shape.
        TypeError
            If ``x`` is complex.
        """
        x = np.asarray(real_numpy(x, "x"), dtype=np.float64)
        if x.ndim == 2 and x.shape[1] == 1:
            return self.matmat(x)
        if x.ndim != 1:
            raise ValueError(f"x must have shape ({self.dim},), got {x.shape}")
        return self.matmat(x[:, None])[:, 0]

    def diagonal(self) -> np.ndarray:
        """Return the diagonal of ``F^{-1}``.

        Returns
        -------
        numpy.ndarray, shape (d,)
            The diagonal entries ``[F^{-1}]_{jj}`` in float64.
        """
        out = np.empty(self.dim)
        for b in self._blocks:
            V2 = b.V * b.V
            out[b.sl] = V2 @ b.coef
            if b.projector:
                out[b.sl] += (1.0 - V2.sum(axis=1)) / self.damp
        return out

    def entries(self, rows: Any, cols: Any) -> np.ndarray:
        """Return selected entries ``[F^{-1}][rows[k], cols[k]]``.

        Parameters
        ----------
        rows, cols : array of int
            Row and column indices in ``[0, d)``, of the same shape, of any
            supported library.

        Returns
        -------
        numpy.ndarray
            The entries in float64, in the shape of ``rows``; entries that
            couple two different blocks are zero.

        Raises
        ------
        TypeError
            If ``rows`` or ``cols`` does not have an integer dtype (as for the
            operators, a float index is not truncated nor a bool taken as 0 or 1).
        ValueError
            If ``rows`` and ``cols`` have different shapes.
        IndexError
            For an index outside ``[0, d)`` (a negative one included).
        """
        r = index_numpy(rows, "rows", self.dim)
        c = index_numpy(cols, "cols", self.dim)
        if r.shape != c.shape:
            raise ValueError(f"rows and cols must have the same shape, got {r.shape}, {c.shape}")
        out = np.zeros(r.shape)
        B = self.block_size
        for idx in np.ndindex(r.shape):
            i, j = int(r[idx]), int(c[idx])
            if i // B != j // B:
                continue
            b = self._blocks[i // B]
            vi, vj = b.V[i - b.sl.start], b.V[j - b.sl.start]
            out[idx] = (vi * vj) @ b.coef
            if b.projector:
                out[idx] += (float(i == j) - vi @ vj) / self.damp
        return out

    def todense(self) -> np.ndarray:
        """Build the dense inverse.

        Returns
        -------
        numpy.ndarray, shape (d, d)
            ``F^{-1}`` in float64, zero outside the diagonal blocks.
        """
        out = np.zeros(self.shape)
        for b in self._blocks:
            n = b.sl.stop - b.sl.start
            out[b.sl, b.sl] = (b.V * b.coef) @ b.V.T
            if b.projector:
                out[b.sl, b.sl] += (np.eye(n) - b.V @ b.V.T) / self.damp
        return out

    def __repr__(self) -> str:
        return (
            f"<SpectralOracle d={self.dim} m={self.num_grads} damp={self.damp:g} "
            f"block_size={self.block_size} kappa={self.kappa:.3g}>"
        )


# Re-exported by mfac_core.testing, under whose name they are documented, doctested and pickled.
for _public in (
    to_numpy,
    empirical_fisher_dense,
    dense_inverse,
    extended_precision_inverse,
    condition_number,
    SpectralOracle,
):
    _public.__module__ = "mfac_core.testing"
