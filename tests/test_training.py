"""Training, evaluation and checkpoints: loss goes down, runs repeat, files round-trip or are refused."""

import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest
from test_tasks import SMALL_DATA, tiny_task

from hvpopt.testbed import checkpoint, training
from hvpopt.testbed.tasks import TASKS, make_task

FEW_STEPS = training.TrainOptions(steps=30, batch_size=16, eval_every=30, learning_rate=1e-2)


def train_loss(task, params):
    return training.evaluate(task, params, task.train)["loss"]


@pytest.mark.parametrize("name", TASKS)
def test_loss_decreases_on_every_task_within_a_few_dozen_steps(name):
    task = make_task(name, data_options=SMALL_DATA[name])  # the task's own model
    result = training.train(task, FEW_STEPS)
    before, after = train_loss(task, task.params), train_loss(task, result.params)
    assert after < 0.9 * before, (before, after)
    assert result.steps_done == 30 and not result.interrupted
    assert result.history[-1]["step"] == 30 and np.isfinite(result.history[-1]["validation_loss"])


def test_training_is_deterministic_for_a_seed():
    task = tiny_task("blobs")
    options = training.TrainOptions(steps=5, batch_size=8, eval_every=5, seed=3)
    first, again = (training.train(task, options).params for _ in range(2))
    other = training.train(
        task, training.TrainOptions(steps=5, batch_size=8, eval_every=5, seed=4), progress=False
    ).params
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)))


