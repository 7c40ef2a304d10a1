"""Training and evaluating a built-in task: the loop behind ``hvpopt train`` and ``hvpopt eval``.

Every optimizer is called the way ``optax.lbfgs`` is, ``tx.update(grads,
state, params, value=loss, grad=grads, value_fn=objective)``, so first-order
optax optimizers and hvpopt's second-order ones plug into the same loop. A
step (gradient, update, apply) is one jitted function; batches come from a
NumPy generator seeded by ``seed``, so a run is deterministic on one machine.
Given a ``jax.sharding`` mesh the parameters and optimizer state are copied to
every device and each batch is split over them (:mod:`hvpopt.sharding`): the
same jitted step then runs data-parallel, its means summed by all-reduces.
"""

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from hvpopt import _checks, sharding
from hvpopt.optim import (
    KFAC_STEP_RULES,
    gauss_newton_bartlett,
    hessian_free,
    hutchinson_hessian,
    kfac,
    kronecker_preconditioner,
    natural_gradient,
    newton_cg,
    sophia_win_rate,
)
from hvpopt.testbed import interrupts
from hvpopt.testbed.data import Dataset
from hvpopt.testbed.progress import Progress
from hvpopt.testbed.tasks import Task, check_batch_size


def _adamw(task, options, learning_rate):
    return optax.adamw(learning_rate, weight_decay=options.weight_decay)


def _adam(task, options, learning_rate):
    return optax.adam(learning_rate)


def _sgd(task, options, learning_rate):
    return optax.sgd(learning_rate, momentum=0.9)


def _newton_cg(task, options, learning_rate):
    return newton_cg(learning_rate, **_second_order_knobs(options, damping="damping"))


def _hessian_free(task, options, learning_rate):
    # The Gauss-Newton matrix is the data loss's; the L2 penalty adds l2 I to the
    # objective's curvature, so the damping never goes below l2.
    knobs = _second_order_knobs(options, damping="initial_damping")
    return hessian_free(task.model_fn, task.loss, learning_rate=learning_rate, min_damping=max(1e-6, task.l2), **knobs)


def _hessian_free_kfac(task, options, learning_rate):
    # Hessian-free whose CG is preconditioned by K-FAC fitted on each step's curvature batch.
    knobs = _second_order_knobs(options, damping="initial_damping")
    precond = kronecker_preconditioner(task.model_fn, task.loss, key=jax.random.key(options.seed))
    return hessian_free(
        task.model_fn, task.loss, learning_rate=learning_rate, min_damping=max(1e-6, task.l2), precond=precond, **knobs
    )


def _natural_gradient(task, options, learning_rate):
    knobs = _second_order_knobs(options, damping="damping")
    damping = knobs.pop("damping", 1e-3) + task.l2  # F + l2 I is the Fisher of the objective
    return natural_gradient(task.model_fn, task.loss, learning_rate=learning_rate, damping=damping, **knobs)


def _muon(task, options, learning_rate):
    # Muon on the matrices, AdamW on every other leaf (optax's default split), both with the weight decay.
    return optax.contrib.muon(learning_rate, weight_decay=options.weight_decay, adam_weight_decay=options.weight_decay)


def _kfac(task, options, learning_rate):
    # As for natural gradient: the curvature of the objective is the Fisher plus l2 I.
    example = jax.tree.map(lambda x: x[:1], (task.train.inputs, task.train.targets))
    damping = max((0.1 if options.damping is None else options.damping) + task.l2, 1e-8)
    return kfac(
        task.model_fn,
        task.loss,
        example_batch=example,
        learning_rate=learning_rate,
        damping=damping,
        min_damping=max(task.l2, min(1e-4, damping)),  # kfac's floor, or a smaller initial damping asked for
        curvature_every=options.curvature_every or 1,
        inverse_every=options.inverse_every or 10,
        step_rule=options.step_rule or "quadratic",
        **({} if options.kl_clip is None else {"kl_clip": options.kl_clip}),
        key=jax.random.key(options.seed),
    )


