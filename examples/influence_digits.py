"""Which training digits most help or hurt one test prediction: influence via ``bilinear``.

Trains the 64-128-10 MLP of ``train_digits.py`` (Adam, 10 epochs), takes the
per-example gradients of the training loss (the rows of G, all n = 1347
training images, d = 9610 parameters) and the damped empirical Fisher
``F = damp I + G^T G / n`` as the curvature. The influence of up-weighting
training image j on the loss of one test image (Koh & Liang, 2017) is

    I_j = - g_test^T F^{-1} g_j ,

so the images with the most negative ``I_j`` help that prediction most and
those with the most positive hurt it. All n values are one call of
:meth:`mfac_core.SpectralIHVP.bilinear` (no d x d matrix, R streamed in
batches). The script checks the same computation for the last layer alone
(d = 1290) against a dense float64 inverse, and writes ``influence_digits.png``
(the test image, its 6 most helpful and 6 most harmful training images) to
``--out``, by default ``~/.cache/mfac_core-examples`` as for the other examples. Usage::

    python examples/influence_digits.py [--test-index 0] [--rel-damp 1e-3] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_output_options, evaluate, load, make_mlp, train

from mfac_core import SpectralIHVP


def per_example_grads(
    model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, names: list[str] | None = None
) -> torch.Tensor:
    """The gradients of each example's loss, flattened to rows (over ``names`` only)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params) if names is None else names

    def loss(p: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**params, **p}, (x[None],))
        return F.cross_entropy(out, t[None])

    sub = {k: params[k] for k in names}
    g = vmap(grad(loss), in_dims=(None, 0, 0))(sub, X, y)
    return torch.cat([g[k].reshape(X.shape[0], -1) for k in names], dim=1)


def influences(
    G: torch.Tensor, g_test: torch.Tensor, rel_damp: float
) -> tuple[np.ndarray, float, float]:
    """``-g_test^T F^{-1} g_j`` for every row j of G, the damping and kappa of F."""
    # The damping relative to the average diagonal of G^T G / n, so that it means the same
    # for every layer and scale of the gradients.
    damp = rel_damp * float((G**2).sum()) / (G.shape[0] * G.shape[1])
    op = SpectralIHVP(G, damp=damp)
    return -op.bilinear(g_test[None, :], G)[0].numpy(), damp, op.kappa


def dense_check(G: torch.Tensor, g_test: torch.Tensor, damp: float, got: np.ndarray) -> float:
    """Relative error of the influences against a dense float64 solve with F."""
    G64 = G.double().numpy()
    n, d = G64.shape
    Fd = damp * np.eye(d) + G64.T @ G64 / n
    want = -(G64 @ np.linalg.solve(Fd, g_test.double().numpy()))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def plot(data: object, test_index: int, infl: np.ndarray, path: Path, k: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    helpful, harmful = np.argsort(infl)[:k], np.argsort(infl)[::-1][:k]
    fig, axes = plt.subplots(3, k, figsize=(1.6 * k, 5.2))
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(data.X_test[test_index].reshape(8, 8), cmap="gray_r")
    axes[0, 0].set_title(f"test, label {int(data.y_test[test_index])}", fontsize=8)
    for row, idx, what in ((1, helpful, "helps"), (2, harmful, "hurts")):
        for col, j in enumerate(idx):
            axes[row, col].imshow(data.X_train[j].reshape(8, 8), cmap="gray_r")
            axes[row, col].set_title(f"{what}: {int(data.y_train[j])}\nI={infl[j]:.2g}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-index", type=int, default=0)
    parser.add_argument("--rel-damp", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=10)
    add_output_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load()
    model = make_mlp()
    train(model, torch.optim.Adam(model.parameters(), lr=0.01), data, epochs=args.epochs)
    model.eval()
    loss, acc = evaluate(model, data.X_test, data.y_test)
    print(f"trained: test loss {loss:.3f}, accuracy {acc:.3f}")

    i = args.test_index
    x_t, y_t = data.X_test[i : i + 1], data.y_test[i : i + 1]
    pred = int(model(x_t).argmax())
    start = time.perf_counter()
    # float64: the rows of G are the gradients themselves, the direction in which a product
    # loses eps * kappa, and kappa is large here (printed).
    G = per_example_grads(model, data.X_train, data.y_train).double()
    g_test = per_example_grads(model, x_t, y_t)[0].double()
    infl, damp, kappa = influences(G, g_test, args.rel_damp)
    print(
        f"test image {i}: label {int(y_t)}, predicted {pred}; G is {tuple(G.shape)} "
        f"(float64), damp {damp:.3g}, kappa {kappa:.3g}; influences of all {G.shape[0]} "
        f"training images in {time.perf_counter() - start:.2f} s"
    )
    order = np.argsort(infl)
    print(
        "most helpful (index, label, influence):",
        [(int(j), int(data.y_train[j]), f"{infl[j]:.3g}") for j in order[:6]],
    )
    print(
        "most harmful (index, label, influence):",
        [(int(j), int(data.y_train[j]), f"{infl[j]:.3g}") for j in order[::-1][:6]],
    )

    # The same on the last layer alone, where a dense d x d inverse is cheap.
    names = ["2.weight", "2.bias"]
    G2 = per_example_grads(model, data.X_train, data.y_train, names).double()
    g2 = per_example_grads(model, x_t, y_t, names)[0].double()
    infl2, damp2, kappa2 = influences(G2, g2, args.rel_damp)
    err = dense_check(G2, g2, damp2, infl2)
    print(
        f"last layer (d={G2.shape[1]}, kappa {kappa2:.3g}): relative error of bilinear against "
        f"a dense float64 solve: {err:.2e}"
    )
    # Both sides are float64 computations with errors of about eps * kappa.
    assert err < 1e3 * np.finfo(np.float64).eps * kappa2, err

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "influence_digits.png"
    plot(data, i, infl, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
