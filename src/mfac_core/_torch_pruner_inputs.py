"""What :class:`~mfac_core.torch.MFACPruner` takes, checked: its weights, masks, options, gradients.

The pruner reads and writes its layers' ``weight`` parameters in place and takes their
gradients with autograd; each check here refuses, in words and before anything changes,
a model or option with which it would silently prune nothing, prune twice or fail deep
inside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._compat import array_namespace
from ._finite import non_finite_error
from ._validation import check_choice, check_count, check_damp, check_dampings

__all__ = [
    "check_block",
    "check_differentiable",
    "check_finite_row",
    "check_fisher_dtype",
    "check_float16",
    "check_kept_layers",
    "check_masks",
    "check_weights_current",
    "chosen_weights",
    "checked_state",
    "pruner_state",
]

#: The layers pruned when none are named.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The dtypes of the Fisher computations (the 2-byte ones store the gradients only).
FISHER_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: The keys of MFACPruner's state_dict, and the options under its "options".
STATE_KEYS = ("masks", "selected_damps", "options")
OPTION_KEYS = (
    "num_grads",
    "block_size",
    "damp",
    "saliency",
    "update",
    "selection_block_size",
    "dtype",
)


def check_block(value: Any, name: str) -> int | None:
    """A block size: None (no blocks) or an int >= 1."""
    return None if value is None else check_count(value, name)


def check_fisher_dtype(dtype: Any) -> None:
    """Refuse a ``dtype=`` the pruner cannot compute the Fisher in."""
    if dtype is not None and dtype not in FISHER_DTYPES:
        raise TypeError(
            "dtype must be None (the weights' dtype), torch.float32, torch.float64, "
            f"torch.float16 or torch.bfloat16, got {dtype!r}"
        )


def chosen_weights(model: nn.Module, layers: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """The ``weight`` parameters of ``layers`` (default: every Linear and Conv), by name.

    Each weight once (tied weights under the first of their names), all on one device
    (not the meta device) and of one dtype.
    """
    weights = _named_weights(model, layers)
    first = next(iter(weights.values()))
    for name, w in weights.items():
        if w.device != first.device or w.dtype != first.dtype:
            raise ValueError(
                f"all pruned weights must share one device and dtype; "
                f"{name} is {w.device}/{w.dtype}, not "
                f"{first.device}/{first.dtype}"
            )
    if first.device.type == "meta":
        raise ValueError(
            "the model's weights are on the meta device (no values): materialise the "
            "model (e.g. model.to_empty(device=...) and load its weights) before pruning"
        )
    if not any(w.numel() for w in weights.values()):
        raise ValueError(
            f"the chosen weights hold no entries ({', '.join(map(repr, weights))} all of "
            "size 0): there is nothing to prune"
        )
    return weights


def _named_weights(model: nn.Module, layers: Sequence[str] | None) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    if layers is None:
        found = {
            name: _own_weight(name, m) for name, m in modules.items() if isinstance(m, PRUNABLE)
        }
        if not found:
            raise ValueError(
                "the model has no Linear or Conv layer to prune; name the "
                "layers explicitly with layers=[...]"
            )
        return _distinct(found)
    if isinstance(layers, str):
        layers = [layers]
    out = {}
    for name in layers:
        if name not in modules:
            raise ValueError(
                f"the model has no layer named {name!r}; its layers are {[n for n in modules if n]}"
            )
        weight = getattr(modules[name], "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"layer {name!r} has no weight tensor to prune")
        out[name] = _own_weight(name, modules[name])
    if not out:
        raise ValueError("layers must name at least one layer")
    return _distinct(out)


def _own_weight(name: str, module: nn.Module) -> torch.Tensor:
    """The module's ``weight`` parameter itself, which the pruner reads and writes.

    A parametrised weight (``torch.nn.utils.parametrizations.weight_norm``,
    ``spectral_norm``, the older ``weight_norm`` hook) is recomputed from other
    parameters by every forward pass: its gradients would be taken with respect to a
    stale copy (all zero) and the pruned values written into that copy.
    """
    weight = dict(module.named_parameters(recurse=False)).get("weight")
    if weight is None and "weight" in dict(module.named_buffers(recurse=False)):
        # Not a parametrization: the message below would say it was computed from others.
        raise ValueError(
            f"the weight of layer {name!r} is a buffer of the layer, not a parameter: it has "
            "no gradient to build the Fisher from; make it an nn.Parameter or leave the "
            "layer out of layers=[...]"
        )
    if weight is None:
        raise ValueError(
            f"the weight of layer {name!r} is not a parameter of the layer: it is "
            "computed from others (a parametrization such as weight_norm or "
            "spectral_norm), so pruning it would change nothing; remove the "
            "parametrization first (torch.nn.utils.parametrize.remove_parametrizations) "
            "or leave the layer out of layers=[...]"
        )
    return weight


def _distinct(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A weight shared by several layers (tied weights) is one set of coordinates of
    # theta: listed twice, its Fisher would count each gradient twice and OBS would
    # prune one copy of a coordinate while "updating" the other.
    seen: set[int] = set()
    out = {}
    for name, w in weights.items():
        if id(w) not in seen:
            seen.add(id(w))
            out[name] = w
    return out


def check_differentiable(weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse, before any batch, what would stop autograd from giving the gradients."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "MFACPruner needs the gradients of the weights, which torch.inference_mode() "
            "disables: call prune() or collect_grads() outside it (torch.no_grad() "
            "is fine)"
        )
    frozen = [name for name, w in weights.items() if not w.requires_grad]
    if frozen:
        raise ValueError(
            f"the weights of layers {frozen} do not require grad, and MFACPruner needs "
            "their gradients: call requires_grad_(True) on them before pruning (and "
            "requires_grad_(False) after, to freeze them again), or leave them out with "
            "layers=[...]"
        )


def check_finite_row(
    values: torch.Tensor, mask: torch.Tensor, weights: Mapping[str, torch.Tensor], row: int
) -> None:
    """Refuse NaN or infinity in one batch's flat gradient where ``mask`` keeps the weight.

    The pruning functions refuse it too, but as an entry of the internal ``G``
    ("G[0, 16] is nan"), which names neither the layer nor the batch. At pruned
    weights the gradient is dropped, whatever it holds. One check (one host sync)
    per batch; the layer is looked for only when it fails.
    """
    bad = ~torch.isfinite(values) & mask
    if not bool(bad.any()):
        return
    index = int(torch.nonzero(bad)[0, 0])
    offset = 0
    for name, w in weights.items():
        n = w.numel()
        if index < offset + n:
            count = int(bad[offset : offset + n].sum())
            raise ValueError(
                f"the gradient of layer {name!r} for batch {row} holds {float(values[index])} "
                f"at the weight's flat index {index - offset} ({count} of its {n} entries "
                "kept by the masks are NaN or infinite): the loss or the model's outputs are "
                "not finite for that batch"
            )
        offset += n


def check_float16(stored: torch.Tensor, g: torch.Tensor, name: str, row: int) -> None:
    """Refuse a finite gradient that float16 storage turned into infinity.

    The pruning functions would refuse the infinity without saying where it came from.
    """
    if bool(torch.isfinite(stored).all()) or not bool(torch.isfinite(g).all()):
        return
    raise ValueError(
        f"the gradient of layer {name!r} for batch {row} has an entry of magnitude "
        f"{float(g.abs().max()):.3g}, beyond float16's range (65504), which "
        "dtype=torch.float16 would store as infinity: use dtype=torch.bfloat16 "
        "(float32's range in 2 bytes) or torch.float32, or scale the loss down"
    )


def check_masks(masks: Any, weights: Mapping[str, torch.Tensor]) -> None:
    """The pruner's ``masks`` (a public attribute, which may be assigned) against its weights.

    One boolean tensor per pruned layer, by the layer's name, of its weight's shape and
    device. The names are matched, not the order: a dict in another order (loaded from a
    checkpoint, say) was read in its own order and its masks fell on the wrong weights.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict of layer name to mask, got {type(masks).__name__}")
    missing = [name for name in weights if name not in masks]
    extra = [name for name in masks if name not in weights]
    if missing or extra:
        raise ValueError(
            f"masks must hold one mask for each pruned layer {list(weights)}; "
            + "; ".join(
                f"{what} {names}"
                for what, names in (("missing", missing), ("not pruned", extra))
                if names
            )
        )
    for name, w in weights.items():
        mask = masks[name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"masks[{name!r}] must be a boolean tensor (True = kept), got {got}")
        if mask.shape != w.shape or mask.device != w.device:
            raise ValueError(
                f"masks[{name!r}] must have the shape and device of the layer's weight, "
                f"{tuple(w.shape)} on {w.device}; got {tuple(mask.shape)} on {mask.device}"
            )


