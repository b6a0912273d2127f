"""From a corpus file to batches: tokenize, build the vocabulary and examples (cached), and
iterate shuffled minibatches of numpy arrays in the book's order."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bertlite.data import cache as _cache
from bertlite.data.corpus import not_a_file, read_corpus, read_wiki, resolve_corpus_file
from bertlite.data.examples import (
    PretrainingExamples,
    build_examples,
    continuation_mask,
    encode_corpus,
    mask_tokens,
)
from bertlite.data.tokenizer import (
    DEFAULT_WORDPIECE_VOCAB_SIZE,
    WordPieceTokenizer,
    check_tokenizer_kind,
)
from bertlite.data.vocab import Vocab, build_corpus_vocab
from bertlite.errors import DataError

MASKING_MODES = ("static", "dynamic")
#: says whether the data comes from the cache or is being prepared (the CLI shows it on stderr)
_log = logging.getLogger(__name__)


class Batch(NamedTuple):
    """One minibatch, fields in the order of the book's ``train_iter``."""

    tokens: np.ndarray          # (B, max_len) int32, masked input
    segments: np.ndarray        # (B, max_len) int32
    valid_lens: np.ndarray      # (B,) float32
    pred_positions: np.ndarray  # (B, max_preds) int32
    mlm_weights: np.ndarray     # (B, max_preds) float32
    mlm_labels: np.ndarray      # (B, max_preds) int32
    nsp_labels: np.ndarray      # (B,) int32


def prepare_data(path: str | os.PathLike, max_len: int, *, seed: int = 0, min_freq: int = 5,
                 vocab: Vocab | None = None, tokenizer: str | WordPieceTokenizer = "word",
                 wordpiece_vocab_size: int = DEFAULT_WORDPIECE_VOCAB_SIZE,
                 whole_word_mask: bool = False, cache: bool = True,
                 cache_dir: str | os.PathLike | None = None
                 ) -> tuple[PretrainingExamples, Vocab]:
    """Examples and vocabulary of a WikiText-format file, from the cache when possible.

    With ``vocab`` given (say, the training vocabulary for a held-out split), it is used as is,
    with its tokenizer if it has one (``vocab.tokenizer``); otherwise one is built: the book's
    word vocabulary (``tokenizer="word"``, words seen ``min_freq`` times) or a WordPiece
    vocabulary of at most ``wordpiece_vocab_size`` pieces trained on the file
    (``tokenizer="wordpiece"``, pairs seen ``min_freq`` times are merged; needs
    ``pip install "bertlite[wordpiece]"``), or the given WordPieceTokenizer's. The returned
    vocabulary carries the tokenizer (``vocab.tokenizer``, None for words).
    ``whole_word_mask`` masks all pieces of a word together.
    """
    path = Path(path)
    if not path.is_file():
        raise not_a_file(path)
    check_tokenizer_kind(tokenizer)
    if vocab is not None:  # the vocabulary decides: its own tokenizer, or words
        tokenizer = vocab.tokenizer if vocab.tokenizer is not None else "word"
    elif isinstance(tokenizer, WordPieceTokenizer):
        vocab = tokenizer.to_vocab()
    cache_file = cache_settings = None
    if cache:
        spec = dict(
            max_len=max_len, seed=seed, min_freq=min_freq,
            vocab=None if vocab is None else _cache.cache_key("vocab", tokens=vocab.idx_to_token),
            tokenizer=_tokenizer_settings(tokenizer, wordpiece_vocab_size),
            whole_word_mask=bool(whole_word_mask))
        source = _cache.file_digest(path)
        key = _cache.cache_key(source, **spec)
        cache_settings = _cache.cache_settings(source, **spec)
        cache_file = Path(cache_dir or _cache.default_cache_dir()) / f"{path.stem}-{key}.npz"
        hit = _cache.load_cached(cache_file, cache_settings)
        if hit is not None:
            _log.info("%s: prepared data read from the cache (%s)", path.name, cache_file.parent)
            return hit
    _log.info("%s: preparing the data (tokens, vocabulary, examples)%s", path.name,
              f"; cached for the next run in {cache_file.parent}" if cache_file else "")
    # the book's words and bertlite's WordPiece read the text lowercased, a cased tokenizer as is
    lowercase = not isinstance(tokenizer, WordPieceTokenizer) or tokenizer.lowercase
    corpus = read_corpus(path, lowercase)
    type_ids = None  # the vocabulary's id of each distinct word, where built from the corpus
    if vocab is None:
        if tokenizer == "wordpiece":
            vocab = WordPieceTokenizer.train(
                (s for p in read_wiki(path) for s in p), vocab_size=wordpiece_vocab_size,
                min_frequency=min_freq).to_vocab()
        else:
            vocab, type_ids = build_corpus_vocab(corpus, min_freq=min_freq)
    examples = build_examples(encode_corpus(corpus, vocab, type_ids), vocab, max_len, seed,
                              whole_word_mask=whole_word_mask)
    if cache_file is not None:
        try:
            _cache.save_cached(cache_file, examples, vocab, cache_settings)
        except OSError:
            pass  # an unwritable cache costs time next run, nothing else
    return examples, vocab


