"""The user models of tests/user_models.py as tasks for the command line (the contract of docs/tasks.rst).

``hvpopt influence --task tests/user_tasks.py:linen`` loads this file, which
imports its neighbour ``user_models`` as a user's task file would.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from user_models import MAKERS, language_data

import hvpopt

LETTERS = "abcdefghijk"  # token t is the letter LETTERS[t]
NUM_TRAIN, NUM_QUERIES = 16, 3


def encode(text: str) -> tuple[np.ndarray, np.ndarray]:
    """A window of text, one letter per token: the inputs and the next letters."""
    tokens = np.array([LETTERS.index(letter) for letter in text])
    return tokens[:-1], tokens[1:]


@functools.cache  # loaded again by the command line in the same process: the same model, compiled once
def task(name: str) -> dict:
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    model = MAKERS[name](dtype=dtype)
    inputs, targets = language_data(NUM_TRAIN + NUM_QUERIES)
    texts = ["".join(LETTERS[t] for t in np.append(x, y[-1])) for x, y in zip(np.asarray(inputs), np.asarray(targets))]
    train = {"inputs": inputs[:NUM_TRAIN], "targets": targets[:NUM_TRAIN], "texts": texts[:NUM_TRAIN]}
    return {
        "params": model.params,
        "model": (model.model_fn, hvpopt.losses.softmax_cross_entropy),
        "train": train,
        "queries": (inputs[NUM_TRAIN:], targets[NUM_TRAIN:]),
        "encode": encode,
    }


def nnx():
    return task("nnx")


def nnx_scan():
    return task("nnx_scan")


def linen():
    return task("linen")


def equinox():
    return task("equinox")


def pure():
    return task("pure")