def check_weights_current(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Each pruned weight is still its layer's ``weight`` parameter in ``model``.

    The pruner keeps the parameters it was built with. A parameter replaced since
    (``model.load_state_dict(..., assign=True)``, ``layer.weight = nn.Parameter(...)``,
    a layer replaced) was pruned no more: the old tensor was, and ``sparsity()`` said so,
    while the model kept its weights.
    """
    modules = dict(model.named_modules())
    for name, w in weights.items():
        # The attribute, not a dict of the layer's parameters (per call of apply_masks):
        # a parametrization added since computes it, and is refused as a replacement too.
        if getattr(modules.get(name), "weight", None) is not w:
            raise ValueError(
                f"the weight of layer {name!r} is no longer the parameter this MFACPruner was "
                "built with (the parameter or the layer was replaced, e.g. by "
                "load_state_dict(..., assign=True)): build a new MFACPruner (and set its "
                "masks) after replacing parameters"
            )


# -- checkpoints ----------------------------------------------------------------------------


def pruner_state(pruner: Any) -> dict[str, Any]:
    """``MFACPruner.state_dict()``: fresh copies of its masks, chosen dampings and options.

    Tensors, strings, numbers, lists and dicts only (the dtype by its name), so that
    ``torch.load(..., weights_only=True)`` reads it back.
    """
    check_masks(pruner.masks, pruner.weights)
    return {
        # In the weights' order, whatever the order of an assigned dict.
        "masks": {name: pruner.masks[name].clone() for name in pruner.weights},
        "selected_damps": list(pruner.selected_damps),
        "options": {
            "num_grads": pruner.num_grads,
            "block_size": pruner.block_size,
            "damp": pruner.damp,
            "saliency": pruner.saliency,
            "update": pruner.update,
            "selection_block_size": pruner.selection_block_size,
            "dtype": str(pruner.dtype).removeprefix("torch."),
        },
    }


def checked_state(pruner: Any, state_dict: Any) -> dict[str, Any]:
    """A state for ``MFACPruner.load_state_dict``, checked: the attributes to set.

    Nothing changes here (the masks are copied onto the weights' devices), so that a
    load sets them only once the whole state has passed.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"not an MFACPruner state_dict: expected a dict, got {type(state_dict).__name__}"
        )
    _check_keys(state_dict, STATE_KEYS, f"not an MFACPruner state_dict (keys {list(STATE_KEYS)})")
    options = _checked_options(state_dict["options"])
    masks = state_dict["masks"]
    if isinstance(masks, Mapping):
        # Onto the weights' devices (as torch's optimizers move a loaded state onto their
        # parameters'): a state saved on a GPU loads into a pruner on the CPU.
        masks = {
            name: m.to(pruner.weights[name].device, copy=True)
            # A meta tensor has nothing to copy: check_masks refuses it by its device.
            if isinstance(m, torch.Tensor) and not m.is_meta and name in pruner.weights
            else m
            for name, m in masks.items()
        }
    try:
        check_masks(masks, pruner.weights)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"state_dict['masks']: {exc}") from None
    damps = state_dict["selected_damps"]
    if isinstance(damps, (str, bytes)) or not isinstance(damps, Sequence):
        raise ValueError(
            f"state_dict['selected_damps'] must be a list of dampings, got {type(damps).__name__}"
        )
    damps = check_dampings(damps, "state_dict['selected_damps']") if len(damps) else []
    return {
        "masks": {name: masks[name] for name in pruner.weights},
        "selected_damps": damps,
        **options,
    }


