"""Synthetic tasks with known structure, and an option to flip a fraction of training labels.

Each generator is deterministic in its ``seed`` and returns :class:`TaskData`:
a train and a validation :class:`Dataset` (only training labels are ever
flipped, and which ones is recorded in ``Dataset.flipped``), the tokenizer of
text tasks, and the number of classes of classification tasks.

* :func:`modular_addition`: ``"a+b="`` -> ``(a + b) mod p`` (Power et al., 2022).
* :func:`bracket_matching`: is a string over ``()[]`` balanced (Dyck-2)?
* :func:`reverse_strings`: a language model completes ``"abc>"`` with ``"cba"``;
  the loss counts only the completion.
* :func:`gaussian_blobs`: features from a mixture of Gaussians, one per class,
  for logistic regression and MLPs.

Reference:
  Power et al., "Grokking: generalization beyond overfitting on small
  algorithmic datasets", arXiv:2201.02177, 2022.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from hvpopt.testbed.data.dataset import Dataset, choose_flipped, flip_labels, make_dataset, split
from hvpopt.testbed.data.tokenizer import CharTokenizer

#: The most examples a generator makes, and the most values (examples times their
#: length or features): a task larger than this does not fit a testbed's memory.
MAX_EXAMPLES = 1_000_000
MAX_VALUES = 100_000_000


class TaskData(NamedTuple):
    """What a data generator returns."""

    train: Dataset
    validation: Dataset
    tokenizer: CharTokenizer | None
    num_classes: int | None


def modular_addition(
    *, seed: int = 0, flip_fraction: float = 0.0, modulus: int = 31, validation_fraction: float = 0.5
) -> TaskData:
    """Every pair ``a, b < modulus`` as the text ``"aa+bb="``, labelled ``(a + b) % modulus``."""
    _check_int_in("modulus", modulus, 2, math.isqrt(MAX_EXAMPLES), f"modulus**2 examples; at most {MAX_EXAMPLES:,} fit")
    width = len(str(modulus - 1))
    pairs = [(a, b) for a in range(modulus) for b in range(modulus)]
    texts = [f"{a:0{width}d}+{b:0{width}d}=" for a, b in pairs]
    labels = np.array([(a + b) % modulus for a, b in pairs])
    return _classification(
        "modular",
        texts,
        labels,
        modulus,
        CharTokenizer("0123456789+="),
        render=lambda text, label: f"{text}{label}",
        seed=seed,
        flip_fraction=flip_fraction,
        validation_fraction=validation_fraction,
    )


def bracket_matching(
    *,
    seed: int = 0,
    flip_fraction: float = 0.0,
    num_examples: int = 2000,
    max_length: int = 16,
    validation_fraction: float = 0.2,
) -> TaskData:
    """Strings over ``()[]`` of even length up to ``max_length``, half of them balanced.

    A balanced string is a random Dyck-2 word; an unbalanced one is a balanced
    word with two positions swapped or one bracket replaced, kept only if the
    result is unbalanced. Labels: 1 balanced, 0 not.
    """
    _check_int_in("num_examples", num_examples, 4, MAX_EXAMPLES, "the most examples a task holds")
    _check_int_in("max_length", max_length, 2, MAX_VALUES // num_examples, _values("num_examples * max_length"))
    rng = np.random.default_rng([seed, 1])
    texts, labels = [], []
    while len(texts) < num_examples:
        word = _dyck_word(rng, 2 * int(rng.integers(1, max_length // 2 + 1)))
        balanced = len(texts) % 2 == 0
        if not balanced:
            word = _corrupt(rng, word)
            if _is_balanced(word):
                continue
        texts.append(word)
        labels.append(int(balanced))
    return _classification(
        "dyck",
        texts,
        np.array(labels),
        2,
        CharTokenizer("()[]"),
        render=lambda text, label: f"{text} -> {('unbalanced', 'balanced')[label]}",
        seed=seed,
        flip_fraction=flip_fraction,
        validation_fraction=validation_fraction,
    )


def reverse_strings(
    *,
    seed: int = 0,
    flip_fraction: float = 0.0,
    num_examples: int = 2000,
    length: int = 6,
    alphabet: str = "abcdefgh",
    validation_fraction: float = 0.2,
) -> TaskData:
    """Language modelling of ``"abcdef>fedcba"``; the loss counts only the reversed half.

    ``inputs`` are the first ``2 * length`` characters, ``targets`` are
    ``(next characters, mask)`` with the mask on the ``length`` completion
    characters, so every example weighs the same. A flipped example's
    completion is a random string other than the reverse.
    """
    _check_int_in("num_examples", num_examples, 4, MAX_EXAMPLES, "the most examples a task holds")
    _check_int_in("length", length, 1, MAX_VALUES // (2 * num_examples), _values("num_examples * 2 * length"))
    if len(alphabet) < 2 or len(set(alphabet)) != len(alphabet) or ">" in alphabet:
        raise ValueError(f"alphabet must hold at least two distinct characters other than '>'; got {alphabet!r}.")
    rng = np.random.default_rng([seed, 2])
    letters = np.array(list(alphabet))
    sources = ["".join(rng.choice(letters, length)) for _ in range(num_examples)]
    pool = make_dataset(
        np.zeros(num_examples), np.zeros(num_examples), [f"reverse-{i:05d}" for i in range(num_examples)], sources
    )
    train, validation = split(pool, validation_fraction, rng)
    flipped = choose_flipped(train.num_examples, flip_fraction, rng)

    def completion(source: str, flip: bool) -> str:
        while flip:
            wrong = "".join(rng.choice(letters, length))
            if wrong != source[::-1]:
                return wrong
        return source[::-1]

    tokenizer = CharTokenizer(alphabet + ">")

    def build(part: Dataset, flips: np.ndarray) -> Dataset:
        texts = [f"{s}>{completion(s, f)}" for s, f in zip(part.texts.tolist(), flips)]
        ids = np.stack([tokenizer.encode(text) for text in texts])
        mask = np.zeros((len(texts), 2 * length), np.int32)
        mask[:, length:] = 1
        return make_dataset(ids[:, :-1], (ids[:, 1:], mask), part.ids, texts, flips)

    return TaskData(build(train, flipped), build(validation, np.zeros(validation.num_examples, bool)), tokenizer, None)


def gaussian_blobs(
    *,
    seed: int = 0,
    flip_fraction: float = 0.0,
    num_examples: int = 600,
    num_features: int = 8,
    num_classes: int = 3,
    separation: float = 1.5,
    validation_fraction: float = 0.2,
) -> TaskData:
    """Features ``x = mu_c + noise``, class means ``mu_c ~ separation * N(0, I)``, labels ``c``.

    The classes overlap, so a well-regularised logistic regression is neither
    perfect nor trivial: the convex testbed of the exact influence checks.
    """
    _check_int_in("num_examples", num_examples, 4, MAX_EXAMPLES, "the most examples a task holds")
    _check_int_in("num_features", num_features, 1, MAX_VALUES // num_examples, _values("num_examples * num_features"))
    _check_int_in("num_classes", num_classes, 2, MAX_VALUES // num_features, _values("num_classes * num_features"))
    if not math.isfinite(separation):
        raise ValueError(f"separation must be a finite number; got {separation!r}.")
    rng = np.random.default_rng([seed, 3])
    means = separation * rng.standard_normal((num_classes, num_features))
    labels = rng.integers(0, num_classes, num_examples)
    features = (means[labels] + rng.standard_normal((num_examples, num_features))).astype(np.float32)
    texts = ["x=[" + ", ".join(f"{value:.2f}" for value in row) + "]" for row in features]
    pool = make_dataset(features, labels, [f"blobs-{i:05d}" for i in range(num_examples)], texts)
    train, validation = split(pool, validation_fraction, rng)
    flipped = choose_flipped(train.num_examples, flip_fraction, rng)
    train = _relabel(
        train, flip_labels(train.targets, flipped, num_classes, rng), flipped, lambda text, label: f"{text} -> {label}"
    )
    validation = _relabel(validation, validation.targets, validation.flipped, lambda text, label: f"{text} -> {label}")
    return TaskData(train, validation, None, num_classes)


def _classification(
    prefix: str,
    texts: list[str],
    labels: np.ndarray,
    num_classes: int,
    tokenizer: CharTokenizer,
    *,
    render: Callable[[str, int], str],
    seed: int,
    flip_fraction: float,
    validation_fraction: float,
) -> TaskData:
    """Tokenizes, splits, flips training labels, and writes each example's text with its label."""
    rng = np.random.default_rng([seed, 0])
    length = max(len(text) for text in texts)
    inputs = np.stack([tokenizer.encode(text, length) for text in texts])
    pool = make_dataset(inputs, labels.astype(np.int32), [f"{prefix}-{i:05d}" for i in range(len(texts))], texts)
    train, validation = split(pool, validation_fraction, rng)
    flipped = choose_flipped(train.num_examples, flip_fraction, rng)
    train = _relabel(train, flip_labels(train.targets, flipped, num_classes, rng), flipped, render)
    validation = _relabel(validation, validation.targets, validation.flipped, render)
    return TaskData(train, validation, tokenizer, num_classes)


