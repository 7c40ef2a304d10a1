"""A dataset of examples that keep a stable id, their text, and whether their label was flipped."""

from typing import Any, NamedTuple

import jax
import numpy as np


class Dataset(NamedTuple):
    """Arrays with a leading example axis, and what a person needs to read each example.

    Attributes:
      inputs: model inputs, ``[n, ...]`` (token ids or features).
      targets: a pytree of ``[n, ...]`` arrays, as the task's loss takes them
        (labels, or ``(labels, mask)``).
      ids: ``[n]`` stable string ids: the same example has the same id for a
        given task and seed, whatever subset it appears in.
      texts: ``[n]`` the example as text, target included, for display.
      flipped: ``[n]`` bool, True where the label was deliberately corrupted.
    """

    inputs: np.ndarray
    targets: Any
    ids: np.ndarray
    texts: np.ndarray
    flipped: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.ids)

    def take(self, indices) -> "Dataset":
        """The examples at ``indices``, in that order."""
        indices = np.asarray(indices)
        return jax.tree.map(lambda x: x[indices], self)


def make_dataset(inputs, targets, ids, texts, flipped=None) -> Dataset:
    """A :class:`Dataset` from sequences, checking that every field has one entry per example."""
    ids, texts = np.asarray(ids, dtype=str), np.asarray(texts, dtype=str)
    flipped = np.zeros(len(ids), bool) if flipped is None else np.asarray(flipped, bool)
    dataset = Dataset(np.asarray(inputs), jax.tree.map(np.asarray, targets), ids, texts, flipped)
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(dataset)}
    if len(sizes) != 1:
        raise ValueError(f"every field of a dataset needs the same number of examples; got sizes {sorted(sizes)}.")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("dataset ids must be unique.")
    return dataset


def split(dataset: Dataset, validation_fraction: float, rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    """A random ``(train, validation)`` split with ``round(fraction * n)`` validation examples."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1); got {validation_fraction!r}.")
    order = rng.permutation(dataset.num_examples)
    num_validation = max(1, round(validation_fraction * dataset.num_examples))
    return dataset.take(np.sort(order[num_validation:])), dataset.take(np.sort(order[:num_validation]))


def choose_flipped(num_examples: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A bool mask with exactly ``round(fraction * num_examples)`` entries set, at random."""
    if not 0 <= fraction < 1:
        raise ValueError(f"flip_fraction must lie in [0, 1); got {fraction!r}.")
    flipped = np.zeros(num_examples, bool)
    flipped[rng.choice(num_examples, round(fraction * num_examples), replace=False)] = True
    return flipped


def flip_labels(labels: np.ndarray, flipped: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``labels`` with each entry where ``flipped`` replaced by a different class, uniformly."""
    shift = rng.integers(1, num_classes, size=labels.shape)
    return np.where(flipped, (labels + shift) % num_classes, labels).astype(labels.dtype)
