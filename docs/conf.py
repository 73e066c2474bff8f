"""Sphinx configuration of the mfac_core documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

import os
import sys

# Document the source tree next to this folder, not an installed copy.
sys.path.insert(0, os.path.abspath(os.path.join("..", "src")))

import mfac_core

project = "mfac_core"
author = "the mfac_core developers"
copyright = "the mfac_core developers"
version = release = mfac_core.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "numpydoc",
]

# No network at build time: no inventories to fetch.
intersphinx_mapping: dict = {}

# The PyTorch and JAX front-ends are documented even where their libraries are not
# installed (mocked: their pages then lose the signatures, not the text).
autodoc_mock_imports = []
for _name in ("torch", "jax", "optax"):
    try:
        __import__(_name)
    except ImportError:
        autodoc_mock_imports.append(_name)

autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"
autodoc_member_order = "groupwise"

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list = []
