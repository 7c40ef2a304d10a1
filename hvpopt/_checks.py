"""Argument checks shared by the public functions, and checks of a user's files and values.

Every check runs in Python at trace time, so a mistake fails before anything is
compiled, with a message that begins with the name of the argument and says
what was expected. The file checks and :func:`strict_json` name the file or
line at fault. (The command line's flag types are in :mod:`hvpopt.cli.flags`.)
"""

import json
import math
import operator
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Seeds hvpopt takes: what ``numpy.random.default_rng`` and ``jax.random.key`` both accept.
SEED_LIMIT = 2**32
#: Counts hvpopt takes (steps, iterations, examples) end up as int32 loop bounds in XLA.
COUNT_LIMIT = 2**31 - 1


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {value!r}.")


def check_like(name: str, tree: Any, like_name: str, like: Any, *, dtypes: bool = True) -> None:
    """Raises ValueError unless ``tree`` has the structure, shapes (and dtypes) of ``like``."""
    tree_def = jax.tree_util.tree_structure(tree)
    like_def = jax.tree_util.tree_structure(like)
    if tree_def != like_def:
        raise ValueError(
            f"{name} must have the same pytree structure as {like_name}; got {tree_def} but {like_name} is {like_def}."
        )
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), like_leaf in zip(leaves, jax.tree_util.tree_leaves(like)):
        where = jax.tree_util.keystr(path)
        if jnp.shape(leaf) != jnp.shape(like_leaf):
            raise ValueError(
                f"{name}{where} must have shape {jnp.shape(like_leaf)} like {like_name}{where}; got {jnp.shape(leaf)}."
            )
        if dtypes and jnp.result_type(leaf) != jnp.result_type(like_leaf):
            raise ValueError(
                f"{name}{where} must have dtype {jnp.result_type(like_leaf)} like "
                f"{like_name}{where}; got {jnp.result_type(leaf)}. Cast it with .astype."
            )


def check_matvec_output(matvec: Callable, like: Any, like_name: str) -> None:
    """Raises ValueError unless ``matvec`` maps ``like`` to the structure and shapes of ``like``.

    Checked abstractly (``jax.eval_shape``): nothing is computed.
    """
    out = jax.eval_shape(matvec, like)
    check_like(f"matvec({like_name})", out, like_name, like, dtypes=False)


def checked_matvec(matvec: Callable, params: Any) -> Callable:
    """``matvec`` with a check that each ``v`` it gets is shaped like ``params``."""

    def checked(v):
        check_like("v", v, "params", params)
        return matvec(v)

    return checked


def check_floating(name: str, tree: Any) -> None:
    """Raises TypeError unless every leaf of ``tree`` has a floating dtype."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            where = jax.tree_util.keystr(path)
            raise TypeError(
                f"{name}{where} must have a floating dtype to be differentiated; "
                f"got {jnp.result_type(leaf)}. Cast it, or close over it instead "
                f"of passing it as {name}."
            )


def scalar_fn(name: str, fn: Callable, *args) -> Callable:
    """``params -> fn(params, *args)``, raising ValueError if the value is not a scalar.

    The check runs while the function is traced by the transformation that uses
    it, so it costs no extra trace.
    """

    def wrapped(params):
        out = fn(params, *args)
        shape = () if isinstance(out, (int, float)) else getattr(out, "shape", None)
        if shape != ():
            got = type(out).__name__ if shape is None else f"shape {shape}"
            raise ValueError(
                f"{name} must return a scalar (the loss); got {got}. Reduce it, for example with .mean() or .sum()."
            )
        return out

    return wrapped


def check_positive_int(name: str, value: Any) -> int:
    """Returns ``value`` as an ``int``; raises ValueError unless it is a positive integer."""
    number = as_int(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return number


def as_int(value: Any) -> int | None:
    """``value`` as an ``int`` if it is a Python or NumPy integer (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_number(
    name: str, value: Any, expected: str = "a finite number", within: Callable[[float], bool] = lambda x: True
) -> float:
    """``value`` as a float; ValueError unless it is a finite real scalar (not a bool or a string) that
    ``within`` accepts. ``expected`` says what is accepted, e.g. ``"a finite number >= 0"``."""
    number = math.nan
    if not isinstance(value, (bool, str, bytes)) and np.ndim(value) == 0:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):  # not a real number, or an int too large for a float
            pass
    if not math.isfinite(number) or not within(number):
        raise ValueError(f"{name} must be {expected}; got {value!r}.")
    return number


