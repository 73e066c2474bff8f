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
    """A CuPy stand-in in ``sys.modules``; every module imported on top of it removed after."""
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
            del sys.modules[name]
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
