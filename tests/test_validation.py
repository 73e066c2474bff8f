"""One rule per helper, one exception type per kind of mistake (mfac_core._validation),
checked through every public entry point that takes the argument."""

from __future__ import annotations

import operator
import re
import warnings
from fractions import Fraction

import numpy as np
import pytest

import mfac_core
from mfac_core import (
    DynamicIHVP,
    EmpiricalFisher,
    FactorizationError,
    IllConditionedWarning,
    SpectralIHVP,
    StaticIHVP,
    WindowOptions,
)
from mfac_core.pruning import prune, select_pruned, sparsity_schedule

G = np.random.default_rng(0).standard_normal((4, 10))

# -- counts: non-integers are TypeErrors, NumPy integers are integers ---------------------------


@pytest.mark.parametrize("value", [2.5, "3", True, 3.0])
def test_counts_refuse_non_integers_everywhere(value):
    with pytest.raises(TypeError, match="num_grads must be an int"):
        DynamicIHVP(value, 5, damp=1.0, dtype="float64")
    with pytest.raises(TypeError, match="refactor_every must be an int"):
        DynamicIHVP(3, 5, damp=1.0, dtype="float64", options=WindowOptions(refactor_every=value))
    with pytest.raises(TypeError, match="block_size must be an int"):
        StaticIHVP(G, damp=1.0, block_size=value)
    with pytest.raises(TypeError, match="steps must be an int"):
        sparsity_schedule(0.0, 0.5, value)
    with pytest.raises(TypeError, match="max_entries must be an int"):
        EmpiricalFisher(G, damp=1.0).todense(max_entries=value)


@pytest.mark.parametrize("kind", [np.int8, np.int32, np.int64, np.uint16])
def test_counts_accept_numpy_integers_everywhere(kind):
    op = DynamicIHVP(
        kind(3), kind(10), damp=1.0, dtype="float64", options=WindowOptions(refactor_every=kind(2))
    )
    assert (op.num_grads, op.dim, op.refactor_every) == (3, 10, 2)
    assert type(op.num_grads) is int
    assert StaticIHVP(G, damp=1.0, block_size=kind(4)).block_size == 4
    assert len(sparsity_schedule(0.0, 0.5, kind(3))) == 3
    assert EmpiricalFisher(G, damp=1.0).todense(max_entries=kind(100)).shape == (10, 10)


def test_counts_refuse_values_below_their_minimum():
    for call in (
        lambda: DynamicIHVP(0, 5, damp=1.0, dtype="float64"),
        lambda: DynamicIHVP(
            3, 5, damp=1.0, dtype="float64", options=WindowOptions(refactor_every=-1)
        ),
        lambda: StaticIHVP(G, damp=1.0, block_size=0),
        lambda: StaticIHVP(G, damp=1.0, refine=-1),
    ):
        with pytest.raises(ValueError, match=">= "):
            call()


# -- flags, choices, fractions ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["no", "", 0, 1, None, "False"])
def test_flags_refuse_anything_but_booleans(value):
    with pytest.raises(TypeError, match="zero_init must be True or False"):
        DynamicIHVP(3, 5, damp=1.0, dtype="float64", options=WindowOptions(zero_init=value))


def test_flags_accept_numpy_booleans():
    assert DynamicIHVP(
        3, 5, damp=1.0, dtype="float64", options=WindowOptions(zero_init=np.bool_(True))
    ).zero_init


@pytest.mark.parametrize("value", ["0.5", None, [0.5], complex(0.5, 0)])
def test_fractions_refuse_non_numbers(value):
    theta = np.ones(10)
    with pytest.raises(TypeError, match="sparsity must be a real number"):
        prune(theta, G, sparsity=value)
    if value is not None:  # select_pruned takes a sparsity or a count; None means "not given"
        with pytest.raises(TypeError, match="sparsity must be a real number"):
            select_pruned(theta, sparsity=value)


