"""A tour of the curvature products on a built-in model, with timings and checks.

``hvpopt demo`` runs :func:`curvature_tour`: on a batch of a built-in task (the
small transformer language model of the shipped corpus by default) or of a
trained checkpoint, it reports what each product costs next to a gradient, how
the modes agree, and how much curvature the loss has along its gradient.
"""

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

import hvpopt
from hvpopt import _checks
from hvpopt.testbed.tasks import Task, first_batch


def curvature_tour(task: Task, params: Any, *, batch_size: int = 16, seed: int = 0, repeats: int = 5) -> dict[str, Any]:
    """Runs every product once compiled and returns a report (a JSON-able dict).

    Args:
      task: a built-in task (:func:`hvpopt.testbed.tasks.make_task`).
      params: its parameters (``task.params``, or a checkpoint's).
      batch_size: the first ``batch_size`` training examples form the batch.
      seed: seed of the random probes.
      repeats: timed calls per product after compilation; the median is kept.
    """
    _checks.check_positive_int("repeats", repeats)
    inputs, targets = first_batch(task, batch_size)
    model_fn, loss = task.model_fn, task.loss
    objective = lambda p: task.batch_loss(p, inputs, targets)
    grads = jax.jit(jax.grad(objective))(params)
    key_mc, key_diag = jax.random.split(jax.random.key(seed))

    timed = {
        "grad": jax.jit(lambda p, v: jax.grad(objective)(p)),
        **{
            f"hvp[{mode}]": jax.jit(lambda p, v, mode=mode: hvpopt.hvp(objective, p, v, mode=mode))
            for mode in hvpopt.HVP_MODES
            if mode != "auto"
        },
        "ggn_vp": jax.jit(lambda p, v: hvpopt.ggn_vp(model_fn, loss, p, v, inputs, targets)),
        "mc_fisher_vp": jax.jit(
            lambda p, v: hvpopt.mc_fisher_vp(model_fn, loss, p, v, inputs, targets, key=key_mc, num_samples=1)
        ),
    }
    results = {name: _time(fn, params, grads, repeats) for name, fn in timed.items()}
    grad_seconds = results["grad"][1]
    reference = results["hvp[fwd_rev]"][0]
    products = {
        name: {
            "seconds": seconds,
            "compile_seconds": compile_seconds,
            "time_vs_grad": seconds / grad_seconds,
            "relative_difference_to_fwd_rev": _relative(out, reference) if name.startswith("hvp") else None,
        }
        for name, (out, seconds, compile_seconds) in results.items()
    }
    g_norm2 = otu.tree_vdot(grads, grads)
    ggn_out = results["ggn_vp"][0]
    hutchinson = jax.jit(
        lambda p: hvpopt.hutchinson_diagonal(
            hvpopt.ggn_operator(model_fn, loss, p, inputs, targets), p, key=key_diag, num_samples=8
        )
    )(params)
    return {
        "model": task.describe(),
        "parameters": int(ravel_pytree(params)[0].size),
        "loss": float(objective(params)),
        "grad_norm": float(jnp.sqrt(g_norm2)),
        "products": products,
        "curvature_along_gradient": {
            "hessian": float(otu.tree_vdot(grads, reference) / g_norm2),
            "gauss_newton": float(otu.tree_vdot(grads, ggn_out) / g_norm2),
        },
        "ggn_trace_hutchinson_8_probes": float(otu.tree_sum(hutchinson)),
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
        "hvpopt_version": hvpopt.__version__,
    }


def _time(fn: Callable, params, v, repeats: int):
    start = time.perf_counter()
    compiled = fn.lower(params, v).compile()
    compile_seconds = time.perf_counter() - start
    out = jax.block_until_ready(compiled(params, v))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, v))
        seconds.append(time.perf_counter() - start)
    return out, statistics.median(seconds), compile_seconds


def _relative(a, b) -> float:
    return float(otu.tree_norm(otu.tree_sub(a, b)) / otu.tree_norm(b))


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for a terminal."""
    lines = [
        f"model        {report['model']}",
        f"parameters   {report['parameters']:,}",
        f"loss         {report['loss']:.4f}   |grad| {report['grad_norm']:.4f}",
        "",
        f"{'product':<16}{'ms':>9}{'x grad':>9}{'compile s':>11}{'rel. diff to fwd_rev':>22}",
    ]
    for name, row in report["products"].items():
        diff = row["relative_difference_to_fwd_rev"]
        lines.append(
            f"{name:<16}{1e3 * row['seconds']:>9.2f}{row['time_vs_grad']:>9.2f}"
            f"{row['compile_seconds']:>11.2f}{'' if diff is None else f'{diff:.1e}':>22}"
        )
    curvature = report["curvature_along_gradient"]
    lines += [
        "",
        "curvature along the gradient, g^T A g / g^T g:",
        f"  Hessian {curvature['hessian']:.4f}   Gauss-Newton {curvature['gauss_newton']:.4f}",
        f"Gauss-Newton trace (Hutchinson, 8 probes): {report['ggn_trace_hutchinson_8_probes']:.4f}",
    ]
    return "\n".join(lines)
