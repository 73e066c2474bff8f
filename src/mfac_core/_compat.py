"""The single import point for ``array_api_compat``.

Every other module reaches array libraries through the names defined here, so
that the dependency on ``array_api_compat`` (and its quirks) lives in one file.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any, ClassVar, TypeAlias

from array_api_compat import array_namespace as _array_namespace
from array_api_compat import (
    device,
    is_array_api_obj,
    is_array_api_strict_namespace,
    is_dask_array,
    is_dask_namespace,
    is_jax_array,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_array,
    is_torch_namespace,
    is_writeable_array,
    size,
)
from array_api_compat import is_cupy_namespace as _is_compat_cupy_namespace

#: An array of any Array-API library (NumPy, CuPy, PyTorch, JAX, array-api-strict). The
#: libraries share no static type, so this documents intent; the checks are at run time.
Array: TypeAlias = Any

__all__ = [
    "Array",
    "FUNCTIONALIZE_REFUSAL",
    "SHARDED_SUMS",
    "FoundNamespace",
    "array_namespace",
    "canonical_device",
    "cumulative_sum",
    "detached",
    "device",
    "device_scoped_names",
    "differentiated",
    "forward_ad_active",
    "functionalizing",
    "has_tangent",
    "host_values",
    "is_array_api_obj",
    "is_array_api_strict_namespace",
    "is_cupy_namespace",
    "is_dask_array",
    "is_dask_namespace",
    "is_finite_array",
    "is_functorch_wrapped",
    "is_jax_array",
    "is_jax_namespace",
    "is_legacy_batched",
    "is_numpy_namespace",
    "is_torch_array",
    "is_torch_namespace",
    "is_vmapped",
    "is_writeable_array",
    "library_namespace",
    "may_share_memory",
    "namespace_name",
    "picklable_device",
    "refuse_derivatives",
    "restored_device",
    "same_device",
    "size",
    "stored",
    "take",
    "tracks_derivatives",
]


#: The creation functions of array-api-compat's CuPy namespace, which ignore ``device=``.
CREATION_FUNCTIONS = (
    "arange",
    "empty",
    "empty_like",
    "eye",
    "full",
    "full_like",
    "linspace",
    "ones",
    "ones_like",
    "zeros",
    "zeros_like",
)

#: The module of the CuPy namespace whose creation functions honour ``device=``.
_SCOPED_CUPY = "mfac_core._cupy_xp"


def array_namespace(*xs: Any, **kwargs: Any) -> Any:
    """array-api-compat's ``array_namespace``; for CuPy, the device-honouring namespace.

    See :mod:`mfac_core._cupy_xp`: array-api-compat's CuPy namespace would create
    every array on the current device whatever ``device=`` says.
    """
    xp = _array_namespace(*xs, **kwargs)
    if _is_compat_cupy_namespace(xp):
        import importlib

        return importlib.import_module(_SCOPED_CUPY)
    return xp


def is_cupy_namespace(xp: Any) -> bool:
    """Whether ``xp`` is CuPy (the module, array-api-compat's or this package's namespace)."""
    return bool(_is_compat_cupy_namespace(xp)) or getattr(xp, "__name__", None) == _SCOPED_CUPY


def device_scoped_names(
    base: Any, on: Callable[[Any], Any], creation: tuple[str, ...] = CREATION_FUNCTIONS
) -> dict[str, Any]:
    """The public names of namespace ``base``, its ``creation`` functions run under ``on(device)``.

    ``on(device)`` is a context manager that makes ``device`` current (CuPy:
    ``cupy.cuda.Device``). A creation function given ``device=`` runs under it
    (and still receives it); a ``*_like`` function without ``device=`` runs
    under its argument's device, as the Array API specifies. The rest of
    ``base`` (the other functions, ``linalg``, ``fft``, the namespace info) is
    returned unchanged.
    """
    names = {name: getattr(base, name) for name in base.__all__}
    for name in creation:
        if name in names:
            names[name] = _device_scoped(names[name], on, like=name.endswith("_like"))
    return names


def _device_scoped(fn: Callable[..., Any], on: Callable[[Any], Any], *, like: bool) -> Any:
    @functools.wraps(fn)
    def scoped(*args: Any, device: Any = None, **kwargs: Any) -> Any:
        where = args[0].device if device is None and like and args else device
        if where is None:
            return fn(*args, **kwargs)
        with on(where):
            return fn(*args, device=device, **kwargs)

    return scoped


def take(xp: Any, x: Any, indices: Any, /, *, axis: int) -> Any:
    """``xp.take(x, indices, axis=axis)`` for non-negative ``indices``, by the library's own call.

    array-api-compat's ``take`` adds a layer that only serves negative indices: for
    PyTorch a ``where`` over the indices before ``index_select`` (10 us a call on a
    CPU tensor against 2 us), for NumPy the dispatch of ``numpy.take`` around the
    array's own method. The same gather, the same values; a negative index is refused
    by PyTorch's call (an error, never a wrong row). For the window's slot indices,
    which are never negative.
    """
    return _taker(xp)(x, indices, axis)


def cumulative_sum(xp: Any, x: Any, /, *, include_initial: bool = False) -> Any:
    """``xp.cumulative_sum(x, include_initial=...)`` of a 1-D array; NumPy's by its own calls.

    array-api-compat's NumPy ``cumulative_sum`` finds the namespace again and wraps
    ``numpy.cumsum`` (5.6 us at length 8); this makes the same calls, ``cumsum`` and, with
    ``include_initial``, a zero concatenated in front (1.6 us): the same values.
    """
    if not is_numpy_namespace(xp):
        return xp.cumulative_sum(x, include_initial=include_initial)
    import numpy as np

    total = x.cumsum(axis=0)
    if not include_initial:
        return total
    return np.concatenate((np.zeros((1,), dtype=total.dtype), total))


@functools.cache
def _taker(xp: Any) -> Callable[[Any, Any, int], Any]:
    """The gather of :func:`take` for namespace ``xp`` (a pure function of it)."""
    if is_numpy_namespace(xp):
        return lambda x, indices, axis: x.take(indices, axis=axis)
    if is_torch_namespace(xp):
        return lambda x, indices, axis: x.index_select(axis, indices)
    return lambda x, indices, axis: xp.take(x, indices, axis=axis)


def canonical_device(dev: Any) -> Any:
    """``dev`` as the arrays on it report their device.

    A PyTorch device named without an index (``torch.device("cuda")``) means the
    current device of its kind, but a tensor on it reports ``cuda:0`` (or
    whichever is current), and ``torch.device("cuda") != torch.device("cuda", 0)``;
    CPU tensors report ``cpu`` whatever index was given. The canonical form is the
    device a tensor created on ``dev`` reports, found by creating an empty one (no
    allocation). Devices of other libraries are returned as they are.
    """
    if type(dev).__module__ == "torch" and type(dev).__name__ == "device":
        if dev.type == "cpu" or dev.index is None:
            import torch

            return torch.empty((0,), device=dev).device
    return dev


def same_device(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one device (compared as :func:`canonical_device` gives them)."""
    return bool(a == b) or bool(canonical_device(a) == canonical_device(b))


