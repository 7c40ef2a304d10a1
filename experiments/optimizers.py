"""Second-order optimizers against AdamW and L-BFGS: loss against steps, cost and wall-clock.

Newton-CG (``hvpopt.newton_cg``), Hessian-free (``hvpopt.hessian_free``) and
natural gradient (``hvpopt.natural_gradient``, true Fisher, line-searched from 1)
are compared with AdamW and ``optax.lbfgs`` (memory 10, zoom line search) on
five problems, all in float32:

* ``rosenbrock``: the extended Rosenbrock function (More, Garbow & Hillstrom,
  1981, problem 21) in 100 dimensions from ``(-1.2, 1, -1.2, 1, ...)``, written
  as least squares: ``model_fn`` returns the residuals ``10 (x_2i - x_2i-1^2)``
  and ``1 - x_2i-1``, the loss is ``hvpopt.losses.squared_error`` against zero,
  so the objective is ``1/2 sum r^2`` (half the usual sum) and Hessian-free and
  natural gradient run on its Gauss-Newton matrix ``J^T J``.
* ``logistic``: multinomial logistic regression, task ``blobs`` with no hidden
  layer (convex, L2 1e-2), plotted as the gap to the lowest loss any run reached.
* ``mlp``: task ``blobs`` with a tanh MLP of hidden sizes ``[32, 32]`` (L2 1e-2).
* ``transformer_full``: task ``shakespeare``, a 2-layer transformer (d_model
  32, 4 heads, context 32; 30,591 parameters) trained full batch on a fixed
  random subset of 128 training sequences (which it can nearly memorise).
* ``transformer_minibatch``: the same model on all 8,178 training sequences,
  32 per step, the same batches for every method; the curvature batch of
  Hessian-free and natural gradient is the gradient batch. The plotted loss is
  the objective on a fixed random subset of 256 training sequences every 10
  steps (not timed).

The transformer runs also report the loss on the whole validation split at the end.

Settings. AdamW runs the way ``hvpopt train`` runs it: linear warm-up over 5%
of the steps, cosine decay to a tenth at the last step, clipping at global norm
1, decoupled weight decay 1e-4 on the transformer and 0 elsewhere (those
objectives carry their own L2 term or none). The second-order methods run at
most 20 CG iterations per step; the curvature of Hessian-free and natural
gradient is the Gauss-Newton (= true Fisher) matrix of the data loss, so the
L2 term's curvature is added the way ``hvpopt train`` does it (Hessian-free's
``min_damping = l2``, natural gradient's ``damping + l2``). Each method's main
knob is swept (AdamW's learning rate, three values; Newton-CG's damping,
Hessian-free's initial damping, natural gradient's damping, three values on
the small problems and two on the transformer, around the best of a 40-step
pilot over three; L-BFGS keeps optax's defaults, its line search sets the
step). The best setting has the lowest final training loss; every run is kept
in the JSON (non-finite numbers as null). The knob reaches the jitted step as a
traced scalar, so a sweep compiles once.

Budgets. AdamW and L-BFGS take 500 steps (AdamW's whole schedule), the
second-order methods at most 150, and on the transformer problems they also
stop once they have spent 5x AdamW's 500 gradient-equivalents (2,500): by then
they have lost the wall-clock comparison.

Cost model (gradient-equivalents, one definition everywhere): a loss-and-
gradient evaluation costs 1, a loss evaluation alone 0.5, a Hessian-,
Gauss-Newton- or Fisher-vector product 2. The counts come from the optimizers'
own counters (``num_hvps``, ``num_ggn_products``, ``num_fisher_products``,
``num_value_evals``; L-BFGS's ``num_linesearch_steps``, each a loss and a
gradient; full-batch L-BFGS reuses the line search's last gradient through
``optax.value_and_grad_from_state``). The linearization a curvature operator
builds once per step is not counted. The real ratios on this machine are
measured once on the full-batch transformer (a loss, a gradient, and a product
in a jitted loop of 10 with its linearization) and stored under
``measured_cost_ratios``; the wall-clock panel needs no model.

Timing: each step (gradient, update, apply) is one ``jax.jit``-ed function,
compiled ahead of time (``compile_seconds``, excluded) and blocked on
(``jax.block_until_ready``); trace point ``k`` holds the loss at the parameters
after ``k`` steps and the gradient-equivalents and seconds spent to reach them.
The machine may be shared: the load average is recorded.

Each run also reports when it first reached its problem's level (``reached``):
within 1e-4 (1 + |f*|) of the lowest loss any run reached (f*) on the small
problems, AdamW's final loss on the transformer problems.

Target (from the issue), checked on ``transformer_full``: reach AdamW's 500-step
training loss (best learning rate) in at most 0.3x its steps (150) and no
slower in wall-clock. ``targets`` in the JSON gives, for every run of the other
methods, the first step at or below that loss with the step and wall-clock
ratios, or says that it missed; also the first step within 5% of it.

Usage::

    python experiments/optimizers.py                                    # full run, ~15-20 min on 2 CPU cores
    python experiments/optimizers.py --quick --out-dir /tmp/opt_quick   # smoke run, < 1.5 min

``--quick`` shrinks every problem, runs one setting per method and turns XLA's
optimisations off (it compiles about twice as fast); its numbers mean nothing.

Writes ``optimizers.json`` and ``optimizers_<problem>.png`` to ``--out-dir``
(default ``experiments/results``).

Reference:
  More, Garbow, Hillstrom, "Testing unconstrained optimization software",
  ACM TOMS 1981.
"""

