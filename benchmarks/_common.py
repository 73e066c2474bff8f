"""Helpers shared by the benchmark scripts: machine facts, timing, bandwidth, memory.

Conventions (docs/design.rst, "Speed: how it is measured"), used by every script that
imports this module:

* **Time** is the best of ``repeat`` runs, and the candidates of one table are run
  *interleaved* (round-robin: one run of each, then the next round), so that a floor
  and the code measured against it see the same machine state. The median is kept
  too, as a noise indicator.
* **Copy bandwidth** is ``2 * nbytes / t`` for ``np.copyto(dst, src)`` of ``nbytes``
  (one read plus one write of each byte), best of several runs, on arrays much larger
  than the last-level cache.
* **Read bandwidth** is ``nbytes / t`` for the fastest read-only BLAS pass over the
  same array (``sdot``/``ddot`` of it with itself, or a ``gemv`` over it viewed as a
  wide matrix). An IHVP only reads its m x d array, so this is the tighter floor.
* **Memory** is measured in a fresh child process per configuration: ``tracemalloc``
  peak of the measured call (NumPy reports its buffers to tracemalloc) and, as a
  cross-check that also sees BLAS workspaces, the growth of the peak resident set
  (Linux VmHWM, reset before the call; ``ru_maxrss`` elsewhere).

The module needs NumPy and the installed package (for the timing helpers it shares with
``mfac-core demo``); ``threadpoolctl`` is used for the BLAS header when it is
installed.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mfac_core._timing import (
    Timing,
    best_time,
    fmt_time,
    interleaved,
    markdown_table,
    other_threads_cpu_ms,
)

__all__ = [
    "Bandwidth",
    "CpuMonitor",
    "Timing",
    "best_time",
    "blas_summary",
    "fmt_bytes",
    "fmt_ratio",
    "fmt_time",
    "interleaved",
    "last_level_cache_bytes",
    "machine_facts",
    "markdown_table",
    "measure_bandwidth",
    "memory_probe",
    "other_threads_cpu_ms",
    "run_child",
]

MiB = 2**20


# -- machine facts -----------------------------------------------------------------------


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache reported by Linux sysfs (None elsewhere)."""
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if text[-1:].isalpha() else text
        try:
            size = int(digits) * mult
        except ValueError:
            continue
        best = size if best is None else max(best, size)
    return best


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.readline().strip()
    except OSError:
        return None


def blas_summary() -> list[str]:
    """One line per BLAS library loaded in this process: name, version, core type, threads."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        lines = []
        for info in threadpool_info():
            if info.get("user_api") != "blas":
                continue
            lines.append(
                f"{info.get('internal_api')} {info.get('version')} "
                f"core={info.get('architecture')} threads={info.get('num_threads')} "
                f"({os.path.basename(str(info.get('filepath')))})"
            )
        if lines:
            return lines
    # Without threadpoolctl: what NumPy was built against (not what runs; no thread count).
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return [
            f"{blas.get('name')} {blas.get('version')} (NumPy build info; install "
            "threadpoolctl for the runtime core type and thread count)"
        ]
    except Exception:  # older NumPy: no mode="dicts"
        return ["unknown (install threadpoolctl for BLAS details)"]


def machine_facts() -> list[tuple[str, str]]:
    """(name, value) pairs describing the machine and the numerical stack."""
    import scipy

    facts = [
        ("cpu", _cpu_model()),
        (
            "cpu count",
            f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})"
            if hasattr(os, "sched_getaffinity")
            else str(os.cpu_count()),
        ),
        ("last-level cache", fmt_bytes(last_level_cache_bytes())),
        ("memory", _total_memory()),
        ("python", platform.python_version()),
        ("numpy / scipy", f"{np.__version__} / {scipy.__version__}"),
    ]
    for i, line in enumerate(blas_summary()):
        facts.append(("BLAS" if i == 0 else "", line))
    for var in (
        "OPENBLAS_CORETYPE",
        "OPENBLAS_NUM_THREADS",
        "OPENBLAS_THREAD_TIMEOUT",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "MFAC_CORE_NUM_THREADS",
    ):
        facts.append((var, os.environ.get(var, "(unset)")))
    facts.append(("mfac_core CPU kernels", _fused_summary()))
    thp = _read_first_line("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp:
        facts.append(("transparent hugepages", thp))
    if hasattr(os, "getloadavg"):
        facts.append(("load average (1/5/15 min)", " / ".join(f"{x:.2f}" for x in os.getloadavg())))
    return facts


def print_heading(script: str) -> None:
    """A benchmark's first lines: the script, the mfac_core it measures, the machine facts."""
    import mfac_core

    name = os.path.basename(script)
    print(f"# benchmarks/{name} (mfac_core {mfac_core.__version__} at {mfac_core.__file__})")
    for key, value in machine_facts():
        print(f"- {key}: {value}")