def picklable_device(dev: Any) -> Any:
    """``dev`` in a form pickle can store (JAX's devices cannot be pickled)."""
    if type(dev).__module__.split(".")[0] in ("jax", "jaxlib"):
        return ("jax-device", dev.platform, dev.id)
    return dev


def restored_device(token: Any) -> Any:
    """The device that :func:`picklable_device` stored."""
    if isinstance(token, tuple) and len(token) == 3 and token[0] == "jax-device":
        import jax

        return next(d for d in jax.devices(token[1]) if d.id == token[2])
    return token


def forward_ad_active() -> bool:
    """Whether PyTorch's forward-mode AD has a dual level open (tangents may flow).

    Inside one, a tensor may carry a tangent without ``requires_grad``, which a NumPy view
    of it would drop.
    """
    forward_ad = sys.modules.get("torch.autograd.forward_ad")
    return forward_ad is not None and getattr(forward_ad, "_current_level", -1) >= 0


def tracks_derivatives(x: Any) -> bool:
    """Whether PyTorch takes derivatives through ``x``.

    Autograd (``requires_grad``), a forward-mode dual level, or a ``torch.func`` transform
    (a wrapped tensor). PyTorch exposes the last test only in ``torch._C._functorch``;
    without it, only the first two count.
    """
    if not is_torch_array(x):
        return False
    return bool(x.requires_grad) or forward_ad_active() or is_functorch_wrapped(x)