import argparse
import dataclasses
import functools
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

import hvpopt
from hvpopt.testbed.training import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import cpu_load, environment, write_results  # noqa: E402

#: Gradient-equivalents of one gradient, one loss evaluation, one curvature-vector product.
COST = {"gradient": 1.0, "value": 0.5, "product": 2.0}
PRODUCT_COUNTERS = ("num_hvps", "num_ggn_products", "num_fisher_products")
TARGET_STEP_FRACTION = 0.3
NEAR_TARGET = 1.05  # also reported: the first step within 5% of AdamW's loss
NEAR_OPTIMAL = 1e-4  # small problems: a run has converged within 1e-4 (1 + |f*|) of the lowest loss seen
MONITOR_EVERY = 10  # steps between evaluations of a mini-batch problem's plotted loss
LBFGS_MEMORY = 10  # optax's default; L-BFGS is not swept (its line search sets the step)


# ------------------------------------------------------------------------------ problems


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """What a run needs: the split loss, the batches, the budgets and the sweeps.

    ``objective(params, inputs, targets)`` is jitted (it is also evaluated
    outside the steps); ``batch(k)`` gives the ``(inputs, targets)`` of step
    ``k``; ``monitor`` is the ``(inputs, targets)`` whose objective is plotted
    on a mini-batch problem (None: the full-batch step's own loss).
    """

    name: str
    title: str
    model_fn: Callable
    loss: hvpopt.losses.Loss
    params: Any
    objective: Callable
    batch: Callable[[int], tuple]
    monitor: tuple | None
    task: Any
    first_order_steps: int
    second_order_steps: int
    budget: float | None
    sweeps: dict
    weight_decay: float
    l2: float = 0.0
    plot_gap: bool = False
    reference: str = "optimum"  # the level a run must reach: "optimum" or "adamw" (see reach_level)


def rosenbrock_residuals(x, inputs):
    """Residuals of the extended Rosenbrock function, ``[1, n]`` (``inputs`` is unused)."""
    del inputs
    odd, even = x[0::2], x[1::2]
    return jnp.concatenate([10.0 * (even - odd**2), 1.0 - odd])[None]