def _sophia(estimator: Callable) -> Callable:
    def make(task, options, learning_rate):
        return optax.contrib.sophia(
            learning_rate,
            weight_decay=options.weight_decay,
            gamma=_sophia_gamma(options),
            update_interval=options.curvature_every or 10,
            hessian_diagonal_fn=estimator(task, jax.random.key(options.seed)),
        )

    return make


def _sophia_gamma(options) -> float:
    return 0.01 if options.gamma is None else options.gamma


def _second_order_knobs(options, *, damping: str) -> dict:
    knobs = {damping: options.damping, "maxiter": options.cg_iterations}
    return {name: value for name, value in knobs.items() if value is not None}


#: ``name -> (task, options, learning rate or schedule) -> optax transformation``.
OPTIMIZERS: dict[str, Callable] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
    "newton_cg": _newton_cg,
    "hessian_free": _hessian_free,
    "hessian_free_kfac": _hessian_free_kfac,
    "natural_gradient": _natural_gradient,
    "muon": _muon,
    "kfac": _kfac,
    "sophia_g": _sophia(lambda task, key: gauss_newton_bartlett(task.model_fn, task.loss, key=key)),
    "sophia_h": _sophia(lambda task, key: hutchinson_hessian(key=key)),
}
#: Optimizers whose ``learning_rate`` is a constant first step (the line search
#: or the curvature sets the scale): no schedule, no gradient clipping.
SECOND_ORDER = ("newton_cg", "hessian_free", "hessian_free_kfac", "natural_gradient")
#: The optimizers each knob of :class:`TrainOptions` beyond the learning rate is for.
KNOBS = {
    "damping": (*SECOND_ORDER, "kfac"),
    "cg_iterations": SECOND_ORDER,
    "curvature_every": ("kfac", "sophia_g", "sophia_h"),
    "inverse_every": ("kfac",),
    "gamma": ("sophia_g", "sophia_h"),
    "step_rule": ("kfac",),
    "kl_clip": ("kfac",),
    "curvature_batch_size": ("kfac", "sophia_g", "hessian_free", "hessian_free_kfac", "natural_gradient"),
}
_DEFAULT_LEARNING_RATE = {"adamw": 3e-3, "adam": 3e-3, "sgd": 3e-3, "muon": 3e-3, "sophia_g": 3e-3, "sophia_h": 3e-3}


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How to train; stored in the checkpoint's config.

    Attributes:
      steps: optimizer steps.
      batch_size: examples per step (None: the whole training set, every step).
      optimizer: a name in :data:`OPTIMIZERS`.
      learning_rate: first-order optimizers (and ``kfac``, ``sophia_g``,
        ``sophia_h``): the peak learning rate, reached after a linear warm-up
        over the first 5% of steps and decayed to a tenth by a cosine
        (default 3e-3; ``kfac`` 1.0, a multiplier of its quadratic model's
        step). Second-order ones: a constant, the first step the line search
        tries or the natural-gradient step (default 1.0).
      weight_decay: decoupled weight decay (AdamW, Muon, Sophia).
      clip_norm: scheduled optimizers' gradients are clipped to this global
        norm (None: no clipping).
      damping: Newton-CG's, natural gradient's and K-FAC's ``damping``
        (K-FAC's initial one, default 0.1), Hessian-free's
        ``initial_damping`` (None: their defaults).
      cg_iterations: second-order only: most CG iterations per step (None: the
        optimizer's default).
      curvature_every: K-FAC: steps between refreshes of its statistics (1);
        Sophia: steps between curvature-diagonal estimates (10).
      inverse_every: K-FAC: steps between eigendecompositions (10).
      step_rule: K-FAC: one of :data:`hvpopt.KFAC_STEP_RULES` (``"quadratic"``).
      kl_clip: K-FAC with ``step_rule="kl_clip"``: the KL trust region (1e-3).
      curvature_batch_size: the optimizers that take a ``curvature_batch``:
        its examples, the first of each batch (None: the whole batch). K-FAC's
        statistics cost more than the gradient; a quarter of the batch
        estimates them for a quarter of that.
      gamma: Sophia's ``gamma``, the scale of its clipped ratio (0.01).
      eval_every: steps between validation evaluations (and checkpoints).
      seed: seed of the batch order.
    """

    steps: int = 1500
    batch_size: int | None = 64
    optimizer: str = "adamw"
    learning_rate: float | None = None
    weight_decay: float = 1e-4
    clip_norm: float | None = 1.0
    damping: float | None = None
    cg_iterations: int | None = None
    curvature_every: int | None = None
    inverse_every: int | None = None
    gamma: float | None = None
    step_rule: str | None = None
    kl_clip: float | None = None
    curvature_batch_size: int | None = None
    eval_every: int = 500
    seed: int = 0

    def __post_init__(self):
        _checks.check_positive_int("steps", self.steps)
        _checks.check_positive_int("eval_every", self.eval_every)
        if self.batch_size is not None:
            _checks.check_positive_int("batch_size", self.batch_size)
        _checks.check_choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", _DEFAULT_LEARNING_RATE.get(self.optimizer, 1.0))
        for name in ("learning_rate", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive; got {value!r}.")
        _checks.check_nonnegative("weight_decay", self.weight_decay)
        for name, optimizers in KNOBS.items():
            if getattr(self, name) is not None and self.optimizer not in optimizers:
                raise ValueError(
                    f"{name} is for the optimizers {', '.join(optimizers)}; optimizer {self.optimizer!r} has none."
                )
        if self.damping is not None:
            _checks.check_nonnegative("damping", self.damping, finite=True)
        for name in ("cg_iterations", "curvature_every", "inverse_every", "curvature_batch_size"):
            if getattr(self, name) is not None:
                _checks.check_positive_int(name, getattr(self, name))
        for name in ("gamma", "kl_clip"):
            if getattr(self, name) is not None:
                _checks.check_number(name, getattr(self, name), "> 0 and finite", lambda x: x > 0)
        if self.step_rule is not None:
            _checks.check_choice("step_rule", self.step_rule, KFAC_STEP_RULES)
        if self.kl_clip is not None and self.step_rule != "kl_clip":
            raise ValueError(
                "kl_clip is for K-FAC's KL-clipped step (step rule kl_clip); the quadratic rule sets its own length."
            )


class TrainingDiverged(ValueError):
    """The training or validation loss became non-finite; :func:`train` stops before recording it.

    Attributes:
      quantity: ``"train loss"`` or ``"validation loss"``.
      value: its value (``nan`` or ``inf``).
      step: the step of the evaluation that found it.
      remedy: ``"lower learning_rate"`` (first-order optimizers) or
        ``"raise damping"`` (second-order ones).
    """

    def __init__(self, quantity: str, value: float, step: int, remedy: str):
        super().__init__(f"training diverged: the {quantity} is {value} at step {step}; {remedy}.")
        self.quantity, self.value, self.step, self.remedy = quantity, value, step, remedy


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      params: the parameters after the last completed step.
      steps_done: completed steps (fewer than asked if interrupted).
      history: one record per evaluation: step, mean training loss since the
        previous record, validation loss and accuracy, the second-order
        optimizer's diagnostics (:func:`optimizer_diagnostics`), seconds since
        the first step finished.
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


def make_optimizer(task: Task, options: TrainOptions) -> optax.GradientTransformationExtraArgs:
    """The optimizer of ``options`` for ``task``.

    First-order optimizers get the warm-up and cosine schedule and gradient
    clipping; second-order ones a constant ``learning_rate`` and no clipping.
    """
    if options.optimizer in SECOND_ORDER:
        return OPTIMIZERS[options.optimizer](task, options, options.learning_rate)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        options.learning_rate,
        warmup_steps=min(max(1, options.steps // 20), options.steps - 1),
        decay_steps=options.steps,
        end_value=options.learning_rate / 10,
    )
    optimizer = OPTIMIZERS[options.optimizer](task, options, schedule)
    clip = [optax.clip_by_global_norm(options.clip_norm)] if options.clip_norm else []
    return optax.chain(*clip, optimizer)


def batch_size_of(task: Task, options: TrainOptions) -> int:
    """The examples of each step's batch; ValueError if ``task`` has fewer, or fewer than the curvature batch."""
    batch_size = check_batch_size(task, options.batch_size or task.train.num_examples)
    if options.curvature_batch_size is not None and options.curvature_batch_size > batch_size:
        raise ValueError(
            f"curvature_batch_size ({options.curvature_batch_size}) exceeds the batch size ({batch_size}); "
            "the curvature batch is the first examples of each batch."
        )
    return batch_size


def train(
    task: Task,
    options: TrainOptions = TrainOptions(),
    *,
    params: Any = None,
    on_evaluation: Callable[[Any, list[dict]], None] | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> TrainResult:
    """Trains ``task`` from ``params`` (its initial parameters by default).

    Args:
      task: what to train.
      options: steps, batch size, optimizer and its settings.
      params: starting parameters; ``task.params`` if None.
      on_evaluation: called as ``on_evaluation(params, history)`` after each
        evaluation (``hvpopt train`` saves a checkpoint there).
      progress: draw a progress bar with loss and throughput on stderr.
      mesh: a :class:`jax.sharding.Mesh` (:func:`hvpopt.data_mesh`) whose
        ``"data"`` axis each batch is split over; the batch size must be a
        multiple of its devices. None: one device.

    Raises:
      TrainingDiverged: (a ``ValueError``) an evaluation found a non-finite
        training or validation loss; ``on_evaluation`` is not called with it.

    Returns:
      A :class:`TrainResult`. Ctrl-C ends training early with
      ``interrupted=True`` and the parameters of the last completed step:
      from the main thread it is taken between steps, never inside a step
      (:mod:`hvpopt.testbed.interrupts`), however often it is pressed.
    """
    with interrupts.deferred_interrupts():
        return _train(task, options, task.params if params is None else params, on_evaluation, progress, mesh)


def _train(
    task: Task, options: TrainOptions, params: Any, on_evaluation: Callable | None, progress: bool, mesh: Mesh | None
) -> TrainResult:
    batch_size = batch_size_of(task, options)
    place = lambda batch: batch
    if mesh is not None:
        devices = sharding.axis_size(mesh)
        if batch_size % devices:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of the {devices} devices it is "
                f"split over; use a multiple of {devices} or a mesh of "
                f"{math.gcd(batch_size, devices)} devices."
            )
        params = sharding.replicate(params, mesh)
        place = lambda batch: sharding.shard_batch(batch, mesh)
    optimizer = make_optimizer(task, options)
    step = make_step(task, optimizer, options.curvature_batch_size)
    opt_state = optimizer.init(params)
    if mesh is not None:
        opt_state = sharding.replicate(opt_state, mesh)
    batches = _batch_indices(task.train.num_examples, batch_size, options.seed)
    bar = Progress(options.steps, "train") if progress else None
    history, losses, done, interrupted = [], [], 0, False
    compile_seconds = evaluation_seconds = 0.0
    start = time.perf_counter()
    try:
        while done < options.steps:
            interrupts.check_interrupt()  # the safe point, between steps
            inputs, targets = place(_batch(task.train, next(batches)))
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
                jax.block_until_ready(params)  # the steps' time is not the evaluation's
                evaluation_start = time.perf_counter()
                history.append(
                    _finite(
                        _record(task, options, params, opt_state, done, losses, evaluation_start - start, mesh), options
                    )
                )
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
    return TrainResult(
        params, done, history, compile_seconds, (done - 1) / step_seconds if done > 1 else 0.0, interrupted
    )


def evaluate(
    task: Task, params: Any, dataset: Dataset, *, batch_size: int = 256, mesh: Mesh | None = None
) -> dict[str, float]:
    """Mean loss over the examples of ``dataset`` and accuracy over its predicted tokens or labels.

    Every batch has ``batch_size`` rows (the last is padded with weight 0), so
    the evaluation compiles once. With a ``mesh`` each batch, rounded up to a
    multiple of its devices, is split over them.
    """
    batch_size = min(_checks.check_positive_int("batch_size", batch_size), dataset.num_examples)
    place = lambda batch: batch
    if mesh is not None:
        devices = sharding.axis_size(mesh)
        batch_size = -(-batch_size // devices) * devices
        params = sharding.replicate(params, mesh)
        place = lambda batch: sharding.shard_batch(batch, mesh)
    totals = np.zeros(3)
    for start in range(0, dataset.num_examples, batch_size):
        indices = np.arange(start, start + batch_size)
        weights = (indices < dataset.num_examples).astype(np.float32)
        inputs, targets, weights = place((*_batch(dataset, np.minimum(indices, dataset.num_examples - 1)), weights))
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


def make_step(
    task: Task, optimizer: optax.GradientTransformationExtraArgs, curvature_batch_size: int | None = None
) -> Callable:
    """The jitted step of :func:`train`: ``(params, opt_state, inputs, targets) -> (params, opt_state, loss)``.

    ``optimizer`` (from :func:`make_optimizer`) gets the batch's loss, gradient and objective, and the
    first ``curvature_batch_size`` examples (None: all) as ``curvature_batch``.
    """

    @jax.jit
    def step(params, opt_state, inputs, targets):
        objective = lambda p: task.objective(p, inputs, targets)
        head = lambda x: x if curvature_batch_size is None else x[:curvature_batch_size]
        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(
            grads,
            opt_state,
            params,
            value=loss,
            grad=grads,
            value_fn=objective,
            obj_fn=objective,
            curvature_batch=jax.tree.map(head, (inputs, targets)),
        )
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _record(
    task: Task, options: TrainOptions, params, opt_state, step: int, losses: list, seconds: float, mesh: Mesh | None
) -> dict:
    validation = evaluate(task, params, task.validation, mesh=mesh)
    return {
        "step": step,
        "train_loss": float(np.mean(jax.device_get(losses))),
        **{f"validation_{name}": value for name, value in validation.items()},
        **optimizer_diagnostics(opt_state, options),
        "elapsed_seconds": seconds,
    }


def _finite(record: dict, options: TrainOptions) -> dict:
    """``record``, or :class:`TrainingDiverged` if its training or validation loss is not finite."""
    for name in ("train_loss", "validation_loss"):
        if not math.isfinite(record[name]):
            remedy = "raise damping" if options.optimizer in SECOND_ORDER else "lower learning_rate"
            raise TrainingDiverged(name.replace("_", " "), record[name], record["step"], remedy)
    return record


def optimizer_diagnostics(opt_state, options: TrainOptions | None = None) -> dict[str, float | int]:
    """The scalar diagnostics of hvpopt's optimizer states in ``opt_state`` (chained or not), as ``optimizer_<field>``.

    CG iterations, curvature products and loss evaluations so far, damping,
    step size, ...; for Sophia (given ``options``) its win rate
    (:func:`hvpopt.sophia_win_rate`) and the curvature estimates drawn; empty
    for optax's own states.
    """
    found = {}
    for state in _hvpopt_states(opt_state):
        for name, value in zip(state._fields, state):
            if name not in ("count", "key") and isinstance(value, jax.Array) and value.ndim == 0:
                if jnp.issubdtype(value.dtype, jnp.number):
                    found[f"optimizer_{name}"] = value.item()
    if options is not None and options.optimizer in KNOBS["gamma"]:
        found["optimizer_win_rate"] = float(sophia_win_rate(opt_state, gamma=_sophia_gamma(options)))
    return found


def _hvpopt_states(state) -> list:
    """The NamedTuple states defined by hvpopt inside ``state``, searched through tuples and NamedTuples."""
    if not isinstance(state, tuple):
        return []
    own = [state] if hasattr(state, "_fields") and type(state).__module__.startswith("hvpopt.") else []
    return own + [inner for part in state for inner in _hvpopt_states(part)]


def _batch_indices(num_examples: int, batch_size: int, seed: int):
    """Endless batches of indices: shuffled epochs, each cut into whole batches."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(num_examples) if batch_size < num_examples else np.arange(num_examples)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _batch(dataset: Dataset, indices: np.ndarray):
    return dataset.inputs[indices], jax.tree.map(lambda x: x[indices], dataset.targets)
