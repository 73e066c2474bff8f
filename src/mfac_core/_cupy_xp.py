"""array-api-compat's CuPy namespace, with array creation on the device it is asked for.

array-api-compat's CuPy creation functions (``zeros``, ``empty``, ``eye``, ...)
accept ``device=`` but ignore it: CuPy creates arrays on the *current* device,
so an operator asked for ``cupy.cuda.Device(1)`` while device 0 is current
would silently build its buffers on device 0. This namespace is that one with
each creation function run under ``with cupy.cuda.Device(device):`` (and the
``*_like`` functions, without ``device=``, under their argument's device).
:func:`mfac_core._compat.array_namespace` returns it for CuPy arrays, so every
module of the package reaches CuPy through it. Importing it imports CuPy.
"""

from __future__ import annotations

from typing import Any

import cupy
from array_api_compat import cupy as _compat_cupy

from ._compat import device_scoped_names


def _on(device: Any) -> Any:
    return cupy.cuda.Device(device)


globals().update(device_scoped_names(_compat_cupy, _on))
__all__ = sorted(device_scoped_names(_compat_cupy, _on))
