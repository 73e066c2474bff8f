"""The ``mfac-core demo`` problem: realistic gradients, checked against a dense inverse.

Nothing is downloaded. The gradients are the per-sample gradients of a
logistic-regression model (``d - 1`` weights and a bias) trained for a few
steps on synthetic data with low-rank structure, all drawn from a fixed seed.
Their norms vary by an order of magnitude, as real per-sample gradients do,
and the Gram matrix has a decaying spectrum.

The demo builds :class:`~mfac_core.StaticIHVP` (full and block-wise, in
float32 and float64), compares its products with the inverse of the dense
``d x d`` matrix computed by :func:`numpy.linalg.inv` in float64, and times
the set-up and one IHVP next to the floors measured in the same process:

- IHVP floor: ``2 m d itemsize`` bytes (G is read twice) over the copy
  bandwidth of this machine, measured by timing :func:`numpy.copyto` of a
  large array (bytes read plus bytes written, as in STREAM);
- set-up floor: the time of ``G @ G.T`` plus one
  :func:`scipy.linalg.solve_triangular` of an ``m x m`` factor on ``G``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import scipy.linalg

from ._static import StaticIHVP
from ._timing import best_time, copy_bandwidth, fmt_time

__all__ = ["DEFAULT_DAMP", "MAX_DEMO_GRADS", "MAX_DENSE_DIM", "demo_gradients", "run_demo"]

#: The demo's default damping: the gradients below have squared norms of about 0.1 to 1,
#: so this gives a condition number of a few thousand (the paper's 1e-5 gives ~25 000).
DEFAULT_DAMP = 1e-4

#: The largest d for which the demo builds the dense d x d reference inverse.
MAX_DENSE_DIM = 6000

#: The largest m the demo accepts (its synthetic data set has 4 m samples of d features).
MAX_DEMO_GRADS = 4096

#: Safety factor of the tolerance ``eps(dtype) * kappa * TOL_FACTOR``.
TOL_FACTOR = 100.0


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


def _best_time(fn: Callable[[], Any], repeat: int) -> float:
    return best_time(lambda _: fn(), repeat).best


#: Size of each of the two arrays copied to measure the bandwidth.
COPY_BYTES = 2**26


def setup_floor(G: np.ndarray, damp: float, repeat: int = 3) -> float:
    """Seconds for ``G @ G.T`` plus one triangular solve on G, in G's dtype.

    Each of the two is timed on its own (best of ``repeat``) and the times are
    added: a floor is the best the BLAS of this process can do.
    """
    m = G.shape[0]
    C = G.astype(np.float64) @ G.T.astype(np.float64) + m * damp * np.eye(m)
    L = np.linalg.cholesky(C).astype(G.dtype)
    gram = _best_time(lambda: G @ G.T, repeat)
    solve = _best_time(
        lambda: scipy.linalg.solve_triangular(L, G, lower=True, check_finite=False), repeat)
    return gram + solve


@dataclass
class _Row:
    variant: str
    dtype: str
    error: float
    tol: float
    setup: float
    setup_floor: float
    ihvp: float
    ihvp_floor: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)


def _dense_block_inverse(G: np.ndarray, damp: float, block: int) -> list[np.ndarray]:
    """float64 ``inv`` of each diagonal block of ``damp I + G^T G / m``."""
    m, d = G.shape
    out = []
    for lo in range(0, d, block):
        Gb = G[:, lo:lo + block]
        out.append(np.linalg.inv(damp * np.eye(Gb.shape[1]) + Gb.T @ Gb / m))
    return out


def _apply_blocks(invs: list[np.ndarray], X: np.ndarray) -> np.ndarray:
    parts, lo = [], 0
    for inv in invs:
        parts.append(inv @ X[lo:lo + inv.shape[0]])
        lo += inv.shape[0]
    return np.concatenate(parts, axis=0)


def run_demo(*, m: int = 64, d: int = 2000, seed: int = 0, damp: float = DEFAULT_DAMP,
             out: TextIO, repeat: int = 5) -> bool:
    """Run the demo, print its table to ``out`` and return whether every check passed."""
    if d > MAX_DENSE_DIM:
        raise ValueError(f"--d must be at most {MAX_DENSE_DIM} (the demo inverts the dense "
                         f"d x d matrix in float64), got {d}")
    if m > MAX_DEMO_GRADS:
        raise ValueError(f"--m must be at most {MAX_DEMO_GRADS}, got {m}")
    G64 = demo_gradients(m, d, seed)
    gram_eigs = np.linalg.eigvalsh(G64 @ G64.T)
    kappa = 1.0 + max(float(gram_eigs[-1]), 0.0) / (m * damp)
    rng = np.random.default_rng(seed + 1)
    # Two random vectors and two in the span of the gradients (the hard case).
    X64 = np.concatenate([rng.standard_normal((d, 2)), G64.T @ rng.standard_normal((m, 2))],
                         axis=1)
    bandwidth = copy_bandwidth(COPY_BYTES)

    half = max(1, m // 2)
    variants: list[tuple[str, int | None]] = [("full", None)]
    if d > 4 * m:
        # Blocks wider than m use Woodbury; the last block is ragged unless d divides.
        variants.append((f"blocks B={4 * m}", 4 * m))
    if d > half:
        variants.append((f"blocks B={half} (dense)", half))

    print(f"mfac-core demo: m={m} per-sample gradients of a logistic-regression model with "
          f"d={d} parameters (seed {seed}), damp={damp:g}", file=out)
    print(f"kappa = 1 + ||G||_2^2 / (m damp) = {kappa:.4g}; tolerance = eps(dtype) * kappa * "
          f"{TOL_FACTOR:g}; copy bandwidth {bandwidth / 1e9:.3g} GB/s", file=out)

    rows: list[_Row] = []
    for name, block in variants:
        invs = _dense_block_inverse(G64, damp, block or d)
        reference = _apply_blocks(invs, X64)
        for dtype in (np.float32, np.float64):
            G = G64.astype(dtype)
            X = X64.astype(dtype)
            eps = float(np.finfo(dtype).eps)
            op = StaticIHVP(G, damp=damp, block_size=block)
            def build(G: np.ndarray = G, block: int | None = block) -> StaticIHVP:
                return StaticIHVP(G, damp=damp, block_size=block)

            setup = _best_time(build, repeat)
            Y = np.stack([op.matvec(X[:, j]) for j in range(X.shape[1])], axis=1)
            error = float(np.max(np.linalg.norm(Y - reference, axis=0)
                                 / np.linalg.norm(reference, axis=0)))
            x = X[:, 0].copy()
            ihvp = _best_time(lambda: op.matvec(x), repeat)  # noqa: B023 (called at once)
            rows.append(_Row(name, np.dtype(dtype).name, error, eps * kappa * TOL_FACTOR,
                             setup, setup_floor(G, damp, repeat),
                             ihvp, 2 * m * d * G.itemsize / bandwidth))

    header = ("variant", "dtype", "rel.err", "tolerance", "set-up", "floor", "IHVP", "floor",
              "ok")
    table = [header] + [
        (r.variant, r.dtype, f"{r.error:.2e}", f"{r.tol:.2e}", fmt_time(r.setup),
         fmt_time(r.setup_floor), fmt_time(r.ihvp), fmt_time(r.ihvp_floor),
         ("yes*" if r.tol >= 1 else "yes") if r.ok else "NO")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip(),
              file=out)
    g_bytes = m * d * 8
    if g_bytes < COPY_BYTES // 2:
        print(f"note: G ({g_bytes / 2**20:.3g} MiB in float64) may fit in this machine's caches, "
              f"where an IHVP can beat the floor, which uses the bandwidth of a "
              f"{COPY_BYTES // 2**20} MiB copy", file=out)
    if any(r.tol >= 1 for r in rows):
        print("* a tolerance >= 1 cannot fail: at this kappa the dtype leaves no correct digits "
              "in the worst direction", file=out)
    passed = all(r.ok for r in rows)
    print("all errors within tolerance" if passed else "FAILED: an error exceeds its tolerance",
          file=out)
    return passed
