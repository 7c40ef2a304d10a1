"""Shared small problems. Every test in this suite runs in float64."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hvpopt
from hvpopt.testbed.models import TransformerConfig

jax.config.update("jax_enable_x64", True)

# The suite's programs are small and compiled once each: their compile time, not their run time, is the
# suite's. LLVM at -O0 compiles them about a third faster (a K-FAC step of a 2-layer transformer: 10.3 s ->
# 6.8 s; the suite 11:35-12:31 -> 10:06 on 2 cores) and runs them slower, which these sizes do not notice.
# Set before any backend starts; the CLI and sharded-suite subprocesses inherit it. A test whose numbers sit
# at the limit of float64 (where the order of a sum matters) runs again compiled as users run it:
# rerun_optimized.
OPTIMIZED = "HVPOPT_TESTS_OPTIMIZED"  # set in a process that compiles at XLA's default optimization level
UNOPTIMIZED = "--xla_backend_optimization_level=0"
if not os.environ.get(OPTIMIZED) and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {UNOPTIMIZED}".strip()


def rerun_optimized(request) -> bool:
    """Runs the calling test again in a process that compiles as users do (XLA's default LLVM optimization).

    Returns True in the suite's process, whose test then returns (the subprocess ran it); False in that
    process, where the test runs.
    """
    if os.environ.get(OPTIMIZED):
        return False
    flags = os.environ.get("XLA_FLAGS", "").replace(UNOPTIMIZED, "").strip()
    env = {**os.environ, OPTIMIZED: "1", "XLA_FLAGS": flags}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", request.node.nodeid]
    run = subprocess.run(command, env=env, cwd=request.config.rootpath, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-6000:] + run.stderr[-2000:]
    return True


# Tests, xdist workers and the command-line subprocesses compile many identical
# programs (the same small models, the same training step): one compilation
# cache for the session compiles each once. The first process to get here makes
# it; the workers and subprocesses it starts inherit it through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hvpopt-test-compilations-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("HVPOPT_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])  # the command line's
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

# The sharded tests need several devices; with fewer, tests/test_multi_device.py
# runs them in a process of their own.
collect_ignore = [] if jax.device_count() >= 4 else ["multi_device"]


class Problem(NamedTuple):
    """``loss(model_fn(params, inputs), targets)`` and its pieces."""

    name: str
    model_fn: Callable
    loss: Callable
    params: Any
    inputs: Any
    targets: Any
    # The same function written without custom_vjp, for ground truth.
    reference_model_fn: Callable | None = None

    def objective(self, params, inputs=None, targets=None):
        inputs = self.inputs if inputs is None else inputs
        targets = self.targets if targets is None else targets
        return self.loss(self.model_fn(params, inputs), targets)

    def reference_objective(self, params):
        model_fn = self.reference_model_fn or self.model_fn
        return self.loss(model_fn(params, self.inputs), self.targets)


def to_float64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


@jax.custom_vjp
def custom_sigmoid(x):
    return jax.nn.sigmoid(x)


custom_sigmoid.defvjp(
    lambda x: (jax.nn.sigmoid(x), x),
    lambda x, g: (g * jax.nn.sigmoid(x) * (1 - jax.nn.sigmoid(x)),),
)


@jax.custom_vjp
def custom_softplus(x):
    """Softplus whose backward rule calls another custom_vjp, as library code does.

    Forward-over-reverse differentiates the backward rule in forward mode and
    meets ``custom_sigmoid``, where forward mode is undefined.
    """
    return jax.nn.softplus(x)


custom_softplus.defvjp(lambda x: (jax.nn.softplus(x), x), lambda x, g: (g * custom_sigmoid(x),))


def make_mlp() -> Problem:
    model_fn, params = hvpopt.testbed.models.mlp((4, 6, 3), seed=1)
    x = jax.random.normal(jax.random.key(0), (8, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (8,), 0, 3)
    return Problem("mlp", model_fn, hvpopt.losses.softmax_cross_entropy, to_float64(params), x, y)


def make_transformer() -> Problem:
    config = TransformerConfig(vocab_size=5, d_model=4, num_layers=1, num_heads=2, context_length=4, mlp_ratio=2)
    model_fn, params = hvpopt.testbed.models.transformer_lm(config, seed=2)
    tokens = jax.random.randint(jax.random.key(3), (3, 5), 0, 5)
    return Problem(
        "transformer",
        model_fn,
        hvpopt.losses.softmax_cross_entropy,
        to_float64(params),
        tokens[:, :-1],
        tokens[:, 1:],
    )


def make_custom_vjp() -> Problem:
    model_fn, params = hvpopt.testbed.models.mlp((4, 5, 3), activation=custom_softplus, seed=4)
    reference_model_fn, _ = hvpopt.testbed.models.mlp((4, 5, 3), activation=jax.nn.softplus, seed=4)
    x = jax.random.normal(jax.random.key(5), (6, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(6), (6,), 0, 3)
    loss = hvpopt.losses.softmax_cross_entropy
    return Problem("custom_vjp", model_fn, loss, to_float64(params), x, y, reference_model_fn)


PROBLEMS = {"mlp": make_mlp, "transformer": make_transformer, "custom_vjp": make_custom_vjp}


@pytest.fixture(params=sorted(PROBLEMS), scope="module")
def problem(request) -> Problem:
    return PROBLEMS[request.param]()


def random_like(key, tree):
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def dense_hessian(f, params) -> np.ndarray:
    """Ground truth: ``jax.hessian`` of ``f`` on the raveled parameters."""
    x, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda z: f(unravel(z))))(x))


def problem_hessian(problem: Problem) -> np.ndarray:
    """The dense Hessian of a problem's objective, from its custom_vjp-free twin."""
    if problem.name not in _HESSIANS:
        _HESSIANS[problem.name] = dense_hessian(problem.reference_objective, problem.params)
    return _HESSIANS[problem.name]


_HESSIANS: dict[str, np.ndarray] = {}


def dense_ggn(problem: Problem) -> np.ndarray:
    """Ground truth: explicit ``J^T H_L J`` from dense Jacobian and output Hessian."""
    x, unravel = ravel_pytree(problem.params)
    model_fn = problem.reference_model_fn or problem.model_fn
    outputs = model_fn(problem.params, problem.inputs)
    jac = jax.jit(jax.jacobian(lambda z: model_fn(unravel(z), problem.inputs).ravel()))(x)
    loss = lambda o: problem.loss(o.reshape(outputs.shape), problem.targets)
    hess_out = jax.jit(jax.hessian(loss))(outputs.ravel())
    return np.asarray(jac.T @ hess_out @ jac)


def rel_error(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
