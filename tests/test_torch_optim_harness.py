"""MFAC through PyTorch's own optimizer harness.

``torch.testing._internal.common_optimizers`` describes every torch optimizer by an
:class:`OptimizerInfo` (its input configurations, error inputs and the features it
supports), and torch's test/test_optim.py (``TestOptimRenewed``, not in the wheel)
runs one contract suite over all of them. Here MFAC gets its ``OptimizerInfo`` and the
drivers of that suite are restated as pytest functions, check for check, over the
configurations that torch's helper ``_get_optim_inputs_including_global_cliquey_kwargs``
returns. What does not apply is declared through the ``OptimizerInfo`` flags, as torch
declares it for its own optimizers:

- ``supported_impls=()``: no ``foreach``, ``fused`` or ``differentiable`` variants, so
  the foreach/fused parity and memory tests have nothing to compare;
- ``supports_sparse=False``: a sparse gradient is a step error (in the error inputs);
- ``supports_complex=False``: a complex parameter is a construction error;
- ``supports_multiple_devices=False``: the window is one vector on one device;
- ``step_requires_closure=False``, and no ``capturable``.

The suite's tests that need CUDA run on the device when one is present.
"""

from __future__ import annotations

import copy
import functools
import tempfile

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal.common_utils imports it

# Importing torch's test utilities freezes torch.backends' global flags for the whole
# process (torch.backends.disable_global_flags), and the other test modules run in the
# same process: the import runs inside torch's own context that puts the setting back.
_FLAGS_FROZEN = torch.backends.flags_frozen()
with torch.backends.__allow_nonbracketed_mutation():
    from torch.testing._internal.common_optimizers import (
        ErrorOptimizerInput,
        OptimizerErrorEnum,
        OptimizerInfo,
        OptimizerInput,
        _get_optim_inputs_including_global_cliquey_kwargs,
        get_error_inputs_for_all_optims,
    )

from torch.nn import Parameter  # noqa: E402
from torch.optim import SGD  # noqa: E402
from torch.optim.lr_scheduler import ReduceLROnPlateau  # noqa: E402
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from mfac_core.torch import MFAC  # noqa: E402

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
DTYPE = torch.float32


def optim_inputs_func_mfac(device, dtype=None):
    """MFAC's configurations, as torch's ``optim_inputs_func_*`` list their optimizers'.

    The dampings are of the scale of the harness's gradients: an empirical-Fisher step
    is ``g / |g|^2``-sized where ``|g|^2 / m`` exceeds the damping, so it does not
    shrink as the loss goes to 0; with ``damp=1e-3`` (the default) a draw whose loss
    starts small can end the 20 steps of the "goes right direction" tests above where
    it started (1 of 16 draws here).
    """
    return [
        OptimizerInput(params=None, kwargs={"damp": 0.1}, desc="default lr and window"),
        OptimizerInput(
            params=None,
            kwargs={"lr": torch.tensor(0.1), "num_grads": 8, "damp": 1.0},
            desc="tensor lr, small window",
        ),
        OptimizerInput(
            params=None,
            kwargs={"momentum": 0.5, "weight_decay": 0.1, "lr": 0.02, "damp": 0.1},
            desc="momentum and weight_decay",
        ),
        OptimizerInput(
            params=None,
            kwargs={"zero_init": False, "num_grads": 8, "lr": 0.2, "damp": 1.0},
            desc="no zero_init",
        ),
        OptimizerInput(
            params=None,
            kwargs={"grad_dtype": torch.bfloat16, "num_grads": 8, "lr": 0.02, "damp": 0.1},
            desc="bfloat16 window",
        ),
        OptimizerInput(
            params=None,
            kwargs={"errors": "raise", "num_grads": 8, "lr": 0.1, "damp": 1.0},
            desc="errors raise",
        ),
    ]