def _tokenizer_settings(tokenizer: str | WordPieceTokenizer, wordpiece_vocab_size: int
                        ) -> dict[str, object]:
    """What of the tokenizer shapes the arrays, for the cache key."""
    if isinstance(tokenizer, WordPieceTokenizer):
        return {"kind": tokenizer.kind, "digest": tokenizer.digest()}
    if tokenizer == "wordpiece":
        return {"kind": "wordpiece", "vocab_size": wordpiece_vocab_size}
    return {"kind": "word"}


class BatchIterator:
    """Shuffled minibatches of the examples; each ``iter()`` is a new pass over the data.

    The order of pass ``e`` is a permutation drawn from ``(seed, e)`` alone, so any position
    of a run (pass, batch) can be reached in O(1): that is how training resumes exactly.
    With ``masking="dynamic"`` the MLM masks are redrawn for every pass.
    """

    def __init__(self, examples: PretrainingExamples, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, masking: str = "static", vocab_size: int | None = None,
                 mask_id: int | None = None, drop_last: bool = False,
                 continuation: np.ndarray | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > len(examples):
            raise DataError(f"batch_size {batch_size} is larger than the data "
                            f"({len(examples)} examples); lower batch_size or use more text")
        if masking not in MASKING_MODES:
            raise DataError(f"masking must be one of {MASKING_MODES}, got {masking!r}")
        if masking == "dynamic" and (vocab_size is None or mask_id is None):
            raise DataError("dynamic masking needs vocab_size and mask_id")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.shuffle, self.masking, self.drop_last = shuffle, masking, drop_last
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.continuation = continuation  # whole-word masking when dynamic masks are drawn
        self.epoch = 0  # the pass the next iter() starts

    def __len__(self) -> int:
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.examples))

    def pass_arrays(self, epoch: int) -> tuple[np.ndarray, ...]:
        """The seven arrays of the whole data as seen in pass ``epoch`` (before shuffling)."""
        ex = self.examples
        if self.masking == "dynamic":
            masked, positions, weights, labels = mask_tokens(
                ex.tokens, ex.segments, ex.valid_lens, vocab_size=self.vocab_size,
                mask_id=self.mask_id, rng=np.random.default_rng([self.seed, 3, epoch]),
                continuation=self.continuation)
        else:
            masked, positions, weights, labels = (ex.masked_tokens, ex.pred_positions,
                                                  ex.mlm_weights, ex.mlm_labels)
        return (masked, ex.segments, ex.valid_lens, positions, weights, labels, ex.nsp_labels)

    def iter_pass(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of pass ``epoch``, from batch index ``start`` on."""
        arrays = self.pass_arrays(epoch)
        order = self.order(epoch)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield Batch(*(a[idx] for a in arrays))  # copies: a batch never aliases the data

    def stream(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """Endless ``(pass, batch index, batch)`` from a position on, for step-based training."""
        while True:
            for i, batch in enumerate(self.iter_pass(epoch, start), start):
                yield epoch, i, batch
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.iter_pass(epoch)


def load_data_wiki(batch_size: int, max_len: int, *, corpus: str = "wikitext-2",
                   data_dir: str | os.PathLike | None = None, split: str = "train",
                   seed: int | None = None, masking: str = "static", min_freq: int = 5,
                   vocab: Vocab | None = None, cache: bool = True, shuffle: bool = True,
                   tokenizer: str | WordPieceTokenizer = "word",
                   wordpiece_vocab_size: int = DEFAULT_WORDPIECE_VOCAB_SIZE,
                   whole_word_mask: bool = False) -> tuple[BatchIterator, Vocab]:
    """WikiText-2 (or the sample corpus) as minibatches of pretraining examples, and the
    vocabulary: the book's ``load_data_wiki`` with numpy batches, deterministic for a seed
    (``None`` means seed 0). ``tokenizer="wordpiece"`` trains a WordPiece vocabulary of at most
    ``wordpiece_vocab_size`` pieces on the split instead of the book's word vocabulary (the
    vocabulary then carries it: ``vocab.tokenizer``); ``whole_word_mask`` masks all pieces of a
    word together."""
    if not isinstance(max_len, int) or max_len <= 0:
        raise DataError(f"max_len must be a positive integer, got {max_len!r}")
    seed = 0 if seed is None else int(seed)
    path = resolve_corpus_file(corpus, split, data_dir=data_dir)
    examples, vocab = prepare_data(path, max_len, seed=seed, min_freq=min_freq, vocab=vocab,
                                   tokenizer=tokenizer, wordpiece_vocab_size=wordpiece_vocab_size,
                                   whole_word_mask=whole_word_mask, cache=cache)
    batches = BatchIterator(examples, batch_size, seed=seed, shuffle=shuffle, masking=masking,
                            vocab_size=len(vocab), mask_id=vocab["<mask>"],
                            continuation=continuation_mask(vocab) if whole_word_mask else None)
    return batches, vocab
