"""Shared pieces of the digits examples: data, model, training, evaluation and output.

The data are scikit-learn's bundled copy of the UCI optical handwritten digits
(1797 8x8 images, 10 classes), which ships inside the ``sklearn`` package:
nothing is downloaded.

Every script writes its figure and a summary (``NAME.md``, the tables it
printed under a header naming the command, the machine, the date and the
library versions, and ``NAME.json``, the same numbers) to ``--out``, by default
``$XDG_CACHE_HOME/mfac_core-examples`` (``~/.cache/mfac_core-examples``), so
that a run never writes into the repository unless asked to.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    # The examples extra does not list torch: pip would pick the multi-GB CUDA build.
    sys.exit(
        "The examples need PyTorch. For the CPU-only build (enough for them), run\n"
        "    pip install torch --index-url https://download.pytorch.org/whl/cpu\n"
        "or see https://pytorch.org/get-started/locally/ for a CUDA build."
    )
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Digits",
    "History",
    "ShuffledBatches",
    "add_output_options",
    "default_out",
    "environment",
    "evaluate",
    "load",
    "make_mlp",
    "markdown_table",
    "train",
    "write_summary",
]


def default_out() -> Path:
    """``$XDG_CACHE_HOME/mfac_core-examples``, else ``~/.cache/mfac_core-examples``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mfac_core-examples"


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--out`` (alias ``--outdir``) and ``--threads``, shared by the scripts."""
    parser.add_argument(
        "--out",
        "--outdir",
        dest="out",
        type=Path,
        default=default_out(),
        help=f"folder for the figure and the summary ({default_out()})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest for these tiny matrices, and deterministic)",
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict[str, Any]:
    """The facts a reader needs to reproduce a run: command, machine, date, versions."""
    import scipy
    import sklearn

    import mfac_core

    return {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical CPUs",
        "torch_threads": threads,
        "python": platform.python_version(),
        "versions": {
            "mfac_core": mfac_core.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "scikit-learn": sklearn.__version__,
        },
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table, columns padded to equal width."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in rows]
    )


def write_summary(
    out: Path, name: str, env: dict[str, Any], sections: list[str], data: dict[str, Any]
) -> Path:
    """Write ``out/NAME.md`` (header and ``sections``) and ``out/NAME.json``; return the .md."""
    out.mkdir(parents=True, exist_ok=True)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    header = (
        f"Written by `{env['command']}` on {env['date_utc']} UTC; {env['machine']}; "
        f"{env['torch_threads']} torch thread(s); Python {env['python']}, {versions}."
    )
    md = out / f"{name}.md"
    md.write_text("\n\n".join([header, *sections]) + "\n", encoding="utf-8")
    (out / f"{name}.json").write_text(
        json.dumps({"environment": env, **data}, indent=1) + "\n", encoding="utf-8"
    )
    return md


@dataclass
class Digits:
    """Train/test tensors of the digits data (pixels scaled to [0, 1])."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled training batches (the last, short batch is dropped)."""
        n = self.X_train.shape[0]
        perm = torch.randperm(n, generator=generator)
        return [
            (self.X_train[perm[i : i + batch_size]], self.y_train[perm[i : i + batch_size]])
            for i in range(0, n - batch_size + 1, batch_size)
        ]


class ShuffledBatches:
    """An endless-epoch data loader: every iteration is a fresh shuffle of the training set.

    Iterating it twice gives different batches (drawn from one generator), so a
    pruner that collects gradients again draws new samples.
    """

    def __init__(self, data: Digits, batch_size: int, seed: int = 0) -> None:
        self.data = data
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(self.data.batches(self.batch_size, self.generator))


def load(seed: int = 0, test_size: float = 0.25) -> Digits:
    """The digits data, split (stratified) into train and test sets."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = data.data.astype(np.float32) / 16.0
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, data.target, test_size=test_size, stratify=data.target, random_state=seed
    )
    return Digits(
        torch.from_numpy(X_tr),
        torch.from_numpy(y_tr).long(),
        torch.from_numpy(X_te),
        torch.from_numpy(y_te).long(),
    )


def make_mlp(seed: int = 0, hidden: int = 128) -> nn.Module:
    """The 64-``hidden``-10 ReLU MLP, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(X, y)``."""
    out = model(X)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


@dataclass
class History:
    """Per-epoch metrics; index 0 is before training."""

    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, model: nn.Module, data: Digits) -> None:
        self.train_loss.append(evaluate(model, data.X_train, data.y_train)[0])
        loss, acc = evaluate(model, data.X_test, data.y_test)
        self.test_loss.append(loss)
        self.test_acc.append(acc)

    @property
    def diverged(self) -> bool:
        return not all(math.isfinite(v) for v in self.train_loss)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Digits,
    *,
    epochs: int,
    batch_size: int = 32,
    seed: int = 0,
    after_step: Callable[[], None] | None = None,
) -> History:
    """Train with ``opt`` for ``epochs`` epochs; the batch order depends only on ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    hist = History()
    hist.record(model, data)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in data.batches(batch_size, gen):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
        model.eval()
        hist.record(model, data)
        if hist.diverged:
            break
    hist.seconds = time.perf_counter() - start
    return hist


#: examples/README.md quotes each summary between these two lines, verbatim.
QUOTE_BEGIN = "<!-- begin {} (written by the script; `python examples/_common.py` copies it) -->"
QUOTE_END = "<!-- end {} -->"


def sync_readme(readme: Path, results: Path) -> list[str]:
    """Replace each quoted block of ``readme`` with the current ``results/NAME.md``.

    Returns the names of the blocks that changed.
    """
    import re

    text = readme.read_text(encoding="utf-8")
    changed = []

    def quote(match: re.Match[str]) -> str:
        name = match.group(1)
        body = (results / name).read_text(encoding="utf-8")
        if match.group(2) != body:
            changed.append(name)
        return QUOTE_BEGIN.format(name) + "\n" + body + QUOTE_END.format(name)

    pattern = (
        re.escape(QUOTE_BEGIN).replace(r"\{\}", r"(\S+)")
        + r"\n(.*?)"
        + re.escape(QUOTE_END).replace(r"\{\}", r"\1")
    )
    readme.write_text(re.sub(pattern, quote, text, flags=re.S), encoding="utf-8")
    return changed


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    print("updated:", ", ".join(sync_readme(here / "README.md", here / "results")) or "nothing")