def rosenbrock(cfg):
    dim = cfg["dim"]
    start = jnp.tile(jnp.array([-1.2, 1.0], jnp.float32), dim // 2)
    loss = hvpopt.losses.squared_error
    batch = (jnp.zeros((1, 1), jnp.float32), jnp.zeros((1, dim), jnp.float32))
    return Problem(
        "rosenbrock",
        f"extended Rosenbrock, n = {dim}, objective 1/2 sum r^2",
        rosenbrock_residuals,
        loss,
        start,
        jax.jit(lambda x, inputs, targets: loss(rosenbrock_residuals(x, inputs), targets)),
        lambda step: batch,
        None,
        None,
        cfg["first_order_steps"],
        cfg["second_order_steps"],
        None,
        cfg["sweeps"],
        weight_decay=0.0,
    )


def task_problem(name, title, task, batch, monitor, cfg, *, weight_decay, plot_gap=False, reference="optimum"):
    return Problem(
        name,
        f"{title}: {task.describe()}",
        task.model_fn,
        task.loss,
        task.params,
        jax.jit(task.objective),
        batch,
        monitor,
        task,
        cfg["first_order_steps"],
        cfg["second_order_steps"],
        cfg.get("budget"),
        cfg["sweeps"],
        weight_decay,
        task.l2,
        plot_gap,
        reference,
    )


def full_batch(dataset):
    batch = (jnp.asarray(dataset.inputs), jax.tree.map(jnp.asarray, dataset.targets))
    return lambda step: batch


def blobs(name, title, hidden_sizes, cfg, *, plot_gap=False):
    task = hvpopt.testbed.tasks.make_task("blobs", model_options={"hidden_sizes": hidden_sizes})
    return task_problem(name, title, task, full_batch(task.train), None, cfg, weight_decay=0.0, plot_gap=plot_gap)


def shakespeare(cfg):
    return hvpopt.testbed.tasks.make_task(
        "shakespeare", data_options={"context_length": cfg["context_length"]}, model_options=cfg["model"]
    )


def transformer_full(task, cfg):
    subset = np.random.default_rng(0).choice(task.train.num_examples, cfg["sequences"], replace=False)
    return task_problem(
        "transformer_full",
        f"transformer, full batch of {cfg['sequences']} sequences",
        task,
        full_batch(task.train.take(np.sort(subset))),
        None,
        cfg,
        weight_decay=1e-4,
        reference="adamw",
    )


def transformer_minibatch(task, cfg):
    rng = np.random.default_rng(1)
    monitor = task.train.take(np.sort(rng.choice(task.train.num_examples, cfg["monitor_sequences"], replace=False)))
    steps = max(cfg["first_order_steps"], cfg["second_order_steps"])
    order = epochs(task.train.num_examples, cfg["batch_size"], steps, rng)

    def batch(step):
        part = task.train.take(order[step])
        return jnp.asarray(part.inputs), jax.tree.map(jnp.asarray, part.targets)

    return task_problem(
        "transformer_minibatch",
        f"transformer, mini-batches of {cfg['batch_size']} sequences",
        task,
        batch,
        full_batch(monitor)(0),
        cfg,
        weight_decay=1e-4,
        reference="adamw",
    )


def epochs(num_examples, batch_size, steps, rng):
    """``[steps, batch_size]`` indices: shuffled epochs cut into whole batches."""
    per_epoch = num_examples // batch_size
    orders = [
        rng.permutation(num_examples)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        for _ in range(math.ceil(steps / per_epoch))
    ]
    return np.concatenate(orders)[:steps]


# ------------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """An optimizer family: the knob swept, how to build it, and what its update needs."""

    knob: str
    build: Callable  # (problem, knob value, steps, maxiter) -> optax transformation
    second_order: bool
    curvature_batch: bool = False


def adamw(problem, learning_rate, steps, maxiter):
    """AdamW as ``hvpopt train`` runs it: linear warm-up over 5% of the steps, cosine decay to a
    tenth at the last step, gradients clipped to global norm 1."""
    shape = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, warmup_steps=max(1, steps // 20), decay_steps=steps, end_value=0.1
    )
    schedule = lambda count: learning_rate * shape(count)  # learning_rate may be traced
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=problem.weight_decay))


def hessian_free(problem, initial_damping, steps, maxiter):
    """The Gauss-Newton matrix is of the data loss: the L2 term's curvature ``l2 I`` is the least damping."""
    return hvpopt.hessian_free(
        problem.model_fn,
        problem.loss,
        initial_damping=initial_damping,
        min_damping=max(1e-6, problem.l2),
        maxiter=maxiter,
    )


def natural_gradient(problem, damping, steps, maxiter):
    """``F + (damping + l2) I``: the Fisher of the objective, L2 term included, then damped."""
    return hvpopt.natural_gradient(problem.model_fn, problem.loss, damping=damping + problem.l2, maxiter=maxiter)


