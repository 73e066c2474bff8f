"""mfac_core.jax: pytree operators, the functional window and the optax optimizer.

JAX's 64-bit mode: every test of this module runs inside ``jax.enable_x64(True)``,
a thread-local context entered by a module-scoped fixture and left when the module
ends, so the process-wide setting that other tests see never changes. Tests of the
mode being off open ``jax.enable_x64(False)`` inside. The docstring examples, which
show users ``jax.config.update("jax_enable_x64", True)``, run in a child process.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import logging
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import mfac_core  # noqa: E402
from mfac_core import DynamicIHVP, FactorizationError, IllConditionedWarning, WindowOptions  # noqa: E402
from mfac_core import jax as mj  # noqa: E402
from mfac_core.testing import (  # noqa: E402
    SpectralOracle,
    assert_close,
    dense_inverse,
    extended_precision_inverse,
    problems,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the mfac_core under test was imported from: children import the same copy.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(mfac_core.__file__)))


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def woodbury_kappa(G: np.ndarray, damp: float) -> float:
    """The error scale of the Woodbury form, ``1 + ||G||_2^2 / (m damp)``.

    mfac_core.jax always uses the low-rank form, so even when d < m its rounding
    scales with this, not with the smaller cond(F) (as in test_dynamic.py).
    """
    G = np.asarray(G, dtype=np.float64)
    return 1.0 + float(np.linalg.norm(G, 2)) ** 2 / (G.shape[0] * damp)


def gaussian(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    """Values exactly representable in ``dtype``, as float64 (so oracles see the same data)."""
    return (scale * rng.standard_normal(shape)).astype(dtype).astype(np.float64)


# -- packaging ---------------------------------------------------------------------------------


def test_import_mfac_core_does_not_import_jax():
    code = (
        "import sys, mfac_core; assert 'jax' not in sys.modules and 'optax' not in "
        "sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
    )
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def doc_examples() -> tuple[dict[str, list[int]], str]:
    """The Examples of mfac_core.jax's docstrings, then the optax session of docs/jax.rst,
    run in one child (they switch the 64-bit mode on process-wide, each at its start; one
    child imports JAX once for both): per source ``[failed, attempted]``, and the output.
    """
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    code = (
        "import doctest, json, sys, mfac_core.jax as m; "
        f"r = doctest.testmod(m, optionflags={flags}); "
        "f = doctest.testfile(sys.argv[1], module_relative=False, "
        f"optionflags={flags}); "
        "print(json.dumps({'module': list(r), 'docs': list(f)}))"
    )
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
    path = os.path.join(ROOT, "docs", "jax.rst")
    proc = subprocess.run(
        [sys.executable, "-c", code, path], env=env, cwd=ROOT, capture_output=True, text=True
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return json.loads(proc.stdout.splitlines()[-1]), output


def test_docstring_examples(doc_examples):
    """The Examples run in a child: they switch the 64-bit mode on process-wide."""
    results, output = doc_examples
    failed, attempted = results["module"]
    assert failed == 0 and attempted >= 10, output


def test_docs_jax_rst_examples_run_and_install_line_works(doc_examples):
    """The optax session of docs/jax.rst runs (in a child: it turns the 64-bit mode on),
    and the install line is the one that works from a checkout (not on PyPI)."""
    results, output = doc_examples
    failed, attempted = results["docs"]
    assert failed == 0 and attempted >= 25, output
    for name in ("jax.rst", "api.rst"):
        with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
            text = f.read()
        assert 'pip install ".[jax]"' in text and "mfac_core[jax]" not in text, name


# -- the static operator -------------------------------------------------------------------------


#: The shapes (m, d) of the drawn problems: m = 1, d = 1, d < m, d > m and the largest of
#: each. JAX compiles the set-up and passes once per shape, so shapes that repeat let the
#: examples (random values, gradient kinds, dampings) reuse the programs.
ORACLE_SHAPES = ((3, 17), (1, 1), (8, 3), (1, 24), (8, 24))


@settings(max_examples=15)
@given(data=st.data())
def test_static_matches_dense_oracle(dtype, data):
    p = data.draw(problems(dtype=dtype, shapes=ORACLE_SHAPES, block_sizes=False), label="problem")
    G, x = jnp.asarray(p.G, dtype=dtype), jnp.asarray(p.x, dtype=dtype)
    op = mj.static_ihvp(G, damp=p.damp)
    assert op.shape == (p.d, p.d) and op.dtype == jnp.dtype(dtype)
    oracle = SpectralOracle(p.G, p.damp)
    kappa = woodbury_kappa(p.G, p.damp)
    y = op.matvec(x)
    assert y.dtype == jnp.dtype(dtype)
    assert_close(y, oracle.matvec(p.x), kappa=kappa, err_msg=repr(p))
    X = np.stack([p.x, p.G[0], np.ones(p.d)], axis=1)
    assert_close(
        op.matmat(jnp.asarray(X, dtype=dtype)),
        oracle.matmat(X.astype(dtype)),
        kappa=kappa,
        err_msg=repr(p),
    )
    # Each diagonal entry 1/damp - sum_i W_ij^2 / damp cancels like a product does.
    assert_close(op.diagonal(), oracle.diagonal(), kappa=kappa, err_msg=repr(p))
    assert float(op.kappa_bound) >= p.kappa * (1 - 1e-12)


def test_static_under_jit_and_as_a_pytree(dtype, rng):
    m, d, damp = 6, 40, 0.05
    G = gaussian(rng, (m, d), dtype)
    x = gaussian(rng, d, dtype)
    build = jax.jit(mj.static_ihvp, static_argnames="damp")
    op = build(jnp.asarray(G, dtype=dtype), damp=damp)
    leaves, treedef = jax.tree_util.tree_flatten(op)
    assert len(leaves) == 3 and op.damp == damp  # G, U, kappa_bound
    assert jax.tree_util.tree_unflatten(treedef, leaves).damp == damp
    y = jax.jit(lambda op, x: op @ x)(op, jnp.asarray(x, dtype=dtype))
    assert_close(y, dense_inverse(G, damp) @ x, kappa=woodbury_kappa(G, damp))
    eager = mj.static_ihvp(jnp.asarray(G, dtype=dtype), damp=damp).matvec(
        jnp.asarray(x, dtype=dtype)
    )
    assert_close(y, eager, kappa=woodbury_kappa(G, damp))


def test_static_compiles_once_per_shape_not_once_per_damping(rng):
    """A damping sweep on one G reuses the compiled set-up and passes: the damping is an
    argument of the programs, not part of their key (a static one compiled them anew)."""
    G = jnp.asarray(gaussian(rng, (7, 29), "float64"))  # a shape no other test here uses
    x, X = jnp.ones(29), jnp.ones((29, 2))

    def products(damp: float) -> None:
        op = mj.static_ihvp(G, damp=damp)
        jax.block_until_ready((op.matvec(x), op.matmat(X), op.diagonal()))

    compiled = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Compiling "):
                compiled.append(record.getMessage())

    handler = Record(logging.WARNING)
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            products(0.1)
            # The first damping compiles for this shape (and shows that the log is read).
            assert compiled, "no compilation logged for a new shape"
            compiled.clear()
            for damp in (0.25, 3.0, 1e-3):
                products(damp)
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert compiled == []


def test_static_vmap_over_vectors_operators_and_blocks(rng):
    m, d, damp, B = 5, 36, 0.1, 12
    G = gaussian(rng, (m, d), "float64")
    X = rng.standard_normal((4, d))
    op = mj.static_ihvp(jnp.asarray(G), damp=damp)
    Y = jax.vmap(op.matvec)(jnp.asarray(X))
    assert_close(Y, (dense_inverse(G, damp) @ X.T).T, kappa=woodbury_kappa(G, damp))
    # A batch of operators: one per block of B coordinates gives the block-diagonal F.
    Gb = jnp.asarray(G).reshape(m, d // B, B).transpose(1, 0, 2)
    ops = jax.vmap(lambda g: mj.static_ihvp(g, damp=damp))(Gb)
    assert ops.G.shape == (d // B, m, B) and ops.U.shape == (d // B, m, m)
    assert ops.kappa_bound.shape == (d // B,)
    yb = jax.vmap(lambda o, v: o.matvec(v))(ops, jnp.asarray(X[0]).reshape(d // B, B))
    want = dense_inverse(G, damp, block_size=B) @ X[0]
    kappa = max(woodbury_kappa(G[:, i : i + B], damp) for i in range(0, d, B))
    assert_close(yb.reshape(d), want, kappa=kappa)
    diag = jax.vmap(lambda o: o.diagonal())(ops).reshape(d)
    with pytest.raises(ValueError, match=r"under jax\.vmap"):
        ops.diagonal()
    assert_close(diag, np.diag(dense_inverse(G, damp, block_size=B)), kappa=kappa)
    with pytest.raises(ValueError, match=r"under jax\.vmap"):
        ops.matvec(jnp.asarray(X[0]))


def test_static_grad_through_matvec(rng):
    """Gradients with respect to x and, through the set-up, to G, against closed forms."""
    m, d, damp = 4, 15, 0.2
    G, x, v = rng.standard_normal((m, d)), rng.standard_normal(d), rng.standard_normal(d)
    Finv = dense_inverse(G, damp)
    kappa = woodbury_kappa(G, damp)

    def f(G, x):
        return jnp.vdot(jnp.asarray(v), mj.static_ihvp(G, damp=damp).matvec(x))

    gG, gx = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(G), jnp.asarray(x))
    # f = v^T F^{-1} x: df/dx = F^{-1} v (F symmetric) and, with a = F^{-1} v and
    # c = F^{-1} x, df/dG = -(G c a^T + G a c^T) / m since dF = (dG^T G + G^T dG) / m.
    a, c = Finv @ v, Finv @ x
    assert_close(gx, a, kappa=kappa)
    # a and c each carry a relative error of eps kappa, as products do.
    assert_close(gG, -(np.outer(G @ c, a) + np.outer(G @ a, c)) / m, kappa=kappa)


def test_static_products_need_x64(rng):
    """The passes sum in float64: with the 64-bit mode off, products refuse to run (JAX
    would silently truncate their float64 sums to float32)."""
    G, x = gaussian(rng, (6, 30), "float32"), gaussian(rng, 30, "float32")
    op = mj.static_ihvp(jnp.asarray(G, jnp.float32), damp=0.1)
    with jax.enable_x64(False):
        for call in (op.matvec, op.matmat, lambda v: op.diagonal()):
            with pytest.raises(RuntimeError, match="jax_enable_x64"):
                call(jnp.asarray(x, jnp.float32))
    y = jax.jit(lambda op, x: op.matvec(x))(op, jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.float32
    assert_close(y, dense_inverse(G, 0.1) @ x, kappa=woodbury_kappa(G, 0.1))


def test_static_refuses_bad_input(rng):
    G = jnp.asarray(rng.standard_normal((3, 7)))
    for damp, exc in (
        (0.0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
    ):
        with pytest.raises(exc, match="damp"):
            mj.static_ihvp(G, damp=damp)
    # A concrete 0-d array is one number (the static damping is its Python float); a
    # traced one has no value to be static with.
    assert mj.static_ihvp(G, damp=jnp.float64(0.1)).damp == 0.1
    # Any transformation traces it: the message names none of them alone (it said
    # "jitted function" under vmap and grad too).
    traced = r"damp must be static: a concrete Python or NumPy scalar .* not a value traced"
    traced += r" by a JAX transformation \(jit, vmap, grad, \.\.\.\), got a traced value"

    def kappa(damp):
        return mj.static_ihvp(G, damp=damp).kappa_bound

    for transformed, damp in ((jax.jit, 0.1), (jax.vmap, jnp.asarray([0.1, 0.2])), (jax.grad, 0.1)):
        with pytest.raises(TypeError, match=traced):
            transformed(kappa)(damp)
    for bad in (G[0], jnp.zeros((0, 3)), jnp.zeros((2, 3, 4))):
        with pytest.raises(ValueError, match="2-D"):
            mj.static_ihvp(bad, damp=1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        mj.static_ihvp(jnp.ones((2, 3), jnp.int32), damp=1.0)
    op = mj.static_ihvp(G, damp=1.0)
    with pytest.raises(TypeError, match="cast it explicitly"):
        op.matvec(jnp.ones(7, jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(d,\)"):
        op.matvec(jnp.ones(6))
    with pytest.raises(FactorizationError, match="damp=1e-300"):
        mj.static_ihvp(G.at[0, 0].set(jnp.nan), damp=1e-300)
    with pytest.warns(IllConditionedWarning, match="float64"):
        mj.static_ihvp(jnp.asarray(rng.standard_normal((3, 7)), jnp.float32), damp=1e-18)


def test_static_zero_sum_gradients_warn_and_stay_exact(rng):
    # [g, -g]: the all-ones vector lies in the Gram's null space, so a lambda_max estimate
    # started there is 0 and nothing warns; the core's start (the largest diagonal entry)
    # cannot vanish. And the float64 passes keep the product within float32's rounding
    # where float32 passes were off by 87x at kappa = 1e7.
    g = rng.standard_normal(50)
    G = np.stack([g, -g]).astype(np.float32)
    G64 = G.astype(np.float64)
    top = float(np.linalg.norm(G64, 2) ** 2 / 2)
    with pytest.warns(IllConditionedWarning, match="float64"):
        mj.static_ihvp(jnp.asarray(G), damp=top / 5e15)
    damp = top / (1e7 - 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = mj.static_ihvp(jnp.asarray(G), damp=damp)
    x = G64[0].astype(np.float32)
    want = extended_precision_inverse(G64, damp, x.astype(np.float64))
    y = np.asarray(op.matvec(jnp.asarray(x)), np.float64)
    assert np.linalg.norm(y - want) <= 8 * np.finfo(np.float32).eps * np.linalg.norm(want)


def test_static_names_the_first_non_finite_entry_as_the_core_does(rng):
    # The refusal said "NaN or infinity, or so large that their squared norms overflow"
    # without the entry that mfac_core.StaticIHVP(check_finite=False) names.
    G = rng.standard_normal((3, 7))
    G[2, 0], G[1, 4] = np.inf, np.nan
    huge = G.copy()
    huge[2, 0] = huge[1, 4] = 1e300
    for bad, want in ((G, "G[1, 4] is nan"), (huge, "squared norms overflow")):
        with pytest.raises(FactorizationError, match=re.escape(want)) as ours:
            mj.static_ihvp(jnp.asarray(bad), damp=0.1)
        with pytest.raises(FactorizationError) as core:
            mfac_core.StaticIHVP(bad, damp=0.1, check_finite=False)
        assert str(ours.value) == str(core.value)


def test_static_overflowing_kappa_of_a_finite_gram_is_worded_as_the_core_words_it():
    # Finite gradients (squared norms 3e9), duplicated, and the smallest normal damping:
    # only kappa overflows. The refusal said "the gradients are finite, but so large that
    # their squared norms overflow float64".
    G = np.full((3, 7), 2e4)
    damp = float(np.finfo(np.float64).tiny)
    with pytest.raises(FactorizationError) as ours:
        mj.static_ihvp(jnp.asarray(G), damp=damp)
    with pytest.raises(FactorizationError) as core:
        mfac_core.StaticIHVP(G, damp=damp)
    assert str(ours.value) == str(core.value)
    assert "not numerically positive definite" in str(ours.value)
    assert "overflow" not in str(ours.value)


def test_static_failures_are_worded_as_the_core_words_them(rng):
    """A failed factorisation, the ill-conditioned warning and the 64-bit mode are worded
    by the core's helpers (one wording, so a fix lands once); the warning names the
    caller's line."""
    g = rng.standard_normal(20)
    G = np.stack([g, g, 2 * g])
    with pytest.raises(FactorizationError) as ours:
        mj.static_ihvp(jnp.asarray(G), damp=1e-40)
    with pytest.raises(FactorizationError) as core:
        mfac_core.StaticIHVP(G, damp=1e-40)
    assert str(ours.value) == str(core.value)
    G32 = rng.standard_normal((3, 7)).astype(np.float32)
    with pytest.warns(IllConditionedWarning) as ours_w:
        mj.static_ihvp(jnp.asarray(G32), damp=1e-18)
    with pytest.warns(IllConditionedWarning) as core_w:
        mfac_core.StaticIHVP(G32, damp=1e-18)
    assert [str(w.message) for w in ours_w] == [str(w.message) for w in core_w]
    assert ours_w[0].filename == __file__
    with jax.enable_x64(False):
        with pytest.raises(RuntimeError) as ours:
            mj.static_ihvp(jnp.asarray(G32), damp=1.0)
        with pytest.raises(RuntimeError) as core:
            mfac_core.StaticIHVP(jnp.asarray(G32), damp=1.0)
    assert str(ours.value).startswith("mfac_core.jax.static_ihvp does ")
    assert str(ours.value).split(" does ", 1)[1] == str(core.value).split(" does ", 1)[1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_core_refusals_of_jax_2_byte_gradients_name_numpy_asarray(rng, dtype):
    # The core operators keep JAX's 2-byte gradients as NumPy arrays (np.asarray, no copy
    # on the CPU). Given as JAX arrays, the refusal said only "float16/bfloat16 storage
    # where the library has it, got bfloat16", which JAX has; the window's said "dtype must
    # be ... bfloat16 ..., got dtype(bfloat16)".
    from mfac_core.pruning import prune

    G = jnp.asarray(rng.standard_normal((3, 8)), dtype=dtype)
    for build in (
        lambda: mfac_core.StaticIHVP(G, damp=0.1),
        lambda: mfac_core.EmpiricalFisher(G, damp=0.1),
        lambda: prune(jnp.ones(8, jnp.float32), G, sparsity=0.5),
    ):
        with pytest.raises(TypeError, match=re.escape("numpy.asarray(G)")):
            build()
    with pytest.raises(TypeError, match=re.escape("from_window(numpy.asarray(G))")):
        DynamicIHVP.from_window(G, damp=0.1)
    assert mfac_core.StaticIHVP(np.asarray(G), damp=0.1).storage_dtype == dtype
    # from_gradients of JAX gradients: its store cannot be a JAX array (immutable), so the
    # advice is numpy.asarray, not "grads_out, an array of their library".
    build = mfac_core.StaticIHVP.from_gradients
    with pytest.raises(TypeError, match=r"jax arrays.*convert each with numpy\.asarray"):
        build(iter(G), num_grads=3, dim=8, damp=0.1)
    op = build((np.asarray(g) for g in G), num_grads=3, dim=8, damp=0.1)
    assert op.storage_dtype == dtype


# -- 64-bit mode off -----------------------------------------------------------------------------


def test_x64_off_is_refused_with_a_clear_error_and_no_truncation(rng):
    G = rng.standard_normal((3, 9)).astype(np.float32)
    state = mj.window_init(3, 9, damp=0.1, dtype=jnp.float32)
    opt = mj.mfac(3, 0.1)
    with jax.enable_x64(False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls = {
            "static_ihvp": lambda: mj.static_ihvp(jnp.asarray(G), damp=0.1),
            "static_ihvp under jit": lambda: jax.jit(mj.static_ihvp, static_argnames="damp")(
                jnp.asarray(G), damp=0.1
            ),
            "window_init": lambda: mj.window_init(3, 9, damp=0.1, dtype=jnp.float32),
            # A state made in 64-bit mode, traced with the mode off.
            "window_update": lambda: jax.jit(mj.window_update)(state, jnp.ones(9, jnp.float32)),
            "window_matvec": lambda: mj.window_matvec(state, jnp.ones(9, jnp.float32)),
            "kappa_bounds": state.kappa_bounds,
            "mfac init": lambda: opt.init({"w": jnp.ones(9, jnp.float32)}),
        }
        for name, call in calls.items():
            with pytest.raises(RuntimeError) as info:
                call()
            message = str(info.value)
            assert 'jax.config.update("jax_enable_x64", True)' in message, name
            assert "jax.enable_x64(True)" in message, name
    assert not [w for w in caught if "truncated" in str(w.message)], [
        str(w.message) for w in caught
    ]


def test_core_operators_refuse_x64_off_at_each_call_not_only_when_built(rng):
    # The Array-API operators over JAX arrays checked the mode only when built (and
    # EmpiricalFisher never): one built inside jax.enable_x64(True) and used after it
    # summed its float64 passes in float32, 2.6e-3 off (21,798 eps32) with no error.
    from mfac_core import EmpiricalFisher, LinearOperator, SpectralIHVP, StaticIHVP

    G = rng.standard_normal((4, 12)).astype(np.float32)
    x, idx = jnp.asarray(G[1]), jnp.asarray(np.array([0, 3]))
    ops = {
        "StaticIHVP": StaticIHVP(jnp.asarray(G), damp=0.5),
        "block-wise": StaticIHVP(jnp.asarray(G), damp=0.5, block_size=5),
        "SpectralIHVP": SpectralIHVP(jnp.asarray(G), damp=0.5),
        "EmpiricalFisher": EmpiricalFisher(jnp.asarray(G), damp=0.5),
    }
    calls = {
        "matvec": lambda op: op.matvec(x),
        "@": lambda op: (2 * op) @ x,
        "todense": lambda op: op.todense(),
        "diagonal": lambda op: op.diagonal(),
        "entries": lambda op: op.entries(idx, idx),
        "sweep": lambda op: op.sweep(x, damps=[0.5, 1.0]),
        "logdet": lambda op: op.logdet(),
        "sample": lambda op: op.sample(2, rng=0),
        "with_damp": lambda op: op.with_damp(1.0),
    }

    class Mine(LinearOperator):  # a user's operator that applies one of the library's
        def __init__(self, inner):
            super().__init__(shape=inner.shape, dtype=inner.dtype, xp=inner.xp, device=inner.device)
            self.inner = inner

        def _matmat(self, X):
            return self.inner.matmat(X)

    with jax.enable_x64(False):
        for op in ops.values():
            with pytest.raises(RuntimeError, match="jax_enable_x64"):
                Mine(op).matvec(x)  # checked inside the user's call too
            for call_name, call in calls.items():
                if not hasattr(op, call_name) and call_name not in ("@", "matvec"):
                    continue
                with pytest.raises(RuntimeError, match="jax_enable_x64"):
                    call(op)
        with pytest.raises(RuntimeError, match="jax_enable_x64"):
            EmpiricalFisher(jnp.asarray(G), damp=0.5)
    # Back in the mode, every operator is as it was.
    for op in ops.values():
        assert op.matvec(x).dtype == jnp.float32


# -- the sliding window --------------------------------------------------------------------------


def window_oracle(
    rows: list[np.ndarray], m: int, d: int, damp: float, zero_init: bool, x: np.ndarray
) -> tuple[np.ndarray, float]:
    """``F^{-1} x`` for the window's rows (padded with zero gradients under zero_init)."""
    G = np.array(rows[-m:], dtype=np.float64).reshape(-1, d)
    if zero_init:
        G = np.concatenate([np.zeros((m - len(G), d)), G])
    if len(G) == 0:
        return x / damp, 1.0
    return SpectralOracle(G, damp).matvec(x), woodbury_kappa(G, damp)


@pytest.mark.parametrize("zero_init", [True, False], ids=["zero-init", "window"])
def test_window_matches_dense_oracle_step_by_step(dtype, rng, zero_init):
    m, d, damp = 5, 23, 0.05
    state = mj.window_init(m, d, damp=damp, dtype=dtype, zero_init=zero_init)
    step = jax.jit(mj.window_update_and_matvec, donate_argnums=0)
    rows: list[np.ndarray] = []
    steps = 4 * m + 3
    for t in range(steps):
        g = gaussian(rng, d, dtype, scale=rng.uniform(0.1, 10.0))
        state, y = step(state, jnp.asarray(g, dtype=dtype))
        rows.append(g)
        assert y.dtype == jnp.dtype(dtype)
        want, kappa = window_oracle(rows, m, d, damp, zero_init, g)
        assert_close(y, want, kappa=kappa, err_msg=f"step {t}")
        x = rng.standard_normal(d).astype(dtype)
        want, kappa = window_oracle(rows, m, d, damp, zero_init, x.astype(np.float64))
        assert_close(mj.window_matvec(state, jnp.asarray(x)), want, kappa=kappa)
    assert int(state.count) == m and int(state.pos) == steps % m
    assert_close(state.gradients(), np.array(rows[-m:]), dtype="float64", factor=1)
    # The O(m^2) edit did the work: full factorisations only while a window without
    # zero_init filled, and once after every m edits (refactor_every = m).
    filling = 0 if zero_init else m
    assert int(state.refactors) == filling + (steps - filling) // (m + 1)


def test_window_agrees_with_dynamic_ihvp(dtype, rng):
    m, d, damp = 6, 31, 1e-3
    state = mj.window_init(m, d, damp=damp, dtype=dtype)
    core = DynamicIHVP(m, d, damp=damp, dtype=dtype, options=WindowOptions(zero_init=True))
    step = jax.jit(mj.window_update_and_matvec)
    for t in range(3 * m):
        g = rng.standard_normal(d).astype(dtype)
        state, y = step(state, jnp.asarray(g))
        want = core.update_and_matvec(g)
        kappa = woodbury_kappa(core.window(), damp)
        # Two computations of the same float64 product, each within eps kappa of it.
        assert_close(y, want, kappa=kappa, factor=200, err_msg=f"step {t}")


def test_window_refactor_every_and_m_equal_one(rng):
    m, d = 4, 12
    state = mj.window_init(m, d, damp=0.5, dtype=jnp.float64, zero_init=False, refactor_every=3)
    for _ in range(m + 8):
        state = mj.window_update(state, jnp.asarray(rng.standard_normal(d)))
    # m while filling, then 8 replacements with a full factorisation after every 3 edits.
    assert int(state.refactors) == m + 2
    # refactor_every=0: a full factorisation at every update, as DynamicIHVP's.
    state = mj.window_init(m, d, damp=0.5, dtype=jnp.float64, refactor_every=0)
    options = WindowOptions(zero_init=True, refactor_every=0)
    core = DynamicIHVP(m, d, damp=0.5, dtype="float64", options=options)
    for _ in range(m + 3):
        g = rng.standard_normal(d)
        state, y = mj.window_update_and_matvec(state, jnp.asarray(g))
        assert_close(y, core.update_and_matvec(g), kappa=woodbury_kappa(core.window(), 0.5))
    assert int(state.refactors) == m + 3  # one per update (the core counts its first too)
    state = mj.window_init(1, 3, damp=1.0, dtype=jnp.float64)
    for _ in range(3):
        g = jnp.asarray(rng.standard_normal(3))
        state, y = mj.window_update_and_matvec(state, g)
        assert_close(y, np.linalg.solve(np.eye(3) + np.outer(g, g), np.asarray(g)))
    assert int(state.refactors) == 1


def test_window_matvec_matrix_and_vmap(rng):
    m, d, damp = 4, 17, 0.2
    state = mj.window_init(m, d, damp=damp, dtype=jnp.float64, zero_init=False)
    rows = []
    for _ in range(m + 2):
        rows.append(rng.standard_normal(d))
        state = mj.window_update(state, jnp.asarray(rows[-1]))
    X = rng.standard_normal((d, 3))
    want = SpectralOracle(np.array(rows[-m:]), damp).matmat(X)
    kappa = woodbury_kappa(np.array(rows[-m:]), damp)
    assert_close(mj.window_matvec(state, jnp.asarray(X)), want, kappa=kappa)
    assert_close(jax.vmap(state.matvec, in_axes=1, out_axes=1)(jnp.asarray(X)), want, kappa=kappa)
    assert_close(state @ jnp.asarray(X[:, 0]), want[:, 0], kappa=kappa)
    # d/dx v^T F^{-1} x = F^{-1} v: differentiable through the float64 solves.
    v = rng.standard_normal(d)
    grad = jax.jit(jax.grad(lambda x: jnp.vdot(jnp.asarray(v), mj.window_matvec(state, x))))(
        jnp.asarray(X[:, 0])
    )
    assert_close(grad, SpectralOracle(np.array(rows[-m:]), damp).matvec(v), kappa=kappa)
    # A batch of windows, stepped together.
    states = jax.vmap(lambda _: mj.window_init(m, d, damp=damp, dtype=jnp.float64))(jnp.arange(3))
    G = rng.standard_normal((m + 1, 3, d))
    for t in range(m + 1):
        states, Y = jax.vmap(mj.window_update_and_matvec)(states, jnp.asarray(G[t]))
    for b in range(3):
        rows_b = [G[t, b] for t in range(m + 1)]
        want, kappa = window_oracle(rows_b, m, d, damp, True, G[m, b])
        assert_close(Y[b], want, kappa=kappa)


def test_window_step_updates_the_donated_window_in_place(rng):
    m, d = 8, 4096
    state = mj.window_init(m, d, damp=1e-2, dtype=jnp.float32)
    step = jax.jit(mj.window_update_and_matvec, donate_argnums=0)
    g = jnp.asarray(rng.standard_normal(d), jnp.float32)
    # No m x d copy in the compiled step: XLA's CPU backend copies the window when a
    # row of it is read for later use after the in-place write (see _insert).
    hlo = step.lower(state, g).compile().as_text()
    copies = [line for line in hlo.splitlines() if f"f32[{m},{d}]" in line and " copy(" in line]
    assert not copies, copies
    pointer = state.grads.unsafe_buffer_pointer()
    for _ in range(3):
        state, _ = step(state, g)
    assert state.grads.unsafe_buffer_pointer() == pointer


def test_window_derivatives_in_a_traced_damping_are_those_of_the_dense_inverse(rng):
    """Regression: the O(m^2) edit reused the previous factor, whose derivative in the
    damping was lost: jax.grad of v . F^{-1} g in the damping was -0.028 for 0.328 (a sign
    off), and right only where the factor was recomputed. Now the edited factor carries
    the derivatives of the Cholesky factor: first and second, forward and reverse, over
    two steps (the second edits the first's factor), under jit and vmap."""
    m, d, damp = 4, 12, 0.1
    G = rng.standard_normal((7, d))
    v = rng.standard_normal(d)
    state = mj.window_init(m, d, damp=damp, dtype=jnp.float64)
    for g in G[:5]:
        state, _ = mj.window_update_and_matvec(state, jnp.asarray(g))

    def f(lam, steps):
        s = state
        for g in G[5 : 5 + steps]:
            s, y = mj.window_update_and_matvec(s, jnp.asarray(g), damp=lam)
        return jnp.vdot(jnp.asarray(v), y)

    for steps in (1, 2):
        W = G[1 + steps : 5 + steps]  # the window after the steps
        F = damp * np.eye(d) + W.T @ W / m
        y = np.linalg.solve(F, G[4 + steps])
        # d/dl v F^{-1} g = -v F^{-2} g, and d2/dl2 = 2 v F^{-3} g.
        first = -v @ np.linalg.solve(F, y)
        second = 2 * v @ np.linalg.solve(F, np.linalg.solve(F, y))
        kappa = np.linalg.cond(F)
        # |v F^{-k} g| <= |v| |F^{-1}|^k |g|: the bounds the rounding scales with.
        inv = np.linalg.norm(np.linalg.inv(F), 2)
        bound = np.linalg.norm(v) * np.linalg.norm(G[4 + steps]) * inv
        eps = float(np.finfo(np.float64).eps)
        lam = jnp.asarray(damp)  # the window's own damping: the edit's path
        for got, want, size in [
            (jax.grad(f)(lam, steps), first, bound * inv),
            (jax.jit(jax.grad(f), static_argnums=1)(lam, steps), first, bound * inv),
            (jax.jacfwd(f)(lam, steps), first, bound * inv),
            (
                jax.vmap(jax.grad(f), in_axes=(0, None))(jnp.stack([lam, lam]), steps)[1],
                first,
                bound * inv,
            ),
            (jax.hessian(f)(lam, steps), second, 2 * bound * inv**2),
        ]:
            assert abs(float(got) - want) <= 100 * kappa * eps * size


def test_derivatives_through_a_refused_gradient_stay_those_of_the_window(rng):
    """Regression: a step that refused a gradient holding NaN still computed with it (a
    select kept the old state), and reverse mode multiplied the zero cotangents by its
    NaN partials: jax.grad in the damping of a loss after the loop was NaN, where the loss
    and forward mode were finite. The refused branch now computes with zeros."""
    m, d = 4, 10
    G = rng.standard_normal((8, d))
    G[3, 0] = np.nan  # refused at step 3
    x = jnp.asarray(rng.standard_normal(d))

    def loss(lam, rows):
        state = mj.window_init(m, d, damp=0.1, dtype=jnp.float64)
        for g in rows:
            state, _ = mj.window_update_and_matvec(state, jnp.asarray(g), damp=lam)
        return jnp.vdot(x, mj.window_matvec(state, x))

    lam = jnp.asarray(0.1)
    got = float(jax.grad(loss)(lam, G))
    # The refused gradient changes nothing: the loop without it, and forward mode.
    want = float(jax.grad(loss)(lam, np.delete(G, 3, axis=0)))
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx(float(jax.jvp(lambda v: loss(v, G), (lam,), (1.0,))[1]), rel=1e-12)


def test_window_refuses_non_finite_gradients_and_stays_unchanged(rng):
    m, d = 3, 10
    state = mj.window_init(m, d, damp=0.1, dtype=jnp.float32)
    step = jax.jit(mj.window_update_and_matvec)
    for _ in range(2):
        state, _ = step(state, jnp.asarray(rng.standard_normal(d), jnp.float32))
    # 1e30 is finite (and its square in float64), but kappa ~ 1e60: no digit would be left.
    for bad in (jnp.nan, jnp.inf, 1e30):
        g = jnp.asarray(rng.standard_normal(d), jnp.float32).at[3].set(bad)
        new, y = step(state, g)
        assert bool(jnp.all(jnp.isnan(y)))
        for a, b in zip(
            jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    g = rng.standard_normal(d).astype(np.float32)
    state, y = step(state, jnp.asarray(g))
    rows = [np.asarray(r, np.float64) for r in state.gradients()]
    want, kappa = window_oracle(rows, m, d, 0.1, True, g.astype(np.float64))
    assert_close(y, want, kappa=kappa)


def test_window_refuses_a_hopeless_gradient_and_stays_unchanged():
    """eps(float64) kappa >= 1 (kappa ~ 8e28, though the float64 factor would exist):
    refused, NaN, the window as it was."""
    state = mj.window_init(3, 8, damp=1e-12, dtype=jnp.float64)
    new, y = mj.window_update_and_matvec(state, jnp.full(8, 1e8))
    assert bool(jnp.all(jnp.isnan(y)))
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # kappa = 1 + 800 / 3e-12 = 2.7e14 (eps(float64) kappa = 0.06): accepted.
    state, y = mj.window_update_and_matvec(state, jnp.full(8, 10.0))
    assert bool(jnp.all(jnp.isfinite(y))) and int(state.pos) == 1


def test_a_lowered_damping_does_not_lock_the_window(rng):
    """Regression: after the damping was lowered, a gradient taken before (eps kappa
    about 0.4 at damp 1, 35 at 1e-2) made the window refuse every later gradient, judged
    by the window's largest squared norm: the old one could never leave, every direction
    was NaN (and through apply_if_finite the parameters turned NaN). The new gradient's
    own norm is judged, as DynamicIHVP judges it: the window takes the gradients, as
    DynamicIHVP does, and once the large one has left, its products are right."""
    m, d = 4, 10
    big = np.zeros(d, np.float32)
    big[0] = 4e7  # |g|^2 = 1.6e15
    small = [rng.standard_normal(d).astype(np.float32) * 1e-3 for _ in range(m + 2)]
    state = mj.window_init(m, d, damp=1.0, dtype=jnp.float32)
    state, y = mj.window_update_and_matvec(state, jnp.asarray(big))
    assert bool(jnp.all(jnp.isfinite(y)))
    core = DynamicIHVP(m, d, damp=1.0, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        core.update(big)
        core.set_damp(1e-2)
        for g in small:
            state, y = mj.window_update_and_matvec(state, jnp.asarray(g), damp=1e-2)
            want = core.update_and_matvec(g)
    assert int(state.pos) == (1 + len(small)) % m  # every gradient taken
    rows = [np.asarray(r, np.float64) for r in state.gradients()]
    assert not any(r[0] == 4e7 for r in rows)  # the large one has left
    oracle, kappa = window_oracle(rows, m, d, 1e-2, True, small[-1].astype(np.float64))
    assert_close(y, oracle, kappa=kappa)
    assert_close(want, oracle, kappa=kappa)


def test_window_kappa_bounds_say_what_dynamic_ihvp_warns_of(rng):
    """The window never warns (nothing can from inside jit), where DynamicIHVP warns
    (eps kappa**1.5 >= 1) of a gradient it takes: its kappa_bounds() give the bounds
    the core judges, step by step, under jit and vmap."""
    eps = float(jnp.finfo(jnp.float64).eps)
    m, d = 4, 12  # the windows of test_window_refactor_every_and_m_equal_one: compiled once
    # Nearly collinear gradients (kappa about 1e10 each alone, 3e10 with the third: the
    # core warns with it, of its new Gram row's quotient, once), then a well conditioned
    # window (zero_init=False) whose bounds stay near kappa.
    u = rng.standard_normal(d)
    collinear = [2e5 * (u + 1e-6 * rng.standard_normal(d)) / np.linalg.norm(u) for _ in range(m)]
    bounds = jax.jit(lambda s: s.kappa_bounds())

    def steps(s, g):
        return mj.window_update_and_matvec(s, g)[0]

    # Each window stepped as that test steps it (the same compiled step).
    for damp, zero_init, rows, step in [
        (1.0, True, collinear, steps),
        # Spread in sign: their quotient with the ones vector cancels, not the new row's.
        (1.0, True, [(-1) ** i * g for i, g in enumerate(collinear)], steps),
        (0.5, False, [rng.standard_normal(d) for _ in range(m + 1)], mj.window_update),
    ]:
        options = WindowOptions(zero_init=zero_init)
        core = DynamicIHVP(m, d, damp=damp, dtype=np.float64, options=options)
        state = mj.window_init(m, d, damp=damp, dtype=jnp.float64, zero_init=zero_init)
        warned = []
        for t, g in enumerate(rows):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", IllConditionedWarning)
                core.update(g)
            state = step(state, jnp.asarray(g))
            lower, upper = (float(b) for b in bounds(state))
            G = np.array(rows[: t + 1][-m:])  # the window's gradients
            k = m if zero_init else len(G)
            kappa = 1.0 + np.linalg.eigvalsh(G @ G.T)[-1] / (k * damp)
            assert lower <= kappa * (1 + 1e-9) and kappa <= upper * (1 + 1e-9)
            assert lower >= 0.5 * kappa  # nearly tight here (the Rayleigh quotients)
            assert bool(caught) == (eps * lower**1.5 >= 1 and not any(warned))  # once
            warned.append(bool(caught))
        assert warned == ([False] * (m - 2) + [True, False] if zero_init else [False] * (m + 1))
    # A batch of windows under vmap: each one's bounds.
    other = step(state, jnp.asarray(u))
    batch = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), state, other)
    lows, ups = jax.jit(jax.vmap(lambda s: s.kappa_bounds()))(batch)
    want = [(lower, upper), tuple(float(b) for b in bounds(other))]
    assert [(float(lo), float(up)) for lo, up in zip(lows, ups, strict=True)] == want


def test_window_kappa_bounds_lower_never_exceeds_upper():
    # Regression: for m equal gradients the ones vector's quotient (sum of the m^2 Gram
    # entries / m) is the trace, and the two sums rounded it an ulp above the trace:
    # lower 2.2100000000000004 > upper 2.21 here (m = 5, g = [1.1], damp 1).
    for zero_init in (True, False):
        state = mj.window_init(5, 1, damp=1.0, dtype=jnp.float64, zero_init=zero_init)
        # The Gram and count five updates with g leave (not stepped: a compile per window).
        gram = jnp.full((5, 5), 1.1 * 1.1, dtype=jnp.float64)
        state = dataclasses.replace(state, gram=gram, count=jnp.asarray(5, jnp.int32))
        lower, upper = (float(b) for b in state.kappa_bounds())
        kappa = 1.0 + 5 * 1.1**2 / 5.0
        assert lower <= upper and math.isclose(lower, kappa, rel_tol=1e-14)


def test_window_kappa_bounds_lower_covers_the_ones_quotient_sum():
    # Regression: the ones vector's quotient is one sum of the m^2 Gram entries, which
    # XLA's CPU reduction rounded 128 eps above its value for m = 32 equal entries; less
    # only rayleigh_slack(m) (108 eps of the trace), lower read 12 eps above kappa.
    from fractions import Fraction

    eps, m = float(jnp.finfo(jnp.float64).eps), 32
    state = mj.window_init(m, 1, damp=1.0, dtype=jnp.float64, zero_init=True)
    for c, rel in ((1.9443723372522754, 1e-14), (1.9443723372522754, 1e-12), (1.5, 0.0)):
        # Nearly collinear gradients: lambda_max = (m - 1) c + diag, the ones quotient's.
        diag, damp = c * (1 + rel * m), c * 1e-6
        gram = np.full((m, m), c)
        np.fill_diagonal(gram, diag)
        count = jnp.asarray(m, jnp.int32)
        window = dataclasses.replace(state, gram=jnp.asarray(gram), count=count, damp=damp)
        lower, upper = (float(b) for b in window.kappa_bounds())
        kappa = 1 + ((m - 1) * Fraction(c) + Fraction(diag)) / (m * Fraction(damp))
        # One rounding of 1 + top / shift each (top <= lambda_max), no more.
        assert Fraction(lower) <= kappa * (1 + 2 * Fraction(eps)) and kappa <= Fraction(upper)
        assert lower >= 0.5 * float(kappa)  # still nearly tight


def test_window_refuses_bad_arguments():
    for kwargs, exc, match in (
        ({"damp": 0.0}, ValueError, "damp"),
        ({"dtype": jnp.int32}, TypeError, "float32 or float64"),
        ({"dtype": jnp.float16}, TypeError, "float32 or float64"),
        # NumPy reads None as float64: a window twice the size asked for, silently.
        ({"dtype": None}, TypeError, "float32 or float64.*got None"),
        ({"refactor_every": -1}, ValueError, "refactor_every must be >= 0"),
    ):
        args = {"damp": 0.1, "dtype": jnp.float32, **kwargs}
        with pytest.raises(exc, match=match):
            mj.window_init(3, 5, **args)
    for m, d in ((0, 5), (3, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            mj.window_init(m, d, damp=0.1, dtype=jnp.float32)
    for m, d in ((2.0, 5), (True, 5)):  # not integers: a wrong type
        with pytest.raises(TypeError, match="must be an int"):
            mj.window_init(m, d, damp=0.1, dtype=jnp.float32)
    state = mj.window_init(3, 5, damp=0.1, dtype=jnp.float32)
    with pytest.raises(TypeError, match="cast it explicitly"):
        mj.window_update(state, jnp.ones(5, jnp.float64))
    with pytest.raises(ValueError, match="shape"):
        mj.window_update_and_matvec(state, jnp.ones(6, jnp.float32))
    with pytest.raises(TypeError, match="WindowState"):
        mj.window_matvec({"grads": None}, jnp.ones(5, jnp.float32))


# -- the optax optimizer against mfac_core.torch.MFAC ----------------------------------------


def _torch():
    return pytest.importorskip("torch")


def _torch_mlp(torch, params: dict[str, np.ndarray], dtype):
    """A 5-4-3 tanh MLP whose weights are ``params`` (JAX layout: x @ w + b)."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = model.to(dtype)
    with torch.no_grad():
        for i, layer in ((1, model[0]), (2, model[2])):
            layer.weight.copy_(torch.from_numpy(params[f"w{i}"].T.copy()))
            layer.bias.copy_(torch.from_numpy(params[f"b{i}"].copy()))
    return model


def _torch_params(model) -> dict[str, np.ndarray]:
    """Copies (``.numpy()`` shares memory with the tensors the optimizer changes)."""
    return {
        "w1": model[0].weight.detach().numpy().T.copy(),
        "b1": model[0].bias.detach().numpy().copy(),
        "w2": model[2].weight.detach().numpy().T.copy(),
        "b2": model[2].bias.detach().numpy().copy(),
    }


def _jax_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _init_params(rng, dtype) -> dict[str, np.ndarray]:
    return {
        "w1": (rng.standard_normal((5, 4)) / 2).astype(dtype),
        "b1": (rng.standard_normal(4) / 4).astype(dtype),
        "w2": (rng.standard_normal((4, 3)) / 2).astype(dtype),
        "b2": (rng.standard_normal(3) / 4).astype(dtype),
    }


def _window_kappa(opt, damp: float) -> float:
    return woodbury_kappa(opt.ihvp.window().numpy(), damp)


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.01)])
def test_mfac_sgd_steps_match_torch_mfac_given_the_same_gradients(
    dtype, rng, momentum, weight_decay
):
    """The documented mapping, step for step: the same gradients into both optimizers."""
    torch = _torch()
    tdtype = getattr(torch, dtype)
    m, damp, lr, steps = 4, 1e-3, 0.05, 11
    params = _init_params(rng, dtype)
    model = _torch_mlp(torch, params, tdtype)
    topt = mj_torch_mfac(
        model, lr=lr, num_grads=m, damp=damp, momentum=momentum, weight_decay=weight_decay
    )
    opt = mj.mfac_sgd(lr, m, damp, momentum=momentum, weight_decay=weight_decay)
    jparams = jax.tree_util.tree_map(jnp.asarray, params)
    state = opt.init(jparams)

    @jax.jit
    def jstep(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    layers = {"w1": (0, "weight"), "b1": (0, "bias"), "w2": (2, "weight"), "b2": (2, "bias")}
    kappa = 1.0
    for t in range(steps):
        grads = {
            k: (rng.standard_normal(v.shape) * rng.uniform(0.1, 3.0)).astype(dtype)
            for k, v in params.items()
        }
        before = _torch_params(model)
        for name, (i, attr) in layers.items():
            g = grads[name].T if attr == "weight" else grads[name]
            getattr(model[i], attr).grad = torch.from_numpy(np.ascontiguousarray(g))
        topt.step()
        jparams, state = jstep(jparams, state, jax.tree_util.tree_map(jnp.asarray, grads))
        after = _torch_params(model)
        kappa = max(kappa, _window_kappa(topt, damp))
        for name in params:
            assert jparams[name].dtype == jnp.dtype(dtype)
            # The step theta_t - theta_{t-1} (with momentum a sum of earlier steps), up
            # to eps kappa; atol: both sides carry the rounding of theta to the dtype.
            assert_close(
                np.asarray(jparams[name], np.float64) - before[name].astype(np.float64),
                after[name].astype(np.float64) - before[name].astype(np.float64),
                kappa=kappa,
                dtype=dtype,
                atol=8 * np.finfo(dtype).eps * np.abs(before[name]).max(),
                err_msg=f"step {t}, {name}",
            )


def mj_torch_mfac(model, **kwargs):
    from mfac_core.torch import MFAC

    return MFAC(model.parameters(), **kwargs)


def test_mfac_trains_the_same_model_as_torch_mfac(rng):
    """End to end in float64: the same MLP, data and hyper-parameters, 15 steps."""
    torch = _torch()
    m, damp, lr, momentum, wd = 4, 1e-3, 0.1, 0.5, 1e-2
    params = _init_params(rng, "float64")
    model = _torch_mlp(torch, params, torch.float64)
    topt = mj_torch_mfac(model, lr=lr, num_grads=m, damp=damp, momentum=momentum, weight_decay=wd)
    opt = optax.chain(
        optax.add_decayed_weights(wd), mj.mfac(m, damp), optax.trace(momentum), optax.scale(-lr)
    )
    jparams = jax.tree_util.tree_map(jnp.asarray, params)
    state = opt.init(jparams)

    @jax.jit
    def train_step(params, state, x, y):
        loss, grads = jax.value_and_grad(_jax_loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    kappa = 1.0
    for t in range(15):
        x, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        jparams, state, loss = train_step(jparams, state, jnp.asarray(x), jnp.asarray(y))
        assert_close(loss, tloss.item(), kappa=kappa, err_msg=f"loss at step {t}")
        kappa = max(kappa, _window_kappa(topt, damp))
        after = _torch_params(model)
        for name in params:
            # The differences start as rounding of two autodiff implementations and
            # pass through F^{-1}: eps kappa relative to the parameters.
            assert_close(jparams[name], after[name], kappa=kappa, err_msg=f"step {t}, {name}")


def test_mfac_state_is_the_window_and_updates_in_place(rng):
    params = {"a": jnp.zeros((30, 20), jnp.float32), "b": jnp.zeros(20, jnp.float32)}
    opt = optax.chain(mj.mfac(num_grads=4, damp=1e-2), optax.scale(-0.1))
    state = opt.init(params)
    window = state[0].window
    assert isinstance(state[0], mj.MFACState) and window.grads.shape == (4, 620)
    assert window.dtype == jnp.float32 and window.gram.dtype == jnp.float64

    def train_step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    hlo = step.lower(params, state, params).compile().as_text()
    copies = [line for line in hlo.splitlines() if "f32[4,620]" in line and " copy(" in line]
    assert not copies, copies
    pointer = window.grads.unsafe_buffer_pointer()
    for _ in range(3):
        grads = jax.tree_util.tree_map(
            lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
        )
        params, state = step(params, state, grads)
    assert state[0].window.grads.unsafe_buffer_pointer() == pointer
    assert int(state[0].window.pos) == 3


def test_mfac_with_apply_if_finite_skips_bad_steps(rng):
    opt = optax.apply_if_finite(optax.chain(mj.mfac(3, 1e-2), optax.scale(-0.1)), 5)
    params = {"w": jnp.zeros(6)}
    state = opt.init(params)
    good = {"w": jnp.asarray(rng.standard_normal(6))}
    updates, state = opt.update(good, state, params)
    before = state.inner_state[0].window
    updates, state = opt.update({"w": good["w"].at[2].set(jnp.nan)}, state, params)
    assert bool(jnp.all(updates["w"] == 0)) and int(state.notfinite_count) == 1
    np.testing.assert_array_equal(
        np.asarray(state.inner_state[0].window.grads), np.asarray(before.grads)
    )


def test_apply_if_finite_after_mfac_skips_a_refused_finite_gradient(rng):
    # A finite gradient that the window refuses (eps64 kappa >= 1) gives a NaN direction:
    # an apply_if_finite placed after mfac sees it and skips the step, as the docs say.
    opt = optax.chain(mj.mfac(3, 1e-2), optax.apply_if_finite(optax.sgd(0.1), 5))
    params = {"w": jnp.ones(10, jnp.float32)}
    state = opt.init(params)
    for _ in range(3):
        grads = {"w": jnp.asarray(rng.standard_normal(10), jnp.float32)}
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    before = state[0].window.grads
    huge = jnp.asarray(rng.standard_normal(10), jnp.float32).at[:5].multiply(1e8)
    updates, state = opt.update({"w": huge}, state, params)
    assert bool(jnp.all(updates["w"] == 0)) and int(state[1].notfinite_count) == 1
    np.testing.assert_array_equal(np.asarray(state[0].window.grads), np.asarray(before))


def test_mfac_refuses_bad_arguments():
    with pytest.raises(ValueError, match="num_grads"):
        mj.mfac(0)
    with pytest.raises(ValueError, match="damp"):
        mj.mfac(4, -1.0)
    with pytest.raises(ValueError, match="momentum"):
        mj.mfac_sgd(0.1, 4, momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        mj.mfac_sgd(0.1, 4, weight_decay=-1.0)
    for bad in (jnp.ones(2), jnp.asarray(True), "0.1"):
        with pytest.raises(TypeError, match="momentum"):
            mj.mfac_sgd(0.1, 4, momentum=bad)
    with pytest.raises(ValueError, match="momentum"):
        mj.mfac_sgd(0.1, 4, momentum=jnp.asarray(1.5))  # a concrete array is checked
    opt = mj.mfac(4)
    with pytest.raises(TypeError, match="real parameters"):
        opt.init({"a": jnp.zeros(3, jnp.complex64)})
    state = opt.init({"a": jnp.zeros(3)})
    with pytest.raises(
        ValueError, match=r"shape \(4,\) but the parameters given to init had \(3,\)"
    ):
        opt.update({"a": jnp.zeros(4)}, state)
    with pytest.raises(ValueError, match="leaves"):
        opt.update({"a": jnp.zeros(3), "b": jnp.zeros(1)}, state)
    with pytest.raises(TypeError, match="float leaf"):
        opt.update({"a": jnp.zeros(3, jnp.int32)}, state)
    # Regression: another state (a chain's tuple, a window) failed on a missing attribute.
    chain = optax.chain(opt, optax.scale(-1.0))
    for wrong in (chain.init({"a": jnp.zeros(3)}), state.window):
        with pytest.raises(TypeError, match=f"MFACState .*, got {type(wrong).__name__}$"):
            opt.update({"a": jnp.zeros(3)}, wrong)


def test_mfac_sgd_checks_its_learning_rate_as_torch_mfac_does():
    # Regression: the learning rate was passed to optax unchecked, so NaN (parameters
    # turned NaN at the first step), True and -1 were accepted, where MFAC refuses them.
    for bad in (float("nan"), -1.0, jnp.asarray(-0.1)):
        with pytest.raises(ValueError, match="learning_rate"):
            mj.mfac_sgd(bad, 4)
    for bad in (True, "0.1", jnp.ones(2)):
        with pytest.raises(TypeError, match="learning_rate"):
            mj.mfac_sgd(bad, 4)
    params = {"w": jnp.ones(3, jnp.float32)}
    grads = {"w": jnp.asarray([1.0, -2.0, 0.5], jnp.float32)}
    schedule = optax.constant_schedule(0.5)
    for lr in (0.5, jnp.asarray(0.5, jnp.float32), schedule):  # a schedule is optax's
        opt = mj.mfac_sgd(lr, 4)
        updates, _ = opt.update(grads, opt.init(params), params)
        plain = mj.mfac_sgd(0.5, 4)
        want, _ = plain.update(grads, plain.init(params), params)
        np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(want["w"]))


def test_mfac_refuses_updates_whose_leaves_changed_shape():
    # Regression: only the leaf count and the total size were checked, so an update whose
    # leaves were reshaped (same size) was preconditioned in the wrong coordinates; optax's
    # adam refuses it (its moments have the parameters' shapes).
    params = {"a": jnp.ones((2, 3), jnp.float32), "b": jnp.ones(4, jnp.float32)}
    opt = mj.mfac(4)
    state = opt.init(params)
    grads = {"a": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(4, jnp.float32)}
    updates, state = opt.update(grads, state)
    for bad in (
        {"a": grads["a"].reshape(3, 2), "b": grads["b"]},
        {"a": grads["a"].reshape(6), "b": grads["b"]},
    ):
        with pytest.raises(ValueError, match=r"leaf 0 of the updates has shape"):
            opt.update(bad, state)
        with pytest.raises(ValueError, match=r"leaf 0 of the updates has shape"):
            jax.jit(opt.update)(bad, state)
    again, _ = jax.jit(opt.update)(grads, state)  # the state was left as it was
    assert again["a"].shape == (2, 3) and updates["a"].shape == (2, 3)


def test_mfac_refuses_updates_of_another_pytree_with_the_same_shapes():
    # Regression: only the leaves' count and shapes were checked, so updates whose keys were
    # renamed (a state restored for a model whose layers were renamed) were preconditioned
    # in the wrong coordinates: here "b"'s gradient in "a"'s, where optax's adam refuses the
    # other structure. A container of the same keys (a tuple for a list) is the same tree.
    params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(3, jnp.float32)}
    opt = mj.mfac(4)
    state = opt.init(params)
    g = jnp.arange(3.0, dtype=jnp.float32)
    for update in (opt.update, jax.jit(opt.update)):
        with pytest.raises(ValueError, match=r"leaf 0 of the updates is at \['b'\] but .*\['a'\]"):
            update({"b": g, "c": g}, state)
    listed = opt.init([params["a"], params["b"]])
    updates, _ = opt.update((g, g), listed)
    assert isinstance(updates, tuple) and updates[0].shape == (3,)


@pytest.mark.parametrize(
    ("init_key", "update_key"),
    [(np.int64(0), 0), (0, np.int32(0)), (True, 1), (1.0, np.int64(1)), (np.str_("a"), "a")],
)
def test_mfac_takes_updates_whose_dict_keys_equal_the_parameters(init_key, update_key):
    # Regression: the paths compared were keystr's strings, which write each key's own repr,
    # so updates keyed 0 for parameters keyed np.int64(0) (keys equal to a dict and to JAX's
    # tree structures, which adam takes) were refused as "of another pytree".
    a, b = jnp.ones(3, jnp.float32), jnp.arange(2.0, dtype=jnp.float32)
    params, updates = [{init_key: a}, b], [{update_key: a}, b]
    adam = optax.adam(0.1)
    adam.update(updates, adam.init(params), params)
    opt = mj.mfac(4, 0.1)
    want, _ = opt.update(params, opt.init(params))
    for update in (opt.update, jax.jit(opt.update)):
        got, _ = update(updates, opt.init(params))
        assert list(got[0]) == [update_key]
        np.testing.assert_array_equal(np.asarray(got[0][update_key]), np.asarray(want[0][init_key]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    with pytest.raises(ValueError, match=r"leaf 0 of the updates is at \[0\]\['0'\] but"):
        opt.update([{"0": a}, b], opt.init([{0: a}, b]))


@pytest.mark.parametrize("other", [{"num_grads": 8}, {"zero_init": False}])
def test_mfac_refuses_the_state_of_another_mfac(other):
    # Regression: update took the window size and normalisation from the state alone, so
    # mfac(4) given a state of mfac(8) (a checkpoint of another configuration) went on
    # with a window of 8 gradients, as the torch optimizer refuses such a state.
    params = {"w": jnp.ones(3, jnp.float32)}
    grads = {"w": jnp.arange(3.0, dtype=jnp.float32)}
    opt = mj.mfac(4)
    foreign = mj.mfac(**{"num_grads": 4, **other}).init(params)
    for update in (opt.update, jax.jit(opt.update)):
        with pytest.raises(
            ValueError, match=r"^the state's window holds num_grads=.* another mfac"
        ):
            update(grads, foreign)
    opt.update(grads, opt.init(params))


def _shared_mean_problem(rng, kappa):
    """16 float32 gradients of 600 coordinates with a shared mean (an optimizer's), the
    damping that gives them ``kappa``, and their static operator and window."""
    m, d = 16, 600
    G = rng.standard_normal(d) + rng.standard_normal((m, d))
    G = (G / (np.linalg.norm(G, 2) / np.sqrt(m))).astype(np.float32)
    damp = float(np.linalg.norm(G.astype(np.float64), 2) ** 2 / (m * (kappa - 1.0)))
    state = mj.window_init(m, d, damp=damp, dtype=jnp.float32, zero_init=False)
    for g in G:
        state = mj.window_update(state, jnp.asarray(g))
    return G, damp, mj.static_ihvp(jnp.asarray(G), damp=damp), state


@pytest.mark.parametrize("kappa", [1e3, 1e5, 1e7])
def test_products_are_exact_for_vectors_in_the_span(kappa, rng):
    # Gradients with a shared mean (an optimizer's), x = their mean and a stored gradient:
    # float32 sums lose eps32 * kappa here; the float64 passes keep float32's rounding.
    G, damp, op, state = _shared_mean_problem(rng, kappa)
    G64, (m, d) = G.astype(np.float64), G.shape
    eps32 = float(np.finfo(np.float32).eps)
    for x in (G64.mean(axis=0).astype(np.float32), G[m // 2]):
        want = extended_precision_inverse(G64, damp, x.astype(np.float64))
        for y in (op.matvec(jnp.asarray(x)), mj.window_matvec(state, jnp.asarray(x))):
            y = np.asarray(y, np.float64)
            assert np.linalg.norm(y - want) <= 8 * eps32 * np.linalg.norm(want)
        D = np.asarray(op.diagonal(), np.float64)
        cols = [0, 7, d - 1]
        want_d = [extended_precision_inverse(G64, damp, np.eye(d)[:, j])[j] for j in cols]
        assert np.all(np.abs(D[cols] - want_d) <= 8 * eps32 * np.abs(want_d))


@pytest.mark.parametrize("kappa", [1e3, 1e5, 1e7])
def test_reverse_mode_is_exact_for_cotangents_in_the_span(kappa, rng):
    # The products' derivatives add the parts from each pass (and, in G, from the
    # factor): each was rounded to float32 first, and near the gradients' span their sum
    # cancelled: vjp 47,837 eps32 off at kappa = 1e7, a gradient in G 48,155, a window's
    # vjp 36,710. Now every part is summed in float64 and rounded once.
    G, damp, op, state = _shared_mean_problem(rng, kappa)
    G64, (m, d) = G.astype(np.float64), G.shape
    eps32 = float(np.finfo(np.float32).eps)
    Finv = np.linalg.inv(damp * np.eye(d) + G64.T @ G64 / m)  # kappa**2 eps64 << eps32
    zero = jnp.zeros(d, jnp.float32)
    for w in (G64.mean(axis=0).astype(np.float32), G[m // 2]):
        want = Finv @ w.astype(np.float64)
        for f in (op.matvec, lambda x: mj.window_matvec(state, x)):
            (got,) = jax.vjp(f, zero)[1](jnp.asarray(w))
            err = np.linalg.norm(np.asarray(got, np.float64) - want)
            assert err <= 8 * eps32 * np.linalg.norm(want)
        # d(w^T F^-1 w)/dG = -2 (G y) y^T / m for y = F^-1 w (F symmetric).
        got_G = jax.grad(lambda G, w=w: jnp.vdot(w, mj.static_ihvp(G, damp=damp).matvec(w)))(
            jnp.asarray(G)
        )
        want_G = -2.0 * np.outer(G64 @ want, want) / m
        err = np.linalg.norm(np.asarray(got_G, np.float64) - want_G)
        assert err <= 8 * eps32 * np.linalg.norm(want_G)
    # d tr(F^-1)/dG = -(2/m) G F^-2 = -2 m C^-2 G (G F^-1 = m C^-1 G): from C with exact
    # sums (float32 products are exact in float64), its solves lose 2 eps64 kappa.
    C = np.array([[math.fsum(G64[i] * G64[j]) for j in range(m)] for i in range(m)])
    C += m * damp * np.eye(m)
    want_D = -2.0 * m * np.linalg.solve(C, np.linalg.solve(C, G64))
    got_D = jax.grad(lambda G: jnp.sum(mj.static_ihvp(G, damp=damp).diagonal()))(jnp.asarray(G))
    err = np.linalg.norm(np.asarray(got_D, np.float64) - want_D)
    assert err <= 8 * eps32 * np.linalg.norm(want_D)


def test_static_derivatives_count_the_factor_through_g_and_the_damping(rng):
    # The products' and the diagonal's derivatives read U as the factor of m damp I +
    # G G^T and count its tangent through G and damp themselves: with U computed from a
    # traced damping (as a caller may), every order agrees with the dense inverse's.
    from mfac_core import _jax_static

    m, d = 5, 14
    G, x = jnp.asarray(rng.standard_normal((m, d))), jnp.asarray(rng.standard_normal(d))

    def factor(G, damp):
        return jnp.linalg.cholesky(G @ G.T + m * damp * jnp.eye(m)).T

    def dense(G, damp):
        return jnp.linalg.inv(damp * jnp.eye(d) + G.T @ G / m)

    ours = {
        "product": lambda G, damp: _jax_static._static_apply(G, factor(G, damp), x, damp),
        "diagonal": lambda G, damp: _jax_static._static_diagonal(G, factor(G, damp), damp, 4),
    }
    theirs = {
        "product": lambda G, damp: dense(G, damp) @ x,
        "diagonal": lambda G, damp: jnp.diagonal(dense(G, damp)),
    }
    for name, f in ours.items():
        g = theirs[name]
        for derivative in (
            lambda f: jax.jacfwd(f, argnums=(0, 1))(G, 0.3),
            lambda f: jax.jacrev(f, argnums=(0, 1))(G, 0.3),
            lambda f: jax.hessian(lambda G, damp: jnp.sum(f(G, damp) ** 2), argnums=1)(G, 0.3),
        ):
            for got, want in zip(
                jax.tree_util.tree_leaves(derivative(f)),
                jax.tree_util.tree_leaves(derivative(g)),
                strict=True,
            ):
                assert_close(
                    np.asarray(got), np.asarray(want), kappa=woodbury_kappa(np.asarray(G), 0.3) ** 2
                )


def test_second_derivatives_in_g_are_as_exact_as_a_dense_solves():
    # The first form of the product's derivative applied F^{-1} to G^T dG y / m, a vector
    # in the gradients' span: its float64 error, eps sqrt(kappa) kappa, second derivatives
    # amplified again (a Hessian in G 1.3e-6 off at kappa = 3.7e5, the dense solve's
    # 1.5e-11). That part is the m x m solve G^T C^{-1} dG y now.
    rng = np.random.default_rng(0)
    m, d, damp = 4, 10, 1e-5
    G, x, v = (jnp.asarray(a) for a in (rng.standard_normal((m, d)), *rng.standard_normal((2, d))))

    def f(G):
        return jnp.vdot(v, mj.static_ihvp(G, damp=damp).matvec(x))

    def dense(G):
        return jnp.vdot(v, jnp.linalg.solve(damp * jnp.eye(d) + G.T @ G / m, x))

    want = np.asarray(jax.hessian(dense)(G))
    kappa = woodbury_kappa(np.asarray(G), damp)
    for got in (jax.hessian(f)(G), jax.jacfwd(jax.jacfwd(f))(G)):
        err = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
        assert err <= 100 * np.finfo(np.float64).eps * kappa, (err, kappa)


def test_forward_jacobians_through_a_jitted_window_step_compile(rng):
    # Regression: jax.jacfwd through window_update_and_matvec (and optax's mfac update)
    # with the window a traced argument crashed XLA's CPU compiler ("Failed to translate
    # module to LLVM IR": a float32 x float64 multiply from combine64's row slices).
    m, d = 16, 64
    state = mj.window_init(m, d, damp=0.1, dtype=jnp.float32)
    for g in rng.standard_normal((3, d)).astype(np.float32):
        state = mj.window_update(state, jnp.asarray(g))
    g = jnp.asarray(rng.standard_normal(d).astype(np.float32))

    def step(state, g):
        return mj.window_update_and_matvec(state, g)[1]

    forward = jax.jacfwd(lambda g: jax.jit(step)(state, g))(g)
    reverse = jax.jacrev(lambda g: jax.jit(step)(state, g))(g)
    assert_close(
        np.asarray(forward),
        np.asarray(reverse),
        kappa=woodbury_kappa(np.asarray(state.grads, np.float64), 0.1) * 8,
    )
    opt = mj.mfac(m, 0.1)
    opt_state = opt.init({"w": jnp.zeros(d, jnp.float32)})
    jac = jax.jacfwd(lambda g: opt.update({"w": g}, opt_state)[0]["w"])(g)
    assert jac.shape == (d, d) and bool(jnp.all(jnp.isfinite(jac)))


# -- optax: hyper-parameters, leaves, defaults (issue 22) ------------------------------------


def test_inject_hyperparams_injects_every_numeric_hyperparameter(rng):
    """damp, learning rate and momentum (not passed) changed mid-run, against the oracle."""
    m, d = 3, 5
    opt = optax.inject_hyperparams(
        mj.mfac_sgd, static_args="num_grads", hyperparam_dtype=jnp.float64
    )(learning_rate=0.1, num_grads=m, damp=0.1)
    params = {"w": jnp.zeros(d)}
    state = opt.init(params)
    assert set(state.hyperparams) == {"learning_rate", "damp", "momentum", "weight_decay"}
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    rows: list[np.ndarray] = []
    b = np.zeros(d)
    schedule = [(0.1, 0.1, 0.0)] * 2 + [(0.5, 0.05, 0.5)] * 3  # (damp, lr, momentum)
    for t, (damp, lr, mu) in enumerate(schedule):
        for name, value in (("damp", damp), ("learning_rate", lr), ("momentum", mu)):
            state.hyperparams[name] = jnp.asarray(value, jnp.float64)
        g = rng.standard_normal(d)
        rows.append(g)
        updates, state = step({"w": jnp.asarray(g)}, state, params)
        s, kappa = window_oracle(rows, m, d, damp, True, g)
        b = mu * b + s
        assert_close(updates["w"], -lr * b, kappa=kappa, err_msg=f"step {t}")
    # The chain: decayed weights (masked), mfac, trace, learning rate.
    window = state.inner_state[1].window
    assert float(window.damp) == 0.5 and int(window.refactors) == 1
    # A traced damping cannot be checked before the step: a bad one refuses the gradient.
    state.hyperparams["damp"] = jnp.asarray(-1e-3, jnp.float64)  # C may stay definite
    updates, bad = step({"w": jnp.asarray(rng.standard_normal(d))}, state, params)
    assert bool(jnp.all(jnp.isnan(updates["w"])))
    for x, y in zip(*map(jax.tree_util.tree_leaves, (bad.inner_state[1], window)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # num_grads is a shape: injecting it is refused with the way out.
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(mj.mfac)(num_grads=m).init(params)
    opt = optax.inject_hyperparams(mj.mfac)(damp=0.1, refactor_every=2)  # default m: not injected
    state = opt.init(params)
    assert set(state.hyperparams) == {"damp", "refactor_every"}
    assert state.inner_state.window.num_grads == 64


@pytest.mark.parametrize("zero_init", [True, False])
def test_window_refuses_a_damping_below_dynamic_ihvps_floor_with_its_message(zero_init):
    """window_init, a step's new damping and mfac's init: DynamicIHVP's floor and message.

    Regression: below about 4.4e-106 (float32; divided by m with zero_init) the window
    was built, and then refused every nonzero gradient as too large.
    """
    m, d, tiny = 3, 4, 1e-110
    with pytest.raises(ValueError) as expected:
        DynamicIHVP(m, d, damp=tiny, dtype="float32", options=WindowOptions(zero_init=zero_init))
    message = f"^{re.escape(str(expected.value))}$"
    assert "too small for a float32 window" in str(expected.value)
    with pytest.raises(ValueError, match=message):
        mj.window_init(m, d, damp=tiny, dtype=jnp.float32, zero_init=zero_init)
    with pytest.raises(ValueError, match=message):
        mj.window_init(m, d, damp=jnp.asarray(tiny), dtype=jnp.float32, zero_init=zero_init)
    state = mj.window_init(m, d, damp=0.1, dtype=jnp.float32, zero_init=zero_init)
    g = jnp.ones(d, jnp.float32)
    for step in (mj.window_update, mj.window_update_and_matvec):
        with pytest.raises(ValueError, match=message):
            step(state, g, damp=tiny)
    with pytest.raises(ValueError, match=message):
        mj.mfac(m, tiny, zero_init=zero_init).init({"w": jnp.zeros(d, jnp.float32)})
    # float64 windows have no floor above float64's smallest normal number.
    assert float(mj.window_init(m, d, damp=1e-300, dtype=jnp.float64).damp) == 1e-300


def test_a_traced_damping_below_the_floor_refuses_the_gradient():
    # Under jit the damping has no value to check: the step refuses the gradient (NaN
    # direction, window unchanged), even a zero one, which it took before and then kept
    # the damping with which the window refused every later gradient.
    state = mj.window_init(2, 3, damp=0.1, dtype=jnp.float32)
    step = jax.jit(mj.window_update_and_matvec)
    new, s = step(state, jnp.zeros(3, jnp.float32), damp=jnp.asarray(1e-110))
    assert bool(jnp.all(jnp.isnan(s)))
    for x, y in zip(*map(jax.tree_util.tree_leaves, (new, state)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    new, s = step(state, jnp.zeros(3, jnp.float32), damp=jnp.asarray(1e-3))
    assert bool(jnp.all(s == 0)) and float(new.damp) == 1e-3


@pytest.mark.parametrize(
    "damp", [np.float32(-1.0), np.ones(1), np.array(True), jnp.ones(1), jnp.asarray(0.0)]
)
def test_a_bad_damping_is_refused_in_the_cores_words(damp):
    # Regression: the JAX checks showed a NumPy scalar as a float (``got -1.0`` for
    # ``np.float32(-1.0)``), and the core an array by its repr.
    with pytest.raises((TypeError, ValueError)) as core:
        mfac_core.StaticIHVP(np.ones((2, 3)), damp=damp)
    message = f"^{re.escape(str(core.value))}$"
    params = {"w": jnp.zeros(3)}
    for call in (
        lambda: mj.static_ihvp(jnp.ones((2, 3)), damp=damp),
        lambda: mj.window_init(2, 3, damp=damp, dtype=jnp.float64),
        lambda: mj.mfac(2, damp).init(params),
    ):
        with pytest.raises(type(core.value), match=message):
            call()


def test_pytree_reprs_show_static_values_only():
    # The dataclass reprs printed every array (read back from the device; tracers under jit).
    op = mj.static_ihvp(jnp.ones((2, 3)), damp=0.5)
    assert repr(op) == "<3x3 mfac_core.jax.StaticIHVP with num_grads=2, damp=0.5, dtype=float64>"
    state = mj.window_init(2, 3, damp=0.1, dtype=jnp.float32)
    expected = "<3x3 mfac_core.jax.WindowState with num_grads=2, zero_init=True, dtype=float32>"
    assert repr(state) == expected
    seen = []
    jax.jit(lambda s: seen.append(repr(s)) or s.count)(state)
    assert seen == [expected]
    batched = jax.vmap(lambda G: mj.static_ihvp(G, damp=0.5))(jnp.ones((4, 2, 3)))
    assert "num_grads=2, damp=0.5, batch_shape=(4,), dtype=float64>" in repr(batched)


def test_mixed_bfloat16_int_and_empty_leaves_work_where_adam_does(rng):
    """Mixed float dtypes (float32 window), a float64 gradient of float32 parameters,
    int leaves (zero update), empty subtrees and None: against the oracle."""
    m, damp, lr = 3, 0.1, 0.5
    params = {
        "w": jnp.asarray(rng.standard_normal(4), jnp.float32),
        "h": jnp.asarray(rng.standard_normal((2, 2)), jnp.bfloat16),
        "n": jnp.arange(3, dtype=jnp.int32),
        "empty": {},
        "none": None,
    }
    opt = optax.chain(mj.mfac(m, damp), optax.scale(-lr))
    state = opt.init(params)
    window = state[0].window
    assert window.dtype == jnp.float32 and window.dim == 8
    step = jax.jit(lambda p, s, g: opt.update(g, s, p))
    rows = []
    for t in range(m + 1):
        grads = {
            "w": jnp.asarray(rng.standard_normal(4)),  # float64: rounded into the window
            "h": jnp.asarray(rng.standard_normal((2, 2)), jnp.bfloat16),
            "n": jnp.ones(3, jnp.int32),
            "empty": {},
            "none": None,
        }
        updates, state = step(params, state, grads)
        flat = np.concatenate(
            [np.asarray(grads["w"], np.float32), np.asarray(grads["h"], np.float32).ravel()]
        ).astype(np.float64)
        rows.append(flat)
        want, kappa = window_oracle(rows, m, 8, damp, True, flat)
        assert updates["w"].dtype == jnp.float64 and updates["h"].dtype == jnp.bfloat16
        got = np.concatenate(
            [np.asarray(updates["w"]), np.asarray(updates["h"], np.float64).ravel()]
        )
        # float32 rounding of the direction, then bfloat16's own for the "h" leaf.
        assert_close(got[:4], -lr * want[:4], kappa=kappa, dtype="float32", err_msg=f"{t}")
        # (100 eps(bfloat16) kappa would be 3.3, a bound a zero result passes: bfloat16's
        # rounding, half an ulp of each entry, is the atol.)
        half_ulp = 2.0**-8 * lr * float(np.linalg.norm(want[4:]))
        assert_close(
            got[4:], -lr * want[4:], kappa=kappa, dtype="float32", atol=half_ulp, err_msg=f"{t}"
        )
        assert not np.any(np.asarray(updates["n"]))  # optax.scale made it float
        new = optax.apply_updates(params, updates)
        np.testing.assert_array_equal(np.asarray(new["n"]), [0, 1, 2])
        assert new["h"].dtype == jnp.bfloat16 and new["empty"] == {} and new["none"] is None
    # A float64 leaf makes the window float64; only int leaves or nothing: no window.
    state = mj.mfac(m, damp).init({"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(1)})
    assert state.window.dtype == jnp.float64
    for empty in ({}, {"n": jnp.arange(2)}, {"a": {}, "b": jnp.zeros((0,), jnp.float32)}):
        tx = mj.mfac(m, damp)
        state = tx.init(empty)
        assert state.window is None
        updates, _ = jax.jit(tx.update)(empty, state)
        for u, x in zip(*map(jax.tree_util.tree_leaves, (updates, empty)), strict=True):
            assert u.dtype == x.dtype and not np.any(np.asarray(u))
    # jax.grad(..., allow_int=True) gives int leaves float0 gradients: zeros of their dtype.
    tx, p = mj.mfac(m, damp), {"w": jnp.ones(2), "n": jnp.arange(2, dtype=jnp.int32)}
    g = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(p)
    updates, _ = tx.update(g, tx.init(p))
    assert updates["n"].dtype == jnp.int32 and not np.any(np.asarray(updates["n"]))
    with jax.enable_x64(False), pytest.raises(RuntimeError, match="jax_enable_x64"):
        mj.mfac(m, damp).init(params)


def test_multi_transform_with_a_label_that_owns_no_parameter(rng):
    params = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    labels = {"a": "mfac", "b": "adam"}
    opt = optax.multi_transform(
        {"mfac": mj.mfac_sgd(0.1, 2, 0.1), "adam": optax.adam(0.1), "idle": mj.mfac(2)}, labels
    )
    state = opt.init(params)
    assert state.inner_states["idle"].inner_state.window is None

    @jax.jit
    def train_step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    g = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    new, state = train_step(params, state, g)
    # Label "mfac" alone: its first step with a zero-initialised window of m = 2.
    want, kappa = window_oracle([np.asarray(g["a"], np.float64)], 2, 3, 0.1, True, g["a"])
    assert_close(new["a"], -0.1 * want, kappa=kappa, dtype="float32")
    assert new["b"].dtype == jnp.float32 and bool(jnp.all(new["b"] != 0))


def test_defaults_are_64_gradients_and_damp_1e_3():
    """docs/guidance.rst: m = 32-64 captures most of the gain; 1e-3 trained best."""
    params = {"w": jnp.zeros(3, jnp.float32)}
    for opt in (mj.mfac(), mj.mfac_sgd(0.1)):
        state = opt.init(params)
        window = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, mj.WindowState))[
            0
        ]
        assert window.num_grads == 64 and float(window.damp) == 1e-3


def test_optax_tree_get_and_tree_set_see_the_mfac_state():
    # Regression: MFACState was a dataclass, which optax.tree_utils does not look into:
    # tree_get(state, "window") found nothing (returned None).
    from optax.tree_utils import tree_get, tree_set

    params = {"w": jnp.ones(3, jnp.float32), "n": jnp.zeros((), jnp.int32)}
    opt = optax.inject_hyperparams(mj.mfac_sgd, static_args="num_grads")(
        learning_rate=0.1, num_grads=2, damp=0.5
    )
    state = opt.init(params)
    assert isinstance(tree_get(state, "MFACState"), mj.MFACState)
    window = tree_get(state, "window")
    assert isinstance(window, mj.WindowState) and window.num_grads == 2
    assert tree_get(state, "param_shapes") == ((), (3,))  # tree_leaves order: n, w
    assert tree_get(state, "param_dtypes") == ("int32", "float32")
    # The window's own fields stay out of reach: no second "count" or "damp" beside
    # inject_hyperparams' step count and hyper-parameter (WindowState is no named tuple).
    assert int(tree_get(state, "count")) == 0 and float(tree_get(state, "damp")) == 0.5
    # tree_set rebuilds the state with the same structure (what jit and update take).
    other = tree_get(opt.init({"w": 2 * params["w"], "n": params["n"]}), "window")
    replaced = tree_set(state, window=other)
    assert jax.tree_util.tree_structure(replaced) == jax.tree_util.tree_structure(state)
    assert tree_get(replaced, "window") is other
    rate = tree_set(state, learning_rate=jnp.asarray(0.2, jnp.float32))
    assert jax.tree_util.tree_structure(rate) == jax.tree_util.tree_structure(state)
    assert float(tree_get(rate, "learning_rate")) == np.float32(0.2)


# -- adversarial optax/JAX use -----------------------------------------------------------------


def test_a_batch_of_windows_or_operators_is_refused_outside_vmap_in_words():
    # Regression: a batch (from jax.vmap) used outside of vmap failed deep in the shape
    # logic ("too many values to unpack", "incompatible shapes for broadcasting"); only
    # StaticIHVP.matvec and .diagonal said what was wrong. A batch is what vmap returns:
    # each leaf stacked (built so here, without compiling a step).
    def stack(tree):
        return jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), tree)

    g = jnp.ones(3, jnp.float32)
    batch = stack(mj.window_init(2, 3, damp=0.1, dtype=jnp.float32))
    ops = mj.StaticIHVP(
        G=jnp.ones((2, 2, 3)), U=jnp.ones((2, 2, 2)), kappa_bound=jnp.ones(2), damp=0.1
    )
    opt = mj.mfac(2, 0.1)
    states = stack(opt.init({"w": g}))
    calls = {
        "windows": (
            lambda: mj.window_update(batch, g),
            lambda: mj.window_update_and_matvec(batch, g),
            lambda: mj.window_matvec(batch, g),
            lambda: batch @ g,
            batch.gradients,
        ),
        "operators": (lambda: ops.matvec(jnp.ones(3)), lambda: ops @ jnp.ones((3, 2))),
        "optimizer states": (lambda: opt.update({"w": g}, states),),
    }
    for what, fns in calls.items():
        for fn in fns:
            with pytest.raises(ValueError, match=f"^a batch of {what} \\(from jax.vmap\\)"):
                fn()


def test_mfac_takes_8_bit_float_leaves_as_adam_does(rng):
    # Regression: the window's dtype came from jnp.result_type, which has no implicit
    # promotion path for 8-bit floats (TypePromotionError at init); adam takes such leaves.
    # Their values enter the float32 window exactly: the step is the float32 one, rounded.
    f8 = jnp.float8_e4m3fn
    grads = {"w": jnp.asarray(rng.standard_normal(2), f8), "v": jnp.ones(1, jnp.float32)}
    wide = {"w": grads["w"].astype(jnp.float32), "v": grads["v"]}
    opt = mj.mfac(4, 0.1)  # the window of test_mfac_sgd_checks_its_learning_rate...: compiled
    state = opt.init(grads)
    assert state.window.dtype == jnp.float32 and state.param_dtypes == ("float32", "float8_e4m3fn")
    updates, _ = opt.update(grads, state)
    want, _ = opt.update(wide, opt.init(wide))
    assert updates["w"].dtype == f8
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(want["w"].astype(f8)))
    np.testing.assert_array_equal(np.asarray(updates["v"]), np.asarray(want["v"]))


def test_inject_hyperparams_over_a_bfloat16_model(rng):
    # Regression: inject_hyperparams casts float hyper-parameters to the parameters' widest
    # float dtype, bfloat16 here, and the check of 0-d arrays went by NumPy's dtype kind,
    # "V" for bfloat16: "damp must be a real number or a 0-d real array" at init.
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    damp = float(jnp.asarray(0.1, jnp.bfloat16))  # what the injected damping is
    # The window of test_mfac_sgd_checks_its_learning_rate...: its step is compiled.
    opt = optax.inject_hyperparams(mj.mfac, static_args="num_grads")(num_grads=4, damp=0.1)
    state = opt.init(params)
    assert state.hyperparams["damp"].dtype == jnp.bfloat16
    assert float(state.inner_state.window.damp) == damp
    plain = mj.mfac(4, damp)
    plain_state = plain.init(params)
    grads = {"w": jnp.asarray(rng.standard_normal(3), jnp.bfloat16)}
    for _ in range(2):  # the injected damping equals the window's: no refactorisation
        updates, state = opt.update(grads, state, params)
        want, plain_state = plain.update(grads, plain_state)
        np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(want["w"]))
    assert int(state.inner_state.window.refactors) == 0
    # mfac_sgd's checks, as inject_hyperparams calls it with bfloat16 arrays.
    bf16 = {k: jnp.asarray(0.5, jnp.bfloat16) for k in ("learning_rate", "momentum", "damp")}
    mj.mfac_sgd(**bf16, num_grads=4, weight_decay=bf16["damp"])  # refused before the fix
    for name in ("learning_rate", "momentum", "weight_decay"):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            mj.mfac_sgd(**{**bf16, name: jnp.asarray(-1.0, jnp.bfloat16)})


def test_a_damping_that_inject_hyperparams_rounds_to_zero_says_so():
    # Regression: over float16 parameters inject_hyperparams casts damp=1e-8 to float16,
    # 0.0, and init refused "damp must be finite and > 0, got 0.0" without naming the cast
    # or the option that keeps the value (adam's eps is cast the same way).
    params = {"w": jnp.ones(3, jnp.float16)}
    for transform, kw in ((mj.mfac, {}), (mj.mfac_sgd, {"learning_rate": 0.1})):
        injected = optax.inject_hyperparams(transform)(damp=1e-8, **kw)
        with pytest.raises(ValueError, match=r"got 0\.0 \(a float16 array: .*hyperparam_dtype"):
            injected.init(params)
        kept = optax.inject_hyperparams(transform, hyperparam_dtype=jnp.float32)(damp=1e-8, **kw)
        assert float(kept.init(params).hyperparams["damp"]) > 0
    with pytest.raises(ValueError, match=r"^damp must be finite and > 0, got 0\.0$"):
        mj.mfac(damp=jnp.asarray(0.0, jnp.float32)).init(params)  # no hint: not rounded


def test_a_2_byte_hyperparameter_that_no_rounding_explains_names_no_cast():
    # Regression: a negative or NaN 2-byte value (given so, not rounded out of range) was
    # refused with the inject_hyperparams hint, which sent the user after a cast that did not
    # happen; a momentum rounded up to 1.0 still gets it.
    params = {"w": jnp.ones(3, jnp.float16)}
    for value in (-1.0, math.nan):
        with pytest.raises(ValueError, match=r"^damp must be finite and > 0, got [-\w.]+$"):
            mj.mfac(damp=jnp.asarray(value, jnp.float16)).init(params)
        with pytest.raises(ValueError, match=r"^learning_rate must be .*, got [-\w.]+$"):
            mj.mfac_sgd(learning_rate=jnp.asarray(value, jnp.bfloat16))
    with pytest.raises(ValueError, match=r"got 1\.0 \(a bfloat16 array: .*hyperparam_dtype"):
        mj.mfac_sgd(learning_rate=0.1, momentum=jnp.asarray(0.9999, jnp.bfloat16))


@pytest.mark.skipif(not hasattr(jax, "set_mesh"), reason="JAX without explicit sharding")
def test_mfac_under_explicit_sharding_gives_each_update_its_leafs_type(rng):
    # Regression: under explicit sharding (shardings in the types) the flat gradient's
    # jnp.concatenate raised ShardingTypeError for leaves of different shardings, where
    # adam works; the updates must also have the gradients' types, or the lax.cond of
    # optax.apply_if_finite refuses them. One device suffices: the types differ.
    P = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    values = {k: rng.standard_normal(n).astype(np.float32) for k, n in (("a", 2), ("b", 1))}
    want, _ = (opt := mj.mfac(4, 0.1)).update(values, opt.init(values))  # 4 x 3: compiled
    with jax.set_mesh(mesh):
        along_x = jax.sharding.NamedSharding(mesh, P("x"))
        grads = {
            "a": jax.device_put(values["a"], along_x),
            "b": jnp.asarray(values["b"]),
            "n": jax.device_put(jnp.zeros(2, jnp.int32), along_x),
        }
        updates, state = opt.update(grads, opt.init(grads))
        again, _ = opt.update(grads, state)  # the state's types stay those of init's
    for k in grads:
        assert jax.typeof(updates[k]) == jax.typeof(grads[k]), k
        assert jax.typeof(again[k]) == jax.typeof(grads[k]), k
    assert jax.typeof(updates["a"]).sharding.spec == P("x")
    for k in values:
        np.testing.assert_array_equal(np.asarray(updates[k]), np.asarray(want[k]))
    assert not np.any(np.asarray(updates["n"]))


_EAGER_SHARDED_CHILD = """
import jax, jax.numpy as jnp, numpy as np, optax
from mfac_core import jax as mj
jax.config.update("jax_enable_x64", True)
P = jax.sharding.PartitionSpec
mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
along_x = jax.sharding.NamedSharding(mesh, P("x"))
rng = np.random.default_rng(0)
values = {k: rng.standard_normal(n).astype(np.float32) for k, n in (("a", 4), ("b", 3))}
want, _ = (opt := mj.mfac(4, 0.1)).update(values, opt.init(values))
grads = {
    "a": jax.device_put(values["a"], along_x),
    "b": jnp.asarray(values["b"]),
    "n": jax.device_put(jnp.zeros(2, jnp.int32), along_x),
}
updates, state = opt.update(grads, opt.init(grads))  # eager, outside of jax.set_mesh
again, _ = jax.jit(opt.update)(grads, state)
floats = {k: grads[k] for k in values}
adams, _ = (adam := optax.adam(0.1)).update(floats, adam.init(floats))
for k in grads:  # the types of adam's updates ("b" is on the mesh, as the window is)
    typed = jax.typeof((adams if k in values else grads)[k])
    assert jax.typeof(updates[k]) == typed and jax.typeof(again[k]) == typed, k
for k in values:
    np.testing.assert_array_equal(np.asarray(updates[k]), np.asarray(want[k]))
assert not np.any(np.asarray(updates["n"]))
cols = jax.sharding.NamedSharding(mesh, P(None, "x"))
stacked = {k: jax.device_put(np.stack([grads[k]] * 2), cols) for k in ("a", "n")}
with jax.set_mesh(mesh):  # under vmap the leaves' meshes are abstract: reshard, as before
    batched = jax.vmap(lambda g: opt.update(g, opt.init(g))[0])(stacked)
assert all(jax.typeof(batched[k]) == jax.typeof(stacked[k]) for k in stacked)
print("sharded ok")
"""


@pytest.mark.skipif(not hasattr(jax, "set_mesh"), reason="JAX without explicit sharding")
def test_mfac_on_a_two_device_mesh_needs_no_mesh_context_outside_of_jit():
    # Regression: init and an eager update put the new window and a zero update on the
    # parameters' mesh with jax.sharding.reshard, which outside of jax.set_mesh refuses an
    # array not yet on a mesh of two devices ("Please enter your `jit` into a mesh
    # context"), where adam's eager init and update work. Two CPU devices: in a child.
    proc = _on_two_devices(_EAGER_SHARDED_CHILD)
    assert proc.returncode == 0 and "sharded ok" in proc.stdout, proc.stdout + proc.stderr


def _on_two_devices(source: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` in a child Python whose JAX has two CPU devices (set before import)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT, "XLA_FLAGS": flags.strip()}
    return subprocess.run(
        [sys.executable, "-c", source], env=env, cwd=ROOT, capture_output=True, text=True
    )


_SHARD_MAP_CHILD = """
import numpy as np, jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from jax.sharding import Mesh, PartitionSpec as P
from mfac_core import jax as mj

mesh = Mesh(np.array(jax.devices()), ("x",))
rng = np.random.default_rng(0)
m, d = 4, 64
G = jnp.asarray(rng.standard_normal((2, d)), jnp.float32)
W = jnp.asarray(rng.standard_normal((2, m, d)), jnp.float32)
base = mj.window_init(m, d, damp=0.1, dtype=jnp.float32)
states = jax.vmap(lambda w: mj.window_update(base, w[0]))(W)
for _ in range(m):  # full windows: the next update is a row edit
    states = jax.vmap(mj.window_update)(states, G)


def own_window(S, g):  # each device its own window and gradient
    s = jax.tree_util.tree_map(lambda a: a[0], S)
    s, y = mj.window_update_and_matvec(s, g[0])
    return jax.tree_util.tree_map(lambda a: a[None], s), y[None]


def own_optimizer(w):  # a window made on the device, over the device's own parameters
    opt = mj.mfac(m, 0.1)
    p = {"w": w[0]}
    return opt.update({"w": jnp.sin(p["w"])}, opt.init(p), p)[0]["w"][None]


def own_operator(Gl, x):  # d past one span of the Gram's blocks, and the diagonal
    op = mj.static_ihvp(Gl, damp=0.1)
    return (op @ x[0])[None], op.diagonal()[None]


spec = P("x")
two = (spec, spec)
_, Y = jax.jit(jax.shard_map(own_window, mesh=mesh, in_specs=two, out_specs=two))(states, G)
want = jax.vmap(mj.window_update_and_matvec)(states, G)[1]
assert np.array_equal(np.asarray(Y), np.asarray(want))
U = jax.jit(jax.shard_map(own_optimizer, mesh=mesh, in_specs=spec, out_specs=spec))(G)
opt = mj.mfac(m, 0.1)
want = [opt.update({"w": jnp.sin(G[i])}, opt.init({"w": G[i]}))[0]["w"] for i in range(2)]
assert np.array_equal(np.asarray(U), np.asarray(jnp.stack(want)))
D = 20_000
Gs = jnp.asarray(rng.standard_normal((2 * m, D)), jnp.float32)
X = jnp.asarray(rng.standard_normal((2, D)), jnp.float32)
Y, Z = jax.jit(jax.shard_map(own_operator, mesh=mesh, in_specs=two, out_specs=two))(Gs, X)
for i in range(2):
    op = mj.static_ihvp(Gs[i * m : (i + 1) * m], damp=0.1)
    assert np.array_equal(np.asarray(Y[i]), np.asarray(op @ X[i]))
    assert np.array_equal(np.asarray(Z[i]), np.asarray(op.diagonal()))
print("shard_map ok")
"""


@pytest.mark.skipif(not hasattr(jax, "shard_map"), reason="JAX without jax.shard_map")
def test_windows_and_operators_of_each_devices_own_arrays_under_shard_map():
    # Regression: the passes' loops started from zeros, and a window's skipped edit gave
    # constants, which shard_map types as the same on every device, while the loops'
    # and the edit's results vary over them: "scan body function carry input and carry
    # output must have equal types" (and "cond branches must have equal output types").
    proc = _on_two_devices(_SHARD_MAP_CHILD)
    assert proc.returncode == 0 and "shard_map ok" in proc.stdout, proc.stdout + proc.stderr


def test_a_refactor_every_beyond_int32_means_never():
    # Regression: window_init and mfac raised a bare OverflowError for 2**31, and an
    # injected 2**40 (int64 in 64-bit mode) wrapped to 0: a refactorisation every step.
    top = np.iinfo(np.int32).max
    state = mj.window_init(2, 3, damp=0.1, dtype=jnp.float64, refactor_every=2**40)
    assert int(state.refactor_every) == top
    inject = optax.inject_hyperparams(mj.mfac, static_args=("num_grads",))
    opt = inject(num_grads=2, damp=0.1, refactor_every=2**40)
    params = {"w": jnp.ones(3, jnp.float64)}
    opt_state = opt.init(params)
    for k in range(6):
        _, opt_state = opt.update({"w": jnp.arange(3.0) + k}, opt_state, params)
    window = opt_state.inner_state.window
    assert int(window.refactor_every) == top
    assert int(window.refactors) == 0  # zero_init: every step an edit (wrapped: 6 of 6)


def test_window_refuses_a_damping_whose_shift_overflows_with_the_cores_message(rng):
    """m damp beyond float64's range: refused at the door in DynamicIHVP's words.

    Regression: ``window_init(32, d, damp=1e307)`` was built, and its steps' products
    were NaN (the shift m damp of the capacitance matrix overflowed; here 2 * 1e308). At the largest
    damping that works the window agrees with the core, gradients of ~1e150 included
    (squared norms ~1e302 beside the shift ~1.8e308).
    """
    m, d, huge, zero_init = 2, 3, 1e308, True
    options = WindowOptions(zero_init=zero_init)
    with pytest.raises(ValueError) as expected:
        DynamicIHVP(m, d, damp=huge, dtype="float64", options=options)
    message = f"^{re.escape(str(expected.value))}$"
    assert "the largest damping that works is" in str(expected.value)
    with pytest.raises(ValueError, match=message):
        mj.window_init(m, d, damp=huge, dtype=jnp.float64, zero_init=zero_init)
    with pytest.raises(ValueError, match=message):
        mj.mfac(m, huge, zero_init=zero_init).init({"w": jnp.zeros(d, jnp.float64)})
    top = float(str(expected.value).rsplit(" ", 1)[-1])
    state = mj.window_init(m, d, damp=top, dtype=jnp.float64, zero_init=zero_init)
    for step in (mj.window_update, mj.window_update_and_matvec):
        with pytest.raises(ValueError, match=message):
            step(state, jnp.ones(d), damp=huge)
    core = DynamicIHVP(m, d, damp=top, dtype="float64", options=options)
    G = rng.standard_normal((3, d)) * 2.0**500
    for g in G:
        core.update(g)
        state = mj.window_update(state, jnp.asarray(g))
    assert int(state.count) == len(core)
    x = rng.standard_normal(d) * 2.0**500  # a gradient-sized vector: F^{-1} x ~ 1e-157
    want = core.matvec(x)
    got = np.asarray(mj.window_matvec(state, jnp.asarray(x)))
    assert np.all(np.isfinite(got))
    assert_close(got, want, kappa=1.0, dtype="float64")
    # A traced damping has no value to check: the step refuses the gradient instead.
    new, s = jax.jit(mj.window_update_and_matvec)(state, jnp.ones(d), damp=jnp.asarray(huge))
    assert bool(jnp.all(jnp.isnan(s))) and int(new.count) == int(state.count)
    assert float(new.damp) == top
    # The other end: damp = 1e-300 with gradients of ~1e-151 (kappa ~ 10), whose products
    # (~1e150) are as representable; the same compiled steps. (Gradients of ~1e-154, whose
    # entries' products are subnormal, lose digits in JAX: XLA flushes subnormals to zero.)
    low = 1e-300
    state = mj.window_init(m, d, damp=low, dtype=jnp.float64, zero_init=zero_init)
    core = DynamicIHVP(m, d, damp=low, dtype="float64", options=options)
    for g in G * 2.0**-1000:
        core.update(g)
        state = mj.window_update(state, jnp.asarray(g))
    x = x * 2.0**-1000
    got = np.asarray(mj.window_matvec(state, jnp.asarray(x)))
    assert_close(got, core.matvec(x), kappa=100.0, dtype="float64")


def test_static_ihvp_of_gradients_near_float64s_largest_number_does_not_warn(rng):
    # Regression: the power iterations behind the bounds of kappa summed products of Gram
    # entries (0.4 of float64's largest number) past its range: "kappa >= inf" for kappa
    # ~ 100 (the core's bounds too, which share the function).
    g = rng.standard_normal(3)
    G = np.stack([g, g + 1e-3 * rng.standard_normal(3)])
    G *= np.sqrt(0.4 * np.finfo(np.float64).max) / np.linalg.norm(G, axis=1, keepdims=True)
    damp = float(np.sum(G[0] ** 2)) / 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = mj.static_ihvp(jnp.asarray(G), damp=damp)
        core = mfac_core.StaticIHVP(G, damp=damp)
    assert 50.0 < float(op.kappa_bound) < 300.0
    x = G[0] + G[1]
    want = core.matvec(x)
    assert_close(np.asarray(op.matvec(jnp.asarray(x))), want, kappa=300.0, dtype="float64")


def test_gram_and_projection_sums_do_not_lean_one_way():
    # Regression: XLA's CPU dot summed each entry of G G^T and of G x over all columns in
    # one running sum; for two float32 gradients with a shared mean, whose products have one
    # sign and size, those roundings leaned one way, and the product of their mean at
    # kappa = 1e6 was 1160 eps(float32) off (mfac_core.StaticIHVP over JAX arrays) and 150
    # (mfac_core.jax.static_ihvp), against the documented 8.
    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("numpy.longdouble is float64 here: no reference beyond float64")
    rng = np.random.default_rng(2)
    d = 200_000
    a = np.array([1.2616, 1.2985], np.float32)
    G = (a[:, None] + 2.0**-9 * rng.choice([-1.0, 1.0], size=(2, d))).astype(np.float32)
    G64 = G.astype(np.float64)
    damp = float(np.linalg.norm(G64, 2) ** 2 / (2 * (1e6 - 1)))
    x = G.mean(axis=0)
    want = extended_precision_inverse(G64, damp, x.astype(np.float64))
    eps32 = np.finfo(np.float32).eps
    Gj = jnp.asarray(G)
    for op in (mfac_core.StaticIHVP(Gj, damp=damp), mj.static_ihvp(Gj, damp=damp)):
        got = np.asarray(op @ jnp.asarray(x), np.float64)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err <= 8 * eps32, (type(op).__module__, err / eps32)


def test_reverse_mode_through_the_blocked_gram():
    # The host Gram sums blocks of 256 columns in loops (_gram.contract_columns): their trip
    # counts are static, so they are scans, which jax.grad goes through (a while loop is not).
    rng = np.random.default_rng(0)
    m, damp = 4, 0.1
    G = jnp.asarray(rng.standard_normal((m, 3000)) / 50)
    x = jnp.asarray(rng.standard_normal(3000))

    def loss(G):
        return jnp.sum(jnp.sin(mj.static_ihvp(G, damp=damp) @ x))

    def dense(G):  # Woodbury's form in plain jax.numpy, whose gradient JAX derives too
        a = jnp.linalg.solve(G @ G.T + m * damp * jnp.eye(m), G @ x)
        return jnp.sum(jnp.sin((x - G.T @ a) / damp))

    assert "while[" not in str(jax.make_jaxpr(jax.grad(loss))(G))
    got, want = np.asarray(jax.grad(loss)(G)), np.asarray(jax.grad(dense)(G))
    assert np.linalg.norm(got - want) <= 1e-10 * np.linalg.norm(want)
