"""Influence functions: are the scores right, and do they find mislabelled examples?

Five measurements, each against a ground truth:

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
4. **Linear datamodeling score** (Park et al., 2023; non-convex, retraining). Two tiny
   transformers (d_model 16, 1 layer, 2 heads), each trained with an L2 penalty ``lam = 1e-3``
   on 400 training examples: a character LM on the shipped corpus (16-character windows,
   Adam 1e-2, 300 steps of batch 32) and the bracket-matching classifier (Adam 1e-2, 300
   full-batch steps). 50 random halves of the training set are each retrained twice with the
   same recipe (seed ``s`` adds ``s`` to the initialisation's seed and the batch order's, as
   ``hvpopt influence validate --metric lds`` does), and the mean loss of 32 validation
   examples is correlated with each method's additive prediction. Methods: identity, CG (25
   iterations), Arnoldi (rank 50), K-FAC and EK-FAC, all on the Gauss-Newton matrix of the
   400 examples with ``damping = lam``; EK-FAC also at damping 1e-2 and 1e-1 (same factors);
   K-FAC and EK-FAC also with the token embeddings as Kronecker-factored layers
   (``embeddings=True``: a diagonal input factor of token frequencies) instead of diagonal.
   Reported per method: LDS mean and standard error over the queries, and the seconds of the
   fit and of the solves plus scoring, timed on a second call, with the first call's extra
   (compilation) apart. The subset models are kept in ``OUT/.cache`` (with XLA's compiled
   programs), so a run interrupted or repeated trains only what is missing.
5. **Flipped labels, not memorised.** Bracket matching (1000 examples, 10% of the training
   labels flipped; a transformer of d_model 32, 1 layer, 4 heads) trained full-batch (Adam
   1e-2, 1000 steps) with an L2 penalty ``lam = 0.02`` and early stopping: of the evaluations
   every 25 steps, the parameters with the highest validation accuracy are kept. That the
   flipped labels are not memorised is shown by the training accuracy on flipped examples
   (against their flipped labels) beside clean ones. Reported: recall of flipped labels in the
   top 10% by self-influence for all five methods of 4 (GGN of 128 random training examples,
   ``damping = lam``), beside the training loss and random order.

Usage::

    taskset -c 1 python experiments/influence.py          # about 25 minutes on one CPU core (16 cached)
    python experiments/influence.py --quick --out-dir /tmp/inf
    python experiments/influence.py --sections lds   # one section again, the others kept from influence.json

Writes ``influence.json``, ``influence.png`` (scatter of predicted vs actual, recall curves)
and ``influence_lds.png`` (LDS per method and task, with standard errors) to ``--out-dir``
(default ``experiments/results``). ``--quick`` retrains 6 subsets once on 8 queries.
"""

import argparse
import dataclasses
import hashlib
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
from hvpopt.testbed import files, tasks, training  # noqa: E402

SECTIONS = ("leave_one_out", "flipped_labels", "proximal_bregman_response", "lds", "mislabel_transformer")

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


# ---------------------------------------------------------------- 4. linear datamodeling score

LDS_METHODS = {  # label: (method, options); every one with curvature="ggn" and the task's damping
    "identity": ("identity", {}),
    "cg (25 iterations)": ("cg", {"maxiter": 25}),
    "arnoldi (rank 50)": ("arnoldi", {"rank": 50}),
    "kfac": ("kfac", {}),
    "ekfac": ("ekfac", {}),
    "kfac (embedding factors)": ("kfac", {"embeddings": True}),
    "ekfac (embedding factors)": ("ekfac", {"embeddings": True}),
}
EKFAC_EXTRA_DAMPINGS = (1e-2, 1e-1)  # the same factors, refitted at no cost


def lds_setup(name: str) -> tuple[tasks.Task, training.TrainOptions]:
    """The task (training and evaluation sets cut) and the recipe of the full model and of every subset model."""
    tiny = {"d_model": 16, "num_layers": 1, "num_heads": 2}
    if name == "shakespeare":
        task = tasks.make_task("shakespeare", l2=1e-3, data_options={"context_length": 16}, model_options=tiny)
        options = training.TrainOptions(steps=300, batch_size=32, optimizer="adam", learning_rate=1e-2)
    else:
        task = tasks.make_task("dyck", l2=1e-3, data_options={"num_examples": 600}, model_options=tiny)
        options = training.TrainOptions(steps=300, batch_size=None, optimizer="adam", learning_rate=1e-2)
    task = dataclasses.replace(task, train=task.train.take(range(400)), validation=task.validation.take(range(64)))
    return task, dataclasses.replace(options, eval_every=options.steps)  # one evaluation, at the end


