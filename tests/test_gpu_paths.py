"""CPU analogues of GPU-only code paths (docs/gpu.rst): CuPy devices, CuPy chunks, TF32.

No GPU and no CuPy here. Where a path depends on what CuPy does, a stand-in CuPy
module (:func:`fake_cupy`) provides just what array-api-compat touches when it wraps
CuPy, with creation functions that record the *current* device the way CuPy's do
(CuPy creates every array on the current device). What that proves: the package
routes CuPy arrays through its device-honouring namespace and enters the device
asked for around each creation. What it cannot prove: that ``cupy.cuda.Device``
itself behaves as the stand-in does (it is CuPy's documented behaviour).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from typing import ClassVar

import pytest


class _FakeDevice:
    """``cupy.cuda.Device``: a context manager making its id current (None: the current one)."""

    stack: ClassVar[list[int]] = [0]  # the current device, innermost last

    def __init__(self, device=None):
        self.id = self.stack[-1] if device is None else getattr(device, "id", device)

    def __enter__(self):
        self.stack.append(self.id)
        return self

    def __exit__(self, *exc):
        self.stack.pop()

    def __eq__(self, other):
        return isinstance(other, _FakeDevice) and other.id == self.id

    def __hash__(self):
        return hash(self.id)


class _FakeArray:
    """A ``cupy.ndarray`` stand-in: a shape and the device it was created on."""

    def __init__(self, shape, device_id):
        self.shape = tuple(shape) if isinstance(shape, tuple) else (shape,)
        self.device = _FakeDevice(device_id)
        self.dtype = "float64"
        self.ndim = len(self.shape)


def _create(shape, dtype=None, **kwargs):
    assert "device" not in kwargs  # array-api-compat drops it before calling CuPy
    return _FakeArray(shape, _FakeDevice.stack[-1])


def _create_like(a, dtype=None, **kwargs):
    return _FakeArray(a.shape, _FakeDevice.stack[-1])


class _FakeModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _create  # any other CuPy name array-api-compat binds at import


@pytest.fixture
def fake_cupy():
    """A CuPy stand-in in ``sys.modules``; every module imported on top of it removed after.

    Where CuPy itself is installed the stand-in would mix with it (array-api-compat
    caches its namespace per array class): those machines run the real thing instead.
    """
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: the stand-in is for machines without it")
    before = set(sys.modules)
    cupy = _FakeModule("cupy")
    cupy.__all__ = []
    cupy.ndarray = _FakeArray
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device = _FakeDevice
    cuda.device = types.ModuleType("cupy.cuda.device")
    cuda.device.Device = _FakeDevice
    cupy.cuda = cuda
    for name in ("zeros", "empty", "ones", "eye", "arange", "full", "linspace"):
        setattr(cupy, name, _create)
    for name in ("zeros_like", "empty_like", "ones_like", "full_like"):
        setattr(cupy, name, _create_like)
    subs = {}
    for sub in ("linalg", "fft"):
        subs[sub] = _FakeModule(f"cupy.{sub}")
        subs[sub].__all__ = []
        setattr(cupy, sub, subs[sub])
    sys.modules.update({"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.device": cuda.device})
    sys.modules.update({f"cupy.{k}": v for k, v in subs.items()})
    try:
        yield cupy
    finally:
        for name in set(sys.modules) - before:
            module = sys.modules.pop(name)
            parent, _, child = name.rpartition(".")
            if getattr(sys.modules.get(parent), child, None) is module:
                delattr(sys.modules[parent], child)  # or `from parent import child` finds it
        _FakeDevice.stack[:] = [0]


def test_cupy_arrays_are_created_on_the_device_asked_for_not_the_current_one(fake_cupy):
    from mfac_core._compat import array_namespace, is_cupy_namespace, namespace_name

    xp = array_namespace(_FakeArray((2,), 0))
    assert is_cupy_namespace(xp) and namespace_name(xp) == "cupy"
    assert xp is array_namespace(_FakeArray((3,), 1))  # one namespace: identity checks hold
    assert _FakeDevice.stack == [0]  # device 0 is current throughout
    assert xp.zeros((2, 3), dtype="float64", device=_FakeDevice(1)).device.id == 1
    assert xp.empty((4,), device=_FakeDevice(1)).device.id == 1
    assert xp.eye(3, dtype="float64", device=_FakeDevice(1)).device.id == 1
    on_one = _FakeArray((5,), 1)
    assert xp.zeros_like(on_one).device.id == 1  # *_like: the argument's device
    assert xp.zeros((2,)).device.id == 0  # no device: the current one, as CuPy does
    assert _FakeDevice.stack == [0]


def test_device_scoped_names_wraps_every_creation_function_and_nothing_else():
    from mfac_core._compat import CREATION_FUNCTIONS, device_scoped_names

    seen = []

    @contextlib.contextmanager
    def on(device):
        seen.append(device)
        yield

    base = types.SimpleNamespace(__all__=[*CREATION_FUNCTIONS, "matmul"])
    for name in base.__all__:
        setattr(base, name, lambda *a, **k: k.get("device"))
    names = device_scoped_names(base, on)
    assert names["matmul"] is base.matmul
    for name in CREATION_FUNCTIONS:
        assert names[name](1, device="gpu1") == "gpu1"
    assert seen == ["gpu1"] * len(CREATION_FUNCTIONS)


# -- TF32 ---------------------------------------------------------------------------------
# With torch.backends.cuda.matmul.allow_tf32 (or CUPY_TF32=1 for CuPy), cuBLAS runs float32
# GEMMs in TF32 (10 mantissa bits). The library documents float64 sums (the passes, the
# Gram, the m x m work), so no float32 or 2-byte GEMM may run on those paths: then TF32 has
# nothing to apply to. On the CPU, the CUDA path of PyTorch tensors is the same code with
# the host kernels (_engine's NumPy views of CPU tensors) switched off; the audit records
# every GEMM-like aten call made from the package's code and the dtypes it saw.

_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "linear"}


def _gemm_audit(torch, package_dir):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Audit(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.low = []  # (op, dtypes, innermost frame of the package)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in _GEMMS:
                dtypes = {str(a.dtype) for a in args if isinstance(a, torch.Tensor)}
                if dtypes - {"torch.float64"}:
                    frame = sys._getframe(1)
                    while frame is not None and not frame.f_code.co_filename.startswith(
                        package_dir
                    ):
                        frame = frame.f_back
                    if frame is not None:
                        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                        self.low.append((name, sorted(dtypes), where))
            return func(*args, **(kwargs or {}))

    return Audit()


@pytest.fixture
def tf32_on():
    """TF32 allowed process-wide, as training scripts often do; restored afterwards."""
    torch = pytest.importorskip("torch")
    before = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    try:
        yield torch
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])


def _exercise(torch):
    """Set-ups, products, diagonals, entries and optimiser steps of every torch operator."""
    from mfac_core import DynamicIHVP, SpectralIHVP, StaticIHVP, WindowOptions
    from mfac_core.torch import MFAC

    gen = torch.Generator().manual_seed(0)
    m, d = 4, 24
    G = torch.randn(m, d, generator=gen)
    x, X = torch.randn(d, generator=gen), torch.randn(d, 3, generator=gen)
    idx = torch.tensor([0, 3, 7])
    out = []
    ops = [StaticIHVP(G, damp=0.1), StaticIHVP(G, damp=0.1, block_size=6)]
    for op in [*ops, StaticIHVP.streamed(G, device="cpu", damp=0.1)]:
        out += [op @ x, op @ X, op.diagonal(), op.entries(idx, idx)]
    out.append(StaticIHVP(G.half(), damp=0.1) @ x)
    for refactor_every in (None, 0):  # incremental edits, and a full factorisation each time
        op = DynamicIHVP(
            m,
            d,
            damp=0.1,
            dtype=torch.float32,
            xp=torch,
            options=WindowOptions(refactor_every=refactor_every),
        )
        out += [op.update_and_matvec(G[i % m] + i) for i in range(m + 1)]
        out.append(op @ X)
    for kwargs in ({}, {"block_size": 6}):
        op = SpectralIHVP(G, damp=0.1, **kwargs)
        out += [op @ x, op.diagonal()]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
    opt = MFAC(model.parameters(), num_grads=2, damp=0.1, lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 5, generator=gen)).sum().backward()
        opt.step()
    out += [p.detach().clone() for p in model.parameters()]
    return out


@pytest.fixture
def cuda_code_path(monkeypatch):
    """CPU tensors through the code CUDA tensors take: no NumPy views for the host kernels."""
    import mfac_core._engine

    monkeypatch.setattr(mfac_core._engine, "host_view", lambda xp, A: None)
    monkeypatch.setattr(mfac_core._engine, "vector_view", lambda xp, X: None)


def test_no_float32_gemm_on_the_documented_paths_so_tf32_cannot_apply(tf32_on, cuda_code_path):
    import mfac_core

    torch = tf32_on
    package = os.path.dirname(mfac_core.__file__)
    audit = _gemm_audit(torch, package)
    with audit:
        _exercise(torch)
    assert audit.low == []
    # The audit sees a float32 GEMM where there is one (here, in this file's code).
    probe = _gemm_audit(torch, os.path.dirname(__file__))
    with probe:
        torch.ones(2, 3) @ torch.ones(3, 2)
    assert [(op, dtypes) for op, dtypes, _ in probe.low] == [("mm", ["torch.float32"])]


def test_results_and_switches_are_unchanged_by_tf32(tf32_on, cuda_code_path):
    torch = tf32_on
    with_tf32 = _exercise(torch)
    # The library left the process-wide switches as the user set them.
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "medium"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    without = _exercise(torch)
    assert all(torch.equal(a, b) for a, b in zip(with_tf32, without, strict=True))


# -- the CUDA libraries CuPy loads ------------------------------------------------------------


def test_missing_cusolver_or_nvrtc_says_what_to_install(fake_cupy, monkeypatch):
    # A driver-only machine: CuPy imports, but cupyx.scipy.linalg cannot load cuBLAS or
    # cuSOLVER, and a kernel's first launch cannot load NVRTC (CuPy's message below).
    from mfac_core._linalg import _cupy

    monkeypatch.setitem(sys.modules, "cupyx", None)
    monkeypatch.setitem(sys.modules, "cupyx.scipy", None)
    monkeypatch.setitem(sys.modules, "cupyx.scipy.linalg", None)
    with pytest.raises(ImportError, match=r"cupyx\.scipy\.linalg.*cupy-cuda12x\[ctk\]"):
        _cupy.make_backend()
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.linalg = types.ModuleType("cupyx.scipy.linalg")
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.scipy", cupyx.scipy)
    monkeypatch.setitem(sys.modules, "cupyx.scipy.linalg", cupyx.scipy.linalg)

    def no_nvrtc(a):
        raise RuntimeError(
            "CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open "
            "shared object file: No such file or directory"
        )

    monkeypatch.setattr(_cupy, "_kernels", types.SimpleNamespace(cholesky=no_nvrtc))
    backend = _cupy.make_backend()
    with pytest.raises(RuntimeError, match=r"libnvrtc.*NVRTC, cuBLAS, cuSOLVER.*\[ctk\]"):
        backend.cholesky(_FakeArray((3, 4, 4), 0))  # a stack: the kernels' path


def _load_gpu_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("mfac_gpu_benchmark_paths", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_gpu_benchmark_uses_the_installed_package_and_says_what_to_install(
    fake_cupy, monkeypatch, capsys
):
    path_before = list(sys.path)
    bench = _load_gpu_benchmark()
    assert sys.path == path_before  # no path of the source tree put first
    # CuPy and a device, but not the CUDA libraries (a bare cupy-cuda12x, driver only).
    fake_cupy.cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    monkeypatch.setitem(sys.modules, "cupyx", None)
    monkeypatch.setenv("CUPY_TF32", "0")
    assert bench.main(["--quick"]) == bench.EXIT_OK
    out = capsys.readouterr().out
    assert "skipped, CuPy cannot load a CUDA library" in out and "cupy-cuda12x[ctk]" in out
    assert bench.main(["--quick", "--require-gpu"]) == bench.EXIT_NO_GPU
    assert bench.WINDOW_EDIT_ROW == 0  # the row a full sliding window edits
