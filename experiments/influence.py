"""Influence functions: are the scores right, and do they find mislabelled examples?

Three measurements, each against a ground truth:

1. **Leave-one-out retraining** (convex, float64). Multinomial logistic regression with an
   L2 penalty ``lam`` on scikit-learn's bundled wine data (130 training examples, 13
   features, 3 classes), trained to rounding by Newton's method. For 44 training examples
   the model is retrained without the example (Newton, warm start) and the change of 8 test
   losses is recorded; every method predicts it with ``damping=lam``. Reported: Pearson and
   Spearman correlation with the actual changes, the least-squares slope of actual on
   predicted (1 means the 1/n scale is right), and agreement with ``exact``.
2. **Flipped labels** (self-influence). 10% of the training labels of a task are flipped;
   the examples are ranked by self-influence ``(1/n) g_j^T (H + lam I)^{-1} g_j`` and we
   report the fraction of flipped labels found in the top 10%, and the whole recall curve,
   against random order and the training loss. Tasks: logistic regression on Gaussian blobs
   (convex) and a 1-layer transformer on bracket matching trained until it memorises
   (where the loss stops telling flipped from clean examples; the transformer's CG uses
   128 random training examples for the curvature and 10 iterations, one solve per example).
3. **Proximal Bregman response** (non-convex). A small character transformer LM; for 16
   removed training examples the response (Bae et al., 2022) is minimised by Newton-CG and
   the change of 5 validation losses compared with CG Gauss-Newton influence at the same
   damping, with the identity baseline beside it.

Usage::

    python experiments/influence.py                       # about 4 minutes on 2 CPU cores
    python experiments/influence.py --quick --out-dir /tmp/inf

Writes ``influence.json`` and ``influence.png`` (scatter of predicted vs actual, recall
curves) to ``--out-dir`` (default ``experiments/results``).
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from harness import cpu_load, environment  # noqa: E402

from hvpopt import influence  # noqa: E402
from hvpopt.influence import pearson, spearman  # noqa: E402
from hvpopt.testbed import tasks, training  # noqa: E402
from hvpopt.testbed.files import atomic_path  # noqa: E402

# ---------------------------------------------------------------- 1. leave-one-out


def softmax_loss(params, example):
    x, label = example
    return -jax.nn.log_softmax(x @ params["w"] + params["b"])[label]


def leave_one_out(lam: float, quick: bool) -> dict:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x = (x - x.mean(0)) / x.std(0)
    x, y = jnp.asarray(x[order]), jnp.asarray(y[order])
    train, queries = (x[:130], y[:130]), (x[130:138], y[130:138])
    n = 130

    @jax.jit
    def retrain(params, weights):
        flat, unravel = ravel_pytree(params)

        def objective(v):
            losses = jax.vmap(softmax_loss, in_axes=(None, 0))(unravel(v), train)
            return jnp.sum(weights * losses) / n + 0.5 * lam * jnp.sum(v**2)

        newton = lambda _, v: v - jnp.linalg.solve(jax.hessian(objective)(v), jax.grad(objective)(v))
        return unravel(jax.lax.fori_loop(0, 25, newton, flat))

    params = retrain({"w": jnp.zeros((13, 3)), "b": jnp.zeros(3)}, jnp.ones(n))
    query_losses = jax.jit(lambda p: jax.vmap(softmax_loss, in_axes=(None, 0))(p, queries))
    removed = np.arange(0, n, 6 if quick else 3)
    start = time.perf_counter()
    actual = np.stack(
        [query_losses(retrain(params, jnp.ones(n).at[j].set(0.0))) - query_losses(params) for j in removed], axis=1
    )
    retrain_seconds = time.perf_counter() - start
    settings = {
        "exact": {},
        "cg": {"rtol": 1e-12, "maxiter": 200},
        "lissa": {"depth": 2000},
        "arnoldi (full rank 42)": {"rank": 42},
        "arnoldi (rank 10)": {"rank": 10},
        "identity": {},
    }
    results, predicted = {}, {}
    for name, options in settings.items():
        start = time.perf_counter()
        scores = np.asarray(
            influence.pairwise_scores(
                softmax_loss, params, train, queries, method=name.split()[0], damping=lam, **options
            )
        )
        seconds = time.perf_counter() - start
        predicted[name] = scores[:, removed]
        results[name] = {
            "pearson": pearson(predicted[name], actual),
            "spearman": spearman(predicted[name], actual),
            "slope": float(np.sum(predicted[name] * actual) / np.sum(predicted[name] ** 2)),
            "pearson_with_exact": pearson(scores[:, removed], predicted["exact"]),
            "seconds": seconds,
        }
    return {
        "lam": lam,
        "train_examples": n,
        "queries": 8,
        "removed": len(removed),
        "retrain_seconds": retrain_seconds,
        "methods": results,
        "scatter": {
            "actual": actual.ravel().tolist(),
            "exact": predicted["exact"].ravel().tolist(),
            "identity": predicted["identity"].ravel().tolist(),
        },
    }


# ---------------------------------------------------------------- 2. flipped labels


def flipped_labels(name: str, quick: bool) -> dict:
    if name == "blobs":
        task = tasks.make_task("blobs", flip_fraction=0.1)
        options = training.TrainOptions(steps=30, batch_size=None, optimizer="newton_cg", eval_every=30)
        damping, curvature, methods = (
            task.l2,
            "hessian",
            {"exact": {}, "cg": {"maxiter": 100}, "arnoldi": {"rank": 20}, "lissa": {}, "identity": {}},
        )
    else:
        task = tasks.make_task(
            "dyck",
            flip_fraction=0.1,
            data_options={"num_examples": 500 if quick else 1000},
            model_options={"d_model": 16, "num_layers": 1, "num_heads": 2},
        )
        options = training.TrainOptions(
            steps=400 if quick else 1500, batch_size=None, optimizer="adam", learning_rate=1e-2, eval_every=10_000
        )
        subset = task.train.take(np.sort(np.random.default_rng(0).choice(task.train.num_examples, 128, replace=False)))
        cheaper = {"curvature_data": (subset.inputs, subset.targets)}  # one CG solve per training example
        damping, curvature, methods = (
            1e-3,
            "ggn",
            {"cg": {"maxiter": 10, **cheaper}, "arnoldi": {"rank": 50}, "identity": {}},
        )
    start = time.perf_counter()
    result = training.train(task, options)
    train_seconds = time.perf_counter() - start
    train = (task.train.inputs, task.train.targets)
    flipped = np.asarray(task.train.flipped)
    losses = np.asarray(jax.vmap(task.example_loss, in_axes=(None, 0))(result.params, train))
    curves = {"random": None, "training loss": _recall_curve(losses, flipped)}
    seconds = {}
    for method, extra in methods.items():
        start = time.perf_counter()
        scores = influence.self_scores(
            task.example_loss,
            result.params,
            train,
            method=method,
            damping=damping,
            curvature=curvature,
            model=(task.model_fn, task.loss),
            **extra,
        )
        seconds[method] = time.perf_counter() - start
        curves[f"self-influence ({method})"] = _recall_curve(np.asarray(scores), flipped)
    tenth = round(0.1 * flipped.size)
    at_10 = {label: (0.1 if curve is None else curve[tenth - 1]) for label, curve in curves.items()}
    return {
        "task": task.describe(),
        "train_seconds": train_seconds,
        "train_loss": float(losses.mean()),
        "flipped": int(flipped.sum()),
        "mean_loss_flipped": float(losses[flipped].mean()),
        "mean_loss_clean": float(losses[~flipped].mean()),
        "damping": damping,
        "curvature": curvature,
        "recall_at_10_percent": at_10,
        "seconds": seconds,
        "curves": {label: curve for label, curve in curves.items() if curve is not None},
    }


def _recall_curve(scores: np.ndarray, flipped: np.ndarray) -> list[float]:
    """Fraction of flipped examples among the top k by score, for k = 1..n."""
    return (np.cumsum(flipped[np.argsort(-scores)]) / flipped.sum()).tolist()


# ---------------------------------------------------------------- 3. proximal Bregman response


def bregman(quick: bool) -> dict:
    task = tasks.make_task(
        "shakespeare",
        data_options={"context_length": 16},
        model_options={"d_model": 16, "num_layers": 1, "num_heads": 2},
    )
    options = training.TrainOptions(steps=300, batch_size=32, learning_rate=1e-2, eval_every=10_000)
    params = training.train(task, options).params
    n, damping = 4000, 0.1
    examples = lambda d: (d.inputs, d.targets)
    train = task.train.take(range(n))
    subset = train.take(np.sort(np.random.default_rng(0).choice(n, 64, replace=False)))
    queries = task.validation.take(range(5))
    model = (task.model_fn, task.loss)
    removed = np.arange(0, n, n // (8 if quick else 16))
    query_losses = jax.jit(lambda p: jax.vmap(task.example_loss, in_axes=(None, 0))(p, examples(queries)))
    response = jax.jit(
        lambda example: query_losses(
            influence.proximal_bregman_response(
                task.example_loss, model, params, examples(subset), example, num_train=n, damping=damping
            )
        )
    )
    start = time.perf_counter()
    base = query_losses(params)
    actual = np.stack(
        [np.asarray(response(jax.tree.map(lambda a: a[j], examples(train))) - base) for j in removed], axis=1
    )
    response_seconds = time.perf_counter() - start
    results = {}
    for name, method, extra in [
        ("cg (200 iterations)", "cg", {"maxiter": 200, "rtol": 1e-6}),
        ("cg (10 iterations)", "cg", {"maxiter": 10}),
        ("arnoldi (rank 30)", "arnoldi", {"rank": 30}),
        ("identity", "identity", {}),
    ]:
        start = time.perf_counter()
        scores = np.asarray(
            influence.pairwise_scores(
                task.example_loss,
                params,
                examples(train),
                examples(queries),
                method=method,
                damping=damping,
                curvature="ggn",
                model=model,
                curvature_data=examples(subset),
                **extra,
            )
        )[:, removed]
        results[name] = {
            "pearson": pearson(scores, actual),
            "spearman": spearman(scores, actual),
            "seconds": time.perf_counter() - start,
        }
    return {
        "task": task.describe(),
        "train_examples": n,
        "curvature_examples": 64,
        "damping": damping,
        "removed": len(removed),
        "queries": 5,
        "response_seconds": response_seconds,
        "methods": results,
    }


# ---------------------------------------------------------------- report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    scatter = report["leave_one_out"]["scatter"]
    for name, marker in (("exact", "o"), ("identity", "x")):
        axes[0].scatter(scatter[name], scatter["actual"], s=10, marker=marker, label=name)
    low = min(min(scatter["actual"]), min(scatter["exact"]))
    high = max(max(scatter["actual"]), max(scatter["exact"]))
    axes[0].plot([low, high], [low, high], "k--", lw=0.8)
    axes[0].set(
        xlabel="predicted change of test loss",
        ylabel="actual change (leave-one-out)",
        title=f"wine, logistic regression, L2 {report['leave_one_out']['lam']}",
    )
    axes[0].legend()
    for axis, key in zip(axes[1:], ("blobs", "dyck")):
        curves = report["flipped_labels"][key]["curves"]
        size = len(next(iter(curves.values())))
        fractions = np.arange(1, size + 1) / size
        for label, curve in curves.items():
            axis.plot(fractions, curve, label=label)
        axis.plot([0, 1], [0, 1], "k:", lw=0.8, label="random")
        axis.axvline(0.1, color="grey", lw=0.5)
        axis.set(
            xlabel="fraction of training set inspected",
            ylabel="fraction of flipped labels found",
            title=f"{key}: recall of flipped labels",
            xlim=(0, 0.5),
        )
        axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with fewer examples")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    load_before, start = cpu_load(), time.perf_counter()
    with jax.enable_x64(True):
        loo = {str(lam): leave_one_out(lam, args.quick) for lam in (0.1, 0.01)}
    report = {
        "experiment": "influence",
        "environment": environment(("jax", "jaxlib", "flax", "optax", "numpy", "scikit-learn", "hvpopt")),
        "cpu_load_before": load_before,
        "leave_one_out": loo["0.1"],
        "leave_one_out_lam_0.01": {k: v for k, v in loo["0.01"].items() if k != "scatter"},
        "flipped_labels": {name: flipped_labels(name, args.quick) for name in ("blobs", "dyck")},
        "proximal_bregman_response": bregman(args.quick),
    }
    report["seconds"] = time.perf_counter() - start
    report["cpu_load_after"] = cpu_load()
    with atomic_path(os.path.join(args.out_dir, "influence.json")) as temporary:
        with open(temporary, "w") as file:
            json.dump(report, file, indent=1)
    plot(report, os.path.join(args.out_dir, "influence.png"))
    print(
        json.dumps(
            {
                "leave_one_out": {
                    lam: {
                        m: {k: round(v, 4) for k, v in r.items() if k != "seconds"}
                        for m, r in (loo[lam]["methods"]).items()
                    }
                    for lam in loo
                },
                "flipped_recall_at_10_percent": {
                    k: v["recall_at_10_percent"] for k, v in report["flipped_labels"].items()
                },
                "proximal_bregman_response": report["proximal_bregman_response"]["methods"],
                "seconds": report["seconds"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
