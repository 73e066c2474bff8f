"""Shared fixtures and helpers: the backend matrix (library x device), the dtypes, and the
small helpers several test modules use (import them with ``from conftest import ...``).

Hypothesis profiles: ``ci`` (the default: derandomized, so every run draws the
same examples) and ``dev`` (more examples, random); pick one with the
``HYPOTHESIS_PROFILE`` environment variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from mfac_core import LinearOperator, _engine, _fused

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Each parallel test worker (pytest-xdist) holds JAX, PyTorch and the test data: about 4 GiB at
# its peak on Linux, measured on the 2-CPU CI machine.
_WORKER_MEMORY = 4 << 30
_MAX_WORKERS = 4


def _cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """The workers of ``-n auto``: one per CPU, at most four and as many as the free memory holds.

    More workers than CPUs only contend, and each holds JAX and PyTorch (``_WORKER_MEMORY``).
    """
    workers = min(_cpus(), _MAX_WORKERS)
    available = _available_memory()
    if available is not None:
        workers = min(workers, available // _WORKER_MEMORY)
    return max(1, workers)


def _available_memory() -> int | None:
    """Bytes that new processes may take, or None where the system does not say.

    Linux's ``MemAvailable`` counts the page cache it would drop; the free pages alone
    (``SC_AVPHYS_PAGES``) would leave one worker on a machine that has read large files.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _share_the_cpus(config: pytest.Config) -> None:
    """Give each parallel worker its share of the CPUs' threads, unless the environment says.

    Left alone, every worker's BLAS, PyTorch, XLA and the CPU kernels each start a thread
    per CPU: with two workers on two CPUs the tests ran 1.4x longer each, and the whole run
    only 1.3x faster than one process (1.8x with one thread per worker). The settings are
    environment variables of the workers, set by the controller before it starts them, so
    each library reads them as it loads; the tests of thread counts set their own.
    """
    workers = getattr(config.option, "numprocesses", None)
    if not isinstance(workers, int) or workers < 2 or "PYTEST_XDIST_WORKER" in os.environ:
        return
    share = str(max(1, _cpus() // workers))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, share)
    flags = os.environ.get("XLA_FLAGS", "")
    if share == "1" and "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


def pytest_configure(config: pytest.Config) -> None:
    """Give JAX a persistent compilation cache in pytest's cache directory.

    JAX compiles every operation anew for each shape and dtype, and on the CPU those
    compilations are most of the JAX tests' time. CI runs the suite twice in one checkout
    (two OpenBLAS kernels, which XLA's code never calls), so the second run reuses the
    programs; XLA keys each entry on the program, the compile options and the jaxlib
    version, so nothing is reused across differing inputs. The environment variables
    (which JAX reads when imported) also reach the subprocesses that run the examples.
    With the cache plugin off (``-p no:cacheprovider``) or a cache directory set by the
    user, nothing changes.

    Under pytest-xdist (``-n``), the workers also get their share of the CPUs' threads
    (``_share_the_cpus``).
    """
    _share_the_cpus(config)
    cache = getattr(config, "cache", None)
    if cache is None or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    settings_ = {
        "JAX_COMPILATION_CACHE_DIR": str(cache.mkdir("jax-compilation-cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    os.environ.update(settings_)
    if "jax" in sys.modules:  # imported before this hook: set its flags directly
        import jax

        jax.config.update("jax_compilation_cache_dir", settings_["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclass(frozen=True)
class Backend:
    """One array library on one device, as the tests see it.

    Attributes
    ----------
    name : str
        A readable id ("numpy", "strict-cpu", "strict-device1", "torch").
    xp : module
        The array-api-compat namespace (what ``array_namespace`` returns).
    device : object
        The device arrays are created on.
    make : callable
        ``make(np_array, dtype)`` -> array of this library on this device.
    """

    name: str
    xp: Any
    device: Any
    make: Callable[[Any, Any], Any]

    def dtype(self, name: str) -> Any:
        """The namespace's dtype called ``name`` ("float32", "int64", ...).

        NumPy's "bfloat16" is ml_dtypes' (JAX's bfloat16 in NumPy), which the namespace lacks.
        """
        if name == "bfloat16" and self.is_numpy:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return getattr(self.xp, name)

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """A copy of ``a`` (NumPy or nested lists) on this backend's device."""
        a = np.asarray(a)
        return self.make(a, self.dtype(dtype) if dtype is not None else None)

    @property
    def is_numpy(self) -> bool:
        return self.name == "numpy"

    @property
    def mutable(self) -> bool:
        """Whether the library's arrays can be written in place (not JAX's)."""
        return self.name != "jax"

    def skip_if_immutable(self) -> None:
        """Skip a test of the in-place sliding window on JAX (see mfac_core.jax instead)."""
        if not self.mutable:
            pytest.skip(
                "JAX arrays are immutable: DynamicIHVP refuses them; the JAX window "
                "is mfac_core.jax's functional one (tests/test_jax.py)"
            )


def _numpy_backend() -> Backend:
    xp = array_api_compat.array_namespace(np.zeros(1))

    def make(a: Any, dtype: Any) -> Any:
        return np.array(a, dtype=dtype, copy=True)

    return Backend("numpy", xp, array_api_compat.device(np.zeros(1)), make)


def _strict_backend(device_name: str) -> Backend:
    strict = pytest.importorskip("array_api_strict")
    dev = strict.Device(device_name)
    example = strict.asarray(np.zeros(1), device=dev)
    xp = array_api_compat.array_namespace(example)

    def make(a: Any, dtype: Any) -> Any:
        return xp.asarray(a, dtype=dtype, device=dev, copy=True)

    name = "strict-cpu" if device_name == "CPU_DEVICE" else f"strict-{device_name}"
    return Backend(name, xp, dev, make)


def _torch_backend() -> Backend:
    torch = pytest.importorskip("torch")
    example = torch.zeros(1, device="cpu")
    xp = array_api_compat.array_namespace(example)

    def make(a: Any, dtype: Any) -> Any:
        return torch.tensor(a, dtype=dtype, device="cpu")  # always a copy

    return Backend("torch", xp, example.device, make)


def _jax_backend() -> Backend:
    # The core needs JAX's 64-bit mode; the autouse fixture below turns it on, for the
    # test's thread only, around every test that uses this backend.
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        example = jax.numpy.zeros(1)
        xp = array_api_compat.array_namespace(example)
        dev = array_api_compat.device(example)

    def make(a: Any, dtype: Any) -> Any:
        with jax.enable_x64(True):
            return jax.numpy.array(a, dtype=dtype, copy=True)

    return Backend("jax", xp, dev, make)


def cupy_with_a_device() -> Any:
    """The ``cupy`` module, or a skip when CuPy or a CUDA device is missing."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:  # no driver
        pytest.skip(f"no CUDA device ({exc})")
    return cupy


def _cupy_backend() -> Backend:
    cupy = cupy_with_a_device()
    example = cupy.zeros(1)
    xp = array_api_compat.array_namespace(example)

    def make(a: Any, dtype: Any) -> Any:
        return cupy.array(a, dtype=dtype, copy=True)

    return Backend("cupy", xp, array_api_compat.device(example), make)


_BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy_backend,
    "strict-cpu": lambda: _strict_backend("CPU_DEVICE"),
    "strict-device1": lambda: _strict_backend("device1"),
    "torch": _torch_backend,
    "jax": _jax_backend,
    "cupy": _cupy_backend,
}


#: The layouts of the generic backend matrix that JAX runs: one of each code path (a full
#: Woodbury form, d < m, Woodbury and dense blocks with a ragged last block). JAX compiles
#: every operation anew for each shape, seconds per layout on the CPU, while its arithmetic
#: is the array-API path that NumPy, array-api-strict and PyTorch check on every layout.
JAX_LAYOUTS = frozenset(
    {
        "full",
        "full-woodbury",
        "full-d<m",
        "woodbury-blocks+dense-ragged",
        "wide-blocks+ragged",
        "dense-blocks+ragged",
        "narrow-blocks+ragged",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the JAX cases of layouts outside ``JAX_LAYOUTS`` (see there)."""
    skip = pytest.mark.skip(reason="JAX runs the layouts of conftest.JAX_LAYOUTS only")
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        if params.get("xp_device") == "jax" and params.get("layout", "full") not in JAX_LAYOUTS:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _slow_passes_said() -> Any:
    """Without the C extension, the note that the passes are slower counted as given.

    The library gives it once per process (a ``UserWarning`` at the first product over
    single-precision gradients), so it would land in whichever test came first and fail
    those that compare the warnings they see. ``test_exact.py`` checks the note itself.
    """
    if _fused.available():
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_engine, "_warned_slow", True)
        yield


@pytest.fixture(autouse=True)
def _jax_float64(request: pytest.FixtureRequest) -> Any:
    """64-bit JAX (thread-local, restored afterwards) for tests on the JAX backend."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or "jax" not in callspec.params.values():
        yield
        return
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session", params=list(_BACKENDS), ids=list(_BACKENDS))
def xp_device(request: pytest.FixtureRequest) -> Backend:
    """Each array library and device of the CPU test matrix."""
    return _BACKENDS[request.param]()


@pytest.fixture(scope="session")
def numpy_backend() -> Backend:
    """NumPy only (for tests about NumPy-specific behaviour)."""
    return _numpy_backend()


@pytest.fixture(scope="session")
def strict_device1() -> Backend:
    """array-api-strict on its second simulated device."""
    return _strict_backend("device1")


@pytest.fixture(scope="session", params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> str:
    """The floating dtypes, by name (convert with ``Backend.dtype``)."""
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator, so every test draws the same data on every run."""
    return np.random.default_rng(20211206)


@pytest.fixture(scope="session")
def make_backend() -> Callable[[str], Backend]:
    """``make_backend(name)`` -> the :class:`Backend` of that id (for custom parametrisations)."""
    return lambda name: _BACKENDS[name]()


# -- helpers shared by several test modules ------------------------------------------------------


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """Values exactly representable in ``dtype``, kept in float64 for the references."""
    return np.asarray(a).astype(dtype).astype(np.float64)


def close_where_promised(actual: Any, desired: Any, *, kappa: float, **kw: Any) -> None:
    """``assert_close`` where its ``eps kappa`` bound promises a digit, else finite values.

    At ``DEFAULT_FACTOR * eps * kappa >= 1`` the bound is ``||desired||`` or more (a zero
    result would pass it), and ``assert_close`` refuses such a tolerance: only the
    values' finiteness is checked there. ``kw`` goes to ``assert_close`` (``dtype``,
    ``err_msg``); ``eps`` is that of ``dtype``, else of ``actual``'s dtype.
    """
    from mfac_core.testing import DEFAULT_FACTOR, assert_close, to_numpy

    dtype = kw.get("dtype") or getattr(actual, "dtype", None)
    name = str(dtype).rsplit(".", 1)[-1]
    eps = 2.0**-7 if name == "bfloat16" else float(np.finfo(name).eps)
    if DEFAULT_FACTOR * eps * kappa < 1:
        assert_close(actual, desired, kappa=kappa, **kw)
    else:
        assert np.all(np.isfinite(to_numpy(actual))), kw.get("err_msg", "")


def check_space(y: Any, backend: Backend, dtype: str) -> None:
    """``y`` is an array of the backend's library, on its device, with ``dtype``."""
    assert array_api_compat.array_namespace(y) is backend.xp
    assert y.dtype == backend.dtype(dtype)
    assert array_api_compat.device(y) == backend.device


class Dense(LinearOperator):
    """A general (rectangular, non-symmetric) matrix as an operator, of any library."""

    def __init__(self, A: Any, *, check_finite: bool = True) -> None:
        xp = array_api_compat.array_namespace(A)
        super().__init__(
            shape=tuple(int(s) for s in A.shape),
            dtype=A.dtype,
            xp=xp,
            device=array_api_compat.device(A),
            check_finite=check_finite,
        )
        self.A = A

    def _matmat(self, X: Any) -> Any:
        return self.A @ X

    def _rmatmat(self, X: Any) -> Any:
        return self.A.T @ X


@pytest.fixture(params=["kernels", "fallback"])
def engine_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The passes through the C extension, and through float64 column pieces."""
    if request.param == "kernels":
        if not _fused.available():
            pytest.skip("the C extension was not built")
    else:
        monkeypatch.setattr(_engine, "host_view", lambda xp, A: None)
    return request.param


def check_product_overflowing_on_rank_0(
    fn: Callable[[Any], Any], want: np.ndarray, *, dtype: str, warning: str, kappa: float
) -> None:
    """Run a sharded product on 2 thread ranks whose rank 0's shard overflows ``dtype``.

    Rank 0 says so (its ``RuntimeWarning``, raised with ``warning="error"``) or returns
    its non-finite shard; rank 1, whose shard is finite, returns it as one process would
    (``want[3:]``): every rank stopped refining together, none waited for another.
    """
    import warnings

    from mfac_core.testing import assert_close, run_spmd_threads

    with warnings.catch_warnings():
        warnings.simplefilter(warning, RuntimeWarning)  # type: ignore[arg-type]
        results = run_spmd_threads(fn, 2, timeout=10)
    if warning == "error":
        assert isinstance(results[0], RuntimeWarning), results
        assert f"exceeds {dtype}'s range" in str(results[0])
    else:
        assert not np.all(np.isfinite(results[0])), results
    assert isinstance(results[1], np.ndarray), results
    assert np.all(np.isfinite(want[3:])) and np.all(np.isfinite(results[1]))
    assert_close(results[1], want[3:], kappa=kappa)
