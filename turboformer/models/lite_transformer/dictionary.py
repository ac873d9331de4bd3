"""fairseq ``Dictionary`` (version 0.8, as vendored by lite-transformer): symbols <-> ids.

File format: one ``<symbol> <count>`` per line, most frequent first. The four special symbols are implicit and
come first: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, so line k of the file is id k + 4.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
_SPACES = re.compile(r"\s+")


class DictionaryError(ValueError):
    """A dictionary file is malformed."""


class Dictionary:
    """A fairseq dictionary: ``bos`` = 0, ``pad`` = 1, ``eos`` = 2, ``unk`` = 3, then the file's symbols."""

    def __init__(self, symbols: Iterable[str]) -> None:
        self.symbols: list[str] = [BOS, PAD, EOS, UNK]
        self.indices: dict[str, int] = {s: i for i, s in enumerate(self.symbols)}
        for symbol in symbols:
            if symbol in self.indices:
                raise DictionaryError(f"duplicate symbol {symbol!r} (id {self.indices[symbol]})")
            self.indices[symbol] = len(self.symbols)
            self.symbols.append(symbol)
        self.bos, self.pad, self.eos, self.unk = 0, 1, 2, 3

    @classmethod
    def load(cls, path: str | Path) -> Dictionary:
        symbols = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                space = line.rfind(" ")
                if space <= 0 or not line[space + 1 :].isdigit():
                    raise DictionaryError(f"{path}:{number}: expected '<symbol> <count>', got {line!r}")
                symbols.append(line[:space])
        return cls(symbols)

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, text: str, append_eos: bool = True) -> list[int]:
        """Whitespace tokens -> ids (unknown -> ``unk``), followed by ``eos`` (fairseq ``encode_line``)."""
        ids = [self.indices.get(token, self.unk) for token in _SPACES.sub(" ", text).strip().split()]
        return [*ids, self.eos] if append_eos else ids

    def string(self, ids: Iterable[int]) -> str:
        """Ids -> space-joined symbols, leaving out ``eos`` (fairseq 0.8 ``Dictionary.string``; ``<s>`` is kept)."""
        symbols = []
        for i in ids:
            if not 0 <= i < len(self.symbols):
                raise DictionaryError(f"token id {i} is outside the dictionary (size {len(self.symbols)})")
            if i != self.eos:
                symbols.append(self.symbols[i])
        return " ".join(symbols)
