"""Benchmark of ``mfac_core.StaticIHVP`` on NumPy against measured machine floors.

Usage::

    python benchmarks/static.py                    # d = 1e6, m = 64 and 256, float32
    python benchmarks/static.py --m 64 --m 128 --d 2e6 --repeat 5
    python benchmarks/static.py --dtype float64 --block-size 4096
    python benchmarks/static.py --quick            # CI smoke run, d = 2e5, m = 32, < 1 min
    python benchmarks/static.py --no-memory        # skip the child processes
    python benchmarks/static.py --only-memmap      # only a read-only memmap G

It prints a header with the machine facts (CPU, cache, BLAS library, core type and
thread count, ``OPENBLAS_CORETYPE``, load) and markdown tables. The gradients are
Gaussian, scaled so that ``kappa = 1 + ||G||_F^2 / (m damp)`` is about 1e4 (timings do not
depend on it; it keeps float32 meaningful and silences ``IllConditionedWarning``).

The in-memory operator stores no ``W = U^{-T} G``: it keeps G by reference and, per
group of blocks wider than m, the float64 Cholesky factor of the capacitance matrix
``m damp I + G G^T`` (Gram summed in float64); blocks no wider than m keep float64
dense inverses. Its products read G twice, summed in float64 (the C extension's
``project64``/``combine64`` for float32 and 2-byte G; benchmarks/exact.py holds them
to the float32 two-pass floor).

**Set-up** (docs/design.rst): the time of ``StaticIHVP(G, damp=1e-5)`` (and of the
``check_finite=False`` and block-wise variants) over the BLAS floor, measured in the
same process and interleaved with it: the fastest float64 Gram ``G G^T`` of a float64
copy of G made beforehand (SciPy's ``dsyrk``, or NumPy's ``G64 @ G64.T``), which is the
whole set-up now that no W is built; the cast of G's pieces to float64, the check for
NaN/inf and the m x m Cholesky factor (O(m^3)) are not counted. The block-wise row is
held to the same floor: its Grams cost the same d m^2 flops whatever the block size (its
d / B factorisations add O(d m^3 / B)). Target: 1.5x (benchmarks/exact.py holds the
``check_finite=False`` set-up to 1.2x of ``dsyrk``).

**Block-wise set-up** (the settings pruning recipes use): ``StaticIHVP(G, damp,
block_size=B)`` at ``(m, B)`` = (1024, 50), (256, 128), (64, 128) and (64, 1024) over its
*compute floor*: the flops of the per-block work at the rate of one large float64 GEMM,
measured in the same run and interleaved with it. Per block of B <= m (dense inverse):
the Gram ``G_b^T G_b`` (m B^2, symmetric), its Cholesky factor (B^3 / 3) and the inverse
from the factor (2 B^3 / 3); per block of B > m (factor over G): the Gram ``G_b G_b^T``
(m^2 B, symmetric) and its Cholesky factor (m^3 / 3). All of it in float64. Target:
2.5x. ``--block-d`` sets d for these rows (default: d).

**IHVP**: ``op.matvec(x)`` and ``op.matmat(X)`` (k columns) over the streaming floor
``bytes / bandwidth``, where bytes = ``2 m d itemsize`` for ``matvec`` (G read twice;
the O(d) vector traffic is not counted) and ``(2 m + 2 k) d itemsize`` for ``matmat``
(G twice, X once, the result once). Two bandwidths, measured in the same run and
interleaved with the products: *copy* (``2 * nbytes / t`` of ``np.copyto``, the
convention of the target, 1.3x) and *read* (the fastest read-only BLAS pass, which is
what a product can at best reach; on machines where reading alone is slower than
copying, only this floor is reachable).

**Damping sweep** (``SpectralIHVP``): ``sweep(x, damps=...)`` for K = 8
dampings against one ``matvec`` of the same operator, interleaved in the same run
(target: 1.6x), and the diagonal at K dampings against one diagonal; with the passes
over G measured alone (GEMV passes in G's dtype, the K x m by m x d GEMM that BLAS
would do for the sweep's second pass, and the float64-accumulating kernels of
``mfac_core._fused`` that the operator's two passes use where they are built), against
one read of G at the read bandwidth. The product and the
sweep are timed twice: among the other calls, so right after BLAS calls (OpenBLAS's idle
threads spin for about 0.1 s after each threaded call and hold a core that the kernels'
threads then share), and after ``SWEEP_BLAS_PAUSE`` s without BLAS calls ("BLAS idle").
``--no-sweep`` skips it, ``--only-sweep`` runs only it.

**Memory**: in a fresh child process per row, the ``tracemalloc`` peak of the
constructor on top of G (NumPy reports its buffers to tracemalloc), shown as
``(size(G) + peak) / size(G)``, the bytes the operator keeps, and the growth of the peak
resident set (VmHWM, reset before the call; ``ru_maxrss`` where there is no /proc) as a
cross-check that also sees BLAS workspaces. The operator keeps G by reference and no
m x d array of its own: targets ``kept <= 2 F + 64 KiB``, where F is the bytes of its
float64 factors (``8 m^2`` per block wider than m, one for the full operator; ``8 B^2``
per block of B <= m columns: the dense inverses, ``8 d B`` bytes in all), and a set-up
peak of bounded float64 pieces, ``peak <= 0.1 size(G) + 2 F + 16 m^2`` float64 entries.
A row with B = m / 4 shows the dense inverses.

**Memmap** (G larger than memory; docs/guidance.rst): G written to a ``.npy`` file in
``--memmap-dir`` (default: the system's temporary directory) and reopened read-only; the
operator keeps that read-only map (nothing m x d in memory) and its products read the
file's pages. The set-up over the float64 Gram floor of the main table (the fastest
Gram of a float64 copy in memory, interleaved with it), and the products over the read bandwidth
of the same file (the fastest read-only BLAS pass over the map), both measured in the
same run. The file was just written, so the pages come from the page cache (warm):
dropping it needs root, so cold reads (the disk's speed) are not measured. Target for
a product: 1.3x. ``--no-memmap`` skips it, ``--only-memmap`` runs only it.

The last lines say how many cores other processes used during the run: timings taken
while that number is well above zero are not trustworthy on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.linalg import blas as sblas

if __package__ in (None, ""):  # run as a script: python benchmarks/static.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as common
else:  # python -m benchmarks.static
    from . import _common as common

SETUP_TARGET = 1.5
BLOCK_SETUP_TARGET = 2.5
#: (m, B) of the block-wise set-up rows (the settings of pruning recipes).
BLOCK_SETTINGS = ((1024, 50), (256, 128), (64, 128), (64, 1024))
QUICK_BLOCK_SETTINGS = ((64, 16), (32, 64))
IHVP_TARGET = 1.3
#: Set-up peak on top of G: at most this fraction of size(G) in float64 pieces (+ factors).
MEMORY_TARGET = 0.1
KAPPA = 1e4
SWEEP_TARGET = 1.6
SWEEP_DAMPINGS = 8
#: Seconds without BLAS calls before the "BLAS idle" rows: OpenBLAS's idle threads spin for
#: 2**28 cycles (its default THREAD_TIMEOUT, about 0.1 s) after each threaded call.
SWEEP_BLAS_PAUSE = 0.3


def make_grads(m: int, d: int, dtype: Any, damp: float, seed: int) -> np.ndarray:
    """Gaussian gradients scaled so that ``||G||_F^2 / (m damp)`` is about ``KAPPA``."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m, d), dtype=dtype)
    G *= dtype(np.sqrt(KAPPA * damp / d))
    return G


