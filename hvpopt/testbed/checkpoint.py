"""Checkpoints of a task's parameters: msgpack arrays plus a JSON config, validated on load.

A checkpoint is a folder holding

* ``params-<SHA-256 prefix>.msgpack``: the parameters, one array per
  parameter path (``flax.serialization``; never pickle), named by their content;
* ``config.json``: how to rebuild the task (:func:`hvpopt.testbed.tasks.make_task`),
  the training options, and a manifest of the parameters: the file's name, its
  SHA-256, every array's path, shape and dtype.

``config.json`` says which parameters file is the checkpoint's, so a save is
all-or-nothing: the new parameters go to a new file, then the config is
renamed over the old one (the commit), and only then is the old parameters
file removed. Killed at any moment, the folder holds the previous checkpoint
or the new one. A folder is written by one process at a time (a lock on
``.lock``, see :func:`hvpopt.testbed.files.owned_folder`), which also removes what a
killed writer left. Format 1 checkpoints (``params.msgpack``) still load.
Loading rebuilds the task from the config and refuses, with a one-line
message naming the file, anything that does not match it: a missing or
truncated file, a changed byte, an array of another shape or dtype.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import serialization

import hvpopt
from hvpopt import _checks
from hvpopt.testbed import files, tasks

CONFIG_FILE = "config.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the parameters always in params.msgpack


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the rebuilt task, the trained parameters and the config."""

    task: tasks.Task
    params: Any
    config: dict


def save_checkpoint(directory: str, params: Any, config: dict) -> None:
    """Writes ``params`` and ``config`` (must hold ``"task"``, a task config) to ``directory``.

    Example:
      >>> import tempfile, hvpopt
      >>> task = hvpopt.testbed.tasks.make_task("blobs")
      >>> folder = tempfile.mkdtemp()
      >>> save_checkpoint(folder, task.params, {"task": task.config})
      >>> load_checkpoint(folder).task.name
      'blobs'
    """
    if "task" not in config:
        raise ValueError("config must hold the task's config under 'task'.")
    arrays = _flatten(params)
    payload = serialization.msgpack_serialize(arrays)
    sha256 = hashlib.sha256(payload).hexdigest()
    manifest = {
        "file": f"params-{sha256[:16]}.msgpack",
        "sha256": sha256,
        "arrays": {path: {"shape": list(x.shape), "dtype": str(x.dtype)} for path, x in arrays.items()},
    }
    record = {"format_version": FORMAT_VERSION, **config, "params": manifest}
    with files.owned_folder(directory, "checkpoint folder"):
        files.write_atomically(os.path.join(directory, manifest["file"]), lambda file: file.write(payload))
        files.write_atomically(
            os.path.join(directory, CONFIG_FILE), lambda file: json.dump(record, file, indent=2, allow_nan=False), "w"
        )
        for name in os.listdir(directory):  # the previous checkpoint's parameters, now that nothing names them
            if name.startswith("params") and name.endswith(".msgpack") and name != manifest["file"]:
                os.remove(os.path.join(directory, name))


def training_config(
    task: tasks.Task, options: Any, history: list[dict], *, step: int | None = None, completed: bool = False
) -> dict:
    """What a training run's checkpoint records: the task config, the training options
    (a dataclass), the step (the last record's by default), the last metrics, the versions."""
    return {
        "task": task.config,
        "train": dataclasses.asdict(options),
        "step": history[-1]["step"] if step is None else step,
        "completed": completed,
        "metrics": history[-1] if history else None,
        "hvpopt_version": hvpopt.__version__,
        "jax_version": jax.__version__,
    }


def load_checkpoint(directory: str) -> Checkpoint:
    """Loads a checkpoint written by :func:`save_checkpoint` (or ``hvpopt train``).

    Raises:
      ValueError: naming the file and what is wrong with it.
    """
    config_path = os.path.join(directory, CONFIG_FILE)
    _checks.check_folder("checkpoint folder", directory)
    if not os.path.lexists(config_path):
        raise ValueError(f"{config_path} is missing: {directory!r} is not a finished checkpoint.")
    _checks.check_file("checkpoint file", config_path)
    try:
        with open(config_path, "rb") as file:
            config = _checks.strict_json(file.read().decode("utf-8"), config_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}).") from None
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("task"), dict)
        or not isinstance(config.get("params"), dict)
    ):
        raise ValueError(f"{config_path} lacks the 'task' and 'params' objects of an hvpopt checkpoint.")
    if config.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{config_path} has format_version {config.get('format_version')!r}; "
            f"this hvpopt reads versions {', '.join(map(str, READABLE_VERSIONS))}."
        )
    try:
        task = tasks.make_task(**config["task"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: the task config does not build: {err}") from None
    params = _restore(os.path.join(directory, _params_file(config_path, config)), task.params, config["params"])
    return Checkpoint(task, params, config)


def _params_file(config_path: str, config: dict) -> str:
    """The parameters file the config names: a plain file name beside it."""
    name = config["params"].get("file") if isinstance(config["params"], dict) else None
    if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".msgpack"):
        raise ValueError(
            f"{config_path}: params.file must name a .msgpack file in the checkpoint folder; got {name!r}."
        )
    return name


def _restore(path: str, like: Any, manifest: dict) -> Any:
    if not os.path.lexists(path):
        raise ValueError(f"{path} is missing.")
    _checks.check_file("checkpoint file", path)
    with open(path, "rb") as file:
        payload = file.read()
    if hashlib.sha256(payload).hexdigest() != manifest.get("sha256"):
        raise ValueError(f"{path} is truncated or was changed after saving (its SHA-256 does not match {CONFIG_FILE}).")
    try:
        arrays = serialization.msgpack_restore(payload)
    except Exception as err:  # msgpack raises several types; all mean the same to a user
        raise ValueError(f"{path} is not a readable msgpack file ({err}).") from None
    expected = _flatten(like)
    if not isinstance(arrays, dict) or set(arrays) != set(expected):
        missing = sorted(set(expected) - set(arrays if isinstance(arrays, dict) else {}))
        raise ValueError(
            f"{path} does not hold the parameters the config builds "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''})."
        )
    for name, reference in expected.items():
        array = arrays[name]
        if not isinstance(array, np.ndarray) or array.shape != reference.shape or array.dtype != reference.dtype:
            shape, dtype = np.shape(array), getattr(array, "dtype", type(array).__name__)
            raise ValueError(
                f"{path}: parameter {name!r} has shape {shape} and dtype {dtype}; the "
                f"config builds shape {reference.shape} and dtype {reference.dtype}."
            )
    _checks.check_parameters(path, arrays)
    treedef = jax.tree.structure(like)
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(arrays[name]) for name in expected])


def _flatten(params: Any) -> dict[str, np.ndarray]:
    """``{"body/blocks/0/up/kernel": array, ...}`` in the pytree's leaf order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_path_name(path): np.asarray(leaf) for path, leaf in leaves}


def _path_name(path) -> str:
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
        if not (isinstance(key, jax.tree_util.GetAttrKey) and part == "value"):
            parts.append(str(part))
    return "/".join(parts)
