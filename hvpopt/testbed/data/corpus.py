"""The character-level corpus shipped with hvpopt, cut into language-modelling examples.

``shakespeare.txt`` holds the first 300,000 characters of the "tiny
Shakespeare" collection (Karpathy, 2015): speeches from Shakespeare's plays,
which are in the public domain. Nothing is downloaded.
"""

import importlib.resources

import numpy as np

from hvpopt.testbed.data.dataset import make_dataset
from hvpopt.testbed.data.synthetic import TaskData
from hvpopt.testbed.data.tokenizer import CharTokenizer

CORPUS_FILE = "shakespeare.txt"


def corpus_text() -> str:
    """The shipped corpus as one string."""
    return importlib.resources.files("hvpopt.testbed.data").joinpath(CORPUS_FILE).read_text(encoding="utf-8")


def char_lm(
    *, seed: int = 0, flip_fraction: float = 0.0, context_length: int = 32, validation_fraction: float = 0.1
) -> TaskData:
    """Non-overlapping windows of ``context_length + 1`` characters for next-character prediction.

    The last ``validation_fraction`` of the text is the validation split, so no
    window of it overlaps the training text. ``inputs`` are the first
    ``context_length`` characters of a window, ``targets`` are ``(next
    characters, mask)`` with an all-ones mask. An example's id is its
    character offset in the corpus.
    """
    del seed  # the windows are fixed; the seed only shuffles batches during training
    if flip_fraction:
        raise ValueError("flip_fraction applies to the classification and reverse tasks, not to shakespeare.")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer; got {context_length!r}.")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1); got {validation_fraction!r}.")
    text = corpus_text()
    tokenizer = CharTokenizer.from_text(text)
    window = context_length + 1
    boundary = int(len(text) * (1 - validation_fraction))
    if window > len(text) - boundary:
        raise ValueError(
            f"context_length must be at most {len(text) - boundary - 1:,}, so that the validation text "
            f"holds a window; got {context_length}."
        )

    def windows(start: int, stop: int):
        offsets = range(start, stop - window + 1, window)
        chunks = [text[offset : offset + window] for offset in offsets]
        ids = np.stack([tokenizer.encode(chunk) for chunk in chunks])
        return make_dataset(
            ids[:, :-1], (ids[:, 1:], np.ones_like(ids[:, 1:])), [f"shakespeare@{offset}" for offset in offsets], chunks
        )

    return TaskData(windows(0, boundary), windows(boundary, len(text)), tokenizer, None)
