"""DynamicIHVP's edits are all or nothing, also where an interrupt cuts them short.

Python raises a Ctrl-C (or any exception a signal's handler raises) between two
statements. A window edit changes several things (the buffer's row, the Gram matrix's
row, the factor, the slot lists, the damping); one cut between them left a window whose
factor was not its Gram's: products 6 % to 2000x off, without a word. Here an interrupt
is raised at each line of the package that a call runs, in turn, and the window must be
as before the call or as after it (``_dynamic_factor.all_or_nothing``, ``completed``).
The gradients share their first item (0), as a frozen weight's: the row store told
whether it had written the row by that item's bits in a reused undo buffer, marked one
statement late, and a cut between put the previous step's evicted gradient in the row.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mfac_core
from mfac_core import DynamicIHVP, WindowOptions

PACKAGE = str(Path(mfac_core.__file__).parent)


class Cut(BaseException):
    """The interrupt raised by the tracer (a BaseException, as KeyboardInterrupt)."""


def cut_at(line: int) -> Callable[..., Any]:
    """A tracer that raises :class:`Cut` as the package's ``line``-th line runs (from 1)."""
    seen = [0]

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            seen[0] += 1
            if seen[0] == line:
                sys.settrace(None)  # one interrupt: what it raises runs untraced
                raise Cut
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(PACKAGE) else None

    return tracer


def snapshot(op: DynamicIHVP) -> dict[str, Any]:
    """The state, and the warn-once note and counters, which the state does not hold."""
    extra = {k: getattr(op, k, False) for k in ("_warned_hopeless", "refactor_count")}
    return {**op.state_dict(), **extra}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        if isinstance(value, np.ndarray):
            if not np.array_equal(np.asarray(value, np.float64), np.asarray(b[key], np.float64)):
                return False
        elif value != b[key]:
            return False
    return True


def window(dtype: str, zero_init: bool, rng: np.random.Generator) -> DynamicIHVP:
    m, d = 4, 40
    options = WindowOptions(zero_init=zero_init, refactor_every=3)
    op = DynamicIHVP(m, d, damp=0.5, dtype=dtype, options=options)
    G = rng.standard_normal((m + 1, d)).astype(np.float32)
    G[:, 0] = 0  # a coordinate no gradient moves (a frozen weight): first items alike
    for g in G:  # full, and one row edit done
        op.update(g)
    return op


def copied(op: DynamicIHVP) -> DynamicIHVP:
    """A deep copy with the step's scratch too (which copies drop): the undo buffer's
    stale contents are what a step of the window itself finds there."""
    new = copy.deepcopy(op)
    if "_row_scratch" in op.__dict__:
        new.__dict__["_row_scratch"] = copy.deepcopy(op.__dict__["_row_scratch"])
    return new


CALLS: dict[str, Callable[[DynamicIHVP, np.ndarray, dict[str, Any]], Any]] = {
    "update": lambda op, g, state: op.update(g),
    "update_and_matvec": lambda op, g, state: op.update_and_matvec(g),
    "remove": lambda op, g, state: op.remove(op.slots[1]),
    "set_damp": lambda op, g, state: op.set_damp(0.125),
    "reset": lambda op, g, state: op.reset(),
    "load_state_dict": lambda op, g, state: op.load_state_dict(state),
    "load_state_dict damp": lambda op, g, state: op.load_state_dict(state, damp=2.0),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize(
    ("dtype", "zero_init"), [("float32", False), ("float64", True), ("bfloat16", False)]
)
def test_an_interrupt_anywhere_leaves_the_window_as_before_or_after(rng, call, dtype, zero_init):
    op = window(dtype, zero_init, rng)
    other = window(dtype, zero_init, rng)
    other.update(rng.standard_normal(op.dim).astype(np.float32))
    state = other.state_dict()
    g = rng.standard_normal(op.dim).astype(np.float32)
    g[0] = 0
    x = rng.standard_normal(op.dim).astype(np.float32)
    before = snapshot(op)
    done = copy.deepcopy(op)
    CALLS[call](done, g, state)
    after = snapshot(done)
    assert not same(before, after)
    for line in range(1, 100_000):
        cut = copied(op)
        sys.settrace(cut_at(line))
        try:
            CALLS[call](cut, g, state)
        except Cut:
            pass
        else:
            break  # the call ran to its end: every line was cut once
        finally:
            sys.settrace(None)
        now = snapshot(cut)
        assert same(now, before) or same(now, after), f"cut at line {line}"
        # The window's own invariants hold too: its factor is its Gram's.
        want = (done if same(now, after) else op).matvec(x)
        np.testing.assert_array_equal(cut.matvec(x), want)
    assert line > 10  # the tracer did cut the call
