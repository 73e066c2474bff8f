"""Reuse compiler outputs between test runs when every input is byte-for-byte the same.

The kernel tests compile the CUDA sources with nvcc (for ptxas's resource report) and with g++
(the host harness). Those builds take most of the kernel tests' time, and CI runs the suite
twice in one checkout (two OpenBLAS kernels, which the compilers never see). The key is a
SHA-256 of everything that decides the output: the compiler's own ``--version`` text, the
command line, and the bytes of every source and header under the kernel directory. Any change
to one of them is a new key and a fresh build; nothing is reused across differing inputs.

Artefacts live in pytest's cache directory (``.pytest_cache``); with the cache plugin off
(``-p no:cacheprovider``) every call builds afresh.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

_SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".cpp")


def compiler_version(compiler: str) -> str:
    """The compiler's ``--version`` output (part of every key)."""
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


def sources_digest(directory: Path) -> bytes:
    """Names and bytes of every C/C++/CUDA source or header below ``directory``, in order."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.suffix in _SOURCE_SUFFIXES:
            digest.update(str(path.relative_to(directory)).encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.digest()


def build_key(parts: Iterable[str | bytes]) -> str:
    """SHA-256 over the parts, each length-prefixed so that no two lists share a key."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cached_text(config: pytest.Config, name: str, key: str, produce: Callable[[], str]) -> str:
    """``produce()``'s text, reused from an earlier run with the same ``key``."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return produce()
    entry = f"mfac_core/{name}/{key}"
    text = cache.get(entry, None)
    if isinstance(text, str):
        return text
    text = produce()
    cache.set(entry, text)
    return text


def cached_file(config: pytest.Config, name: str, key: str, produce: Callable[[], Path]) -> Path:
    """The file ``produce()`` writes, kept under the cache as ``<name>/<key><suffix>``."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return produce()
    directory = Path(cache.mkdir(f"mfac_core-{name}"))
    for existing in directory.glob(f"{key}.*"):
        if existing.suffix != ".partial":
            return existing
    built = produce()
    target = directory / f"{key}{built.suffix}"
    # One name per process: parallel test workers (pytest-xdist) may build the same key at once.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.copyfile(built, partial)
    partial.replace(target)  # atomic: a concurrent run sees the whole file or none
    return target


# Kernels that misuse barriers, for test_kernels.py to show that the harness catches it. Every
# module builds the one library that holds them (test_kernel_passes.py too), so a run builds it
# once and the later modules reuse it.
HARNESS_SELF_TEST = r"""
extern "C" __global__ void divergent_barrier(int* out)
{
    if (threadIdx.x < 3) return;  // these threads never reach the barrier
    __syncthreads();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void missing_barrier(int* out)
{
    __shared__ int s[MFAC_THREADS];
    s[threadIdx.x] = (int)threadIdx.x + 1;
    // no __syncthreads() here: the neighbour's entry may not be written yet
    out[threadIdx.x] = s[(threadIdx.x + 1) % MFAC_THREADS];
}
extern "C" int host_self_test(int which, unsigned long long seed, int* out)
{
    if (which == 0)
        return cuda_host::launch(1, MFAC_THREADS, [&] { divergent_barrier(out); }, seed, 1);
    return cuda_host::launch(1, MFAC_THREADS, [&] { missing_barrier(out); }, seed, 1);
}
"""


def host_library(config: pytest.Config, directory: Path) -> Path:
    """``HostKernels.build``'s library with :data:`HARNESS_SELF_TEST` (g++), skipped without
    g++, reused for equal inputs."""
    extra_sources = (HARNESS_SELF_TEST,)
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH")
    from mfac_core._kernels import _host
    from mfac_core._kernels._host import HOST_DIRECTORY, HostKernels, shim_source
    from mfac_core._kernels._source import DIRECTORY

    key = build_key(
        (
            compiler_version("g++"),
            sources_digest(DIRECTORY),
            sources_digest(HOST_DIRECTORY),
            shim_source(),
            Path(_host.__file__).read_bytes(),  # the compiler flags
            *extra_sources,
        )
    )
    return cached_file(
        config,
        "host",
        key,
        lambda: HostKernels.build(directory, extra_sources=extra_sources),
    )