@pytest.mark.parametrize(
    "value",
    [-0.1, 1.0, 1.5, float("nan"), float("inf"), pytest.param(10**400, id="1e400-int")],
)
def test_fractions_refuse_values_outside_their_interval(value):
    with pytest.raises(ValueError, match=r"sparsity must be finite and lie in \[0, 1\)"):
        prune(np.ones(10), G, sparsity=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_an_interval_to_infinity_is_said_to_be_open(value):
    # "must be finite and lie in [0, inf]" contradicted itself.
    torch = pytest.importorskip("torch")
    from mfac_core.torch import MFAC

    with pytest.raises(ValueError, match=r"lr must be finite and lie in \[0, inf\),"):
        MFAC([torch.nn.Parameter(torch.zeros(3))], lr=value)


def test_choices_refuse_unknown_options():
    with pytest.raises(ValueError, match="saliency must be one of"):
        prune(np.ones(10), G, sparsity=0.5, saliency=3)


@pytest.mark.parametrize(
    "damp", [0.0, -1e-5, float("nan"), float("inf"), pytest.param(10**400, id="1e400-int")]
)
def test_damp_values(damp):
    # An int beyond float64's range (10**400) raised a bare OverflowError.
    for call in (
        lambda: StaticIHVP(G, damp=damp),
        lambda: EmpiricalFisher(G, damp=damp),
        lambda: DynamicIHVP(3, 10, damp=damp, dtype="float64"),
    ):
        with pytest.raises(ValueError, match="damp must be finite and > 0"):
            call()


@pytest.mark.parametrize("damp", [1e-310, 5e-324, np.float64(1e-308)])
def test_subnormal_damp_is_refused_naming_the_smallest_that_works(damp):
    # Regression: 1e-310 was accepted and then failed with a bare OverflowError.
    for call in (
        lambda: StaticIHVP(G, damp=damp),
        lambda: SpectralIHVP(G, damp=damp),
        lambda: DynamicIHVP(3, 10, damp=damp, dtype="float64"),
    ):
        with pytest.raises(ValueError, match=r"subnormal.*2\.2250738585072014e-308"):
            call()
    with pytest.warns(IllConditionedWarning):  # the smallest accepted works, and warns
        op = StaticIHVP(G, damp=2.2250738585072014e-308)
    assert np.all(np.isfinite(op.diagonal()))


@pytest.mark.parametrize("damp", [Fraction(1, 10**400), np.longdouble(2) ** -1100])
def test_a_positive_damp_that_underflows_is_not_said_to_be_nonpositive(damp):
    # Regression: Fraction(1, 10**400) > 0 was refused as "must be finite and > 0".
    with pytest.raises(ValueError, match=r"underflows float64 to 0.*2\.2250738585072014e-308"):
        StaticIHVP(G, damp=damp)


def test_a_damping_whose_shift_overflows_is_refused_naming_the_largest_that_works():
    # Regression: m * damp (the capacitance matrix's shift) beyond float64's range was
    # accepted and gave NaN products (StaticIHVP, DynamicIHVP) or silently dropped the
    # gradients' term (SpectralIHVP), however well-conditioned F was.
    m, huge = G.shape[0], 1e308
    top = float.fromhex("0x1.fffffffffffffp+1023") / 4 / m  # exact: m is a power of two
    message = rf"^damp=1e\+308 is too large for 4 gradients: .* works is {re.escape(repr(top))}$"
    spectral = SpectralIHVP(G, damp=1.0)
    window = DynamicIHVP(m, 10, damp=1.0, dtype="float64")
    window.update(G[0])
    state = window.state_dict()
    for call in (
        lambda: StaticIHVP(G, damp=huge),
        lambda: StaticIHVP.from_gradients(iter(()), num_grads=m, dim=10, damp=huge),
        lambda: SpectralIHVP(G, damp=huge),
        lambda: spectral.with_damp(huge),
        lambda: DynamicIHVP(m, 10, damp=huge, dtype="float64"),
        lambda: DynamicIHVP.from_window(G, damp=huge),
        lambda: window.set_damp(huge),
        lambda: window.load_state_dict(state, damp=huge),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=message.replace("damp=", r"damps\[1\]=")):
        spectral.sweep(G[0], damps=[1.0, huge])
    with pytest.raises(ValueError, match=message.replace("damp=", r"damps\[0\]=")):
        spectral.diagonal(damps=[huge])
    assert window.damp == 1.0 and len(window) == 1  # nothing changed
    # F itself has no capacitance matrix: any finite damping works.
    y = G[1] / 100  # F y = 1e308 y + G^T G y / m, within range
    np.testing.assert_allclose(EmpiricalFisher(G, damp=huge) @ y / huge, y, rtol=1e-15)
    # At the largest damping every operator works: F^{-1} x = x / damp (kappa = 1 + 1e-306).
    x = G[1]
    for op in (
        StaticIHVP(G, damp=top),
        SpectralIHVP(G, damp=top),
        spectral.with_damp(top),
        DynamicIHVP.from_window(G, damp=top),
    ):
        np.testing.assert_allclose(op @ x, x / top, rtol=1e-15)


def test_a_capacitance_matrix_that_overflows_is_not_blamed_on_a_small_damping():
    # Regression: at the largest damping, gradients of norm 1.2e154 (squared norms,
    # 1.44e308, beyond the room left beside m damp) failed as "not numerically positive
    # definite ... increase damp": the advice that made it worse.
    m = G.shape[0]
    top = float.fromhex("0x1.fffffffffffffp+1023") / 4 / m
    big = G / np.linalg.norm(G, axis=1, keepdims=True) * 1.2e154
    for build in (StaticIHVP, DynamicIHVP.from_window):
        with pytest.raises(FactorizationError, match=r"overflows float64.*decrease damp"):
            build(big, damp=top)


@pytest.mark.parametrize("damp", ["1e-5", None, True, np.ones(1)])
def test_damp_types(damp):
    with pytest.raises(TypeError, match="damp must be a real number"):
        StaticIHVP(G, damp=damp)


@pytest.mark.parametrize(
    ("damp", "shown"),
    [
        (np.ones(1), "an array of shape (1,) and dtype float64"),
        (np.array(True), "an array of shape () and dtype bool"),
        (np.array(0.5 + 0j), "an array of shape () and dtype complex128"),
        (np.True_, "np.True_"),
    ],
)
def test_a_damping_that_is_no_real_number_is_shown_alike_everywhere(damp, shown):
    # An array is shown by its shape and dtype, as the JAX front-end does (a repr may be
    # long, and a GPU array's reads it back); the core printed its repr, or ``True`` for a
    # 0-d bool array.
    message = f"^damp must be a real number or a 0-d real array, got {re.escape(shown)}$"
    for call in (
        lambda: StaticIHVP(G, damp=damp),
        lambda: EmpiricalFisher(G, damp=damp),
        lambda: SpectralIHVP(G, damp=damp),
        lambda: DynamicIHVP(3, 10, damp=damp, dtype="float64"),
        lambda: prune(np.ones(10), G, sparsity=0.5, damp=damp),
    ):
        with pytest.raises(TypeError, match=message):
            call()


def test_a_zero_dimensional_real_array_is_a_damping():
    """Regression: np.array(1e-3) and torch.tensor(1e-3) were refused (TypeError)."""
    torch = pytest.importorskip("torch")
    from mfac_core import torch as mfac_torch

    for damp in (np.array(0.5), np.array(0.5, dtype=np.float32), torch.tensor(0.5)):
        op = StaticIHVP(G, damp=damp)
        assert type(op.damp) is float and op.damp == 0.5
        assert DynamicIHVP(3, 10, damp=damp, dtype="float64").damp == 0.5
        assert SpectralIHVP(G, damp=damp).damp == 0.5
        opt = mfac_torch.MFAC([torch.nn.Parameter(torch.zeros(3))], damp=damp)
        assert opt.damp == 0.5
    # Still refused: 0-d bool and complex arrays, 1-element 1-d arrays.
    for damp in (np.array(True), np.array(0.5 + 0j), torch.tensor([0.5])):
        with pytest.raises(TypeError, match="damp must be a real number or a 0-d real array"):
            StaticIHVP(G, damp=damp)
    with pytest.raises(ValueError, match="finite and > 0"):
        StaticIHVP(G, damp=np.array(-1.0))


def test_the_standards_zero_dimensional_arrays_are_dampings():
    # array-api-strict's arrays have no item() or tolist(): a 0-d damping was refused as
    # "a real number or a 0-d real array, got an array of shape ()", and a 1-d array of
    # dampings as no 1-d array.
    xp = pytest.importorskip("array_api_strict")
    Gs = xp.asarray(G)
    for damp in (xp.asarray(0.5), xp.asarray(0.5, dtype=xp.float32), xp.asarray(2)):
        value = float(damp)
        op = StaticIHVP(Gs, damp=damp)
        assert type(op.damp) is float and op.damp == value
        window = DynamicIHVP(3, 10, damp=damp, dtype=xp.float64, xp=xp)
        window.set_damp(damp)
        assert window.damp == value
        assert SpectralIHVP(Gs, damp=damp).damp == value
    spectral = SpectralIHVP(Gs, damp=0.5)
    damps = xp.asarray([0.5, 2.0])
    expected = spectral.diagonal(damps=[0.5, 2.0])
    assert bool(xp.all(spectral.diagonal(damps=damps) == expected))
    for damp in (xp.asarray(True), xp.asarray(0.5 + 0j)):
        with pytest.raises(TypeError, match="damp must be a real number or a 0-d real array"):
            StaticIHVP(Gs, damp=damp)
    with pytest.raises(TypeError, match=r"damps\[0\] must be a real number"):
        spectral.diagonal(damps=xp.asarray([True]))
    with pytest.raises(ValueError, match="1-d array of dampings"):
        spectral.diagonal(damps=xp.asarray([[0.5]]))


def test_non_finite_inputs_are_named_where_they_are():
    """Vectors, matrices of vectors and gradients: one wording that names the first bad entry."""
    op = StaticIHVP(G, damp=1.0)
    x = np.ones(10)
    x[7], x[3] = np.nan, -np.inf
    with pytest.raises(ValueError, match=r"^x must not contain NaN or infinity: x\[3\] is -inf$"):
        op.matvec(x)
    X = np.ones((10, 2))
    X[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"^X must not contain NaN or infinity: X\[4, 1\] is nan$"):
        op.matmat(X)
    bad = G.copy()
    bad[3, 9] = np.inf
    with pytest.raises(ValueError, match=r"^G must not contain NaN or infinity: G\[3, 9\] is inf$"):
        DynamicIHVP.from_window(bad, damp=1.0)
    # A rank's shard: the entry of the rank's own argument, and its global coordinate.
    from mfac_core import ShardedDynamicIHVP
    from mfac_core.distributed import SingleProcessComm

    sharded = ShardedDynamicIHVP(3, 10, damp=1.0, dtype="float64", comm=SingleProcessComm())
    said = r"^x must not contain NaN or infinity: x\[3\] \(global coordinate 3\) is -inf$"
    with pytest.raises(ValueError, match=said):
        sharded.matvec(x)


_UNCHECKED = r"^the Gram matrix of these gradients is not finite \(damp=0\.5\): "


@pytest.mark.parametrize(
    ("shape", "block_size"),
    [((4, 10), None), ((4, 10), 3), ((4, 10), 6), ((6, 5), None)],
    ids=["woodbury", "dense-blocks", "woodbury-blocks", "m>=d"],
)
def test_unchecked_non_finite_gradients_are_named_in_the_factorization_error(shape, block_size):
    """check_finite=False lets NaN and infinity into the Gram; its FactorizationError names the
    first one as the refusal of check_finite=True does (row-major in the failing chunk)."""
    bad = np.random.default_rng(1).standard_normal(shape)
    # In the first block whatever the block size; the first in row-major order, not
    # in column-major order (2, 0).
    bad[3, 4], bad[2, 0], bad[1, 1] = np.inf, -np.inf, np.nan
    checked = r"G must not contain NaN or infinity: G\[1, 1\] is nan$"
    named = _UNCHECKED + r"the gradients hold NaN or infinity: G\[1, 1\] is nan$"
    options = {"damp": 0.5, "block_size": block_size}
    for cls in (StaticIHVP, SpectralIHVP):
        with pytest.raises(ValueError, match=checked):
            cls(bad, **options)
        with pytest.raises(FactorizationError, match=named):
            cls(bad, check_finite=False, **options)
    if block_size is None:
        unchecked = WindowOptions(check_finite=False)
        with pytest.raises(FactorizationError, match=named):
            DynamicIHVP.from_window(bad, damp=0.5, options=unchecked)
    # Finite gradients whose squared norms overflow are told apart.
    huge = np.full(shape, 1e200)
    for cls in (StaticIHVP, SpectralIHVP):
        with pytest.raises(FactorizationError, match=_UNCHECKED + "the gradients are finite"):
            cls(huge, check_finite=False, **options)


def test_unchecked_non_finite_gradient_of_a_window_is_named():
    op = DynamicIHVP(3, 10, damp=0.5, dtype="float64", options=WindowOptions(check_finite=False))
    for g in G[:3]:
        op.update(g)
    before = op.state_dict()
    g = G[3].copy()
    g[6], g[8] = -np.inf, np.nan
    with pytest.raises(FactorizationError, match=_UNCHECKED + r".*: g\[6\] is -inf$"):
        op.update(g)
    after = op.state_dict()
    for key, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(value))