METHODS = {
    "adamw": Method("learning_rate", adamw, second_order=False),
    "lbfgs": Method(
        "memory_size", lambda problem, memory, steps, maxiter: optax.lbfgs(memory_size=LBFGS_MEMORY), second_order=False
    ),
    "newton_cg": Method(
        "damping", lambda problem, d, steps, maxiter: hvpopt.newton_cg(damping=d, maxiter=maxiter), second_order=True
    ),
    "hessian_free": Method("initial_damping", hessian_free, second_order=True, curvature_batch=True),
    "natural_gradient": Method("damping", natural_gradient, second_order=True, curvature_batch=True),
}


def reuses_gradient(problem, name):
    """Full-batch L-BFGS takes the gradient its line search left in the state."""
    return name == "lbfgs" and problem.monitor is None


def budget_of(problem, method):
    """``(most steps, most gradient-equivalents or None)`` of a method on a problem."""
    if method.second_order:
        return problem.second_order_steps, problem.budget
    return problem.first_order_steps, None


def compile_step(problem, name, maxiter):
    """The method's step, jitted and compiled once for every value of its knob (passed traced).

    Returns ``(step, seconds to compile and call once)``; ``step(knob, params,
    state, inputs, targets) -> (params, state, loss before the step)``.
    """
    method = METHODS[name]
    steps = budget_of(problem, method)[0]

    def step(knob, params, state, inputs, targets):
        tx = method.build(problem, knob, steps, maxiter)
        f = lambda p: problem.objective(p, inputs, targets)
        if reuses_gradient(problem, name):
            value, grad = optax.value_and_grad_from_state(f)(params, state=state)
        else:
            value, grad = jax.value_and_grad(f)(params)
        extra = {"curvature_batch": (inputs, targets)} if method.curvature_batch else {}
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f, **extra)
        return optax.apply_updates(params, updates), state, value

    args = (
        jnp.float32(problem.sweeps[name][0]),
        problem.params,
        method.build(problem, problem.sweeps[name][0], steps, maxiter).init(problem.params),
        *problem.batch(0),
    )
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # the first call of an executable pays a one-time setup
    return compiled, time.perf_counter() - start


def counters(state) -> dict:
    """Cumulative products and loss evaluations, and this step's L-BFGS line-search evaluations."""
    get = lambda key: int(otu.tree_get(state, key, default=0))
    return {
        "products": sum(get(key) for key in PRODUCT_COUNTERS),
        "values": get("num_value_evals"),
        "linesearch": get("num_linesearch_steps"),
        "skipped": get("skipped_steps"),
    }


def step_cost(before, after, gradients) -> dict:
    """What one step evaluated: gradients, loss evaluations, curvature products."""
    return {
        "gradients": gradients + after["linesearch"],
        "values": after["values"] - before["values"],
        "products": after["products"] - before["products"],
    }


def gradient_equivalents(cost: dict) -> float:
    return COST["gradient"] * cost["gradients"] + COST["value"] * cost["values"] + COST["product"] * cost["products"]


# ----------------------------------------------------------------------------------- runs


def run(problem, name, knob, step, maxiter):
    """One setting of a method on a problem: the trace, the totals and the final losses."""
    method = METHODS[name]
    steps, budget = budget_of(problem, method)
    params = problem.params
    state = method.build(problem, knob, steps, maxiter).init(params)
    monitor = problem.monitor
    totals = {"gradients": 0, "values": 0, "products": 0}
    trace = {"step": [], "loss": [], "grad_equivalents": [], "seconds": []}
    batch_losses, seconds, stopped_by, done = [], 0.0, "steps", 0

    def record(loss):
        for key, value in zip(trace, (done, loss, gradient_equivalents(totals), seconds)):
            trace[key].append(float(value))

    while done < steps:
        if monitor and done % MONITOR_EVERY == 0:
            record(problem.objective(params, *monitor))
        before = counters(state)
        inputs, targets = problem.batch(done)
        tick = time.perf_counter()
        params, state, value = jax.block_until_ready(step(jnp.float32(knob), params, state, inputs, targets))
        seconds += time.perf_counter() - tick
        gradients = 0 if reuses_gradient(problem, name) and done > 0 else 1
        if not monitor:
            record(value)
        batch_losses.append(float(value))
        totals = {key: totals[key] + cost for key, cost in step_cost(before, counters(state), gradients).items()}
        done += 1
        if budget is not None and gradient_equivalents(totals) >= budget:
            stopped_by = "budget"
            break
    final = problem.objective(params, *(monitor or problem.batch(0)))
    record(final)
    result = {
        "method": name,
        "knob": method.knob,
        "value": knob,
        "steps": done,
        "stopped_by": stopped_by,
        "final_loss": float(final),
        "lowest_loss": float(np.nanmin(trace["loss"])),
        "grad_equivalents": gradient_equivalents(totals),
        "seconds": seconds,
        "evaluations": totals,
        "skipped_steps": counters(state)["skipped"],
        "trace": trace,
        **({"batch_loss": batch_losses} if monitor else {}),
    }
    if problem.task is not None and problem.task.tokenizer is not None:
        result["validation_loss"] = evaluate(problem.task, params, problem.task.validation)["loss"]
    return result