def _load_mfac() -> Any:
    import mfac_core

    return mfac_core


# -- set-up ------------------------------------------------------------------------------


def setup_candidates(G: np.ndarray, damp: float, block_size: int) -> tuple[dict, dict]:
    """Timing candidates for the set-up floor (the float64 Gram) and the operator's set-up."""
    mfac = _load_mfac()
    floor = gram_floor_candidates(G)
    ops = {
        "full": (lambda _: mfac.StaticIHVP(G, damp=damp), None),
        "full, check_finite=False": (
            lambda _: mfac.StaticIHVP(G, damp=damp, check_finite=False),
            None,
        ),
        f"block {block_size}": (
            lambda _: mfac.StaticIHVP(G, damp=damp, block_size=block_size),
            None,
        ),
    }
    return floor, ops


def gram_floor_candidates(G: np.ndarray) -> dict:
    """The float64 Gram ``G G^T`` of a float64 copy of G, made here (not timed)."""
    # G^T as a Fortran-ordered d x m float64 array: SciPy's dsyrk(trans=1) reads it as is.
    G64T = np.asfortranarray(G.T, dtype=np.float64)
    G64 = G64T.T  # the same values, C-ordered m x d
    return {
        "gram:dsyrk of a float64 copy": (lambda _: sblas.dsyrk(1.0, G64T, trans=1, lower=1), None),
        "gram:numpy G64 @ G64.T": (lambda _: G64 @ G64.T, None),
    }


