"""Device checks and timings of mfac_core's CUDA kernels against CuPy's cuSOLVER/cuBLAS path.

Run on a machine with an NVIDIA GPU, with mfac_core installed with its ``cuda`` extra
(``pip install ".[cuda]"``: CuPy and the CUDA libraries it loads, NVRTC, cuBLAS, cuSOLVER);
the script imports the installed package::

    python benchmarks/gpu.py            # full: about a minute on an H200 (2 m d bytes of GPU
                                        # memory for the IHVP: 41 GB; --skip-ihvp without)
    python benchmarks/gpu.py --quick    # smaller sizes, seconds

It prints three tables:

1. checks: the kernels (``mfac_core._kernels``) and the cuSOLVER/cuBLAS path against a float64
   NumPy/SciPy oracle on the host (largest relative error, PASS/FAIL against a tolerance):
   factorisation, inverse, solves (lower/upper, transposed or not, 1 and 20 right-hand sides),
   stacks, odd sizes, the non-SPD flag, the factor row replace, and the operators end to end;
2. times (CUDA events, median of repeats, after a warm-up that lifts the clocks) of
   factorisation + inverse at m = 256, 1024, 4096 and of a stack of 8192 blocks of m = 64,
   of a one-right-hand-side solve and of the factor row replace at row 0 (the row the sliding
   window edits), kernels against cuSOLVER / cuBLAS; target: m = 1024 factorisation + inverse
   below 1 ms on an H100/H200;
3. the IHVP of ``StaticIHVP`` (d = 1e7, m = 1024, float32) and one
   ``DynamicIHVP.update_and_matvec`` on a full window (m = 1024, d = 1e6) against the floor
   set by the copy bandwidth measured in the same process (a large device copy, bytes read +
   written); target for the IHVP: at least 80 % of that bandwidth.

These are the figures docs/gpu.rst quotes; the first lines say the date, the package version
and the device. TF32 is off (``CUPY_TF32=0`` is set before CuPy is imported). Without CuPy, a
GPU or the CUDA libraries the script says what to install and exits with status 0, or 2 with
``--require-gpu``; CI runs it in quick mode, which checks that it imports. It exits with
status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Exit statuses.
EXIT_OK, EXIT_CHECK_FAILED, EXIT_NO_GPU = 0, 1, 2


@dataclass(frozen=True)
class Sizes:
    """What one run measures."""

    check_sizes: tuple[int, ...]  # m of the single-matrix checks
    check_stack: tuple[int, int]  # (count, m) of the stacked checks
    factor_sizes: tuple[int, ...]  # m of the factorisation + inverse timings
    blocks: tuple[int, int]  # (count, m) of the stacked timing
    ihvp: tuple[int, int]  # (m, d) of the IHVP timing
    window: tuple[int, int]  # (m, d) of the sliding-window step timing
    copy_bytes: int  # size of the array copied to measure the bandwidth
    repeat: int  # timed repetitions (the median is reported)


FULL = Sizes(
    check_sizes=(1, 2, 31, 33, 65, 100, 256, 1024),
    check_stack=(8192, 64),
    factor_sizes=(256, 1024, 4096),
    blocks=(8192, 64),
    ihvp=(1024, 10_000_000),
    window=(1024, 1_000_000),
    copy_bytes=4 << 30,
    repeat=10,
)
QUICK = Sizes(
    check_sizes=(1, 33, 100, 256),
    check_stack=(512, 64),
    factor_sizes=(256, 1024),
    blocks=(1024, 64),
    ihvp=(256, 1_000_000),
    window=(256, 100_000),
    copy_bytes=1 << 30,
    repeat=5,
)

#: Targets from the issue: m = 1024 factorisation + inverse, and IHVP bandwidth share.
FACTOR_TARGET_MS = 1.0
FACTOR_TARGET_M = 1024
IHVP_TARGET_FRACTION = 0.8
#: The row of the factor that the sliding window edits: a full window drops its oldest
#: gradient, the first row of the factor, and appends the new one last.
WINDOW_EDIT_ROW = 0


# -- parts that need no GPU (unit-tested on the CPU) -------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (seconds)")
    parser.add_argument(
        "--require-gpu",
        action="store_true",
        help="exit with status 2 (not 0) when CuPy or a GPU is missing",
    )
    parser.add_argument(
        "--skip-ihvp",
        action="store_true",
        help="skip the IHVP timing (needs 2 m d bytes of float32 at full size)",
    )
    return parser.parse_args(argv)


#: What to install when CuPy or the CUDA libraries it loads are missing.
INSTALL_HINT = (
    'install mfac_core\'s cuda extra (pip install ".[cuda]" from the checkout, i.e. '
    '"cupy-cuda12x[ctk]>=14": CuPy with NVRTC, cuBLAS and cuSOLVER from PyPI; '
    '"cupy-cuda13x[ctk]>=14" for a CUDA 13 driver)'
)


def gpu_unavailable_reason() -> str | None:
    """Why this process cannot run the benchmark on a GPU, or ``None`` if it can.

    Beyond CuPy and a device, the script needs the CUDA libraries CuPy loads on
    first use: NVRTC (this package's kernels), cuBLAS and cuSOLVER
    (``cupyx.scipy.linalg``). A driver-only machine with a bare ``cupy-cuda12x``
    has none of them.
    """
    os.environ.setdefault("CUPY_TF32", "0")  # before CuPy is imported: no TF32 in cuBLAS
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); {INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver, and others
        return f"CuPy finds no CUDA device ({exc})"
    if count < 1:
        return "CuPy finds no CUDA device"
    try:
        import cupyx.scipy.linalg  # noqa: F401  (loads cuBLAS and cuSOLVER)

        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:  # ImportError, OSError, RuntimeError: a library failed to load
        failure = f"{type(exc).__name__}: {exc}"
        return f"CuPy cannot load a CUDA library it needs ({failure}); {INSTALL_HINT}"
    return None


def spd_matrix(
    rng: np.random.Generator, m: int, batch: tuple[int, ...] = (), *, shift: float = 0.5
) -> np.ndarray:
    """Random SPD matrices (float64) with eigenvalues in about [shift, shift + 4]."""
    g = rng.standard_normal((*batch, m, m + 8)) / math.sqrt(m + 8)
    return g @ np.swapaxes(g, -1, -2) + shift * np.eye(m)


def relative_error(x: Any, reference: np.ndarray) -> float:
    """Largest absolute difference over the largest absolute entry of the reference."""
    x = np.asarray(x, dtype=np.float64)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    if reference.size == 0:
        return 0.0
    return float(np.max(np.abs(x - reference))) / (scale if scale > 0 else 1.0)


def ihvp_floor_seconds(m: int, d: int, itemsize: int, bandwidth: float) -> float:
    """Time to read the m x d working array twice at ``bandwidth`` bytes per second."""
    return 2.0 * m * d * itemsize / bandwidth


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats in compact scientific or fixed notation."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value == 0.0 or 1e-3 <= abs(value) < 1e5:
                return f"{value:.4g}"
            return f"{value:.2e}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(lines)


# -- the device parts ---------------------------------------------------------------------------


def warm_up(seconds: float = 1.0) -> None:
    """Keep the GPU busy for a while, so that its clocks leave their idle level before timing.

    The timed calls are short and synchronise often; from idle (345 MHz SM clock on an H200)
    the clocks would not rise to their working level (1980 MHz) on their own.
    """
    import cupy

    a = cupy.ones((4096, 4096), dtype=cupy.float32)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ a
        cupy.cuda.get_current_stream().synchronize()


def sm_clock_mhz() -> str:
    """The current SM clock through NVML, or why it is unknown."""
    try:
        import pynvml

        pynvml.nvmlInit()
        import cupy

        handle = pynvml.nvmlDeviceGetHandleByIndex(cupy.cuda.Device().id)
        return f"{pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)} MHz"
    except Exception as exc:  # pynvml missing, or no permission
        return f"unknown ({type(exc).__name__})"


def gpu_time_ms(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> float:
    """Median time of ``fn()`` in ms, between CUDA events on the current stream."""
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


class Checks:
    """Collects rows of the checks table."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, float, str]] = []

    def add(self, what: str, path: str, error: float, tol: float) -> None:
        ok = bool(error <= tol)  # NaN fails
        self.rows.append((what, path, error, tol, "PASS" if ok else "FAIL"))

    def expect(self, what: str, path: str, ok: bool, detail: str = "") -> None:
        self.rows.append(
            (what + (f" ({detail})" if detail else ""), path, 0.0, 0.0, "PASS" if ok else "FAIL")
        )

    @property
    def failed(self) -> int:
        return sum(row[4] == "FAIL" for row in self.rows)


def _all_paths(fn: Callable[[], Any]) -> dict[str, Any]:
    """``fn()`` with each choice of ``mfac_core._linalg`` for CuPy (auto, kernels, cusolver)."""
    import mfac_core

    out = {}
    for path in mfac_core.CUPY_LINALG_CHOICES:
        previous = mfac_core.set_cupy_linalg(path)
        try:
            out[path] = fn()
        finally:
            mfac_core.set_cupy_linalg(previous)
    return out


def run_checks(sizes: Sizes, rng: np.random.Generator) -> Checks:
    import cupy
    import cupyx.scipy.linalg
    import scipy.linalg

    from mfac_core import _kernels, _linalg
    from mfac_core._compat import array_namespace
    from mfac_core._errors import NotPositiveDefinite

    checks = Checks()
    eps = float(np.finfo(np.float64).eps)

    def tol(m: int) -> float:
        # The matrices have condition numbers below about 10: errors of a few m eps.
        return 20.0 * max(m, 8) * eps

    # Factorisation and inverse, single matrices of odd sizes.
    for m in sizes.check_sizes:
        a = spd_matrix(rng, m)
        ref = np.linalg.cholesky(a)
        inv_ref = scipy.linalg.solve_triangular(ref, np.eye(m), lower=True)
        a_gpu = cupy.asarray(a)
        factor = _kernels.cholesky(a_gpu)
        checks.add(f"cholesky m={m}", "kernels", relative_error(cupy.asnumpy(factor), ref), tol(m))
        checks.add(
            f"cholesky m={m}",
            "cusolver",
            relative_error(cupy.asnumpy(cupy.linalg.cholesky(a_gpu)), ref),
            tol(m),
        )
        inv = _kernels.triangular_inverse(cupy.asarray(ref), lower=True)
        checks.add(f"inverse m={m}", "kernels", relative_error(cupy.asnumpy(inv), inv_ref), tol(m))
        inv_cs = cupyx.scipy.linalg.solve_triangular(cupy.asarray(ref), cupy.eye(m), lower=True)
        checks.add(
            f"inverse m={m}", "cusolver", relative_error(cupy.asnumpy(inv_cs), inv_ref), tol(m)
        )
        # Solves: 4 cases x (1, 20) right-hand sides.
        for lower in (True, False):
            t = ref if lower else ref.T.copy()
            for trans in (False, True):
                for k in (1, 20):
                    b = rng.standard_normal((m, k))
                    x_ref = scipy.linalg.solve_triangular(t, b, lower=lower, trans=int(trans))
                    x = _kernels.solve_triangular(
                        cupy.asarray(t), cupy.asarray(b), lower=lower, trans=trans
                    )
                    x_cs = cupyx.scipy.linalg.solve_triangular(
                        cupy.asarray(t), cupy.asarray(b), lower=lower, trans=int(trans)
                    )
                    what = f"solve m={m} {'L' if lower else 'U'}{'^T' if trans else ''} k={k}"
                    checks.add(what, "kernels", relative_error(cupy.asnumpy(x), x_ref), tol(m))
                    checks.add(what, "cusolver", relative_error(cupy.asnumpy(x_cs), x_ref), tol(m))
    # float32 factorisation as an explicit option.
    m = sizes.check_sizes[-1]
    a = spd_matrix(rng, m)
    f32 = _kernels.cholesky(cupy.asarray(a), dtype=cupy.float32)
    checks.add(
        f"cholesky float32 m={m}",
        "kernels",
        relative_error(cupy.asnumpy(f32), np.linalg.cholesky(a)),
        20.0 * m * float(np.finfo(np.float32).eps),
    )

    # Stacks: one launch per step for all the blocks.
    count, m = sizes.check_stack
    a = spd_matrix(rng, m, (count,))
    ref = np.linalg.cholesky(a)
    factor = _kernels.cholesky(cupy.asarray(a))
    checks.add(
        f"cholesky {count} x m={m}", "kernels", relative_error(cupy.asnumpy(factor), ref), tol(m)
    )
    checks.add(
        f"cholesky {count} x m={m}",
        "cusolver",
        relative_error(cupy.asnumpy(cupy.linalg.cholesky(cupy.asarray(a))), ref),
        tol(m),
    )
    inv_ref = np.linalg.inv(ref)
    inv = _kernels.triangular_inverse(cupy.asarray(ref))
    checks.add(
        f"inverse {count} x m={m}", "kernels", relative_error(cupy.asnumpy(inv), inv_ref), tol(m)
    )
    b = rng.standard_normal((count, m, 3))
    x = _kernels.solve_triangular(cupy.asarray(ref), cupy.asarray(b), lower=True, trans=True)
    checks.add(
        f"solve {count} x m={m} L^T k=3",
        "kernels",
        relative_error(cupy.asnumpy(x), np.linalg.solve(np.swapaxes(ref, -1, -2), b)),
        tol(m),
    )

    # Not positive definite: LAPACK's info, and the raise.
    m = 100
    a = spd_matrix(rng, m, (3,))
    a[1, 70, 70] = -1.0
    _, info = _kernels.potrf(cupy.asarray(a))
    lapack_info = scipy.linalg.lapack.dpotrf(a[1], lower=True)[1]
    checks.expect(
        "non-SPD info",
        "kernels",
        list(cupy.asnumpy(info)) == [0, lapack_info, 0],
        f"info={list(cupy.asnumpy(info))}, LAPACK {lapack_info}",
    )
    try:
        _kernels.cholesky(cupy.asarray(a))
        raised = False
    except NotPositiveDefinite:
        raised = True
    checks.expect("non-SPD raises", "kernels", raised)

    # The dynamic factor's row replace, against the array-API version on NumPy.
    xp_np = array_namespace(np.zeros(1))
    for k in (1, 2, 65, 300):
        for p in sorted({0, k // 2, k - 1}):
            c_mat = spd_matrix(rng, k)
            u = np.linalg.cholesky(c_mat).T.copy()
            b = rng.standard_normal(k - 1) * 0.1
            c = float(b @ b) + 2.0
            ref = _linalg.replace_row(xp_np, u, p, b, c, np.zeros_like(u))
            out = cupy.zeros((k, k))
            _kernels.replace(None, cupy.asarray(u), p, cupy.asarray(b), c, out)
            checks.add(
                f"replace k={k} p={p}", "kernels", relative_error(cupy.asnumpy(out), ref), tol(k)
            )

    # The operators end to end, both paths, against NumPy.
    from mfac_core import DynamicIHVP, StaticIHVP

    m, d, damp = 64, 5000, 1e-2
    g = rng.standard_normal((m, d))
    xv = rng.standard_normal(d)
    for block_size in (None, 50, 100):
        ref = StaticIHVP(g, damp=damp, block_size=block_size).matvec(xv)
        out = _all_paths(
            lambda bs=block_size: cupy.asnumpy(
                StaticIHVP(cupy.asarray(g), damp=damp, block_size=bs).matvec(cupy.asarray(xv))
            )
        )
        for path, value in out.items():
            checks.add(
                f"StaticIHVP block_size={block_size}", path, relative_error(value, ref), 1e-9
            )

    def dynamic(xp_g: Any, asarray: Callable[[Any], Any]) -> Any:
        op = DynamicIHVP(16, 300, damp=1e-2, dtype="float64", xp=xp_g)
        step_rng = np.random.default_rng(5)
        for _ in range(40):
            op.update(asarray(step_rng.standard_normal(300)))
        return op.matvec(asarray(xv[:300]))

    ref = dynamic(np, np.asarray)
    out = _all_paths(lambda: cupy.asnumpy(dynamic(cupy, cupy.asarray)))
    for path, value in out.items():
        checks.add("DynamicIHVP 40 updates", path, relative_error(value, ref), 1e-9)
    return checks


def run_timings(sizes: Sizes, rng: np.random.Generator) -> list[tuple[Any, ...]]:
    import cupy
    import cupyx.scipy.linalg

    from mfac_core import _kernels

    rows = []

    def kernels(a: Any) -> Any:
        factor, _ = _kernels.potrf(a)  # no synchronisation, as cupy.linalg.cholesky
        return _kernels.triangular_inverse(factor)

    def cusolver(a: Any) -> Any:
        factor = cupy.linalg.cholesky(a)
        eye = cupy.broadcast_to(cupy.eye(a.shape[-1]), a.shape)
        if a.ndim == 2:
            return cupyx.scipy.linalg.solve_triangular(factor, eye, lower=True)
        return cupy.linalg.solve(factor, eye)  # cupyx's triangular solve is not batched

    cases = [(f"factor + inverse m={m}", spd_matrix(rng, m)) for m in sizes.factor_sizes]
    count, m = sizes.blocks
    cases.append((f"factor + inverse {count} x m={m}", spd_matrix(rng, m, (count,))))
    for what, a in cases:
        a_gpu = cupy.asarray(a)
        t_k = gpu_time_ms(lambda a_gpu=a_gpu: kernels(a_gpu), sizes.repeat)
        t_c = gpu_time_ms(lambda a_gpu=a_gpu: cusolver(a_gpu), sizes.repeat)
        target = ""
        if what == f"factor + inverse m={FACTOR_TARGET_M}":
            target = f"< {FACTOR_TARGET_MS:g} ms: {'met' if t_k < FACTOR_TARGET_MS else 'MISSED'}"
        rows.append((what, t_k, t_c, t_c / t_k, target))
        del a_gpu

    # One right-hand side (the dynamic operator's products) and the O(m^2) factor edit.
    import mfac_core
    from mfac_core import _linalg
    from mfac_core._compat import array_namespace

    for m in sizes.factor_sizes:
        factor = cupy.asarray(np.linalg.cholesky(spd_matrix(rng, m)))
        b = cupy.asarray(rng.standard_normal((m, 1)))
        t_k = gpu_time_ms(
            lambda f=factor, b=b: _kernels.solve_triangular(f, b, trans=True), sizes.repeat
        )
        t_c = gpu_time_ms(
            lambda f=factor, b=b: cupyx.scipy.linalg.solve_triangular(f, b, lower=True, trans=1),
            sizes.repeat,
        )
        rows.append((f"solve L^T x = b, 1 rhs, m={m}", t_k, t_c, t_c / t_k, ""))
        u = cupy.ascontiguousarray(factor.T)
        new_row = cupy.asarray(0.1 * rng.standard_normal(m - 1))
        c = float(cupy.vdot(new_row, new_row)) + 2.0
        out = cupy.empty_like(u)
        args = (array_namespace(u), u, WINDOW_EDIT_ROW, new_row, c, out)
        t_k = gpu_time_ms(lambda args=args: _kernels.replace(*args), sizes.repeat)

        def array_api_replace(args: tuple[Any, ...] = args) -> Any:
            # The "cusolver" policy sends the edit to the generic array-API version.
            previous = mfac_core.set_cupy_linalg("cusolver")
            try:
                return _linalg.replace_row(*args)
            finally:
                mfac_core.set_cupy_linalg(previous)

        t_c = gpu_time_ms(array_api_replace, sizes.repeat)
        rows.append(
            (
                f"factor row replace m={m}, row {WINDOW_EDIT_ROW} (cusolver: array-API edit)",
                t_k,
                t_c,
                t_c / t_k,
                "",
            )
        )
    return rows


def copy_bandwidth(nbytes: int, repeat: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read and written."""
    import cupy

    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    ms = gpu_time_ms(lambda: cupy.copyto(dst, src), repeat)
    return 2.0 * src.nbytes / (ms * 1e-3)


def _time_ihvp(
    m: int, d: int, repeat: int, rng: np.random.Generator
) -> tuple[float, float, dict[str, float]]:
    """(set-up seconds, matvec ms, the two passes' ms) of StaticIHVP on float32 gradients."""
    import cupy

    from mfac_core import StaticIHVP

    g = cupy.random.standard_normal((m, d), dtype=cupy.float32)
    start = time.perf_counter()
    # The operator keeps G (m d float32 entries) and no W. The damping keeps kappa
    # moderate; it does not change the timing.
    op = StaticIHVP(g, damp=10.0, check_finite=False)
    cupy.cuda.get_current_stream().synchronize()
    setup = time.perf_counter() - start
    x = cupy.asarray(rng.standard_normal(d), dtype=cupy.float32)
    W = g  # the stored gradients: the passes read them (float64 pieces on CuPy for now)
    c = W @ x
    # Where the time goes: each cuBLAS pass on its own, and G x as a split-K batched product
    # (16 partial sums over column slices), which keeps more of the GPU busy when m is small
    # next to d.
    split = 16 if d % 16 == 0 else 1
    Wk = W.reshape(m, split, d // split).transpose(1, 0, 2)
    xk = x.reshape(split, d // split, 1)
    passes = {
        "G @ x (float32)": gpu_time_ms(lambda: W @ x, repeat),
        "c @ G (float32)": gpu_time_ms(lambda: c @ W, repeat),
        f"G @ x split-K {split}": gpu_time_ms(lambda: cupy.matmul(Wk, xk).sum(axis=0), repeat),
    }
    return setup, gpu_time_ms(lambda: op.matvec(x), repeat), passes


def _time_window_step(m: int, d: int, repeat: int) -> float:
    """ms of one ``DynamicIHVP.update_and_matvec`` on a full window of float32 gradients."""
    import cupy

    from mfac_core import DynamicIHVP, WindowOptions

    op = DynamicIHVP(
        m, d, damp=10.0, dtype="float32", xp=cupy, options=WindowOptions(check_finite=False)
    )
    grads = cupy.random.standard_normal((8, d), dtype=cupy.float32)
    for i in range(m):  # fill the window: from here on every step slides it
        op.update(grads[i % 8])
    step = iter(range(1 << 30))
    return gpu_time_ms(lambda: op.update_and_matvec(grads[next(step) % 8]), repeat)


def run_ihvp(sizes: Sizes, rng: np.random.Generator) -> list[tuple[Any, ...]]:
    import cupy

    m, d = sizes.ihvp
    bandwidth = copy_bandwidth(sizes.copy_bytes, sizes.repeat)
    cupy.get_default_memory_pool().free_all_blocks()
    setup, ms, passes = _time_ihvp(m, d, sizes.repeat, rng)
    cupy.get_default_memory_pool().free_all_blocks()
    wm, wd = sizes.window
    window_ms = _time_window_step(wm, wd, sizes.repeat)
    window_floor = ihvp_floor_seconds(wm, wd, 4, bandwidth)
    cupy.get_default_memory_pool().free_all_blocks()
    floor = ihvp_floor_seconds(m, d, 4, bandwidth)
    one_pass = floor / 2
    fraction = floor / (ms * 1e-3)
    verdict = "met" if fraction >= IHVP_TARGET_FRACTION else "MISSED"
    return [
        ("copy bandwidth", f"{bandwidth / 1e9:.0f} GB/s", "", "", ""),
        (f"StaticIHVP set-up m={m} d={d:.0e} float32", f"{setup:.2f} s", "", "", ""),
        (
            f"StaticIHVP matvec m={m} d={d:.0e} float32",
            f"{ms:.3f} ms",
            f"{floor * 1e3:.3f} ms",
            f"{fraction:.0%}",
            f">= {IHVP_TARGET_FRACTION:.0%}: {verdict}",
        ),
        *(
            (
                f"  one pass: {name}",
                f"{t:.3f} ms",
                f"{one_pass * 1e3:.3f} ms",
                f"{one_pass * 1e3 / t:.0%}",
                "",
            )
            for name, t in passes.items()
        ),
        (
            f"DynamicIHVP.update_and_matvec m={wm} d={wd:.0e} float32",
            f"{window_ms:.3f} ms",
            f"{window_floor * 1e3:.3f} ms",
            f"{window_floor * 1e3 / window_ms:.0%}",
            "",
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"benchmarks/gpu.py: skipped, {reason}. It needs CuPy and an NVIDIA GPU.")
        return EXIT_NO_GPU if args.require_gpu else EXIT_OK
    import cupy

    import mfac_core

    sizes = QUICK if args.quick else FULL
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"date: {time.strftime('%Y-%m-%d', time.gmtime())}, mfac_core {mfac_core.__version__}")
    print(
        f"device: {name}, CuPy {cupy.__version__}, CUDA runtime "
        f"{cupy.cuda.runtime.runtimeGetVersion()}, CUPY_TF32={os.environ.get('CUPY_TF32')}"
    )
    rng = np.random.default_rng(20211206)

    checks = run_checks(sizes, rng)
    print("\nchecks (relative error against a float64 host oracle)")
    print(format_table(("what", "path", "error", "tolerance", "result"), checks.rows))

    warm_up()
    print(f"\ntimes (median of CUDA-event timings, ms; SM clock {sm_clock_mhz()} after a warm-up)")
    rows = run_timings(sizes, rng)
    print(format_table(("what", "kernels", "cusolver", "speed-up", "target"), rows))

    if not args.skip_ihvp:
        print("\nIHVP against the copy bandwidth")
        print(format_table(("what", "time", "floor", "of floor", "target"), run_ihvp(sizes, rng)))
    if checks.failed:
        print(f"\n{checks.failed} check(s) FAILED")
        return EXIT_CHECK_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
