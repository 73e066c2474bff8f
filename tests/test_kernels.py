"""The CUDA kernels of ``mfac_core._kernels``, verified without a GPU.

* Every ``.cu`` file compiles with nvcc for sm_80 and sm_90, and ptxas reports no spills and no
  stack frame for any kernel (skipped without nvcc).
* The same kernel source runs on the CPU (g++ and ``host/cuda_host.h``, one fiber per CUDA
  thread) through the launch plans and array code of the CuPy launcher, against NumPy/SciPy in
  float64 (skipped without g++).
* The implementation switch, the lazy import of CuPy, and the parts of ``benchmarks/gpu.py``
  that need no GPU.
* With CuPy and a GPU, the same operations on the device (skipped otherwise).
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import _build_cache
import numpy as np
import pytest
import scipy.linalg
from array_api_compat import array_namespace
from conftest import cupy_with_a_device

import mfac_core
from mfac_core import _kernels, _linalg
from mfac_core._errors import NotPositiveDefinite
from mfac_core._kernels import _plan
from mfac_core._kernels._source import DIRECTORY, SOURCES, kernel_source

ROOT = Path(__file__).resolve().parents[1]
EPS = float(np.finfo(np.float64).eps)
ODD_SIZES = (1, 2, 31, 33, 65, 100)


def spd(rng: np.random.Generator, m: int, batch: tuple[int, ...] = ()) -> np.ndarray:
    """SPD matrices with eigenvalues in about [0.5, 4.5]: condition numbers below 10."""
    g = rng.standard_normal((*batch, m, m + 8)) / np.sqrt(m + 8)
    return g @ np.swapaxes(g, -1, -2) + 0.5 * np.eye(m)


def tol(m: int) -> float:
    """Relative tolerance for these well-conditioned problems: a few m eps."""
    return 8.0 * max(m, 8) * EPS


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-300))


# -- nvcc: compiles for sm_80 and sm_90, no spills -------------------------------------------

ARCHS = ("sm_80", "sm_90")
_PTXAS_FUNCTION = re.compile(
    r"Function properties for (\w+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads\s*\n[^\n]*Used (\d+) registers"
)


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per function: stack frame, spill stores, spill loads (bytes) and registers."""
    return {
        name: {
            "stack": int(stack),
            "spill_stores": int(stores),
            "spill_loads": int(loads),
            "registers": int(regs),
        }
        for name, stack, stores, loads, regs in _PTXAS_FUNCTION.findall(log)
    }


def test_parse_ptxas() -> None:
    log = (
        "ptxas info    : Compiling entry function 'k_f64' for 'sm_90'\n"
        "ptxas info    : Function properties for k_f64\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers, 33792 bytes smem\n"
    )
    assert parse_ptxas(log) == {
        "k_f64": {"stack": 8, "spill_stores": 4, "spill_loads": 4, "registers": 64}
    }