def optim_error_inputs_func_mfac(device, dtype):
    """The error inputs every torch optimizer gets, and MFAC's own."""
    sparse = Parameter(torch.randn(2, device=device, dtype=dtype))
    sparse.grad = torch.randn(2, device=device, dtype=dtype).to_sparse()
    own = [
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"lr": -1e-2}, desc="lr < 0"),
            error_type=ValueError,
            error_regex="lr",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"momentum": 1.0}, desc="momentum 1"),
            error_type=ValueError,
            error_regex="momentum",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"weight_decay": -1.0}, desc="weight_decay < 0"),
            error_type=ValueError,
            error_regex="weight_decay",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"damp": 0.0}, desc="damp 0"),
            error_type=ValueError,
            error_regex="damp",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"num_grads": 0}, desc="num_grads 0"),
            error_type=ValueError,
            error_regex="num_grads",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"errors": "ignore"}, desc="errors"),
            error_type=ValueError,
            error_regex="errors",
        ),
        ErrorOptimizerInput(
            OptimizerInput(
                params=[torch.randn(2, 2, dtype=torch.complex64, device=device)],
                kwargs={},
                desc="complex parameters (supports_complex=False)",
            ),
            error_type=TypeError,
            error_regex="float16, bfloat16, float32 or float64",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[sparse], kwargs={}, desc="sparse gradients"),
            error_on=OptimizerErrorEnum.STEP_ERROR,
            error_type=RuntimeError,
            error_regex="sparse gradients",
        ),
    ]
    return [*get_error_inputs_for_all_optims(device, dtype), *own]


MFAC_INFO = OptimizerInfo(
    MFAC,
    optim_inputs_func=optim_inputs_func_mfac,
    optim_error_inputs_func=optim_error_inputs_func_mfac,
    supported_impls=(),
    not_og_supported_flags=(),
    supports_sparse=False,
    supports_complex=False,
    supports_multiple_devices=False,
    step_requires_closure=False,
)


def all_inputs(device, skip=()):
    return _get_optim_inputs_including_global_cliquey_kwargs(device, DTYPE, MFAC_INFO, skip=skip)


