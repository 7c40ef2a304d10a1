"""Training and evaluating a built-in task: the loop behind ``hvpopt train`` and ``hvpopt eval``.

Every optimizer is called the way ``optax.lbfgs`` is, ``tx.update(grads,
state, params, value=loss, grad=grads, value_fn=objective)``, so first-order
optax optimizers and hvpopt's second-order ones plug into the same loop. A
step (gradient, update, apply) is one jitted function; batches come from a
NumPy generator seeded by ``seed``, so a run is deterministic on one machine.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hvpopt import _checks
from hvpopt._progress import Progress
from hvpopt.data import Dataset
from hvpopt.tasks import Task, check_batch_size


def _adamw(learning_rate, weight_decay):
    return optax.adamw(learning_rate, weight_decay=weight_decay)


def _adam(learning_rate, weight_decay):
    return optax.adam(learning_rate)


def _sgd(learning_rate, weight_decay):
    return optax.sgd(learning_rate, momentum=0.9)


#: ``name -> (learning_rate, weight_decay) -> optax transformation``.
OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "adam": _adam, "sgd": _sgd}


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How to train; stored in the checkpoint's config.

    Attributes:
      steps: optimizer steps.
      batch_size: examples per step (None: the whole training set, every step).
      optimizer: a name in :data:`OPTIMIZERS`.
      learning_rate: peak learning rate, reached after a linear warm-up over
        the first 5% of steps and decayed to a tenth by a cosine.
      weight_decay: decoupled weight decay (AdamW only).
      clip_norm: gradients are clipped to this global norm (None: no clipping).
      eval_every: steps between validation evaluations (and checkpoints).
      seed: seed of the batch order.
    """

    steps: int = 1500
    batch_size: int | None = 64
    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    clip_norm: float | None = 1.0
    eval_every: int = 500
    seed: int = 0

    def __post_init__(self):
        _checks.check_positive_int("steps", self.steps)
        _checks.check_positive_int("eval_every", self.eval_every)
        if self.batch_size is not None:
            _checks.check_positive_int("batch_size", self.batch_size)
        _checks.check_choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        for name in ("learning_rate", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive; got {value!r}.")
        _checks.check_nonnegative("weight_decay", self.weight_decay)


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      params: the parameters after the last completed step.
      steps_done: completed steps (fewer than asked if interrupted).
      history: one record per evaluation: step, mean training loss since the
        previous record, validation loss and accuracy, seconds since the first
        step finished.
      compile_seconds: time of the first step, compilation included.
      steps_per_second: throughput of the steps after the first, evaluations
        and checkpoints left out.
      interrupted: the run was stopped by Ctrl-C; ``params`` are still valid.
    """

    params: Any
    steps_done: int
    history: list[dict]
    compile_seconds: float
    steps_per_second: float
    interrupted: bool


def make_optimizer(options: TrainOptions) -> optax.GradientTransformationExtraArgs:
    """The optimizer of ``options``, with warm-up, cosine decay and clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, options.learning_rate, warmup_steps=max(1, options.steps // 20),
        decay_steps=options.steps, end_value=options.learning_rate / 10,
    )
    optimizer = OPTIMIZERS[options.optimizer](schedule, options.weight_decay)
    clip = [optax.clip_by_global_norm(options.clip_norm)] if options.clip_norm else []
    return optax.chain(*clip, optimizer)


def train(task: Task, options: TrainOptions = TrainOptions(), *, params: Any = None,
          on_evaluation: Callable[[Any, list[dict]], None] | None = None,
          progress: bool = True) -> TrainResult:
    """Trains ``task`` from ``params`` (its initial parameters by default).

    Args:
      task: what to train.
      options: steps, batch size, optimizer and its settings.
      params: starting parameters; ``task.params`` if None.
      on_evaluation: called as ``on_evaluation(params, history)`` after each
        evaluation (``hvpopt train`` saves a checkpoint there).
      progress: draw a progress bar with loss and throughput on stderr.

    Returns:
      A :class:`TrainResult`. Ctrl-C ends training early with
      ``interrupted=True`` and the parameters of the last completed step.
    """
    params = task.params if params is None else params
    batch_size = check_batch_size(task, options.batch_size or task.train.num_examples)
    optimizer = make_optimizer(options)
    step = _make_step(task, optimizer)
    opt_state = optimizer.init(params)
    batches = _batch_indices(task.train.num_examples, batch_size, options.seed)
    bar = Progress(options.steps, "train") if progress else None
    history, losses, done, interrupted = [], [], 0, False
    compile_seconds = evaluation_seconds = 0.0
    start = time.perf_counter()
    try:
        while done < options.steps:
            inputs, targets = _batch(task.train, next(batches))
            params, opt_state, loss = step(params, opt_state, inputs, targets)
            losses.append(loss)
            done += 1
            if done == 1:
                jax.block_until_ready(params)
                compile_seconds = time.perf_counter() - start
                start = time.perf_counter()
            if bar:
                bar.update(1, loss=loss)  # read back only when the bar is drawn
            if done % options.eval_every == 0 or done == options.steps:
                evaluation_start = time.perf_counter()
                history.append(_record(task, params, done, losses, evaluation_start - start))
                losses = []
                if on_evaluation:
                    on_evaluation(params, history)
                evaluation_seconds += time.perf_counter() - evaluation_start
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar:
            bar.close()
    jax.block_until_ready(params)
    step_seconds = time.perf_counter() - start - evaluation_seconds
    return TrainResult(params, done, history, compile_seconds,
                       (done - 1) / step_seconds if done > 1 else 0.0, interrupted)


def evaluate(task: Task, params: Any, dataset: Dataset, *, batch_size: int = 256) -> dict[str, float]:
    """Mean loss over the examples of ``dataset`` and accuracy over its predicted tokens or labels.

    Every batch has ``batch_size`` rows (the last is padded with weight 0), so
    the evaluation compiles once.
    """
    batch_size = min(_checks.check_positive_int("batch_size", batch_size), dataset.num_examples)
    totals = np.zeros(3)
    for start in range(0, dataset.num_examples, batch_size):
        indices = np.arange(start, start + batch_size)
        weights = (indices < dataset.num_examples).astype(np.float32)
        inputs, targets = _batch(dataset, np.minimum(indices, dataset.num_examples - 1))
        totals += np.asarray(_batch_sums(task, params, inputs, targets, weights))
    loss_sum, hits, predictions = totals
    metrics = {"loss": loss_sum / dataset.num_examples, "accuracy": hits / max(predictions, 1)}
    if task.tokenizer is not None and isinstance(task.train.targets, tuple):
        metrics["perplexity"] = float(np.exp(metrics["loss"]))
    return {name: float(value) for name, value in metrics.items()}


@jax.jit(static_argnums=0)
def _batch_sums(task: Task, params, inputs, targets, weights):
    def per_example(x, y):
        hits, count = task.correct(params, *jax.tree.map(lambda a: a[None], (x, y)))
        return task.example_loss(params, (x, y)), hits, count

    loss, hits, count = jax.vmap(per_example)(inputs, targets)
    return jnp.stack([jnp.sum(weights * loss), jnp.sum(weights * hits), jnp.sum(weights * count)])


def _make_step(task: Task, optimizer: optax.GradientTransformationExtraArgs) -> Callable:
    @jax.jit
    def step(params, opt_state, inputs, targets):
        objective = lambda p: task.objective(p, inputs, targets)
        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(
            grads, opt_state, params, value=loss, grad=grads, value_fn=objective
        )
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _record(task: Task, params, step: int, losses: list, seconds: float) -> dict:
    validation = evaluate(task, params, task.validation)
    return {"step": step, "train_loss": float(np.mean(jax.device_get(losses))),
            **{f"validation_{name}": value for name, value in validation.items()},
            "elapsed_seconds": seconds}


def _batch_indices(num_examples: int, batch_size: int, seed: int):
    """Endless batches of indices: shuffled epochs, each cut into whole batches."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(num_examples) if batch_size < num_examples else np.arange(num_examples)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def _batch(dataset: Dataset, indices: np.ndarray):
    return dataset.inputs[indices], jax.tree.map(lambda x: x[indices], dataset.targets)
