"""The operators' public calls under :func:`torch.compile`: run eagerly, one graph break each.

TorchDynamo traces the Python of a compiled function, and follows calls into it: into an
operator's product, it met the C extension's passes (through NumPy views), the checks
that decide on the host (finiteness, overflow, factorisation) and NumPy's dtypes, and
failed deep inside (``InternalTorchDynamoError``); where it traced on, NumPy code would
have become PyTorch operations with other numerics. Each public call of an operator is
therefore excluded from tracing (``torch.compiler.disable``): the code around it
compiles, and the call itself runs as it does eagerly, with its results bit for bit.

Excluded means every frame below the call, not only the call's own. After a graph break
TorchDynamo runs a call for real but still compiles the frames it calls, where
``torch.compiler.is_compiling()`` is False: so once ``torch._dynamo`` is imported
(``torch.compile`` imports it, and with PyTorch 2.13 so does building any
``torch.optim`` optimizer), the outermost public call always runs through the excluded
function (about 1 us a call), and the calls inside it (a composite's parts) see that
they are inside. Before, the check is one lookup; PyTorch is never imported for it, and
the excluded function is made on first use (``torch.compiler.disable`` imports
``torch._dynamo``, seconds, which a user of NumPy operators never needs).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ._compat import FUNCTIONALIZE_REFUSAL, functionalizing

__all__ = ["eager_methods_under_torch_compile", "eager_under_torch_compile"]

_F = TypeVar("_F", bound=Callable[..., Any])
_C = TypeVar("_C", bound=type)

#: What ``torch.compile(fullgraph=True)`` says when it meets an operator's call.
_EAGER_REASON = (
    "mfac_core's operators run eagerly under torch.compile: their passes are C or CUDA "
    "kernels, and their checks (finiteness, overflow, factorisation) decide on the host"
)

#: ``.inside``: this thread runs an excluded call, whose inner calls need no exclusion.
_thread = threading.local()


def eager_under_torch_compile(method: _F) -> _F:
    """``method``, which a function compiled by :func:`torch.compile` calls eagerly.

    Where TorchDynamo was never imported it is ``method`` behind one lookup; otherwise
    a call of it from compiled code is a graph break, and ``method`` then runs as it
    does eagerly, with no frame of it compiled.
    """
    excluded: list[Callable[..., Any]] = []

    # Named as ``method``: torch.compile(fullgraph=True) names it in its error.
    @functools.wraps(method)
    def run_inside(*args: Any, **kwargs: Any) -> Any:
        _refuse_under_functionalize()
        outer = getattr(_thread, "inside", False)
        _thread.inside = True
        try:
            return method(*args, **kwargs)
        finally:
            _thread.inside = outer

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            _refuse_under_functionalize()
            return method(*args, **kwargs)
        # Tracing (_tracing) reads no thread-local state: Dynamo may not trace it.
        if not _tracing() and getattr(_thread, "inside", False):
            return method(*args, **kwargs)
        if not excluded:
            excluded.append(_excluded(run_inside))
        return excluded[0](*args, **kwargs)

    wrapper.eager_under_torch_compile = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _refuse_under_functionalize() -> None:
    """Refuse an outermost public call under ``torch.func.functionalize``.

    Also the calls that take no tensor (a window's reset, a diagonal): their reads of the
    operator's own tensors, functional there, read no values. Checked where TorchDynamo
    does not trace (it cannot trace PyTorch's transform stack: a graph break of its own).
    """
    if "torch" in sys.modules and functionalizing():
        raise TypeError(FUNCTIONALIZE_REFUSAL)


def eager_methods_under_torch_compile(*names: str) -> Callable[[_C], _C]:
    """A class decorator: the class's own methods ``names`` as :func:`eager_under_torch_compile`.

    For the calls of a class that read or write arrays but are not public products
    (``float32_overflow_once`` excludes those already): building it, a window's edits
    and checkpoints. A classmethod stays one; a name the class does not define itself
    fails at import (``KeyError``).
    """

    def decorate(cls: _C) -> _C:
        for name in names:
            member = cls.__dict__[name]
            if isinstance(member, classmethod):
                setattr(cls, name, classmethod(eager_under_torch_compile(member.__func__)))
            else:
                setattr(cls, name, eager_under_torch_compile(member))
        return cls

    return decorate


def _tracing() -> bool:
    """Whether TorchDynamo (imported) traces the caller.

    ``torch.compiler.is_compiling`` came with PyTorch 2.3; before, ``torch._dynamo``'s.
    """
    torch = sys.modules["torch"]
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:
        is_compiling = torch._dynamo.is_compiling
    return bool(is_compiling())


def _excluded(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Also made while TorchDynamo traces: an import statement here would be a graph
    # break of its own, and PyTorch is imported wherever torch._dynamo is.
    torch = sys.modules["torch"]
    try:
        return torch.compiler.disable(fn, reason=_EAGER_REASON)
    except TypeError:  # PyTorch before 2.7 takes no reason
        return torch.compiler.disable(fn)
