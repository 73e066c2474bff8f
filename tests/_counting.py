"""Count, on CPU PyTorch, what would be kernel launches, host syncs and H2D copies on a GPU.

No GPU is needed: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees
every ATen operation that a PyTorch call dispatches, whatever the tensor's device,
so the counts of a CPU run are those of the same Python code on CUDA tensors
(PyTorch's CUDA and CPU backends implement the same ATen operators).

What is counted, and how
------------------------
``ops``
    Every ATen operation except the metadata-only ones (views, reshapes,
    strides, ``detach``, ``alias``...; see ``_FREE``), which launch nothing on a
    GPU. One operation is taken as one kernel launch: an upper bound for
    fused ops, a lower bound for the few that launch several kernels (a
    ``linalg`` factorisation). The budgets are on how the count *grows* (not
    at all with d) and on its order of magnitude, not on the exact number.
``syncs``
    The operations that read a device value on the host and so stall the host
    until the device has caught up: ``aten._local_scalar_dense`` (what
    ``float(t)``, ``int(t)``, ``bool(t)`` and ``t.item()`` call), ``aten.is_nonzero``,
    ``aten.equal`` and ``aten.nonzero`` (whose output size the host must read),
    and the calls of ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.__array__``,
    which on a CPU tensor dispatch no ATen operation (the dispatch mode would not
    see them) and on a CUDA tensor are one device-to-host copy each: the harness
    wraps those three methods while it counts.
``host_tensors``
    Tensors of one or more dimensions made from host data, which on a GPU are
    host-to-device copies: ``aten.lift_fresh`` / ``lift_fresh_copy``
    (``torch.tensor(list)``, ``torch.as_tensor(list)``, and so ``xp.asarray(list)``
    of array-api-compat), and ``aten._to_copy`` / ``aten.copy_`` whose source is a
    CPU tensor and whose target is not (impossible on CPU tensors; on CUDA ones it
    is the copy).
``scalar_args``
    0-d tensors made from a Python number (``aten.scalar_tensor``,
    ``aten.lift_fresh`` of a 0-d tensor): what ``torch.where(c, t, 0.0)`` and
    ``t[i:j] = 0.0`` make. On a GPU these stay CPU scalars that PyTorch passes to
    the kernel as an argument (indexing assignment turns them into ``fill_``), with
    no copy, like a Python number in ``t * 0.5`` (which is not seen at all). They
    are counted apart, not budgeted. The limit of this rule: a 0-d tensor made by
    ``xp.asarray(0.5, device=cuda)`` *is* a copy on a GPU and would be counted
    here, not in ``host_tensors``; the library makes none on its hot paths.

Factories (``full``, ``zeros``, ``arange``) are device operations (a fill
kernel), counted in ``ops`` only.

Limits
------
On CPU tensors a CPU-to-CPU ``.to()`` or ``.numpy()`` round trip is invisible
or indistinguishable from device work; NumPy code (the C extension's path) is
not seen at all. So the tests run the operators with :func:`device_path`, which
makes the engine take the route that CUDA tensors take (no host views, pieces
sized for a device) while the tensors stay on the CPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Operations that read a device value on the host (a synchronisation on a GPU).
_SYNCS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
}

#: Tensors made from host data (a host-to-device copy on a GPU).
_HOST_MADE = {
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
    aten.scalar_tensor.default,
}

#: Tensor methods that read a whole tensor on the host without an ATen operation.
_READS = ("tolist", "numpy", "__array__")

#: Metadata-only operations: no kernel on a GPU.
_FREE_NAMES = {
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute",
    "expand", "unsqueeze", "squeeze", "select", "slice", "alias", "detach",
    "split", "split_with_sizes", "unbind", "chunk", "narrow", "diagonal",
    "view_as_real", "view_as_complex", "_reshape_alias", "unfold", "numpy_T",
    "matrix_H", "mT", "expand_as", "view_as", "movedim", "swapaxes", "flatten",
    "unflatten", "empty_like", "empty", "empty_strided", "new_empty",
    "new_empty_strided", "_conj", "_neg_view", "conj", "resolve_conj", "resolve_neg",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "size", "stride", "dim", "is_complex", "is_floating_point", "_has_compatible_shallow_copy_type",
}  # fmt: skip


class Counts(TorchDispatchMode):
    """A dispatch mode that counts launches (``ops``), ``syncs`` and ``host_tensors``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.host_tensors = 0
        self.scalar_args = 0
        self.names: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if func in _SYNCS:
            self.syncs += 1
            self.names["SYNC " + name] += 1
        elif func in _HOST_MADE and out.ndim == 0:
            self.scalar_args += 1
            self.names["SCALAR " + name] += 1
        elif func in _HOST_MADE or _is_upload(func, args, kwargs):
            self.host_tensors += 1
            self.names["H2D " + name] += 1
        elif name not in _FREE_NAMES:
            self.ops += 1
            self.names[name] += 1
        return out

    def read_back(self, what: str) -> None:
        """Count a device-to-host read that dispatches no ATen operation on a CPU tensor."""
        self.syncs += 1
        self.names["SYNC " + what] += 1

    def summary(self) -> dict[str, int]:
        """The three counts, for messages."""
        return {
            "ops": self.ops,
            "syncs": self.syncs,
            "host_tensors": self.host_tensors,
            "scalar_args": self.scalar_args,
        }


def _is_upload(func: Any, args: Any, kwargs: Any) -> bool:
    """A copy from a CPU tensor to another device (never true for CPU-only runs)."""
    if func is aten._to_copy.default:
        target = kwargs.get("device")
        return target is not None and torch.device(target).type != "cpu" and args[0].is_cpu
    if func is aten.copy_.default:
        return args[1].is_cpu and not args[0].is_cpu
    return False


@contextlib.contextmanager
def counting() -> Iterator[Counts]:
    """Count the ATen operations of the block (see the module docstring)."""
    mode = Counts()
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(name: str) -> Any:
        original = originals[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            mode.read_back(name)
            return original(self, *args, **kwargs)

        return read

    for name in _READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with mode:
            yield mode
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def device_path() -> Iterator[None]:
    """Run the engine as for GPU tensors, on CPU ones.

    The engine reads C-ordered CPU tensors through NumPy views (the C
    extension), which the dispatch mode cannot see; CUDA tensors without CuPy
    take the library's own route, in pieces sized for a device. ``mfac_core``'s
    ``_pieces.simulate_device`` makes CPU tensors take that route. (With CuPy,
    CUDA tensors of single-precision or 2-byte storage take the CUDA pass
    kernels instead; ``tests/test_kernel_passes.py::test_torch_cuda_route_budget``
    counts that route.)
    """
    from mfac_core import _pieces

    with _pieces.simulate_device():
        yield