def check_floor_kernels(G: np.ndarray) -> None:
    """The floor kernels must compute what they claim (checked on a slice of G)."""
    G = np.ascontiguousarray(G[:, :4096])
    floor = gram_floor_candidates(G)
    outs = {name: fn(None) for name, (fn, _) in floor.items()}
    want = G.astype(np.float64) @ G.T.astype(np.float64)
    scale = float(np.abs(want).max())
    for name, out in outs.items():
        err = float(np.abs(np.tril(out) - np.tril(want)).max()) / scale
        if err > 1e-12 or out.dtype != np.float64:
            raise AssertionError(f"floor kernel {name} is wrong: relative error {err:.2e}")


# -- block-wise set-up ----------------------------------------------------------------


def block_flops(m: int, B: int, d: int) -> float:
    """Flops of the block-wise set-up, all of it in float64.

    The minimal counts of the per-block work (see the module docstring): symmetric Grams
    and Cholesky factors; for blocks no wider than m also the dense inverse from the
    factor. Blocks wider than m keep their factor over G: no inverse, no ``L^{-1} G_b``.
    """
    full, ragged = divmod(d, B)
    flops = 0.0
    for count, size in ((full, B), (1 if ragged else 0, ragged)):
        if size <= m:
            flops += count * (m * size * size + size**3)
        else:
            flops += count * (m * m * size + m**3 / 3)
    return flops


def gemm_candidates(n: int) -> tuple[dict, Callable[[dict], float]]:
    """A candidate timing one large float64 GEMM; and its rate in flop/s."""
    a = np.random.default_rng(7).standard_normal((n, n))
    cands = {"gemm:float64": (lambda _: a @ a, None)}

    def rate(t: dict) -> float:
        return 2.0 * n**3 / t["gemm:float64"].best

    return cands, rate


def block_setup_rows(
    settings: list[tuple[int, int]],
    d: int,
    dtype: Any,
    damp: float,
    repeat: int,
    seed: int,
    gemm_n: int,
) -> tuple[list[list[Any]], list[str]]:
    """Rows of the block-wise set-up table, each setting timed interleaved with the GEMM."""
    mfac = _load_mfac()
    rows, notes = [], []
    for m, B in settings:
        print(f"... block-wise set-up m={m}, B={B}, d={d}", file=sys.stderr, flush=True)
        G = make_grads(m, d, dtype, damp, seed)
        cands, rate = gemm_candidates(gemm_n)
        cands["op"] = (lambda _, G=G, B=B: mfac.StaticIHVP(G, damp=damp, block_size=B), None)
        t = common.interleaved(cands, repeat)
        r = rate(t)
        flops = block_flops(m, B, d)
        floor_s = flops / r
        kind = "dense (B <= m)" if B <= m else "factor over G (B > m)"
        rows.append(
            [
                m,
                B,
                kind,
                common.fmt_time(t["op"].best),
                common.fmt_time(t["op"].median),
                f"{flops / 1e9:.1f}",
                common.fmt_time(floor_s),
                common.fmt_ratio(t["op"].best / floor_s, BLOCK_SETUP_TARGET),
            ]
        )
        notes.append(f"m={m}, B={B}: GEMM n={gemm_n} float64 {r / 1e9:.0f} GFlop/s")
        del G, cands
    return rows, notes


# -- products ----------------------------------------------------------------------------


