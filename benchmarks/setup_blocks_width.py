"""Dense blocks' set-up, one block at a time: the C extension's kernels against LAPACK.

Usage::

    MFAC_CORE_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/setup_blocks_width.py

For each block shape (m rows, s columns; float32 G), the CPU time per block of
``_dense_blocks.fill_block_inverses`` through the kernels (``_KernelBlocks``) and through
SciPy's LAPACK (``_LapackBlocks``: ``dsyrk``, ``dpotrf``, ``dtrtri``), best of
``--repeat``, the two interleaved, whichever side of ``_KERNEL_MAX_SIZE`` the shape is.
The last shapes are narrow blocks on tall G (``--narrow``: those alone); at most
``--max-blocks`` blocks a shape. The load average is printed before and after: another
process on a core moves these.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from mfac_core import _dense_blocks, _fused
from mfac_core._layout import BlockGroup

#: Narrow blocks on tall G (block_size 1-16, diagonal-ish OBS pruning on m = 1024-8192).
NARROW = [(m, s) for m in (1024, 8192) for s in (1, 2, 4, 8, 16)]

SHAPES = [
    (256, 128),
    (256, 256),
    (4096, 128),
    (16384, 32),
    (2048, 256),
    (8192, 128),
    (384, 384),
    (512, 512),
    (4096, 384),
    (1024, 1024),
    (2048, 2048),
    *NARROW,
]


def per_block_us(G: np.ndarray, s: int, count: int, *, kernels: bool, repeat: int) -> float:
    """Best CPU microseconds per block of the set-up of ``count`` blocks of ``s`` columns."""
    saved = _fused.supports_blocks, _dense_blocks._KERNEL_MAX_SIZE
    _dense_blocks._KERNEL_MAX_SIZE = G.shape[0]  # every shape through the path asked for
    if not kernels:
        _fused.supports_blocks = lambda G: False
    try:
        best = float("inf")
        for _ in range(repeat):
            out = np.empty((count, s, s))
            t0 = time.process_time()
            _dense_blocks.fill_block_inverses(G, BlockGroup(0, count, s), out, damp=0.1)
            best = min(best, (time.process_time() - t0) / count * 1e6)
        return best
    finally:
        _fused.supports_blocks, _dense_blocks._KERNEL_MAX_SIZE = saved


def main() -> None:
    """Print one line per shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=float, default=1.2e8, help="m s^2 of blocks per shape")
    parser.add_argument("--max-blocks", type=int, default=4096, help="blocks per shape at most")
    parser.add_argument("--narrow", action="store_true", help="the narrow shapes only")
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: four shapes, little work"
    )
    args = parser.parse_args()
    shapes = NARROW if args.narrow else SHAPES
    if args.quick:
        shapes = [*shapes[:3], NARROW[2]] if not args.narrow else shapes[:4]
        args.work, args.repeat, args.max_blocks = 2e7, 1, 256
    rng = np.random.default_rng(0)
    warm = rng.standard_normal((64, 64)).astype(np.float32)  # imports, first calls: untimed
    for kernels in (True, False):
        per_block_us(warm, 8, 8, kernels=kernels, repeat=1)
    print("# load average before:", os.getloadavg())
    for m, s in shapes:
        count = max(2, min(args.max_blocks, int(args.work // (m * s * s))))
        G = rng.standard_normal((m, s * count)).astype(np.float32)
        us = {k: 1e18 for k in (True, False)}
        for _ in range(args.repeat):  # the two paths interleaved
            for kernels in (True, False):
                us[kernels] = min(us[kernels], per_block_us(G, s, count, kernels=kernels, repeat=1))
        print(
            f"m={m:5d} s={s:4d} blocks={count:4d} kernels {us[True]:11.2f} us  "
            f"LAPACK {us[False]:11.2f} us  ratio {us[True] / us[False]:.2f}",
            flush=True,
        )
    print("# load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
