"""The optional C extension; everything else is in pyproject.toml.

``mfac_core._fused._passes`` holds CPU kernels for the spectral operator's passes at several
dampings (src/mfac_core/_fused/_passes.c). It is optional: where it does not compile (no C
compiler, or one without GCC's vector extensions), the package installs without it and
runs the same computations through BLAS.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mfac_core._fused._passes",
            sources=["src/mfac_core/_fused/_passes.c"],
            depends=["src/mfac_core/_fused/_passes_impl.h", "src/mfac_core/_fused/_blocks_impl.h"],
            extra_compile_args=["-O3", "-std=gnu11"],
            # fenv.h's flag functions (combine64's overflow test, off x86-64) live in libm
            # on Linux: linked by name, not left to the interpreter's own libm.
            libraries=[] if sys.platform == "win32" else ["m"],
            optional=True,
        )
    ]
)
