r"""The spectral form of the static operator: powers of F from the eigenvalues of the Gram.

With the float64 eigen-decomposition ``G_b G_b^T = U diag(Lambda) U^T`` of
each block's m x m Gram (the same one pass over G as the Cholesky set-up), every
power ``f(F) = F^p`` has the closed form

    f(F_b) = f(damp) I + G_b^T U diag(h) U^T G_b,
    h_i = (f(damp + mu_i) - f(damp)) / Lambda_i,   mu_i = Lambda_i / m,

for *any* damping: changing the damping changes the m coefficients ``h``, not the
set-up. The products go through G itself, summed in float64 by the pass engine
(``_spectral_groups``, ``_engine``); blocks no wider than m use the eigenpairs of
their s x s ``G_b^T G_b`` instead. The spectrum of ``F_b`` is ``damp + mu_i`` for the
``k = min(B, m)`` largest ``Lambda`` and ``damp`` on the other ``B - k`` directions,
which gives log-determinants and traces in O(m) per block.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _capacitance, _engine
from ._compat import (
    Array,
    detached,
    device,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    namespace_name,
)
from ._layout import BlockGroup, block_groups, checked_gram, chunks
from ._operator import LinearOperator
from ._spectral_groups import (
    ColumnEigen,
    Forms,
    GramEigen,
    applied,
    checked_power,
    logdet_of,
    spectrum_bounds,
    trace_of,
)
from ._validation import (
    check_block_size,
    check_count,
    check_damp,
    check_dampings,
    check_finite,
    check_flag,
    check_float64_available,
    check_gradients,
    check_operand,
    half_dtype_name,
)

__all__ = ["SpectralIHVP"]

#: A group of blocks of the spectral form (``_spectral_groups``).
_Group = GramEigen | ColumnEigen


class SpectralIHVP(LinearOperator):
    r"""``F^{-1}`` (and ``F^{-1/2}``, ``F^{1/2}``, ``F``) from the eigenvalues of the Gram.

    The same inverse as :class:`~mfac_core.StaticIHVP`, for
    ``F = damp * I + G.T @ G / m`` (optionally block-diagonal), built from the
    float64 eigen-decomposition of the Gram ``G G^T = U diag(Lambda) U^T``
    instead of a Cholesky factor. The set-up costs the same one pass over G
    (O(d m^2)); the operator keeps G by reference, and every product reads it
    in its storage dtype and sums in float64. What the spectral form adds is
    that every function of F is known for every damping:

    :meth:`with_damp` (O(m)), :meth:`sweep` and ``diagonal(damps=...)`` (K
    dampings in one pass over G); :meth:`logdet`, :meth:`trace`,
    :meth:`trace_inverse` (O(m) per block); :meth:`sqrt`, :meth:`inv_sqrt`
    and :meth:`sample` (O(d m) per sample); :meth:`bilinear` and
    :meth:`quadratic` forms of stacks of vectors, without a d x d array.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row, as for :class:`~mfac_core.StaticIHVP`
        (2-byte storage computes and returns float32; G is kept by reference:
        do not write to it while this operator, or one derived from it, is in
        use).
    damp : float
        The damping ``lambda > 0``.
    block_size : int, optional
        Block-diagonal F over consecutive blocks of this many coordinates
        (the last block may be shorter). ``None`` (default) uses the full F.
    check_finite : bool, optional
        Check G, and later each input, for NaN and infinity (default ``True``).

    Attributes
    ----------
    shape : tuple
        ``(d, d)``.
    dtype, device
        The result dtype (G's, or float32 for 2-byte G) and G's device.
    storage_dtype : str or None
        ``"float16"`` or ``"bfloat16"`` for 2-byte G, else ``None``.
    num_grads, dim, damp, block_size
        m, d, lambda and the block size (``d`` for the full operator).
    power : float
        The operator is ``F ** power``: -1 for the constructor's result, -0.5,
        0.5 or 1 for the results of :meth:`sqrt`, :meth:`inv_sqrt` and
        :meth:`inverse`.
    kappa : float
        The condition number of F (the largest over the blocks), from the
        eigenvalues: ``(damp + Lambda_max/m) / (damp + Lambda_min/m)`` with
        ``Lambda_min`` the smallest of the ``min(B, m)`` largest eigenvalues
        of a block of B coordinates, or 0 when ``B > m``.
    error_scale : float
        ``1 + max Lambda / (m damp)``, an upper bound of ``kappa`` over the
        whole operator: the factor of ``eps(float64)`` in the part of a
        product's error that does not come from its final rounding (see Notes).

    Raises
    ------
    ValueError
        For a G that is not 2-D, empty, or holds NaN/inf, for ``damp <= 0``
        and for ``block_size < 1``.
    TypeError
        For an integer or complex G, or a G that is not an array.

    See Also
    --------
    StaticIHVP : The Cholesky form of the same inverse.

    Notes
    -----
    With ``c_i = 1 / (m damp + Lambda_i)``,

    .. math::

        F^{-1} x = \big(x - G^\top U \mathrm{diag}(c)\, U^\top G x\big) / \lambda ,

    which has no factorisation to fail: any damping works. Both passes over G
    read it in its storage dtype and sum in float64, the m x m work is float64,
    and each result is rounded once, so a product, a diagonal entry or a sweep
    is within 8 ``eps(float32)`` of the exact result for the Fisher of the
    stored float32 (or 2-byte) gradients for ``kappa`` up to 1e6, and up to
    1e7 for gradients with a shared mean and independent spread; beyond, the
    float64 eigen-decomposition's own rounding, about ``eps(float64) *
    kappa^1.5`` for vectors in the gradients' span, takes over (nearly
    collinear gradients: about 50 ``eps(float32)`` at 1e7; docs/mathematics.rst,
    "Exact passes"). A warning says where ``eps(float64) * kappa`` reaches 1. Blocks no
    wider than m are applied from the float64 eigenpairs of their ``B x B``
    matrix ``G_b^T G_b`` (O(B) per coordinate), without a pass over G.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import SpectralIHVP
    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((8, 50))
    >>> op = SpectralIHVP(G, damp=0.1)
    >>> F = 0.1 * np.eye(50) + G.T @ G / 8
    >>> x = rng.standard_normal(50)
    >>> bool(np.allclose(F @ op.matvec(x), x))
    True
    >>> bool(np.isclose(op.logdet(), -np.linalg.slogdet(F)[1]))
    True
    >>> half = op.sqrt()                      # F^{-1/2}
    >>> bool(np.allclose(half @ (half @ x), op @ x))
    True
    """

    # Set by ``_built``.
    num_grads: int
    dim: int
    block_size: int
    storage_dtype: str | None
    power: float
    damp: float
    kappa: float
    error_scale: float
    _groups: tuple[_Group, ...]

    def __init__(
        self, G: Array, /, *, damp: float, block_size: int | None = None, check_finite: bool = True
    ) -> None:
        _built(self, G, damp=damp, block_size=block_size, check_finite=check_finite)

    # -- damping, spectrum and derived operators -----------------------------------------------

    def _set_damp(self, damp: float) -> None:
        self.damp = damp
        self.error_scale, self.kappa = spectrum_bounds(self._xp, self._groups, self.num_grads, damp)

    def _warn_if_hopeless(self) -> None:
        # The passes are exact to the result's rounding; what remains is the float64
        # m x m work, good to about eps(float64) * error_scale.
        _capacitance.warn_if_passes_hopeless(self.kappa, damp=self.damp)

    def _derived(self, *, damp: float | None = None, power: float | None = None) -> SpectralIHVP:
        # A shallow copy shares G and the eigenpairs: O(m) per group, never O(d m).
        new = copy.copy(self)
        if power is not None:
            new.power = power
        if damp is not None:
            new._set_damp(damp)
            new._warn_if_hopeless()
        return new

    def with_damp(self, damp: float, /) -> SpectralIHVP:
        """The same power of F at another damping, sharing the set-up (O(m)).

        Parameters
        ----------
        damp : float
            The new damping ``> 0``; any value works (no factorisation).

        Returns
        -------
        SpectralIHVP
            The operator for ``F = damp I + G^T G / m``.

        Raises
        ------
        TypeError, ValueError
            For a damping that is not a finite positive real number.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP, StaticIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=1.0).with_damp(1e-3)
        >>> bool(np.allclose(op.diagonal(), StaticIHVP(G, damp=1e-3).diagonal()))
        True
        """
        return self._derived(damp=check_damp(damp))

    def sqrt(self) -> SpectralIHVP:
        """The square root of this operator: ``F^{-1/2}`` for ``F^{-1}``, ``F^{1/2}`` for ``F``.

        Returns
        -------
        SpectralIHVP
            Sharing the set-up; ``sqrt() @ sqrt()`` equals this operator.

        Raises
        ------
        ValueError
            For an operator that is already a square root (``power = ±1/2``).

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> R = op.sqrt().todense()
        >>> bool(np.allclose(R @ R, op.todense()))
        True
        """
        return self._derived(power=self._power_checked(self.power / 2, "sqrt"))

    def inv_sqrt(self) -> SpectralIHVP:
        """The inverse square root of this operator: ``F^{1/2}`` for ``F^{-1}``.

        Returns
        -------
        SpectralIHVP
            Sharing the set-up; ``inv_sqrt() @ inv_sqrt()`` is the inverse of this operator.

        Raises
        ------
        ValueError
            For an operator that is already a square root (``power = ±1/2``).

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> S = SpectralIHVP(G, damp=0.5).inv_sqrt().todense()
        >>> bool(np.allclose(S @ S, 0.5 * np.eye(20) + G.T @ G / 4))
        True
        """
        return self._derived(power=self._power_checked(-self.power / 2, "inv_sqrt"))

    def inverse(self) -> SpectralIHVP:
        """The inverse of this operator (``F`` for ``F^{-1}``), sharing the set-up.

        Returns
        -------
        SpectralIHVP
            The operator of the opposite power, sharing the set-up (O(m)).

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> F = SpectralIHVP(G, damp=0.5).inverse()
        >>> bool(np.allclose(F.todense(), 0.5 * np.eye(20) + G.T @ G / 4))
        True
        """
        return self._derived(power=-self.power)

    def _power_checked(self, power: float, what: str) -> float:
        return checked_power(self.power, power, what)

    def logdet(self) -> float:
        """``log det`` of this operator (``-log det F`` for ``F^{-1}``), in O(m) per block.

        ``log det F = sum_b [B log(damp) + sum_{i <= min(B, m)} log1p(Lambda_i / (m damp))]``
        over the ``min(B, m)`` largest eigenvalues of each block's Gram, in float64.

        Returns
        -------
        float
            The log-determinant, summed in float64.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> bool(np.isclose(op.logdet(), np.linalg.slogdet(op.todense())[1]))
        True
        """
        return self.power * logdet_of(self._xp, self._groups, self.num_grads, self.damp)

    def _trace(self, power: float) -> float:
        return trace_of(self._xp, self._groups, self.num_grads, self.damp, power)

    def trace(self) -> float:
        """The trace of this operator (``tr F^{-1}`` for ``F^{-1}``), in O(m) per block.

        Returns
        -------
        float
            A sum of positive float64 terms, accurate to a few ``eps(float64)``
            relative to the eigenvalues.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> bool(np.isclose(op.trace(), np.trace(op.todense())))
        True
        """
        return self._trace(self.power)

    def trace_inverse(self) -> float:
        """The trace of this operator's inverse (``tr F`` for ``F^{-1}``), in O(m) per block.

        Returns
        -------
        float
            The trace, summed in float64.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> bool(np.isclose(op.trace_inverse(), 0.5 * 20 + np.sum(G * G) / 4))
        True
        """
        return self._trace(-self.power)

    # -- products ------------------------------------------------------------------------------

    def _apply(self, X: Array, damps: list[float]) -> Array:
        """``f_k(F) X`` for every damping, stacked: ``(K, d, k)``, one pass over G per group."""
        return applied(self._xp, self._groups, X, damps, self.power)

    def _matmat(self, X: Array) -> Array:
        return self._apply(X, [self.damp])[0, ...]

    def _matvec(self, x: Array) -> Array:
        return self._apply(x[:, None], [self.damp])[0, :, 0]

    def sweep(self, x: Array, /, *, damps: Sequence[float]) -> Array:
        """Apply this power of F at each of K dampings to ``x``.

        ``G x`` once, then, for one vector, all K results from one more read of
        G (docs/beyond.rst, "Speed"; block by block for up to 64 blocks per
        group); a matrix ``x``, or a group of more blocks, reads G once more
        per damping.

        Parameters
        ----------
        x : array, shape (d,) or (d, k)
            In the operator's namespace, device and dtype (float32 is
            promoted for a float64 operator).
        damps : sequence or 1-d array of float
            The K dampings ``> 0``.

        Returns
        -------
        array, shape (K, d) or (K, d, k)
            ``result[j]`` is ``F_j^{power} x`` with ``F_j = damps[j] I + G^T G / m``.

        Raises
        ------
        TypeError, ValueError
            For an input of another library, device, dtype or shape, or bad dampings.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=1.0)
        >>> x = np.ones(20)
        >>> Y = op.sweep(x, damps=[0.1, 1.0])
        >>> Y.shape, bool(np.allclose(Y[1], op @ x))
        ((2, 20), True)
        """
        dl = check_dampings(damps)
        x = self._check_input(x, "x", self.dim, (1, 2))
        if x.ndim == 2:
            return self._apply(x, dl)
        return self._apply(x[:, None], dl)[..., 0]

    def diagonal(self, *, damps: Sequence[float] | None = None) -> Array:
        """The diagonal of this operator, at its damping or at each of K dampings, in O(d m).

        ``f(damp) + sum_i h_i (U^T g_j)_i^2`` for the columns ``g_j`` of G,
        whitened in float64 a bounded piece at a time (O(d m^2) BLAS-3 work, the
        cost a stored ``U^T G`` would have had at set-up); all K dampings share
        one pass over G. Blocks no wider than m: ``sum_i Q_ji^2 f(damp + mu_i/m)``
        from their own eigenpairs, O(B) per coordinate.

        Parameters
        ----------
        damps : sequence or 1-d array of float, optional
            The K dampings; ``None`` (default) uses the operator's.

        Returns
        -------
        array, shape (d,), or (K, d) when ``damps`` is given
            In the operator's namespace, dtype and device.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=1.0)
        >>> D = op.diagonal(damps=[0.1, 1.0])
        >>> D.shape, bool(np.allclose(D[1], np.diag(op.todense())))
        ((2, 20), True)
        """
        dl = [self.damp] if damps is None else check_dampings(damps)
        parts = [g.diagonal(dl, self.power) for g in self._groups]
        out = parts[0] if len(parts) == 1 else self._xp.concat(parts, axis=1)
        return out[0, ...] if damps is None else out

    # -- bilinear and quadratic forms ----------------------------------------------------------

    def _rows(self, A: Array, name: str) -> Any:
        A = check_operand(self._xp, self.device, self.dtype, A, name, owner=repr(self))
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(
                f"{name} must have shape (n, {self.dim}), one vector per row; got {tuple(A.shape)}"
            )
        if self.check_finite:
            check_finite(self._xp, A, name)
        return A

    def _forms(self, batch_size: int | None) -> Forms:
        """The operator's bilinear and quadratic forms, ``batch_size`` rows of R at a time."""
        if batch_size is None:
            # Bounded temporaries: about 2**22 entries of the coordinates (or of R in float64).
            # On an accelerator the engine's one device piece (_engine.piece_entries).
            blocks = sum(g.group.count for g in self._groups)
            entries = _engine.piece_entries(
                self._xp, _anchor(self._groups[0]), host=_engine.LARGE_PIECE_ENTRIES
            )
            step = max(1, entries // max(self.num_grads * blocks, self.dim))
        else:
            step = check_count(batch_size, "batch_size")
        return Forms(self._xp, self._groups, self.damp, self.power, step, self.dtype, self.device)

    def bilinear(self, Q: Array, R: Array, /, *, batch_size: int | None = None) -> Array:
        r"""``Q A R^T`` for this operator A (``Q F^{-1} R^T``), without a d x d array.

        ``f(damp) Q R^T + sum_b (B_b Q_b^T)^T diag(w_b) (B_b R_b^T)`` with the
        float64 coordinates ``B_b = U_b^T G_b`` (one pass over G each): Q is
        projected once, R a batch of rows at a time, so the temporaries are
        ``(p + n_batch) x m`` per block; the m-sized contractions are float64.

        Parameters
        ----------
        Q : array, shape (p, d)
            Vectors in the rows (for instance gradients of test losses).
        R : array, shape (n, d)
            Vectors in the rows (for instance per-example training gradients).
        batch_size : int, optional
            Rows of R per batch; by default chosen to bound the temporaries.

        Returns
        -------
        array, shape (p, n)
            In the operator's namespace, dtype and device.

        Raises
        ------
        TypeError, ValueError
            For inputs of another library, device, dtype or width.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> rng = np.random.default_rng(0)
        >>> G = rng.standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> Q, R = rng.standard_normal((2, 20)), rng.standard_normal((3, 20))
        >>> bool(np.allclose(op.bilinear(Q, R), Q @ op.todense() @ R.T))
        True
        """
        Q, R = self._rows(Q, "Q"), self._rows(R, "R")
        return self._forms(batch_size).bilinear(Q, R)

    def quadratic(self, R: Array, /, *, batch_size: int | None = None) -> Array:
        """``diag(R A R^T)`` for this operator A: ``r^T F^{-1} r`` for each row r of R.

        Parameters
        ----------
        R : array, shape (n, d)
            Vectors in the rows.
        batch_size : int, optional
            Rows of R per batch; by default chosen to bound the temporaries.

        Returns
        -------
        array, shape (n,)
            In the operator's namespace, dtype and device.

        Raises
        ------
        TypeError, ValueError
            For an input of another library, device, dtype or width.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> rng = np.random.default_rng(0)
        >>> G = rng.standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=0.5)
        >>> R = rng.standard_normal((3, 20))
        >>> bool(np.allclose(op.quadratic(R), np.diag(R @ op.todense() @ R.T)))
        True
        """
        return self._forms(batch_size).quadratic(self._rows(R, "R"))

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, n: int, /, *, rng: Any) -> Array:
        """``n`` draws from ``N(0, A)`` for this operator A (``N(0, F^{-1})``), O(d m) each.

        ``A^{1/2} z`` for standard normal ``z`` drawn on the operator's device
        in its library, so ``A`` must be ``F^{-1}`` or ``F`` (a square root
        exists in closed form).

        Parameters
        ----------
        n : int
            The number of samples, ``>= 0``.
        rng : generator, key or int
            The caller's source of randomness, per library:

            - NumPy: a :class:`numpy.random.Generator`, or an int seed for
              :func:`numpy.random.default_rng`;
            - PyTorch: a :class:`torch.Generator` on the operator's device, or
              an int seed for a new one;
            - JAX: a PRNG key (``jax.random.key`` or ``PRNGKey``), used as given
              (split it yourself for further draws), or an int seed;
            - CuPy: a ``cupy.random.Generator``, or an int seed;
            - array-api-strict (which has no generator): a NumPy Generator or
              seed; the draws are copied to the operator's device.

        Returns
        -------
        array, shape (n, d)
            One sample per row, in the operator's namespace, dtype and device.

        Raises
        ------
        TypeError
            For a generator of another library.
        ValueError
            For a negative ``n``, or an operator that is not ``F^{-1}`` or ``F``
            (``power = ±1/2``, from :meth:`sqrt` or :meth:`inv_sqrt`), whose
            square root has no closed form.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> X = SpectralIHVP(G, damp=0.5).sample(3, rng=np.random.default_rng(1))
        >>> X.shape
        (3, 20)
        """
        return _drawn(self, check_count(n, "n", minimum=0), rng)


