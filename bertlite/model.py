"""A trained BERT in some backend, with its vocabulary: what ``train`` and ``load`` return."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bertlite.backend import Backend
from bertlite.config import BERTConfig
from bertlite.data.corpus import get_tokens_and_segments
from bertlite.data.vocab import Vocab
from bertlite.errors import DataError


def _as_tokens(text: str | Sequence[str] | None, name: str, vocab: Vocab, *,
               optional: bool = False) -> list[str] | None:
    """Tokens of a text (str) or a list/tuple of tokens (str); anything else is a TypeError
    (bytes, numbers, ids: they would be looked up as words and silently become ``<unk>``)."""
    if text is None and optional:
        return None
    if isinstance(text, str):
        tokens = tokenize(vocab, text)
    elif isinstance(text, (list, tuple)):
        wrong = [t for t in text if not isinstance(t, str)]
        if wrong:
            raise TypeError(f"{name} must be a text (str) or a list/tuple of tokens (str), but "
                            f"it holds {type(wrong[0]).__name__} {wrong[0]!r:.60}"
                            + _decode_hint(wrong[0]))
        tokens = list(text)
    else:
        raise TypeError(f"{name} must be a text (str) or a list/tuple of tokens (str), got "
                        f"{type(text).__name__} {text!r:.60}" + _decode_hint(text))
    if not tokens:
        raise DataError(f"{name} is empty: give at least one token")
    return tokens


def _decode_hint(value: Any) -> str:
    return ("; decode bytes first: text.decode('utf-8')"
            if isinstance(value, (bytes, bytearray)) else "")


def tokenize(vocab: Vocab, text: str) -> list[str]:
    """The tokens of a text for a vocabulary: lowercased words split on spaces, each cut into
    its WordPiece pieces when the vocabulary has a tokenizer (which lowercases, or for a cased
    BERT's tokenizer keeps the case)."""
    if vocab.tokenizer is not None:
        return vocab.tokenizer.encode(text)
    return text.lower().split()


@dataclass
class Pretrained:
    """A BERT model of a backend, with the vocabulary and config it was trained with."""

    model: Any
    backend: Backend
    vocab: Vocab
    config: BERTConfig
    devices: list[Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        """The WordPiece tokenizer of the vocabulary (saved as ``tokenizer.json`` beside
        ``vocab.txt``), or None for the book's word vocabulary."""
        return self.vocab.tokenizer

    def tokenize(self, text: str) -> list[str]:
        """The tokens :meth:`encode` sees for a text (words, or WordPiece pieces)."""
        return tokenize(self.vocab, text)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The weights as numpy arrays under the canonical names."""
        return self.backend.state_dict(self.model)

    def encode(self, tokens_a: str | Sequence[str], tokens_b: str | Sequence[str] | None = None
               ) -> np.ndarray:
        """The BERT encoding ``(1, len, hidden)`` of a text or text pair, dropout off.

        A string is lowercased (unless the tokenizer is cased), split on spaces and, with a
        WordPiece vocabulary, cut into pieces (:meth:`tokenize` shows them); a list is taken as
        tokens of the vocabulary as they are (words, or pieces). Unknown tokens map to
        ``<unk>``; the input with ``<cls>`` and ``<sep>`` must fit the positional table
        (``config.max_len``), otherwise a DataError says by how much it is too long.
        """
        tokens, segments = get_tokens_and_segments(_as_tokens(tokens_a, "tokens_a", self.vocab),
                                                   _as_tokens(tokens_b, "tokens_b", self.vocab,
                                                              optional=True))
        if len(tokens) > self.config.max_len:
            raise DataError(f"the input has {len(tokens)} tokens with <cls> and <sep>, more "
                            f"than the model's maximum length {self.config.max_len}; shorten it")
        ids = np.asarray([self.vocab[tokens]], dtype=np.int32)
        return self.backend.encode(self.model, ids, np.asarray([segments], dtype=np.int32),
                                   np.asarray([len(tokens)], dtype=np.float32))

    def to_hf(self, path: str) -> Any:
        """Write a ``transformers`` ``BertForPreTraining`` folder (see
        :func:`bertlite.hf.export_hf`); the book's flavour is refused."""
        from bertlite.hf import export_hf

        return export_hf(self, path)

    def save(self, path: str, **kwargs: Any) -> None:
        """Write a framework-neutral checkpoint folder (see :func:`bertlite.save`)."""
        from bertlite.checkpoint import save

        save(self, path, **kwargs)


def get_bert_encoding(model: Pretrained, tokens_a: str | Sequence[str],
                      tokens_b: str | Sequence[str] | None = None) -> np.ndarray:
    """The book's ``get_bert_encoding``: encodings ``(1, len, hidden)`` of every token of
    ``<cls> tokens_a <sep> [tokens_b <sep>]``; index 0 (``<cls>``) represents the whole input."""
    return model.encode(tokens_a, tokens_b)
