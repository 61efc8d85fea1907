"""Question tokenisation and the word vocabulary, built from the training split."""

import dataclasses
import functools
import json
import re
from collections.abc import Iterable

import numpy as np
from etils import epath

from ucam_jax import storage

PAD, UNK = '<pad>', '<unk>'


def tokenize(text: str) -> list[str]:
  """Lower-cased words; punctuation is dropped."""
  return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Words in id order; id 0 is padding and id 1 stands for every unknown word."""
  words: tuple[str, ...]

  @classmethod
  def build(cls, questions: Iterable[str]) -> 'Vocabulary':
    found = sorted({word for question in questions for word in tokenize(question)})
    return cls((PAD, UNK, *found))

  @property
  def size(self) -> int:
    return len(self.words)

  def encode(self, question: str, max_length: int) -> tuple[np.ndarray, int]:
    """Returns ([max_length] int32 ids, padded with 0; the number of words, at most max_length).

    Words past max_length are cut off; unknown words map to the UNK id.
    """
    index = self._index
    ids = [index.get(word, 1) for word in tokenize(question)][:max_length]
    tokens = np.zeros(max_length, np.int32)
    tokens[:len(ids)] = ids
    return tokens, len(ids)

  def decode(self, tokens: np.ndarray, length: int) -> list[str]:
    return [self.words[i] for i in tokens[:length]]

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    return {word: i for i, word in enumerate(self.words)}

  def save(self, path: epath.PathLike) -> None:
    """Whole or absent for a process reading it meanwhile (see storage.write_text)."""
    storage.write_text(path, json.dumps({'words': self.words}, indent=0))

  @classmethod
  def load(cls, path: epath.PathLike) -> 'Vocabulary':
    words = tuple(storage.read_json(path)['words'])
    if words[:2] != (PAD, UNK):
      raise ValueError(f'{path} is not a ucam_jax vocabulary: it must start with {PAD!r}, {UNK!r}.')
    return cls(words)