def test_evaluate_is_the_exact_mean_over_the_split():
    task = tiny_task("reverse")
    metrics = training.evaluate(task, task.params, task.validation, batch_size=3)  # a ragged last batch
    dataset = task.validation
    example_loss = jax.jit(task.example_loss)
    losses = [
        example_loss(task.params, (dataset.inputs[i], jax.tree.map(lambda t: t[i], dataset.targets)))
        for i in range(dataset.num_examples)
    ]
    logits = jax.jit(task.model_fn)(task.params, dataset.inputs)
    labels, mask = dataset.targets
    accuracy = float(np.sum((np.argmax(logits, -1) == labels) * mask) / np.sum(mask))
    assert metrics["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(accuracy, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]))


def test_ctrl_c_returns_the_last_completed_step():
    task = tiny_task("blobs")
    calls = []

    def interrupt_on_second(params, history):
        calls.append(history[-1]["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt

    options = training.TrainOptions(steps=50, batch_size=8, eval_every=5)
    result = training.train(task, options, on_evaluation=interrupt_on_second)
    assert result.interrupted and result.steps_done == 10 and calls == [5, 10]
    replay = training.train(task, training.TrainOptions(steps=10, batch_size=8, eval_every=5))
    assert result.steps_done == replay.steps_done


@pytest.mark.parametrize(
    "optimizer, learning_rate", [("newton_cg", None), ("hessian_free", None), ("natural_gradient", 0.5)]
)
def test_second_order_optimizers_train_logistic_regression_to_its_minimum(optimizer, learning_rate):
    task = make_task("blobs", data_options={"num_examples": 60})  # convex: L2 penalty 1e-2
    inputs, targets = task.train.inputs, task.train.targets
    gradient_norm = lambda p: float(optax.tree_utils.tree_norm(jax.grad(task.objective)(p, inputs, targets)))
    options = training.TrainOptions(
        steps=15, batch_size=None, optimizer=optimizer, learning_rate=learning_rate, eval_every=15
    )
    result = training.train(task, options)
    assert gradient_norm(result.params) < 1e-4 * gradient_norm(task.params)
    record = result.history[-1]
    assert record["optimizer_skipped_steps"] == 0 and record["optimizer_cg_iterations"] >= 1
    assert any(name.startswith("optimizer_num_") and value > 15 for name, value in record.items())


def test_learning_rate_defaults_and_second_order_options_are_checked():
    assert training.TrainOptions().learning_rate == 3e-3
    assert training.TrainOptions(optimizer="newton_cg").learning_rate == 1.0
    with pytest.raises(ValueError, match="damping is for the optimizers"):
        training.TrainOptions(damping=0.1)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        training.TrainOptions(optimizer="hessian_free", damping=-1.0)
    with pytest.raises(ValueError, match="cg_iterations must be a positive integer"):
        training.TrainOptions(optimizer="natural_gradient", cg_iterations=0)


def test_the_curvature_batch_is_the_first_examples_of_each_batch():
    task = make_task("blobs", data_options={"num_examples": 40})
    options = training.TrainOptions(steps=1, batch_size=None, optimizer="kfac", curvature_batch_size=8, eval_every=1)
    trained = training.train(task, options).params
    x, y = task.train.inputs, task.train.targets  # a full batch is the training set in order
    objective = lambda p: task.objective(p, x, y)
    value, grads = jax.value_and_grad(objective)(task.params)
    tx = training.make_optimizer(task, options)
    updates, _ = tx.update(grads, tx.init(task.params), task.params, value=value, value_fn=objective,
                           curvature_batch=(x[:8], y[:8]))  # fmt: skip
    by_hand = optax.apply_updates(task.params, updates)
    whole = training.train(task, dataclasses.replace(options, curvature_batch_size=None)).params
    for a, b, c in zip(jax.tree.leaves(trained), jax.tree.leaves(by_hand), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float32: eager against jit rounding
        assert not np.allclose(a, c, rtol=1e-3, atol=0) or a.size == 0
    with pytest.raises(ValueError, match=r"curvature_batch_size \(33\) exceeds the batch size \(32\)"):
        training.train(task, dataclasses.replace(options, curvature_batch_size=33))
    with pytest.raises(ValueError, match="curvature_batch_size is for the optimizers kfac, sophia_g"):
        training.TrainOptions(curvature_batch_size=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    task = tiny_task("modular")
    params = training.train(task, training.TrainOptions(steps=3, batch_size=8, eval_every=3)).params
    folder = str(tmp_path_factory.mktemp("checkpoint"))
    checkpoint.save_checkpoint(folder, params, {"task": task.config, "step": 3})
    return folder, params


def test_checkpoint_round_trip_is_bit_exact(saved):
    folder, params = saved
    loaded = checkpoint.load_checkpoint(folder)
    assert loaded.config["step"] == 3 and loaded.task.name == "modular"
    assert jax.tree.structure(loaded.params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def copy_of(saved, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in os.listdir(saved[0]):
        (folder / name).write_bytes(open(os.path.join(saved[0], name), "rb").read())
    return folder


def edit_config(folder, change):
    config = json.loads((folder / checkpoint.CONFIG_FILE).read_text())
    change(config)
    (folder / checkpoint.CONFIG_FILE).write_text(json.dumps(config))


def params_file(folder):
    """The parameters file that the checkpoint's config names."""
    return folder / json.loads((folder / checkpoint.CONFIG_FILE).read_text())["params"]["file"]


def test_a_changed_or_truncated_params_file_is_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    payload = bytearray(params_file(folder).read_bytes())
    payload[len(payload) // 2] ^= 1
    params_file(folder).write_bytes(bytes(payload))
    with pytest.raises(ValueError, match="truncated or was changed"):
        checkpoint.load_checkpoint(str(folder))
    params_file(folder).write_bytes(bytes(payload[:100]))
    with pytest.raises(ValueError, match="truncated or was changed"):
        checkpoint.load_checkpoint(str(folder))


def test_a_config_that_builds_other_shapes_is_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    edit_config(folder, lambda c: c["task"]["model_options"].update(d_model=12))
    with pytest.raises(ValueError, match=r"parameter '.*' has shape .* the config builds shape"):
        checkpoint.load_checkpoint(str(folder))


def test_a_dtype_mismatch_is_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    task = make_task(**json.loads((folder / checkpoint.CONFIG_FILE).read_text())["task"])
    as_float16 = jax.tree.map(lambda x: np.asarray(x, np.float16), task.params)
    checkpoint.save_checkpoint(str(folder), as_float16, {"task": task.config})
    with pytest.raises(ValueError, match="dtype float16; the config builds .* float32"):
        checkpoint.load_checkpoint(str(folder))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: os.remove(params_file(f)), r"params-[0-9a-f]{16}\.msgpack is missing"),
        (lambda f: edit_config(f, lambda c: c["params"].update(file="../elsewhere.msgpack")), "params.file must name"),
        (lambda f: os.remove(f / checkpoint.CONFIG_FILE), "config.json is missing"),
        (lambda f: (f / checkpoint.CONFIG_FILE).write_text('{"task": '), "not valid JSON"),
        (lambda f: edit_config(f, lambda c: c["task"].update(name="mnist")), "task config does not build"),
        (lambda f: edit_config(f, lambda c: c.update(format_version=99)), "format_version 99"),
    ],
)
def test_broken_checkpoints_are_refused_with_the_file_named(saved, tmp_path, damage, message):
    folder = copy_of(saved, tmp_path)
    damage(folder)
    with pytest.raises(ValueError, match=message):
        checkpoint.load_checkpoint(str(folder))


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.load_checkpoint(str(tmp_path / "nowhere"))
