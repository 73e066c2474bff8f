"""The Examples sections of the public docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["mfac_core._operator", "mfac_core._static", "mfac_core._dynamic", "mfac_core.scipy",
           "mfac_core.pruning"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name != "mfac_core._operator":
        assert result.attempted > 0, f"{name} has no runnable examples"
