"""The static M-FAC operators: F = damp I + G^T G / m and its inverse.

An operator here is a block layout (``_layout``) plus, for the inverse, one
factor object per group of blocks (``_group_factors``) that the streaming
set-up (``_setup``) builds once; products, the diagonal and single entries only
route rows to those factors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from . import _capacitance, _engine, _setup, _store, _streaming
from ._attributes import BUILT_WITH
from ._compat import Array, device, stored
from ._deprecation import (
    STATIC_LEGACY,
    legacy_options,
    sharded_class,
    sharded_form,
    show_init_signature,
    warn_deprecated,
    warn_no_w,
)
from ._dtypes import compute_dtype, half_dtype_name
from ._finite import float32_overflow_once, narrowed
from ._gradient_repr import gradient_items
from ._group_factors import GroupFactor
from ._jax_mode import check_float64_available
from ._layout import block_groups
from ._operator import LinearOperator
from ._refine import fisher_residual, refine
from ._torch_compile import eager_methods_under_torch_compile
from ._validation import (
    check_block_size,
    check_count,
    check_damp,
    check_flag,
    check_gradients,
    check_index_array,
)

__all__ = [
    "EmpiricalFisher",
    "StaticIHVP",
    "register_array_type",
    "show_init_signature",
    "static_ihvp",
]

#: ``(accepts(G), subclass)`` pairs: ``StaticIHVP(G, ...)`` builds the first subclass
#: whose predicate accepts G. ``_dask`` registers the Dask operator here (at package
#: import), so that this module needs no import of it.
_OTHER_ARRAYS: list[tuple[Callable[[Any], bool], type[StaticIHVP]]] = []


def register_array_type(accepts: Callable[[Any], bool], subclass: type[StaticIHVP]) -> None:
    """Let ``StaticIHVP(G, ...)`` build ``subclass`` for the G that ``accepts(G)`` is true for.

    Parameters
    ----------
    accepts : callable
        A predicate on G (e.g. "is a Dask array").
    subclass : type
        A subclass of :class:`StaticIHVP` whose ``__init__`` takes StaticIHVP's arguments.
    """
    _OTHER_ARRAYS.append((accepts, subclass))


def static_ihvp(G: Array, /, **options: Any) -> StaticIHVP:
    """The static inverse of G in G's own implementation (Dask's for a Dask G), no warning.

    For library code that takes any G (e.g. ``pruning.prune``): users build
    :class:`StaticIHVP` or its Dask subclass explicitly.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients.
    **options
        :class:`StaticIHVP`'s keywords.

    Returns
    -------
    StaticIHVP
        The operator (a :class:`~mfac_core.DaskStaticIHVP` for a Dask G).
    """
    for accepts, subclass in _OTHER_ARRAYS:
        if accepts(G):
            return subclass(G, **options)
    return StaticIHVP(G, **options)


class _BlockOperatorBase(LinearOperator):
    """What the forward and inverse operators share: G's sizes, damp and the block layout."""

    _fixed = BUILT_WITH

    def _init_layout(
        self,
        G: Array,
        damp: Any,
        block_size: Any,
        check: bool,
        check_G: bool = True,
        half: bool = False,
        inverse: bool = True,
    ) -> Any:
        xp = check_gradients(G, require_finite=check and check_G, half=half)
        check_float64_available(xp)
        m, d = G.shape
        # An inverse's capacitance matrix carries the shift m damp; F itself does not.
        self.damp = check_damp(damp, num_grads=int(m) if inverse else None)
        self.num_grads, self.dim = int(m), int(d)
        self.block_size = check_block_size(block_size, d)
        self._groups = block_groups(d, self.block_size)
        #: The 2-byte storage dtype's name ("float16", "bfloat16"), or None; with one the
        #: operator computes, and returns results, in float32.
        self.storage_dtype = half_dtype_name(xp, G.dtype)
        dtype = compute_dtype(xp, G)
        super().__init__(
            shape=(d, d), dtype=dtype, xp=xp, device=device(G), symmetric=True, check_finite=check
        )
        return xp

    def _repr_options(self) -> tuple[str, ...]:
        return gradient_items(self)

    def _join(self, parts: list[Any]) -> Any:
        """The groups' parts of a result, joined along axis 0."""
        return parts[0] if len(parts) == 1 else self._xp.concat(parts, axis=0)

    def _warn_if_hopeless(self, woodbury_lo: float, dense_lo: float) -> None:
        # Each kind of factor by its own rule, kappa_lo over the Woodbury factors (blocks
        # wider than m) and over the dense blocks' (no wider than m: a ragged last block
        # beside wider ones too), 1.0 where there are none; one warning at most.
        if _capacitance.is_imprecise(woodbury_lo, eps=_capacitance.EPS64):
            _capacitance.warn_if_passes_hopeless(woodbury_lo, damp=self.damp)
        else:
            _capacitance.warn_if_passes_hopeless(dense_lo, damp=self.damp, dense=True)