def _fused_summary() -> str:
    """Which mfac_core is imported; whether its C extension is built, its instruction set."""
    try:
        import mfac_core
        from mfac_core import _fused
    except ImportError:
        return "(mfac_core not importable)"
    where = os.path.dirname(os.path.abspath(mfac_core.__file__))
    if not _fused.available():
        return f"not built, sweeps and diagonals through BLAS ({where})"
    return f"{_fused.best_isa()}, up to {_fused.max_threads()} threads ({where})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory() -> str:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return fmt_bytes(pages * size)
    except (ValueError, OSError, AttributeError):
        return "unknown"


class CpuMonitor:
    """How many CPU cores *other* processes kept busy while a block of code ran.

    Linux only (``/proc/stat``); elsewhere :meth:`foreign_cores` returns None. A value
    near 0 means the timings had the machine to themselves.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as fh:
                fields = fh.readline().split()[1:]
        except OSError:
            return None
        ticks = [int(x) for x in fields]
        # user nice system idle iowait irq softirq steal ...; busy = all - idle - iowait
        busy = sum(ticks[:8]) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK")

    def _sample(self) -> tuple[float, float | None, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return time.perf_counter(), self._busy_seconds(), cpu

    def foreign_cores(self) -> float | None:
        """Average number of cores used by other processes since construction."""
        t0, busy0, own0 = self._start
        t1, busy1, own1 = self._sample()
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


# -- timing: shared with the package's demo (mfac_core._timing) --------------------------

# -- bandwidth ---------------------------------------------------------------------------


@dataclass
class Bandwidth:
    """Streaming bandwidths in bytes per second (see the module docstring)."""

    copy: float
    read: float
    read_kernel: str
    nbytes: int


def bandwidth_candidates(
    nbytes: int, dtype: Any = np.float32
) -> tuple[dict[str, tuple[Callable[[Any], Any], None]], Callable[[dict[str, Timing]], Bandwidth]]:
    """Timing candidates for the copy and read bandwidth, and how to turn their timings
    into a :class:`Bandwidth`. Use with :func:`interleaved` next to other candidates.
    """
    n = max(1, nbytes // np.dtype(dtype).itemsize)
    src = np.ones(n, dtype=dtype)
    dst = np.zeros_like(src)  # touch the pages before timing
    rows = 64
    wide = src[: (n // rows) * rows].reshape(rows, -1)
    vec = np.ones(wide.shape[1], dtype=dtype)
    cands: dict[str, tuple[Callable[[Any], Any], None]] = {
        "bw:copy": (lambda _: np.copyto(dst, src), None),
        "bw:dot": (lambda _: np.dot(src, src), None),
        "bw:gemv": (lambda _: wide @ vec, None),
    }

    def result(t: dict[str, Timing]) -> Bandwidth:
        read_kernel = min(("bw:dot", "bw:gemv"), key=lambda k: t[k].best)
        return Bandwidth(
            copy=2 * src.nbytes / t["bw:copy"].best,
            read=wide.nbytes / t[read_kernel].best
            if read_kernel == "bw:gemv"
            else src.nbytes / t[read_kernel].best,
            read_kernel=read_kernel.split(":")[1],
            nbytes=src.nbytes,
        )

    return cands, result


def measure_bandwidth(nbytes: int, repeat: int = 5, dtype: Any = np.float32) -> Bandwidth:
    """Copy and read bandwidth over arrays of ``nbytes`` (choose well above the LLC)."""
    cands, result = bandwidth_candidates(nbytes, dtype)
    return result(interleaved(cands, repeat))


# -- memory ------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    """Peak resident set of this process: VmHWM (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` is inherited across fork and exec on Linux, so in a child it may
    report the parent's peak; VmHWM belongs to the process's own address space.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # kB on Linux


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); harmless where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def memory_probe(fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak memory of ``fn()`` in this process (meant to be a fresh child).

    Returns ``tracemalloc_peak`` (bytes allocated on top of what existed before,
    at the worst moment), ``tracemalloc_kept`` (still allocated after the call, e.g.
    the operator's own arrays), ``rss_growth`` (growth of the peak resident set over
    the resident set before the call; sees BLAS buffers too, but not memory that was
    allocated and never touched) and ``rss_before``.
    """
    gc.collect()
    _reset_peak_rss()
    rss0 = _rss_bytes()
    peak0 = _peak_rss_bytes()
    tracemalloc.start()
    try:
        result = fn()
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peak1 = _peak_rss_bytes()
    del result
    return {
        "tracemalloc_peak": peak,
        "tracemalloc_kept": kept,
        "rss_growth": peak1 - max(peak0, rss0 or 0),
        "rss_before": rss0,
    }


def run_child(
    argv: Sequence[str], timeout: float = 900, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python argv...`` and parse the JSON object on the last line of its stdout.

    ``env`` is the child's whole environment (None: this process's).
    """
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- formatting --------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(ratio: float, target: float | None = None) -> str:
    text = f"{ratio:.2f}x"
    if target is not None:
        text += " ok" if ratio <= target else " MISS"
    return text
