"""Subword tokenization: a WordPiece vocabulary trained on the corpus (Hugging Face ``tokenizers``).

The book's word-level vocabulary stays the default. With ``tokenizer="wordpiece"`` each word of
a sentence (the book's ``split()``, after lowercasing) is cut into WordPiece pieces: a first
piece, then continuation pieces written with a ``##`` prefix (``"unbelievably"`` ->
``unb ##el ##ie ##v ##ably``). The special tokens have the ids of the word vocabulary
(``<unk> <pad> <mask> <cls> <sep>`` = 0-4; an imported BERT vocabulary keeps its own ids for
them, ``[PAD]`` = 0 ... ``[MASK]`` = 103, under these names), so everything after tokenization
is unchanged: a
WordPiece tokenizer becomes a :class:`~bertlite.data.vocab.Vocab` (:meth:`to_vocab`) that
carries it (``vocab.tokenizer``).

The normalisation is the tokenizer's own (its ``normalizer``): bertlite's WordPiece lowercases,
as the book's pipeline does; a tokenizer imported from a cased ``transformers`` model
(``do_lower_case=False``) keeps the case, and its accents as it was configured
(:attr:`WordPieceTokenizer.normalization`), and the data pipeline then reads the corpus without
lowercasing it (:attr:`WordPieceTokenizer.lowercase`).

``tokenizers`` is an optional dependency (``pip install "bertlite[wordpiece]"``), imported only
when a WordPiece tokenizer is trained or loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertlite.data.corpus import SPECIAL_TOKENS
from bertlite.data.vocab import Vocab
from bertlite.errors import DataError

#: ``<unk>``, then the reserved tokens, at ids 0-4 as in the word vocabulary
WORDPIECE_SPECIALS = ("<unk>", *SPECIAL_TOKENS)
CONTINUATION = "##"
TOKENIZER_KINDS = ("word", "wordpiece")
DEFAULT_WORDPIECE_VOCAB_SIZE = 10_000
#: words longer than this many characters become ``<unk>`` (the WordPiece default)
MAX_WORD_CHARS = 100


def _hf() -> Any:
    try:
        import tokenizers
    except ImportError:
        from bertlite.install import install_command

        raise ImportError('tokenizer="wordpiece" needs the Hugging Face tokenizers library: '
                          f'{install_command("wordpiece")}') from None
    return tokenizers


#: bertlite's own normalisation (the book's ``lower()``): what a tokenizer without one records
LOWERCASE = {"lowercase": True, "strip_accents": False}


def _as_words(words: str | Sequence[str], lowercase: bool = True) -> list[str]:
    if isinstance(words, str):
        return (words.lower() if lowercase else words).split()
    return [str(w) for w in words]


def normalization_of(normalizer: dict[str, Any] | None) -> dict[str, bool]:
    """``{"lowercase": bool, "strip_accents": bool}`` of a ``tokenizer.json`` normalizer (a
    ``Lowercase``, a ``BertNormalizer``, ``StripAccents``, a ``Sequence`` of them, or none)."""
    parts = (normalizer or {}).get("normalizers", [normalizer or {}])
    lowercase = strip = False
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "Lowercase":
            lowercase = True
        elif kind == "StripAccents":
            strip = True
        elif kind == "BertNormalizer":
            lowercase = lowercase or bool(part.get("lowercase", True))
            accents = part.get("strip_accents")  # None: as lowercase (BERT's rule)
            strip = strip or bool(part.get("lowercase", True) if accents is None else accents)
    return {"lowercase": lowercase, "strip_accents": strip}


class WordPieceTokenizer:
    """A WordPiece vocabulary and its tokenizer (a ``tokenizers.Tokenizer`` underneath).

    Train one with :meth:`train`, cut words into pieces with :meth:`encode` (ids:
    :meth:`encode_ids`), join pieces back into words with :meth:`decode`, keep it with
    :meth:`save` / :meth:`load` (the Hugging Face ``tokenizer.json`` format).
    """

    kind = "wordpiece"

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.normalization = normalization_of(json.loads(tokenizer.to_str()).get("normalizer"))
        #: the names an imported tokenizer gave the special tokens bertlite calls ``<pad>`` ...
        #: (``{"<mask>": "[MASK]", ...}``; empty for bertlite's own), which export writes back
        self.special_names: dict[str, str] = {}
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.idx_to_token: list[str] = [""] * len(vocab)
        for token, idx in vocab.items():
            if idx >= len(vocab) or self.idx_to_token[idx]:
                raise DataError("a WordPiece vocabulary must have ids 0..N-1, each once")
            self.idx_to_token[idx] = token
        missing = [t for t in WORDPIECE_SPECIALS if t not in vocab]
        if missing:
            raise DataError(f"a WordPiece vocabulary must hold {list(WORDPIECE_SPECIALS)} "
                            f"(ids 0-4 when bertlite trains it); it lacks {missing}")

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def train(cls, sentences: Iterable[str], *, vocab_size: int = DEFAULT_WORDPIECE_VOCAB_SIZE,
              min_frequency: int = 5) -> WordPieceTokenizer:
        """Train a WordPiece vocabulary of at most ``vocab_size`` tokens on sentences (strings
        of space-separated words, lowercased as :func:`~bertlite.data.corpus.read_wiki` does).

        Every character of the text is in the vocabulary, so only words longer than 100
        characters become ``<unk>``; pairs seen fewer than ``min_frequency`` times are not
        merged, so a small text may give fewer than ``vocab_size`` tokens. The result depends on
        the text alone (not on the process: see the note in the code).
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
                or vocab_size <= len(WORDPIECE_SPECIALS):
            raise DataError(f"the WordPiece vocab_size must be an integer above "
                            f"{len(WORDPIECE_SPECIALS)}, got {vocab_size!r}")
        hf = _hf()
        sentences = list(sentences)
        # tokenizers' trainer creates the "##x" tokens in hash-map order, and the ids break ties
        # between merges, so the same text gives different vocabularies from one process to the
        # next (huggingface/tokenizers#1794). Declaring every "##x" up front, sorted, gives them
        # fixed ids and makes training a function of the text.
        distinct = set(" ".join(sentences).split())
        inner = sorted({CONTINUATION + c for c in set().union(*(w[1:] for w in distinct))})
        trainer = hf.trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=[*WORDPIECE_SPECIALS, *inner], continuing_subword_prefix=CONTINUATION)
        raw = hf.Tokenizer(hf.models.WordPiece(unk_token="<unk>",
                                               continuing_subword_prefix=CONTINUATION))
        raw.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
        raw.train_from_iterator(sentences, trainer)
        # a clean tokenizer from the learnt vocabulary: the "##x" are ordinary pieces again
        return cls.from_vocab(raw.get_vocab(with_added_tokens=False))

    @classmethod
    def from_vocab(cls, vocab: dict[str, int] | Sequence[str], *, normalizer: Any = None,
                   pre_tokenizer: Any = None) -> WordPieceTokenizer:
        """A tokenizer of a WordPiece vocabulary (token -> id, or tokens in id order), which
        lowercases and splits on whitespace, or uses the ``tokenizers`` ``normalizer`` and
        ``pre_tokenizer`` given (an imported BERT's, say: cased, splitting off punctuation)."""
        hf = _hf()
        if not isinstance(vocab, dict):
            vocab = {t: i for i, t in enumerate(vocab)}
        tok = hf.Tokenizer(hf.models.WordPiece(
            vocab=dict(vocab), unk_token="<unk>", continuing_subword_prefix=CONTINUATION,
            max_input_chars_per_word=MAX_WORD_CHARS))
        tok.normalizer = normalizer if normalizer is not None else hf.normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizer if pre_tokenizer is not None \
            else hf.pre_tokenizers.WhitespaceSplit()
        tok.decoder = hf.decoders.WordPiece(prefix=CONTINUATION, cleanup=False)
        tok.add_special_tokens(list(WORDPIECE_SPECIALS))  # "<mask>" in a text is one token
        return cls(tok)

    # -- using --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.idx_to_token)

    @property
    def vocab_size(self) -> int:
        return len(self.idx_to_token)

    @property
    def lowercase(self) -> bool:
        """Whether this tokenizer lowercases (bertlite's own do; a cased BERT's does not): the
        data pipeline reads a corpus for it lowercased or as it is."""
        return self.normalization["lowercase"]

    @property
    def normalizer(self) -> Any:
        """The ``tokenizers`` normalizer (what export writes into ``tokenizer.json``)."""
        return self._tok.normalizer

    @property
    def pre_tokenizer(self) -> Any:
        return self._tok.pre_tokenizer

    def encode(self, words: str | Sequence[str]) -> list[str]:
        """The pieces of words (a string is split on spaces, lowercased first when the
        tokenizer lowercases)."""
        words = _as_words(words, self.lowercase)
        if not words:
            return []
        return list(self._tok.encode(words, is_pretokenized=True,
                                     add_special_tokens=False).tokens)

    def encode_ids(self, words: str | Sequence[str]) -> list[int]:
        """The ids of the pieces of words."""
        words = _as_words(words, self.lowercase)
        if not words:
            return []
        return list(self._tok.encode(words, is_pretokenized=True, add_special_tokens=False).ids)

    def encode_words(self, words: Sequence[str]) -> list[list[int]]:
        """Piece ids of each word separately (what corpus encoding uses, once per distinct
        word)."""
        return [list(e.ids) for e in self._tok.encode_batch(
            [[w] for w in words], is_pretokenized=True, add_special_tokens=False)]

    def decode(self, pieces: Sequence[str] | Sequence[int]) -> list[str]:
        """Words from pieces (or piece ids): each ``##`` piece joins the word before it."""
        words: list[str] = []
        for piece in pieces:
            if not isinstance(piece, str):
                piece = self.idx_to_token[int(piece)]
            if piece.startswith(CONTINUATION) and words:
                words[-1] += piece[len(CONTINUATION):]
            else:
                words.append(piece)
        return words

    def continuation_mask(self) -> np.ndarray:
        """``(vocab_size,)`` bool: True for the ``##`` pieces, which continue a word (what
        whole-word masking groups by)."""
        return np.fromiter((t.startswith(CONTINUATION) for t in self.idx_to_token), dtype=bool,
                           count=len(self.idx_to_token))

    def to_vocab(self) -> Vocab:
        """The vocabulary of the pieces, in id order, carrying this tokenizer."""
        vocab = Vocab.from_tokens(self.idx_to_token, unk_anywhere=True)
        vocab.tokenizer = self
        return vocab

    # -- keeping ------------------------------------------------------------------------------
    def to_str(self) -> str:
        """The Hugging Face ``tokenizer.json`` text."""
        return self._tok.to_str()

    @classmethod
    def from_str(cls, text: str) -> WordPieceTokenizer:
        hf = _hf()
        try:
            tok = hf.Tokenizer.from_str(text)
        except Exception as err:
            raise DataError(f"not a tokenizer.json: {err}") from None
        model = type(tok.model).__name__
        if model != "WordPiece":
            raise DataError(f"the tokenizer is a {model} model, not WordPiece")
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (the Hugging Face format), atomically."""
        from bertlite.io import atomic_write_text

        atomic_write_text(path, self.to_str())

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordPieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            return cls.from_str(path.read_text(encoding="utf-8"))
        except DataError as err:
            raise DataError(f"{path}: {err}") from None

    def digest(self) -> str:
        """A short fingerprint of the vocabulary and, unless it is bertlite's lowercasing, the
        normalisation (what the data cache keys on)."""
        text = "\n".join(self.idx_to_token)
        if self.normalization != LOWERCASE:
            text += "\n" + json.dumps(self.normalization, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordPieceTokenizer) and self.idx_to_token == \
            other.idx_to_token and self.normalization == other.normalization

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        cased = "" if self.lowercase else ", cased"
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}{cased})"


def check_tokenizer_kind(tokenizer: Any) -> None:
    """A ``tokenizer=`` argument must be ``"word"``, ``"wordpiece"`` or a trained tokenizer."""
    if isinstance(tokenizer, WordPieceTokenizer):
        return
    if tokenizer not in TOKENIZER_KINDS:
        raise DataError(f"tokenizer must be one of {list(TOKENIZER_KINDS)} or a "
                        f"WordPieceTokenizer, got {tokenizer!r}")
