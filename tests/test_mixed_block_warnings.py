"""IllConditionedWarning of block operators whose blocks are of both kinds (mfac_core._setup).

Blocks wider than m are applied through the Woodbury capacitance (warned of from eps64
kappa**1.5 >= 1), blocks no wider than m from F_b's own factor (from eps64 kappa >= 1/32).
A ragged last block no wider than m beside wider blocks is judged by its own rule.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mfac_core import IllConditionedWarning, ShardedStaticIHVP, StaticIHVP
from mfac_core.testing import extended_precision_inverse, run_spmd_threads

EPS64 = 2.0**-52
M, D, BLOCK = 4, 10, 6  # blocks of 6 columns (wider than m = 4) and a ragged one of 4


def _gradients(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """G whose ragged block (rank 3 over 4 columns) sets kappa, and its top eigenvalue."""
    G = rng.standard_normal((M, D)) * 1e-3  # the wide block: kappa below 1e6 throughout
    G[:, 6:9] = rng.standard_normal((M, 3))
    G[:, 9] = 0.0
    ragged = G[:, 6:]
    return G, float(np.linalg.eigvalsh(ragged.T @ ragged / M)[-1])


def _sharded(G: np.ndarray, damp: float) -> list:
    """Two ranks on threads: rank 0 holds the wide block, rank 1 the ragged one."""

    def fn(comm):
        cols = slice(0, BLOCK) if comm.rank == 0 else slice(BLOCK, D)
        return ShardedStaticIHVP(G[:, cols].copy(), damp=damp, block_size=BLOCK, comm=comm)

    ops = run_spmd_threads(fn, 2, timeout=20)
    for op in ops:  # a rank's exception (a warning turned into an error) comes back as such
        if isinstance(op, BaseException):
            raise op
    return ops


def _dask(G: np.ndarray, damp: float):
    da = pytest.importorskip("dask.array")
    import dask

    from mfac_core import DaskStaticIHVP

    with dask.config.set(scheduler="synchronous"):
        return DaskStaticIHVP(da.from_array(G, chunks=(M, BLOCK)), damp=damp, block_size=BLOCK)


@pytest.mark.parametrize("build", ["static", "sharded", "dask"])
def test_a_ragged_dense_block_is_judged_by_the_dense_rule(rng, build):
    # Regression: kappa_lo was the largest over every factor, judged by the Woodbury rule
    # wherever some block is wider than m: the rank-deficient ragged block at kappa 1e12
    # warned (eps64 kappa**1.5 = 2e2) where the stored gradients' products were 3e-8 off.
    # It keeps the dense blocks' eps64 kappa >= 1/32 now, and warns by it at kappa 2e14.
    G, top = _gradients(rng)
    quiet, loud = top / 1e12, top / 2e14  # the ragged block's kappa is 1 + top / damp
    make = {
        "static": lambda damp: StaticIHVP(G, damp=damp, block_size=BLOCK),
        "sharded": lambda damp: _sharded(G, damp),
        "dask": lambda damp: _dask(G, damp),
    }[build]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = make(quiet)
    if build == "static":
        x = rng.standard_normal(D)
        for cols in (slice(0, BLOCK), slice(BLOCK, D)):
            want = extended_precision_inverse(G[:, cols], quiet, x[cols])
            err = np.linalg.norm((op @ x)[cols] - want) / np.linalg.norm(want)
            assert err <= EPS64 * 1e12
    with pytest.warns(IllConditionedWarning, match="eps \\* kappa >= 1/32"):
        make(loud)


def test_the_wide_blocks_still_warn_by_the_woodbury_rule(rng):
    # The same operator with the wide block ill-conditioned (its kappa ~1e11, the ragged
    # block's ~1e6): the Woodbury rule, eps64 kappa**1.5 >= 1, decides.
    G, _ = _gradients(rng)
    G[:, 6:] *= 1e-3
    G[:, :BLOCK] = rng.standard_normal((M, BLOCK))
    wide = G[:, :BLOCK]
    damp = float(np.linalg.eigvalsh(wide @ wide.T)[-1]) / M / 1e11
    with pytest.warns(IllConditionedWarning, match="eps \\* kappa\\*\\*1.5 >= 1"):
        StaticIHVP(G, damp=damp, block_size=BLOCK)
