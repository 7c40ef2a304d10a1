"""The built-in tasks: data, model and loss together, rebuilt exactly from a JSON-able config.

A :class:`Task` is what ``hvpopt train`` trains, what a checkpoint stores the
config of, and what the optimizers and influence estimators run on. Its loss is
split the way the curvature code needs it: ``model_fn(params, inputs) ->
outputs`` and ``loss(outputs, targets)`` (a :class:`hvpopt.losses.Loss` with
its closed-form output Hessian), so ``ggn_vp(task.model_fn, task.loss, ...)``
works directly; ``example_loss`` is the loss of one example, for influence.

=========== ====================================== ===========================
task        data                                   model
=========== ====================================== ===========================
shakespeare next character of the shipped corpus   transformer language model
reverse     complete ``"abc>"`` with ``"cba"``     transformer language model
modular     ``"aa+bb="`` -> ``(a + b) mod p``      transformer classifier
dyck        is a bracket string balanced?          transformer classifier
blobs       Gaussian clusters                      logistic regression or MLP
=========== ====================================== ===========================
"""

import dataclasses
import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from hvpopt import _checks, losses
from hvpopt.testbed import data
from hvpopt.testbed.models import TransformerConfig, mlp, transformer_classifier, transformer_lm

#: Model options of the transformer tasks (the vocabulary and context come from the data).
TRANSFORMER_OPTIONS = {
    "d_model": 64,
    "num_layers": 2,
    "num_heads": 4,
    "mlp_ratio": 4,
    "positions": "learned",
    "tie_embeddings": False,
}
_SMALL_TRANSFORMER = {**TRANSFORMER_OPTIONS, "d_model": 32}

_TASKS: dict[str, tuple[Callable, dict, float]] = {
    # name: (data generator, default model options, default L2 penalty)
    "shakespeare": (data.char_lm, TRANSFORMER_OPTIONS, 0.0),
    "reverse": (data.reverse_strings, _SMALL_TRANSFORMER, 0.0),
    "modular": (data.modular_addition, _SMALL_TRANSFORMER, 0.0),
    "dyck": (data.bracket_matching, _SMALL_TRANSFORMER, 0.0),
    "blobs": (data.gaussian_blobs, {"hidden_sizes": []}, 1e-2),
}
TASKS = tuple(_TASKS)
DEFAULT_TASK = "shakespeare"


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, so jit can take it as static
class Task:
    """A dataset, a model and its loss.

    Attributes:
      name: one of :data:`TASKS`.
      config: JSON-able; ``make_task(**config)`` rebuilds this task exactly.
      model_fn: ``(params, inputs) -> outputs``.
      params: the initial parameters (a pytree).
      loss: the loss on the outputs of a batch, ``loss(outputs, targets)``: the
        mean of the examples' losses.
      train, validation: the splits.
      tokenizer: how text becomes ``inputs`` (None for feature tasks).
      l2: the training objective adds ``(l2 / 2) * ||params||^2``.
    """

    name: str
    config: dict
    model_fn: Callable
    params: Any
    loss: losses.Loss
    train: data.Dataset
    validation: data.Dataset
    tokenizer: data.CharTokenizer | None
    l2: float

    @property
    def convex(self) -> bool:
        """Whether the training objective is strictly convex in the parameters, so that leave-one-out
        retraining (Newton-CG from the optimum) finds the one minimum exactly.

        True for a linear model (an MLP without hidden layers, ``x -> x W + b``: multinomial
        logistic regression on ``blobs``) under an L2 penalty ``l2 > 0``: every built-in loss is
        convex in the model's outputs (the negative log-likelihood of an exponential family in its
        natural parameters, :mod:`hvpopt.losses`), a convex function of a linear map is convex, and
        the penalty makes it strictly so. False for every network with a hidden layer or attention.
        """
        linear = self.config["model_options"].get("hidden_sizes") == []
        return linear and self.l2 > 0

    def batch_loss(self, params, inputs, targets) -> jax.Array:
        """The mean loss of a batch of examples."""
        return self.loss(self.model_fn(params, inputs), targets)

    def objective(self, params, inputs, targets) -> jax.Array:
        """What training minimises: the batch loss plus the L2 penalty."""
        penalty = 0.5 * self.l2 * otu.tree_norm(params, squared=True) if self.l2 else 0.0
        return self.batch_loss(params, inputs, targets) + penalty

    def example_loss(self, params, example) -> jax.Array:
        """The loss of ONE example ``(inputs, targets)`` (no leading example axis)."""
        inputs, targets = jax.tree.map(lambda x: jnp.asarray(x)[None], example)
        return self.batch_loss(params, inputs, targets)

    def describe(self) -> str:
        """One line naming the task, its options and its size."""
        size = sum(x.size for x in jax.tree.leaves(self.params))
        options = ", ".join(
            f"{k}={v}" for k, v in {**self.config["data_options"], **self.config["model_options"]}.items()
        )
        return f"{self.name} ({options}; {size:,} parameters, {self.train.num_examples} training examples)"

    def correct(self, params, inputs, targets) -> tuple[jax.Array, jax.Array]:
        """``(number of correct predictions, number of predictions)`` on a batch."""
        labels, mask = targets if isinstance(targets, tuple) else (targets, jnp.ones_like(targets))
        hits = jnp.argmax(self.model_fn(params, inputs), axis=-1) == labels
        return jnp.sum(hits * mask), jnp.sum(mask)


