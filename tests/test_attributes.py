"""The attributes an operator is built with are read-only (``_attributes``)."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest
from conftest import Backend

from mfac_core import (
    DynamicIHVP,
    EmpiricalFisher,
    ShardedStaticIHVP,
    SpectralIHVP,
    StaticIHVP,
)
from mfac_core.distributed import SingleProcessComm
from mfac_core.testing import to_numpy

_BUILDERS = {
    "static": lambda G: StaticIHVP(G, damp=0.1, refine=1),
    "static-blocks": lambda G: StaticIHVP(G, damp=0.1, block_size=5),
    "fisher": lambda G: EmpiricalFisher(G, damp=0.1),
    "spectral": lambda G: SpectralIHVP(G, damp=0.1),
    "spectral-derived": lambda G: SpectralIHVP(G, damp=1.0).with_damp(0.1).inv_sqrt(),
    "dynamic": lambda G: DynamicIHVP.from_window(G, damp=0.1),
}


def _values(op: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(op).items() if k in type(op)._fixed}


@pytest.mark.parametrize("kind", list(_BUILDERS))
@pytest.mark.parametrize(
    ("name", "value"),
    [("damp", 1.0), ("num_grads", 3), ("dim", 7), ("shape", (7, 7)), ("dtype", "float32")],
)
def test_a_built_with_attribute_cannot_be_assigned(
    xp_device: Backend, kind: str, name: str, value: Any
) -> None:
    # A damping assigned after the set-up was half used: a refinement's residual and the
    # repr took it, the factor kept the old one (a product 9x off, silently).
    if kind == "dynamic" and not xp_device.mutable:
        pytest.skip("the window is edited in place: no JAX DynamicIHVP")
    rng = np.random.default_rng(0)
    G = xp_device.asarray(rng.standard_normal((4, 12)), "float64")
    x = xp_device.asarray(rng.standard_normal(12), "float64")
    op = _BUILDERS[kind](G)
    before, y = _values(op), to_numpy(op.matvec(x))
    with pytest.raises(AttributeError, match=rf"{type(op).__name__}\.{name} cannot be assigned"):
        setattr(op, name, value)
    assert _values(op) == before
    np.testing.assert_array_equal(to_numpy(op.matvec(x)), y)


def test_a_window_cannot_be_given_a_block_size() -> None:
    # A window is never block-wise: the assigned block_size was taken and repr reported
    # block_size=3 for a window whose products are the full Woodbury ones.
    rng = np.random.default_rng(1)
    op = DynamicIHVP.from_window(rng.standard_normal((4, 12)), damp=0.1)
    text = repr(op)
    with pytest.raises(AttributeError, match=r"DynamicIHVP\.block_size cannot be assigned"):
        op.block_size = 3
    assert "block_size" not in vars(op)
    assert repr(op) == text


@pytest.mark.parametrize("kind", list(_BUILDERS))
def test_a_built_with_attribute_cannot_be_deleted(kind: str) -> None:
    # Deleted, a fixed attribute was no longer held: assigning it again passed, and the
    # refinement and repr took a damping the factor was not built with.
    rng = np.random.default_rng(5)
    G, x = rng.standard_normal((4, 12)), rng.standard_normal(12)
    op = _BUILDERS[kind](G)
    before, y = _values(op), op.matvec(x)
    for name in type(op)._fixed:
        if name in before:
            with pytest.raises(AttributeError, match=rf"\.{name} cannot be deleted"):
                delattr(op, name)
    assert _values(op) == before
    np.testing.assert_array_equal(op.matvec(x), y)
    # Other attributes are deleted as usual.
    op.note = 1
    del op.note
    assert not hasattr(op, "note")


@pytest.mark.parametrize(
    ("kind", "hint"),
    [
        ("static", "build another operator"),
        ("spectral", r"with_damp\(\)"),
        ("dynamic", r"set_damp\(\)"),
    ],
)
def test_the_refusal_names_the_way_to_another_damping(kind: str, hint: str) -> None:
    op = _BUILDERS[kind](np.random.default_rng(1).standard_normal((3, 6)))
    with pytest.raises(AttributeError, match=hint):
        op.damp = 2.0


def test_the_methods_that_change_the_damping_still_do(numpy_backend: Backend) -> None:
    rng = np.random.default_rng(2)
    G, x = rng.standard_normal((4, 9)), rng.standard_normal(9)
    dense = lambda damp: np.linalg.solve(damp * np.eye(9) + G.T @ G / 4, x)  # noqa: E731
    window = DynamicIHVP.from_window(G, damp=0.1)
    window.set_damp(2.0)
    assert window.damp == 2.0
    np.testing.assert_allclose(window.matvec(x), dense(2.0), rtol=1e-12, atol=0)
    other = DynamicIHVP(4, 9, damp=0.5, dtype="float64")
    other.load_state_dict(window.state_dict(), damp=0.25)
    assert other.damp == 0.25
    np.testing.assert_allclose(other.matvec(x), dense(0.25), rtol=1e-12, atol=0)
    spectral = SpectralIHVP(G, damp=0.1)
    assert spectral.with_damp(2.0).damp == 2.0 and spectral.damp == 0.1


@pytest.mark.parametrize("kind", list(_BUILDERS))
def test_copies_and_pickles_keep_the_attributes(kind: str) -> None:
    G = np.random.default_rng(3).standard_normal((4, 10))
    op = _BUILDERS[kind](G)
    for other in (copy.copy(op), copy.deepcopy(op), pickle.loads(pickle.dumps(op))):
        assert _values(other) == _values(op)
        with pytest.raises(AttributeError, match="cannot be assigned"):
            other.damp = 5.0


def test_sharded_and_composite_operators() -> None:
    G = np.random.default_rng(4).standard_normal((3, 8))
    sharded = ShardedStaticIHVP(G, damp=0.1, comm=SingleProcessComm())
    with pytest.raises(AttributeError, match=r"ShardedStaticIHVP\.damp cannot be assigned"):
        sharded.damp = 1.0
    # A composite holds no factor: its attributes are its own business.
    scaled = 2.0 * StaticIHVP(G, damp=0.1)
    scaled.check_finite = False
    assert scaled.check_finite is False
