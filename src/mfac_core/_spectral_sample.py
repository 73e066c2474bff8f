"""Gaussian samples of :class:`~mfac_core.SpectralIHVP`: standard normal draws per library.

``sample(n)`` returns the rows ``(A^{1/2} z)^T`` for ``A = F^{-1}`` or ``F`` and
standard normal ``z`` drawn with the caller's generator, in the operator's library
and on its device (array-api-strict, which has no generator, draws with NumPy and
copies to the device).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ._compat import (
    Array,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    namespace_name,
)
from ._jax_mode import check_float64_available

__all__ = ["drawn", "standard_normal"]


def drawn(op: Any, n: int, rng: Any) -> Array:
    """The body of :meth:`SpectralIHVP.sample`: ``A^{1/2} z`` for n standard normal z."""
    check_float64_available(op.xp)  # a JAX operator built inside jax.enable_x64
    if op.power not in (-1.0, 1.0):
        # The draws are A^{1/2} z: say so in terms of sample(), not of the sqrt() inside.
        raise ValueError(
            f"sample() draws from N(0, A) for A = F^-1 or F (power -1 or 1), through "
            f"A's square root; this operator is F**{op.power:g} (from sqrt() or "
            f"inv_sqrt()), whose square root F**{op.power / 2:g} has no closed form; "
            "sample from the operator it was derived from"
        )
    Z = standard_normal(op.xp, rng, (op.dim, n), op.dtype, op.device)
    # Z is the operator's own (namespace, device, dtype, finite): no input check.
    return op.sqrt()._matmat(Z).T


def _is_seed(rng: Any) -> bool:
    """An integer seed (Python or NumPy integers), never a bool (``True`` is no seed)."""
    return isinstance(rng, numbers.Integral) and not isinstance(rng, (bool, np.bool_))


def _checked_seed(rng: Any, kind: str, name: str, bits: int | None = None) -> int:
    """An int seed as ``int``, refused unless in ``[0, 2**bits)`` (``[0, inf)`` without bits).

    One range per library, what its generator takes without wrapping: NumPy's (and
    CuPy's) seed sequences take any non-negative int, ``torch.Generator.manual_seed``
    64 bits, ``jax.random.key`` a C long. Negative seeds are refused everywhere, so that
    one seed means the same in every library: PyTorch would wrap them onto the stream of
    another seed (-1 is 2**64 - 1), and NumPy refuses them.
    """
    seed = int(rng)
    if seed < 0 or (bits is not None and seed >= 2**bits):
        where = ">= 0" if bits is None else f"in [0, 2**{bits})"
        raise ValueError(
            f"rng as an int seed must be {where} for {name} operators (or pass {kind}), got {seed}"
        )
    return seed


def _not_a_generator(rng: Any, kind: str, name: str) -> TypeError:
    return TypeError(
        f"rng must be {kind} or an int seed for {name} operators, got {type(rng).__name__}"
    )


def standard_normal(xp: Any, rng: Any, shape: tuple[int, int], dtype: Any, dev: Any) -> Any:
    """Standard normal draws of ``shape`` in namespace ``xp`` on ``dev``, from the caller's rng."""
    name = namespace_name(xp)
    if is_numpy_namespace(xp) or is_array_api_strict_namespace(xp):
        kind = "a numpy.random.Generator"
        gen = np.random.default_rng(_checked_seed(rng, kind, name)) if _is_seed(rng) else rng
        if not isinstance(gen, np.random.Generator):
            raise _not_a_generator(rng, kind, name)
        npdt = np.float32 if dtype == xp.float32 else np.float64
        Z = gen.standard_normal(shape, dtype=npdt)
        return Z if is_numpy_namespace(xp) else xp.asarray(Z, device=dev)
    if is_torch_namespace(xp):
        import torch

        kind = "a torch.Generator"
        if _is_seed(rng):
            gen = torch.Generator(device=dev).manual_seed(_checked_seed(rng, kind, "torch", 64))
        else:
            gen = rng
        if not isinstance(gen, torch.Generator):
            raise _not_a_generator(rng, kind, "torch")
        return torch.randn(shape, generator=gen, dtype=dtype, device=dev)
    if is_jax_namespace(xp):
        import jax

        kind = "a JAX PRNG key"
        key = jax.random.key(_checked_seed(rng, kind, "jax", 63)) if _is_seed(rng) else rng
        if not isinstance(key, jax.Array):
            raise _not_a_generator(rng, kind, "jax")
        return jax.device_put(jax.random.normal(key, shape, dtype=dtype), dev)
    if is_cupy_namespace(xp):
        import cupy

        kind = "a cupy.random.Generator"
        gen = cupy.random.default_rng(_checked_seed(rng, kind, "cupy")) if _is_seed(rng) else rng
        if not isinstance(gen, cupy.random.Generator):
            raise _not_a_generator(rng, kind, "cupy")
        with cupy.cuda.Device(dev.id):
            return gen.standard_normal(shape, dtype=dtype)
    raise TypeError(f"sample() has no random number generator for {name} arrays")