def check_nonnegative(name: str, value: Any, *, finite: bool = False) -> None:
    """Raises ValueError if a concrete number is negative or NaN (or infinite, with ``finite``); traced values pass."""
    if isinstance(value, (int, float)) and not (value >= 0 and (not finite or math.isfinite(value))):
        raise ValueError(f"{name} must be {'a finite number ' if finite else ''}>= 0; got {value!r}.")


def leading_size(name: str, tree: Any) -> int:
    """Size of the leading (example) axis shared by every leaf of ``tree``."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves or any(jnp.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError(f"{name} must be arrays with a leading example axis.")
    sizes = {jnp.shape(leaf)[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"every array in {name} must have the same leading (example) axis; got sizes {sorted(sizes)}.")
    return sizes.pop()


# ---------------------------------------------------------------- a user's files and values


def check_file(what: str, path: str) -> None:
    """Raises ValueError unless ``path`` is an existing file; a folder is called a folder.

    ``what`` names where the path came from (``"--queries"``, a checkpoint's file).
    """
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; a file is expected there.")
    if not os.path.exists(path):
        raise ValueError(f"{what} {path!r} does not exist.")


def check_folder(what: str, path: str) -> None:
    """Raises ValueError unless ``path`` is an existing folder; a file is called a file."""
    if not os.path.exists(path):
        raise ValueError(f"{what} {path!r} does not exist.")
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a file; a folder is expected there.")


def strict_json(text: str, where: str) -> Any:
    """``json.loads(text)``, refusing what is not JSON though Python's reader takes it.

    ``NaN``, ``Infinity`` and numbers that overflow (``1e999``) are refused, and
    so is nesting too deep to read (a ``RecursionError`` otherwise): each a
    ValueError naming ``where`` (a file and line, a flag). Text that is not
    JSON at all raises ``json.JSONDecodeError`` as ``json.loads`` does, for the
    caller to word (or to take the text as a string).

    Example:
      >>> strict_json('{"lr": 0.1}', "config.json")
      {'lr': 0.1}
      >>> strict_json("[1e999]", "config.json")
      Traceback (most recent call last):
      ValueError: config.json: 1e999 is not a finite number; JSON has no NaN or Infinity.
    """

    def refuse(token):
        raise _NotFinite(token)

    def number(token):
        value = float(token)
        if not math.isfinite(value):
            refuse(token)
        return value

    try:
        return json.loads(text, parse_constant=refuse, parse_float=number)
    except _NotFinite as error:
        raise ValueError(f"{where}: {error} is not a finite number; JSON has no NaN or Infinity.") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to read.") from None
    except json.JSONDecodeError:
        raise
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"{where}: {error}.") from None


class _NotFinite(Exception):
    pass


def check_parameters(where: str, params: Any) -> None:
    """Raises ValueError unless ``params`` has at least one array and every one is finite float32 or float64.

    ``where`` names their source (a checkpoint file, ``--task m:f``), so a
    message says which parameter is at fault and where it came from.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError(f"{where}: the parameters hold no arrays.")
    for path, leaf in leaves:
        name = "params" + jax.tree_util.keystr(path)
        dtype = getattr(leaf, "dtype", None)
        if dtype not in (np.float32, np.float64):
            got = dtype if dtype is not None else type(leaf).__name__
            raise ValueError(
                f"{where}: {name} must be a float32 or float64 array; got {got}. Cast it with .astype(jnp.float32)."
            )
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"{where}: {name} holds NaN or infinite values (did training diverge?).")