def make_task(
    name: str = DEFAULT_TASK,
    *,
    seed: int = 0,
    flip_fraction: float = 0.0,
    l2: float | None = None,
    data_options: dict | None = None,
    model_options: dict | None = None,
) -> Task:
    """Builds a built-in task, deterministically in ``seed``.

    Args:
      name: one of :data:`TASKS`.
      seed: seed of the data and of the initial parameters.
      flip_fraction: fraction of training labels to flip (``Dataset.flipped``
        records which); for the classification and reverse tasks.
      l2: L2 penalty of the training objective; None for the task's default.
      data_options: keyword options of the task's data generator (e.g.
        ``{"modulus": 7}`` for ``modular``; see :mod:`hvpopt.testbed.data`).
      model_options: model sizes, e.g. ``{"d_model": 32, "num_layers": 1}``
        (:data:`TRANSFORMER_OPTIONS`), or ``{"hidden_sizes": [32]}`` for ``blobs``.

    Example:
      >>> import jax, hvpopt
      >>> task = hvpopt.testbed.tasks.make_task("modular", data_options={"modulus": 5})
      >>> str(task.train.texts[0]), task.train.num_examples
      ('0+0=0', 13)
      >>> loss = jax.jit(task.batch_loss)(task.params, task.train.inputs, task.train.targets)
    """
    _checks.check_choice("task", name, TASKS)
    generator, model_defaults, default_l2 = _TASKS[name]
    data_options = _options("data option", name, data_options, _keyword_defaults(generator))
    model_options = _options("model option", name, model_options, model_defaults)
    l2 = _checks.check_number("l2", default_l2 if l2 is None else l2, ">= 0 and finite", lambda x: x >= 0)
    flip_fraction = _checks.check_number("flip_fraction", flip_fraction, "a number in [0, 1)", lambda x: 0 <= x < 1)
    if _checks.as_int(seed) is None or not 0 <= seed < _checks.SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32); got {seed!r}.")
    seed = int(seed)
    split = generator(seed=seed, flip_fraction=flip_fraction, **data_options)
    _check_model_size(name, split, model_options)
    model_fn, params, loss = _model(name, split, model_options, seed)
    config = {
        "name": name,
        "seed": seed,
        "flip_fraction": flip_fraction,
        "l2": l2,
        "data_options": data_options,
        "model_options": model_options,
    }
    return Task(name, config, model_fn, params, loss, split.train, split.validation, split.tokenizer, l2)


