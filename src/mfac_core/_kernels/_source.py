"""The kernel sources as NVRTC receives them (pure Python; no CuPy)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

__all__ = ["DIRECTORY", "SOURCES", "kernel_source"]

#: The folder of the ``.cu`` files.
DIRECTORY = Path(__file__).resolve().parent
#: The files that define kernels (``common.cu`` only holds shared definitions).
SOURCES = ("cholesky.cu", "passes.cu", "trsm.cu", "update.cu")

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([A-Za-z0-9_]+\.cu)"[ \t]*$', re.MULTILINE)


@cache
def kernel_source(name: str) -> str:
    """The text of ``name``, a ``.cu`` file of this folder, with its local includes pasted in.

    NVRTC could follow the ``#include`` with an include path, but CuPy's compile cache is keyed
    on the source text and the options only: pasting the included files makes the key cover
    every file a module depends on, so editing ``common.cu`` recompiles.
    """
    seen: set[str] = set()

    def expand(file: str) -> str:
        if file in seen:  # included twice: its include guard would skip it anyway
            return ""
        seen.add(file)
        text = (DIRECTORY / file).read_text(encoding="utf-8")
        return _INCLUDE.sub(lambda match: expand(match.group(1)), text)

    return expand(name)
