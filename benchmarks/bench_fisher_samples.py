"""How many sampled labels per example the Fisher needs: EK-FAC influence against its closed form.

``fisher="sampled"`` draws labels from the model to build K-FAC's output factor;
on a classifier (one output position) the same Fisher has a closed form
(``fisher="closed_form"``: every class's column of the output Hessian's square
root, exact). For ``mc_samples`` S in (1, 2, 4, 8, 16) and 3 label seeds, EK-FAC is
fitted on 1,000 training examples with sampled labels and scores 50 queries
against them; the measure is the mean over queries of the Spearman correlation of
a query's 1,000 scores with the closed form's, and the fit's seconds (median of
the seeds after the first, whose compilation is reported apart).

Models: an MLP on scikit-learn's digits (64 -> 128 -> 10, tanh, 9,610
parameters, trained 300 full-batch Adam steps), and the testbed's bracket-matching
transformer classifier (``dyck``, trained 300 steps). Damping 1e-3, the command
line's default.

Usage::

    python benchmarks/bench_fisher_samples.py           # about 3 minutes on 2 CPU cores
    python benchmarks/bench_fisher_samples.py --quick   # S in (1, 4), one model, to the temporary folder
"""

import argparse
import time

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import hvpopt
from hvpopt import influence
from hvpopt.testbed import tasks, training

DAMPING, NUM_TRAIN, NUM_QUERIES, SEEDS = 1e-3, 1000, 50, 3


def digits_problem():
    """An MLP trained on scikit-learn's digits: ``(model, params, train, queries)``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
    keys = jax.random.split(jax.random.key(0), 2)
    params = {
        "w1": jax.random.normal(keys[0], (64, 128)) / 8.0,
        "b1": jnp.zeros(128),
        "w2": jax.random.normal(keys[1], (128, 10)) / np.sqrt(128.0),
        "b2": jnp.zeros(10),
    }
    model_fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    loss = hvpopt.losses.softmax_cross_entropy
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: loss(model_fn(p, x[:NUM_TRAIN]), y[:NUM_TRAIN]))(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    for _ in range(300):
        params, state = step(params, state)
    train, queries = (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[-NUM_QUERIES:], y[-NUM_QUERIES:])
    return (model_fn, loss), params, train, queries


def dyck_problem():
    """The testbed's bracket classifier, trained 300 steps."""
    task = tasks.make_task("dyck")
    params = training.train(task, training.TrainOptions(steps=300, batch_size=32, eval_every=300)).params
    train = task.train.take(range(NUM_TRAIN))
    queries = task.validation.take(range(NUM_QUERIES))
    return (task.model_fn, task.loss), params, (train.inputs, train.targets), (queries.inputs, queries.targets)


def measure(name, problem, samples: tuple[int, ...]) -> dict:
    model, params, train, queries = problem
    fit = lambda **kw: influence.fit_inverse_curvature(
        None, params, train, method="ekfac", curvature="ggn", model=model, damping=DAMPING, **kw
    )
    score = lambda inverse: np.asarray(influence.pairwise_scores(None, params, train, queries, inverse=inverse))
    closed = score(fit(fisher="closed_form"))
    rows = []
    for s in samples:
        seconds, spearman, pearson = [], [], []
        for seed in range(SEEDS):
            start = time.perf_counter()
            inverse = fit(fisher="sampled", mc_samples=s, key=jax.random.key(seed))
            jax.block_until_ready(inverse.factors)
            seconds.append(time.perf_counter() - start)
            scores = score(inverse)
            spearman.append(float(np.mean([influence.spearman(a, b) for a, b in zip(scores, closed)])))
            pearson.append(float(np.mean([influence.pearson(a, b) for a, b in zip(scores, closed)])))
        row = {
            "mc_samples": s,
            "mean_query_spearman": spearman,
            "mean_query_pearson": pearson,
            "fit_seconds_first": seconds[0],
            "fit_seconds_median": float(np.median(seconds[1:])),
        }
        rows.append(row)
        print(
            f"{name:8s} S={s:2d}  Spearman {np.mean(spearman):.3f} (seeds {min(spearman):.3f}-{max(spearman):.3f})  "
            f"Pearson {np.mean(pearson):.3f}  fit {row['fit_seconds_median']:.2f} s",
            flush=True,
        )
    return {"model": name, "num_params": harness.num_params(params), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    samples = (1, 4) if args.quick else (1, 2, 4, 8, 16)
    problems = {"digits": digits_problem} if args.quick else {"digits": digits_problem, "dyck": dyck_problem}
    results = [measure(name, make(), samples) for name, make in problems.items()]
    report = {
        "benchmark": "bench_fisher_samples",
        "environment": harness.environment(("jax", "jaxlib", "flax", "optax", "scikit-learn")),
        "settings": {"damping": DAMPING, "num_train": NUM_TRAIN, "num_queries": NUM_QUERIES, "seeds": SEEDS},
        "results": results,
    }
    path = (
        harness.quick_path("bench_fisher_samples")
        if args.quick
        else harness.results_path("bench_fisher_samples_cpu.json")
    )
    harness.write_results(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