def lds(name: str, quick: bool, cache_dir: str) -> dict:
    task, options = lds_setup(name)
    num_subsets, seeds, num_queries = (6, 1, 8) if quick else (50, 2, 32)
    damping, model = task.l2, (task.model_fn, task.loss)
    start = time.perf_counter()
    params = training.train(task, options).params
    train_seconds = time.perf_counter() - start
    train, queries = _examples(task.train), _examples(task.validation.take(range(num_queries)))
    scores, methods = {}, {}
    for label, (method, extra) in LDS_METHODS.items():
        for call in range(2):  # the first call compiles, the second is the one timed
            inverse, fit_seconds = _timed(
                lambda: influence.fit_inverse_curvature(
                    task.example_loss,
                    params,
                    train,
                    method=method,
                    damping=damping,
                    curvature="ggn",
                    model=model,
                    key=jax.random.key(0),
                    **extra,
                )
            )
            (scores[label], solver), score_seconds = _timed(
                lambda: _scores(task.example_loss, params, train, queries, inverse)
            )
            if call == 0:
                methods[label] = {"first_call_seconds": fit_seconds + score_seconds}
        methods[label].update(fit_seconds=fit_seconds, solve_and_score_seconds=score_seconds, **solver)
        methods[label]["compile_seconds"] = methods[label]["first_call_seconds"] - fit_seconds - score_seconds
        if method == "ekfac":
            for extra_damping in EKFAC_EXTRA_DAMPINGS:
                refit = inverse._replace(
                    apply=influence.kronecker_inverse_rows(inverse.factors, extra_damping), damping=extra_damping
                )
                (scores[f"ekfac (damping {extra_damping:g})"], _), seconds = _timed(
                    lambda: _scores(task.example_loss, params, train, queries, refit)
                )
                methods[f"ekfac (damping {extra_damping:g})"] = {"solve_and_score_seconds": seconds}
    subsets = influence.datamodel_subsets(task.train.num_examples, num_subsets, fraction=0.5, seed=0)
    retrain, trained = _cached_retraining(task, options, cache_dir)
    query_losses = jax.jit(lambda p: jax.vmap(task.example_loss, in_axes=(None, 0))(p, queries))
    start = time.perf_counter()
    losses = influence.datamodel_losses(retrain, query_losses, subsets, seeds=seeds)
    retrain_seconds = time.perf_counter() - start
    for label, method_scores in scores.items():
        result = influence.linear_datamodeling_score(method_scores, subsets, losses)
        methods[label].update(
            lds=result.mean,
            standard_error=result.standard_error,
            num_excluded=result.num_excluded,
            finite_scores=bool(np.all(np.isfinite(method_scores))),
        )
    return {
        "task": task.describe(),
        "recipe": dataclasses.asdict(options),
        "retraining": "the recipe on the subset's examples; seed s adds s to the task's seed (the initial "
        "parameters, the task's data kept) and to the batch-order seed; query losses averaged over the seeds",
        "train_seconds": train_seconds,
        "damping": damping,
        "curvature": "ggn",
        "curvature_examples": task.train.num_examples,
        "subsets": num_subsets,
        "fraction": 0.5,
        "seeds": seeds,
        "queries": num_queries,
        "retrained_this_run": trained["count"],
        "seconds_per_retraining": trained["seconds"] / max(trained["count"], 1),
        "retrain_seconds": retrain_seconds,
        "query_loss_std_across_subsets": float(np.mean(np.std(losses, axis=0))),
        "methods": methods,
    }


def _examples(dataset) -> tuple:
    return dataset.inputs, dataset.targets


def _timed(compute):
    """``(compute(), seconds)``, the seconds up to the result being ready."""
    start = time.perf_counter()
    result = jax.block_until_ready(compute())
    return result, time.perf_counter() - start


def _scores(loss_fn, params, train, queries, inverse) -> tuple[np.ndarray, dict]:
    """The scores of every training example on the queries, and the solver's diagnostics (CG's iterations)."""
    directions, solver = influence.query_directions(loss_fn, params, queries, inverse)
    blocks = influence.score_blocks(loss_fn, params, train, directions)
    diagnostics = {}
    if "iterations" in solver:
        diagnostics = {
            "mean_iterations": float(np.mean(solver["iterations"])),
            "converged": int(np.sum(solver["converged"])),
        }
    return np.asarray(jnp.concatenate([block for _, block in blocks], axis=1)), diagnostics


