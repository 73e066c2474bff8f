"""GPU cost budgets, proven on the CPU: launches, host syncs and host-made tensors.

``tests/_counting.py`` counts, on CPU PyTorch tensors that take the engine's device
route (``_pieces.simulate_device``), what a CUDA run would launch (ATen operations),
synchronise (values read on the host) and copy from the host (tensors made from host
data). The budgets (docs/gpu.rst, "What the CPU tests prove about GPU cost"):

* a product of StaticIHVP or DynamicIHVP: one sync with ``check_finite`` (the NaN
  check), none without; no host-made tensor; an operation count independent of d;
* a ``DynamicIHVP.update_and_matvec`` step (the sliding window's row edit): at most
  one sync, no host-made tensor, operations independent of d;
* ``SpectralIHVP.diagonal``: operations independent of d.

The two d values are chosen so that the host's cache-sized pieces would split the
larger one (m d above ``_pieces.PIECE_ENTRIES``) while a device piece holds both.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _counting import counting, device_path  # noqa: E402

from mfac_core import DynamicIHVP, SpectralIHVP, StaticIHVP, WindowOptions, _pieces  # noqa: E402

M = 32
SMALL, LARGE = 2**11, 2**16  # M * LARGE = 2 host pieces, one device piece
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gradients(m: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=gen) / d**0.5).to(dtype)


def _vector(d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def test_piece_policy_follows_the_device() -> None:
    """Cache-sized pieces for host arrays, device-sized ones for any other device."""
    host = torch.empty((M, 8))
    meta = torch.empty((M, 8), device="meta")  # a non-CPU device without a GPU
    assert not _pieces.is_accelerator(torch, host)
    assert not _pieces.is_accelerator(np, np.empty((M, 8)))
    assert _pieces.is_accelerator(torch, meta)
    assert _pieces.piece_entries(torch, host) == _pieces.PIECE_ENTRIES
    assert _pieces.piece_entries(torch, meta) == _pieces.DEVICE_PIECE_ENTRIES
    # The example: m = 256, d = 1e6 took 245 host pieces per pass; on a device 8.
    width = _pieces.piece_width(torch, meta, 256)
    assert -(-(10**6) // width) <= 8
    assert -(-(10**6) // _pieces.piece_width(torch, host, 256)) > 200
    with _pieces.simulate_device():
        assert _pieces.is_accelerator(torch, host)
        assert _pieces.piece_entries(torch, host) == _pieces.DEVICE_PIECE_ENTRIES
    assert not _pieces.is_accelerator(torch, host)
    # The test sizes: the host splits the larger d, a device piece holds it.
    assert M * LARGE > _pieces.PIECE_ENTRIES and M * LARGE <= _pieces.DEVICE_PIECE_ENTRIES


def _static_counts(dtype: torch.dtype, d: int, check: bool) -> dict[str, int]:
    op = StaticIHVP(_gradients(M, d, dtype), damp=1e-2, check_finite=check)
    x = _vector(d)
    with device_path():
        op @ x  # warm-up: lazily made state is set-up, not the product
        with counting() as c:
            y = op @ x
    assert y.shape == (d,) and bool(torch.isfinite(y).all())
    return c.summary()


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)  # float16 takes bfloat16's route
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_static_product_budget(dtype: torch.dtype, check: bool) -> None:
    small, large = _static_counts(dtype, SMALL, check), _static_counts(dtype, LARGE, check)
    assert small["syncs"] == large["syncs"] == (1 if check else 0), (small, large)
    assert small["host_tensors"] == large["host_tensors"] == 0, (small, large)
    assert small["ops"] == large["ops"] <= 40, (small, large)


def _refined_counts(kind: str, d: int) -> dict[str, int]:
    G = _gradients(M, d, torch.float32)
    if kind == "static":
        op = StaticIHVP(G, damp=1e-2, refine=1, check_finite=False)
    else:
        op = DynamicIHVP.from_window(
            G, damp=1e-2, options=WindowOptions(refine=1, check_finite=False)
        )
    x = _vector(d)
    with device_path():
        op @ x
        with counting() as c:
            op @ x
    return c.summary()


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_refinement_residual_takes_device_pieces(kind: str, monkeypatch: pytest.MonkeyPatch):
    """The float64 residual of ``refine`` reads G in the engine's device pieces on a GPU.

    Regression: it used its host piece (32 MiB) on every device, so its launches grew
    with d. The host piece is made small here (M * 128 entries), so that the larger d
    takes four host pieces, as at m d = 2**24 with the real size; a device piece holds it.
    """
    monkeypatch.setattr(_pieces, "LARGE_PIECE_ENTRIES", M * 128)
    # The premise: the residual's host pieces (as refinement sizes them) split the larger d.
    G = _gradients(M, 512, torch.float32)
    assert 512 // _pieces.piece_width(torch, G, M, host=_pieces.LARGE_PIECE_ENTRIES) == 4
    small, large = _refined_counts(kind, 128), _refined_counts(kind, 512)
    assert small["ops"] == large["ops"], (small, large)


def _window(dtype: torch.dtype, d: int, check: bool) -> DynamicIHVP:
    return DynamicIHVP.from_window(
        _gradients(M, d, dtype), damp=1e-2, options=WindowOptions(check_finite=check)
    )


def _dynamic_counts(dtype: torch.dtype, d: int, check: bool) -> tuple[dict, dict]:
    op = _window(dtype, d, check)
    x, g = _vector(d), _vector(d, seed=2) / d**0.5
    with device_path():
        op.update_and_matvec(_vector(d, seed=3) / d**0.5)  # warm-up (lazy buffers)
        refactors = op.refactor_count
        with counting() as step:
            y = op.update_and_matvec(g)
        assert op.refactor_count == refactors, "the counted step must be a row edit"
        with counting() as product:
            z = op @ x
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(z).all())
    return step.summary(), product.summary()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_dynamic_step_and_product_budget(dtype: torch.dtype, check: bool) -> None:
    (s_small, p_small), (s_large, p_large) = (
        _dynamic_counts(dtype, SMALL, check),
        _dynamic_counts(dtype, LARGE, check),
    )
    # The step: the gradient's check, the pivot and the drift of the row edit are
    # read together, once.
    assert s_small["syncs"] == s_large["syncs"] == 1, (s_small, s_large)
    assert s_small["host_tensors"] == s_large["host_tensors"] == 0, (s_small, s_large)
    assert s_small["ops"] == s_large["ops"], (s_small, s_large)
    assert p_small["syncs"] == p_large["syncs"] == (1 if check else 0), (p_small, p_large)
    assert p_small["host_tensors"] == p_large["host_tensors"] == 0, (p_small, p_large)
    assert p_small["ops"] == p_large["ops"] <= 40, (p_small, p_large)


def test_step_refuses_a_bad_gradient_with_one_read() -> None:
    """The deferred check still refuses NaN and leaves the window as it was."""
    op = _window(torch.float16, SMALL, True)
    before = op.state_dict()
    bad = _vector(SMALL)
    bad[7] = float("nan")
    with device_path():
        with counting() as c, pytest.raises(ValueError, match="NaN or infinity"):
            op.update_and_matvec(bad)
        big = _vector(SMALL)
        big[3] = 7e4  # beyond float16's range (65504)
        with pytest.raises(ValueError, match="overflows"):
            op.update_and_matvec(big)
    assert c.syncs == 1, c.names
    after = op.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def _diagonal_ops(d: int) -> dict[str, int]:
    op = SpectralIHVP(_gradients(2 * M, d, torch.float32), damp=1e-2)
    with device_path():
        op.diagonal()
        with counting() as c:
            D = op.diagonal()
    assert D.shape == (d,)
    return c.summary()


def test_spectral_diagonal_ops_independent_of_d() -> None:
    small, large = _diagonal_ops(SMALL), _diagonal_ops(LARGE)
    assert small["ops"] == large["ops"], (small, large)
    assert small["syncs"] == large["syncs"] == 0, (small, large)


def _same_state(sa: dict, sb: dict) -> None:
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), key
        else:
            assert value == sb[key], key


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("device", [True, False], ids=["device", "host"])
def test_the_checked_step_is_the_step_and_reads_once(dtype: torch.dtype, device: bool) -> None:
    """The optimiser's step: the product and its finiteness come with the step's one read.

    The product, computed with the new factor before the window commits to it, is the
    one ``update_and_matvec`` returns, in the steady state (row edits), at a
    refactorisation (``refactor_every``), while the window fills up (whose refinement
    counts the gradient being inserted) and with refinement.
    """
    import contextlib

    for capacity, extra in ((8, {}), (8, {"refine": 1, "refactor_every": 2}), (12, {"refine": 1})):
        op, twin = (
            DynamicIHVP.from_window(
                _gradients(8, 256, dtype),
                damp=1e-2,
                num_grads=capacity,
                options=WindowOptions(check_finite=False, **extra),
            )
            for _ in range(2)
        )
        with device_path() if device else contextlib.nullcontext():
            for seed in range(3):
                g = _vector(256, seed=10 + seed) / 16
                edits = op.refactor_count
                with counting() as c:
                    out = op._update_and_matvec_checked(g)
                s = twin.update_and_matvec(g)
                assert out.status == "ok" and out.error is None and out.s_finite
                assert torch.equal(out.s, s)
                _same_state(op.state_dict(), twin.state_dict())
                if device and op.refactor_count == edits:  # a row edit
                    assert c.syncs == 1, c.names


@pytest.mark.parametrize(
    ("dtype", "value", "status"),
    [
        (torch.float32, float("nan"), "not finite"),
        (torch.bfloat16, float("inf"), "not finite"),
        (torch.bfloat16, 3.4e38, "not representable"),  # finite in float32 only
        (torch.float32, 1e9, "too large"),  # eps(float64) kappa >= 1 with it
    ],
    ids=["nan", "inf", "range", "hopeless"],
)
def test_the_checked_step_reports_bad_gradients(dtype: torch.dtype, value: float, status: str):
    """NaN (whatever check_finite), a 2-byte window's range and a gradient that makes the
    window hopeless: a status, the window kept, one read."""
    op = _window(dtype, SMALL, False)
    strict = _window(dtype, SMALL, True)
    before = op.state_dict()
    g = _vector(SMALL)
    g[9] = value
    with device_path():
        with counting() as c:
            out = op._update_and_matvec_checked(g)
        with pytest.raises(ValueError) as raised:
            strict.update_and_matvec(g)
    assert c.syncs == 1, c.names
    assert (out.status, out.s, out.s_finite) == (status, None, False)
    # The error update_and_matvec raises (with check_finite) for this gradient.
    assert isinstance(out.error, ValueError) and str(out.error) == str(raised.value)
    _same_state(before, op.state_dict())


def test_reprs_launch_nothing_and_read_nothing_back() -> None:
    """A repr (built into every operand check's message) reads Python values only."""
    G = torch.randn(3, 8, dtype=torch.float64)
    window = DynamicIHVP(3, 8, damp=0.5, dtype=torch.bfloat16, xp=torch)
    window.update(G[0].float())
    ops = [StaticIHVP(G, damp=0.5, block_size=4), SpectralIHVP(G, damp=0.5).sqrt(), window]
    with counting() as counts:
        texts = [repr(op) for op in ops]
    assert counts.summary() == {"ops": 0, "syncs": 0, "host_tensors": 0, "scalar_args": 0}
    assert all("damp=0.5" in text for text in texts), texts
