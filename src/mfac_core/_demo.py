"""The ``mfac-core demo`` problem: realistic gradients, checked against a dense inverse.

Nothing is downloaded. The gradients are the per-sample gradients of a
logistic-regression model (``d - 1`` weights and a bias) trained for a few
steps on synthetic data with low-rank structure, all drawn from a fixed seed.
Their norms vary by an order of magnitude, as real per-sample gradients do,
and the Gram matrix has a decaying spectrum.

The demo builds :class:`~mfac_core.StaticIHVP` (full and block-wise, in
float32 and float64) and compares its products with a dense reference, then
times the set-up and one IHVP next to the floors measured in the same process:

- IHVP floor: ``2 m d itemsize`` bytes (G is read twice) over the copy
  bandwidth of this machine, measured by timing :func:`numpy.copyto` of a
  large array (bytes read plus bytes written, as in STREAM);
- set-up floor: one float64 Gram ``G G^T`` of a float64 copy of G (BLAS
  ``dsyrk``), the whole set-up's pass once the Gram is summed in float64.

Each floor is timed interleaved with the code measured against it (one run of
each per round, best of the rounds), so that both see the same machine state
and the floors move little from one run to the next.

The reference ``y = F^{-1} x`` is that of the stored gradients (G rounded to
the dtype, as StaticIHVP's bound is stated): the float64 dense inverse of
each block of F (:func:`numpy.linalg.inv`), refined by ``REFINE_STEPS``
steps whose residuals ``x - F y`` are summed in :class:`numpy.longdouble`
through G, so that the reference's own error is far below what it checks.
A product passes when it is within the bound of StaticIHVP's docstring
(Notes, "Precision"), with ``kappa = 1 + max_b ||G_b||_2^2 / (m damp)`` the
condition number of the (block-diagonal) F:

- float32: ``||y_hat - y|| / ||y|| <= 8 eps(float32) + eps(float64) kappa^1.5``
  (``SINGLE_BOUND``; the second term, the float64 factor's rounding, matters
  only beyond kappa = 1e6);
- float64: ``||y_hat - y|| / ||y|| <= C eps(float64) sqrt(kappa) ||x|| / (damp ||y||)``
  with ``C = BOUND_CONSTANT``, plus ``C eps(longdouble) ||x|| / (damp ||y||)``
  for the rounding of the reference's residuals (``1/sqrt(kappa)`` of the
  bound even where ``longdouble`` is float64); a block no wider than m (the
  full F where d <= m), which factorises F_b itself, as the README states:
  ``C eps(float64) kappa``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from ._static import StaticIHVP
from ._timing import fmt_time, interleaved

__all__ = [
    "BOUND_CONSTANT",
    "REFINE_STEPS",
    "SINGLE_BOUND",
    "DEFAULT_DAMP",
    "MAX_DEMO_DAMP",
    "MAX_DEMO_GRADS",
    "MAX_DEMO_KAPPA",
    "MAX_DENSE_DIM",
    "block_kappa",
    "demo_gradients",
    "error_ratios",
    "reference_products",
    "run_demo",
]

#: The demo's default damping: the gradients below have squared norms of about 0.1 to 1,
#: so this gives a condition number of a few thousand (the paper's 1e-5 gives ~25 000).
DEFAULT_DAMP = 1e-4

#: The largest d for which the demo builds the dense d x d reference inverse.
MAX_DENSE_DIM = 6000

#: The largest m the demo accepts (its synthetic data set has 4 m samples of d features).
MAX_DEMO_GRADS = 4096

#: The largest condition number the demo checks. Its reference refines the float64 dense
#: inverse, whose relative error is about eps(float64) kappa, and each step shrinks the
#: error by that factor: at 1e-3 / eps(float64) (4.5e12) two steps leave ~1e-9 of it. Near
#: kappa = 1e14 the reference's own error exceeded the float64 bound (err/bound 6 to 8, m
#: in {8, 64}), and at 1e29 it had no correct digits.
MAX_DEMO_KAPPA = 1e-3 / float(np.finfo(np.float64).eps)

#: The largest damping the demo checks: its float32 products, of about ||x|| / damp with
#: entries of order 1 / damp, must stay normal float32 numbers (above 1.2e-38, less a margin
#: of 1e8 for the entries' spread); beyond 1e38 they are subnormal or zero.
MAX_DEMO_DAMP = 1e-8 / float(np.finfo(np.float32).tiny)

#: The constant C of the float64 bound ``C eps sqrt(kappa) ||x|| / (damp ||y||)`` that each
#: float64 product must meet (StaticIHVP's docstring says "about" that with C = 1). Over the
#: demo's problems with m in {8, 16, 64, 128}, d in {120, 500, 2000}, damp from 1e-2 to 1e-8
#: (kappa up to 2e7) and seeds 0-1, full and block-wise, the largest error was 0.57 times the
#: C = 1 bound (m = 128, d = 2000, damp = 1e-4, kappa = 1.2e3), 2-core AMD EPYC, NumPy
#: 2.4.6, 2026-12-05; C = 2 leaves a margin of about 3.5.
#: tests/test_cli.py::test_demo_bound_holds_with_margin reruns part of that sweep.
BOUND_CONSTANT = 2.0

#: The float32 bound's constant: StaticIHVP's docstring promises ``8 eps(float32)`` relative
#: error against the exact inverse of the stored gradients (the sweep above: at most 0.26
#: eps(float32), up to kappa = 2e7).
SINGLE_BOUND = 8.0

#: Refinement steps of the dense reference (residuals in ``numpy.longdouble``).
REFINE_STEPS = 2

#: Rounds of the interleaved timings (best of them is reported).
REPEAT = 7


def demo_gradients(m: int, d: int, seed: int = 0) -> np.ndarray:
    """Per-sample gradients of a logistic-regression model on synthetic data.

    Parameters
    ----------
    m : int
        Number of gradients (rows).
    d : int
        Number of parameters: ``d - 1`` feature weights and one bias.
    seed : int, optional
        Seed of :func:`numpy.random.default_rng`; the same seed gives the
        same gradients.

    Returns
    -------
    numpy.ndarray, shape (m, d), float64
        Row ``i`` is the gradient of the logistic loss of sample ``i`` with
        respect to the parameters, at weights trained by 100 steps of
        gradient descent on ``max(4 m, 256)`` samples.
    """
    if m < 1 or d < 1:
        raise ValueError(f"need m >= 1 and d >= 1, got m={m}, d={d}")
    rng = np.random.default_rng(seed)
    f = d - 1
    n = max(4 * m, 256)
    rank = min(16, f)
    # Features: a few latent factors of decaying strength plus noise, scaled to norm ~1.
    basis = rng.standard_normal((rank, f)) * (0.7 ** np.arange(rank))[:, None]
    X = rng.standard_normal((n, rank)) @ basis + 0.3 * rng.standard_normal((n, f))
    X /= math.sqrt(max(f, 1))
    # Labels from a noisy teacher, so that the model cannot fit them exactly.
    teacher = 3.0 * rng.standard_normal(f)
    y = (rng.random(n) < _sigmoid(X @ teacher)).astype(np.float64)
    X1 = np.hstack([X, np.ones((n, 1))])
    w = np.zeros(d)
    for _ in range(100):
        w -= X1.T @ (_sigmoid(X1 @ w) - y) / n + 1e-3 * w
    residual = _sigmoid(X1[:m] @ w) - y[:m]
    return residual[:, None] * X1[:m]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


#: Size of each of the two arrays copied to measure the bandwidth.
COPY_BYTES = 2**26


#: Tries of the set-up floor kernel per timing round.
FLOOR_TRIES = 5

#: Column width of the pieced Gram of the set-up floor (small enough for one BLAS thread).
FLOOR_PIECE = 128


def _setup_floor_candidates(G: np.ndarray) -> dict[str, Callable[[Any], Any]]:
    """The float64 Gram ``G G^T`` of a float64 copy of ``G``, whole and in pieces.

    The set-up floor is the best time of either: the one pass over G that a
    set-up needs (its Gram, summed in float64; the m x m factor is not
    counted), as NumPy's BLAS does it (``dsyrk``). The copy is made once,
    outside the timing. Whole products are the faster on an idle machine (all
    BLAS threads); on a busy one each call of a multi-threaded BLAS waits for
    its slowest thread, so their best of a few rounds jumped by 50x from run
    to run, while the pieces (single-threaded) stayed within tens of percent.
    """
    m, d = G.shape
    G64 = G.astype(np.float64)
    gram = np.empty((m, m))

    def gram_pieces(_: Any) -> None:
        gram[...] = 0
        for lo in range(0, d, FLOOR_PIECE):
            piece = G64[:, lo : lo + FLOOR_PIECE]
            gram[...] += piece @ piece.T

    return {"gram": lambda _: G64 @ G64.T, "gram pieces": gram_pieces}


@dataclass
class _Row:
    variant: str
    dtype: str
    kappa: float
    ratio: float  # the largest error / bound over the test vectors
    error: float  # the error of that vector
    bound: float  # the bound of that vector
    setup: float
    setup_floor: float
    ihvp: float
    ihvp_floor: float

    @property
    def ok(self) -> bool:
        return bool(self.ratio <= 1.0)


def _blocks(d: int, block: int) -> list[slice]:
    return [slice(lo, min(lo + block, d)) for lo in range(0, d, block)]


def _build(G: np.ndarray, damp: float, block_size: int | None, _: Any) -> StaticIHVP:
    return StaticIHVP(G, damp=damp, block_size=block_size)


def _apply(op: StaticIHVP, x: np.ndarray, _: Any) -> np.ndarray:
    return op.matvec(x)


def _dense_block_inverse(G: np.ndarray, damp: float, block: int) -> list[np.ndarray]:
    """float64 ``inv`` of each diagonal block of ``damp I + G^T G / m``."""
    m, d = G.shape
    return [
        np.linalg.inv(damp * np.eye(b.stop - b.start) + G[:, b].T @ G[:, b] / m)
        for b in _blocks(d, block)
    ]


def _apply_blocks(invs: list[np.ndarray], X: np.ndarray) -> np.ndarray:
    parts, lo = [], 0
    for inv in invs:
        parts.append(inv @ X[lo : lo + inv.shape[0]])
        lo += inv.shape[0]
    return np.concatenate(parts, axis=0)


def reference_products(G: np.ndarray, X: np.ndarray, *, damp: float, block: int) -> np.ndarray:
    """``F^{-1} X`` for the stored gradients ``G``, refined in ``numpy.longdouble``.

    ``G`` holds the gradients as stored (rounded to the operator's dtype), ``X`` the
    vectors; both are taken as exact. The float64 dense inverse of each block of
    ``F = damp I + G^T G / m`` gives a first ``Y`` with an error of about
    ``eps(float64) ||x|| / (damp ||y||)`` (up to ``eps(float64) kappa``); each of
    ``REFINE_STEPS`` steps adds ``F_b^{-1} (x - F Y)``, the residual summed in
    ``numpy.longdouble`` through G (never forming F), which leaves ``eps(float64)``
    plus about ``eps(longdouble) ||x|| / (damp ||y||)``.

    Returns
    -------
    numpy.ndarray, float64
        The reference products, one column per column of ``X``.
    """
    m, d = G.shape
    G64 = G.astype(np.float64)
    invs = _dense_block_inverse(G64, damp, block)
    Y = _apply_blocks(invs, X.astype(np.float64))
    GL, XL = G.astype(np.longdouble), X.astype(np.longdouble)
    for _ in range(REFINE_STEPS):
        YL = Y.astype(np.longdouble)
        R = XL - damp * YL
        for b in _blocks(d, block):
            R[b] -= GL[:, b].T @ (GL[:, b] @ YL[b]) / m
        Y = Y + _apply_blocks(invs, R.astype(np.float64))
    return Y


def block_kappa(G: np.ndarray, damp: float, block: int) -> float:
    """``1 + max_b ||G_b||_2^2 / (m damp)``: the condition number of the block-diagonal F."""
    m, d = G.shape
    top = max(float(np.linalg.norm(G[:, b], 2)) ** 2 for b in _blocks(d, block))
    return 1.0 + top / (m * damp)


def error_ratios(
    Y: np.ndarray,
    reference: np.ndarray,
    X: np.ndarray,
    *,
    damp: float,
    kappa: float,
    dtype: Any,
    dense: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the relative error of ``Y`` and the bound StaticIHVP documents for it.

    ``reference`` is :func:`reference_products` of the stored gradients, ``X`` the
    vectors as given to the operator. float32: ``SINGLE_BOUND eps(float32) +
    eps(float64) kappa^1.5``; float64: ``C (eps(float64) sqrt(kappa) + eps(longdouble))
    ||x|| / (damp ||y||)``, ``C = BOUND_CONSTANT``, or ``C eps(float64) kappa`` for
    ``dense`` blocks (no wider than m: see the module's docstring).
    """
    X = X.astype(np.float64)
    ref_norm = np.linalg.norm(reference, axis=0)
    error = np.linalg.norm(Y.astype(np.float64) - reference, axis=0) / ref_norm
    eps64 = float(np.finfo(np.float64).eps)
    if np.dtype(dtype) == np.float32:
        single = SINGLE_BOUND * float(np.finfo(np.float32).eps) + eps64 * kappa**1.5
        return error, np.full_like(error, single)
    if dense:
        return error, np.full_like(error, BOUND_CONSTANT * eps64 * kappa)
    wide = float(np.finfo(np.longdouble).eps)
    scale = np.linalg.norm(X, axis=0) / (damp * ref_norm)
    return error, BOUND_CONSTANT * (eps64 * math.sqrt(kappa) + wide) * scale


LEGEND = """\
columns:
  variant    the F of the row: "full", or block-diagonal with blocks of B coordinates
             (B > m: Woodbury per block; B <= m: dense B x B inverses; the last block is
             shorter unless B divides d)
  dtype      the dtype of G, of the vectors and of the products
  kappa      1 + max over blocks of ||G_b||_2^2 / (m damp): the condition number of this F
  err/bound  the largest, over the {k} test vectors x, of rel.err / bound; ok when <= 1
  rel.err    ||y_hat - y|| / ||y|| of that vector, y = F^-1 x of the stored (rounded)
             gradients: the float64 dense inverse (numpy.linalg.inv) refined with residuals
             in long double; y_hat = StaticIHVP's product
  bound      StaticIHVP's docstring (Notes, "Precision") for that vector: float32
             {s:g} eps(float32) + eps(float64) kappa^1.5; float64 C eps(float64) sqrt(kappa)
             ||x|| / (damp ||y||), C = {c:g} (plus the reference's eps(long double) in the
             sum); ||x|| / (damp ||y||) is 1 for x orthogonal to the gradients and up to
             kappa in their span; dense blocks (B <= m, or the full F where d <= m)
             C eps(float64) kappa
  set-up     best of {r} builds of StaticIHVP; floor: best float64 G @ G.T of a float64
             copy of G (BLAS dsyrk; whole, or in pieces of {p} columns; {f} tries of each
             per round), timed in the same rounds as the builds
  IHVP       best of {r} products with one vector; floor: 2 m d itemsize bytes (G read twice)
             over the copy bandwidth, the copy ({f} tries per round) timed in the same
             rounds as the products
  ok         yes: every test vector within its bound; NO: one is not"""


def run_demo(
    *,
    m: int = 64,
    d: int = 2000,
    seed: int = 0,
    damp: float = DEFAULT_DAMP,
    out: TextIO,
    repeat: int = REPEAT,
) -> bool:
    """Run the demo, print its table to ``out`` and return whether every check passed."""
    if d > MAX_DENSE_DIM:
        raise ValueError(
            f"--d must be at most {MAX_DENSE_DIM} (the demo inverts the dense "
            f"d x d matrix in float64), got {d}"
        )
    if m > MAX_DEMO_GRADS:
        raise ValueError(f"--m must be at most {MAX_DEMO_GRADS}, got {m}")
    if damp > MAX_DEMO_DAMP:
        raise ValueError(
            f"--damp must be at most {MAX_DEMO_DAMP:.2g} for the demo (its float32 products, "
            f"of order 1 / damp, would leave float32's normal range), got {damp:g}"
        )
    G64 = demo_gradients(m, d, seed)
    full_kappa = block_kappa(G64, damp, d)  # the largest of the variants'
    if full_kappa > MAX_DEMO_KAPPA:
        raise ValueError(
            f"--damp {damp:g} gives kappa = {full_kappa:.3g} on the demo's gradients, more than "
            f"the {MAX_DEMO_KAPPA:.2g} (1e-3 / eps(float64)) that its reference can check: "
            "the float64 dense inverse it refines has too few correct digits there; pass a "
            "larger --damp"
        )
    rng = np.random.default_rng(seed + 1)
    # Two random vectors and two in the span of the gradients (the hard case).
    X64 = np.concatenate([rng.standard_normal((d, 2)), G64.T @ rng.standard_normal((m, 2))], axis=1)
    src = np.ones(COPY_BYTES // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages before timing

    half = max(1, m // 2)
    variants: list[tuple[str, int]] = [("full", d)]
    if d > 4 * m:
        variants.append((f"blocks B={4 * m}", 4 * m))
    if d > half:
        variants.append((f"blocks B={half}", half))

    # One interleaved session per dtype: every variant's set-up and product and the floors
    # (which depend on G and the machine, not on the variant) run once per round, so the
    # floors get repeat * len(variants) chances and all rows of a dtype share them.
    rows: list[_Row] = []
    bandwidth = 0.0
    for dtype in (np.float32, np.float64):
        G = G64.astype(dtype)
        X = X64.astype(dtype)
        x = X[:, 0].copy()
        candidates: dict[str, Callable[[Any], Any]] = {}
        checks = []
        for name, block in variants:
            size = None if block == d else block
            op = StaticIHVP(G, damp=damp, block_size=size)
            Y = np.stack([op.matvec(X[:, j]) for j in range(X.shape[1])], axis=1)
            # Against the stored gradients and vectors (rounded to dtype), as the bound is.
            kappa = block_kappa(G.astype(np.float64), damp, block)
            reference = reference_products(G, X, damp=damp, block=block)
            error, bound = error_ratios(
                Y, reference, X, damp=damp, kappa=kappa, dtype=dtype, dense=block <= m
            )
            checks.append((name, kappa, error, bound))
            candidates[f"setup {name}"] = functools.partial(_build, G, damp, size)
            candidates[f"ihvp {name}"] = functools.partial(_apply, op, x)
        # The floor kernels take well under a millisecond on the demo's sizes: each round
        # runs them FLOOR_TRIES times, so that a busy machine leaves some of the tries alone.
        for floor, fn in _setup_floor_candidates(G).items():
            for k in range(FLOOR_TRIES):
                candidates[f"{floor} {k}"] = fn
        for k in range(FLOOR_TRIES):
            candidates[f"copy {k}"] = lambda _: np.copyto(dst, src)
        # Megabyte arrays: no garbage collection between candidates (see interleaved).
        t = interleaved({k: (fn, None) for k, fn in candidates.items()}, repeat, collect=False)
        bandwidth = max(
            bandwidth, 2 * src.nbytes / min(t[f"copy {k}"].best for k in range(FLOOR_TRIES))
        )

        def best(*floors: str, t: dict = t) -> float:
            return min(t[f"{f} {k}"].best for f in floors for k in range(FLOOR_TRIES))

        setup_floor = best("gram", "gram pieces")
        for name, kappa, error, bound in checks:
            worst = int(np.argmax(error / bound))
            rows.append(
                _Row(
                    name,
                    np.dtype(dtype).name,
                    kappa,
                    float(error[worst] / bound[worst]),
                    float(error[worst]),
                    float(bound[worst]),
                    t[f"setup {name}"].best,
                    setup_floor,
                    t[f"ihvp {name}"].best,
                    0.0,
                )
            )
    # The bandwidth is a property of the machine: the best copy of all rounds, both dtypes.
    for r in rows:
        r.ihvp_floor = 2 * m * d * np.dtype(r.dtype).itemsize / bandwidth

    print(
        f"mfac-core demo: m={m} per-sample gradients of a logistic-regression model with "
        f"d={d} parameters (seed {seed}), damp={damp:g}; {X64.shape[1]} test vectors "
        f"(2 random, 2 in the span of the gradients); copy bandwidth "
        f"{bandwidth / 1e9:.3g} GB/s (best of all rounds)",
        file=out,
    )
    header = (
        "variant",
        "dtype",
        "kappa",
        "err/bound",
        "rel.err",
        "bound",
        "set-up",
        "floor",
        "IHVP",
        "floor",
        "ok",
    )
    table = [header] + [
        (
            r.variant,
            r.dtype,
            f"{r.kappa:.3g}",
            f"{r.ratio:.2g}",
            f"{r.error:.2e}",
            f"{r.bound:.2e}",
            fmt_time(r.setup),
            fmt_time(r.setup_floor),
            fmt_time(r.ihvp),
            fmt_time(r.ihvp_floor),
            ("yes*" if r.bound >= 1 else "yes") if r.ok else "NO",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip(),
            file=out,
        )
    print(
        LEGEND.format(
            k=X64.shape[1], s=SINGLE_BOUND, c=BOUND_CONSTANT, r=repeat, p=FLOOR_PIECE, f=FLOOR_TRIES
        ),
        file=out,
    )
    g_bytes = m * d * 8
    if g_bytes < COPY_BYTES // 2:
        print(
            f"note: G ({g_bytes / 2**20:.3g} MiB in float64) may fit in this machine's caches, "
            f"where an IHVP can beat the floor, which uses the bandwidth of a "
            f"{COPY_BYTES // 2**20} MiB copy",
            file=out,
        )
    if any(r.bound >= 1 for r in rows):
        print(
            "* a bound >= 1 cannot fail: at this kappa the dtype leaves no correct digits "
            "for that vector",
            file=out,
        )
    passed = all(r.ok for r in rows)
    print(
        "all errors within their bounds" if passed else "FAILED: an error exceeds its bound",
        file=out,
    )
    return passed
