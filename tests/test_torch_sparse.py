"""MFAC's sparse mode (``masks=``): the window holds the kept coordinates only.

The reference is a dense MFAC over a model made of just the kept coordinates, fed the
same gradients restricted to them.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import warnings

import pytest

torch = pytest.importorskip("torch")

from mfac_core.testing import run_spmd_threads  # noqa: E402
from mfac_core.torch import MFAC, MFACPruner, MFACStepWarning  # noqa: E402

nn = torch.nn
F = torch.nn.functional
M = 3  # window size: 7 steps wrap it twice


def _params(dtype: torch.dtype = torch.float64, seed: int = 0):
    """A 2-D weight, a bias (unmasked), a channels-last 4-D weight; masks of the two weights.

    The pruned entries are non-zero on purpose: the optimizer must leave them exactly as
    they are, whatever they hold.
    """
    gen = torch.Generator().manual_seed(seed)
    A = nn.Parameter(torch.randn(6, 5, generator=gen, dtype=torch.float64).to(dtype))
    b = nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64).to(dtype))
    C4 = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64).to(dtype)
    C = nn.Parameter(C4.to(memory_format=torch.channels_last))
    mask_a = torch.rand(6, 5, generator=gen) < 0.3
    mask_c = torch.rand(2, 3, 2, 2, generator=gen) < 0.5
    return A, b, C, {A: mask_a, C: mask_c}


def _kept(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Row-major (logical) order, whatever the memory layout (C is channels-last).
    return t[mask]


def _grads(steps: int, shapes, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)
    ]


def _pair(dtype: torch.dtype, **options):
    """The sparse optimizer and the dense one over just the kept coordinates, alike."""
    A, b, C, masks = _params(dtype)
    Ak = nn.Parameter(_kept(A.detach(), masks[A]).clone())
    Ck = nn.Parameter(_kept(C.detach(), masks[C]).clone())
    bk = nn.Parameter(b.detach().clone())

    def groups(a, bias, c):
        # Two groups, one with a tensor learning rate and a momentum of its own.
        lr = torch.tensor(0.03, dtype=torch.float64)
        return [{"params": [a, bias]}, {"params": [c], "lr": lr, "momentum": 0.2}]

    sparse = MFAC(groups(A, b, C), lr=0.05, num_grads=M, damp=1e-2, masks=masks, **options)
    dense = MFAC(groups(Ak, bk, Ck), lr=0.05, num_grads=M, damp=1e-2, **options)
    return (A, b, C, masks), (Ak, bk, Ck), sparse, dense


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    got, want = got.double(), want.double()
    assert float(torch.linalg.norm(got - want)) <= rtol * float(torch.linalg.norm(want))


@pytest.mark.parametrize(
    ("dtype", "options", "rtol"),
    [
        (torch.float64, {"momentum": 0.5, "weight_decay": 0.01}, 1e-12),
        (torch.float64, {"zero_init": False}, 1e-12),
        (torch.float32, {"momentum": 0.5, "weight_decay": 0.01}, 1e-6),
        (torch.bfloat16, {"momentum": 0.5}, 1e-2),
    ],
)
def test_sparse_equals_dense_on_the_kept_coordinates(dtype, options, rtol):
    (A, b, C, masks), (Ak, bk, Ck), sparse, dense = _pair(dtype, **options)
    before = [A.detach().clone(), C.detach().clone()]
    kept = int(masks[A].sum()) + b.numel() + int(masks[C].sum())
    assert sparse.dim == dense.dim == kept
    # The memory: the window's gradient array has one column per kept coordinate.
    assert tuple(sparse.ihvp._G.shape) == (M, kept)
    assert sparse._entry["momentum_buffer"].shape == (kept,)
    for i, (ga, gb, gc) in enumerate(_grads(7, [A.shape, b.shape, C.shape])):
        ga[~masks[A]] = float("nan")  # never enters the window
        A.grad, b.grad, C.grad = ga.to(dtype), gb.to(dtype), gc.to(dtype)
        Ak.grad, bk.grad = _kept(ga, masks[A]).to(dtype), gb.to(dtype)
        Ck.grad = _kept(gc, masks[C]).to(dtype)
        if i == 4:  # a parameter without a gradient: not moved, its momentum decays
            C.grad = Ck.grad = None
        sparse.step()
        dense.step()
        _close(_kept(A.detach(), masks[A]), Ak.detach(), rtol)
        _close(b.detach(), bk.detach(), rtol)
        _close(_kept(C.detach(), masks[C]), Ck.detach(), rtol)
        _close(sparse.ihvp._G, dense.ihvp._G, rtol)
        _close(sparse._entry["momentum_buffer"], dense._entry["momentum_buffer"], rtol)
    assert sparse.steps == dense.steps == 7 and sparse.skipped_steps == 0
    # The pruned entries: exactly as they were, bit for bit (not zeroed, not moved).
    assert torch.equal(A.detach()[~masks[A]], before[0][~masks[A]])
    assert torch.equal(C.detach()[~masks[C]], before[1][~masks[C]])
    assert C.is_contiguous(memory_format=torch.channels_last)


def test_the_window_log_names_the_kept_dimension(caplog):
    A, b, C, masks = _params()
    with caplog.at_level(logging.INFO, logger="mfac_core.torch"):
        opt = MFAC([A, b, C], num_grads=M, masks=masks)
    assert f"num_grads={M} x dim={opt.dim} " in caplog.text
    assert f"masks keep {opt.dim} of {A.numel() + b.numel() + C.numel()}" in caplog.text


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()


def test_state_dict_round_trip_continues_bit_for_bit():
    A, b, C, masks = _params()
    opt = MFAC([A, b, C], lr=0.05, num_grads=M, damp=1e-2, momentum=0.5, masks=masks)
    grads = _grads(8, [A.shape, b.shape, C.shape])
    _run(opt, [A, b, C], grads[:4])
    buf = io.BytesIO()
    torch.save({"params": [A, b, C], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert torch.equal(saved["opt"]["state"][0]["mask"][: A.numel()], masks[A].reshape(-1))
    A2, b2, C2, _ = _params(seed=3)  # other values: everything comes from the checkpoint
    with torch.no_grad():
        for p, q in zip((A2, b2, C2), saved["params"], strict=True):
            p.copy_(q)
    same = {A2: masks[A], C2: masks[C]}
    resumed = MFAC([A2, b2, C2], lr=0.05, num_grads=M, damp=1e-2, momentum=0.5, masks=same)
    resumed.load_state_dict(saved["opt"])
    (A3, b3, C3), copied = copy.deepcopy(([A, b, C], opt))
    (A4, b4, C4), pickled = pickle.loads(pickle.dumps(([A, b, C], opt)))
    # Through torch.distributed.checkpoint's helpers, keyed by the parameters' names.
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    holder = nn.ParameterList([A, b, C])
    A5, b5, C5, _ = _params(seed=4)
    holder5 = nn.ParameterList([A5, b5, C5])
    holder5.load_state_dict(holder.state_dict())
    same5 = {A5: masks[A], C5: masks[C]}
    dcp = MFAC([A5, b5, C5], lr=0.05, num_grads=M, damp=1e-2, momentum=0.5, masks=same5)
    set_optimizer_state_dict(holder5, dcp, get_optimizer_state_dict(holder, opt))
    for run in (
        (opt, [A, b, C]),
        (resumed, [A2, b2, C2]),
        (copied, [A3, b3, C3]),
        (pickled, [A4, b4, C4]),
        (dcp, [A5, b5, C5]),
    ):
        _run(*run, grads[4:])
    for other in ([A2, b2, C2], [A3, b3, C3], [A4, b4, C4], [A5, b5, C5]):
        for p, q in zip((A, b, C), other, strict=True):
            assert torch.equal(p, q)
    assert copied.dim == pickled.dim == opt.dim and copied.steps == 8


def test_a_flattened_dcp_state_round_trips():
    # DCP rebuilds a flattened state from the live entry's keys: "mask" must be there.
    # Regression: it was only in state_dict(), so the load lacked it and was refused.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    A, b, C, masks = _params()
    opt = MFAC([A, b, C], lr=0.05, num_grads=M, damp=1e-2, momentum=0.5, masks=masks)
    grads = _grads(4, [A.shape, b.shape, C.shape])
    _run(opt, [A, b, C], grads[:2])
    assert torch.equal(opt.state[A]["mask"], opt.state_dict()["state"][0]["mask"])
    A2, b2, C2, _ = _params(seed=4)
    holder, holder2 = nn.ParameterList([A, b, C]), nn.ParameterList([A2, b2, C2])
    holder2.load_state_dict(holder.state_dict())
    same = {A2: masks[A], C2: masks[C]}
    fresh = MFAC([A2, b2, C2], lr=0.05, num_grads=M, damp=1e-2, momentum=0.5, masks=same)
    saved = get_optimizer_state_dict(holder, opt, options=options)
    set_optimizer_state_dict(holder2, fresh, saved, options=options)
    _run(opt, [A, b, C], grads[2:])
    _run(fresh, [A2, b2, C2], grads[2:])
    for p, q in zip((A, b, C), (A2, b2, C2), strict=True):
        assert torch.equal(p, q)


def _other_mask(mask: torch.Tensor) -> torch.Tensor:
    """The same number of kept coordinates, one of them moved."""
    flat = mask.reshape(-1).clone()
    i, j = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
    flat[i], flat[j] = False, True
    return flat.reshape(mask.shape)


def test_a_state_with_other_masks_is_refused_and_nothing_changes():
    A, b, C, masks = _params()
    opt = MFAC([A, b, C], num_grads=M, damp=1e-2, momentum=0.5, masks=masks)
    _run(opt, [A, b, C], _grads(2, [A.shape, b.shape, C.shape]))
    other = MFAC(
        [A, b, C],
        num_grads=M,
        damp=1e-2,
        momentum=0.5,
        masks={A: _other_mask(masks[A]), C: masks[C]},
    )
    _run(other, [A, b, C], _grads(1, [A.shape, b.shape, C.shape], seed=7))
    before = other.state_dict()
    # Same sizes throughout (window, momentum): only the masks tell the states apart.
    with pytest.raises(ValueError, match="differ at 2 coordinates"):
        other.load_state_dict(opt.state_dict())
    after = other.state_dict()
    assert torch.equal(after["state"][0]["window"]["grads"], before["state"][0]["window"]["grads"])
    assert torch.equal(after["state"][0]["momentum_buffer"], before["state"][0]["momentum_buffer"])
    assert after["state"][0]["steps"] == 1
    # A dense state into a sparse optimizer and the other way round.
    dense = MFAC([A, b, C], num_grads=M, damp=1e-2)
    with pytest.raises(ValueError, match=r"saved with no masks .* this optimizer has masks"):
        opt.load_state_dict(dense.state_dict())
    with pytest.raises(ValueError, match=r"saved with masks keeping .* has no masks"):
        dense.load_state_dict(opt.state_dict())
    state = opt.state_dict()
    state["state"][0]["mask"] = state["state"][0]["mask"][:-1]
    with pytest.raises(ValueError, match="'mask' must be a bool tensor of shape"):
        opt.load_state_dict(state)
    # Masks that keep everything are no masks: the states load both ways.
    full = MFAC([A, b, C], num_grads=M, damp=1e-2, masks={A: torch.ones(6, 5, dtype=torch.bool)})
    full.load_state_dict(dense.state_dict())
    dense.load_state_dict(full.state_dict())


def test_a_state_saved_before_the_row_major_order_loads_only_where_it_reads_alike():
    # States saved before "mask_order" hold a masked parameter's kept entries in its
    # memory order then: the same coordinates for a row-major parameter, unknown for a
    # channels-last one (C), which is refused, the optimizer unchanged.
    A, b, C, masks = _params()
    opt = MFAC([A, b, C], num_grads=M, damp=1e-2, momentum=0.5, masks=masks)
    _run(opt, [A, b, C], _grads(2, [A.shape, b.shape, C.shape]))
    old = opt.state_dict()
    assert old["state"][0].pop("mask_order") == 1  # row-major
    other = MFAC([A, b, C], num_grads=M, damp=1e-2, momentum=0.5, masks=masks)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"no 'mask_order'.*masked parameter 2 of group 0"):
        other.load_state_dict(old)
    assert torch.equal(
        other.state_dict()["state"][0]["window"]["grads"], before["state"][0]["window"]["grads"]
    )
    bad = opt.state_dict()
    bad["state"][0]["mask_order"] = 2
    with pytest.raises(ValueError, match=r"'mask_order' must be 1 \(row-major\), got 2"):
        other.load_state_dict(bad)
    # A state saved without masks holds row-major order: it loads into masks that keep
    # every coordinate, channels-last C too (it was refused as "no 'mask_order'").
    dense = MFAC([A, b, C], num_grads=M, damp=1e-2, momentum=0.5)
    _run(dense, [A, b, C], _grads(2, [A.shape, b.shape, C.shape]))
    full = {A: torch.ones_like(masks[A]), C: torch.ones_like(masks[C])}
    MFAC([A, b, C], num_grads=M, damp=1e-2, momentum=0.5, masks=full).load_state_dict(
        dense.state_dict()
    )
    # Row-major parameters only: the old state's order is this one's, and it loads.
    row_major = {A: masks[A]}
    opt = MFAC([A, b], num_grads=M, damp=1e-2, masks=row_major)
    _run(opt, [A, b], _grads(2, [A.shape, b.shape]))
    old = opt.state_dict()
    del old["state"][0]["mask_order"]
    other = MFAC([A, b], num_grads=M, damp=1e-2, masks=row_major)
    other.load_state_dict(old)
    assert torch.equal(
        other.state_dict()["state"][0]["window"]["grads"],
        opt.state_dict()["state"][0]["window"]["grads"],
    )


def test_a_masked_state_of_parameters_in_another_order_is_refused():
    # Regression: a(4) masked TFTF and b(2) masked TF flatten to the masks TFTFTF in
    # either order (both keep 3 coordinates), so neither the masks nor the sizes told
    # MFAC([a, b])'s state from MFAC([b, a])'s: it loaded in permuted coordinates.
    gen = torch.Generator().manual_seed(0)
    a = nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    b = nn.Parameter(torch.randn(2, generator=gen, dtype=torch.float64))
    masks = {a: torch.tensor([True, False, True, False]), b: torch.tensor([True, False])}
    opt = MFAC([a, b], num_grads=M, damp=1e-2, momentum=0.5, masks=masks)
    _run(opt, [a, b], _grads(2, [a.shape, b.shape]))
    other = MFAC([b, a], num_grads=M, damp=1e-2, momentum=0.5, masks=masks)
    assert torch.equal(other.state_dict()["state"][0]["mask"], opt.state_dict()["state"][0]["mask"])
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"parameter 0 of group 0 has shape \(4,\) in the state"):
        other.load_state_dict(opt.state_dict())
    after = other.state_dict()
    assert torch.equal(after["state"][0]["momentum_buffer"], before["state"][0]["momentum_buffer"])
    assert after["state"][0]["steps"] == 0


def _conv_run(resume, channels_last, *, steps=4):
    """A masked conv's MFAC over ``steps`` steps; the weight at the end.

    Before the third step the optimizer is resumed (``resume``: "load" into a new one,
    "copy", "pickle", "group" (``add_param_group``) or None), after the weight was made
    channels-last or not.
    """
    conv = nn.Conv2d(2, 3, 2).double()
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(conv.weight.shape, generator=gen) < 0.5
    with torch.no_grad():
        for p in (conv.bias, conv.weight):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    options = {"num_grads": M, "momentum": 0.9, "weight_decay": 0.01}
    opt = MFAC([conv.bias, conv.weight], masks={conv.weight: mask}, **options)
    grads = [
        [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in (conv.bias, conv.weight)]
        for _ in range(steps)
    ]
    for k in range(steps):
        if k == 2:
            if channels_last:
                conv.to(memory_format=torch.channels_last)
            if resume == "load":
                twin = copy.deepcopy(conv)
                resumed = MFAC([twin.bias, twin.weight], masks={twin.weight: mask}, **options)
                resumed.load_state_dict(opt.state_dict())
                conv, opt = twin, resumed
            elif resume == "copy":
                conv, opt = copy.deepcopy((conv, opt))
            elif resume == "pickle":
                conv, opt = pickle.loads(pickle.dumps((conv, opt)))
            elif resume == "group":
                extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
                opt.add_param_group({"params": [extra]})
                extra.grad = torch.ones(2, dtype=torch.float64)
        # Gradients in the weight's layout, as autograd gives them.
        fmt = torch.channels_last if conv.weight.stride()[1] == 1 else torch.contiguous_format
        conv.bias.grad = grads[k][0].clone()
        conv.weight.grad = grads[k][1].clone(memory_format=fmt)
        opt.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    return conv.weight.detach()


@pytest.mark.parametrize("resume", [None, "load", "copy", "pickle", "group"])
def test_a_masked_parameter_steps_alike_in_any_memory_layout(resume):
    # Regression: the window held a masked parameter's kept entries in the memory order
    # it had when the optimizer was built; a step after a layout change raised, and a
    # load into an optimizer built under another layout, a copy or an add_param_group
    # after the change read the window's columns in the new order: steps 27 % off,
    # without a word. The columns are now in row-major order, whatever the layout.
    want = _conv_run(resume, channels_last=False)
    got = _conv_run(resume, channels_last=True)
    assert torch.equal(got, want)  # the same values in the same order: the same bits


def test_a_masked_parameter_that_is_not_dense_is_refused_before_anything_changes():
    # Its kept entries are written through a flat view of its memory.
    conv = nn.Conv2d(2, 3, 2).double()
    mask = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    opt = MFAC([conv.bias, conv.weight], num_grads=M, momentum=0.9, masks={conv.weight: mask})
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    conv(x).square().sum().backward()
    opt.step()
    wide = torch.zeros(3, 2, 2, 4, dtype=torch.float64)
    wide[..., ::2] = conv.weight.detach()
    conv.weight.data = wide[..., ::2]  # the same values, every other item of its memory
    conv(x).square().sum().backward()
    before = copy.deepcopy((opt.state_dict(), conv.state_dict()))
    with pytest.raises(RuntimeError, match=r"masked parameter 1 of group 0 .* not dense"):
        opt.step()
    after = (opt.state_dict(), conv.state_dict())
    for a, b in zip(_tensors(before), _tensors(after), strict=True):
        assert torch.equal(a, b)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def test_bad_masks_are_refused_at_construction():
    A, b, C, masks = _params()
    cases = [
        ({A: masks[A][:, :4]}, ValueError, r"parameter 0 of group 0 \(shape \(6, 5\)\) has shape"),
        ({A: masks[A].float()}, TypeError, r"must be a bool tensor .* got torch.float32"),
        ({A: masks[A].to("meta")}, ValueError, "is on meta; it must be on the parameter's cpu"),
        ({A: [True] * 30}, TypeError, r"must be a bool tensor .* got list"),
        ({nn.Parameter(torch.zeros(6, 5)): masks[A]}, ValueError, "not a parameter of this"),
        ({"0": masks[A]}, TypeError, "pruner.param_masks"),
        ([masks[A]], TypeError, "masks must be a dict"),
    ]
    for bad, kind, match in cases:
        with pytest.raises(kind, match=match):
            MFAC([A, b, C], num_grads=M, masks=bad)
    none = {A: torch.zeros(6, 5, dtype=torch.bool), C: torch.zeros(C.shape, dtype=torch.bool)}
    with pytest.raises(ValueError, match="keep no coordinate"):
        MFAC([A, C], num_grads=M, masks=none)
    assert MFAC([A, b, C], num_grads=M, masks=none).dim == b.numel()  # the bias is kept
    strided = nn.Parameter(torch.zeros(6, 10)[:, ::2])
    with pytest.raises(ValueError, match="not dense in memory"):
        MFAC([strided], num_grads=M, masks={strided: masks[A]})


@pytest.mark.parametrize("errors", ["skip", "raise"])
def test_a_nan_at_a_kept_coordinate_skips_or_raises(errors):
    A, b, C, masks = _params()
    opt = MFAC([A, b, C], num_grads=M, damp=1e-2, masks=masks, errors=errors)
    ga, gb, gc = _grads(1, [A.shape, b.shape, C.shape])[0]
    ga[masks[A]] = float("nan")
    A.grad, b.grad, C.grad = ga, gb, gc
    before = [p.detach().clone() for p in (A, b, C)]
    if errors == "raise":
        with pytest.raises(FloatingPointError, match=r"parameter 0 of group 0 \(shape \(6, 5\)\)"):
            opt.step()
    else:
        with pytest.warns(MFACStepWarning, match="parameter 0 of group 0"):
            opt.step()
        assert opt.skipped_steps == 1
    assert opt.steps == 0
    assert all(torch.equal(p, q) for p, q in zip((A, b, C), before, strict=True))


def test_add_param_group_appends_dense_coordinates():
    A, b, C, masks = _params()
    opt = MFAC([A, C], num_grads=M, damp=1e-2, masks=masks)
    kept = opt.dim
    _run(opt, [A, C], _grads(2, [A.shape, C.shape]))
    opt.add_param_group({"params": [b]})
    assert opt.dim == kept + b.numel() and tuple(opt.ihvp._G.shape) == (M, opt.dim)
    assert opt.state_dict()["state"][0]["mask"].shape == (A.numel() + C.numel() + b.numel(),)
    _run(opt, [A, C, b], _grads(1, [A.shape, C.shape, b.shape]))
    assert opt.steps == 3


def _ddp_sparse(comm, masks_seed: int):
    A, b, C, masks = _params()
    opt = MFAC([A, b, C], lr=0.05, num_grads=M, damp=1e-2, momentum=0.5, masks=masks, comm=comm)
    _run(opt, [A, b, C], _grads(5, [A.shape, b.shape, C.shape]))
    return [p.detach().clone() for p in (A, b, C)], opt.ihvp.local_shape


def test_ddp_sparse_matches_one_process():
    single, shape = _ddp_sparse(None, 0)
    results = run_spmd_threads(_ddp_sparse, 2, 0)
    widths = []
    for r in results:
        assert not isinstance(r, Exception), r
        params, local = r
        widths.append(local[1])
        for p, q in zip(params, single, strict=True):
            _close(p, q, 1e-12)
    assert sum(widths) == shape[1]  # each rank holds its columns of the kept coordinates


def test_pruner_then_sparse_fine_tuning_keeps_the_pruned_weights_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    data = [(torch.randn(4, 8), torch.randint(0, 2, (4,))) for _ in range(8)]
    pruner = MFACPruner(model, num_grads=8, block_size=32, damp=1e-3)
    pruner.prune(data, F.cross_entropy, sparsity=0.9)
    opt = MFAC(model.parameters(), lr=1e-2, num_grads=4, masks=pruner.param_masks())
    assert opt.dim == int(pruner.flat_mask().sum()) + 16 + 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for name, mask in pruner.masks.items():
        weight = dict(model.named_modules())[name].weight
        assert bool((weight[~mask] == 0).all()) and bool((weight[mask] != 0).all())


def test_the_sparse_fine_tuning_example_of_the_docs_runs(capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "torch_sparse_finetune.py"
    if not script.is_file():
        pytest.skip("examples/ is not beside the tests")
    runpy.run_path(str(script))["main"]()
    out = capsys.readouterr().out
    assert "sparsity 90%" in out
    assert "coordinates, 12% of dense); pruned weights still zero: True" in out
