"""Packaging as a new user meets it: the metadata and what ``import mfac_core`` provides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mfac_core

ROOT = Path(__file__).resolve().parent.parent


def test_license_is_an_spdx_expression():
    # A TOML table (license = { text = ... }) is deprecated by setuptools, to be removed
    # in February 2027; the SPDX string needs setuptools >= 77 (PEP 639).
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as fh:
        meta = tomllib.load(fh)
    assert meta["project"]["license"] == "MIT"
    assert "setuptools>=77" in meta["build-system"]["requires"]


def test_install_hints_name_the_checkout_and_extras_that_exist():
    # mfac_core is not on PyPI: "pip install 'mfac_core[cuda]'" (as an error message of the
    # CuPy backend and benchmarks/gpu.py said) would fetch another project or nothing.
    import re

    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as fh:
        extras = set(tomllib.load(fh)["project"]["optional-dependencies"])
    files = [ROOT / "README.md", *(ROOT / "examples").glob("*.md")]
    for folder, pattern in (("src", "*.py"), ("benchmarks", "*.py"), ("docs", "*.rst")):
        files += (ROOT / folder).rglob(pattern)
    checked = 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"mfac[_-]core\[", text), path
        for extra in re.findall(r"pip install (?:-e )?\\?[\"']\.\[(\w+)\]", text):
            assert extra in extras, (path, extra)
            checked += 1
    assert checked >= 8


def test_submodules_are_attributes_without_optional_imports():
    # As in SciPy: mfac_core.pruning after `import mfac_core`, loaded on first use; the
    # front-ends that need optional libraries (torch, jax) are never imported by it.
    code = "\n".join(
        [
            "import sys, mfac_core",
            "loaded = [m for m in ('pruning', 'scipy', 'testing', 'cli') "
            "if 'mfac_core.' + m in sys.modules]",
            "assert not loaded, loaded",
            "assert callable(mfac_core.pruning.prune) and callable(mfac_core.scipy.to_scipy)",
            "assert callable(mfac_core.testing.assert_close) and callable(mfac_core.cli.main)",
            "assert mfac_core.distributed.__name__ == 'mfac_core.distributed'",
            "assert {'pruning', 'scipy', 'testing'} <= set(dir(mfac_core))",
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules",
            "for name in ('torch', 'jax', 'no_such_name'):",
            "    try:",
            "        getattr(mfac_core, name)",
            "    except AttributeError as exc:",
            "        print(exc)",
            "    else:",
            "        raise AssertionError(name)",
        ]
    )
    env = dict(os.environ)
    src = str(Path(mfac_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "import mfac_core.torch explicitly (it needs PyTorch)" in lines[0]
    assert "import mfac_core.jax explicitly" in lines[1]
    assert lines[2] == "module 'mfac_core' has no attribute 'no_such_name'"