def _relabel(part: Dataset, labels: np.ndarray, flipped: np.ndarray, render: Callable[[str, int], str]) -> Dataset:
    texts = [render(text, int(label)) for text, label in zip(part.texts.tolist(), labels)]
    return make_dataset(part.inputs, labels, part.ids, texts, flipped)


def _dyck_word(rng: np.random.Generator, length: int) -> str:
    """A random balanced word of ``length`` brackets of two types (open or close by a coin flip)."""
    word, stack = [], []
    for position in range(length):
        can_open = len(stack) + 1 <= length - position - 1  # room left to close everything
        if stack and (not can_open or rng.random() < 0.5):
            word.append(")]"["([".index(stack.pop())])
        else:
            stack.append("(["[int(rng.integers(2))])
            word.append(stack[-1])
    return "".join(word)


def _corrupt(rng: np.random.Generator, word: str) -> str:
    chars = list(word)
    i, j = rng.choice(len(chars), 2, replace=len(chars) < 2)
    if rng.random() < 0.5 and i != j:
        chars[i], chars[j] = chars[j], chars[i]
    else:
        chars[i] = "()[]".replace(chars[i], "")[int(rng.integers(3))]
    return "".join(chars)


def _is_balanced(word: str) -> bool:
    stack = []
    for c in word:
        if c in "([":
            stack.append(c)
        elif not stack or "([".index(stack.pop()) != ")]".index(c):
            return False
    return not stack


def _values(what: str) -> str:
    return f"{what} values; at most {MAX_VALUES:,} fit"


def _check_int_in(name: str, value, minimum: int, maximum: int, why: str) -> None:
    """ValueError unless ``value`` is an integer in ``[minimum, maximum]``; ``why`` says what bounds the maximum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}; got {value!r}.")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum:,} ({why}); got {value!r}.")