def _drawn(op: SpectralIHVP, n: int, rng: Any) -> Array:
    """The body of :meth:`SpectralIHVP.sample`: ``A^{1/2} z`` for n standard normal z."""
    if op.power not in (-1.0, 1.0):
        # The draws are A^{1/2} z: say so in terms of sample(), not of the sqrt() inside.
        raise ValueError(
            f"sample() draws from N(0, A) for A = F^-1 or F (power -1 or 1), through "
            f"A's square root; this operator is F**{op.power:g} (from sqrt() or "
            f"inv_sqrt()), whose square root F**{op.power / 2:g} has no closed form; "
            "sample from the operator it was derived from"
        )
    Z = _standard_normal(op._xp, rng, (op.dim, n), op.dtype, op.device)
    return op.sqrt()._matmat(Z).T


def _is_seed(rng: Any) -> bool:
    """An integer seed (Python or NumPy integers), never a bool (``True`` is no seed)."""
    return isinstance(rng, numbers.Integral) and not isinstance(rng, (bool, np.bool_))


def _not_a_generator(rng: Any, kind: str, name: str) -> TypeError:
    return TypeError(
        f"rng must be {kind} or an int seed for {name} operators, got {type(rng).__name__}"
    )


def _standard_normal(xp: Any, rng: Any, shape: tuple[int, int], dtype: Any, dev: Any) -> Any:
    """Standard normal draws of ``shape`` in namespace ``xp`` on ``dev``, from the caller's rng."""
    name = namespace_name(xp)
    if is_numpy_namespace(xp) or is_array_api_strict_namespace(xp):
        gen = np.random.default_rng(int(rng)) if _is_seed(rng) else rng
        if not isinstance(gen, np.random.Generator):
            raise _not_a_generator(rng, "a numpy.random.Generator", name)
        npdt = np.float32 if dtype == xp.float32 else np.float64
        Z = gen.standard_normal(shape, dtype=npdt)
        return Z if is_numpy_namespace(xp) else xp.asarray(Z, device=dev)
    if is_torch_namespace(xp):
        import torch

        gen = torch.Generator(device=dev).manual_seed(int(rng)) if _is_seed(rng) else rng
        if not isinstance(gen, torch.Generator):
            raise _not_a_generator(rng, "a torch.Generator", "torch")
        return torch.randn(shape, generator=gen, dtype=dtype, device=dev)
    if is_jax_namespace(xp):
        import jax

        key = jax.random.key(int(rng)) if _is_seed(rng) else rng
        if not isinstance(key, jax.Array):
            raise _not_a_generator(rng, "a JAX PRNG key", "jax")
        return jax.device_put(jax.random.normal(key, shape, dtype=dtype), dev)
    if is_cupy_namespace(xp):
        import cupy

        gen = cupy.random.default_rng(int(rng)) if _is_seed(rng) else rng
        if not isinstance(gen, cupy.random.Generator):
            raise _not_a_generator(rng, "a cupy.random.Generator", "cupy")
        with cupy.cuda.Device(dev.id):
            return gen.standard_normal(shape, dtype=dtype)
    raise TypeError(f"sample() has no random number generator for {name} arrays")


