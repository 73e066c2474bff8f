"""The operators inside functions compiled by torch.compile: eager calls, results bit for bit."""

from __future__ import annotations

import inspect
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mfac_core  # noqa: E402

D = 96


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        # Dynamo's own notes on what it traces (lru_cache wrappers, graph breaks).
        warnings.simplefilter("ignore", UserWarning)
        yield
    torch._dynamo.reset()


def compiled(fn, **kw):
    return torch.compile(fn, backend=kw.pop("backend", "eager"), **kw)


def gradients(m=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # A shared mean direction: the products near the gradients' span are the hard ones.
    return (torch.randn(m, D, generator=g) + 3 * torch.randn(1, D, generator=g)).to(dtype)


def vector(seed=1, dtype=torch.float32):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def operators():
    G = gradients()
    return {
        "static": mfac_core.StaticIHVP(G, damp=1e-2),
        "block-wise": mfac_core.StaticIHVP(G, damp=1e-2, block_size=32),
        "fisher": mfac_core.EmpiricalFisher(G, damp=1e-2),
        "spectral": mfac_core.SpectralIHVP(G, damp=1e-2),
        "window": mfac_core.DynamicIHVP.from_window(G, damp=1e-2),
        "float64": mfac_core.StaticIHVP(G.double(), damp=1e-2),
    }


CALLS = {
    "matvec": lambda A, v: A.matvec(torch.cos(v)) * 2,
    "@": lambda A, v: torch.sin(A @ torch.cos(v)),
    "x @ A": lambda A, v: (torch.cos(v) @ A) + 1,
    "call": lambda A, v: A(v * 3) - v,
    "matmat": lambda A, v: A.matmat(torch.stack((v, 2 * v, v + 1), 1)).sum(1),
    "rmatmat": lambda A, v: A.rmatmat(torch.stack((v, -v), 1))[:, 0],
    "composite": lambda A, v: ((2 * A + A) @ v) - (A.T @ A) @ v,
    "todense": lambda A, v: A.todense() @ v,
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("kind", sorted(operators()))
def test_products_inside_a_compiled_function_equal_the_eager_ones(kind, call):
    A, fn, x = operators()[kind], CALLS[call], vector(dtype=torch.float64)
    x = x.to(A.dtype)
    torch.testing.assert_close(compiled(fn)(A, x), fn(A, x), rtol=0, atol=0)


def test_queries_inside_a_compiled_function_equal_the_eager_ones():
    G, x = gradients(), vector()
    S, P = mfac_core.StaticIHVP(G, damp=1e-2), mfac_core.SpectralIHVP(G, damp=1e-2)
    rows, cols = torch.tensor([0, 5, 7]), torch.tensor([0, 9, 7])

    def queries(v):
        out = S.diagonal() * v + S.entries(rows, cols).sum()
        out = out + P.sweep(v, damps=[1e-2, 1.0]).sum(0) + P.diagonal() + P.logdet()
        out = out + (P.with_damp(0.5).sqrt() @ v) + (P.inverse() @ v) + P.trace()
        return out + P.quadratic(torch.stack((v, v))).sum()

    torch.testing.assert_close(compiled(queries)(x), queries(x), rtol=0, atol=0)


def test_operators_built_inside_a_compiled_function_equal_the_eager_ones():
    G, x = gradients(), vector()

    def built(v):
        S = mfac_core.StaticIHVP(G, damp=1e-2)
        F = mfac_core.EmpiricalFisher(G, damp=1e-2, block_size=48)
        P = mfac_core.SpectralIHVP(G, damp=1e-2)
        W = mfac_core.DynamicIHVP.from_window(G, damp=1e-2)
        R = mfac_core.StaticIHVP.from_gradients(
            list(G), num_grads=6, dim=D, damp=1e-2, grads_out=torch.empty(6, D)
        )
        return S @ v + F @ v + P @ v + W @ v + R @ v

    torch.testing.assert_close(compiled(built)(x), built(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_loop_over_a_window_equals_the_eager_one(backend):
    def make():
        return mfac_core.DynamicIHVP(4, D, damp=1e-2, dtype=torch.float32, xp=torch)

    def step(W, g, k):
        W.update(g)
        if k == 5:
            W.set_damp(2e-2)
        if k == 7:
            W.remove_oldest()
        return (W @ g) * 0.5 + W.update_and_matvec(torch.cos(g))

    eager, traced = make(), make()
    fn = compiled(step, backend=backend)
    for k in range(9):
        g = vector(seed=10 + k)
        torch.testing.assert_close(fn(traced, g, k), step(eager, g, k), rtol=0, atol=0)
    assert traced.slots == eager.slots
    torch.testing.assert_close(traced.window(), eager.window(), rtol=0, atol=0)
    state = traced.state_dict()
    fresh = make()
    compiled(lambda W, s: W.load_state_dict(s, damp=2e-2))(fresh, state)
    torch.testing.assert_close(fresh @ vector(), eager @ vector(), rtol=0, atol=0)


def test_gradients_flow_through_a_compiled_product():
    S, x = mfac_core.StaticIHVP(gradients(dtype=torch.float64), damp=1e-2), vector()
    x64 = x.double().requires_grad_(True)
    y64 = x.double().requires_grad_(True)
    compiled(lambda v: (torch.sin(S @ v) ** 2).sum(), backend="aot_eager")(x64).backward()
    (torch.sin(S @ y64) ** 2).sum().backward()
    torch.testing.assert_close(x64.grad, y64.grad, rtol=0, atol=0)


def test_a_numpy_operator_inside_a_compiled_function_runs_as_eagerly():
    G = gradients().numpy()
    S, x = mfac_core.StaticIHVP(G, damp=1e-2), vector().numpy()

    def fn(v):
        return S @ (v * 2) + S.diagonal()

    out = compiled(fn)(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, fn(x))


def count_compiled_ops(fn, *args):
    """How many operations of ``fn`` TorchDynamo put into graphs (the rest ran eagerly)."""
    ops = []

    def backend(gm, example_inputs):
        ops.extend(n for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch.compile(fn, backend=backend)(*args)
    return len(ops)


@pytest.mark.parametrize(
    "apply",
    [
        lambda A, v: A(v),
        lambda A, v: A.matvec(v),
        lambda A, v: A.rmatvec(v),
        lambda A, v: A.dot(v),
        lambda A, v: A.T(v),
        lambda A, v: A.matmat(v[:, None])[:, 0],
    ],
    ids=["A(x)", "matvec", "rmatvec", "dot", "A.T(x)", "matmat"],
)
def test_the_code_around_a_called_operator_compiles(apply):
    # The forms docs/torch.rst recommends: Dynamo resumes after the call, so both the
    # code before it and the code after it are in graphs (4 operations, cos * sin +).
    S, x = mfac_core.StaticIHVP(gradients(), damp=1e-2), vector()
    assert count_compiled_ops(lambda v: torch.sin(apply(S, torch.cos(v) * 2)) + 1, x) >= 4


def test_a_product_is_one_graph_break_and_fullgraph_says_why():
    S, x = mfac_core.StaticIHVP(gradients(), damp=1e-2), vector()
    with pytest.raises(torch._dynamo.exc.Unsupported):  # whether or not it was called before
        compiled(lambda v: S.diagonal() * v, fullgraph=True)(x)
    torch._dynamo.reset()
    S.matvec(x)  # the excluded call exists: the first trace has no extra break

    def around(v):
        v = torch.cos(v) * 2
        return torch.sin(S.matvec(v)) + 1

    explained = torch._dynamo.explain(around)(x)
    assert (explained.graph_count, explained.graph_break_count) == (2, 1)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"operators run eagerly under") as info:
        compiled(around, fullgraph=True)(x)
    assert "LinearOperator.matvec" in str(info.value)  # the call, by its name


def test_a_failed_call_inside_a_compiled_function_raises_the_eager_error():
    S = mfac_core.StaticIHVP(gradients(), damp=1e-2)
    x = vector()
    x[3] = float("nan")
    with pytest.raises(ValueError, match=r"x\[3\] is nan"):
        compiled(lambda v: S @ (v + 0))(x)
    W = mfac_core.DynamicIHVP(3, D, damp=1e-2, dtype=torch.float32, xp=torch)
    with pytest.raises(ValueError, match="must have shape"):
        compiled(lambda g: W.update(g))(torch.ones(D + 1))
    assert W.slots == []


def test_calls_in_other_threads_do_not_see_a_compiled_call_as_their_own():
    # The marker that a call runs inside an excluded one is per thread: a product in
    # another thread, inside a compiled function, is still excluded from tracing.
    S, x = mfac_core.StaticIHVP(gradients(), damp=1e-2), vector()
    want = torch.sin(S @ x)
    results = []

    def worker():
        results.append(compiled(lambda v: torch.sin(S @ v))(x))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    S.diagonal()  # meanwhile, an eager call on this thread
    for t in threads:
        t.join()
    assert len(results) == 2
    for r in results:
        torch.testing.assert_close(r, want, rtol=0, atol=0)


# Calls that only compose operators (no array is read or written), and x @ A, which hands
# x to rmatvec or rmatmat (excluded, Dynamo resumes after them in a helper): traced.
COMPOSING = {"adjoint", "transpose", "to_scipy", "__rmatmul__"}


@pytest.mark.parametrize(
    "cls",
    [
        mfac_core.LinearOperator,
        mfac_core.StaticIHVP,
        mfac_core.EmpiricalFisher,
        mfac_core.SpectralIHVP,
        mfac_core.DynamicIHVP,
        mfac_core.ShardedStaticIHVP,
        mfac_core.ShardedDynamicIHVP,
        mfac_core.DaskStaticIHVP,
    ],
    ids=lambda c: c.__name__,
)
def test_every_public_call_that_reads_arrays_runs_eagerly_under_torch_compile(cls):
    missing = []
    dunders = {"__init__", "__matmul__", "__rmatmul__", "__call__"}
    for name in dir(cls):
        if (name.startswith("_") and name not in dunders) or name in COMPOSING:
            continue
        member = inspect.getattr_static(cls, name)
        fn = getattr(member, "__func__", member)
        if not callable(fn) or isinstance(member, property):
            continue
        if name == "__init__" and cls is mfac_core.LinearOperator:
            continue  # the base class holds only shape, dtype and namespace
        if not getattr(fn, "eager_under_torch_compile", False):
            missing.append(name)
    assert missing == []


def test_pytorch_before_2_3_without_torch_compiler_is_compiling(monkeypatch):
    # torch.compiler.is_compiling came with PyTorch 2.3 (pyproject allows 2.1): every call
    # once torch._dynamo was imported raised AttributeError, MFAC's step too (where
    # torch.compile had been called).
    from mfac_core.torch import MFAC

    # As there: torch._dynamo's own is_compiling (here torch.compiler's, which it calls).
    monkeypatch.setattr(torch._dynamo, "is_compiling", torch.compiler.is_compiling)
    monkeypatch.delattr(torch.compiler, "is_compiling")
    # Eager calls only: this PyTorch's compiler itself needs torch.compiler.is_compiling.
    S, x = mfac_core.StaticIHVP(gradients(), damp=1e-2), vector()
    torch.testing.assert_close(S(x), S.matmat(x[:, None])[:, 0], rtol=0, atol=0)
    p = torch.nn.Parameter(torch.ones(3))
    opt = MFAC([p], lr=0.1, num_grads=2, damp=1e-2)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    assert opt.steps == 1 and not torch.equal(p.detach(), torch.ones(3))


def test_a_subclass_of_mfac_keeps_its_own_step_eagerly_and_compiled():
    from mfac_core.torch import MFAC

    # The subclass's own _step runs (it was skipped under torch.compile, where MFAC's own
    # step ran in its place); its call of MFAC's _step is excluded from tracing.
    calls = []

    class Logged(MFAC):
        def _step(self):
            calls.append(self.steps)
            super()._step()

    p = torch.nn.Parameter(torch.ones(3))
    opt = Logged([p], lr=0.1, num_grads=2, damp=1e-2)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    compiled(lambda: opt.step())()
    assert calls == [0, 1] and opt.steps == 2