@eager_methods_under_torch_compile("__init__", "streamed", "from_gradients")
class StaticIHVP(_BlockOperatorBase):
    r"""The inverse of the damped empirical Fisher of m gradients, ``F^{-1}``.

    ``F = damp * I + G.T @ G / m`` for the gradients in the rows of ``G``
    (shape ``(m, d)``), optionally restricted to a block-diagonal matrix over
    consecutive blocks of ``block_size`` coordinates. The operator is
    factorised once, in O(d m^2) BLAS-3 work (one Gram product), keeps G by
    reference, and then applies ``F^{-1}`` in O(d m) per vector, with both
    passes over G summed in float64 (results exact to the rounding of the
    result dtype, see Notes); its diagonal costs O(d m^2) BLAS-3 work and
    single entries O(m^2) per distinct coordinate plus O(m) per entry.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row, of any Array-API library; float32 or
        float64, or 2-byte (NumPy and CuPy float16, PyTorch float16 and
        bfloat16, NumPy bfloat16 of ml_dtypes: JAX's, ``numpy.asarray`` of a
        JAX array, no copy), whose results are float32 (docs/mathematics.rst,
        "2-byte storage"). The operator lives in G's namespace and on G's device and
        keeps G by reference (no copy): G must not be modified while the operator is in
        use. A PyTorch G that requires grad is detached, as :class:`~mfac_core.DynamicIHVP`
        does: the operator keeps no autograd graph, and its results are not differentiable
        in G (refused under ``torch.func.grad``, ``jacrev``, ``vjp``: they would give zero).
        For a ``dask.array.Array`` G use :class:`~mfac_core.DaskStaticIHVP`.
    damp : float
        The damping ``lambda > 0`` (absolute, as in the M-FAC paper, whose
        default is ``1e-5``).
    block_size : int, optional
        Use a block-diagonal F over consecutive blocks of this many
        coordinates (the last block may be shorter). ``None`` (default) uses
        the full F.
    check_finite : bool, optional
        Check G, and later each input vector, for NaN and infinity
        (default ``True``; one extra read of each array).
    refine : int, optional
        Steps of iterative refinement in every product (default 0): each
        computes the residual ``x - F y`` from G in float64 and adds
        ``F^{-1}`` of it. For float64 G one step brings the error of vectors
        near the gradients' span down to ``eps * kappa`` (see Notes); float32
        and 2-byte products are already at float32's rounding. A step costs
        about two more products and two float64 passes over G.
    progress : callable, optional
        Called as ``progress(done, total)`` while the set-up runs, with the
        amount of work done so far and in all (one pass over d columns).
    **deprecated
        ``overwrite_G=True`` and ``out=`` (ignored: no working array is
        stored), ``stream_to=`` (use :meth:`streamed`) and the sharded
        spelling (a communicator: use :class:`~mfac_core.ShardedStaticIHVP`)
        still work and emit a ``DeprecationWarning``; they will be removed.

    Attributes
    ----------
    shape : tuple
        ``(d, d)``.
    local_shape : tuple
        ``shape`` (as for :class:`~mfac_core.ShardedStaticIHVP`, whose
        products take one rank's shards).
    dtype, device
        G's dtype (float32 for 2-byte G) and device.
    storage_dtype : str or None
        ``"float16"`` or ``"bfloat16"`` for 2-byte G, else ``None``.
    num_grads, dim, damp, block_size
        m, d, lambda and the block size (``d`` for the full operator).
    kappa_bound : float
        An upper bound of the 2-norm condition number of F (the largest over
        the blocks): ``1 + ||G_b||_F^2 / (m damp)``.

    Raises
    ------
    ValueError
        For a G that is not 2-D, empty, or holds NaN/inf, for ``damp <= 0``
        and for ``block_size < 1``.
    TypeError
        For an integer or complex G, or a G that is not an array, and for an
        unknown keyword.
    FactorizationError
        If the capacitance matrix cannot be factorised in float64 (``kappa``
        near 1e16, e.g. duplicated gradients with a tiny damping), and for a G
        holding NaN/inf with ``check_finite=False``.

    See Also
    --------
    EmpiricalFisher : The forward operator F.
    DynamicIHVP : The same inverse over a sliding window of gradients.
    ShardedStaticIHVP : The same inverse, G's columns sharded over ranks.
    DaskStaticIHVP : The same inverse for a Dask array G.
    streamed : The same inverse on a GPU, G streamed from host memory.

    Notes
    -----
    With the capacitance matrix ``C = m damp I + G G^T = L L^T`` (Cholesky of
    the Gram summed in float64) and ``w_j = L^{-1} g_{:j}``, Woodbury's
    identity gives

    .. math::

        F^{-1} x = (x - G^T C^{-1} G x) / \lambda, \qquad
        [F^{-1}]_{jk} = (\delta_{jk} - w_j^T w_k) / \lambda .

    These are the paper's recursions (3)-(5) in closed form: the LDL^T
    pivots of ``C / lambda`` are its ``q_i`` and ``W = L^{-1} G`` its
    ``v_i`` up to scaling. Both passes of a product read G in its storage
    dtype and accumulate in float64, the result rounded once; the diagonal
    and entries whiten the columns they need in float64 on the fly (no
    ``W`` is stored). Blocks no larger than m keep the float64 dense inverse
    of their ``B x B`` block instead, which is cheaper. All m x m work is
    float64 (docs/mathematics.rst, "Exact passes").

    Precision, with ``kappa = 1 + ||G||_2^2 / (m damp)``: for float32 and
    2-byte G, products, diagonal and entries are within ``8 eps(float32)``
    (relative, per coordinate for the diagonal) of the exact inverse of the
    stored gradients for kappa up to 1e6 whatever the vector, and up to 1e7
    for gradients with a shared mean and independent spread; beyond, the
    float64 factor's rounding adds up to about ``eps(float64) *
    kappa^1.5`` for vectors in the gradients' span, which one step of
    ``refine`` removes. For float64 G the
    relative error is about ``eps * sqrt(kappa) * ||x|| / (damp ||y||)`` for
    ``y = F^{-1} x`` (up to 64x that for gradients sharing a mean 1000x their
    spread), which one step of ``refine`` brings to about ``eps * ||x|| /
    (damp ||y||) <= eps * kappa``. The column-sharded, Dask and
    streamed (:meth:`streamed`) operators are as exact.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import StaticIHVP
    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((8, 100))
    >>> op = StaticIHVP(G, damp=1e-2)
    >>> x = rng.standard_normal(100)
    >>> F = 1e-2 * np.eye(100) + G.T @ G / 8
    >>> bool(np.allclose(F @ op.matvec(x), x))
    True
    >>> bool(np.allclose(op.diagonal(), np.diag(np.linalg.inv(F))))
    True
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # The deprecated spellings of the other strategies: StaticIHVP(dask_G, ...) and
        # the sharded one. No arguments: pickle's reconstruction.
        if cls is StaticIHVP and args:
            for accepts, subclass in _OTHER_ARRAYS:
                if accepts(args[0]):
                    name = subclass.__name__
                    warn_deprecated("StaticIHVP(G) for this G", f"{name}(G, damp=...)")
                    return super().__new__(subclass)
            sharded = sharded_form(cls, "StaticIHVP", kwargs)
            if sharded is not None:
                # Not a StaticIHVP: built here, and Python calls no __init__ on it.
                return sharded(*args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        G: Array,
        /,
        *,
        damp: float,
        block_size: int | None = None,
        check_finite: bool = True,
        refine: int = 0,
        progress: Callable[[int, int], None] | None = None,
        **deprecated: Any,
    ) -> None:
        legacy = legacy_options("StaticIHVP", deprecated, STATIC_LEGACY)
        overwrite_G = check_flag(legacy["overwrite_G"], "overwrite_G")
        # The operator stores G (or factors of it): never its autograd graph.
        G = stored(G, "G")
        if legacy["stream_to"] is not None:
            warn_deprecated(
                "StaticIHVP(G, stream_to=device)", "StaticIHVP.streamed(G, device=device, damp=...)"
            )
            self._init_checked(G, damp, block_size, check_finite, refine, progress)
            _streaming.init_streamed(
                self,
                G,
                legacy["stream_to"],
                overwrite_G=overwrite_G,
                out=legacy["out"],
                progress=progress,
            )
            return
        if overwrite_G or legacy["out"] is not None:
            warn_no_w()
        xp = self._init_checked(G, damp, block_size, check_finite, refine, progress)
        # G is kept by reference (never copied): every product reads it.
        self._G = G
        result = _setup.factorize_gform_groups(
            xp,
            G,
            self._groups,
            damp=self.damp,
            dtype=self.dtype,
            check_finite=self.check_finite,
            progress=progress,
        )
        self._factors: tuple[GroupFactor, ...] = result.factors
        self.kappa_bound = result.kappa_hi
        self._warn_if_hopeless(result.woodbury_lo, result.dense_lo)

    @classmethod
    def streamed(
        cls,
        G: Array,
        /,
        *,
        device: Any,
        damp: float,
        check_finite: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> StaticIHVP:
        """Build the operator on ``device`` from a PyTorch G in host memory, streaming G.

        The set-up runs on the host; the operator keeps a copy of G in host
        memory (a new pinned array of m x d values, in column pieces) and
        streams it to the device through two device buffers in every product,
        the copy of one piece overlapping the computation on the previous one
        (docs/gpu.rst, "Gradients in host memory"); both passes sum in float64,
        so results are as exact as :class:`StaticIHVP`'s.

        Parameters
        ----------
        G : torch.Tensor, shape (m, d)
            The float32 or float64 gradients, one per row, in host memory
            (pinned or not: the operator's own copy is pinned for CUDA), with ``d > m``.
        device : str or torch.device
            Where products run: a CUDA device (e.g. ``"cuda"``), or ``"cpu"``
            (the same schedule on the host, without overlap). Inputs and
            results are on it.
        damp : float
            The damping ``lambda > 0``.
        check_finite : bool, optional
            As in :class:`StaticIHVP`.
        progress : callable, optional
            As in :class:`StaticIHVP`.

        Returns
        -------
        StaticIHVP
            The full operator (no blocks, no refinement), on ``device``.

        Raises
        ------
        TypeError
            For a G that is not a PyTorch tensor.
        ValueError
            For a G not in host memory, 2-byte, or with ``d <= m``; for a
            ``device`` that names no available device; and as in
            :class:`StaticIHVP`.

        Examples
        --------
        >>> import torch
        >>> from mfac_core import StaticIHVP
        >>> G = torch.randn(4, 64, dtype=torch.float64)
        >>> op = StaticIHVP.streamed(G, device="cpu", damp=0.1)
        >>> x = torch.ones(64, dtype=torch.float64)
        >>> bool(torch.allclose(op.matvec(x), StaticIHVP(G, damp=0.1).matvec(x)))
        True
        """
        if cls is not StaticIHVP:
            raise TypeError(f"{cls.__name__} cannot be streamed; use StaticIHVP.streamed")
        op = super().__new__(cls)
        G = stored(G, "G")
        op._init_checked(G, damp, None, check_finite, 0, progress)
        _streaming.init_streamed(op, G, device, overwrite_G=False, out=None, progress=progress)
        return op

    def _init_checked(
        self, G: Array, damp: Any, block_size: Any, check_finite: Any, refine: Any, progress: Any
    ) -> Any:
        """The options checked and the layout set; returns G's namespace."""
        check_finite = check_flag(check_finite, "check_finite")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be callable or None, got {type(progress).__name__}")
        # G's finiteness is checked on the Gram diagonals, without a pass of its own.
        xp = self._init_layout(G, damp, block_size, check_finite, check_G=False, half=True)
        self.refine = check_count(refine, "refine", minimum=0)
        return xp

    @classmethod
    def from_gradients(
        cls,
        gradients: Iterable[Array],
        /,
        *,
        num_grads: int,
        dim: int,
        damp: float,
        dtype: Any = None,
        grads_out: Any = None,
        progress: Any = None,
        **options: Any,
    ) -> StaticIHVP:
        """Collect gradients from an iterable (a data loader) into G, then build the operator.

        G is filled one gradient, or one batch of gradients, at a time, into memory or into a
        ``.npy`` file opened as a memmap, so that G need not fit in memory (docs/guidance.rst,
        "Gradients larger than memory").

        Parameters
        ----------
        gradients : iterable of arrays
            Yields exactly ``num_grads`` gradients, each of shape ``(dim,)`` or in batches
            ``(k, dim)``, of the store's library and device (NumPy unless ``grads_out`` is an
            array of another library). Use ``itertools.islice`` to take the first ones of a
            longer iterable.
        num_grads, dim : int
            The number of gradients m and their length d.
        damp : float
            The damping, as in :class:`StaticIHVP`.
        dtype : dtype or str, optional
            The dtype of G (``"float32"``, ``"float64"``, or ``"float16"`` or ``"bfloat16"``,
            ml_dtypes', for 2-byte storage): every gradient is converted to it (rounded to
            nearest even). By default the first gradient's dtype, which all the others must then
            have.
        grads_out : None, str, os.PathLike or array, optional
            Where G goes: a new NumPy array (``None``, the default), a new ``.npy`` file of that
            path opened as a memmap (an existing file is refused; reopen it later with
            ``numpy.load(path, mmap_mode="r")``, and a bfloat16 file, which ``.npy`` records as
            raw 2-byte values, with ``.view(ml_dtypes.bfloat16)`` of that), or a writeable
            ``(num_grads, dim)`` array to fill (any library).
        progress : None, True or callable, optional
            ``True`` draws a text progress bar on stderr; a callable is called as
            ``progress(stage, done, total)``, with ``stage`` ``"gradients"`` (gradients stored
            so far, of ``num_grads``) and then ``"set-up"`` (the set-up's work, as in
            :class:`StaticIHVP`). To use tqdm, pass a callable that updates a bar of your own.
        **options
            ``block_size``, ``check_finite`` (each gradient is also checked as it arrives) and
            ``refine``, as in :class:`StaticIHVP`. The deprecated ``out=`` and ``overwrite_G=``
            are ignored, with a ``DeprecationWarning`` (no file is made for ``out``).

        Returns
        -------
        StaticIHVP
            The operator; it keeps G by reference, so a memmap file must stay where it is while
            the operator is in use.

        Raises
        ------
        ValueError
            If the iterable yields fewer or more than ``num_grads`` gradients (a ``None`` after
            the last counts as one more: the iterable must end), one of another shape, an empty
            batch ``(0, dim)``, or one holding NaN or infinity; for ``num_grads * dim`` values
            more than one array can address, or an empty path (before any gradient is read);
            and as in :class:`StaticIHVP`.
        TypeError
            For a gradient of another library or a non-floating dtype, or a dtype that differs
            from the first gradient's without ``dtype``; for an unknown keyword (before any
            gradient is read).
        FileExistsError
            If a path names an existing file (or a symbolic link, even a dangling one).
        IsADirectoryError
            If a path names a folder.
        FileNotFoundError, NotADirectoryError
            If a path's folder does not exist (or is a file), or a path ending in a separator
            names a folder that does not exist (before any gradient is read).
        OSError
            If the disk cannot hold the new file: its space is reserved when it is made
            (``posix_fallocate``, where the platform has it), after the first gradient, so that
            a full disk is this error rather than the process's death (``SIGBUS``) at a later
            write into the map.

        Notes
        -----
        A file this method created is removed when the collection fails (a gradient refused, too
        few or too many of them, an error of the iterable, an interrupt): its rows are missing.
        Once the last gradient is in, the file is complete, and it is kept when the set-up after
        it fails (a damping too small to factorise, an interrupt); the error's note (Python 3.11
        and later; ``__notes__`` on 3.10) names it and how to build the operator from it,
        ``StaticIHVP(numpy.load(path, mmap_mode="r"), damp=...)``. An array passed as
        ``grads_out`` keeps the gradients read so far. A file is a ``.npy`` file only once its
        last gradient is in, so that ``numpy.load`` refuses one left by a killed process (saying,
        wrongly, that it holds pickled data) rather than read it as complete gradients. An
        iterator an error abandons is closed (its ``close()``, where it has one), so that a
        generator's ``finally`` blocks and ``with`` statements (an open file, a data loader's
        workers) run then, not when it is garbage-collected; an error of ``close()`` becomes a
        note of the first error.

        Examples
        --------
        >>> import numpy as np
        >>> from mfac_core import StaticIHVP
        >>> rng = np.random.default_rng(0)
        >>> batches = (rng.standard_normal((4, 50)) for _ in range(3))
        >>> op = StaticIHVP.from_gradients(batches, num_grads=12, dim=50, damp=0.1)
        >>> op.num_grads, op.dim
        (12, 50)
        """
        return _store.built_from_gradients(
            cls,
            gradients,
            num_grads=num_grads,
            dim=dim,
            damp=damp,
            dtype=dtype,
            grads_out=grads_out,
            progress=progress,
            options=options,
        )

    @property
    def local_shape(self) -> tuple[int, int]:
        """The shape products take and return: ``shape``."""  # numpydoc ignore=RT01
        return self.shape

    def __setstate__(self, state: dict[str, Any]) -> None:
        sharded = sharded_class(StaticIHVP)
        if "_shard" in state and sharded is not None:
            # A column-sharded operator pickled while it was a StaticIHVP: it loads as
            # the class it is now (its state is the same).
            self.__class__ = sharded
            self.__setstate__(state)
            return
        super().__setstate__(state)

    # -- products ------------------------------------------------------------------------

    def _solve(self, X: Array) -> Array:
        return self._join([f.apply(X[f.group.start : f.group.end, ...]) for f in self._factors])

    def _matmat(self, X: Array) -> Array:
        return refine(self._xp, self._solve, self._residual, X, self._solve(X), self.refine)

    def _matvec(self, x: Array) -> Array:
        if self.refine:
            return self._matmat(x[:, None])[:, 0]
        return self._join([f.apply_vector(x[f.group.start : f.group.end]) for f in self._factors])

    def _residual(self, X: Array, Y: Array) -> Array:
        return fisher_residual(
            self._xp, self._G, self._groups, X, Y, damp=self.damp, scale=1.0 / self.num_grads
        )

    # -- entries -------------------------------------------------------------------------

    @float32_overflow_once
    def diagonal(self) -> Array:
        """The d diagonal entries of ``F^{-1}``, in O(d m^2) BLAS-3 work.

        Returns
        -------
        array, shape (d,)
            In the operator's namespace, dtype and device: ``(1 - ||w_j||^2) /
            damp`` with the whitened columns ``w_j = L^{-1} g_j`` formed in
            float64 a bounded piece at a time (no ``W`` is stored), so that the
            cancellation at coordinates the gradients cover well costs float64
            digits.
        """
        return self._join([f.diagonal() for f in self._factors])

    @float32_overflow_once
    def entries(self, rows: Array, cols: Array, /) -> Array:
        """Selected entries ``[F^{-1}][rows[k], cols[k]]`` (paper Eq. 5).

        Each distinct coordinate is whitened once in float64 (O(m^2)), then
        each entry is one dot product (O(m)): the k^2 entries among k
        coordinates cost O(m^2 k + m k^2).

        Parameters
        ----------
        rows, cols : array of int, of the same shape
            Indices in ``[0, d)``, in the operator's namespace and device; any
            integer dtype (offsets are computed in int64).

        Returns
        -------
        array
            The entries, with the shape of ``rows`` and the operator's dtype.
            Entries that couple two different blocks are zero. Temporaries are
            bounded (pairs are taken a bounded number at a time).

        Raises
        ------
        TypeError
            For indices that are not an integer array of the operator's library.
        ValueError
            For indices on another device, or of different shapes.
        IndexError
            For an index outside ``[0, d)``.
        """
        xp = self._xp
        r = check_index_array(rows, "rows", xp=xp, device=self.device, bound=self.dim)
        c = check_index_array(cols, "cols", xp=xp, device=self.device, bound=self.dim)
        if r.shape != c.shape:
            raise ValueError(
                f"rows and cols must have the same shape, got {tuple(r.shape)} and {tuple(c.shape)}"
            )
        shape = r.shape
        r, c = xp.reshape(r, (-1,)), xp.reshape(c, (-1,))
        B = self.block_size
        out = xp.zeros(r.shape, dtype=self.dtype, device=self.device)
        for group, factor in zip(self._groups, self._factors, strict=True):
            inside = (r // B == c // B) & (r >= group.start) & (r < group.end)
            rr = xp.clip(r, group.start, group.end - 1) - group.start
            cc = xp.clip(c, group.start, group.end - 1) - group.start
            # Clipped indices of pairs outside the group or across blocks are valid
            # but meaningless: ``inside`` masks them out.
            out = xp.where(inside, factor.entries(rr, cc), out)
        return xp.reshape(out, shape)


show_init_signature(StaticIHVP)


@eager_methods_under_torch_compile("__init__")
class EmpiricalFisher(_BlockOperatorBase):
    """The damped empirical Fisher ``F = damp * I + G.T @ G / m`` as an operator.

    Useful as the forward operator in solvers and tests; with ``block_size``
    it is the block-diagonal F that :class:`StaticIHVP` inverts. G is kept by
    reference, not copied.

    Parameters
    ----------
    G : array, shape (m, d)
        The gradients, one per row, kept by reference; float32 or float64, or
        2-byte storage as for :class:`StaticIHVP` (NumPy and CuPy float16,
        PyTorch float16 and bfloat16, NumPy bfloat16 of ml_dtypes), the Fisher
        of the stored gradients,
        whose results are float32. A PyTorch G that
        requires grad is detached: the operator keeps no autograd graph alive,
        and its results are not differentiable in G (refused under ``torch.func``'s
        reverse mode, as for :class:`StaticIHVP`).
    damp : float
        The damping ``lambda > 0``.
    block_size : int, optional
        Block-diagonal F over consecutive blocks of this many coordinates.
    check_finite : bool, optional
        Check G and each input for NaN and infinity (default ``True``).
        Without the check G is not read when the operator is built, and NaN
        or infinity in G gives NaN products, as in an input; StaticIHVP
        refuses such a G even so, because its factorisation fails.

    Raises
    ------
    ValueError
        For a G that is not 2-D, empty, or holds NaN/inf, for ``damp <= 0``
        and for ``block_size < 1``.
    TypeError
        For an integer or complex G, or a G that is not an array.

    Examples
    --------
    >>> import numpy as np
    >>> from mfac_core import EmpiricalFisher, StaticIHVP
    >>> G = np.random.default_rng(1).standard_normal((4, 30))
    >>> F, Finv = EmpiricalFisher(G, damp=0.1), StaticIHVP(G, damp=0.1)
    >>> x = np.ones(30)
    >>> bool(np.allclose(F @ (Finv @ x), x))
    True
    """

    def __init__(
        self, G: Array, /, *, damp: float, block_size: int | None = None, check_finite: bool = True
    ) -> None:
        G = stored(G, "G")  # the operator stores G, never its autograd graph
        self._init_layout(G, damp, block_size, check_finite, half=True, inverse=False)
        self._G = G

    def _matmat(self, X: Array) -> Array:
        # damp X + G^T (G X) / m block by block, both passes summed in float64 by the
        # engine's alpha (X - G^T A) (see _fisher_terms for alpha, X and A).
        xp, m = self._xp, self.num_grads
        X = _engine.widened_for_derivatives(xp, X)
        parts = []
        for g in self._groups:
            Xg = X[g.start : g.end, ...]
            P = _engine.project_blocks(xp, self._G, g, Xg)
            Xw, A, alpha = _fisher_terms(xp, self._G, Xg, P, self.damp, m)
            parts.append(
                _engine.combine_blocks(xp, self._G, g, Xw, A, alpha=alpha, dtype=self.dtype)
            )
        return self._join(parts)

    @float32_overflow_once
    def diagonal(self) -> Array:
        """Return the diagonal ``damp + sum_i G_ij^2 / m``.

        Returns
        -------
        array, shape (d,)
            In the operator's namespace, dtype and device; summed in float64 and
            rounded once.
        """
        xp = self._xp
        sums = _engine.square_sums(xp, self._G)
        return narrowed(xp, self.damp + sums / self.num_grads, self.dtype)


def _fisher_terms(
    xp: Any, G: Array, X: Array, P: Array, damp: float, m: int
) -> tuple[Array, Array, float]:
    """``(X', A, alpha)`` with ``alpha (X' - G^T A) = damp X + G^T P / m``, within range.

    ``alpha = damp`` and ``A = -P / (m damp)`` read X as given, but their ``G^T A`` is the
    result over the damping, past float64's range at a small one (float64 gradients of
    1e5 at damp 1e-300 gave inf for a result of 1e10). ``alpha = 1`` with ``X' = damp X``
    in float64 keeps every term at the result's scale, at the cost of a float64 copy of
    X, so it is taken only where the first form can overflow: below a damping of 1 over
    float64 gradients, below ``d 2**-600`` over 4- and 2-byte ones (whose finite entries
    bound ``|G^T A|`` by ``d 4e115 / damp``).
    """
    low = 1.0 if G.dtype == xp.float64 else G.shape[1] * 2.0**-600
    if damp >= low:
        return X, P * (-1.0 / (m * damp)), damp
    return xp.astype(X, xp.float64) * damp, P * (-1.0 / m), 1.0
