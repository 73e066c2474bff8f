"""docs/design.rst's module picture names every module of the package (issue 20)."""

import pathlib
import re

import mfac_core

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _picture() -> str:
    text = (ROOT / "docs" / "design.rst").read_text()
    start = text.index("\nModules\n-------\n")
    stop = text.index("What flows between them:", start)
    return text[start:stop]


def test_every_module_is_in_the_picture() -> None:
    src = pathlib.Path(mfac_core.__file__).parent
    names = {p.stem for p in src.glob("*.py")}
    names |= {p.parent.name for p in src.glob("*/__init__.py")}
    picture = _picture()
    missing = sorted(n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}\b", picture))
    assert not missing, f"docs/design.rst's module picture lacks {missing}"
