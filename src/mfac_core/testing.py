"""Oracles, assertions and Hypothesis strategies for testing M-FAC operators.

Everything here works in NumPy float64 and is meant for tests, not for speed:

- :func:`to_numpy` brings an array of any supported library to the host.
- :func:`empirical_fisher_dense`, :func:`dense_inverse` and
  :func:`condition_number` build the damped empirical Fisher
  ``F = damp I + G^T G / m`` (optionally block-diagonal), its inverse and its
  exact condition number.
- :class:`SpectralOracle` applies ``F^{-1}`` from the eigen-decomposition of
  each block's small ``m x m`` Gram matrix; at a large condition number it
  stays accurate for generic vectors, where a dense float64 solve with ``F``
  loses ``log10(kappa)`` digits.
- :func:`extended_precision_inverse` applies ``F^{-1}`` (optionally
  block-diagonal) in ``numpy.longdouble``, each block by Woodbury's identity or
  by a solve with the block itself, whichever is stable for it: a reference
  for vectors near the gradients' span, where every float64 computation loses
  digits to cancellation.
- :func:`paper_static` and :func:`paper_dynamic` are literal, loop-by-loop
  transcriptions of the paper's static (Eqs. 3-5) and dynamic (Eqs. 8-13)
  algorithms.
- :func:`assert_close` compares results with a tolerance scaled by the
  condition number and the precision of the result.
- :class:`ThreadComm` and :func:`run_spmd_threads` run a column-sharded (SPMD)
  computation on several threads of one process, each a rank, for tests of
  :mod:`mfac_core.distributed` code without starting processes.
- :func:`problems` is a Hypothesis strategy drawing gradients, damping,
  vectors and block sizes, including the hard cases (vectors in the span of
  the gradients, duplicated gradients, ``d < m``, ``m = 1``, ``d = 1``, tiny
  and huge damping, ragged blocks).

The paper is Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free
Approximations of Second-Order Information", NeurIPS 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._testing_oracles import (
    SpectralOracle,
    condition_number,
    dense_inverse,
    empirical_fisher_dense,
    extended_precision_inverse,
    to_numpy,
)
from ._testing_paper import PaperDynamic, PaperStatic, paper_dynamic, paper_static
from ._testing_spmd import ThreadComm, run_spmd_threads
from ._validation import check_count, check_flag

__all__ = [
    "DEFAULT_FACTOR",
    "DEFAULT_FACTOR_HALF",
    "PaperDynamic",
    "PaperStatic",
    "Problem",
    "SpectralOracle",
    "ThreadComm",
    "assert_close",
    "condition_number",
    "dense_inverse",
    "empirical_fisher_dense",
    "extended_precision_inverse",
    "paper_dynamic",
    "paper_static",
    "problems",
    "run_spmd_threads",
    "to_numpy",
]

#: Default constant of :func:`assert_close` for float32 and float64 (see its Notes).
DEFAULT_FACTOR = 100.0

#: Default constant of :func:`assert_close` for float16 and bfloat16 (see its Notes).
DEFAULT_FACTOR_HALF = 10.0

#: Machine epsilons of the floating dtypes by name (``bfloat16`` is not in NumPy).
_EPS = {
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
    "float32": float(np.finfo(np.float32).eps),
    "float64": float(np.finfo(np.float64).eps),
}


# -- assertions ------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    """The name of a real floating dtype of any library (or of a dtype name)."""
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            npdt = np.dtype(dtype)
        except TypeError:
            npdt = None
        name = npdt.name if npdt is not None else str(dtype).rsplit(".", 1)[-1]
    if name not in _EPS:
        raise TypeError(
            f"assert_close needs a real floating dtype of {', '.join(_EPS)} (it compares in "
            f"float64), got {dtype!r}"
        )
    return name


def _norm(v: np.ndarray) -> float:
    """The 2-norm of the flattened ``v``, scaled so that it neither under- nor overflows."""
    scale = float(np.max(np.abs(v))) if v.size else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        return scale
    return scale * float(np.linalg.norm((v / scale).ravel()))


def _check_slack(**values: Any) -> None:
    """Refuse a ``kappa``, ``factor`` or ``atol`` that is not a finite number ``>= 0``.

    With NaN the check fails whatever the arrays, with infinity it passes whatever they
    hold (a test that cannot fail), and a negative one fails on equal arrays.
    """
    for name, value in values.items():
        if value is None:
            continue
        try:
            # float() would parse a string ("1e-3") and take a bool as 0 or 1.
            if isinstance(value, bool | complex | str | bytes):
                raise TypeError
            v = float(value)  # a number, or a 0-d array of any library
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number, got {value!r}") from None
        except OverflowError:  # an int beyond float64's range (10**400): infinite
            v = math.inf
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(
                f"{name} must be finite and >= 0, got {value!r}: the tolerance would "
                "pass or fail whatever the arrays hold"
            )


def _check_relative_tolerance(factor: float, eps: float, kappa: float, name: str) -> None:
    """Refuse a relative tolerance ``factor * eps * kappa`` of 1 or more.

    The comparison then passes a zero result (its error is ``||desired||``), and any other
    result within that distance: at such a ``kappa`` the bound promises no digit, and a test
    built on it cannot tell a wrong operator from a right one.
    """
    rel = factor * eps * kappa
    if rel >= 1.0:
        raise ValueError(
            f"the relative tolerance factor * eps * kappa = {factor:g} * {eps:.3g} * "
            f"{kappa:.3g} = {rel:.3g} is 1 or more ({name}): a zero result would pass, so "
            "the comparison cannot fail for a wrong one. No digit is promised at this "
            "kappa in this precision: check what can be checked (finite values, a "
            "residual), or compare in a higher precision"
        )


def assert_close(
    actual: Any,
    desired: Any,
    *,
    kappa: float = 1.0,
    dtype: Any = None,
    factor: float | None = None,
    atol: float = 0.0,
    err_msg: str = "",
) -> None:
    r"""Assert a normwise, condition-aware closeness of two arrays.

    Passes when the shapes are equal and

    .. math::

        \|a - d\|_2 \le \mathrm{factor} \cdot \varepsilon(\mathrm{dtype})
        \cdot \kappa \cdot \|d\|_2 + \mathrm{atol},

    with the 2-norm of the flattened arrays (the Frobenius norm of matrices),
    computed in float64 on the host.

    Parameters
    ----------
    actual : array
        The result under test, of any supported library and device.
    desired : array
        The reference (often a NumPy float64 oracle).
    kappa : float, optional
        The condition number of the problem (for ``F`` or ``F^{-1}``:
        :func:`condition_number`). The default 1 suits well-conditioned
        comparisons.
    dtype : dtype or str, optional
        The precision that decides ``eps``; defaults to ``actual``'s dtype.
    factor : float, optional
        The constant in front of ``eps * kappa``; default
        :data:`DEFAULT_FACTOR` (100) for float32 and float64 and
        :data:`DEFAULT_FACTOR_HALF` (10) for float16 and bfloat16, see Notes.
    atol : float, optional
        An absolute slack, for results whose reference is (near) zero.
    err_msg : str, optional
        Prepended to the message of the ``AssertionError``.

    Raises
    ------
    AssertionError
        On different shapes, non-finite values in ``actual`` or an error
        above the tolerance; the message gives the relative error, the
        tolerance, ``kappa`` and the dtype.
    ValueError
        If ``kappa``, ``factor`` or ``atol`` is negative, NaN or infinite
        (the comparison could then not fail, or not pass), or if
        ``factor * eps * kappa >= 1``: a tolerance of ``||desired||`` or
        more passes a zero result.
    TypeError
        If one of them is not a real number, or ``actual`` or ``desired``
        is complex.

    Notes
    -----
    The products of the M-FAC operators make a relative error of up to
    ``c * eps * kappa`` (``kappa = 1 + ||G||_2^2 / (m damp)``): an error of
    ``eps * ||x|| / damp`` in ``F^{-1} x`` (passes ``G x`` and ``G^T c`` summed in
    the storage precision, as the paper's implementation does; the operators sum theirs in
    float64, docs/mathematics.rst, "Exact passes") is ``eps * kappa`` relative to
    a result that may be as small as ``||x|| / (damp kappa)``. The constant
    ``c`` collects the rounding of length-``d`` and length-``m`` inner
    products and of the float64 m x m work; rounding errors of dot
    products grow like ``sqrt(n) eps`` in practice (``n eps`` only in the
    worst case), and for the test sizes used here (``d <= 64``,
    ``m <= 16``) the measured ratio error / (eps kappa) stays below about
    10. The default ``factor = 100`` leaves a margin of 10 for other
    libraries' summation orders and for the float64 oracle's own error
    (also a small multiple of ``eps(float64) kappa``): in float64 a relative
    error above ``2.2e-14 * kappa`` fails. Pass a larger ``factor`` (with a
    comment saying why) for large dimensions.

    The tolerance grows with ``kappa``, so it catches only errors larger than
    ``factor * eps * kappa``: in float32 at ``kappa = 1e4`` a relative error up
    to 12 % passes, and a damping 1 % off or a gradient left out with it. Pass
    the condition number only where the error under test does scale with it
    (float64 storage; a float64 reference from a dense solve; code that sums
    in the storage precision, as :func:`paper_static` does). The library's
    products over float32 and 2-byte gradients sum in float64 and are within
    ``8 eps`` of the exact inverse of the stored gradients up to ``kappa``
    about ``1e6`` (docs/mathematics.rst): check them with ``kappa=1`` (the
    default) against :func:`extended_precision_inverse`, where a damping 0.1 %
    off fails for a random vector (whose product is about ``x / damp``; for a
    vector in the gradients' span the damping hardly matters).

    For float16 and bfloat16 the default is 10: ``100 * eps`` would be 10%
    and 78% there, too loose to catch anything, while with float32
    accumulation the error is dominated by a few roundings to the storage
    precision (of the inputs and of the result).
    """
    _check_slack(kappa=kappa, factor=factor, atol=atol)
    a = to_numpy(actual)
    desired_np = to_numpy(desired)
    # Cast to float64 a complex array would lose its imaginary part: a wrong result would
    # pass on its real part (``actual`` too, where ``dtype`` is given and not read from it).
    for what, value in (("actual", a), ("desired", desired_np)):
        if np.iscomplexobj(value):
            raise TypeError(f"assert_close compares real arrays; {what} is {value.dtype}")
    desired_np = np.asarray(desired_np, dtype=np.float64)
    if dtype is None:
        dtype = getattr(actual, "dtype", a.dtype)
    name = _dtype_name(dtype)
    eps = _EPS[name]
    if factor is None:
        factor = DEFAULT_FACTOR_HALF if name in ("float16", "bfloat16") else DEFAULT_FACTOR
    factor = float(factor)
    _check_relative_tolerance(factor, eps, float(kappa), name)
    prefix = f"{err_msg}\n" if err_msg else ""
    if a.shape != desired_np.shape:
        raise AssertionError(f"{prefix}shapes differ: actual {a.shape}, desired {desired_np.shape}")
    if not np.all(np.isfinite(desired_np)):
        raise AssertionError(f"{prefix}desired holds NaN or infinity")
    a64 = a.astype(np.float64)
    if not np.all(np.isfinite(a64)):
        raise AssertionError(
            f"{prefix}actual holds NaN or infinity "
            f"({int(np.sum(~np.isfinite(a64)))} of {a64.size} entries)"
        )
    # A difference beyond float64's range is infinite, and fails: without NumPy's overflow
    # warning, which a test run with -W error reported instead of the failed comparison.
    with np.errstate(over="ignore"):
        err = _norm(a64 - desired_np)
    ref = _norm(desired_np)
    scale = eps * float(kappa) * ref  # 0 where kappa is (kappa=0 is allowed: atol alone)
    tol = factor * scale + float(atol)
    if not err <= tol:
        rel = err / ref if ref > 0 else math.inf
        raise AssertionError(
            f"{prefix}not close: ||actual - desired|| = {err:.3e}, relative error {rel:.3e}, "
            f"tolerance {tol:.3e} (= {factor:g} * eps {eps:.3g} * kappa {float(kappa):.3g} * "
            f"||desired|| {ref:.3e} + atol {float(atol):.3g}); dtype {dtype}, shape {a.shape}; "
            f"error / (eps kappa ||desired||) = {err / scale if scale > 0 else math.inf:.3g}"
        )


# -- Hypothesis strategies -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Problem:
    """One drawn test problem: gradients, damping, a vector and a block size.

    ``G`` and ``x`` are NumPy float64 arrays; when the problem was drawn for
    float32 their values are exactly representable in float32, so that the
    float64 oracles see exactly the data the operator under test sees.

    Attributes
    ----------
    G : numpy.ndarray, shape (m, d)
        The gradients, one per row (read-only).
    damp : float
        The damping ``lambda > 0``.
    x : numpy.ndarray, shape (d,)
        The vector to apply ``F^{-1}`` to (read-only).
    block_size : int or None
        The block size of a block-diagonal F, or ``None`` for the full one.
    description : str
        How the problem was drawn (kinds, sizes, condition number).
    """

    G: np.ndarray
    damp: float
    x: np.ndarray
    block_size: int | None
    description: str

    @property
    def m(self) -> int:  # numpydoc ignore=RT01
        """The number of gradients."""
        return int(self.G.shape[0])

    @property
    def d(self) -> int:  # numpydoc ignore=RT01
        """The dimension."""
        return int(self.G.shape[1])

    @property
    def kappa(self) -> float:  # numpydoc ignore=RT01
        """The exact condition number of (block-diagonal) F."""
        return condition_number(self.G, self.damp, block_size=self.block_size)

    def oracle(self) -> SpectralOracle:
        """Build the :class:`SpectralOracle` of this problem.

        Returns
        -------
        SpectralOracle
            ``F^{-1}`` for this problem's ``G``, ``damp`` and ``block_size``.
        """
        return SpectralOracle(self.G, self.damp, block_size=self.block_size)

    def as_arrays(self, xp: Any, dtype: Any, device: Any = None) -> tuple[Any, Any]:
        """Fresh copies of ``G`` and ``x`` in namespace ``xp`` with ``dtype`` on ``device``.

        Parameters
        ----------
        xp : module
            An Array-API namespace (e.g. from ``array_api_compat.array_namespace``).
        dtype : dtype or str
            A dtype of ``xp`` or its name (``"float32"``, ``"float64"``).
        device : object, optional
            A device of ``xp``; ``None`` uses its default.

        Returns
        -------
        G : array, shape (m, d)
            A copy of ``G`` in ``xp``, with ``dtype``, on ``device``.
        x : array, shape (d,)
            A copy of ``x`` in ``xp``, with ``dtype``, on ``device``.
        """
        if isinstance(dtype, str):
            dtype = getattr(xp, dtype)
        kw = {} if device is None else {"device": device}
        return (
            xp.asarray(self.G, dtype=dtype, copy=True, **kw),
            xp.asarray(self.x, dtype=dtype, copy=True, **kw),
        )

    def __repr__(self) -> str:
        return f"Problem({self.description})"


_G_KINDS = ("gaussian", "low-rank", "duplicated", "identical", "scaled")
_X_KINDS = ("random", "span", "gradient", "zero")


def _hypothesis() -> Any:
    try:
        import hypothesis.strategies as st
    except ImportError:  # pragma: no cover - exercised only without hypothesis
        raise ImportError(
            "mfac_core.testing.problems needs Hypothesis: "
            'pip install hypothesis (or pip install ".[test]" from the checkout)'
        ) from None
    return st


def _check_shapes(shapes: Any) -> list[tuple[int, int]]:
    """``shapes`` as a non-empty list of ``(m, d)`` pairs of counts (for :func:`problems`)."""
    pairs = list(shapes) if isinstance(shapes, (list, tuple)) else None
    if not pairs or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in pairs):
        raise TypeError(f"shapes must be a non-empty sequence of (m, d) pairs, got {shapes!r}")
    return [
        (check_count(m, f"shapes[{i}][0]"), check_count(d, f"shapes[{i}][1]"))
        for i, (m, d) in enumerate(pairs)
    ]


def problems(
    *,
    dtype: str = "float64",
    max_m: int = 8,
    max_d: int = 40,
    block_sizes: bool = True,
    shapes: Any = None,
) -> Any:
    """A Hypothesis strategy of :class:`Problem` instances.

    Draws ``m`` in ``[1, max_m]`` and ``d`` in ``[1, max_d]`` (so ``d < m``,
    ``m = 1`` and ``d = 1`` occur); gradients that are Gaussian, low-rank,
    partly duplicated, all identical, or Gaussian with rows scaled over six
    orders of magnitude, at an overall scale between 1e-3 and 1e3; a
    damping set from a log-uniform target condition number
    ``kappa = 1 + ||G||_2^2 / (m damp)`` between ``1 + 1e-8`` (huge damping)
    and ``1e6`` for float64 or ``1e4`` for float32 (tiny damping), so that
    ``eps * kappa`` stays well below 1; a vector that is random, in the span
    of the gradients (``x = G^T a``), equal to a gradient, or zero; and a
    block size that is ``None`` or in ``[1, d + 2]`` (ragged blocks, and
    blocks both smaller and larger than ``m``).

    Parameters
    ----------
    dtype : {"float64", "float32"}, optional
        The precision the problem is for: it bounds the condition number,
        and for float32 the data are rounded to float32 values.
    max_m, max_d : int, optional
        Upper bounds of m and d.
    block_sizes : bool, optional
        Whether to draw block sizes; ``False`` always gives ``None``.
    shapes : sequence of (int, int), optional
        Pairs ``(m, d)`` to draw the shape from, in place of the ranges of
        ``max_m`` and ``max_d``; the values stay random. For a library that
        compiles a program per shape (JAX's ``jit``), a few shapes that
        repeat let the examples reuse their compilations.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        A strategy whose examples are :class:`Problem` instances.

    Raises
    ------
    ValueError
        If ``dtype`` is neither ``"float32"`` nor ``"float64"``, or
        ``max_m`` or ``max_d`` is below 1.
    TypeError
        If ``max_m`` or ``max_d`` is not an int, ``block_sizes`` not a bool,
        or ``shapes`` not a non-empty sequence of pairs of ints.
    ImportError
        If Hypothesis is not installed.
    """
    st = _hypothesis()
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    # A float bound reached Hypothesis's InvalidArgument only when drawing, a bool was taken
    # as 1, and block_sizes="no" drew block sizes.
    max_m, max_d = check_count(max_m, "max_m"), check_count(max_d, "max_d")
    block_sizes = check_flag(block_sizes, "block_sizes")
    shape_list = None if shapes is None else _check_shapes(shapes)
    log_kappa_max = 4.0 if dtype == "float32" else 6.0
    store = np.float32 if dtype == "float32" else np.float64

    @st.composite
    def draw_problem(draw: Any) -> Problem:
        if shape_list is None:
            m = draw(st.integers(1, max_m), label="m")
            d = draw(st.integers(1, max_d), label="d")
        else:
            m, d = draw(st.sampled_from(shape_list), label="(m, d)")
        g_kind = draw(st.sampled_from(_G_KINDS), label="G kind")
        x_kind = draw(st.sampled_from(_X_KINDS), label="x kind")
        seed = draw(st.integers(0, 2**32 - 1), label="seed")
        log_scale = draw(st.floats(-3.0, 3.0), label="log10 gradient scale")
        # log10(kappa - 1): from huge damping (kappa ~ 1) to tiny damping.
        log_km1 = draw(st.floats(-8.0, log_kappa_max), label="log10(kappa - 1)")
        block_size = None
        if block_sizes:
            block_size = draw(st.one_of(st.none(), st.integers(1, d + 2)), label="block_size")
        rng = np.random.default_rng(seed)

        G = rng.standard_normal((m, d))
        if g_kind == "low-rank":
            r = int(rng.integers(1, min(m, d) + 1))
            G = rng.standard_normal((m, r)) @ rng.standard_normal((r, d)) / math.sqrt(r)
        elif g_kind == "duplicated":
            src = rng.integers(0, m, size=m)
            src[0] = 0
            G = G[np.minimum(src, np.arange(m))]  # each row a copy of itself or an earlier one
        elif g_kind == "identical":
            G = np.repeat(G[:1], m, axis=0)
        elif g_kind == "scaled":
            G = G * 10.0 ** rng.uniform(-3.0, 3.0, size=(m, 1))
        G = (G * 10.0**log_scale).astype(store).astype(np.float64)
        if not np.any(G):  # float32 underflow cannot happen at these scales; stay safe
            G[0, 0] = 1.0

        top = float(np.linalg.eigvalsh(G @ G.T)[-1])
        damp = top / (m * 10.0**log_km1)

        if x_kind == "random":
            x = rng.standard_normal(d)
        elif x_kind == "span":
            x = G.T @ rng.standard_normal(m)
        elif x_kind == "gradient":
            x = G[int(rng.integers(0, m))].copy()
        else:
            x = np.zeros(d)
        x = x.astype(store).astype(np.float64)

        kappa = condition_number(G, damp, block_size=block_size)
        description = (
            f"m={m}, d={d}, G={g_kind}, x={x_kind}, block_size={block_size}, "
            f"damp={damp:.3g}, kappa={kappa:.3g}, seed={seed}"
        )
        G.setflags(write=False)
        x.setflags(write=False)
        return Problem(G=G, damp=damp, x=x, block_size=block_size, description=description)

    return draw_problem()
