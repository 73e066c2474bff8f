"""Benchmark of the jitted JAX M-FAC step (``mfac_core.jax``) against the two-pass floor.

Usage::

    python benchmarks/jax_optimizer.py             # d = 1e6, m = 64, 256, 1024, float32
    python benchmarks/jax_optimizer.py --m 256 --d 2e6 --repeat 7
    python benchmarks/jax_optimizer.py --quick     # CI smoke run (< 30 s): d = 1e5, m = 32

Everything runs on JAX's CPU backend, in 64-bit mode (the m x m work is float64; the
window is float32 unless ``--dtype float64``). Measured, interleaved round-robin with
the best-of-``repeat`` rule of ``_common``:

- **window step**: ``jax.jit(window_update_and_matvec, donate_argnums=0)`` on a full
  window: replace the oldest gradient, then ``F^{-1} g``. Donation lets XLA update
  the m x d window in place;
- **optax step**: ``mfac(m, damp)`` chained with ``optax.scale(-lr)`` and
  ``optax.apply_updates`` on a pytree of four parameter arrays, jitted with the
  parameters and the optimizer state donated: the window step plus flattening the
  gradient pytree and unflattening the direction (O(d) each);
- **copy**: ``np.copyto`` of a large array, which gives the copy bandwidth
  ``2 * nbytes / t`` (one read and one write per byte), and the fastest read-only
  BLAS pass, which gives the read bandwidth (``_common.bandwidth_candidates``);
  and XLA's own streaming bandwidth, an in-place ``x + 1`` of a donated array of the
  same size.

The **floor** of a step is two passes over the m x d window (``G g`` and
``G^T c``): ``2 m d itemsize`` bytes at the copy bandwidth measured in the same run.
The second table times the m x m part of one step (float64, independent of d): the
O(m^2) Cholesky row replacement, the O(m^3) refactorisation it avoids, and the two
triangular solves of the product, per call over bursts of 10 back-to-back calls (a
lone call after idling pays XLA's thread-pool wake-up, which a running step does not).
The last line says how many cores other processes used: timings taken while that is
well above zero are not trustworthy on a small machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import numpy as np

if __package__ in (None, ""):  # run as a script: python benchmarks/jax_optimizer.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import optax
from _common import (
    CpuMonitor,
    bandwidth_candidates,
    fmt_ratio,
    fmt_time,
    interleaved,
    machine_facts,
    markdown_table,
)

from mfac_core import _jax_common, _jax_static, _jax_window, _linalg
from mfac_core import jax as mj

MiB = 2**20
#: Back-to-back calls per timed run of the m x m table (see mm_row).
BURST = 10


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
        help="window sizes (repeatable; default 64, 256, 1024)",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--repeat", type=int, default=None, help="runs per timing (best of)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CI smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.d = args.d or 1e5
        args.m = args.m or [32]
        args.repeat = args.repeat or 3
    args.d = int(args.d or 1e6)
    args.m = args.m or [64, 256, 1024]
    args.repeat = args.repeat or 5
    return args


def _scale(m: int, d: int, damp: float) -> float:
    # Gradients scaled so that kappa ~ 1e4, as in dynamic.py: realistic for float32,
    # no effect on timings.
    return float(np.sqrt(1e4 * damp * m / (m + d + 2 * np.sqrt(m * d))))


def _params(d: int, dtype: str) -> dict[str, jax.Array]:
    """Four parameter arrays with d entries in all (a pytree, as optax users have)."""
    sizes = [d // 2, d // 4, d // 8]
    sizes.append(d - sum(sizes))
    return {f"p{i}": jnp.zeros((n,), dtype) for i, n in enumerate(sizes)}


def _full_window(m: int, d: int, dtype: str, damp: float, key: jax.Array) -> mj.WindowState:
    """A full window of m random gradients, built directly (Gram product, one factorisation).

    What m updates would give, up to rounding, without compiling and running them.
    """
    G = _scale(m, d, damp) * jax.random.normal(key, (m, d), dtype)
    # float64 by chunks: no float64 copy of G
    gram = jax.jit(_jax_static._gram_f64, static_argnums=1)(G, _jax_static._chunk_width(G))
    pos = jnp.zeros((), jnp.int32)
    factor, ok = jax.jit(_jax_window._refactor)(gram, pos, jnp.asarray(m * damp, jnp.float64))
    assert bool(ok)
    # Separate arrays for every leaf: the step donates them, and one buffer cannot be
    # donated twice.
    return mj.WindowState(
        grads=G,
        gram=gram,
        factor=factor,
        pos=pos,
        count=jnp.asarray(m, jnp.int32),
        since_refactor=jnp.zeros((), jnp.int32),
        refactors=jnp.zeros((), jnp.int32),
        damp=jnp.asarray(damp, jnp.float64),
        zero_init=True,
        refactor_every=jnp.asarray(m, jnp.int32),
    )


def step_rows(args: argparse.Namespace, m: int, key: jax.Array) -> list[list[str]]:
    d, dtype = args.d, args.dtype
    k_win, k_pool, k_opt = jax.random.split(key, 3)
    scale = _scale(m, d, args.damp)
    # Fresh gradients: inserting one gradient many times makes the window singular.
    pool = [scale * jax.random.normal(k, (d,), dtype) for k in jax.random.split(k_pool, 8)]
    counter = iter(range(10**9))

    box = {"state": _full_window(m, d, dtype, args.damp, k_win)}
    step = jax.jit(mj.window_update_and_matvec, donate_argnums=0)

    def window_step(_: object) -> None:
        box["state"], s = step(box["state"], pool[next(counter) % len(pool)])
        s.block_until_ready()

    opt = optax.chain(mj.mfac(m, args.damp), optax.scale(-1e-3))
    params = _params(d, dtype)
    opt_box = {"params": params, "state": opt.init(params)}
    grads = [
        jax.tree_util.tree_map(lambda p, k=k: scale * jax.random.normal(k, p.shape, dtype), params)
        for k in jax.random.split(k_opt, 8)
    ]

    def train_step(params: dict, state: tuple, grads: dict) -> tuple[dict, tuple]:
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(train_step, donate_argnums=(0, 1))

    def optax_step(_: object) -> None:
        opt_box["params"], opt_box["state"] = jitted(
            opt_box["params"], opt_box["state"], grads[next(counter) % len(grads)]
        )
        jax.block_until_ready(opt_box["params"])

    itemsize = np.dtype(dtype).itemsize
    window_bytes = m * d * itemsize
    probe_bytes = max(256 * MiB, window_bytes // 2)  # well above the last-level cache
    cands, bandwidth = bandwidth_candidates(probe_bytes)
    xla = {"x": jnp.zeros((probe_bytes // 4,), jnp.float32)}
    bump = jax.jit(lambda x: x + 1.0, donate_argnums=0)

    def xla_stream(_: object) -> None:
        xla["x"] = bump(xla["x"])
        xla["x"].block_until_ready()

    cands["window step"] = (window_step, None)
    cands["optax step"] = (optax_step, None)
    cands["xla stream"] = (xla_stream, None)
    for name in ("window step", "optax step", "xla stream"):  # compile outside the timings
        cands[name][0](None)
    t = interleaved(cands, args.repeat)
    bw = bandwidth(t)
    xla_bw = 2 * xla["x"].nbytes / t["xla stream"].best
    floor_copy, floor_read = 2 * window_bytes / bw.copy, 2 * window_bytes / bw.read
    floor_xla = 2 * window_bytes / xla_bw
    rows = []
    for name in ("window step", "optax step"):
        best = t[name].best
        rows.append(
            [
                str(m),
                name,
                fmt_time(best),
                fmt_time(t[name].median),
                fmt_time(floor_copy),
                fmt_ratio(best / floor_copy),
                fmt_ratio(best / floor_read),
                fmt_ratio(best / floor_xla),
            ]
        )
    rows.append(
        [
            str(m),
            "floor: 2 passes",
            fmt_time(floor_copy),
            "-",
            fmt_time(floor_copy),
            "1.00x",
            f"copy {bw.copy / 1e9:.1f} GB/s",
            f"xla {xla_bw / 1e9:.1f} GB/s",
        ]
    )
    return rows


def mm_row(args: argparse.Namespace, m: int, key: jax.Array) -> list[str]:
    """The m x m part of one step (float64, independent of d): timed on a window of d = 2m."""
    state = _full_window(m, 2 * m, "float64", args.damp, key)
    g = _scale(m, 2 * m, args.damp) * jax.random.normal(key, (2 * m,), jnp.float64)
    b = (state.grads @ g).at[state.pos].set(g @ g)
    idx = (state.pos + 1 + jnp.arange(m)) % m
    shift = jnp.asarray(m * args.damp, jnp.float64)
    # The window's edit: drop the oldest (first) row and column, append the new one.
    edit = jax.jit(lambda U, b, c: _linalg.replaced_row(jnp, U, 0, b[:-1], b[-1] + c))
    refactor = jax.jit(_jax_window._refactor)
    P = state.grads @ jax.random.normal(key, (2 * m,), jnp.float64)
    solves = jax.jit(lambda U, p: _jax_common.solve_upper(U, _jax_common.solve_upper_t(U, p)))
    b_age = b[idx]
    calls = {
        "edit": lambda: edit(state.factor, b_age, shift),
        "refactor": lambda: refactor(state.gram, state.pos, shift),
        "solves": lambda: solves(state.factor, P),
    }

    def burst(call: Callable[[], object]) -> Callable[[object], None]:
        # BURST back-to-back calls per timed run: a lone call after the round-robin's
        # idle gc pays XLA's thread-pool wake-up (0.3-0.5 ms measured at m = 128, 5-7x
        # the edit itself), which the m x m work inside a running step does not.
        def run(_: object) -> None:
            for _ in range(BURST):
                out = call()
            jax.block_until_ready(out)

        return run

    cands = {name: (burst(call), None) for name, call in calls.items()}
    for fn, _ in cands.values():
        fn(None)
    t = interleaved(cands, max(args.repeat, 7))
    inc, ref = t["edit"].best / BURST, t["refactor"].best / BURST
    return [
        str(m),
        fmt_time(inc),
        fmt_time(ref),
        f"{ref / inc:.1f}x",
        fmt_time(t["solves"].best / BURST),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The m x m work is float64: JAX's 64-bit mode for this process (a script, not a library).
    jax.config.update("jax_enable_x64", True)
    key = jax.random.key(args.seed)
    monitor = CpuMonitor()
    print("# JAX M-FAC step benchmark (mfac_core.jax)\n")
    for name, value in machine_facts():
        print(f"- {name}: {value}")
    print(f"- jax / optax: {jax.__version__} / {optax.__version__}, devices {jax.devices()}")
    print(
        f"- problem: d = {args.d:.3g}, {args.dtype} window, damp = {args.damp:g}, "
        f"best of {args.repeat}\n"
    )
    rows = []
    for m in args.m:
        rows += step_rows(args, m, jax.random.fold_in(key, m))
    print("## Step on a full window, jitted, state donated\n")
    print(
        markdown_table(
            [
                "m",
                "what",
                "best",
                "median",
                "floor (copy)",
                "vs floor",
                "vs read floor",
                "vs XLA floor",
            ],
            rows,
        )
    )
    print(
        "\nThe floor is 2 m d itemsize bytes at the copy bandwidth of np.copyto (one read "
        "and one write per byte); the steps only read the window, so ratios below 1 are "
        "possible. 'vs XLA floor' uses XLA's own in-place streaming bandwidth."
    )
    rows = [mm_row(args, m, jax.random.fold_in(key, 10**6 + m)) for m in args.m]
    print("\n## m x m part of one step (float64, independent of d)\n")
    print(
        markdown_table(
            [
                "m",
                "O(m^2) row replacement",
                "O(m^3) refactor",
                "refactor/edit",
                "product's two solves",
            ],
            rows,
        )
    )
    foreign = monitor.foreign_cores()
    if foreign is not None:
        print(f"\nOther processes used {foreign:.2f} cores on average during this run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