def first_batch(task: Task, batch_size: int) -> tuple[Any, Any]:
    """``(inputs, targets)`` of the first ``batch_size`` training examples."""
    head = task.train.take(range(check_batch_size(task, batch_size)))
    return head.inputs, head.targets


def check_batch_size(task: Task, batch_size: int) -> int:
    """``batch_size`` as an int; ValueError unless it is between 1 and the training set's size."""
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    if batch_size > task.train.num_examples:
        raise ValueError(
            f"batch_size ({batch_size}) exceeds the {task.train.num_examples} training examples of task {task.name!r}."
        )
    return batch_size


def _model(name: str, split: data.TaskData, options: dict, seed: int):
    if name == "blobs":
        sizes = [split.train.inputs.shape[1], *options["hidden_sizes"], split.num_classes]
        return (*mlp(sizes, seed=seed), losses.softmax_cross_entropy)
    config = TransformerConfig(
        vocab_size=split.tokenizer.vocab_size, context_length=split.train.inputs.shape[1], **options
    )
    if split.num_classes is None:
        return (*transformer_lm(config, seed=seed), losses.masked_softmax_cross_entropy)
    model_fn, params = transformer_classifier(config, split.num_classes, pad_id=split.tokenizer.pad_id, seed=seed)
    return model_fn, params, losses.softmax_cross_entropy


#: The most parameters a built-in model may have: more does not fit a testbed's memory.
MAX_PARAMETERS = 100_000_000


def _options(kind: str, task: str, given: dict | None, defaults: dict) -> dict:
    """``defaults`` updated by ``given``, each value of the type of its default (a JSON value, finite)."""
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise ValueError(f"the {kind}s of task {task!r} must be a dict of name: value; got {given!r}.")
    unknown = sorted(set(given) - set(defaults), key=str)
    if unknown:
        raise ValueError(f"task {task!r} has no {kind} {unknown[0]!r}; its {kind}s are {', '.join(sorted(defaults))}.")
    return {
        **defaults,
        **{
            key: _option_value(f"{kind} {key!r} of task {task!r}", value, defaults[key]) for key, value in given.items()
        },
    }


