"""Argument checks shared by the public functions.

Every check runs in Python at trace time, so a mistake fails before anything is
compiled, with a message that names the argument and what was expected.
"""

import argparse
import operator
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp


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
            f"{name} must have the same pytree structure as {like_name}; got "
            f"{tree_def} but {like_name} is {like_def}."
        )
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), like_leaf in zip(leaves, jax.tree_util.tree_leaves(like)):
        where = jax.tree_util.keystr(path)
        if jnp.shape(leaf) != jnp.shape(like_leaf):
            raise ValueError(
                f"{name}{where} must have shape {jnp.shape(like_leaf)} like "
                f"{like_name}{where}; got {jnp.shape(leaf)}."
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
                f"{name} must return a scalar (the loss); got {got}. Reduce it, "
                "for example with .mean() or .sum()."
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


def check_nonnegative(name: str, value: Any) -> None:
    """Raises ValueError if a concrete number is negative (or NaN); traced values pass."""
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"{name} must be >= 0; got {value!r}.")


def leading_size(name: str, tree: Any) -> int:
    """Size of the leading (example) axis shared by every leaf of ``tree``."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves or any(jnp.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError(f"{name} must be arrays with a leading example axis.")
    sizes = {jnp.shape(leaf)[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"every array in {name} must have the same leading (example) axis; "
            f"got sizes {sorted(sizes)}."
        )
    return sizes.pop()


def positive_int(text: str) -> int:
    """An ``argparse`` type: a positive integer, or a one-line usage error."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def device_count(text: str) -> int:
    """An ``argparse`` type: how many of this machine's devices to use, or a one-line usage error."""
    value, available = positive_int(text), jax.local_device_count()
    if value > available:
        raise argparse.ArgumentTypeError(f"{value} devices asked but this machine has {available} "
                                         f"({jax.default_backend()}); pass at most {available}")
    return value