def run_problem(problem, maxiter, log):
    """Every setting of every method on ``problem``, and the best setting of each."""
    log(f"{problem.name}: {problem.title}")
    runs, compile_seconds = [], {}
    for name in METHODS:
        step, compile_seconds[name] = compile_step(problem, name, maxiter)
        for knob in problem.sweeps[name]:
            runs.append(run(problem, name, knob, step, maxiter))
            log_run(log, runs[-1], compile_seconds[name])
    best = {
        name: min((r for r in runs if r["method"] == name), key=lambda r: nan_last(r["final_loss"])) for name in METHODS
    }
    level, rule = reach_level(problem, runs, best["adamw"])
    for r in runs:
        i = first_reaching(r["trace"], level)
        r["reached"] = (
            None if i is None else {key: r["trace"][key][i] for key in ("step", "grad_equivalents", "seconds")}
        )
    return {
        "title": problem.title,
        "sweeps": problem.sweeps,
        "first_order_steps": problem.first_order_steps,
        "second_order_steps": problem.second_order_steps,
        "budget_grad_equivalents": problem.budget,
        "compile_seconds": compile_seconds,
        "reach_level": level,
        "reach_rule": rule,
        "runs": runs,
        "best": {name: {"value": r["value"], "final_loss": r["final_loss"]} for name, r in best.items()},
        "_best_runs": best,
    }


def reach_level(problem, runs, adamw_run):
    """The loss whose first crossing each run reports (``reached``), and the rule that set it."""
    if problem.reference == "adamw":
        return adamw_run["final_loss"], f"AdamW's final loss after {adamw_run['steps']} steps (best learning rate)"
    lowest = min(nan_last(r["lowest_loss"]) for r in runs)
    return lowest + NEAR_OPTIMAL * (1 + abs(lowest)), f"lowest loss of any run + {NEAR_OPTIMAL:g} (1 + |lowest|)"


def log_run(log, r, compile_seconds):
    log(
        f"  {r['method']:16s} {r['knob']}={r['value']:<8g} steps {r['steps']:4d} ({r['stopped_by']:6s})  "
        f"loss {r['final_loss']:.6g}  GE {r['grad_equivalents']:8.1f}  {r['seconds']:7.2f}s "
        f"(compile {compile_seconds:.1f}s)" + (f"  val {r['validation_loss']:.4f}" if "validation_loss" in r else "")
    )


def nan_last(x):
    return x if math.isfinite(x) else math.inf


# -------------------------------------------------------------------------------- targets


def first_reaching(trace, level):
    """Index of the first trace point with loss <= level, or None."""
    return next((i for i, loss in enumerate(trace["loss"]) if loss <= level), None)


def targets(result):
    """AdamW's 500-step loss, and when every run of the other methods reached it."""
    adamw_run = result["_best_runs"]["adamw"]
    level, adamw_steps, adamw_seconds = adamw_run["final_loss"], adamw_run["steps"], adamw_run["seconds"]
    rows = [target_row(r, level, adamw_steps, adamw_seconds) for r in result["runs"] if r["method"] != "adamw"]
    near = first_reaching(adamw_run["trace"], NEAR_TARGET * level)
    return {
        "problem": "transformer_full",
        "adamw_learning_rate": adamw_run["value"],
        "adamw_steps": adamw_steps,
        "adamw_loss": level,
        "adamw_seconds": adamw_seconds,
        "adamw_grad_equivalents": adamw_run["grad_equivalents"],
        "adamw_near_step": int(adamw_run["trace"]["step"][near]),
        "adamw_near_seconds": adamw_run["trace"]["seconds"][near],
        "rule": f"first step whose full-batch training loss is <= AdamW's; met if that step is <= "
        f"{TARGET_STEP_FRACTION} x {adamw_steps} and its seconds <= AdamW's",
        "runs": rows,
    }


