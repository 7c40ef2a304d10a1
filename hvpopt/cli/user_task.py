"""A task of the user's own, for ``hvpopt influence --task`` and ``hvpopt spectrum --task``: loaded and checked.

``--task path/to/file.py:function`` (or ``module:function``, imported from the
current folder as ``python -m`` would, no ``PYTHONPATH`` needed) names a
function that takes no argument and returns a dict; docs/tasks.rst is the
contract, :data:`KEYS` its keys. Every field is checked before any work, and
anything wrong is one line that names the task and the field.
"""

import dataclasses
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import hvpopt
from hvpopt import _checks, influence
from hvpopt.testbed.data import Dataset, make_dataset

#: What the task's dict may hold: each key and what it is (docs/tasks.rst says more).
KEYS = {
    "params": "the trained parameters, a pytree of float32 or float64 arrays",
    "train": "the training examples: (inputs, targets) with a leading example axis, or a dict with inputs, "
    "targets and, optionally, texts and ids",
    "loss_fn": "loss_fn(params, (inputs, targets)) -> the loss of one example (derived from model if absent)",
    "model": "(model_fn, output_loss): model_fn(params, inputs) -> outputs of a batch, output_loss one of "
    "hvpopt.losses; needed by --curvature ggn and the kfac/ekfac methods",
    "queries": "the query examples, like train",
    "encode": "encode(text) -> (inputs, targets) of one example, for --query, --queries and --train",
    "l2": "the L2 penalty the parameters were trained with, the default --damping",
}
#: Longest text a summary of an example's inputs takes in top_k.csv, where the task gives no texts.
SUMMARY_LENGTH = 60


@dataclasses.dataclass(frozen=True)
class UserTask:
    """What a ``--task`` function returned, checked; ``loss_fn`` derived from ``model`` where it gave none."""

    spec: str
    loss_fn: Callable
    params: Any
    train: Dataset
    queries: Dataset | None
    model: tuple[Callable, Callable] | None
    l2: float
    encode: Callable | None


def load(spec: str, flag: str = "--task") -> UserTask:
    """Imports and calls the function ``spec`` names and checks what it returned, field by field."""
    where = f"{flag} {spec!r}"
    function = _function(spec, flag)
    try:
        given = function()
    except Exception as error:
        raise ValueError(f"{where} raised {user_error(error)}") from None
    if not isinstance(given, dict):
        raise ValueError(f"{where} must return a dict with params, train, and loss_fn or model; got a "
                         f"{type(given).__name__}.")  # fmt: skip
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise ValueError(f"{where} returned unknown keys {', '.join(map(repr, unknown))}; the dict takes "
                         f"{', '.join(KEYS)}.")  # fmt: skip
    missing = [key for key in ("params", "train") if key not in given]
    if given.get("loss_fn") is None and given.get("model") is None:
        missing.append("loss_fn or model")
    if missing:
        raise ValueError(f"{where} returned no {', '.join(missing)}: the dict needs params, train, and loss_fn or "
                         "model.")  # fmt: skip
    model = _model(given.get("model"), where)
    for key in ("loss_fn", "encode"):
        if given.get(key) is not None and not callable(given[key]):
            raise ValueError(f"{where}: {key} must be a function: {KEYS[key]}; got {type(given[key]).__name__}.")
    _checks.check_parameters(where, given["params"])
    l2 = _checks.check_number(f"{where}: l2", given.get("l2", 0.0), "a finite number >= 0", lambda x: x >= 0)
    train = _dataset(given["train"], "train", where)
    queries = None if given.get("queries") is None else _dataset(given["queries"], "query", where)
    loss_fn = given.get("loss_fn") or influence.example_loss(*model)
    _check_loss(loss_fn, model, given["params"], train, where)
    return UserTask(spec, loss_fn, given["params"], train, queries, model, l2, given.get("encode"))