def _functorch() -> Any:
    """``torch._C._functorch``, where PyTorch keeps its transforms' tests; None without it
    (or without PyTorch loaded)."""
    return getattr(getattr(sys.modules.get("torch"), "_C", None), "_functorch", None)


def _functorch_says(test: str, x: Any) -> bool:
    """``torch._C._functorch.<test>(x)``; False where PyTorch has no such test."""
    try:
        return bool(getattr(_functorch(), test)(x))
    except AttributeError:  # another PyTorch, without these functions (or None)
        return False


def is_functorch_wrapped(x: Any) -> bool:
    """Whether the tensor ``x`` is a ``torch.func`` wrapper (False where PyTorch does not say)."""
    return _functorch_says("is_functorch_wrapped_tensor", x)


def functionalizing() -> bool:
    """Whether ``torch.func.functionalize`` is transforming this call (at any level).

    PyTorch exposes its stack of transforms only in ``torch._C._functorch``; without it
    (or without PyTorch loaded), False.
    """
    functorch = _functorch()
    try:
        stack = functorch.get_interpreter_stack() or ()
        return any(t.key() == functorch.TransformType.Functionalize for t in stack)
    except AttributeError:  # another PyTorch, without these functions (or None)
        return False


#: Why the operators refuse to run under ``torch.func.functionalize``.
FUNCTIONALIZE_REFUSAL = (
    "mfac_core reads values of the arrays it is given and computes (its checks for NaN, "
    "infinity and overflow, its set-up's factorization), which torch.func.functionalize "
    "does not give: the operators cannot run under functionalize"
)


def is_legacy_batched(x: Any) -> bool:
    """Whether ``x`` is batched by autograd's legacy vmap (``is_grads_batched``,
    ``jacobian(vectorize=True)``, gradcheck's batched check): no storage, no slicing rule.
    PyTorch exposes the test only in ``torch._C._functorch``; without it, False."""
    return is_torch_array(x) and _functorch_says("is_legacy_batchedtensor", x)


def is_vmapped(x: Any) -> bool:
    """Whether ``x`` is a PyTorch tensor batched by ``torch.func.vmap`` (at any level).

    Such a tensor has no storage of its own: reading its values on the host (a check, a
    NumPy view, ``tolist``) fails ("Cannot access data pointer"). Other ``torch.func``
    wrappers (``grad``, ``jvp``, ``jacrev``) hold one tensor each and are read as it.
    PyTorch exposes the test only in ``torch._C._functorch``; without it, False.
    """
    if not is_torch_array(x):
        return False
    functorch = _functorch()
    try:
        while functorch.is_functorch_wrapped_tensor(x):
            if functorch.is_batchedtensor(x):
                return True
            x = functorch.get_unwrapped(x)
    except AttributeError:  # another PyTorch, without these functions (or None)
        return False
    return False


def detached(x: Any) -> Any:
    """``x`` without autograd history (PyTorch tensors); any other array as it is.

    Buffers that store data (a window of gradients) must not record the graph of
    the values written into them: it would grow with every write.
    """
    if is_torch_array(x) and x.requires_grad:
        return x.detach()
    return x


#: Why a sharded operator refuses what a derivative would flow through
#: (:func:`refuse_derivatives`): a ``Communicator`` sums values only (``TorchComm``
#: detaches), so the terms that reach a rank from the others' columns would be missing.
SHARDED_SUMS = "a sharded operator's sums over the ranks (comm.allreduce_sum) carry none"


