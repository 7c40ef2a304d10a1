"""Data made or shipped with hvpopt: a character corpus and synthetic tasks. Nothing is downloaded."""

from hvpopt.testbed.data.corpus import char_lm, corpus_text
from hvpopt.testbed.data.dataset import Dataset, choose_flipped, flip_labels, make_dataset, split
from hvpopt.testbed.data.synthetic import TaskData, bracket_matching, gaussian_blobs, modular_addition, reverse_strings
from hvpopt.testbed.data.tokenizer import CharTokenizer

__all__ = [
    "CharTokenizer",
    "Dataset",
    "TaskData",
    "bracket_matching",
    "char_lm",
    "choose_flipped",
    "corpus_text",
    "flip_labels",
    "gaussian_blobs",
    "make_dataset",
    "modular_addition",
    "reverse_strings",
    "split",
]