def user_error(error: Exception) -> str:
    """``"RuntimeError: boom (my_task.py line 7)"``: an error of a user's code, where it was raised there."""
    if isinstance(error, SyntaxError):
        return f"{type(error).__name__}: {error.msg} ({error.filename} line {error.lineno})"
    library = (os.path.dirname(os.__file__), os.path.dirname(hvpopt.__file__), sys.prefix, sys.base_prefix)
    frames = [
        frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith(("<", *library))
    ]
    place = f" ({frames[-1].filename} line {frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{place}"


def encode_texts(task: UserTask, texts: list[str], ids: list[str], names: list[str], flag: str) -> Dataset:
    """Examples of ``texts`` through the task's ``encode``; an error names the text's file and line (``names``)."""
    if task.encode is None:
        raise ValueError(f"{flag} needs the task's 'encode' (text -> (inputs, targets) of one example); --task "
                         f"{task.spec!r} returned none.")  # fmt: skip
    examples = []
    for text, name in zip(texts, names):
        try:
            example = task.encode(text)
        except Exception as error:
            raise ValueError(f"{name}: the task's encode raised {user_error(error)}") from None
        if not (isinstance(example, (tuple, list)) and len(example) == 2):
            raise ValueError(f"{name}: the task's encode must return (inputs, targets) of one example; got "
                             f"{type(example).__name__}.")  # fmt: skip
        examples.append(example)
    stacked = [_stack([example[k] for example in examples], name_k) for k, name_k in enumerate(("inputs", "targets"))]
    like = jax.tree.map(lambda x: np.shape(x)[1:], (task.train.inputs, task.train.targets))
    if jax.tree.map(lambda x: np.shape(x)[1:], tuple(stacked)) != like:
        raise ValueError(f"{flag}: the task's encode gives examples shaped unlike its training examples "
                         f"({like}).")  # fmt: skip
    dataset = make_dataset(*stacked, ids, texts)
    check_finite(dataset, names)
    return dataset


def check_finite(dataset: Dataset, names: list[str]) -> None:
    """Raises ValueError naming the first example whose floating inputs or targets hold NaN or infinity."""
    for field in ("inputs", "targets"):
        for leaf in jax.tree.leaves(getattr(dataset, field)):
            leaf = np.asarray(leaf)
            if not np.issubdtype(leaf.dtype, np.inexact):
                continue
            bad = ~np.isfinite(leaf.reshape(len(leaf), -1)).all(axis=1)
            if bad.any():
                j = int(np.argmax(bad))
                raise ValueError(f"{names[j]} (id {str(dataset.ids[j])!r}) has a NaN or infinite value in its {field}; "
                                 "fix or drop that example.")  # fmt: skip


def _function(spec: str, flag: str) -> Callable:
    """The function ``FILE.py:FUNCTION`` or ``MODULE:FUNCTION`` names."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"{flag} takes FILE.py:FUNCTION or MODULE:FUNCTION; got {spec!r}.")
    try:
        module = _import_file(where) if where.endswith(".py") or os.sep in where else _import_module(where)
        function = getattr(module, name)
    except Exception as error:  # a missing file, module or function, or any error while the module runs
        raise ValueError(f"{flag} {spec!r} cannot be loaded: {user_error(error)}") from None
    if not callable(function):
        raise ValueError(f"{flag} {spec!r}: {name} is not a function; got {type(function).__name__}.")
    return function


def _import_module(name: str):
    if os.getcwd() not in sys.path:  # as `python -m` does: a module in the current folder imports
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(name)


def _import_file(path: str):
    """The Python file at ``path`` as a module; its folder goes on ``sys.path`` so that it imports its neighbours."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}")
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = "hvpopt_task_" + os.path.splitext(os.path.basename(path))[0]
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == path and loaded._hvpopt_mtime == _mtime(path):
        return loaded  # imported once, as `import` does, unless the file changed since
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module._hvpopt_mtime = _mtime(path)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _mtime(path: str) -> int:
    return os.stat(path).st_mtime_ns


