"""From a corpus file to batches: tokenize, build the vocabulary and examples (cached), and
iterate shuffled minibatches of numpy arrays in the book's order."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from bertlite.data import cache as _cache
from bertlite.data.batches import MASKING_MODES as MASKING_MODES  # still importable from here
from bertlite.data.batches import Batch, Gather, ShuffledBatches
from bertlite.data.corpus import not_a_file, read_corpus, read_wiki, resolve_corpus_file
from bertlite.data.examples import (
    PretrainingExamples,
    build_examples,
    continuation_mask,
    encode_corpus,
)
from bertlite.data.tokenizer import (
    DEFAULT_WORDPIECE_VOCAB_SIZE,
    WordPieceTokenizer,
    check_tokenizer_kind,
)
from bertlite.data.vocab import Vocab, build_corpus_vocab
from bertlite.errors import DataError

#: says whether the data comes from the cache or is being prepared (the CLI shows it on stderr)
_log = logging.getLogger(__name__)


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


class BatchIterator(ShuffledBatches):
    """Shuffled minibatches of the in-memory examples; each ``iter()`` is a new pass over the
    data (order and resumption: :class:`~bertlite.data.batches.ShuffledBatches`). With
    ``masking="dynamic"`` the MLM masks of all examples are redrawn for every pass."""

    def __init__(self, examples: PretrainingExamples, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, masking: str = "static", vocab_size: int | None = None,
                 mask_id: int | None = None, drop_last: bool = False,
                 continuation: np.ndarray | None = None) -> None:
        super().__init__(len(examples), batch_size, seed=seed, shuffle=shuffle, masking=masking,
                         drop_last=drop_last, vocab_size=vocab_size, mask_id=mask_id,
                         continuation=continuation)
        self.examples = examples

    def pass_arrays(self, epoch: int) -> tuple[np.ndarray, ...]:
        """The seven arrays of the whole data as seen in pass ``epoch`` (before shuffling)."""
        ex = self.examples
        if self.masking == "dynamic":
            masked, positions, weights, labels = self.redraw_masks(
                ex.tokens, ex.segments, ex.valid_lens, epoch)
        else:
            masked, positions, weights, labels = (ex.masked_tokens, ex.pred_positions,
                                                  ex.mlm_weights, ex.mlm_labels)
        return (masked, ex.segments, ex.valid_lens, positions, weights, labels, ex.nsp_labels)

    def gatherer(self, epoch: int) -> Gather:
        arrays = self.pass_arrays(epoch)
        # copies: a batch never aliases the data
        return lambda index, idx: Batch(*(a[idx] for a in arrays))


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