def check_damping_grid(dampings: Any, select_damp: Any, *, num_grads: int) -> None:
    """Refuse ``prune``'s grid of dampings without its held-out loss, or a bad one.

    Checked before the gradients' forward and backward passes: wrapped in a callable
    by ``prune``, a ``select_damp`` that is none was called (and failed) only after them.
    """
    if (dampings is None) != (select_damp is None):
        raise ValueError("give both dampings (the grid) and select_damp (the held-out loss)")
    if dampings is not None:
        check_dampings(dampings, "dampings", num_grads=num_grads)
        if not callable(select_damp):
            raise TypeError(f"select_damp must be callable, got {type(select_damp).__name__}")


def _checked_options(options: Any) -> dict[str, Any]:
    """The options of a saved pruner, checked as ``MFACPruner(...)`` checks them."""
    where = "state_dict['options']"
    if not isinstance(options, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(options).__name__}")
    _check_keys(options, OPTION_KEYS, f"{where} must hold {list(OPTION_KEYS)}")
    num_grads = check_count(options["num_grads"], f"{where}['num_grads']")
    dtype = options["dtype"]
    names = [str(t).removeprefix("torch.") for t in FISHER_DTYPES]
    if dtype not in names:
        raise ValueError(f"{where}['dtype'] must be one of {names}, got {dtype!r}")
    return {
        "num_grads": num_grads,
        "block_size": check_block(options["block_size"], f"{where}['block_size']"),
        "damp": check_damp(options["damp"], f"{where}['damp']", num_grads=num_grads),
        "saliency": check_choice(
            options["saliency"], f"{where}['saliency']", ("obs", "obd", "magnitude")
        ),
        "update": check_choice(
            options["update"], f"{where}['update']", ("single", "joint", "none")
        ),
        "selection_block_size": check_block(
            options["selection_block_size"], f"{where}['selection_block_size']"
        ),
        "dtype": getattr(torch, dtype),
    }


def _check_keys(state: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    """Refuse a dict without exactly ``keys``, naming the missing and the unknown ones."""
    missing = [k for k in keys if k not in state]
    unknown = sorted(str(k) for k in state if k not in keys)
    if missing or unknown:
        found = (("missing", missing), ("unknown", unknown))
        raise ValueError(f"{what}: " + "; ".join(f"{w} {ks}" for w, ks in found if ks))


def check_kept_layers(masks: Any, weights: Mapping[str, torch.Tensor]) -> None:
    """:func:`check_masks`, then NaN or infinity among the kept weights, named by layer.

    The pruning functions name an entry of the flat ``theta`` (``theta[37] is nan``),
    which the pruner's user never sees.
    """
    check_masks(masks, weights)
    # One transfer for the finite layers (the usual case), one per layer otherwise.
    kept = {name: torch.where(masks[name], w.detach(), 0) for name, w in weights.items()}
    if bool(torch.stack([torch.isfinite(k).all() for k in kept.values()]).all()):
        return
    for name, k in kept.items():
        error = non_finite_error(array_namespace(k), k, f"weight {name!r}")
        if error is not None:
            raise ValueError(f"{error} (a weight that its mask keeps)")