def target_row(r, level, adamw_steps, adamw_seconds):
    row = {
        "method": r["method"],
        "second_order": METHODS[r["method"]].second_order,
        "knob": r["knob"],
        "value": r["value"],
        "lowest_loss": r["lowest_loss"],
        "steps_run": r["steps"],
        "stopped_by": r["stopped_by"],
    }
    near = first_reaching(r["trace"], NEAR_TARGET * level)
    if near is not None:
        row["near_step"] = int(r["trace"]["step"][near])
        row["near_seconds_ratio"] = r["trace"]["seconds"][near] / adamw_seconds
    i = first_reaching(r["trace"], level)
    row["reached"] = i is not None
    if i is None:
        return row | {"meets_target": False}
    steps, seconds = r["trace"]["step"][i], r["trace"]["seconds"][i]
    row |= {
        "step": int(steps),
        "step_ratio": steps / adamw_steps,
        "seconds": seconds,
        "seconds_ratio": seconds / adamw_seconds,
        "grad_equivalents": r["trace"]["grad_equivalents"][i],
        "meets_step_target": steps <= TARGET_STEP_FRACTION * adamw_steps,
        "meets_wall_clock_target": seconds <= adamw_seconds,
    }
    return row | {"meets_target": row["meets_step_target"] and row["meets_wall_clock_target"]}


# ------------------------------------------------------------------------- measured costs


def measured_cost_ratios(problem, repeats):
    """Seconds of a loss, of a 10-product loop (Hessian, Gauss-Newton), over one gradient's."""
    inputs, targets = problem.batch(0)
    f = lambda p: problem.objective(p, inputs, targets)
    loops = {
        "value": lambda p, v: f(p),
        "gradient": lambda p, v: jax.value_and_grad(f)(p),
        "hvp": lambda p, v: repeat(hvpopt.hessian_operator(f, p), v),
        "ggn_product": lambda p, v: repeat(hvpopt.ggn_operator(problem.model_fn, problem.loss, p, inputs, targets), v),
    }
    v = jax.tree.map(jnp.ones_like, problem.params)
    seconds = {
        name: best_time(jax.jit(fn).lower(problem.params, v).compile(), (problem.params, v), repeats)
        for name, fn in loops.items()
    }
    per_product = {"hvp": seconds["hvp"] / 10, "ggn_product": seconds["ggn_product"] / 10}
    return {
        "gradient_seconds": seconds["gradient"],
        "value_over_gradient": seconds["value"] / seconds["gradient"],
        **{f"{k}_over_gradient": s / seconds["gradient"] for k, s in per_product.items()},
        "note": "products timed in a jitted loop of 10 with one linearization, per product; "
        "the Fisher product is the Gauss-Newton product here (hvpopt.fisher_operator)",
    }


def repeat(matvec, v, times=10):
    return jax.lax.fori_loop(0, times, lambda i, w: matvec(w), v)


def best_time(compiled, args, repeats):
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return min(times)


# ----------------------------------------------------------------------------------- plots


STYLE = {"adamw": "C0", "lbfgs": "C1", "newton_cg": "C2", "hessian_free": "C3", "natural_gradient": "C4"}


