"""The word-level vocabulary of the book: ``<unk>`` first, reserved tokens, then by frequency."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import overload

import numpy as np

from bertlite.data.corpus import SPECIAL_TOKENS, TokenizedCorpus
from bertlite.errors import DataError


class Vocab:
    """Maps tokens to indices and back; unknown tokens map to ``<unk>`` (index 0, or where an
    imported BERT vocabulary has it).

    Tokens seen at least ``min_freq`` times are kept, most frequent first; ties are broken by
    the token's text so that the vocabulary does not depend on the order of the corpus.
    """

    def __init__(self, tokens: Iterable[str] | Iterable[Sequence[str]] | Mapping[str, int]
                 | None = None, min_freq: int = 0,
                 reserved_tokens: Sequence[str] | None = None) -> None:
        if isinstance(tokens, Mapping):  # already counted
            counter = Counter(tokens)
        else:
            tokens = list(tokens or [])
            if tokens and not isinstance(tokens[0], str):
                tokens = [t for line in tokens for t in line]
            counter = Counter(tokens)
        self._counter = counter
        self._token_freqs: list[tuple[str, int]] | None = None  # sorted when first asked for
        #: the subword tokenizer this vocabulary belongs to (a WordPieceTokenizer), or None for
        #: the book's word-level vocabulary, where a token is a word
        self.tokenizer = None
        self._unk = 0
        self.idx_to_token: list[str] = ["<unk>", *(reserved_tokens or [])]
        self.token_to_idx: dict[str, int] = {t: i for i, t in enumerate(self.idx_to_token)}
        kept = sorted(token for token, count in counter.items() if count >= min_freq)
        kept.sort(key=counter.__getitem__, reverse=True)  # stable: ties stay by text
        self.idx_to_token += [t for t in kept if t not in self.token_to_idx]
        self.token_to_idx = dict(zip(self.idx_to_token, range(len(self.idx_to_token))))

    @classmethod
    def from_tokens(cls, idx_to_token: Sequence[str], *, unk_anywhere: bool = False) -> Vocab:
        """A vocabulary with exactly these tokens in this order: index 0 must be ``<unk>``
        (bertlite's vocabularies), or with ``unk_anywhere`` ``<unk>`` may be at any index (an
        imported BERT vocabulary keeps its own ids: ``[UNK]`` is 100 in ``bert-base-uncased``).
        """
        if not idx_to_token or (idx_to_token[0] != "<unk>" and not (
                unk_anywhere and "<unk>" in idx_to_token)):
            raise DataError("a vocabulary must start with '<unk>' at index 0")
        if len(set(idx_to_token)) != len(idx_to_token):
            raise DataError("a vocabulary has duplicate tokens")
        vocab = cls()
        vocab.idx_to_token = list(idx_to_token)
        vocab.token_to_idx = {t: i for i, t in enumerate(vocab.idx_to_token)}
        vocab._unk = vocab.token_to_idx["<unk>"]
        return vocab

    def __len__(self) -> int:
        return len(self.idx_to_token)

    @overload
    def __getitem__(self, tokens: str) -> int: ...
    @overload
    def __getitem__(self, tokens: list | tuple) -> list: ...

    def __getitem__(self, tokens):
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, self._unk)
        return [self[token] for token in tokens]

    def __contains__(self, token: str) -> bool:
        return token in self.token_to_idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.idx_to_token == other.idx_to_token

    def __repr__(self) -> str:
        kind = "" if self.tokenizer is None else f", tokenizer={self.tokenizer.kind!r}"
        return f"Vocab(size={len(self)}{kind})"

    def to_tokens(self, indices):
        """The token of an index, or the tokens of a list of indices."""
        if not isinstance(indices, (list, tuple)):
            return self.idx_to_token[int(indices)]
        return [self.idx_to_token[int(i)] for i in indices]

    @property
    def unk(self) -> int:
        """The index of ``<unk>``: 0, except in an imported BERT vocabulary."""
        return self._unk

    @property
    def token_freqs(self) -> list[tuple[str, int]]:
        """Every counted token with its count, most frequent first (as the book's)."""
        if self._token_freqs is None:
            if callable(self._counter):  # counted when first asked for (build_corpus_vocab)
                self._counter = self._counter()
            self._token_freqs = _by_frequency(list(self._counter.items()))
        return self._token_freqs

    @property
    def special_ids(self) -> dict[str, int]:
        """Indices of ``<unk>`` and the reserved tokens present."""
        return {t: self.token_to_idx[t] for t in ("<unk>", *SPECIAL_TOKENS)
                if t in self.token_to_idx}

    def save(self, path: str | os.PathLike) -> None:
        """One token a line, in index order (the format of BERT's ``vocab.txt``)."""
        from bertlite.io import atomic_write_text

        atomic_write_text(path, "".join(t + "\n" for t in self.idx_to_token))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"vocabulary file {path} does not exist")
        tokens = path.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        return cls.from_tokens(tokens, unk_anywhere=True)


def _by_frequency(items: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Most frequent first; ties by the token's text (the corpus order does not matter)."""
    items.sort()  # by token, then (stable) by frequency
    items.sort(key=itemgetter(1), reverse=True)
    return items


def build_vocab(tokens: Iterable[str] | Iterable[Sequence[str]] | Mapping[str, int],
                min_freq: int = 5) -> Vocab:
    """The book's vocabulary for pretraining: ``min_freq`` 5 and the four reserved tokens;
    ``tokens`` is a flat list of words, a list of sentences, or word counts."""
    return Vocab(tokens, min_freq=min_freq, reserved_tokens=list(SPECIAL_TOKENS))


def build_corpus_vocab(corpus: TokenizedCorpus, min_freq: int = 5) -> tuple[Vocab, np.ndarray]:
    """``build_vocab(corpus.word_counts(), min_freq)``, and the id of each of the corpus's
    distinct words (``corpus.types``) in it, 0 for the unknown ones: the same vocabulary from
    the counts as arrays, without a Counter or a lookup per distinct word."""
    counts = corpus.counts()
    kept = np.flatnonzero(counts >= min_freq)
    words = [corpus.types[i] for i in kept.tolist()]
    by_text = np.array(sorted(range(len(words)), key=words.__getitem__), dtype=np.intp)
    order = by_text[np.argsort(-counts[kept[by_text]], kind="stable")]  # ties stay by text
    vocab = Vocab(reserved_tokens=list(SPECIAL_TOKENS))
    types = corpus.types
    vocab._counter = lambda: Counter(dict(zip(types, counts.tolist())))
    reserved = dict(vocab.token_to_idx)
    new = [i for i in order.tolist() if words[i] not in reserved]
    start = len(vocab.idx_to_token)
    vocab.idx_to_token += [words[i] for i in new]
    vocab.token_to_idx = dict(zip(vocab.idx_to_token, range(len(vocab.idx_to_token))))
    ids = np.zeros(len(types), dtype=np.int32)
    ids[kept[new]] = np.arange(start, start + len(new), dtype=np.int32)
    for token in reserved.keys() & set(types):  # a reserved token in the text is that token
        ids[types.index(token)] = reserved[token]
    return vocab, ids
