"""Pretraining examples as padded numpy arrays: NSP sentence pairs and MLM masks.

Same semantics as the book (d2l ``_get_nsp_data_from_paragraph`` ... ``_pad_bert_inputs``), but
built with whole-array numpy operations instead of a Python loop per token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import repeat

import numpy as np

from bertlite.data.corpus import TokenizedCorpus
from bertlite.data.vocab import Vocab
from bertlite.errors import DataError


def max_num_mlm_preds(max_len: int) -> int:
    """Prediction slots per example: ``round(0.15 * max_len)`` as in the book."""
    return max(1, round(0.15 * max_len))


@dataclass
class EncodedCorpus:
    """All sentences as one flat array of token ids, with their lengths and paragraphs."""

    token_ids: np.ndarray        # (total tokens,) int32
    sentence_starts: np.ndarray  # (num sentences,) int64, offsets into token_ids
    sentence_lens: np.ndarray    # (num sentences,) int64
    paragraph_sizes: np.ndarray  # (num paragraphs,) int64, sentences per paragraph


def encode_corpus(corpus: TokenizedCorpus, vocab: Vocab, type_ids: np.ndarray | None = None
                  ) -> EncodedCorpus:
    """Token ids of a tokenized corpus (unknown words are ``<unk>``, 0). With a subword
    vocabulary (``vocab.tokenizer``, say WordPiece) each word becomes its pieces.
    ``type_ids``, the id of each of ``corpus.types`` where already known (from
    ``build_corpus_vocab``), saves looking them up."""
    if vocab.tokenizer is not None:
        ids = _subword_ids(corpus, vocab.tokenizer)
    else:
        table = np.empty(len(corpus.types) + 1, dtype=np.int32)
        table[-1] = -1  # for code -1, the end of a sentence
        if type_ids is None:
            table[:-1] = np.fromiter(map(vocab.token_to_idx.get, corpus.types,
                                         repeat(0)), dtype=np.int32, count=len(corpus.types))
        else:
            table[:-1] = type_ids
        ids = table[corpus.codes]
    boundary = ids < 0
    ends = np.flatnonzero(boundary)
    lens = np.diff(ends, prepend=-1) - 1
    starts = ends - lens - np.arange(len(ends))  # offsets once the markers are dropped
    return EncodedCorpus(ids[~boundary], starts.astype(np.int64), lens.astype(np.int64),
                         corpus.paragraph_sizes)


def _subword_ids(corpus: TokenizedCorpus, tokenizer) -> np.ndarray:
    """The piece ids of all words (boundary markers as -1), each distinct word encoded once."""
    pieces = [*tokenizer.encode_words(corpus.types), [-1]]  # the last, for code -1
    lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    flat = np.fromiter((i for p in pieces for i in p), dtype=np.int32, count=int(lens.sum()))
    starts = np.cumsum(lens) - lens
    which = corpus.codes.astype(np.int64) % len(pieces)  # -1: the last
    # the pieces of word j of the corpus are flat[starts[which[j]]:][:lens[which[j]]]
    word_lens = lens[which]
    offsets = np.arange(int(word_lens.sum())) - np.repeat(np.cumsum(word_lens) - word_lens,
                                                           word_lens)
    return flat[np.repeat(starts[which], word_lens) + offsets]


@dataclass
class PretrainingExamples:
    """Padded arrays of all examples. ``tokens`` is the unmasked input; the MLM fields hold the
    masked input and prediction slots drawn once (static masking, as in the book)."""

    tokens: np.ndarray          # (N, max_len) int32, unmasked, padded with <pad>
    segments: np.ndarray        # (N, max_len) int32
    valid_lens: np.ndarray      # (N,) float32, tokens before padding
    nsp_labels: np.ndarray      # (N,) int32, 1 when sentence B follows sentence A
    masked_tokens: np.ndarray   # (N, max_len) int32, the MLM input
    pred_positions: np.ndarray  # (N, max_preds) int32, 0 in unused slots
    mlm_weights: np.ndarray     # (N, max_preds) float32, 1 for used slots
    mlm_labels: np.ndarray      # (N, max_preds) int32, 0 in unused slots

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_nsp_pairs(corpus: EncodedCorpus, max_len: int, rng: np.random.Generator, *,
                    pad_id: int, cls_id: int, sep_id: int,
                    others: EncodedCorpus | None = None, others_share: float = 0.0,
                    others_rng: np.random.Generator | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sentence pairs for next sentence prediction, padded: ``tokens, segments, valid_lens,
    nsp_labels``. Each sentence but a paragraph's last is sentence A once; B is the next sentence
    with probability 1/2, else a random sentence of a random paragraph. Pairs longer than
    ``max_len`` (with ``<cls>`` and two ``<sep>``) are dropped.

    ``others`` (sentences from elsewhere in the corpus, say other shards; its paragraphs are
    ignored): each random B is replaced, with probability ``others_share``, by a sentence of
    ``others`` drawn with ``others_rng``; ``rng``'s draws are those made without it."""
    sizes = corpus.paragraph_sizes
    para_starts = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], out=para_starts[1:])
    is_last = np.zeros(len(corpus.sentence_lens), dtype=bool)
    is_last[para_starts + sizes - 1] = True
    a_idx = np.flatnonzero(~is_last)
    n = len(a_idx)
    is_next = rng.random(n) < 0.5
    rand_para = rng.integers(0, len(sizes), n)
    rand_sent = para_starts[rand_para] + (rng.random(n) * sizes[rand_para]).astype(np.int64)
    b_idx = np.where(is_next, a_idx + 1, rand_sent)
    token_ids, sentence_starts, sentence_lens = (corpus.token_ids, corpus.sentence_starts,
                                                 corpus.sentence_lens)
    if others is not None and len(others.sentence_lens) and others_share > 0:
        if others_rng is None:
            raise ValueError("others needs others_rng")
        elsewhere = ~is_next & (others_rng.random(n) < others_share)
        pick = others_rng.integers(0, len(others.sentence_lens), n)
        b_idx = np.where(elsewhere, len(sentence_lens) + pick, b_idx)
        token_ids = np.concatenate([token_ids, others.token_ids.astype(token_ids.dtype)])
        sentence_starts = np.concatenate([sentence_starts,
                                          others.sentence_starts + len(corpus.token_ids)])
        sentence_lens = np.concatenate([sentence_lens, others.sentence_lens])

    len_a, len_b = sentence_lens[a_idx], sentence_lens[b_idx]
    keep = len_a + len_b + 3 <= max_len
    a_idx, b_idx, len_a, len_b, is_next = (x[keep] for x in (a_idx, b_idx, len_a, len_b, is_next))
    n = len(a_idx)
    valid = len_a + len_b + 3

    # every cell is read from the token ids followed by <pad>, <cls> and <sep>: A's tokens,
    # then B's shifted past A and its <sep>, then the special tokens
    num_ids = len(token_ids)
    source_ids = np.concatenate([token_ids, np.array([pad_id, cls_id, sep_id],
                                                     dtype=token_ids.dtype)])
    index = np.int32 if num_ids + 3 < 2**31 else np.int64  # int32: half the memory traffic
    cols = np.arange(max_len, dtype=index)
    len_a, valid = len_a.astype(index), valid.astype(index)
    len_a_col, valid_col = len_a[:, None], valid[:, None]
    in_b = cols >= len_a_col + 2
    source = np.where(in_b, (sentence_starts[b_idx] - len_a - 2).astype(index)[:, None],
                      (sentence_starts[a_idx] - 1).astype(index)[:, None])
    source += cols
    padding = cols >= valid_col
    source[padding] = num_ids  # <pad>
    source[:, 0] = num_ids + 1  # <cls>
    rows = np.arange(n)
    source[rows, len_a + 1] = num_ids + 2  # <sep>
    source[rows, valid - 1] = num_ids + 2
    tokens = source_ids[source]
    segments = (in_b & ~padding).view(np.int8).astype(np.int32)
    return tokens, segments, valid.astype(np.float32), is_next.astype(np.int32)


