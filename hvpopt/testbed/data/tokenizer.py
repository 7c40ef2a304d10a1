"""A character-level tokenizer with a padding id."""

import dataclasses

import numpy as np

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """Maps each character of ``characters`` to an id; id 0 is padding.

    Character ``characters[i]`` has id ``i + 1``. A tokenizer is saved with a
    checkpoint as its ``characters`` string, so a model always reads text the
    way it was trained to.

    Example:
      >>> tokenizer = CharTokenizer.from_text("hello world")
      >>> tokenizer.encode("hello", length=7).tolist()
      [4, 3, 5, 5, 6, 0, 0]
      >>> tokenizer.decode(tokenizer.encode("hello", length=7))
      'hello'
    """

    characters: str

    def __post_init__(self):
        if not self.characters or len(set(self.characters)) != len(self.characters):
            raise ValueError(f"characters must be a non-empty string of distinct characters; got {self.characters!r}.")

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The tokenizer of the distinct characters of ``text``, sorted."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.characters) + 1

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def encode(self, text: str, length: int | None = None) -> np.ndarray:
        """``text`` as int32 ids, right-padded with ``pad_id`` to ``length`` if given.

        Raises:
          ValueError: a character is not in the vocabulary, or ``text`` is
            longer than ``length``.
        """
        index = self._index()
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise ValueError(
                f"text contains characters outside the vocabulary: {''.join(unknown)!r} "
                f"(the vocabulary is {self.characters!r})."
            )
        if length is not None and len(text) > length:
            raise ValueError(f"text has {len(text)} characters, more than the {length} allowed.")
        ids = np.full(len(text) if length is None else length, PAD_ID, dtype=np.int32)
        ids[: len(text)] = [index[c] for c in text]
        return ids

    def decode(self, ids) -> str:
        """The text of ``ids``, padding left out."""
        return "".join(self.characters[i - 1] for i in np.asarray(ids).tolist() if i != PAD_ID)

    def _index(self) -> dict[str, int]:
        return {c: i + 1 for i, c in enumerate(self.characters)}
