"""Tests of ``_host_rows.zeros``: buffers the passes stream, allocated where NumPy's pages are."""

from __future__ import annotations

import copy
import pickle
import tracemalloc

import numpy as np
import pytest

from mfac_core import DynamicIHVP, _host_rows


def _numpy_allocations(make):
    """What ``make()`` returns, and the sizes of the NumPy data allocations it left alive."""
    tracemalloc.start()
    try:
        out = make()
        snap = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    traces = snap.filter_traces([tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    return out, [t.size for t in traces.traces]


@pytest.mark.parametrize("name", ["float32", "float64", "float16", "bfloat16"])
def test_torch_cpu_zeros_are_a_tensor_over_numpy_memory(name):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, name)
    Z, sizes = _numpy_allocations(
        lambda: _host_rows.zeros(torch, (3, 1000), dtype=dtype, device="cpu")
    )
    assert Z.dtype == dtype and Z.device.type == "cpu" and Z.shape == (3, 1000)
    assert Z.is_contiguous() and not Z.requires_grad
    assert torch.count_nonzero(Z).item() == 0
    assert 3 * 1000 * Z.element_size() in sizes
    Z[1, 2] = 1.5  # writable, and the write is the tensor's
    assert Z.sum().item() == 1.5


def test_other_libraries_devices_and_dtypes_get_the_library_zeros():
    torch = pytest.importorskip("torch")
    Z = _host_rows.zeros(np, (2, 3), dtype=np.float32)
    assert isinstance(Z, np.ndarray) and Z.dtype == np.float32 and not Z.any()
    meta = _host_rows.zeros(torch, (2, 3), dtype=torch.float32, device="meta")
    assert meta.device.type == "meta" and meta.shape == (2, 3)
    ints = _host_rows.zeros(torch, (2, 3), dtype=torch.int32)
    assert ints.dtype == torch.int32 and torch.count_nonzero(ints).item() == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_torch_window_buffer_is_numpy_memory_and_works_as_before(dtype):
    torch = pytest.importorskip("torch")
    m, d = 4, 2000
    w, sizes = _numpy_allocations(lambda: DynamicIHVP(m, d, damp=1e-2, dtype=dtype, xp=torch))
    assert m * d * w._G.element_size() in sizes
    gs = np.random.default_rng(0).standard_normal((m + 2, d)).astype(np.float32)
    for g in gs:
        s = w.update_and_matvec(torch.from_numpy(g))
    assert s.dtype == torch.float32 and s.shape == (d,)
    # Against the dense inverse of the stored (rounded) gradients, as any window's product.
    G = w._G.double().numpy()
    F = 1e-2 * np.eye(d) + G.T @ G / m
    want = np.linalg.solve(F, gs[-1].astype(np.float64))
    err = np.linalg.norm(s.double().numpy() - want) / np.linalg.norm(want)
    assert err <= 8 * np.finfo(np.float32).eps


def _copies(obj):
    """``copy.copy``, ``copy.deepcopy`` and a pickle round trip of ``obj``, by name."""
    return {
        "copy": lambda: copy.copy(obj),
        "deepcopy": lambda: copy.deepcopy(obj),
        "pickle": lambda: pickle.loads(pickle.dumps(obj)),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copies_of_a_torch_window_get_a_buffer_in_numpy_memory_as_a_fresh_one(dtype):
    # Regression: copies and unpickled windows got PyTorch-allocated buffers (no huge
    # pages), a fresh window NumPy-allocated ones.
    torch = pytest.importorskip("torch")
    m, d = 3, 1000
    w = DynamicIHVP(m, d, damp=1e-2, dtype=dtype, xp=torch)
    gen = torch.Generator().manual_seed(0)
    for _ in range(m + 1):
        w.update(torch.randn(d, generator=gen))
    g = torch.randn(d, generator=gen)
    want = copy.deepcopy(w).update_and_matvec(g)
    for how, make in _copies(w).items():
        c, sizes = _numpy_allocations(make)
        assert m * d * w._G.element_size() in sizes, how
        assert c._G.dtype == w._G.dtype and torch.equal(c._G, w._G), how
        assert torch.equal(c.update_and_matvec(g), want), how  # its own buffer, edited
        assert not torch.equal(c._G, w._G), how


def test_copies_and_loads_of_a_torch_mfac_window_are_in_numpy_memory():
    torch = pytest.importorskip("torch")
    from mfac_core.torch import MFAC

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 25)
        return model, MFAC(model.parameters(), lr=1e-2, num_grads=3)

    model, opt = make()
    model(torch.randn(2, 40)).sum().backward()
    opt.step()
    size = 3 * opt.dim * 4
    state = opt.state_dict()

    def loaded():
        fresh = make()[1]
        fresh.load_state_dict(state)
        return fresh

    for how, build in {**_copies(opt), "load_state_dict": loaded}.items():
        if how == "copy":
            continue  # a shallow copy of an optimizer shares its window
        c, sizes = _numpy_allocations(build)
        assert size in sizes, how
        assert torch.equal(c.ihvp._G, opt.ihvp._G), how
