"""Data made or shipped with hvpopt: a character corpus and synthetic tasks. Nothing is downloaded."""

from hvpopt.data.corpus import char_lm, corpus_text
from hvpopt.data.dataset import Dataset, choose_flipped, flip_labels, make_dataset, split
from hvpopt.data.synthetic import TaskData, bracket_matching, gaussian_blobs, modular_addition, reverse_strings
from hvpopt.data.tokenizer import CharTokenizer

__all__ = [
    "CharTokenizer", "Dataset", "TaskData", "bracket_matching", "char_lm", "choose_flipped",
    "corpus_text", "flip_labels", "gaussian_blobs", "make_dataset", "modular_addition",
    "reverse_strings", "split",
]
