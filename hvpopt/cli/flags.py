"""What the commands share: the one-line-error parser, flag types and the flags of a problem.

Each argparse type turns the text of a flag into a value or raises
``ArgumentTypeError``, which argparse prints as one line naming the flag:
``argument --seed: must be an integer in [0, 2**32); got '-1'``.
"""

import argparse
import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator

import jax

from hvpopt import _checks
from hvpopt.testbed import checkpoint, tasks


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming the flag (the usage is ``--help``'s)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer in ``[1, 2**31)``."""
    return _integer(text, 1, _checks.COUNT_LIMIT, "a positive integer (at most 2**31 - 1)")


def seed(text: str) -> int:
    """An ``argparse`` type: a random seed, an integer in ``[0, 2**32)``."""
    return _integer(text, 0, _checks.SEED_LIMIT - 1, "an integer in [0, 2**32)")


def finite_float(text: str) -> float:
    """An ``argparse`` type: a finite number (no ``inf``, no ``nan``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """An ``argparse`` type: a finite number ``>= 0``."""
    return _bounded_float(text, lambda x: x >= 0, "a finite number >= 0")


def positive_float(text: str) -> float:
    """An ``argparse`` type: a finite number ``> 0``."""
    return _bounded_float(text, lambda x: x > 0, "a finite number > 0")


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}  # fmt: skip


def byte_size(text: str) -> int:
    """An ``argparse`` type: a memory size, ``4GB``, ``500MB``, ``4G`` or bytes (units of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or not float(match.group(1)) > 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GB, 500MB or 4G; got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def fraction(text: str) -> float:
    """An ``argparse`` type: a number in ``[0, 1)``."""
    return _bounded_float(text, lambda x: 0 <= x < 1, "a number in [0, 1)")


def _integer(text: str, low: int, high: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}; got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {expected}; got {text}")
    return value


def _bounded_float(text: str, within: Callable[[float], bool], expected: str) -> float:
    try:
        value = finite_float(text)
    except argparse.ArgumentTypeError:
        value = math.nan
    if not within(value):
        raise argparse.ArgumentTypeError(f"must be {expected}; got {text!r}")
    return value


def device_count(text: str) -> int:
    """An ``argparse`` type: how many of this machine's devices to use, or a one-line usage error."""
    value, available = positive_int(text), jax.local_device_count()
    if value > available:
        raise argparse.ArgumentTypeError(
            f"{value} devices asked but this machine has {available} "
            f"({jax.default_backend()}); pass at most {available}"
        )
    return value


def batch_size_or_full(text: str) -> int | None:
    """An ``argparse`` type: a positive int, or ``full`` (None: the whole training set)."""
    return None if text == "full" else positive_int(text)


def task_name(text: str) -> str:
    """An ``argparse`` type: a built-in task's name, or your own as ``FILE.py:FUNCTION`` or ``MODULE:FUNCTION``."""
    if text in tasks.TASKS or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"must be one of {', '.join(tasks.TASKS)}, or FILE.py:FUNCTION for a task of your own; got {text!r}"
    )


def add_problem_arguments(parser: argparse.ArgumentParser, *, own_tasks: bool = False) -> None:
    """``--task`` (a built-in task at its initial parameters; with ``own_tasks`` also the user's), ``--checkpoint``,
    ``--batch-size`` and ``--seed``."""
    source = parser.add_mutually_exclusive_group()
    built_in = f"a built-in task at its initial parameters ({', '.join(tasks.TASKS)}; default %(default)s)"
    if own_tasks:
        accepts = {"type": task_name, "metavar": "TASK", "help": f"{built_in}, or your own model as FILE.py:FUNCTION "
                   "(docs/tasks.rst)"}  # fmt: skip
    else:
        accepts = {"choices": tasks.TASKS, "help": built_in}
    source.add_argument("--task", default=tasks.DEFAULT_TASK, **accepts)
    source.add_argument("--checkpoint", metavar="DIR", help="a checkpoint written by 'hvpopt train'")
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="the first N training examples form the batch"
    )
    parser.add_argument("--seed", type=seed, default=0)


def load_problem(args):
    """``(task, params)`` of ``--checkpoint``, or of a built-in ``--task`` at its initial parameters."""
    if args.checkpoint:
        loaded = checkpoint.load_checkpoint(args.checkpoint)
        return loaded.task, loaded.params
    task = tasks.make_task(args.task, seed=args.seed)
    return task, task.params


def key_values(flag: str, items: list[str]) -> dict:
    """``["modulus=7", "alphabet=abc"]`` -> ``{"modulus": 7, "alphabet": "abc"}``.

    Values are read as JSON if they parse, else taken as strings; NaN,
    Infinity and JSON nested too deep are refused naming the flag. The task
    checks each value's type against the option's.
    """
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE; got {item!r}.")
        try:
            options[key] = _checks.strict_json(text, f"{flag} {key}")
        except json.JSONDecodeError:
            options[key] = text
    return options


@contextlib.contextmanager
def named_as_flags(args: argparse.Namespace, aliases: dict[str, str] | None = None) -> Iterator[None]:
    """Says ``--batch-size`` where a check of the library says ``batch_size``.

    A check's message begins with the name of its argument and what is wrong
    with it (``"batch_size must be ..."``, :mod:`hvpopt._checks`); where that
    name is the destination of one of the command's flags, the user typed the
    flag, so the message names the flag instead. ``aliases`` maps an argument
    to the destination of its flag where the names differ (``{"num_subsets": "subsets"}``).
    """
    try:
        yield
    except (ValueError, TypeError) as error:
        name = re.match(r"(\w+) (?:must|is|are|applies|\()", str(error))  # "batch_size must ...", "damping is for"
        dest = name and (aliases or {}).get(name.group(1), name.group(1))
        if type(error) not in (ValueError, TypeError) or not name or dest not in vars(args):
            raise
        flag = "--" + dest.replace("_", "-")
        raise type(error)(flag + str(error)[len(name.group(1)) :]) from None


def check_out_folder(path: str) -> None:
    """Raises ValueError if ``--out`` names something that exists and is not a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} exists and is not a folder.")