def _cached_retraining(task: tasks.Task, options: training.TrainOptions, cache_dir: str):
    """``retrain(indices, seed) -> params`` for :func:`hvpopt.influence.datamodel_losses`, each model kept in
    ``cache_dir`` (keyed on the task and recipe) so that an interrupted run resumes; and a count of trainings."""
    setting = json.dumps(
        {"task": task.config, "train": task.train.ids.tolist(), "recipe": dataclasses.asdict(options)}, sort_keys=True
    )
    folder = os.path.join(cache_dir, f"lds-{task.name}-{hashlib.sha256(setting.encode()).hexdigest()[:12]}")
    os.makedirs(folder, exist_ok=True)
    treedef = jax.tree.structure(task.params)
    trained = {"count": 0, "seconds": 0.0}

    def retrain(indices: np.ndarray, seed: int):
        path = os.path.join(folder, f"subset-{hashlib.sha256(indices.tobytes()).hexdigest()[:16]}-seed-{seed}.npz")
        if not os.path.exists(path):
            start = time.perf_counter()
            initial = tasks.make_task(**{**task.config, "seed": task.config["seed"] + seed}).params
            subset = dataclasses.replace(task, train=task.train.take(indices))
            result = training.train(subset, dataclasses.replace(options, seed=options.seed + seed), params=initial)
            leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(result.params)]
            files.write_atomically(path, lambda file: np.savez(file, *leaves))
            trained["count"] += 1
            trained["seconds"] += time.perf_counter() - start
        with np.load(path, allow_pickle=False) as saved:
            return jax.tree.unflatten(treedef, [jnp.asarray(saved[f"arr_{i}"]) for i in range(len(saved.files))])

    return retrain, trained


# ---------------------------------------------------------------- 5. flipped labels, not memorised

MISLABEL_L2 = 0.02  # with early stopping: the flipped labels are not fitted (0.05 fits clean ones worse, 0.2 nothing)


def mislabel_transformer(quick: bool) -> dict:
    task = tasks.make_task(
        "dyck",
        flip_fraction=0.1,
        l2=MISLABEL_L2,
        data_options={"num_examples": 500 if quick else 1000},
        model_options={"d_model": 32, "num_layers": 1, "num_heads": 4},
    )
    options = training.TrainOptions(
        steps=300 if quick else 1000, batch_size=None, optimizer="adam", learning_rate=1e-2, eval_every=25
    )
    best = {"validation_accuracy": -1.0}

    def keep_best(params, history):  # early stopping: the parameters where validation accuracy peaks
        if history[-1]["validation_accuracy"] > best["validation_accuracy"]:
            best.update(history[-1], params=params)

    start = time.perf_counter()
    training.train(task, options, on_evaluation=keep_best)
    train_seconds = time.perf_counter() - start
    params, train, flipped = best.pop("params"), _examples(task.train), np.asarray(task.train.flipped)
    hits = np.asarray(jnp.argmax(task.model_fn(params, train[0]), axis=-1) == train[1])
    losses = np.asarray(jax.vmap(task.example_loss, in_axes=(None, 0))(params, train))
    subset = task.train.take(np.sort(np.random.default_rng(0).choice(task.train.num_examples, 128, replace=False)))
    recall = {"random": 0.1, "training loss": influence.flipped_label_recall(losses, flipped, fraction=0.1)}
    seconds = {}
    for label, (method, extra) in LDS_METHODS.items():
        scores, seconds[label] = _timed(
            lambda: influence.self_scores(
                task.example_loss,
                params,
                train,
                method=method,
                damping=task.l2,
                curvature="ggn",
                model=(task.model_fn, task.loss),
                curvature_data=_examples(subset),
                key=jax.random.key(0),
                **extra,
            )
        )
        finite = bool(np.all(np.isfinite(scores)))
        recall[label] = influence.flipped_label_recall(np.asarray(scores), flipped, fraction=0.1) if finite else None
    return {
        "task": task.describe(),
        "recipe": dataclasses.asdict(options),
        "early_stopping": "the parameters of the evaluation (every 25 steps) with the highest validation accuracy",
        "stopped_at_step": best["step"],
        "validation_accuracy": best["validation_accuracy"],
        "train_accuracy_flipped": float(hits[flipped].mean()),
        "train_accuracy_clean": float(hits[~flipped].mean()),
        "mean_loss_flipped": float(losses[flipped].mean()),
        "mean_loss_clean": float(losses[~flipped].mean()),
        "train_seconds": train_seconds,
        "damping": task.l2,
        "curvature": "ggn",
        "curvature_examples": 128,
        "flipped": int(flipped.sum()),
        "recall_at_10_percent": recall,
        "seconds": seconds,
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
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)