def mlm_candidates(segments: np.ndarray, valid_lens: np.ndarray) -> np.ndarray:
    """Positions that may be predicted: every valid token but ``<cls>`` and the ``<sep>``s."""
    cols = np.arange(segments.shape[1])
    valid = valid_lens.astype(np.int64)[:, None]
    # segment 0 is <cls> A <sep>: its last position is the first <sep>
    first_sep = valid - segments.sum(axis=1, keepdims=True) - 1
    return (cols > 0) & (cols < valid - 1) & (cols != first_sep)


def mask_tokens(tokens: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray, *,
                vocab_size: int, mask_id: int, rng: np.random.Generator,
                continuation: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw MLM predictions: ``masked_tokens, pred_positions, mlm_weights, mlm_labels``.

    ``max(1, round(0.15 * valid_len))`` positions per example (at most the candidates, at most
    ``round(0.15 * max_len)``), sorted; 80% become ``<mask>``, 10% a random token of the
    vocabulary, 10% stay unchanged.

    With ``continuation`` (a bool per vocabulary id, True for the ``##`` pieces of WordPiece)
    masking is by whole words: words are drawn in random order and taken while their pieces
    fit in the example's budget of tokens (as in Google's BERT), so about 15% of the tokens are
    predicted, and all pieces of a word are predicted together; the 80/10/10 choice is made
    once per word.
    """
    n, max_len = tokens.shape
    k = max_num_mlm_preds(max_len)
    candidates = mlm_candidates(segments, valid_lens)
    num_preds = np.maximum(1, np.round(0.15 * valid_lens.astype(np.float64))).astype(np.int64)
    num_preds = np.minimum(num_preds, candidates.sum(axis=1))
    if continuation is not None:
        return _mask_whole_words(tokens, candidates, num_preds, k, vocab_size=vocab_size,
                                 mask_id=mask_id, rng=rng, continuation=continuation)
    # selection sampling, column by column: a candidate is taken with probability (still
    # needed) / (candidates left), which draws each subset of num_preds candidates alike
    draws = rng.random((max_len, n), dtype=np.float32)
    candidates_by_col = np.ascontiguousarray(candidates.T)
    taken = np.empty((max_len, n), dtype=bool)
    needed = num_preds.astype(np.float32)
    left = candidates_by_col.sum(axis=0, dtype=np.float32)
    for col in range(max_len):
        is_candidate = candidates_by_col[col]
        take = np.less(draws[col] * left, needed, out=taken[col])
        take &= is_candidate
        needed -= take
        left -= is_candidate
    rows, positions = np.nonzero(taken.T)  # by example, then by position: sorted
    slots = np.arange(len(rows)) - np.repeat(np.cumsum(num_preds) - num_preds, num_preds)
    labels = tokens[rows, positions]

    draw, keep = rng.random(len(rows)), rng.random(len(rows))
    random_tokens = rng.integers(0, vocab_size, len(rows))
    replacement = np.where(draw < 0.8, mask_id, np.where(keep < 0.5, labels, random_tokens))
    masked = tokens.copy()
    masked[rows, positions] = replacement
    return _prediction_slots(n, k, rows, slots, positions, labels, masked)


def _prediction_slots(n: int, k: int, rows: np.ndarray, slots: np.ndarray,
                      positions: np.ndarray, labels: np.ndarray, masked: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``masked, pred_positions, mlm_weights, mlm_labels`` from the predictions as flat
    (row, slot) pairs: unused slots hold position 0, weight 0 and label 0."""
    pred_positions = np.zeros((n, k), dtype=np.int32)
    weights = np.zeros((n, k), dtype=np.float32)
    pred_labels = np.zeros((n, k), dtype=np.int32)
    pred_positions[rows, slots] = positions
    weights[rows, slots] = 1.0
    pred_labels[rows, slots] = labels
    return masked, pred_positions, weights, pred_labels


def word_index(tokens: np.ndarray, candidates: np.ndarray, continuation: np.ndarray
               ) -> np.ndarray:
    """``(n, max_len)``: the index of the word each candidate position belongs to, counted
    from 0 in each example, and ``max_len`` elsewhere. A word is a piece that is not a ``##``
    continuation, with the continuation pieces that follow it."""
    n, max_len = tokens.shape
    continues = np.asarray(continuation, dtype=bool)[tokens]
    after_candidate = np.zeros_like(candidates)
    after_candidate[:, 1:] = candidates[:, :-1]
    starts = candidates & (~continues | ~after_candidate)
    word = np.cumsum(starts, axis=1) - 1
    return np.where(candidates, word, max_len)


def _mask_whole_words(tokens: np.ndarray, candidates: np.ndarray, num_preds: np.ndarray, k: int,
                      *, vocab_size: int, mask_id: int, rng: np.random.Generator,
                      continuation: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n, max_len = tokens.shape
    rows = np.arange(n)
    word = word_index(tokens, candidates, continuation)
    num_words = np.where(candidates, word + 1, 0).max(axis=1, initial=0)
    # pieces per word: lengths[i, w], with a last column for the positions outside words
    flat = (rows[:, None] * (max_len + 1) + word).ravel()
    lengths = np.bincount(flat, minlength=n * (max_len + 1)).reshape(n, max_len + 1)
    keys = rng.random((n, max_len))
    keys[np.arange(max_len) >= num_words[:, None]] = 2.0
    order = np.argsort(keys, axis=1)  # the words of each example in random order
    taken = np.zeros((n, max_len + 1), dtype=bool)
    filled = np.zeros(n, dtype=np.int64)
    # a word is taken when its pieces still fit in the budget; words that do not are skipped
    # and later (shorter) ones may still fit: one vectorized step per rank, not per example
    for rank in range(int(num_words.max(initial=0))):
        w = order[:, rank]
        fits = (rank < num_words) & (filled + lengths[rows, w] <= num_preds)
        taken[rows[fits], w[fits]] = True
        filled += np.where(fits, lengths[rows, w], 0)
        if np.all(filled >= num_preds):
            break
    chosen = np.take_along_axis(taken, word, axis=1)  # column max_len is never taken
    cols = np.arange(max_len)
    positions = np.sort(np.where(chosen, cols, max_len), axis=1)[:, :k]
    used = positions < max_len
    positions[~used] = 0
    labels = np.take_along_axis(tokens, positions, axis=1)
    labels[~used] = 0

    # 80/10/10 once per word: every piece of a word gets its word's choice
    draw, keep = rng.random((n, max_len)), rng.random((n, max_len))
    words_at = np.minimum(np.take_along_axis(word, positions, axis=1), max_len - 1)
    draw, keep = (np.take_along_axis(x, words_at, axis=1) for x in (draw, keep))
    random_tokens = rng.integers(0, vocab_size, (n, k))
    replacement = np.where(draw < 0.8, mask_id, np.where(keep < 0.5, labels, random_tokens))
    masked = tokens.copy()
    slot_rows = np.broadcast_to(rows[:, None], (n, k))
    masked[slot_rows[used], positions[used]] = replacement[used]
    return (masked, positions.astype(np.int32), used.astype(np.float32),
            labels.astype(np.int32))


def build_examples(corpus: EncodedCorpus, vocab: Vocab, max_len: int, seed: int, *,
                   whole_word_mask: bool = False) -> PretrainingExamples:
    """All pretraining examples of a corpus, with statically drawn masks (of whole words with
    ``whole_word_mask`` and a subword vocabulary)."""
    if max_len < 4:
        raise DataError(f"max_len must be at least 4 (<cls> a <sep> b <sep>), got {max_len}")
    ids = vocab.special_ids
    nsp_rng = np.random.default_rng([seed, 0])
    tokens, segments, valid_lens, nsp_labels = build_nsp_pairs(
        corpus, max_len, nsp_rng, pad_id=ids["<pad>"], cls_id=ids["<cls>"], sep_id=ids["<sep>"])
    if len(tokens) == 0:
        longest = int(np.max(corpus.sentence_lens)) if len(corpus.sentence_lens) else 0
        raise DataError(f"no sentence pair fits in max_len={max_len} (pairs need their two "
                        f"sentences plus 3 special tokens; the longest sentence has {longest} "
                        "tokens); raise max_len")
    masked, positions, weights, labels = mask_tokens(
        tokens, segments, valid_lens, vocab_size=len(vocab), mask_id=ids["<mask>"],
        rng=np.random.default_rng([seed, 1]),
        continuation=continuation_mask(vocab) if whole_word_mask else None)
    return PretrainingExamples(tokens, segments, valid_lens, nsp_labels,
                               masked, positions, weights, labels)


def continuation_mask(vocab: Vocab) -> np.ndarray | None:
    """What whole-word masking groups by: True for the ids that continue a word (the ``##``
    pieces of a subword vocabulary); None for a word-level vocabulary, where every token is a
    whole word and whole-word masking is ordinary masking."""
    if vocab.tokenizer is None:
        return None
    return vocab.tokenizer.continuation_mask()
