"""Sharded over a mesh, every entry point gives its one-device numbers, through XLA collectives.

This module needs several devices: ``tests/test_multi_device.py`` runs it in its
own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (CPU);
on a machine with 4 or more devices the main run collects it directly.

Each check compares a jitted function on a batch split over 4 devices
(:func:`hvpopt.shard_batch`) with the same function on one device, in float64
(they differ only in the order of the sums), and reads the compiled program:
a data-parallel product must sum its shares with an all-reduce and must not
gather the batch (no all-gather, all-to-all or collective-permute).
"""

import collections
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_mlp, make_transformer, random_like
from jax.sharding import PartitionSpec

import hvpopt
from hvpopt import cli, influence
from hvpopt.testbed import tasks, training

DEVICES = 4
MOVES_DATA = ("all-gather", "all-to-all", "collective-permute")
pytestmark = pytest.mark.skipif(jax.device_count() < DEVICES, reason=f"needs {DEVICES} devices")


@pytest.fixture(scope="module")
def mesh():
    return hvpopt.data_mesh(DEVICES)


def compiled(function, *args) -> tuple:
    """``jax.jit(function)(*args)``, and how many of each collective its compiled program holds."""
    program = jax.jit(function).lower(*args).compile()
    pattern = r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
    return program(*args), collections.Counter(re.findall(pattern, program.as_text()))


def data_parallel(function, *args):
    """``jax.jit(function)(*args)``, checked to sum over devices and to move no data between them."""
    result, found = compiled(function, *args)
    assert found["all-reduce"] >= 1, found
    assert not any(found[name] for name in MOVES_DATA), found
    return result


def assert_same(sharded, single, rtol=1e-10):
    as_numbers = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        a, b = as_numbers(a), as_numbers(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-12)