def plot(result, path, level=None):
    """Three panels, the best setting of each method: loss against steps, gradient-equivalents, seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best, gap = result["_best_runs"], result["plot_gap"]
    floor = min(r["lowest_loss"] for r in result["runs"]) if gap else 0.0
    losses = {method: np.array(r["trace"]["loss"]) - floor for method, r in best.items()}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    for ax, key, label in zip(
        axes,
        ("step", "grad_equivalents", "seconds"),
        ("steps", "gradient-equivalents (gradient 1, loss 0.5, product 2)", "wall-clock seconds (compile excluded)"),
    ):
        for method, r in best.items():
            x, y = np.array(r["trace"][key]), losses[method]
            keep = np.isfinite(y) & (y > 0)
            ax.plot(
                x[keep],
                y[keep],
                color=STYLE[method],
                lw=1.5,
                label=f"{method} ({r['knob']} {r['value']:g}): final {r['final_loss']:.4g}",
            )
        if level is not None:
            ax.axhline(
                level, color="gray", ls="--", lw=1, label=f"AdamW's {best['adamw']['steps']}-step loss {level:.4g}"
            )
        if all(np.nanmin(y) >= 0 for y in losses.values()):
            ax.set_yscale("log")  # a loss of exactly 0 is not drawn
        ax.set_xlabel(label)
        ax.set_ylabel("training loss - lowest loss of any run" if gap else "training loss")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9)
    fig.suptitle(textwrap.fill(result["title"], 160), fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def config(quick):
    """Problem sizes, budgets and sweeps; ``--quick`` shrinks them and keeps one setting per method."""
    pick = (lambda values: values[len(values) // 2 : len(values) // 2 + 1]) if quick else (lambda values: values)
    small = {
        "first_order_steps": 60 if quick else 500,
        "second_order_steps": 20 if quick else 150,
        "sweeps": {
            "adamw": pick([1e-2, 3e-2, 1e-1]),
            "lbfgs": [LBFGS_MEMORY],
            "newton_cg": pick([0.0, 0.1, 1.0]),
            "hessian_free": pick([0.1, 1.0, 10.0]),
            "natural_gradient": pick([1e-3, 1e-2, 1e-1]),
        },
    }
    first_order_steps = 40 if quick else 500
    transformer = {
        "first_order_steps": first_order_steps,
        "second_order_steps": 10 if quick else 150,
        "budget": 5.0 * first_order_steps,
    }
    # Two values per second-order method on the transformer (time), around the best of a
    # 40-step pilot over three (Newton-CG 0.01-1, Hessian-free 0.1-10, natural gradient 0.001-0.1).
    # AdamW's full-batch grid starts at 1e-2: over 3e-3..3e-2 its best was the largest.
    transformer_sweeps = {"lbfgs": [LBFGS_MEMORY], "hessian_free": pick([0.1, 1.0])}
    return {
        "maxiter": 20,
        "shakespeare": {
            "context_length": 16 if quick else 32,
            "model": (
                {"d_model": 16, "num_layers": 1, "num_heads": 2}
                if quick
                else {"d_model": 32, "num_layers": 2, "num_heads": 4}
            ),
        },
        "rosenbrock": {**small, "dim": 20 if quick else 100},
        "logistic": small,
        "mlp": small,
        "transformer_full": {
            **transformer,
            "sequences": 32 if quick else 128,
            "sweeps": {
                **transformer_sweeps,
                "adamw": pick([1e-2, 3e-2, 1e-1]),
                "newton_cg": pick([1e-2, 1e-1]),
                "natural_gradient": pick([3e-4, 1e-3]),
            },
        },
        "transformer_minibatch": {
            **transformer,
            "batch_size": 16 if quick else 32,
            "monitor_sequences": 64 if quick else 256,
            "sweeps": {
                **transformer_sweeps,
                "adamw": pick([3e-3, 1e-2, 3e-2]),
                "newton_cg": pick([1e-1, 1.0]),
                "natural_gradient": pick([0.1, 0.3]),
            },
        },
    }


def problems(cfg):
    """``name -> () -> Problem``; the two transformer problems share one task."""
    task = functools.cache(lambda: shakespeare(cfg["shakespeare"]))
    return {
        "rosenbrock": lambda: rosenbrock(cfg["rosenbrock"]),
        "logistic": lambda: blobs("logistic", "logistic regression", [], cfg["logistic"], plot_gap=True),
        "mlp": lambda: blobs("mlp", "MLP", [32, 32], cfg["mlp"]),
        "transformer_full": lambda: transformer_full(task(), cfg["transformer_full"]),
        "transformer_minibatch": lambda: transformer_minibatch(task(), cfg["transformer_minibatch"]),
    }


def summary_lines(results, target):
    """The best setting of each method on each problem, then the target on the full-batch transformer."""
    lines = []
    for name, result in results.items():
        lines.append(f"{name}: 'reached' = first crossing of {result['reach_level']:.6g}, {result['reach_rule']}")
        lines.append(
            f"  {'method':17s} {'best setting':22s} {'final loss':>11s} {'steps':>5s} {'grad-eq':>7s} "
            f"{'seconds':>7s} | {'reached at: step':>16s} {'grad-eq':>7s} {'seconds':>7s} | val loss"
        )
        for method, r in result["_best_runs"].items():
            at = r["reached"]
            reached = (
                f"{at['step']:16.0f} {at['grad_equivalents']:7.0f} {at['seconds']:7.2f}"
                if at
                else f"{'not reached':>16s} {'':7s} {'':7s}"
            )
            val = f"{r['validation_loss']:.4f}" if "validation_loss" in r else ""
            lines.append(
                f"  {method:17s} {r['knob'] + ' ' + format(r['value'], 'g'):22s} {r['final_loss']:11.5g} "
                f"{r['steps']:5d} {r['grad_equivalents']:7.0f} {r['seconds']:7.2f} | {reached} | {val}"
            )
    lines.append(
        f"target on transformer_full: AdamW (learning rate {target['adamw_learning_rate']:g}) reaches "
        f"{target['adamw_loss']:.4f} after {target['adamw_steps']} steps, {target['adamw_seconds']:.1f}s "
        f"(within 5% of it at step {target['adamw_near_step']}, {target['adamw_near_seconds']:.1f}s)"
    )
    for row in target["runs"]:
        head = f"  {row['method']:17s} {row['knob']} {row['value']:<6g}"
        near = (
            f"; within 5% at step {row['near_step']} (x{row['near_seconds_ratio']:.2f} wall-clock)"
            if "near_step" in row
            else ""
        )
        if row["reached"]:
            verdict = "MEETS the target" if row["meets_target"] else "misses the target"
            lines.append(
                f"{head} reached at step {row['step']} (x{row['step_ratio']:.2f} steps), "
                f"{row['seconds']:.1f}s (x{row['seconds_ratio']:.2f} wall-clock): {verdict}{near}"
            )
        else:
            lines.append(
                f"{head} missed: lowest {row['lowest_loss']:.4f} in {row['steps_run']} steps "
                f"(stopped by {row['stopped_by']}){near}"
            )
    return lines


def json_safe(tree):
    """``tree`` with NaN and infinities as None: JSON has neither."""
    if isinstance(tree, dict):
        return {key: json_safe(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [json_safe(value) for value in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--quick", action="store_true", help="tiny problems, one setting per method, XLA optimisation off (< 1.5 min)"
    )
    args = parser.parse_args(argv)
    if args.quick:  # a smoke run: compile fast (XLA reads this when JAX first starts its backend, below)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    cfg = config(args.quick)
    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:6.1f}s] {s}", flush=True)
    load = {"start": cpu_load()}
    results, measured = {}, None
    for name, build in problems(cfg).items():
        problem = build()
        results[name] = run_problem(problem, cfg["maxiter"], log) | {"plot_gap": problem.plot_gap}
        if name == "transformer_full":
            measured = measured_cost_ratios(problem, repeats=3 if args.quick else 10)
            log(f"  measured costs: {measured}")
        load[f"after_{name}"] = cpu_load()
    target = targets(results["transformer_full"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        plot(
            result,
            args.out_dir / f"optimizers_{name}.png",
            level=target["adamw_loss"] if name == "transformer_full" else None,
        )
    lines = summary_lines(results, target)
    report = {
        "experiment": "optimizers",
        "quick": args.quick,
        "config": cfg,
        "environment": environment(("jax", "jaxlib", "flax", "optax", "numpy", "matplotlib", "hvpopt")),
        "load_average": load,
        "dtype": "float32",
        "cost_model": COST,
        "measured_cost_ratios": measured,
        "problems": {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in results.items()},
        "targets": target,
        "summary": lines,
        "total_wall_seconds": time.perf_counter() - t_start,
    }
    write_results(str(args.out_dir / "optimizers.json"), json_safe(report))
    for line in lines:
        print(line)
    log(f"wrote {args.out_dir / 'optimizers.json'} and optimizers_*.png")


if __name__ == "__main__":
    main()