def _built(op: SpectralIHVP, G: Array, *, damp: Any, block_size: Any, check_finite: Any) -> None:
    """The body of :class:`SpectralIHVP`'s constructor: the checks, the set-up, the state."""
    check_finite = check_flag(check_finite, "check_finite")
    G = detached(G)  # the operator stores G, never its autograd graph
    xp = check_gradients(G, require_finite=False, half=True)
    damp = check_damp(damp)
    check_float64_available(xp)
    m, d = (int(n) for n in G.shape)
    bs = check_block_size(block_size, d)
    storage = half_dtype_name(xp, G.dtype)
    dtype = G.dtype if storage is None else xp.float32
    groups = _setup(xp, G, block_groups(d, bs), dtype=dtype, damp=damp, check_finite=check_finite)
    LinearOperator.__init__(
        op,
        shape=(d, d),
        dtype=dtype,
        xp=xp,
        device=device(G),
        symmetric=True,
        check_finite=check_finite,
    )
    op.num_grads, op.dim, op.block_size = m, d, bs
    op.storage_dtype = storage
    op._groups = groups
    op.power = -1.0
    op._set_damp(damp)
    op._warn_if_hopeless()


def _anchor(group: _Group) -> Array:
    """An array of ``group`` on the operator's device, for the engine's piece rule."""
    return group.U if isinstance(group, GramEigen) else group.Q


