"""CG iterations K-FAC saves as the preconditioner of Hessian-free's and natural gradient's solve.

The system is the one a Hessian-free or natural-gradient step solves on the
default 110k-parameter language model, ``(G + lambda I) x = g`` on a batch of
64 windows (``G`` the Gauss-Newton matrix, which is the Fisher for softmax
cross-entropy), at the initial parameters and after 300 AdamW steps, for
two dampings. CG runs to a relative residual of 1e-3 (at most 200
iterations) with no preconditioner, with K-FAC and with EK-FAC fitted on the
same batch (:func:`hvpopt.kronecker_preconditioner`'s fit). Reported: the
iterations, the seconds of each solve (median of 2, compilation excluded) and
of the fit, and the ratios. Written to ``benchmarks/results/bench_kfac_precond_cpu.json``.

Run: ``python benchmarks/bench_kfac_precond.py`` (about 10 minutes on one CPU
core; ``--quick``: one point, one damping, into the temporary folder).
"""

import argparse
import statistics

import harness
import jax

import hvpopt
from hvpopt.testbed import tasks, training

DAMPINGS = (1e-1, 1e-2)
RTOL, MAXITER = 1e-3, 200


def solve_once(task, params, batch, damping, precond):
    operator = hvpopt.ggn_operator(task.model_fn, task.loss, params, *batch)
    gradient = jax.grad(lambda p: task.loss(task.model_fn(p, batch[0]), batch[1]))(params)
    return hvpopt.cg(operator, gradient, damping=damping, rtol=RTOL, maxiter=MAXITER, precond=precond)


def measure(task, params, batch, damping, kind):
    fit_seconds = 0.0
    precond = None
    if kind != "none":
        fit = jax.jit(lambda p, b: hvpopt.fit_kronecker_factors(task.model_fn, task.loss, p, b, kind=kind))
        jax.block_until_ready(fit(params, batch))  # compiled apart
        fit_seconds, _, factors = harness.timed_call(lambda: fit(params, batch))
        precond = hvpopt.kronecker_inverse(factors, damping=damping)
    solve = jax.jit(lambda p, b: solve_once(task, p, b, damping, precond))
    result = solve(params, batch)  # compiles
    seconds = [harness.timed_call(lambda: solve(params, batch))[0] for _ in range(2)]
    return {
        "iterations": int(result.iterations),
        "converged": bool(result.converged),
        "solve_seconds": statistics.median(seconds),
        "fit_seconds": fit_seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    task = tasks.make_task("shakespeare")
    batch = (task.train.inputs[:64], jax.tree.map(lambda t: t[:64], task.train.targets))
    points = {"initial": task.params}
    if not args.quick:
        trained = training.train(task, training.TrainOptions(steps=300, eval_every=300)).params
        points["after 300 AdamW steps"] = trained
    rows = []
    for point, params in points.items():
        for damping in DAMPINGS[:1] if args.quick else DAMPINGS:
            row = {"point": point, "damping": damping}
            for kind in ("none", "kfac", "ekfac"):
                row[kind] = measure(task, params, batch, damping, kind)
            for kind in ("kfac", "ekfac"):
                row[f"{kind}_iteration_ratio"] = row[kind]["iterations"] / row["none"]["iterations"]
                total = row[kind]["solve_seconds"] + row[kind]["fit_seconds"]
                row[f"{kind}_seconds_ratio"] = total / row["none"]["solve_seconds"]
            print(point, damping, {k: row[k]["iterations"] for k in ("none", "kfac", "ekfac")},
                  f"seconds ratio (fit included) kfac {row['kfac_seconds_ratio']:.2f} "
                  f"ekfac {row['ekfac_seconds_ratio']:.2f}", flush=True)  # fmt: skip
            rows.append(row)
    report = {
        "environment": harness.environment(("jax", "jaxlib", "flax", "optax", "numpy", "hvpopt")),
        "parameters": harness.num_params(task.params),
        "batch": 64,
        "rtol": RTOL,
        "maxiter": MAXITER,
        "rows": rows,
    }
    path = (
        harness.quick_path("bench_kfac_precond") if args.quick else harness.results_path("bench_kfac_precond_cpu.json")
    )
    harness.write_results(path, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