def product_candidates(ops: dict[str, Any], d: int, k: int, dtype: Any, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal(d, dtype=dtype)
    X = rng.standard_normal((d, k), dtype=dtype)
    cands = {}
    for name, op in ops.items():
        cands[f"{name}|matvec"] = (lambda _, op=op: op.matvec(x), None)
        cands[f"{name}|matmat"] = (lambda _, op=op: op.matmat(X), None)
    return cands


def sweep_rows(
    m: int, d: int, dtype: Any, damp: float, repeat: int, seed: int, bw_mib: int
) -> tuple[list[list[Any]], str]:
    """The damping-sweep table: K dampings in one call vs one product, and the passes alone."""
    mfac = _load_mfac()
    K = SWEEP_DAMPINGS
    G = make_grads(m, d, dtype, damp, seed)
    spec = mfac.SpectralIHVP(G, damp=damp)
    rng = np.random.default_rng(seed + 2)
    x = rng.standard_normal(d, dtype=dtype)
    c = rng.standard_normal(m, dtype=dtype)
    C = rng.standard_normal((K, m), dtype=dtype)
    alphas = [float(a) for a in rng.random(K)]
    damps = [damp * 10.0 ** (j / 2) for j in range(K)]

    def gemm_rows(_: Any) -> Any:
        Y = C @ G
        for j, a in enumerate(alphas):
            Y[j] += a * x
        return Y

    from mfac_core import _fused

    def blas_asleep() -> None:
        time.sleep(SWEEP_BLAS_PAUSE)

    bw_cands, bw_result = common.bandwidth_candidates(bw_mib * common.MiB, dtype)
    # The passes alone run over G: the same shape, dtype and layout as the operator's V.
    cands = {
        **bw_cands,
        "matvec (one damping)": (lambda _: spec.matvec(x), None),
        f"sweep, {K} dampings": (lambda _: spec.sweep(x, damps=damps), None),
        # After a pause (not timed) in which OpenBLAS's idle threads stop spinning.
        "matvec, BLAS idle": (lambda _: spec.matvec(x), blas_asleep),
        f"sweep, {K} dampings, BLAS idle": (lambda _: spec.sweep(x, damps=damps), blas_asleep),
        "diagonal (one damping)": (lambda _: spec.diagonal(), None),
        f"diagonal, {K} dampings": (lambda _: spec.diagonal(damps=damps), None),
        "pass: G x (GEMV)": (lambda _: G @ x, None),
        "pass: c^T G (GEMV)": (lambda _: c @ G, None),
        f"pass: C G, C {K} x m (GEMM)": (lambda _: C @ G, None),
        "pass: C G + alpha_k x per row": (gemm_rows, None),
    }
    if _fused.supports64(G):
        X1, C64, a64 = x[None, :], C.astype(np.float64), np.asarray(alphas)
        cands["pass: G x (float64 kernel)"] = (
            lambda _: _fused.project64(G, X1, start=0, stop=d),
            None,
        )
        cands[f"pass: C G + alpha x, C {K} x m (float64 kernel)"] = (
            lambda _: _fused.combine64(G, C64, a64, x, start=0, stop=d, dtype=dtype),
            None,
        )
    t = common.interleaved(cands, max(repeat, 5))
    bw = bw_result(t)
    one_read = m * d * np.dtype(dtype).itemsize / bw.read
    rows = []
    for name in cands:
        if name.startswith("bw:"):
            continue
        best = t[name].best
        if name.startswith("pass"):
            ref, target = t["pass: G x (GEMV)"].best, None
        elif name.startswith("diagonal"):
            ref, target = t["diagonal (one damping)"].best, SWEEP_TARGET
        elif name.endswith("BLAS idle"):
            ref, target = t["matvec, BLAS idle"].best, SWEEP_TARGET
        else:
            ref, target = t["matvec (one damping)"].best, SWEEP_TARGET
        rows.append(
            [
                m,
                name,
                common.fmt_time(best),
                common.fmt_time(t[name].median),
                common.fmt_ratio(
                    best / ref,
                    None if name.startswith("matvec") or "one damping" in name else target,
                ),
                common.fmt_ratio(best / one_read),
            ]
        )
    kernels = (
        f"fused kernels ({_fused.best_isa()}, up to {_fused.max_threads()} threads)"
        if _fused.supports64(G)
        else "float64 column pieces (mfac_core._fused not built)"
    )
    note = (
        f"m={m}: one read of G ({common.fmt_bytes(m * d * np.dtype(dtype).itemsize)}) at "
        f"{bw.read / 1e9:.1f} GB/s ({bw.read_kernel}) = {common.fmt_time(one_read)}; "
        f"GEMM rate of C G: {2 * K * m * d / t[f'pass: C G, C {K} x m (GEMM)'].best / 1e9:.0f} "
        f"GFlop/s; sweep and diagonal through {kernels}"
    )
    return rows, note


# -- memory (child processes) ------------------------------------------------------------

#: label -> constructor keywords; ``block_size`` None is filled in: ``--block-size`` for
#: "block {bs}", m // 4 for the dense row (blocks no wider than m keep dense inverses).
MEMORY_VARIANTS = {
    "full": {},
    "full, check_finite=False": {"check_finite": False},
    "block {bs}": {"block_size": None},
    "block {bs}, dense inverses": {"block_size": None},
}


def factor_bytes(m: int, d: int, block_size: int | None) -> int:
    """Bytes of the operator's float64 factors: what it keeps besides G (by reference).

    ``8 m^2`` per block wider than m (the Cholesky factor of its capacitance matrix;
    the full operator is one such block when d > m), ``8 B^2`` per block of B <= m
    columns (its dense inverse).
    """
    B = d if block_size is None else min(block_size, d)
    full, ragged = divmod(d, B)
    return sum(
        count * 8 * (size * size if size <= m else m * m)
        for count, size in ((full, B), (1 if ragged else 0, ragged))
    )


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: build G, measure the constructor's peak memory."""
    mfac = _load_mfac()
    dtype = np.dtype(spec["dtype"]).type
    G = make_grads(spec["m"], spec["d"], dtype, spec["damp"], spec["seed"])
    kwargs = dict(spec["kwargs"])
    out = common.memory_probe(lambda: mfac.StaticIHVP(G, damp=spec["damp"], **kwargs))
    out["size_G"] = G.nbytes
    return out


def measure_memory(
    m: int, d: int, dtype: str, damp: float, seed: int, block_size: int
) -> list[list[str]]:
    rows = []
    for label, kwargs in MEMORY_VARIANTS.items():
        kwargs = dict(kwargs)
        if "block_size" in kwargs:
            bs = max(1, m // 4) if "dense" in label else block_size
            kwargs["block_size"] = bs
            label = label.format(bs=bs)
        spec = {"m": m, "d": d, "dtype": dtype, "damp": damp, "seed": seed, "kwargs": kwargs}
        res = common.run_child([os.path.abspath(__file__), "--_memory-child", json.dumps(spec)])
        size = res["size_G"]
        peak, kept = res["tracemalloc_peak"], res["tracemalloc_kept"]
        F = factor_bytes(m, d, kwargs.get("block_size"))
        kept_target = 2 * F + 64 * 1024
        peak_target = MEMORY_TARGET * size + 2 * F + 16 * m * m * 8
        rows.append(
            [
                m,
                label,
                common.fmt_bytes(size),
                common.fmt_bytes(F),
                common.fmt_bytes(kept) + (" ok" if kept <= kept_target else " MISS"),
                common.fmt_bytes(peak) + (" ok" if peak <= peak_target else " MISS"),
                f"{(size + peak) / size:.3f}",
                common.fmt_bytes(res["rss_growth"]),
                f"{(size + res['rss_growth']) / size:.3f}",
            ]
        )
    return rows


# -- memmap: a read-only G in a file -----------------------------------------------------


def memmap_rows(
    m: int, d: int, dtype: Any, damp: float, repeat: int, seed: int, k: int, where: str | None
) -> tuple[list, list]:
    """Set-up and products with a read-only memmap G (warm page cache)."""
    import tempfile
    import tracemalloc

    mfac = _load_mfac()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(dir=where, prefix="mfac-memmap-") as tmp:
        path = os.path.join(tmp, "G.npy")
        G_file = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(m, d))
        G_file[...] = make_grads(m, d, dtype, damp, seed)
        G_file.flush()
        del G_file
        G = np.load(path, mmap_mode="r")
        floor_cands = gram_floor_candidates(G)
        t = common.interleaved(
            {**floor_cands, "memmap G": (lambda _: mfac.StaticIHVP(G, damp=damp), None)}, repeat
        )
        gram = min(floor_cands, key=lambda n: t[n].best)
        floor = t[gram].best
        del floor_cands
        rows.append(
            [
                m,
                "memmap G",
                "set-up",
                common.fmt_time(t["memmap G"].best),
                common.fmt_time(floor),
                common.fmt_ratio(t["memmap G"].best / floor, SETUP_TARGET),
                "",
            ]
        )
        notes.append(
            f"m={m}: set-up floor = {gram[5:]} {common.fmt_time(floor)} (in memory; the "
            "operator reads the file's pages and casts them to float64 in pieces)"
        )
        tracemalloc.start()
        op = mfac.StaticIHVP(G, damp=damp)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        notes.append(
            f"m={m}: NumPy memory of that set-up (tracemalloc): peak {common.fmt_bytes(peak)}, "
            f"kept {common.fmt_bytes(kept)} (factor {common.fmt_bytes(factor_bytes(m, d, None))}),"
            f" for a G of {common.fmt_bytes(G.nbytes)} in the file; the operator keeps the "
            f"read-only map itself: {getattr(op, '_G', None) is G}"
        )
        wide = G.reshape(64, -1) if (m * d) % 64 == 0 else G
        flat = G.reshape(-1)
        vec = np.ones(wide.shape[1], dtype=dtype)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(d).astype(dtype)
        X = rng.standard_normal((d, k)).astype(dtype)
        prod_cands: dict = {
            "read:gemv": (lambda _: wide @ vec, None),
            "read:dot": (lambda _: np.dot(flat, flat), None),
            "matvec": (lambda _: op.matvec(x), None),
            f"matmat k={k}": (lambda _: op.matmat(X), None),
        }
        t = common.interleaved(prod_cands, max(repeat, 5))
        read_kernel = min(("read:gemv", "read:dot"), key=lambda n: t[n].best)
        bw = G.nbytes / t[read_kernel].best
        itemsize = np.dtype(dtype).itemsize
        for name, cols in (("matvec", 1), (f"matmat k={k}", k)):
            nbytes = 2 * m * d * itemsize + (2 * k * d * itemsize if cols > 1 else 0)
            best = t[name].best
            rows.append(
                [
                    m,
                    "memmap G",
                    name,
                    common.fmt_time(best),
                    common.fmt_time(nbytes / bw),
                    common.fmt_ratio(best / (nbytes / bw), IHVP_TARGET),
                    f"{bw / 1e9:.1f} GB/s ({read_kernel.split(':')[1]})",
                ]
            )
    return rows, notes


def print_memmap_table(rows: list, notes: list, where: str | None) -> None:
    """The memmap table (a read-only G in a file, warm page cache)."""
    import tempfile

    print(
        "\n## Memmap: a read-only G in a .npy file (warm page cache), the operator's only "
        "m x d array; set-up vs the float64 Gram floor, products vs the read bandwidth of the "
        f"same file; target set-up <= {SETUP_TARGET}x, product <= {IHVP_TARGET}x\n"
    )
    print(
        common.markdown_table(
            ["m", "operator", "call", "time (best)", "floor", "ratio", "read bw of G's file"],
            rows,
        )
    )
    print()
    for note in notes:
        print("- " + note)
    print(
        f"- files in {where or tempfile.gettempdir()}, just written: the pages come from the "
        "page cache; cold reads (from the disk) need the page cache dropped (root) and run at "
        "the disk's speed. Product floors: matvec 2 m d itemsize (G read twice), matmat "
        "(2 m + 2 k) d itemsize, over the read bandwidth of G's file."
    )


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=float, default=None, help="coordinates (default 1e6)")
    p.add_argument(
        "--m",
        type=int,
        action="append",
        default=None,
        help="number of gradients; repeat for several (default 64 and 256)",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of)")
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--k", type=int, default=8, help="columns for matmat")
    p.add_argument(
        "--bw-mib",
        type=int,
        default=None,
        help="array size for the bandwidth runs (default max(1024, 4 x LLC))",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memmap", action="store_true", help="skip the memmap table")
    p.add_argument("--only-memmap", action="store_true", help="run only the memmap table")
    p.add_argument(
        "--memmap-dir", default=None, help="where the memmap files go (default: a temp dir)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory table")
    p.add_argument("--no-sweep", action="store_true", help="skip the damping-sweep table")
    p.add_argument("--only-sweep", action="store_true", help="run only the damping-sweep table")
    p.add_argument(
        "--block-d",
        type=float,
        default=None,
        help="d for the block-wise set-up rows (default: --d)",
    )
    p.add_argument(
        "--block",
        action="append",
        default=None,
        metavar="M,B",
        help="(m, B) of a block-wise set-up row; repeat for several "
        "(default: the pruning settings; 'none' skips the table)",
    )
    p.add_argument("--only-block", action="store_true", help="run only the block-wise set-up table")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: d=2e5, m=32, 2 repeats, small bandwidth arrays",
    )
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.d = args.d or 2e5
        args.m = args.m or [32]
        args.repeat = args.repeat or 2
        args.bw_mib = args.bw_mib or 128
    args.d = int(args.d or 1e6)
    args.block_d = int(args.block_d or args.d)
    if args.only_memmap:
        args.block = ["none"]
    if args.block is None:
        args.block = list(QUICK_BLOCK_SETTINGS if args.quick else BLOCK_SETTINGS)
    elif args.block == ["none"]:
        args.block = []
    else:
        args.block = [tuple(int(v) for v in b.split(",")) for b in args.block]
    if args.only_sweep:
        args.block = []
    args.m = args.m or [64, 256]
    args.repeat = args.repeat or 3
    if args.bw_mib is None:
        llc = common.last_level_cache_bytes() or 0
        args.bw_mib = max(1024, 4 * llc // common.MiB)
    return args


def print_main_tables(
    args: argparse.Namespace,
    setup_rows: list,
    floor_notes: list,
    ihvp_rows: list,
    bw_notes: list,
    mem_rows: list,
) -> None:
    """The set-up, IHVP and memory tables of the ``--m`` runs."""
    itemsize, d = np.dtype(args.dtype).itemsize, args.d
    print(
        "\n## Set-up: time of the constructor vs BLAS floor (the float64 Gram of a float64 "
        f"copy of G), target <= {SETUP_TARGET}x\n"
    )
    print(
        common.markdown_table(
            ["m", "operator", "set-up (best)", "(median)", "floor", "ratio"], setup_rows
        )
    )
    print()
    for note in floor_notes:
        print("- " + note)
    print(
        "- the floor excludes making the float64 copy (the operator casts G to float64 a "
        "bounded piece at a time and writes nothing m x d), the NaN/inf check and the m x m "
        "Cholesky factor (O(m^3)); the block row is held to the same floor, although each "
        "of its d/B blocks adds its own factorisation ((d/B) m^3 / 3 flops of small-matrix "
        "LAPACK; blocks no wider than m their dense inverse as well). At small m the Gram "
        "is bound by reading the float64 copy (twice the bytes of a float32 G), which the "
        "operator's cached pieces avoid: ratios below 1 are possible there."
    )

    print(f"\n## IHVP: product time vs streaming floor, target <= {IHVP_TARGET}x (copy bw)\n")
    print(
        common.markdown_table(
            [
                "m",
                "operator",
                "product",
                "time (best)",
                "per vector",
                "floor (copy bw)",
                "ratio",
                "floor (read bw)",
                "ratio (read)",
            ],
            ihvp_rows,
        )
    )
    print(
        f"\n- floor bytes: matvec 2*m*d*{itemsize}; matmat (2*m + 2*k)*d*{itemsize}. "
        "copy bw counts read+write (2 x nbytes per np.copyto); read bw = fastest read-only "
        "BLAS pass."
    )
    for note in bw_notes:
        print("- " + note)
    llc = common.last_level_cache_bytes()
    if llc:
        small = [m for m in args.m if m * d * itemsize < 2 * llc]
        if small:
            print(
                f"- note: G for m={small} is smaller than 2 x LLC ({common.fmt_bytes(llc)}); "
                "part of it may stay in cache between products, so ratios < 1 are possible."
            )

    if mem_rows:
        print(
            "\n## Memory of the set-up (fresh child process per row): G is kept by "
            "reference, so the operator keeps its float64 factors F alone; targets kept <= "
            f"2 F + 64 KiB, peak <= {MEMORY_TARGET} size(G) + 2 F + 16 m^2 float64\n"
        )
        print(
            common.markdown_table(
                [
                    "m",
                    "operator",
                    "size(G)",
                    "factors F",
                    "kept after",
                    "tracemalloc peak",
                    "(G+peak)/G",
                    "peak RSS growth",
                    "(G+RSS growth)/G",
                ],
                mem_rows,
            )
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    warnings.simplefilter("ignore", category=UserWarning)  # IllConditionedWarning etc.
    monitor = common.CpuMonitor()
    dtype = np.dtype(args.dtype).type
    itemsize = np.dtype(dtype).itemsize
    d, k, bs = args.d, args.k, args.block_size

    print("# StaticIHVP benchmark (benchmarks/static.py)\n")
    for name, value in common.machine_facts():
        print(f"{name + ':' if name else '':28s} {value}")
    print(
        f"{'parameters:':28s} d={d}, m={args.m}, dtype={args.dtype}, damp={args.damp:g}, "
        f"block_size={bs}, k={k}, best of {args.repeat} (interleaved), kappa~{KAPPA:g}"
    )
    print(
        f"{'block-wise set-up:':28s} (m, B) in {args.block}, d={args.block_d}"
        + (" (only this table)" if args.only_block else "")
    )

    setup_rows, ihvp_rows, mem_rows, floor_notes, bw_notes = [], [], [], [], []
    mm_rows: list = []
    mm_notes: list = []
    if args.only_memmap:
        args.only_block = True
        for m in args.m:
            print(f"... m={m}: memmap G", file=sys.stderr, flush=True)
            r, n = memmap_rows(m, d, dtype, args.damp, args.repeat, args.seed, k, args.memmap_dir)
            mm_rows.extend(r)
            mm_notes.extend(n)
        print_memmap_table(mm_rows, mm_notes, args.memmap_dir)
    sweep_table: list[list[Any]] = []
    sweep_notes: list[str] = []
    block_rows, block_notes = block_setup_rows(
        args.block,
        args.block_d,
        dtype,
        args.damp,
        args.repeat,
        args.seed,
        1024 if args.quick else 2048,
    )
    for m in [] if args.only_block else args.m:
        if args.only_sweep:
            print(f"... m={m}: damping sweep", file=sys.stderr, flush=True)
            rows, note = sweep_rows(m, d, dtype, args.damp, args.repeat, args.seed, args.bw_mib)
            sweep_table += rows
            sweep_notes.append(note)
            continue
        print(
            f"... m={m}: building G ({common.fmt_bytes(m * d * itemsize)})",
            file=sys.stderr,
            flush=True,
        )
        G = make_grads(m, d, dtype, args.damp, args.seed)
        check_floor_kernels(G)

        # Set-up: floor kernels and operators, interleaved.
        print(f"... m={m}: set-up timings", file=sys.stderr, flush=True)
        floor, ops = setup_candidates(G, args.damp, bs)
        t = common.interleaved({**floor, **ops}, args.repeat)
        gram = min(floor, key=lambda n: t[n].best)
        floor_s = t[gram].best
        floor_notes.append(
            f"m={m}: floor = {gram[5:]} {common.fmt_time(floor_s)} "
            f"({m * m * d / floor_s / 1e9:.0f} GFlop/s counting m^2 d); all "
            "candidates: "
            + ", ".join(f"{n.split(':', 1)[1]} {common.fmt_time(t[n].best)}" for n in floor)
        )
        for name in ops:
            ratio = t[name].best / floor_s
            setup_rows.append(
                [
                    m,
                    name,
                    common.fmt_time(t[name].best),
                    common.fmt_time(t[name].median),
                    common.fmt_time(floor_s),
                    common.fmt_ratio(ratio, SETUP_TARGET),
                ]
            )
        del floor, ops

        # Products, interleaved with the bandwidth runs.
        print(f"... m={m}: product timings", file=sys.stderr, flush=True)
        mfac = _load_mfac()
        # Both operators keep this G by reference (nothing m x d of their own).
        prod_ops = {
            "full": mfac.StaticIHVP(G, damp=args.damp),
            f"block {bs}": mfac.StaticIHVP(G, damp=args.damp, block_size=bs),
        }
        del G
        bw_cands, bw_result = common.bandwidth_candidates(args.bw_mib * common.MiB, dtype)
        cands = {**bw_cands, **product_candidates(prod_ops, d, k, dtype, args.seed)}
        t = common.interleaved(cands, max(args.repeat, 5))
        bw = bw_result(t)
        del bw_cands, cands
        bw_notes.append(
            f"m={m}: copy {bw.copy / 1e9:.1f} GB/s (2 x {common.fmt_bytes(bw.nbytes)}"
            f" per copy), read {bw.read / 1e9:.1f} GB/s ({bw.read_kernel})"
        )
        for name in prod_ops:
            for prod, cols in (("matvec", 1), ("matmat", k)):
                nbytes = 2 * m * d * itemsize + (2 * k * d * itemsize if prod == "matmat" else 0)
                best = t[f"{name}|{prod}"].best
                f_copy, f_read = nbytes / bw.copy, nbytes / bw.read
                ihvp_rows.append(
                    [
                        m,
                        name,
                        prod if cols == 1 else f"matmat k={k}",
                        common.fmt_time(best),
                        common.fmt_time(best / cols),
                        common.fmt_time(f_copy),
                        common.fmt_ratio(best / f_copy, IHVP_TARGET),
                        common.fmt_time(f_read),
                        common.fmt_ratio(best / f_read),
                    ]
                )
        del prod_ops

        if not args.no_sweep:
            print(f"... m={m}: damping sweep", file=sys.stderr, flush=True)
            rows, note = sweep_rows(m, d, dtype, args.damp, args.repeat, args.seed, args.bw_mib)
            sweep_table += rows
            sweep_notes.append(note)

        if not args.no_memory:
            print(f"... m={m}: memory (child processes)", file=sys.stderr, flush=True)
            mem_rows.extend(measure_memory(m, d, args.dtype, args.damp, args.seed, bs))

        if not args.no_memmap:
            print(f"... m={m}: memmap G", file=sys.stderr, flush=True)
            r, n = memmap_rows(m, d, dtype, args.damp, args.repeat, args.seed, k, args.memmap_dir)
            mm_rows.extend(r)
            mm_notes.extend(n)

    if block_rows:
        print(
            f"\n## Block-wise set-up (d={args.block_d}) vs compute floor (per-block flops at "
            f"the rate of one large GEMM), target <= {BLOCK_SETUP_TARGET}x\n"
        )
        print(
            common.markdown_table(
                ["m", "B", "blocks", "set-up (best)", "(median)", "GFlop", "floor", "ratio"],
                block_rows,
            )
        )
        print()
        for note in block_notes:
            print("- " + note)
    if not args.only_block and not args.only_sweep:
        print_main_tables(args, setup_rows, floor_notes, ihvp_rows, bw_notes, mem_rows)
        if mm_rows:
            print_memmap_table(mm_rows, mm_notes, args.memmap_dir)
    if sweep_table:
        print(
            f"\n## Damping sweep (SpectralIHVP): {SWEEP_DAMPINGS} dampings in one call vs "
            f"the same call at one damping, target <= {SWEEP_TARGET}x; the passes alone vs "
            "one GEMV pass\n"
        )
        print(
            common.markdown_table(
                ["m", "call", "best", "median", "/ one damping (or / GEMV)", "/ one read of V"],
                sweep_table,
            )
        )
        print()
        for note in sweep_notes:
            print("- " + note)
    foreign = monitor.foreign_cores()
    if foreign is not None:
        print(
            f"\nOther processes used {foreign:.2f} CPU cores on average during this run"
            + (" -- timings are disturbed; rerun on a quiet machine." if foreign > 0.25 else ".")
        )
    if hasattr(os, "getloadavg"):
        print("load average at the end: " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