def _option_value(what: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``: a bool, an int, a finite float (an int is taken), a str,
    or a list of positive ints (layer widths); ValueError naming ``what`` otherwise."""
    if isinstance(default, bool):
        expected, valid = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        expected, valid = "an integer", _checks.as_int(value) is not None
        value = int(value) if valid else value
    elif isinstance(default, float):
        return _checks.check_number(what, value)
    elif isinstance(default, str):
        expected, valid = "a string", isinstance(value, str)
    else:  # a list of layer widths
        expected = "a list of positive integers"
        valid = isinstance(value, list) and all((_checks.as_int(v) or 0) >= 1 for v in value)
        value = [int(v) for v in value] if valid else value
    if not valid:
        raise ValueError(f"{what} must be {expected}; got {value!r}.")
    return value


def _check_model_size(name: str, split: data.TaskData, options: dict) -> None:
    """Refuses model options whose parameters could not fit, before any is allocated.

    The count is the weight matrices' (biases and norms left out): an
    MLP's ``sum a b`` over its layers; a transformer's embeddings, ``(4 + 2
    mlp_ratio) d^2`` per block and the output head.
    """
    if name == "blobs":
        sizes = [split.train.inputs.shape[1], *options["hidden_sizes"], split.num_classes]
        count = sum(a * b for a, b in zip(sizes, sizes[1:]))
    else:
        d = options["d_model"]
        count = (
            d * (split.tokenizer.vocab_size + split.train.inputs.shape[1])
            + options["num_layers"] * (4 + 2 * options["mlp_ratio"]) * d * d
            + d * (split.num_classes or split.tokenizer.vocab_size)
        )
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"the model options {options} of task {name!r} give about {count:.3g} parameters; at most "
            f"{MAX_PARAMETERS:.0e} fit: choose smaller sizes."
        )


def _keyword_defaults(generator: Callable) -> dict:
    parameters = inspect.signature(generator).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in ("seed", "flip_fraction")}


def examples_from_texts(
    task: Task, texts: list[str], ids: list[str] | None = None, names: list[str] | None = None
) -> data.Dataset:
    """Encodes texts written the way ``task``'s examples are (``Dataset.texts``) as a :class:`Dataset`.

    ``shakespeare``: any 2 to ``context_length + 1`` characters, the loss on
    every next character; ``reverse``: ``"abcdef>fedcba"``; ``modular``:
    ``"17+05=22"``; ``dyck``: ``"([]) -> balanced"``; ``blobs``: ``"x=[0.1, ...] -> 2"``.

    Args:
      task: whose tokenizer and format to use.
      texts: the examples as text.
      ids: their ids (default ``text-1``, ``text-2``, ...).
      names: how an error names each text (default ``text 1``, ...; a file's
        ``line 7``, say).

    Raises:
      ValueError: naming the text at fault and the form expected.
    """
    ids = [f"text-{i + 1}" for i in range(len(texts))] if ids is None else list(ids)
    names = [f"text {i + 1}" for i in range(len(texts))] if names is None else names
    encoded = []
    for name, text in zip(names, texts):
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a string; got {type(text).__name__}.")
        try:
            encoded.append(_TEXT_PARSERS[task.name](task, text))
        except ValueError as error:
            raise ValueError(f"{name} ({text[:40]!r}): {error}") from None
    inputs = np.stack([inputs for inputs, _ in encoded])
    targets = jax.tree.map(lambda *leaves: np.stack(leaves), *[targets for _, targets in encoded])
    return data.make_dataset(inputs, targets, ids, texts)


def _language_model_text(task: Task, text: str):
    length = task.train.inputs.shape[1]
    if not 2 <= len(text) <= length + 1:
        raise ValueError(
            f"a language-model text needs 2 to {length + 1} characters (the context plus one); got {len(text)}."
        )
    mask = (np.arange(length) < len(text) - 1).astype(np.int32)
    return task.tokenizer.encode(text[:-1], length), (task.tokenizer.encode(text[1:], length), mask)


def _reverse_text(task: Task, text: str):
    length = task.train.inputs.shape[1] // 2
    source, _, completion = text.partition(">")
    if len(source) != length or len(completion) != length:
        raise ValueError(f"expected {length} characters, '>', and {length} more, like {str(task.train.texts[0])!r}.")
    ids = task.tokenizer.encode(text)
    return ids[:-1], (ids[1:], (np.arange(2 * length) >= length).astype(np.int32))


def _labelled_text(pattern: str, labels: Callable[[Task], list[str]]):
    def parse(task: Task, text: str):
        match = re.fullmatch(pattern, text)
        names = labels(task)
        if match is None or match.group(2) not in names:
            raise ValueError(
                f"expected an example like {str(task.train.texts[0])!r}, its label one of "
                f"{', '.join(names) if len(names) < 4 else names[0] + '..' + names[-1]}."
            )
        inputs, label = match.group(1), names.index(match.group(2))
        if task.tokenizer is None:
            inputs = np.array([float(x) for x in inputs.split(",")], np.float32)
            if inputs.shape != task.train.inputs.shape[1:]:
                raise ValueError(f"expected {task.train.inputs.shape[1]} features; got {inputs.size}.")
        else:
            inputs = task.tokenizer.encode(inputs, task.train.inputs.shape[1])
        return inputs, np.int32(label)

    return parse


_TEXT_PARSERS = {
    "shakespeare": _language_model_text,
    "reverse": _reverse_text,
    "modular": _labelled_text(
        r"(\d+\+\d+=)(\d+)", lambda task: [f"{label}" for label in range(task.config["data_options"]["modulus"])]
    ),
    "dyck": _labelled_text(r"([()\[\]]*) -> (\w+)", lambda task: ["unbalanced", "balanced"]),
    "blobs": _labelled_text(
        r"x=\[(.*)\] -> (\d+)", lambda task: [f"{label}" for label in range(task.config["data_options"]["num_classes"])]
    ),
}