def _setup(
    xp: Any,
    G: Array,
    groups: tuple[BlockGroup, ...],
    *,
    dtype: Any,
    damp: float,
    check_finite: bool,
) -> tuple[_Group, ...]:
    """Each group's float64 eigenpairs, chunk by chunk, in one pass over G.

    The chunk's Grams are summed in float64 over column pieces (products of float32
    or 2-byte values are exact in float64), then decomposed by ``eigh``; blocks no
    wider than m decompose their ``G_b^T G_b`` instead (``_spectral_groups``).
    """
    m = G.shape[0]
    # StaticIHVP's set-up rule: on the host at most 32 MiB and 1/64 of G's entries (the
    # peak memory stays near size(G)); on an accelerator one device piece.
    width = _engine.gram_piece_width(xp, G)

    def rows(X: Array) -> Array:
        return X @ xp.matrix_transpose(X)

    def columns(X: Array) -> Array:
        return xp.matrix_transpose(X) @ X

    out: list[_Group] = []
    for g in groups:
        dense = g.size <= m
        vals, vecs = [], []
        for chunk in chunks(g, max(width, g.size) if dense else width):
            gram = checked_gram(xp, G, g, chunk, columns if dense else rows, check=check_finite)
            if not check_finite and not bool(xp.all(xp.isfinite(xp.linalg.diagonal(gram)))):
                # Unchecked NaN or infinity in G: eigh would fail with a bare LinAlgError
                # (or return NaN). Each off-diagonal entry is bounded by the diagonal's,
                # so O(m) of work tells, and the error is StaticIHVP's.
                raise _capacitance.factorization_error(damp, (math.inf, math.inf))
            lam, U = xp.linalg.eigh(gram)
            vals.append(xp.clip(lam, min=0.0))
            vecs.append(U)
        lams = vals[0] if len(vals) == 1 else xp.concat(vals, axis=0)
        U = vecs[0] if len(vecs) == 1 else xp.concat(vecs, axis=0)
        out.append(ColumnEigen(g, U, lams, m, dtype) if dense else GramEigen(g, G, U, lams, dtype))
    return tuple(out)