def has_tangent(x: Any) -> bool:
    """Whether the PyTorch tensor ``x`` carries a forward-mode tangent at the current level
    (``torch.autograd.forward_ad``, ``torch.func.jvp`` and ``jacfwd``)."""
    if not (is_torch_array(x) and forward_ad_active()):
        return False
    return sys.modules["torch.autograd.forward_ad"].unpack_dual(x).tangent is not None


def differentiated(x: Any) -> bool:
    """Whether a derivative taken now would flow through ``x``: autograd records it
    (``requires_grad`` with grad mode on, ``torch.func.grad`` and ``vjp`` included) or it
    carries a forward-mode tangent."""
    if not is_torch_array(x):
        return False
    recorded = bool(x.requires_grad) and sys.modules["torch"].is_grad_enabled()
    return recorded or has_tangent(x)


def refuse_derivatives(x: Any, name: str, why: str, *, tangent_only: bool = False) -> None:
    """Raise ``TypeError`` if a derivative would flow through ``x``, where ``why`` it would
    come out wrong; ``tangent_only``: only a forward-mode tangent counts (the caller stores
    ``x`` detached, which eager autograd says)."""
    if has_tangent(x) if tangent_only else differentiated(x):
        fix = "its .detach()" if " " in name else f"{name}.detach()"
        raise TypeError(
            f"{name} carries derivatives (autograd, forward-mode AD or torch.func), but {why}: "
            f"its derivative would come out wrong. Pass {fix} to hold it constant."
        )


def stored(x: Any, name: str) -> Any:
    """``x`` as an operator stores it: :func:`detached`, or refused under ``torch.func``.

    Eager autograd says that the history is dropped (the result does not require grad, and
    ``backward`` fails on it). Under a ``torch.func`` transform that takes reverse-mode
    derivatives through ``x`` (``grad``, ``jacrev``, ``vjp``) it would not: the transform
    returns zeros for them. So a wrapped ``x`` that requires grad is refused there.
    """
    if is_torch_array(x) and x.requires_grad and is_functorch_wrapped(x):
        fix = "its .detach()" if " " in name else f"{name}.detach()"
        raise TypeError(
            f"{name} requires grad under a torch.func transform (grad, jacrev, vjp): "
            "mfac_core stores it without autograd history, so its derivative would come "
            f"out as zero. Pass {fix} to hold it constant."
        )
    return detached(x)


#: The dtypes of PyTorch CPU tensors that NumPy reads in place (``Tensor.numpy()``).
_NUMPY_VIEWABLE = ("torch.float32", "torch.float64")  # NumPy's float16 sums are slow


def is_finite_array(xp: Any, x: Any, /, *, host_view: bool = True) -> bool:
    """Whether the floating array ``x`` holds no NaN and no infinity (one transfer).

    With ``host_view`` (False where CPU tensors stand for a GPU's, in tests), a float32
    or float64 PyTorch CPU tensor is read by NumPy, on this thread: a
    PyTorch reduction wakes its intra-op threads, which then spin for milliseconds
    on the cores that the C extension's passes, called right after, need (3.5-6 ms
    a product of 10**6 float32 entries on 2 cores). Another tensor's least and
    largest entries say it (``aminmax`` propagates NaN): ``isfinite(x).all()``
    writes a boolean tensor of x's size first, 20x the time of the one reduction.
    """
    if is_torch_array(x) and x.numel() > 0:
        if host_view and x.device.type == "cpu" and str(x.dtype) in _NUMPY_VIEWABLE:
            try:
                # functionalize's wrapper has a NumPy view of memory that does not hold its
                # values (NaN there read as an overflow): PyTorch reads wrappers.
                view = None if is_functorch_wrapped(x) else x.detach().numpy()
            except RuntimeError:  # no plain storage, or a negative view: PyTorch reads it
                view = None
            if view is not None:  # NaN propagates through both; no temporary of x's size
                return math.isfinite(view.max()) and math.isfinite(view.min())
        lo, hi = x.detach().aminmax()
        try:
            return all(math.isfinite(v) for v in xp.stack((lo, hi)).tolist())
        except RuntimeError as exc:  # values without storage: torch.func.functionalize's
            if not is_functorch_wrapped(x):
                raise
            raise TypeError(FUNCTIONALIZE_REFUSAL) from exc
    return bool(xp.all(xp.isfinite(x)))