@pytest.fixture(scope="module")
def ptxas_logs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    out = tmp_path_factory.mktemp("cubin")
    # The second test run of CI reuses the logs of identical inputs (tests/_build_cache.py).
    inputs = (_build_cache.compiler_version(nvcc), _build_cache.sources_digest(DIRECTORY))

    def command(source: str, arch: str) -> list[str]:
        cubin = out / f"{source}.{arch}.cubin"
        return [
            nvcc,
            "-cubin",
            f"-arch={arch}",
            "-Xptxas",
            "-v",
            "-o",
            str(cubin),
            str(DIRECTORY / source),
        ]

    def compile_one(source: str, arch: str) -> str:
        args = command(source, arch)
        result = subprocess.run(args, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{' '.join(args)}:\n{result.stderr}"
        return result.stdout + result.stderr

    def log(source: str, arch: str) -> str:
        # The key leaves out the temporary output path, which differs between runs.
        key = _build_cache.build_key((*inputs, *command(source, arch)[1:-3], source))
        return _build_cache.cached_text(
            request.config, "ptxas", key, lambda: compile_one(source, arch)
        )

    jobs = [(source, arch) for source in (*SOURCES, "common.cu") for arch in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        logs = list(pool.map(lambda job: log(*job), jobs))
    return dict(zip(jobs, logs, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", (*SOURCES, "common.cu"))
def test_compiles_without_spills(
    ptxas_logs: dict[tuple[str, str], str], source: str, arch: str
) -> None:
    report = parse_ptxas(ptxas_logs[source, arch])
    expected = {
        function
        for name, kernel in _plan.KERNELS.items()
        if kernel.source == source
        for function in _plan.function_names(name)
    }
    assert set(report) == expected
    for name, info in report.items():
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (name, arch, info)
        assert info["stack"] == 0, (name, arch, info)
        # __launch_bounds__(256, 2): two blocks of 256 threads fit 65536 registers.
        assert info["registers"] <= 128, (name, arch, info)


def test_kernel_source_pastes_local_includes() -> None:
    common = (DIRECTORY / "common.cu").read_text()
    for source in SOURCES:
        text = kernel_source(source)
        assert '#include "' not in text
        assert common in text
        for name, kernel in _plan.KERNELS.items():
            if kernel.source == source:
                for function in _plan.function_names(name):
                    assert re.search(rf"\b{function}\b", text), function


# -- the CPU harness ---------------------------------------------------------------------------

# The library holds kernels that misuse barriers (_build_cache.HARNESS_SELF_TEST), to show
# that the harness catches it.


@pytest.fixture(scope="module")
def host_library(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_cache.host_library(request.config, tmp_path_factory.mktemp("host"))


@pytest.fixture(scope="module")
def host(host_library: Path):
    from mfac_core._kernels._host import HostKernels

    # A shuffled thread order (seed) and two OS threads for the blocks.
    return HostKernels(host_library, seed=20211206, workers=2)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_harness_detects_a_divergent_barrier(host_library: Path) -> None:
    import ctypes

    lib = ctypes.CDLL(str(host_library))
    out = np.zeros(_plan.THREADS, dtype=np.int32)
    status = lib.host_self_test(0, ctypes.c_ulonglong(1), out.ctypes.data_as(ctypes.c_void_p))
    assert status == 1  # cuda_host::kBarrierDivergence


def test_harness_exposes_a_missing_barrier(host_library: Path) -> None:
    import ctypes

    lib = ctypes.CDLL(str(host_library))
    results = set()
    for seed in (0, 1, 2):
        out = np.zeros(_plan.THREADS, dtype=np.int32)
        assert (
            lib.host_self_test(1, ctypes.c_ulonglong(seed), out.ctypes.data_as(ctypes.c_void_p))
            == 0
        )
        results.add(out.tobytes())
    assert len(results) > 1  # the result depends on the thread order: a race


@pytest.mark.parametrize("m", (*ODD_SIZES, 200))
def test_cholesky_matches_lapack(host, rng, m: int) -> None:
    a = spd(rng, m, (2,))
    ref = np.linalg.cholesky(a)
    a_upper_nan = a.copy()
    a_upper_nan[..., np.triu_indices(m, 1)[0], np.triu_indices(m, 1)[1]] = np.nan
    factor, info = host.potrf(a_upper_nan)  # only the lower triangle is read
    assert factor.dtype == np.float64 and info.tolist() == [0, 0]
    assert rel_err(factor, ref) <= tol(m)
    assert np.all(np.triu(factor, 1) == 0)


def test_cholesky_float32_option(host, rng) -> None:
    a = spd(rng, 100)
    factor = host.cholesky(a, dtype=np.float32)
    assert factor.dtype == np.float32
    assert rel_err(factor, np.linalg.cholesky(a)) <= 8 * 100 * float(np.finfo(np.float32).eps)


def test_cholesky_of_a_stack_of_small_blocks_is_one_launch(host, rng) -> None:
    a = spd(rng, 64, (40,))
    host.launches.clear()
    factor = host.cholesky(a)
    assert host.launches == [("chol_panel_f64", 40)]
    assert rel_err(factor, np.linalg.cholesky(a)) <= tol(64)


@pytest.mark.parametrize("pivot", [0, 5, 63, 64, 70, 99])
def test_cholesky_reports_the_first_failing_minor_as_lapack(host, rng, pivot: int) -> None:
    a = spd(rng, 100, (3,))
    a[1, pivot, pivot] = -1.0
    factor, info = host.potrf(a)
    lapack_info = scipy.linalg.lapack.dpotrf(a[1], lower=True)[1]
    assert info.tolist() == [0, pivot + 1, 0] and lapack_info == pivot + 1
    assert rel_err(factor[[0, 2]], np.linalg.cholesky(a[[0, 2]])) <= tol(100)
    with pytest.raises(NotPositiveDefinite, match=f"order {pivot + 1}.*matrix \\(1,\\)"):
        host.cholesky(a)


def test_cholesky_flags_nan(host, rng) -> None:
    a = spd(rng, 33)
    a[20, 3] = np.nan
    _, info = host.potrf(a)
    assert info != 0


@pytest.mark.parametrize("k", [1, 17])
@pytest.mark.parametrize("trans", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("lower", [True, False], ids=["lower", "upper"])
@pytest.mark.parametrize("m", ODD_SIZES)
def test_solve_matches_scipy(host, rng, m: int, lower: bool, trans: bool, k: int) -> None:
    factor = np.linalg.cholesky(spd(rng, m, (2,)))
    t = factor if lower else np.swapaxes(factor, -1, -2).copy()
    b = rng.standard_normal((2, m, k))
    other = np.triu_indices(m, 1) if lower else np.tril_indices(m, -1)
    t_nan = t.copy()
    t_nan[:, other[0], other[1]] = np.nan  # the other triangle is not read
    x = host.solve_triangular(t_nan, b, lower=lower, trans=trans)
    ref = np.stack(
        [scipy.linalg.solve_triangular(t[i], b[i], lower=lower, trans=int(trans)) for i in range(2)]
    )
    assert x.shape == ref.shape and x.dtype == np.float64
    assert rel_err(x, ref) <= tol(m)


def test_solve_broadcasts_and_takes_vectors(host, rng) -> None:
    t = np.linalg.cholesky(spd(rng, 70))
    b = rng.standard_normal((3, 70, 2))
    x = host.solve_triangular(t, b)  # one t for a stack of right-hand sides
    assert rel_err(x, np.linalg.solve(t, b)) <= tol(70)
    v = rng.standard_normal(70)
    x = host.solve_triangular(t, v, trans=True)
    assert x.shape == (70,) and rel_err(x, np.linalg.solve(t.T, v)) <= tol(70)
    ts = np.linalg.cholesky(spd(rng, 70, (2,)))
    x = host.solve_triangular(ts, v)  # a stack of t, one vector
    assert x.shape == (2, 70) and rel_err(x, np.linalg.solve(ts, v[None, :, None])[..., 0]) <= tol(
        70
    )


def test_solve_in_float32(host, rng) -> None:
    t = np.linalg.cholesky(spd(rng, 40)).astype(np.float32)
    b = rng.standard_normal((40, 3)).astype(np.float32)
    x = host.solve_triangular(t, b)
    assert x.dtype == np.float32
    ref = np.linalg.solve(t.astype(np.float64), b.astype(np.float64))
    assert rel_err(x, ref) <= 8 * 40 * float(np.finfo(np.float32).eps)


def test_solve_validates(host, rng) -> None:
    t = np.eye(4)
    with pytest.raises(ValueError, match="square"):
        host.solve_triangular(np.ones((4, 3)), np.ones((4, 1)))
    with pytest.raises(ValueError, match="shape"):
        host.solve_triangular(t, np.ones((5, 1)))
    with pytest.raises(TypeError, match="float32 or float64"):
        host.solve_triangular(t, np.ones((4, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="float64 or float32"):
        host.solve_triangular(t, np.ones((4, 1)), dtype=np.float16)


@pytest.mark.parametrize("lower", [True, False], ids=["lower", "upper"])
@pytest.mark.parametrize("m", ODD_SIZES)
def test_inverse_matches_numpy(host, rng, m: int, lower: bool) -> None:
    factor = np.linalg.cholesky(spd(rng, m, (2,)))
    t = factor if lower else np.swapaxes(factor, -1, -2).copy()
    inv = host.triangular_inverse(t, lower=lower)
    assert rel_err(inv, np.linalg.inv(t)) <= tol(m)
    other = np.triu(inv, 1) if lower else np.tril(inv, -1)
    assert np.all(other == 0)


def test_inverse_of_a_stack_of_small_blocks_is_one_launch(host, rng) -> None:
    t = np.linalg.cholesky(spd(rng, 64, (30,)))
    host.launches.clear()
    inv = host.triangular_inverse(t)
    assert host.launches == [("trsm_f64", 30 * 64 // _plan.TRSM_RHS)]
    assert rel_err(inv, np.linalg.inv(t)) <= tol(64)


def _factor_problem(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    u = np.linalg.cholesky(spd(rng, k)).T.copy()
    b = 0.1 * rng.standard_normal(k - 1)
    return u, b, float(b @ b) + 2.0


@pytest.mark.parametrize(
    ("k", "p"),
    [
        (1, 0),
        (2, 0),
        (2, 1),
        (5, 2),
        (33, 0),
        (33, 16),
        (33, 32),
        (70, 5),
        (130, 64),
        (300, 299),
        (300, 1),
        (300, 0),
    ],
)
def test_replace_matches_the_array_api_version(host, rng, k: int, p: int) -> None:
    u, b, c = _factor_problem(rng, k)
    xp = array_namespace(np.zeros(1))
    ref = _linalg.replace_row(xp, u, p, b, c, np.zeros_like(u))
    out = host.replace(u, p, b, c, out=np.full_like(u, np.nan))
    assert rel_err(out, ref) <= tol(k)
    assert np.all(np.tril(out, -1) == 0)


def test_replace_of_row_0_walks_the_triangle_once() -> None:
    """The window's edit (row 0): one trsm for both right-hand sides, not one each."""
    first = _plan.replace(1024, 0, 2.0, "float64")
    middle = _plan.replace(1024, 512, 2.0, "float64")
    assert [launch.kernel for launch in first.launches].count("trsm") == 1
    assert [launch.kernel for launch in middle.launches].count("trsm") == 2


def test_replace_of_row_0_refuses_a_dependent_row(host, rng) -> None:
    k = 40
    u, _, _ = _factor_problem(rng, k)
    c_mat = u.T @ u
    b = c_mat[1:, 3]  # the new row duplicates row 3
    with pytest.raises(NotPositiveDefinite, match="pivot"):
        host.replace(u, 0, b, float(c_mat[3, 3]) * (1 - 1e-15))


def test_replace_refuses_a_dependent_row_as_the_array_api_version(host, rng) -> None:
    k, p = 40, 7
    u, _, _ = _factor_problem(rng, k)
    c_mat = u.T @ u
    keep = [i for i in range(k) if i != p]
    b = c_mat[keep, 3]  # the new row duplicates row 3: pivot ~ 0 relative to c
    c = float(c_mat[3, 3]) * (1 - 1e-15)
    xp = array_namespace(np.zeros(1))
    with pytest.raises(NotPositiveDefinite, match="pivot"):
        _linalg.replace_row(xp, u, p, b, c, np.zeros_like(u))
    with pytest.raises(NotPositiveDefinite, match="pivot"):
        host.replace(u, p, b, c)


def test_replace_validates(host, rng) -> None:
    u, b, c = _factor_problem(rng, 6)
    with pytest.raises(ValueError, match="not a row"):
        host.replace(u, 6, b, c)
    with pytest.raises(ValueError, match="shape"):
        host.replace(u, 1, b[:-1], c)
    with pytest.raises(TypeError, match="integer"):
        host.replace(u, 1.5, b, c)


@pytest.mark.parametrize("seed", [0, 7])
def test_results_do_not_depend_on_the_thread_order(host_library: Path, rng, seed: int) -> None:
    from mfac_core._kernels._host import HostKernels

    a = spd(rng, 150, (2,))
    b = rng.standard_normal((2, 150, 5))
    results = []
    for order_seed in (seed, 12345):
        h = HostKernels(host_library, seed=order_seed, workers=1)
        factor = h.cholesky(a)
        results.append(
            (
                factor,
                h.solve_triangular(factor, b, trans=True),
                h.triangular_inverse(factor, lower=True),
            )
        )
    for first, second in zip(*results, strict=True):
        np.testing.assert_array_equal(first, second)


def test_plans() -> None:
    plan = _plan.cholesky(1024, 1, "float64")
    kinds = [launch.kernel for launch in plan.launches]
    assert kinds == ["chol_panel", "chol_syrk"] * 15 + ["chol_panel"]
    assert plan.launches[0].grid == (1024 - 64) // _plan.PANEL_ROWS
    assert plan.launches[1].grid == 15 * 16 // 2 + 1  # lower tiles, plus the mover block
    plan = _plan.cholesky(64, 8192, "float64")
    assert [(launch.kernel, launch.grid) for launch in plan.launches] == [("chol_panel", 8192)]
    plan = _plan.trsm(1000, 33, 4, "float32", lower=False, trans=True)
    (launch,) = plan.launches
    assert launch.grid == 4 * 3 and launch.args[-1] == _plan.TRSM_FORWARD | _plan.TRSM_TRANS
    assert _plan.trsm(10, 0, 3, "float64", lower=True, trans=False).launches == ()
    with pytest.raises(ValueError, match="limit"):
        _plan.cholesky(200, 2**30, "float64")  # 9 row chunks per matrix
    with pytest.raises(ValueError, match="32-bit"):
        _plan.cholesky(64, 2**31, "float64")
    with pytest.raises(ValueError, match="'float64' or 'float32'"):
        _plan.trsm(2, 1, 1, "float16", lower=True, trans=False)


# -- the implementation switch and lazy imports -------------------------------------------------


def test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MFAC_CUPY_LINALG", raising=False)
    assert mfac_core.get_cupy_linalg() == "auto"
    monkeypatch.setenv("MFAC_CUPY_LINALG", "cusolver")
    assert mfac_core.get_cupy_linalg() == "cusolver"  # read at call time
    previous = mfac_core.set_cupy_linalg("kernels")
    try:
        assert previous is None and mfac_core.get_cupy_linalg() == "kernels"
    finally:
        mfac_core.set_cupy_linalg(previous)
    assert mfac_core.get_cupy_linalg() == "cusolver"
    monkeypatch.setenv("MFAC_CUPY_LINALG", "magma")
    with pytest.raises(ValueError, match="MFAC_CUPY_LINALG must be one of auto, kernels, cusolver"):
        mfac_core.get_cupy_linalg()
    with pytest.raises(ValueError, match="one of"):
        mfac_core.set_cupy_linalg("cublas")


def test_auto_sends_single_matrices_to_cusolver() -> None:
    """A stack of one (a single-block set-up) is a single matrix: cuSOLVER/cuBLAS serve it."""
    from mfac_core._linalg._cupy import kernels_serve

    assert not kernels_serve("auto", (256, 256))
    assert not kernels_serve("auto", (1, 256, 256))  # was sent to the kernels
    assert kernels_serve("auto", (2, 64, 64))
    assert kernels_serve("auto", (8192, 64, 64))
    assert kernels_serve("kernels", (1, 256, 256)) and kernels_serve("kernels", (256, 256))
    assert not kernels_serve("cusolver", (8192, 64, 64))


def test_importing_the_package_does_not_import_cupy() -> None:
    code = (
        "import sys, mfac_core, mfac_core._kernels, mfac_core._kernels._plan, "
        "mfac_core._kernels._ops, mfac_core._kernels._host; "
        "assert 'cupy' not in sys.modules, 'cupy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- benchmarks/gpu.py without a GPU -------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_benchmark():
    path = ROOT / "benchmarks" / "gpu.py"
    ast.parse(path.read_text())
    spec = importlib.util.spec_from_file_location("mfac_gpu_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_gpu_benchmark_helpers(gpu_benchmark, rng) -> None:
    a = gpu_benchmark.spd_matrix(rng, 20, (3,))
    assert a.shape == (3, 20, 20) and np.all(np.linalg.eigvalsh(a) > 0.4)
    assert gpu_benchmark.relative_error(np.ones(3) * 1.5, np.ones(3)) == pytest.approx(0.5)
    assert gpu_benchmark.ihvp_floor_seconds(1024, 10**7, 4, 4e12) == pytest.approx(0.02048)
    table = gpu_benchmark.format_table(("a", "bb"), [("x", 1.5e-12), ("yy", 3.0)])
    assert table.splitlines() == ["a   bb      ", "--  --------", "x   1.50e-12", "yy  3       "]
    assert gpu_benchmark.parse_args(["--quick"]).quick


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_gpu_benchmark_skips_cleanly_without_cupy(gpu_benchmark, capsys) -> None:
    assert gpu_benchmark.main(["--quick"]) == gpu_benchmark.EXIT_OK
    assert "skipped, CuPy is not installed" in capsys.readouterr().out
    assert gpu_benchmark.main(["--require-gpu"]) == gpu_benchmark.EXIT_NO_GPU


# -- on a GPU: the CuPy launchers (skipped without CuPy and a device) ---------------------------


@pytest.fixture(scope="module")
def cupy():
    return cupy_with_a_device()


@pytest.mark.parametrize("m", (*ODD_SIZES, 300))
def test_cupy_kernels_match_numpy(cupy, rng, m: int) -> None:
    a = spd(rng, m, (3,))
    ref = np.linalg.cholesky(a)
    factor = _kernels.cholesky(cupy.asarray(a))
    assert rel_err(cupy.asnumpy(factor), ref) <= tol(m)
    inv = _kernels.triangular_inverse(cupy.asarray(ref))
    assert rel_err(cupy.asnumpy(inv), np.linalg.inv(ref)) <= tol(m)
    b = rng.standard_normal((3, m, 17))
    for lower in (True, False):
        t = ref if lower else np.swapaxes(ref, -1, -2).copy()
        for trans in (False, True):
            x = _kernels.solve_triangular(
                cupy.asarray(t), cupy.asarray(b), lower=lower, trans=trans
            )
            op = np.swapaxes(t, -1, -2) if trans else t
            assert rel_err(cupy.asnumpy(x), np.linalg.solve(op, b)) <= tol(m)


def test_cupy_replace_and_errors(cupy, rng) -> None:
    u, b, c = _factor_problem(rng, 90)
    xp = array_namespace(np.zeros(1))
    ref = _linalg.replace_row(xp, u, 30, b, c, np.zeros_like(u))
    out = cupy.zeros_like(cupy.asarray(u))
    _kernels.replace(None, cupy.asarray(u), 30, cupy.asarray(b), c, out)
    assert rel_err(cupy.asnumpy(out), ref) <= tol(90)
    a = spd(rng, 50)
    a[10, 10] = -1
    with pytest.raises(NotPositiveDefinite):
        _kernels.cholesky(cupy.asarray(a))
    with pytest.raises(TypeError, match=r"cupy\.ndarray"):
        _kernels.cholesky(a)