def test_non_finite_entries_are_found_in_bounded_pieces(monkeypatch, tmp_path):
    """The scan reads a 2-D array in bands of rows (long rows in pieces): the first NaN or
    infinity in row-major order wherever the pieces cut, nothing the size of G made."""
    import tracemalloc

    from mfac_core import _finite

    rng = np.random.default_rng(2)
    for scan in (1, 5, 7, 64, 10_000):
        monkeypatch.setattr(_finite, "SCAN_ENTRIES", scan)
        for _ in range(20):
            x = rng.standard_normal((int(rng.integers(1, 9)), int(rng.integers(1, 12))))
            for _ in range(int(rng.integers(0, 4))):
                x[rng.integers(x.shape[0]), rng.integers(x.shape[1])] = rng.choice(
                    [np.nan, np.inf, -np.inf]
                )
            rows, cols = np.nonzero(~np.isfinite(x))
            want = f"x[{rows[0]}, {cols[0] + 3}] is {x[rows[0], cols[0]]}" if rows.size else None
            assert _finite.non_finite_entry(np, x, "x", offset=3) == want
    # A memory-mapped G: read in pieces of SCAN_ENTRIES entries, never whole.
    monkeypatch.setattr(_finite, "SCAN_ENTRIES", 4096)
    G_map = np.lib.format.open_memmap(
        tmp_path / "G.npy", mode="w+", dtype=np.float32, shape=(64, 8192)
    )
    G_map[63, 8000] = np.nan
    tracemalloc.start()
    try:
        found = _finite.non_finite_entry(np, G_map[:, 100:], "G", offset=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == "G[63, 8000] is nan"
    assert peak < 8 * 4096 * 4  # the bool mask of G alone would be 64 * 8092 bytes


# -- dtypes outside the documented set ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.longdouble, np.complex128, np.int64, np.bool_])
def test_storage_dtypes_outside_the_documented_set_are_refused(dtype):
    if np.dtype(dtype) == np.dtype(np.float64):
        pytest.skip("longdouble is float64 on this platform")
    Gx = G.astype(dtype)
    for call in (
        lambda: StaticIHVP(Gx, damp=1.0),
        lambda: EmpiricalFisher(Gx, damp=1.0),
        lambda: DynamicIHVP.from_window(Gx, damp=1.0),
    ):
        with pytest.raises(TypeError, match="float32 or float64"):
            call()
    with pytest.raises(TypeError, match="float32 or float64"):
        StaticIHVP(G, damp=1.0).matvec(np.ones(10, dtype=dtype))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_numpy_2byte_storage_is_accepted_where_supported(half):
    # 2-byte gradients: StaticIHVP and the window keep them and compute in float32
    # (docs/mathematics.rst, "2-byte storage"), and so does the forward operator. NumPy's
    # bfloat16 is ml_dtypes' (JAX's bfloat16 in NumPy), recognised by name.
    if half == "bfloat16":
        dt = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    else:
        dt = np.dtype(half)
    G16 = G.astype(dt)
    op = StaticIHVP(G16, damp=1.0)
    assert op.dtype == np.float32 and op.storage_dtype == half
    window = DynamicIHVP.from_window(G16, damp=1.0)
    assert window.dtype == np.float32 and window.storage_dtype == half
    forward = EmpiricalFisher(G16, damp=1.0)
    assert forward.dtype == np.float32 and forward.storage_dtype == half
    # A 2-byte operand is promoted losslessly, to float32 and to float64 operators.
    x16 = np.ones(10, dtype=dt)
    assert op.matvec(x16).dtype == np.float32
    assert StaticIHVP(G, damp=1.0).matvec(x16).dtype == np.float64
    # check_finite finds a non-finite entry of 2-byte G, by name.
    bad = G16.copy()
    bad[1, 7] = np.nan
    with pytest.raises(ValueError, match=r"G\[1, 7\] is nan"):
        StaticIHVP(bad, damp=1.0)
    # The other byte order is refused saying so (the passes read this machine's).
    swapped = G16.astype(dt.newbyteorder("S"))
    with pytest.raises(TypeError, match=f"{half} in big-endian byte order"):
        StaticIHVP(swapped, damp=1.0)


def test_torch_half_dtypes():
    torch = pytest.importorskip("torch")
    for dtype in (torch.float16, torch.bfloat16):
        op = StaticIHVP(torch.tensor(G, dtype=dtype), damp=1.0)
        assert op.dtype == torch.float32
        window = DynamicIHVP(3, 10, damp=1.0, dtype=dtype, xp=torch)
        assert window.dtype == torch.float32 and window.storage_dtype == str(dtype)[6:]
    with pytest.raises(TypeError, match="float32 or float64"):
        DynamicIHVP(3, 10, damp=1.0, dtype=torch.int32, xp=torch)


def test_an_operand_refusal_names_the_2_byte_floats_where_they_are_taken():
    # The operators widen a float16/bfloat16 x exactly; the refusal of an integer x said
    # "float32 or float64" only. array-api-strict has no 2-byte float: not named there.
    op = StaticIHVP(G.astype(np.float32), damp=1.0)
    with pytest.raises(TypeError, match=r"float32 or float64, or the library's float16"):
        op.matvec(np.ones(G.shape[1], dtype=np.int64))
    assert op.matvec(np.ones(G.shape[1], dtype=np.float16)).dtype == np.float32
    xs = pytest.importorskip("array_api_strict")
    ops = StaticIHVP(xs.asarray(G), damp=1.0)
    with pytest.raises(TypeError, match=r"\(float32 or float64\), got"):
        ops.matvec(xs.ones(G.shape[1], dtype=xs.int32))


@pytest.mark.parametrize("value", ["no", "", 0, None])
def test_every_flag_refuses_non_booleans(value):
    # Regression: overwrite_G="no" overwrote the caller's G, and check_finite=0 turned the
    # checks off, because these flags were read with bool().
    from mfac_core import SpectralIHVP

    G2 = G.copy()
    for call, name in (
        (lambda: StaticIHVP(G2, damp=1.0, overwrite_G=value), "overwrite_G"),
        (lambda: StaticIHVP(G2, damp=1.0, check_finite=value), "check_finite"),
        (lambda: EmpiricalFisher(G2, damp=1.0, check_finite=value), "check_finite"),
        (lambda: SpectralIHVP(G2, damp=1.0, check_finite=value), "check_finite"),
    ):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            call()
    np.testing.assert_array_equal(G2, G)  # nothing was overwritten


def test_optimizer_flags_and_callables():
    torch = pytest.importorskip("torch")
    from mfac_core.torch import MFAC

    with pytest.raises(TypeError, match="zero_init must be True or False"):
        MFAC([torch.nn.Parameter(torch.zeros(3))], num_grads=2, zero_init="False")
    with pytest.raises(TypeError, match="progress must be callable"):
        StaticIHVP(G, damp=1.0, progress="x")
    with pytest.raises(TypeError, match="xp must be an array namespace"):
        DynamicIHVP(3, 5, damp=1.0, dtype="float64", xp="numpy")


def test_sparse_and_nested_torch_tensors_are_refused_by_name():
    # Regression: they are tensors to array-api-compat, so they passed the type checks
    # and failed deep inside: "Could not run 'aten::ne.Scalar' with arguments from the
    # 'SparseCPU' backend", "unsupported tensor layout: SparseCsr", "NestedTensorImpl
    # doesn't support sizes"; nothing said which argument or what to pass instead.
    torch = pytest.importorskip("torch")
    Gt = torch.asarray(G)
    x = torch.asarray(np.linspace(-1.0, 1.0, G.shape[1]))
    ops = [
        StaticIHVP(Gt, damp=0.1),
        EmpiricalFisher(Gt, damp=0.1, check_finite=False),
        SpectralIHVP(Gt, damp=0.1),
    ]
    window = DynamicIHVP(3, G.shape[1], damp=0.1, dtype="float64", xp=torch)
    window.update(Gt[0])
    ops.append(window)
    before = [op @ x for op in ops]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CSR and nested tensors are beta
        sparse = [(x.to_sparse(), "sparse_coo"), (x[:, None].to_sparse_csr(), "sparse_csr")]
        nested = torch.nested.nested_tensor([x, x])
    for op in ops:
        for xs, layout in sparse:
            with pytest.raises(
                TypeError, match=rf"^x is a PyTorch tensor of layout torch\.{layout}"
            ):
                op.matvec(xs)
    with pytest.raises(TypeError, match=r"^X is a PyTorch tensor .*pass X\.to_dense\(\)"):
        ops[0].matmat(x[:, None].to_sparse())
    with pytest.raises(TypeError, match=r"^g is a PyTorch tensor of layout torch\.sparse_coo"):
        window.update(x.to_sparse())
    for build in (StaticIHVP, EmpiricalFisher, SpectralIHVP):
        with pytest.raises(TypeError, match=r"^G is a PyTorch tensor of layout torch\.sparse_coo"):
            build(Gt.to_sparse(), damp=0.1)
    with pytest.raises(TypeError, match=r"^x is a nested PyTorch tensor.*torch\.stack"):
        ops[0].matvec(nested)
    for op in ops:
        # Through @ and * too: dot read the nested tensor's shape first, which raised
        # RuntimeError "NestedTensorImpl doesn't support sizes".
        for apply in (operator.matmul, operator.mul):
            with pytest.raises(TypeError, match=r"^x is a nested PyTorch tensor"):
                apply(op, nested)
    assert len(window) == 1
    for op, y in zip(ops, before, strict=True):
        assert torch.equal(op @ x, y)  # the refusals changed nothing


def test_vmapped_torch_tensors_are_refused_by_name_and_other_transforms_still_work():
    # Regression: torch.vmap over a product failed deep inside, at the first read of a
    # value on the host ("Cannot access data pointer of Tensor that doesn't have storage").
    torch = pytest.importorskip("torch")
    Gt = torch.asarray(G)
    X = torch.asarray(np.linspace(-1.0, 1.0, 3 * G.shape[1]).reshape(3, -1))
    op = StaticIHVP(Gt, damp=0.1)
    window = DynamicIHVP(3, G.shape[1], damp=0.1, dtype="float64", xp=torch)
    window.update(Gt[0])
    before = window @ X[0]
    batched = r"^{} is batched by torch\.func\.vmap.*A\.rmatmat\(X\.T\)\.T"
    with pytest.raises(TypeError, match=batched.format("x")):
        torch.vmap(op.matvec)(X)
    with pytest.raises(TypeError, match=batched.format("x")):  # batched under a grad level
        torch.vmap(torch.func.grad(lambda v: (op @ v).sum()))(X)
    with pytest.raises(TypeError, match=batched.format("g")):
        torch.vmap(window.update)(X)
    with pytest.raises(TypeError, match=batched.format("G")):
        torch.vmap(lambda g: SpectralIHVP(g[None], damp=0.1) @ X[0])(X)
    # Dampings too: their item() and tolist() failed inside (PyTorch's vmap error, naming
    # no argument; "Cannot access data pointer").
    spectral = SpectralIHVP(Gt, damp=0.1)
    dampings = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    with pytest.raises(TypeError, match=batched.format("damps")):
        torch.vmap(lambda d: spectral.sweep(X[0], damps=d))(dampings)
    with pytest.raises(TypeError, match=batched.format("damp")):
        torch.vmap(window.set_damp)(dampings[:, 0])
    with pytest.raises(TypeError, match=batched.format("damp")):
        torch.vmap(lambda d: spectral.with_damp(d) @ X[0])(dampings[:, 0])
    assert window.damp == spectral.damp == 0.1
    assert len(window) == 1 and torch.equal(window @ X[0], before)
    # The transforms that hold one tensor per level go through (the library's own path).
    dense = op.todense()
    torch.testing.assert_close(torch.func.jacfwd(op.matvec)(X[0]), dense, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.func.jacrev(op.matvec)(X[0]), dense, rtol=1e-12, atol=0)
    hessian = torch.func.hessian(lambda v: v @ (op @ v))(X[0])
    torch.testing.assert_close(hessian, 2 * dense, rtol=1e-12, atol=1e-12 * dense.abs().max())


def test_masked_arrays_are_refused_by_name():
    # Regression: a numpy.ma.MaskedArray passed the checks as a NumPy array; its mask was
    # then ignored (prune kept and moved a masked weight as its stored value) or broke
    # deep inside (op @ x: "operands could not be broadcast together").
    masked = np.ma.masked_array
    with pytest.raises(TypeError, match=r"G is a numpy\.ma\.MaskedArray"):
        StaticIHVP(masked(G, mask=G > 1), damp=0.1)
    op = StaticIHVP(G, damp=0.1)
    x = masked(np.ones(10), mask=np.arange(10) == 3)
    with pytest.raises(TypeError, match=r"x is a numpy\.ma\.MaskedArray.*np\.ma\.filled"):
        op @ x
    window = DynamicIHVP(2, 10, damp=0.1, dtype="float64")
    with pytest.raises(TypeError, match=r"g is a numpy\.ma\.MaskedArray"):
        window.update(x)
    assert len(window) == 0
    with pytest.raises(TypeError, match=r"theta is a numpy\.ma\.MaskedArray"):
        prune(x, G, sparsity=0.5, damp=0.1)


# -- devices given by name or None mean what the namespace means by them -------------------------


def test_a_device_named_or_none_is_the_namespaces_own():
    import array_api_compat.numpy as cnp
    from array_api_compat import array_namespace

    from mfac_core._validation import check_same_space, resolved_device

    torch = pytest.importorskip("torch")
    tx = array_namespace(torch.empty(0))
    cases = [(cnp, np.ones(3)), (tx, torch.ones(3))]
    for xp, x in cases:
        for dev in (None, "cpu"):
            # Stored as given, None (or NumPy's name) refused every input of its library.
            check_same_space(xp, resolved_device(xp, dev), x, "x", owner="A")
    assert resolved_device(tx, "cpu") == torch.device("cpu")
    same = torch.device("cpu")
    assert resolved_device(tx, same) == same
    with pytest.raises(ValueError, match="device 'cuda' is not a numpy device"):
        resolved_device(cnp, "cuda")
    with pytest.raises(ValueError, match="device 'nowhere' is not a torch device"):
        resolved_device(tx, "nowhere")


def test_a_jax_device_by_name_or_none_even_inside_a_trace():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from mfac_core._compat import device
    from mfac_core._validation import check_same_space, resolved_device

    x = jnp.ones(3)
    for dev in (None, "cpu"):
        check_same_space(jnp, resolved_device(jnp, dev), x, "x", owner="A")
    inside = []

    @jax.jit
    def traced(y):
        inside.append(resolved_device(jnp, None))
        return y

    traced(x)
    assert inside == [device(x)]
    with pytest.raises(ValueError, match="device 'nowhere' is not a JAX device"):
        resolved_device(jnp, "nowhere")
    # Given "cpu", the window's zeros were asked for a device name JAX does not take
    # (an AttributeError deep inside JAX); JAX's arrays are then refused as immutable.
    with pytest.raises(ValueError, match="needs a writeable array"):
        DynamicIHVP(3, 4, damp=1.0, dtype=jnp.float32, xp=jnp, device="cpu")
    with pytest.raises(ValueError, match="device 'cuda' is not a numpy device"):
        DynamicIHVP(3, 4, damp=1.0, dtype="float64", xp=np, device="cuda")


# -- scale factors: a huge int by its size; A / 10**400 underflows, it is not infinite ------------


def test_scale_factors_show_huge_ints_by_size_and_refuse_an_underflowing_reciprocal():
    from mfac_core._validation import reciprocal_factor, scale_factor

    # Every digit of the int was in the message; beyond 4300 digits building the
    # message itself failed (Python's limit on int-to-string conversion).
    for power in (400, 5000):
        with pytest.raises(ValueError, match="must be finite") as info:
            scale_factor(-(10**power))
        assert f"an int of {power + 1} digits (-1.000e+{power})" in str(info.value)
        assert len(str(info.value)) < 200
    # A / 10**400 is a scale by 1e-400, not by an infinite divisor's reciprocal.
    for divisor in (10**400, -(2**1100)):
        with pytest.raises(ValueError, match=r"^1 / an int of \d+ digits .* underflows float64"):
            reciprocal_factor(divisor)
    big = 10**309  # beyond float64, its reciprocal subnormal but not 0
    assert reciprocal_factor(big) == 1 / big != 0.0
    assert reciprocal_factor(np.int64(4)) == 0.25 == reciprocal_factor(4.0)
    with pytest.raises(ValueError, match=r"^1 / 1e-310 must be finite"):
        reciprocal_factor(1e-310)
    with pytest.raises(ValueError, match="divisor of an operator must be finite"):
        reciprocal_factor(float("inf"))
    for zero in (0, 0.0, np.int8(0)):
        with pytest.raises(ZeroDivisionError, match="cannot divide an operator by zero"):
            reciprocal_factor(zero)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_torch_inputs_with_nan_or_infinity_are_refused_by_name(dtype):
    # The finiteness check of a tensor reads its least and largest entries (NaN
    # propagating through both): every bad value, anywhere, in any layout, is found.
    torch = pytest.importorskip("torch")
    from mfac_core import _compat

    dt = getattr(torch, dtype)
    base = torch.randn(7, 300, generator=torch.Generator().manual_seed(1)).to(dt)
    assert _compat.is_finite_array(torch, base) and _compat.is_finite_array(torch, base[:, ::3].T)
    assert _compat.is_finite_array(torch, base[:0]) and _compat.is_finite_array(torch, base[0, 0])
    op = StaticIHVP(torch.randn(3, 300, generator=torch.Generator().manual_seed(2)), damp=1.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i, j in ((0, 0), (3, 151), (6, 299)):
            x = base.clone()
            x[i, j] = bad
            assert not _compat.is_finite_array(torch, x)
            assert not _compat.is_finite_array(torch, x.T.flip(0))
            assert not _compat.is_finite_array(torch, x[i, j])
            assert _compat.is_finite_array(torch, x[(i + 1) % 7])
            with pytest.raises(ValueError, match=re.escape(f"x[{j}] is {bad}")):
                op.matvec(x[i].float())


def test_huge_fractions_are_shown_by_size_and_inverted_exactly():
    from mfac_core._validation import check_count, check_damp, reciprocal_factor, scale_factor

    # Every digit of the Fraction was in the message, and beyond 4300 digits building
    # it failed; the int case was already short.
    for power in (400, 5000):
        with pytest.raises(ValueError, match="must be finite") as info:
            scale_factor(Fraction(10**power, 3))
        assert f"a Fraction of {power + 1} / 1 digits (3.333e+{power - 1})" in str(info.value)
        assert len(str(info.value)) < 200
        with pytest.raises(ValueError, match=r"^1 / a Fraction of .* underflows float64 to 0"):
            reciprocal_factor(Fraction(-(10**power), 7))
    # Fraction(1, 10**400) is no zero divisor (its float is 0.0): 1 / it overflows.
    with pytest.raises(ValueError, match=r"^1 / a Fraction of 1 / 401 digits \(1\.000e-400\)"):
        reciprocal_factor(Fraction(1, 10**400))
    with pytest.raises(ZeroDivisionError, match="cannot divide an operator by zero"):
        reciprocal_factor(Fraction(0))
    third = Fraction(1, 3)
    assert reciprocal_factor(third) == 3.0 and scale_factor(third) == 1 / 3
    # Subnormal as a float (bits lost): 1 / float(tiny) was 2.0000000000000002e+307.
    tiny = Fraction(5, 10**308)
    assert reciprocal_factor(tiny) == 2e307
    # The other checks of numbers show them the same way (the ints' failed to build too).
    for value in (10**5000, Fraction(10**5000, 3), -(10**5000)):
        with pytest.raises(ValueError, match="damp must be finite and > 0") as info:
            check_damp(value)
        assert len(str(info.value)) < 100
    with pytest.raises(ValueError, match=r"got an int of 5001 digits \(-1\.000e\+5000\)"):
        check_count(-(10**5000), "block_size")


def test_meta_tensors_and_the_meta_device_are_refused_at_the_door():
    # A meta tensor has a shape but no values: the operators failed deep inside
    # (".item() cannot be called on meta tensors") or built a window that no update could
    # fill ("Cannot copy out of meta tensor").
    torch = pytest.importorskip("torch")
    xp = mfac_core._compat.array_namespace(torch.ones(1))
    meta = torch.empty((4, 10), device="meta")
    for make in (StaticIHVP, SpectralIHVP, EmpiricalFisher):
        with pytest.raises(ValueError, match="G is a PyTorch tensor on the meta device"):
            make(meta, damp=1e-3)
    for dev in ("meta", torch.device("meta")):
        with pytest.raises(ValueError, match="PyTorch's meta device"):
            DynamicIHVP(4, 10, damp=1e-3, xp=xp, dtype="float32", device=dev)
    A = StaticIHVP(torch.ones((4, 10)), damp=1e-3)
    with pytest.raises(ValueError, match="x is a PyTorch tensor on the meta device"):
        A.matvec(torch.ones(10, device="meta"))
    W = DynamicIHVP(4, 10, damp=1e-3, xp=xp, dtype="float32")
    with pytest.raises(ValueError, match="g is a PyTorch tensor on the meta device"):
        W.update(torch.ones(10, device="meta"))
    assert len(W) == 0
