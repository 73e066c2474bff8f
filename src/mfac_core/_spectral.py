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

The class is a documented shell over functions of its state: the set-up and the
derived operators (``_spectral_setup``), the groups' products and spectra
(``_spectral_groups``), the forms (``_spectral_forms``) and the samples
(``_spectral_sample``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._attributes import BUILT_WITH
from ._compat import Array
from ._finite import float32_overflow_once
from ._gradient_repr import gradient_items
from ._operator import LinearOperator
from ._spectral_forms import checked_rows, forms_of
from ._spectral_groups import Group, applied, checked_power, diagonal_of, logdet_of, trace_of
from ._spectral_sample import drawn
from ._spectral_setup import build, derived, sweep_damps
from ._torch_compile import eager_methods_under_torch_compile
from ._validation import check_count, check_damp

__all__ = ["SpectralIHVP"]


@eager_methods_under_torch_compile("__init__", "with_damp", "sqrt", "inv_sqrt", "inverse", "sample")
class SpectralIHVP(LinearOperator):
    r"""``F^{-1}`` (and ``F^{-1/2}``, ``F^{1/2}``, ``F``) from the eigenvalues of the Gram.

    The same inverse as :class:`~mfac_core.StaticIHVP`, for
    ``F = damp * I + G.T @ G / m`` (optionally block-diagonal), built from the
    float64 eigen-decomposition of the Gram ``G G^T = U diag(Lambda) U^T``
    instead of a Cholesky factor, in the same one pass over G (O(d m^2)). What
    the spectral form adds is that every function of F is known for every damping:

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
        The largest condition number of F's diagonal blocks (not ``cond`` of the whole
        block-diagonal F, which can be larger), exact from the eigenvalues (docs/beyond.rst).
    error_scale : float
        ``1 + max Lambda / (m damp)``, an upper bound of ``kappa`` over the
        whole operator: the factor of ``eps(float64)`` in the part of a
        product's error that does not come from its final rounding (see Notes).

    Raises
    ------
    ValueError
        For a G that is not 2-D, empty, or holds NaN/inf (a ``FactorizationError``
        with ``check_finite=False``), for ``damp <= 0``, ``block_size < 1``, and where F's
        largest eigenvalue passes float64's range (also at a damping of ``with_damp``, a sweep).
    TypeError
        For an integer or complex G, a G that is not an array, or a Dask
        array (the set-up's eigendecomposition has no Dask version).

    See Also
    --------
    StaticIHVP : The Cholesky form of the same inverse.

    Notes
    -----
    With ``c_i = 1 / (m damp + Lambda_i)``,

    .. math::

        F^{-1} x = \big(x - G^\top U \mathrm{diag}(c)\, U^\top G x\big) / \lambda ,

    which has no factorisation to fail: any damping works. Both passes over G read it in its
    storage dtype and sum in float64, the m x m work is float64, and each result is rounded
    once: a product, a diagonal entry or a sweep is within 8 ``eps(float32)`` of the exact
    result for the Fisher of the stored gradients for ``kappa`` up to 1e6 (docs/beyond.rst,
    "Precision", for the cases beyond). A warning says where ``eps(float64) kappa a`` reaches
    1/32, ``a`` the first-order amplification of its spectrum (1 for blocks no wider than m,
    docs/mathematics.rst). Blocks no wider than m are applied from the float64 eigenpairs of
    their ``B x B`` matrix ``G_b^T G_b``, without a pass over G.

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

    # Set by ``_spectral_setup.build``.
    num_grads: int
    dim: int
    block_size: int
    storage_dtype: str | None
    power: float
    damp: float
    kappa: float
    error_scale: float
    _fixed = (*BUILT_WITH, "power", "kappa", "error_scale")
    _groups: tuple[Group, ...]

    def __init__(
        self, G: Array, /, *, damp: float, block_size: int | None = None, check_finite: bool = True
    ) -> None:
        build(self, G, damp=damp, block_size=block_size, check_finite=check_finite)

    def _repr_options(self) -> tuple[str, ...]:
        # Derived operators share the class: the power and the damping tell them apart.
        return gradient_items(self, power=self.power)

    # -- damping, spectrum and derived operators (``_spectral_setup.derived``) -----------------

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
            For a damping that is not a finite positive real number, or too large for F.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import SpectralIHVP, StaticIHVP
        >>> G = np.random.default_rng(0).standard_normal((4, 20))
        >>> op = SpectralIHVP(G, damp=1.0).with_damp(1e-3)
        >>> bool(np.allclose(op.diagonal(), StaticIHVP(G, damp=1e-3).diagonal()))
        True
        """
        return derived(self, damp=check_damp(damp, num_grads=self.num_grads))

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
        return derived(self, power=checked_power(self.power, self.power / 2, "sqrt"))

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
        return derived(self, power=checked_power(self.power, -self.power / 2, "inv_sqrt"))

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
        return derived(self, power=-self.power)

    @float32_overflow_once
    def logdet(self) -> float:
        """``log det`` of this operator (``-log det F`` for ``F^{-1}``), in O(m) per block.

        A sum over the ``min(B, m)`` largest eigenvalues of each block's Gram, in float64
        (docs/beyond.rst, "Closed forms").

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

    @float32_overflow_once
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
        return trace_of(self._xp, self._groups, self.num_grads, self.damp, self.power)

    @float32_overflow_once
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
        return trace_of(self._xp, self._groups, self.num_grads, self.damp, -self.power)

    # -- products ------------------------------------------------------------------------------

    def _matmat(self, X: Array) -> Array:
        return applied(self._xp, self._groups, X, [self.damp], self.power)[0, ...]

    @float32_overflow_once
    def sweep(self, x: Array, /, *, damps: Sequence[float]) -> Array:
        """Apply this power of F at each of K dampings to ``x``.

        ``G x`` once, then, for one vector, all K results from one more read of G; a matrix
        ``x`` reads G once more per damping (docs/beyond.rst, "What each operation costs").

        Parameters
        ----------
        x : array, shape (d,) or (d, k)
            In the operator's namespace, device and dtype (float32 is promoted for a float64
            operator).
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

        Warns
        -----
        IllConditionedWarning
            As the constructor, where a damping below the operator's leaves no digit.

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
        x = self._check_input(x, "x", self.dim, (1, 2))  # before the dampings' warning
        dl = sweep_damps(self, damps)
        Y = applied(self._xp, self._groups, x if x.ndim == 2 else x[:, None], dl, self.power)
        return Y if x.ndim == 2 else Y[..., 0]

    @float32_overflow_once
    def diagonal(self, *, damps: Sequence[float] | None = None) -> Array:
        """The diagonal of this operator, at its damping or at each of K dampings, in O(d m^2).

        ``f(damp) + sum_i h_i (U^T g_j)_i^2`` for the columns ``g_j`` of G, whitened in float64
        a bounded piece at a time (O(d m^2) BLAS-3 work); all K dampings share one pass over G
        (docs/beyond.rst, "What each operation costs").

        Parameters
        ----------
        damps : sequence or 1-d array of float, optional
            The K dampings; ``None`` (default) uses the operator's.

        Returns
        -------
        array, shape (d,), or (K, d) when ``damps`` is given
            In the operator's namespace, dtype and device.

        Raises
        ------
        TypeError, ValueError
            For ``damps`` that are not a non-empty sequence of finite dampings > 0.

        Warns
        -----
        IllConditionedWarning
            As the constructor, where a damping below the operator's leaves no digit.

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
        # The operator's own damping was checked and warned of when it was set.
        dl = [self.damp] if damps is None else sweep_damps(self, damps)
        out = diagonal_of(self._xp, self._groups, dl, self.power)
        return out[0, ...] if damps is None else out

    # -- bilinear and quadratic forms (``_spectral_forms``) ------------------------------------

    @float32_overflow_once
    def bilinear(self, Q: Array, R: Array, /, *, batch_size: int | None = None) -> Array:
        r"""``Q A R^T`` for this operator A (``Q F^{-1} R^T``), without a d x d array.

        Q is projected once, R a batch of rows at a time, onto float64 coordinates (one pass
        over G each): the temporaries are ``(p + n_batch) x m`` per block (docs/beyond.rst,
        "What each operation costs").

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
            For inputs of another library, device, dtype or width, or a ``batch_size`` below 1.

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
        Q, R = checked_rows(self, Q, "Q"), checked_rows(self, R, "R")
        return forms_of(self, batch_size).bilinear(Q, R)

    @float32_overflow_once
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
            For an input of another library, device, dtype or width, or a ``batch_size`` below 1.

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
        return forms_of(self, batch_size).quadratic(checked_rows(self, R, "R"))

    # -- sampling (``_spectral_sample``) -------------------------------------------------------

    def sample(self, n: int, /, *, rng: Any) -> Array:
        """``n`` draws from ``N(0, A)`` for this operator A (``N(0, F^{-1})``), O(d m) each.

        ``A^{1/2} z`` for standard normal ``z`` drawn on the operator's device in its library,
        so ``A`` must be ``F^{-1}`` or ``F`` (a square root exists in closed form).

        Parameters
        ----------
        n : int
            The number of samples, ``>= 0``.
        rng : generator, key or int
            The caller's source of randomness in the operator's library: a
            :class:`numpy.random.Generator`, a :class:`torch.Generator` on the operator's
            device, a JAX PRNG key (``jax.random.key`` or ``PRNGKey``, used as given: split it
            yourself for further draws), a ``cupy.random.Generator``, or an int seed ``>= 0``
            for a new one (below ``2**64`` for PyTorch, ``2**63`` for JAX: what their generators
            take without wrapping); array-api-strict (no generator) takes a NumPy Generator or
            seed and copies the draws to the operator's device.

        Returns
        -------
        array, shape (n, d)
            One sample per row, in the operator's namespace, dtype and device.

        Raises
        ------
        TypeError
            For a generator of another library.
        ValueError
            For a negative ``n``, a seed out of its library's range, or an operator that is not
            ``F^{-1}`` or ``F`` (``power = ±1/2``, from :meth:`sqrt` or :meth:`inv_sqrt`), whose
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
        return drawn(self, check_count(n, "n", minimum=0), rng)
