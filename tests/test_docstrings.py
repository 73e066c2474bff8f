"""The Examples sections of the public docstrings run and give what they show.

Every public module is listed; ``mfac_core.jax``'s examples run in a child process in
tests/test_jax.py, because they switch JAX's 64-bit mode for the whole process.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "mfac_core._operator",
    "mfac_core._static",
    "mfac_core._dask",
    "mfac_core._dynamic",
    "mfac_core.scipy",
    "mfac_core.pruning",
    "mfac_core.testing",
    "mfac_core._linalg._cupy",
    "mfac_core.torch",
]
#: Modules whose docstrings may have no example (documented helpers only).
WITHOUT_EXAMPLES = {"mfac_core._operator", "mfac_core.testing"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "mfac_core.torch":
        pytest.importorskip("torch")
    if name == "mfac_core._dask":
        pytest.importorskip("dask.array")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name not in WITHOUT_EXAMPLES:
        assert result.attempted > 0, f"{name} has no runnable examples"