def mlp_problem(num_examples=16):
    problem = make_mlp()
    x = jax.random.normal(jax.random.key(7), (num_examples, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(8), (num_examples,), 0, 3)
    return problem._replace(inputs=x, targets=y)


def transformer_problem():
    problem = make_transformer()
    tokens = jax.random.randint(jax.random.key(9), (8, 5), 0, 5)
    return problem._replace(inputs=tokens[:, :-1], targets=tokens[:, 1:])


PRODUCTS = {
    "hvp": lambda p, params, v, x, y: hvpopt.hvp(p.objective, params, v, x, y),
    "ggn_vp": lambda p, params, v, x, y: hvpopt.ggn_vp(p.model_fn, p.loss, params, v, x, y),
    "fisher_vp": lambda p, params, v, x, y: hvpopt.fisher_vp(p.model_fn, p.loss, params, v, x, y),
    "mc_fisher_vp": lambda p, params, v, x, y: hvpopt.mc_fisher_vp(
        p.model_fn, p.loss, params, v, x, y, key=jax.random.key(0), num_samples=2
    ),
    "empirical_fisher_vp": lambda p, params, v, x, y: hvpopt.empirical_fisher_vp(
        lambda q, ex: p.objective(q, ex[0][None], ex[1][None]), params, v, (x, y)
    ),
}


@pytest.mark.parametrize(
    "name, make", [(name, "mlp") for name in sorted(PRODUCTS)] + [("hvp", "transformer"), ("ggn_vp", "transformer")]
)
def test_curvature_products_on_a_sharded_batch(name, make, mesh):
    problem = {"mlp": mlp_problem, "transformer": transformer_problem}[make]()
    product = lambda params, v, x, y: PRODUCTS[name](problem, params, v, x, y)
    v = random_like(jax.random.key(1), problem.params)
    single = jax.jit(product)(problem.params, v, problem.inputs, problem.targets)
    args = (*hvpopt.replicate((problem.params, v), mesh), *hvpopt.shard_batch((problem.inputs, problem.targets), mesh))
    assert_same(data_parallel(product, *args), single)


@pytest.mark.parametrize("num_examples", [32, 30, 3])
def test_average_over_chunks_splits_the_examples_and_psums_the_shares(num_examples, mesh):
    problem = mlp_problem(num_examples)
    batch_matvec = lambda v, batch: hvpopt.ggn_vp(problem.model_fn, problem.loss, problem.params, v, *batch)
    v = random_like(jax.random.key(2), problem.params)
    whole = jax.jit(batch_matvec)(v, (problem.inputs, problem.targets))  # the mean over every example at once
    average = lambda v, data: hvpopt.average_over_chunks(batch_matvec, data, chunk_size=3, mesh=mesh)(v)
    data = (problem.inputs, problem.targets)
    if num_examples % DEVICES == 0:
        data = hvpopt.shard_batch(data, mesh)
    if num_examples % DEVICES == 0:  # split already: the shares are summed and nothing moves
        assert_same(data_parallel(average, v, data), whole)
    else:  # the split and the leftover examples need data moved; the shares are still psummed
        result, found = compiled(average, v, data)
        assert_same(result, whole)
        assert found["all-reduce"] >= (1 if num_examples >= DEVICES else 0), found


def test_cg_lanczos_and_lissa_run_unchanged_on_a_sharded_operator(mesh):
    problem = mlp_problem()

    def solve(params, x, y, b):
        matvec = hvpopt.ggn_operator(problem.model_fn, problem.loss, params, x, y)
        return (
            hvpopt.cg(matvec, b, damping=0.1, rtol=1e-12, maxiter=200).x,
            hvpopt.eigsh(matvec, b, 3, key=jax.random.key(3)).eigenvalues,
            hvpopt.lissa(matvec, b, damping=0.1, depth=50, key=jax.random.key(4)).x,
        )

    b = random_like(jax.random.key(5), problem.params)
    single = jax.jit(solve)(problem.params, problem.inputs, problem.targets, b)
    params, b_on_mesh = hvpopt.replicate((problem.params, b), mesh)
    x, y = hvpopt.shard_batch((problem.inputs, problem.targets), mesh)
    assert_same(data_parallel(solve, params, x, y, b_on_mesh), single, rtol=1e-8)


def test_cg_on_parameters_split_over_the_devices(mesh):
    """FSDP: the large arrays split, CG's inner products and the product's gathers become collectives."""
    problem = transformer_problem()
    b = random_like(jax.random.key(6), problem.params)

    def solve(params, x, y, b):
        matvec = hvpopt.hessian_operator(problem.objective, params, x, y)
        return hvpopt.cg(matvec, b, damping=1.0, rtol=1e-12, maxiter=100).x

    single = jax.jit(solve)(problem.params, problem.inputs, problem.targets, b)
    params, b_split = (hvpopt.shard_params(tree, mesh, min_size=8) for tree in (problem.params, b))
    assert any(leaf.sharding.spec != PartitionSpec() for leaf in jax.tree.leaves(params))
    x, y = hvpopt.shard_batch((problem.inputs, problem.targets), mesh)
    solution, found = compiled(solve, params, x, y, b_split)
    assert_same(solution, single, rtol=1e-8)
    assert found["all-reduce"] >= 1 and found["all-gather"] >= 1, found


@pytest.mark.parametrize("name", ["newton_cg", "hessian_free", "natural_gradient", "kfac"])
def test_an_optimizer_step_runs_data_parallel_under_one_jit(name, mesh):
    """CG runs to convergence: stopped early, it would amplify the different rounding."""
    problem = mlp_problem()
    optimizer = {
        "newton_cg": lambda: hvpopt.newton_cg(),
        "hessian_free": lambda: hvpopt.hessian_free(problem.model_fn, problem.loss, maxiter=10),
        "natural_gradient": lambda: hvpopt.natural_gradient(
            problem.model_fn, problem.loss, damping=0.1, maxiter=100, rtol=1e-10
        ),
        "kfac": lambda: hvpopt.kfac(
            problem.model_fn, problem.loss, example_batch=(problem.inputs, problem.targets), damping=0.1
        ),
    }[name]()

    def step(params, state, x, y):
        objective = lambda p: problem.objective(p, x, y)
        loss, grads = jax.value_and_grad(objective)(params)
        updates, state = optimizer.update(
            grads, state, params, value=loss, grad=grads, value_fn=objective, curvature_batch=(x, y)
        )
        return optax.apply_updates(params, updates), state

    state = optimizer.init(problem.params)
    single = jax.jit(step)(problem.params, state, problem.inputs, problem.targets)
    params, state = hvpopt.replicate((problem.params, state), mesh)
    x, y = hvpopt.shard_batch((problem.inputs, problem.targets), mesh)
    assert_same(data_parallel(step, params, state, x, y), single, rtol=1e-8)


# exact and cg: a dense matrix and a per-query solve, both over the sharded curvature. arnoldi and lissa fit
# through the same sharded operator (tests/test_influence.py checks them against exact on one device).
@pytest.mark.parametrize("method", ["exact", "cg"])
def test_pairwise_and_self_scores_shard_the_training_set(method, mesh):
    problem = mlp_problem(30)  # 30: chunks of 8 and a ragged last one over 4 devices
    loss = lambda params, example: problem.objective(params, example[0][None], example[1][None])
    train, queries = (problem.inputs, problem.targets), (problem.inputs[:3], problem.targets[:3])
    options = dict(
        method=method,
        damping=0.1,
        curvature="ggn",
        model=(problem.model_fn, problem.loss),
        chunk_size=8,
        rank=10,
        depth=30,
    )
    single = influence.pairwise_scores(loss, problem.params, train, queries, **options)
    sharded = influence.pairwise_scores(loss, problem.params, train, queries, mesh=mesh, **options)
    assert_same(sharded, single, rtol=1e-8)
    assert sharded.sharding.spec == PartitionSpec()  # gathered
    chunks = influence.gradients.padded_gradient_chunks(loss, problem.params, train, chunk_size=8, mesh=mesh)
    assert all(
        rows.shape[0] == 8 and rows.sharding.spec == PartitionSpec("data")  # the ragged last one too
        for _, _, rows in chunks
    )
    assert_same(
        influence.self_scores(loss, problem.params, train, mesh=mesh, **options),
        influence.self_scores(loss, problem.params, train, **options),
        rtol=1e-8,
    )


def test_influence_gradients_stay_on_their_devices_and_the_curvature_psums(mesh):
    problem = mlp_problem()
    loss = lambda params, example: problem.objective(params, example[0][None], example[1][None])
    params = hvpopt.replicate(problem.params, mesh)
    chunk = hvpopt.shard_batch((problem.inputs, problem.targets), mesh)
    gradients = lambda params, chunk: influence.flat_example_gradients(loss, params, chunk)
    rows, found = compiled(gradients, params, chunk)
    assert not found and rows.sharding.spec == PartitionSpec("data")
    curvature = lambda params, chunk, v: influence.curvature_operator(
        loss, params, chunk, curvature="ggn", model=(problem.model_fn, problem.loss), chunk_size=2, mesh=mesh
    )(v)
    data_parallel(curvature, params, chunk, params)


def test_training_on_a_mesh_follows_the_one_device_run(mesh):
    task = tasks.make_task("blobs", data_options={"num_examples": 128})
    options = training.TrainOptions(steps=4, batch_size=32, eval_every=2)
    single = training.train(task, options)
    sharded = training.train(task, options, progress=False, mesh=mesh)
    assert_same(sharded.params, single.params, rtol=1e-4)
    assert [r["validation_loss"] for r in sharded.history] == pytest.approx(
        [r["validation_loss"] for r in single.history], rel=1e-5
    )
    with pytest.raises(ValueError, match=r"batch_size \(30\) must be a multiple of the 4 devices .* a mesh of 2"):
        training.train(task, training.TrainOptions(steps=1, batch_size=30), progress=False, mesh=mesh)


def test_shard_batch_names_an_uneven_split(mesh):
    with pytest.raises(ValueError, match="30 examples, which the 4 devices .* use a multiple of 4"):
        hvpopt.shard_batch(np.zeros((30, 2)), mesh)


def test_the_commands_split_their_work_over_devices(tmp_path, capsys):
    out = str(tmp_path / "blobs")
    train = [
        "train",
        "--task",
        "blobs",
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--no-progress",
        "--json",
        "--data",
        "num_examples=64",
        "--optimizer",
        "newton_cg",
        "--batch-size",
        "32",
    ]
    assert cli.main([*train, "--out", out, "--devices", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == 4
    assert cli.main([*train, "--out", str(tmp_path / "bad"), "--batch-size", "30", "--devices", "4"]) == 2
    assert (
        "--batch-size 30 cannot be split evenly over 4 devices; pass a --batch-size that is a multiple of 4 "
        "or --devices 2" in capsys.readouterr().err
    )
    assert not os.path.exists(tmp_path / "bad")

    scores = {}
    for devices in ("1", "4"):
        folder = str(tmp_path / f"influence-{devices}")
        command = [
            "influence",
            "--checkpoint",
            out,
            "--num-queries",
            "3",
            "--damping",
            "0.01",
            "--chunk-size",
            "16",
            "--cg-iterations",
            "30",
            "--no-progress",
            "--out",
            folder,
            "--devices",
            devices,
        ]
        assert cli.main(command) == 0
        scores[devices] = np.load(os.path.join(folder, "scores.npy"))
        assert json.load(open(os.path.join(folder, "metadata.json")))["devices"] == int(devices)
    # float32 (the task's dtype): the sums' order moves the scores by ~1e-5 of the largest
    np.testing.assert_allclose(scores["4"], scores["1"], rtol=1e-3, atol=1e-4 * np.abs(scores["1"]).max())


def test_kronecker_factors_on_a_mesh_are_the_one_device_factors(mesh):
    problem = mlp_problem(14)  # 3 per device, the two left over averaged on every device
    data = (problem.inputs, problem.targets)
    fit = lambda mesh: hvpopt.fit_kronecker_factors(
        problem.model_fn, problem.loss, problem.params, data, kind="kfac", chunk_size=2, mesh=mesh
    )
    v = random_like(jax.random.key(3), problem.params)
    assert_same(hvpopt.kronecker_operator(fit(mesh))(v), hvpopt.kronecker_operator(fit(None))(v), rtol=1e-9)
