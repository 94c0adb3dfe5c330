"""Word-level tokenizer built from the grammar's vocabulary (ids: 0 pad, 1 end of text, 2 unknown)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ("<pad>", "</s>", "<unk>")
MAX_LENGTH = 40


class WordTokenizer:
    def __init__(self, words, max_length: int = MAX_LENGTH):
        self.vocab = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    @classmethod
    def from_grammar(cls, max_length: int = MAX_LENGTH) -> "WordTokenizer":
        return cls(vocabulary(), max_length)

    @classmethod
    def load(cls, path) -> "WordTokenizer":
        d = json.loads(Path(path).read_text())
        return cls(d["vocab"], d["max_length"])

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"vocab": self.vocab, "max_length": self.max_length}, indent=1))

    def __len__(self) -> int:
        return len(self.vocab)

    def words(self, text: str) -> list[str]:
        return text.lower().replace(",", " , ").replace("-", " ").split()

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, max_length] int32, attention mask [B, max_length] int32); too-long texts are cut."""
        ids = np.zeros((len(texts), self.max_length), np.int32)
        for i, t in enumerate(texts):
            toks = [self.index.get(w, 2) for w in self.words(t)][: self.max_length - 1] + [1]
            ids[i, : len(toks)] = toks
        return ids, (ids != 0).astype(np.int32)

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in self.words(text) if w not in self.index]


def vocabulary() -> list[str]:
    """Every word the grammar (captions and edit instructions) can produce, sorted."""
    from jaxdit.toyworld import captions as c
    from jaxdit.toyworld.edits import INSTRUCTION_WORDS

    words = set()
    for table in (c.SHAPE_WORDS, c.COLOUR_WORDS, c.SIZE_WORDS, c.CELL_WORDS, c.BACKGROUND_WORDS):
        for options in table.values():
            for o in options:
                words.update(o.split())
    for text in (*c.PREFIXES, *c.JOINERS, "a an on background", *INSTRUCTION_WORDS):
        words.update(text.replace(",", " , ").split())
    return sorted(words)