def plot_lds(lds_report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(lds_report), figsize=(6.5 * len(lds_report), 4.2), squeeze=False)
    for axis, (name, result) in zip(axes[0], lds_report.items()):
        labels = list(result["methods"])
        means = [result["methods"][label]["lds"] for label in labels]
        errors = [result["methods"][label]["standard_error"] for label in labels]
        axis.bar(range(len(labels)), means, yerr=errors, capsize=3, color="tab:blue")
        axis.axhline(0, color="k", lw=0.6)
        axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        axis.set(
            ylabel="linear datamodeling score",
            title=f"{name}: {result['subsets']} subsets x {result['seeds']} seeds, "
            f"{result['queries']} queries, damping {result['damping']:g}",
        )
    figure.tight_layout()
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with fewer examples")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
        help="the measurements to run; the others are kept from an existing influence.json in --out-dir",
    )  # fmt: skip
    args = parser.parse_args()
    cache_dir = os.path.join(args.out_dir, ".cache")  # subset models, compiled programs: a rerun resumes
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir, "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # each retraining compiles its own step
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    load_before, start = cpu_load(), time.perf_counter()
    path = os.path.join(args.out_dir, "influence.json")
    report = {}
    if set(args.sections) != set(SECTIONS):
        with open(path) as file:
            report = json.load(file)
    report |= {
        "experiment": "influence",
        "environment": environment(("jax", "jaxlib", "flax", "optax", "numpy", "scikit-learn", "hvpopt")),
        "cpu_load_before": load_before,
        "sections_run": args.sections,
    }
    if "leave_one_out" in args.sections:
        with jax.enable_x64(True):
            loo = {str(lam): leave_one_out(lam, args.quick) for lam in (0.1, 0.01)}
        report["leave_one_out"] = loo["0.1"]
        report["leave_one_out_lam_0.01"] = {k: v for k, v in loo["0.01"].items() if k != "scatter"}
    if "flipped_labels" in args.sections:
        report["flipped_labels"] = {name: flipped_labels(name, args.quick) for name in ("blobs", "dyck")}
    if "proximal_bregman_response" in args.sections:
        report["proximal_bregman_response"] = bregman(args.quick)
    if "lds" in args.sections:
        report["lds"] = {name: lds(name, args.quick, cache_dir) for name in ("shakespeare", "dyck")}
    if "mislabel_transformer" in args.sections:
        report["mislabel_transformer"] = mislabel_transformer(args.quick)
    report["seconds"] = time.perf_counter() - start
    report["cpu_load_after"] = cpu_load()
    with files.atomic_path(path) as temporary:
        with open(temporary, "w") as file:
            json.dump(report, file, indent=1)
    plot(report, os.path.join(args.out_dir, "influence.png"))
    plot_lds(report["lds"], os.path.join(args.out_dir, "influence_lds.png"))
    print(
        json.dumps(
            {
                "leave_one_out": {
                    lam: {
                        m: {k: round(v, 4) for k, v in r.items() if k != "seconds"}
                        for m, r in report[key]["methods"].items()
                    }
                    for lam, key in (("0.1", "leave_one_out"), ("0.01", "leave_one_out_lam_0.01"))
                },
                "flipped_recall_at_10_percent": {
                    k: v["recall_at_10_percent"] for k, v in report["flipped_labels"].items()
                },
                "proximal_bregman_response": report["proximal_bregman_response"]["methods"],
                "lds": {
                    name: {
                        label: {
                            k: r.get(k) for k in ("lds", "standard_error", "fit_seconds", "solve_and_score_seconds")
                        }
                        for label, r in result["methods"].items()
                    }
                    for name, result in report["lds"].items()
                },
                "mislabel_transformer": report["mislabel_transformer"]["recall_at_10_percent"],
                "seconds": report["seconds"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