def _model(model: Any, where: str) -> tuple[Callable, Callable] | None:
    if model is None:
        return None
    if not (isinstance(model, (tuple, list)) and len(model) == 2 and all(map(callable, model))):
        raise ValueError(f"{where}: model must be a pair (model_fn, output_loss) of functions; got {model!r}.")
    return tuple(model)


def _dataset(given: Any, prefix: str, where: str) -> Dataset:
    """Examples as a :class:`Dataset`: from a Dataset, an ``(inputs, targets)`` pair or a dict with texts and ids."""
    key = "train" if prefix == "train" else "queries"
    if isinstance(given, Dataset):
        dataset = given
    else:
        if isinstance(given, dict):
            extra = sorted(set(given) - {"inputs", "targets", "texts", "ids"})
            if extra or not {"inputs", "targets"} <= set(given):
                raise ValueError(f"{where}: {key} as a dict takes inputs, targets, texts and ids; got "
                                 f"{', '.join(map(repr, sorted(given)))}.")  # fmt: skip
            inputs, targets, texts, ids = given["inputs"], given["targets"], given.get("texts"), given.get("ids")
        elif isinstance(given, (tuple, list)) and len(given) == 2:
            (inputs, targets), texts, ids = given, None, None
        else:
            raise ValueError(f"{where}: {key} must be (inputs, targets) or a dict with inputs and targets; got a "
                             f"{type(given).__name__}.")  # fmt: skip
        size = _checks.leading_size(f"{where}: {key}", (inputs, targets))
        if size == 0:
            raise ValueError(f"{where}: {key} holds no examples.")
        ids = [f"{prefix}-{j:05d}" for j in range(size)] if ids is None else [str(i) for i in ids]
        texts = [_summary(x) for x in np.asarray(inputs)] if texts is None else [str(t) for t in texts]
        for name, values in (("texts", texts), ("ids", ids)):
            if len(values) != size:
                raise ValueError(f"{where}: {key} has {size} examples but {len(values)} {name}.")
        if len(set(ids)) != size:
            raise ValueError(f"{where}: {key}'s ids must be unique.")
        dataset = make_dataset(inputs, targets, ids, texts)
    check_finite(dataset, [f"{where}: {key} example {j}" for j in range(dataset.num_examples)])
    return dataset


def _summary(inputs: np.ndarray) -> str:
    """A short text for an example given without one: its first input values."""
    flat = np.asarray(inputs).reshape(-1)
    text = np.array2string(flat[:16], separator=" ", max_line_width=10**6, precision=3)
    return text if flat.size <= 16 and len(text) <= SUMMARY_LENGTH else text[: SUMMARY_LENGTH - 4].rstrip(" ]") + " ..."


def _stack(values: list, what: str) -> Any:
    try:
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *values)
    except (ValueError, TypeError):
        raise ValueError(f"the task's encode gives {what} of different shapes: pad them to one shape.") from None


def _check_loss(loss_fn: Callable, model, params: Any, train: Dataset, where: str) -> None:
    """The loss runs on the first training example and gives a finite scalar; it agrees with ``model`` if both."""
    example = jax.tree.map(lambda x: x[0], (train.inputs, train.targets))
    try:
        value = np.asarray(loss_fn(params, example))
    except Exception as error:
        raise ValueError(f"{where}: loss_fn(params, train example 0) raised {user_error(error)}") from None
    if value.shape != () or not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"{where}: loss_fn must return a scalar loss of one example; got shape {value.shape}.")
    if model is None:
        return
    try:
        influence.check_example_loss(loss_fn, model, params, (train.inputs, train.targets))
    except Exception as error:
        if isinstance(error, ValueError) and str(error).startswith("loss_fn and model"):
            raise ValueError(f"{where}: {error}") from None
        raise ValueError(f"{where}: model on the first training examples raised {user_error(error)}") from None