def host_values(a: Any) -> list[float]:
    """The entries of a small 1-D array as Python floats (one transfer)."""
    tolist = getattr(a, "tolist", None)
    if tolist is not None:
        return [float(v) for v in tolist()]
    return [float(a[i]) for i in range(int(a.shape[0]))]


def namespace_name(xp: Any) -> str:
    """A short, human-readable name of an array namespace for error messages."""
    for test, name in (
        (is_numpy_namespace, "numpy"),
        (is_torch_namespace, "torch"),
        (is_cupy_namespace, "cupy"),
        (is_jax_namespace, "jax"),
        (is_array_api_strict_namespace, "array_api_strict"),
        (is_dask_namespace, "dask"),
    ):
        if test(xp):
            return name
    return getattr(xp, "__name__", repr(xp))


def may_share_memory(a: Any, b: Any) -> bool:
    """Whether arrays ``a`` and ``b`` of one library may overlap in memory (conservative).

    True when their memory ranges intersect (NumPy's ``may_share_memory``; the
    storages of PyTorch tensors; CuPy's ``may_share_memory``); for other
    libraries, whose arrays are not written in place by the operators, only
    when they are the same object.
    """
    if a is b:
        return True
    if is_torch_array(a) and is_torch_array(b):
        sa, sb = a.untyped_storage(), b.untyped_storage()
        if sa.device != sb.device:
            return False
        a0, b0 = sa.data_ptr(), sb.data_ptr()
        return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()
    module = type(a).__module__.split(".")[0]
    if module == "numpy" and type(b).__module__.split(".")[0] == "numpy":
        import numpy as np

        return bool(np.may_share_memory(a, b))
    if module == "cupy":
        import cupy

        return bool(cupy.may_share_memory(a, b))
    if module == "array_api_strict":
        import numpy as np

        try:  # CPU arrays of array-api-strict export their buffer without a copy
            return bool(np.may_share_memory(np.from_dlpack(a), np.from_dlpack(b)))
        except (BufferError, RuntimeError, TypeError, ValueError):
            return False
    return False


#: Library modules whose arrays report array-api-compat's wrapped namespace instead.
_WRAPPED_LIBRARIES = ("numpy", "torch", "cupy", "dask.array")


def library_namespace(xp: Any) -> Any:
    """``xp`` (a namespace or a library module) as its arrays report their namespace.

    Given ``numpy`` rather than ``array_api_compat.numpy``, an operator subclass
    refused every NumPy input as "x is a numpy array but ... works on numpy arrays".
    """
    name = getattr(xp, "__name__", None)
    if not isinstance(name, str) or not hasattr(xp, "asarray"):
        raise TypeError(
            f"xp must be an array namespace or library module (numpy, torch, cupy, "
            f"jax.numpy, ...), got {xp!r}"
        )
    if name in _WRAPPED_LIBRARIES:
        return array_namespace(xp.empty(0))
    return xp


class FoundNamespace:
    """A base of the (frozen) dataclasses over arrays that ask for their namespace often.

    ``xp`` is the namespace of the array field named by ``_NAMESPACE_FIELD``, found once
    per object (a window step or a product asks for it many times), and left out of
    pickles and copies: a module, which pickle cannot store, found again after.
    """

    _NAMESPACE_FIELD: ClassVar[str]

    @functools.cached_property
    def xp(self) -> Any:
        """The array namespace of the object's arrays."""
        return array_namespace(getattr(self, self._NAMESPACE_FIELD))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "xp"}

    def namespace_of(self, other: FoundNamespace) -> Any:
        """This object, its namespace taken as ``other``'s where that was found: no lookup.

        For an object made from another's arrays by the same library (an edited factor
        from its predecessor, into that one's buffers): a window step makes one.
        """
        if "xp" in other.__dict__:
            self.__dict__["xp"] = other.__dict__["xp"]
        return self
