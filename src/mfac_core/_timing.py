"""Timing and table helpers shared by ``mfac-core demo`` and the benchmark scripts.

Time is the best of ``repeat`` runs; the candidates of one table run *interleaved*
(round-robin: one run of each, then the next round), so that a floor and the code
measured against it see the same machine state. The median is kept as a noise
indicator.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Timing",
    "best_time",
    "copy_bandwidth",
    "fmt_time",
    "interleaved",
    "markdown_table",
    "other_threads_cpu_ms",
]


@dataclass
class Timing:
    """All the run times of one candidate, in seconds."""

    times: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def best_time(
    fn: Callable[[Any], Any], repeat: int, setup: Callable[[], Any] | None = None
) -> Timing:
    """Time ``fn(setup())`` ``repeat`` times; ``setup`` is not timed."""
    return interleaved({"x": (fn, setup)}, repeat)["x"]


def interleaved(
    candidates: dict[str, tuple[Callable[[Any], Any], Callable[[], Any] | None]],
    repeat: int,
    *,
    collect: bool = True,
) -> dict[str, Timing]:
    """Round-robin timing: each round runs every candidate once.

    ``candidates`` maps a name to ``(fn, setup)``; ``fn(setup())`` is timed (``fn(None)``
    when ``setup`` is None). Results are dropped at once, and with ``collect`` the garbage
    collector is run between candidates, so that one candidate's memory does not burden
    the next. Timings of small arrays pass ``collect=False``: a collection costs time in
    proportion to every object of the process (seconds in a long test session), not to
    what the candidates allocate.
    """
    out = {name: Timing() for name in candidates}
    for _ in range(repeat):
        for name, (fn, setup) in candidates.items():
            arg = setup() if setup is not None else None
            if collect:
                gc.collect()
            t0 = time.perf_counter()
            result = fn(arg)
            out[name].times.append(time.perf_counter() - t0)
            del result, arg
    return out


def copy_bandwidth(nbytes: int, repeat: int = 5) -> float:
    """Bytes per second of :func:`numpy.copyto` on two ``nbytes`` arrays (read + write)."""
    src = np.ones(max(1, nbytes // 8))
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages before timing
    return 2 * src.nbytes / best_time(lambda _: np.copyto(dst, src), repeat).best


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table with columns padded for reading in a terminal."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def other_threads_cpu_ms(calls: Sequence[Callable[[], Any]], *, pause: float) -> float | None:
    """CPU ms that idle threads spent while ``calls`` ran, each followed by ``pause`` s.

    The threads counted are this process's threads other than the calling one that
    lived before and after the calls: BLAS's and PyTorch's teams, which spin for a while
    after a call that woke them (the library's own threads end with each call). From
    Linux's per-thread counters (a clock tick, 10 ms, at a time); None elsewhere.
    """
    before = _thread_cpu_ms()
    if before is None:
        return None
    for call in calls:
        call()
        time.sleep(pause)
    after = _thread_cpu_ms() or {}
    me = threading.get_native_id()
    return sum(after[t] - before[t] for t in after.keys() & before.keys() if t != me)


def _thread_cpu_ms() -> dict[int, float] | None:
    """CPU milliseconds of each thread of this process, or None off Linux."""
    if not os.path.isdir("/proc/self/task"):
        return None
    tick = 1000.0 / os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) * tick
    return out