def assert_equal(a, b, path="value"):
    """Equal structure; tensors equal bit for bit (the harness's assertEqual, exact)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def weight_bias(device, contiguous=True):
    if contiguous:
        weight = Parameter(torch.randn((10, 5), device=device, dtype=DTYPE))
        bias = Parameter(torch.randn(10, device=device, dtype=DTYPE))
    else:
        weight = Parameter(torch.randn((10, 5, 2), device=device, dtype=DTYPE)[..., 0])
        bias = Parameter(torch.randn((10, 2), device=device, dtype=DTYPE)[..., 0])
    return weight, bias


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- the OptimizerInfo and the error inputs -----------------------------------------------


def test_optim_infos_do_not_specify_global_cliquey_kwargs():
    for optim_input in MFAC_INFO.optim_inputs_func(device="cpu"):
        assert not any(f in optim_input.kwargs for f in ("foreach", "fused", "differentiable"))


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    for error_input in MFAC_INFO.optim_error_inputs_func(device=device, dtype=DTYPE):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        if params is None:
            params = [Parameter(torch.randn(2, device=device, dtype=DTYPE))]
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                # The one warning, of a parameter listed twice, is followed by MFAC's
                # refusal, where torch's optimizers go on (they step it twice).
                assert "duplicate parameters" in error_input.error_regex
                with (
                    pytest.warns(error_input.error_type, match=error_input.error_regex),
                    pytest.raises(ValueError, match="twice"),
                ):
                    MFAC(params, **kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    MFAC(params, **kwargs)
        else:
            opt = MFAC(params, **kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                opt.step()


# -- the update goes the right direction ------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_lrsched", [True, False])
def test_forloop_goes_right_direction(device, contiguous, with_lrsched):
    constructors = MFAC_INFO.scheduler_inputs if with_lrsched else [None]
    for schedulers_constructor in constructors:
        for optim_input in MFAC_INFO.optim_inputs_func(device=device):
            weight, bias = weight_bias(device, contiguous)
            x_in = torch.randn(5, device=device, dtype=DTYPE)
            optimizer = MFAC([weight, bias], **optim_input.kwargs)
            schedulers = [s(optimizer) for s in (schedulers_constructor or [])]

            def closure(optimizer=optimizer, weight=weight, bias=bias, x_in=x_in):
                optimizer.zero_grad()
                loss = (weight.mv(x_in) + bias).pow(2).sum()
                loss.backward()
                return loss

            initial_value = closure().item()
            for _ in range(20):
                loss = closure()
                optimizer.step()
                for scheduler in schedulers:
                    if isinstance(scheduler, ReduceLROnPlateau):
                        scheduler.step(loss.detach())
                    else:
                        scheduler.step()
            assert closure().item() < initial_value, optim_input.desc


@pytest.mark.parametrize("device", DEVICES)
def test_param_group_with_lrscheduler_goes_right_direction(device):
    for schedulers_c in MFAC_INFO.scheduler_inputs:
        weight, bias = weight_bias(device)
        x_in = torch.randn(5, device=device, dtype=DTYPE)
        # torch's driver builds the optimizer with its defaults; MFAC's damp=1e-3 is far
        # below this problem's |g|^2 / m, where per-group learning rates that scale the
        # blocks of one coupled step F^{-1} g differently need not descend (the loss
        # ends 0.3 % above its start on 1 of 12 draws here): a damping of its scale.
        optimizer = MFAC([{"params": [weight]}, {"params": [bias], "lr": 0.01}], damp=1.0)
        schedulers = [scheduler_c(optimizer) for scheduler_c in schedulers_c]

        def closure(optimizer=optimizer, weight=weight, bias=bias, x_in=x_in):
            optimizer.zero_grad()
            loss = (weight.mv(x_in) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial_value = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            for scheduler in schedulers:
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(loss.detach())
                else:
                    scheduler.step()
        assert closure().item() < initial_value


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_lr(device):
    for optim_input in all_inputs(device, skip=("differentiable",)):
        weight, bias = weight_bias(device)
        weight_c = weight.detach().clone().requires_grad_(True)
        bias_c = bias.detach().clone().requires_grad_(True)
        x_in = torch.randn(5, device=device, dtype=DTYPE)
        kwargs = dict(optim_input.kwargs)
        kwargs["lr"] = 1e-3
        optimizer_r = MFAC([weight, bias], **kwargs)
        kwargs["lr"] = torch.tensor(kwargs["lr"])
        optimizer = MFAC([weight_c, bias_c], **kwargs)

        def closure(optim, w, b, i):
            optim.zero_grad()
            loss = (w.mv(i) + b).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            closure(optimizer_r, weight, bias, x_in)
            closure(optimizer, weight_c, bias_c, x_in)
            optimizer_r.step()
            optimizer.step()
            # torch's test compares with its default tolerances; here exactly.
            assert_equal(weight, weight_c, optim_input.desc)
            assert_equal(bias, bias_c, optim_input.desc)


# -- parameter groups -----------------------------------------------------------------------

#: What MFAC takes per parameter group (the window's options are for the whole optimizer).
GROUP_KEYS = ("lr", "momentum", "weight_decay")


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_weight_decay(device):
    for optim_input in all_inputs(device, skip=("differentiable",)):
        outer = {k: v for k, v in optim_input.kwargs.items() if k not in GROUP_KEYS}
        weight_kwargs = {k: v for k, v in optim_input.kwargs.items() if k in GROUP_KEYS}
        bias_kwargs = {**copy.deepcopy(weight_kwargs), "weight_decay": 0.0}
        weight, bias = weight_bias(device)
        x_in = torch.randn(5, device=device, dtype=DTYPE)
        optimizer = MFAC(
            [dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)], **outer
        )
        loss = (weight.mv(x_in) + bias).pow(2).sum()
        initial_value = loss.item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(x_in) + bias).pow(2).sum()
            loss.backward()
            optimizer.step()
        assert loss.item() < initial_value, optim_input.desc


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_lr(device):
    for optim_input in all_inputs(device, skip=("differentiable",)):
        outer = {k: v for k, v in optim_input.kwargs.items() if k not in GROUP_KEYS}
        group = {k: v for k, v in optim_input.kwargs.items() if k in GROUP_KEYS}
        if "lr" not in group or group["lr"] == 0:
            group["lr"] = 1e-3
        weight, bias = weight_bias(device)
        irrelevant = Parameter(torch.randn(2, device=device, dtype=DTYPE))
        irrelevant_clone = irrelevant.clone()
        x_in = torch.randn(5, device=device, dtype=DTYPE)
        optimizer = MFAC(
            [dict(params=[weight, bias], **group), dict(params=[irrelevant])],
            **{**outer, "lr": 1e-28},
        )
        loss = (weight.mv(x_in) + bias).pow(2).sum()
        initial_value = loss.item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(x_in) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        assert loss.item() < initial_value, optim_input.desc
        # Its step is taken with lr 1e-28: too small to move a float32 of size ~1.
        assert_equal(irrelevant, irrelevant_clone, optim_input.desc)


# -- steps without gradients, or with zero ones ---------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_step_is_noop_when_params_have_no_grad(device):
    params = [torch.randn(2, 3, requires_grad=False, device=device, dtype=DTYPE) for _ in range(2)]
    old_params = [p.detach().clone() for p in params]

    def closure():
        return torch.tensor([1], device=device, dtype=DTYPE)

    for optim_input in all_inputs(device):
        optimizer = MFAC(params, **optim_input.kwargs)
        optimizer.step(closure)
        # torch's test only steps; a no-op also leaves the parameters and the state.
        assert_equal(params, old_params, optim_input.desc)
        assert optimizer.steps == 0 and len(optimizer.ihvp) == (
            optimizer.num_grads if optimizer.defaults["zero_init"] else 0
        )


@pytest.mark.parametrize("device", DEVICES)
def test_step_is_noop_for_zero_grads(device):
    param = torch.randn((5, 1), device=device, dtype=DTYPE, requires_grad=True)
    old_param = param.detach().clone()

    def closure():
        return torch.tensor([1], device=device, dtype=DTYPE)

    for optim_input in all_inputs(device):
        kwargs = optim_input.kwargs
        if kwargs.get("weight_decay", 0) != 0:
            continue
        optimizer = MFAC([param], **kwargs)
        param.grad = torch.zeros_like(param)
        optimizer.step(closure)
        assert_equal(old_param, param, optim_input.desc)


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_can_be_printed(device):
    params = [Parameter(torch.randn(2, 3, device=device, dtype=DTYPE)) for _ in range(2)]
    for optim_input in all_inputs(device):
        text = repr(MFAC(params, **optim_input.kwargs))
        assert text.startswith("MFAC (") and "Parameter Group 0" in text


# -- state_dict -----------------------------------------------------------------------------


def make_named_param(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def without_param_names(state_dict):
    new_state_dict = copy.deepcopy(state_dict)
    for pg in new_state_dict["param_groups"]:
        pg.pop("param_names", None)
    return new_state_dict


def fwd_bwd(optim, w, b, i):
    optim.zero_grad()
    loss = (w.mv(i) + b).pow(2).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
def test_state_dict_deterministic(device, is_named_optim0, is_named_optim1):
    weight = Parameter(torch.randn(2, 3, device=device, dtype=DTYPE))
    bias = Parameter(torch.randn(2, device=device, dtype=DTYPE))
    x_in = torch.randn(3, requires_grad=True, device=device, dtype=DTYPE)
    for optim_input in all_inputs(device, skip=("differentiable",)):
        optimizer = MFAC(make_named_param([weight, bias], is_named_optim0), **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, x_in)
        for _ in range(10):
            closure()
            optimizer.step()
        with torch.no_grad():
            weight_c = Parameter(weight.clone())
            bias_c = Parameter(bias.clone())
        params_c = make_named_param([weight_c, bias_c], is_named_optim1)
        optimizer_c = MFAC(params_c, **optim_input.kwargs)
        closure_c = functools.partial(fwd_bwd, optimizer_c, weight_c, bias_c, x_in)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            closure()
            closure_c()
            optimizer.step()
            optimizer_c.step()
            assert_equal(weight, weight_c, optim_input.desc)
            assert_equal(bias, bias_c, optim_input.desc)
        assert_equal(
            without_param_names(optimizer.state_dict()),
            without_param_names(optimizer_c.state_dict()),
            optim_input.desc,
        )
        # Repeated parameter groups have identical representations (torch's #36831).
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert_equal(
            without_param_names(optimizer.state_dict())["param_groups"][-1],
            without_param_names(optimizer_c.state_dict())["param_groups"][-1],
            optim_input.desc,
        )


def conv_model(device):
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)
    )
    model.to(dtype=DTYPE, device=device)
    x_in = torch.rand(1, 4, 16, 16, device=device, dtype=DTYPE)
    return model, x_in


def fwd_bwd_model(optim, mod, i):
    optim.zero_grad()
    loss = mod(i).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("device", DEVICES)
def test_can_load_older_state_dict(device):
    for optim_input in all_inputs(device, skip=("differentiable",)):
        model, x_in = conv_model(device)
        optimizer = MFAC(model.parameters(), **optim_input.kwargs)
        for _ in range(3):
            fwd_bwd_model(optimizer, model, x_in)
            optimizer.step()
        old_state_dict = copy.deepcopy(optimizer.state_dict())
        for group in old_state_dict["param_groups"]:
            for flag in MFAC_INFO.not_og_supported_flags:
                group.pop(flag, None)
        optimizer.load_state_dict(old_state_dict)
        fwd_bwd_model(optimizer, model, x_in)
        optimizer.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
def test_can_load_from_to_named_state_dict(device, is_named_optim0, is_named_optim1):
    for optim_input in all_inputs(device, skip=("differentiable",)):
        model, x_in = conv_model(device)
        params = model.named_parameters() if is_named_optim0 else model.parameters()
        optimizer = MFAC(params, **optim_input.kwargs)
        for _ in range(3):
            fwd_bwd_model(optimizer, model, x_in)
            optimizer.step()
        old_state_dict = copy.deepcopy(optimizer.state_dict())
        params2 = model.named_parameters() if is_named_optim1 else model.parameters()
        optimizer2 = MFAC(params2, **optim_input.kwargs)
        optimizer2.load_state_dict(old_state_dict)
        fwd_bwd_model(optimizer2, model, x_in)
        optimizer2.step()
        if is_named_optim0 or is_named_optim1:
            assert optimizer2.state_dict()["param_groups"][0]["param_names"] == [
                "0.weight",
                "0.bias",
                "1.weight",
                "1.bias",
            ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_named_optim", [True, False])
def test_save_load_equality_with_weights_only(device, is_named_optim):
    weight = Parameter(torch.randn(2, 3, device=device, dtype=DTYPE))
    bias = Parameter(torch.randn(2, device=device, dtype=DTYPE))
    x_in = torch.randn(3, requires_grad=True, device=device, dtype=DTYPE)
    for optim_input in all_inputs(device, skip=("differentiable",)):
        optimizer = MFAC(make_named_param([weight, bias], is_named_optim), **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, x_in)
        for _ in range(3):
            optimizer.step(closure)
        sd = optimizer.state_dict()
        with tempfile.TemporaryFile() as f:
            torch.save(sd, f)
            f.seek(0)
            assert_equal(torch.load(f, weights_only=False), sd, optim_input.desc)
            f.seek(0)
            assert_equal(torch.load(f, weights_only=True), sd, optim_input.desc)


@pytest.mark.parametrize("device", DEVICES)
def test_load_nontensor_step(device):
    params = [Parameter(torch.randn(2, 3, device=device, dtype=DTYPE)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for optim_input in all_inputs(device, skip=("differentiable",)):
        optimizer = MFAC(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            if "step" in p_state and torch.is_tensor(p_state["step"]):
                p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_dict_with_cuda_params():
    for optim_input in all_inputs("cpu", skip=("differentiable",)):
        params = [Parameter(torch.randn(2, 3, device="cpu", dtype=DTYPE)) for _ in range(2)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = MFAC(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        with torch.no_grad():
            params_cuda = [p.to(device="cuda") for p in params]
            for i, p in enumerate(params_cuda):
                p.grad = params[i].grad.to(device="cuda")
        kwargs = dict(optim_input.kwargs)
        if isinstance(kwargs.get("lr"), torch.Tensor):
            kwargs["lr"] = kwargs["lr"].clone()
        optimizer_cuda = MFAC(params_cuda, **kwargs)
        state_dict_cpu = copy.deepcopy(optimizer.state_dict())
        state_dict_cuda = copy.deepcopy(optimizer.state_dict())
        optimizer_cuda.load_state_dict(state_dict_cuda)
        assert_equal(state_dict_cpu, state_dict_cuda)  # loading does not modify it
        for _ in range(5):
            optimizer.step()
            optimizer_cuda.step()
            # Other devices round differently: torch's default tolerances, as its test.
            for p, q in zip(params, params_cuda, strict=True):
                torch.testing.assert_close(p, q.cpu(), msg=optim_input.desc)


# -- hooks ----------------------------------------------------------------------------------


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def one_param(device):
    return torch.rand(2, 3, device=device, dtype=DTYPE, requires_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_hooks(device):
    # torch's test_state_dict_pre_hook, _post_hook and _pre_post_hook.
    for optim_input in all_inputs(device):
        optim = MFAC([one_param(device)], **optim_input.kwargs)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optim.state_dict()["state"]["test"] == 1
        optim = MFAC([one_param(device)], **optim_input.kwargs)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        assert not optim.state_dict()["ran_state_dict_pre_hook"]
        optim = MFAC([one_param(device)], **optim_input.kwargs)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optim.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"]


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("device", DEVICES)
def test_load_state_dict_hooks(device):
    # torch's test_load_state_dict_pre_hook_and_prepend, _post_hook and _pre_post_hook.
    for optim_input in all_inputs(device):
        optim = MFAC([one_param(device)], **optim_input.kwargs)
        state_dict = optim.state_dict()
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        optim.load_state_dict(state_dict)
        # Prepended, hook2 runs first and hook1 overrides its lr.
        assert optim.param_groups[0]["lr"] == 0.002

        optim = MFAC([one_param(device)], **optim_input.kwargs)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert not optim.state["ran_load_state_dict_pre_hook2"]
        assert optim.state["ran_load_state_dict_post_hook"]

        optim = MFAC([one_param(device)], **optim_input.kwargs)
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert optim.state["ran_load_state_dict_pre_hook2"]
        assert optim.state["ran_load_state_dict_post_hook"]


@pytest.mark.parametrize("device", DEVICES)
def test_step_hooks(device):
    # torch's test_step_post_hook and test_step_pre_hook.
    data = 0

    def post_hook(opt, args, kwargs):
        nonlocal data
        data += 2

    def pre_hook(opt, args, kwargs):
        nonlocal data
        data += 2

    params = [torch.tensor([1.0, 1.0], device=device, dtype=DTYPE)]
    for optim_input in all_inputs(device):
        for register, start in (("register_step_post_hook", 2), ("register_step_pre_hook", 5)):
            optim = MFAC(params, **optim_input.kwargs)
            data = start
            handle = getattr(optim, register)(post_hook if "post" in register else pre_hook)
            optim.step()
            optim.step()
            assert data == start + 4
            handle.remove()
            optim.step()
            assert data == start + 4


@pytest.mark.parametrize("device", DEVICES)
def test_step_all_hooks(device):
    data = []

    def hook(value):
        return lambda opt, args, kwargs: data.append(value)

    params = [torch.tensor([1.0, 1.0], device=device, dtype=DTYPE)]
    for optim_input in all_inputs(device):
        optim = MFAC(params, **optim_input.kwargs)
        optim2 = SGD(params)
        data = []
        handles = [
            register_optimizer_step_pre_hook(hook(0)),
            register_optimizer_step_post_hook(hook(5)),
            optim.register_step_pre_hook(hook(1)),
            optim.register_step_post_hook(hook(2)),
            optim2.register_step_pre_hook(hook(1)),
            optim2.register_step_post_hook(hook(2)),
        ]
        try:
            optim.step()
            assert data == [0, 1, 2, 5]
            optim2.step()
            assert data == [0, 1, 2, 5] * 2
            optim.step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for handle in handles:
                handle.remove()
        optim.step()
        optim2.step()
        assert data == [0, 1, 2, 5] * 3


# -- copies and the state itself ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_deepcopy_copies_all_public_attrs(device):
    params = [Parameter(torch.randn(2, 3, device=device, dtype=DTYPE)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for optim_input in all_inputs(device, skip=("differentiable",)):
        optimizer = MFAC(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        assert public(optimizer) == public(copy.deepcopy(optimizer))


@pytest.mark.parametrize("device", DEVICES)
def test_non_empty_state(device):
    model = torch.nn.Linear(5, 5).to(dtype=DTYPE, device=device)
    x_in = torch.rand(2, 5, dtype=DTYPE, device=device)
    for optim_input in MFAC_INFO.optim_inputs_func(device=device):
        optim = MFAC(model.parameters(), **optim_input.kwargs)
        optim.zero_grad()
        model(x_in).sum().backward()
        optim.step()
        for state in optim.state.values():
            assert len(state) > 0, optim_input.desc


def test_the_harness_left_torchs_global_flags_as_they_were():
    assert torch.backends.flags_frozen() == _FLAGS_FROZEN
    if not _FLAGS_FROZEN:  # as in any other test module: the flags can be set directly
        torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled
