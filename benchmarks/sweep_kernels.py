"""The damping sweep's second pass (``combine64`` with K rows) against one product.

Usage::

    python benchmarks/sweep_kernels.py                         # d = 1e6, m = 64 and 256
    python benchmarks/sweep_kernels.py --before OLD.so         # and another build, same run
    python benchmarks/sweep_kernels.py --threads 1 --threads 2 --repeat 9

A ``SpectralIHVP`` sweep over K dampings is one ``project64`` (G x) and one ``combine64``
with K rows of coefficients; a product is the same with one row. This script times, on
float32 G of m x d, interleaved (one run of each candidate per round, best of
``--repeat``): ``project64`` with one vector, ``combine64`` with 1, 2, 4 and K rows
(``--k``), and the operator's ``matvec`` and ``sweep``; with ``--before``, the same
through another build of ``mfac_core._fused._passes`` (e.g. main's), loaded beside this
tree's and swapped in for its rows; on a core that runs AVX-512 as two halves (AMD Zen 4),
the same build with its kernels always of the widest ISA ("widest"), against the automatic
choice (AVX2 where FMAs set the pace). Each thread count (``--threads``) has its own rounds;
the count is set through ``MFAC_CORE_NUM_THREADS``, which ``mfac_core._fused`` reads per
call.

Reported per build: ``combine64`` K rows / one row, the sweep / one product as the sum of
the passes alone, and as the operator's calls (target: 1.6x).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

# OpenBLAS's idle threads spin for about 0.1 s (2**28 cycles) after each call. Interleaved
# with a BLAS floor, the next candidate would share the cores with them and pay for the
# floor's threads (docs/design.rst, "Speed: how it is measured"); let them sleep at once.
# OpenBLAS reads this when it loads, hence before NumPy; a value in the environment wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np

if __package__ in (None, ""):  # run as a script: python benchmarks/sweep_kernels.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as common
else:  # python -m benchmarks.sweep_kernels
    from . import _common as common


def load_build(path: str) -> Any:
    """Another build of ``_passes`` (a shared object), loaded under its own module object."""
    loader = importlib.machinery.ExtensionFileLoader("_passes", path)
    spec = importlib.util.spec_from_file_location("_passes", path, loader=loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def candidates(
    builds: dict[str, Any], G: np.ndarray, damp: float, K: int, seed: int
) -> dict[str, Any]:
    """The timed calls: per build, the passes alone and the operator's product and sweep."""
    import mfac_core
    from mfac_core import _fused

    m, d = G.shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d, dtype=np.float32)
    rows = sorted({1, 2, 4, K})
    C = {k: rng.standard_normal((k, m)) for k in rows}
    alpha = {k: rng.random(k) for k in rows}
    damps = [damp * 10.0 ** (j / 2) for j in range(K)]
    spec = mfac_core.SpectralIHVP(G, damp=damp)
    cands = {}
    halves = _fused._AVX512_HALVES
    for tag, mod in builds.items():

        def use(mod: Any = mod, tag: str = tag) -> None:
            _fused._passes = mod
            # "widest": this build, its kernels always of the widest ISA.
            _fused._AVX512_HALVES = halves and tag != "widest"

        cands[f"{tag}|project64 K=1"] = (
            lambda _: _fused.project64(G, x[None], start=0, stop=d),
            use,
        )
        for k in rows:
            cands[f"{tag}|combine64 K={k}"] = (
                lambda _, k=k: _fused.combine64(
                    G, C[k], alpha[k], x, start=0, stop=d, dtype=np.float32
                ),
                use,
            )
        cands[f"{tag}|matvec"] = (lambda _: spec.matvec(x), use)
        cands[f"{tag}|sweep K={K}"] = (lambda _: spec.sweep(x, damps=damps), use)
    return cands


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, action="append", help="rows of G (default 64 and 256)")
    p.add_argument("--d", type=float, default=1e6, help="columns of G (default 1e6)")
    p.add_argument("--k", type=int, default=8, help="dampings of the sweep (default 8, at most 8)")
    p.add_argument("--threads", type=int, action="append", help="kernel threads (default 1, 2)")
    p.add_argument("--repeat", type=int, default=7, help="rounds (default 7)")
    p.add_argument("--before", help="another build of _passes (.so) to time beside this one")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from mfac_core import _fused

    if not _fused.available():
        sys.exit("mfac_core._fused is not built here: nothing to measure")
    builds = {"this": _fused._passes}
    if _fused._AVX512_HALVES:
        # This core runs AVX-512 as two halves: time the automatic choice (AVX2 for the
        # FMA-bound calls) against the widest ISA everywhere.
        builds = {"widest": _fused._passes, **builds}
    if args.before:
        builds = {"before": load_build(args.before), **builds}
    d, K = int(args.d), args.k
    for key, value in common.machine_facts():
        print(f"- {key}: {value}")
    print(f"- load average before: {os.getloadavg()}")
    rows = []
    for m in args.m or [64, 256]:
        rng = np.random.default_rng(args.seed)
        G = rng.standard_normal((m, d), dtype=np.float32)
        damp = float(np.sum(G.astype(np.float64) ** 2)) / m * 1e-4
        for threads in args.threads or [1, 2]:
            os.environ["MFAC_CORE_NUM_THREADS"] = str(threads)
            print(f"... m={m}, {threads} thread(s)", file=sys.stderr, flush=True)
            t = common.interleaved(candidates(builds, G, damp, K, args.seed + 1), args.repeat)
            for tag in builds:
                best = {name.split("|")[1]: t[name].best for name in t if name.startswith(tag)}
                p1, c1, ck = best["project64 K=1"], best["combine64 K=1"], best[f"combine64 K={K}"]
                mv, sw = best["matvec"], best[f"sweep K={K}"]
                rows.append(
                    [
                        m, threads, tag, common.fmt_time(p1),
                        *(common.fmt_time(best[f"combine64 K={k}"]) for k in (1, 2, 4)),
                        common.fmt_time(ck), f"{ck / c1:.2f}x", f"{(p1 + ck) / (p1 + c1):.2f}x",
                        common.fmt_time(mv), common.fmt_time(sw), f"{sw / mv:.2f}x",
                    ]
                )  # fmt: skip
        del G
    print(f"- load average after: {os.getloadavg()}")
    print()
    print(
        common.markdown_table(
            [
                "m", "threads", "build", "project64 K=1", "combine64 K=1", "K=2", "K=4", f"K={K}",
                f"K={K} / K=1", "passes: sweep / product", "matvec", f"sweep K={K}",
                "sweep / matvec",
            ],
            rows,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
