"""Pretraining examples as padded numpy arrays: NSP sentence pairs and MLM masks.

Same semantics as the book (d2l ``_get_nsp_data_from_paragraph`` ... ``_pad_bert_inputs``), but
built with whole-array numpy operations instead of a Python loop per token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

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


_BOUNDARY = "\x00"  # never a word of a corpus: read_text rejects NUL bytes


@dataclass
class TokenizedCorpus:
    """All words of all sentences in one list, each sentence followed by a boundary marker:
    one ``split()`` over one string instead of one per sentence (the same words)."""

    words: list[str]
    paragraph_sizes: np.ndarray  # (num paragraphs,) int64, sentences per paragraph

    def word_counts(self) -> Counter[str]:
        counts = Counter(self.words)
        del counts[_BOUNDARY]
        return counts


def tokenize_corpus(paragraphs: Sequence[Sequence[str]]) -> TokenizedCorpus:
    """Word tokens of paragraphs of sentence strings, as the book's ``sentence.split()``."""
    sentences = [s for p in paragraphs for s in p]
    words = f" {_BOUNDARY} ".join(sentences).split()
    words.append(_BOUNDARY)
    return TokenizedCorpus(words, np.asarray([len(p) for p in paragraphs], dtype=np.int64))


class _IndexOrUnk(dict):
    def __missing__(self, key: str) -> int:
        return 0


def encode_corpus(corpus: TokenizedCorpus, vocab: Vocab) -> EncodedCorpus:
    """Token ids of a tokenized corpus (unknown words are ``<unk>``, 0)."""
    lookup = _IndexOrUnk(vocab.token_to_idx)
    lookup[_BOUNDARY] = -1
    ids = np.fromiter(map(lookup.__getitem__, corpus.words), dtype=np.int32,
                      count=len(corpus.words))
    boundary = ids < 0
    ends = np.flatnonzero(boundary)
    lens = np.diff(ends, prepend=-1) - 1
    starts = ends - lens - np.arange(len(ends))  # offsets once the markers are dropped
    return EncodedCorpus(ids[~boundary], starts.astype(np.int64), lens.astype(np.int64),
                         corpus.paragraph_sizes)


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
                    pad_id: int, cls_id: int, sep_id: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sentence pairs for next sentence prediction, padded: ``tokens, segments, valid_lens,
    nsp_labels``. Each sentence but a paragraph's last is sentence A once; B is the next sentence
    with probability 1/2, else a random sentence of a random paragraph. Pairs longer than
    ``max_len`` (with ``<cls>`` and two ``<sep>``) are dropped."""
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

    len_a, len_b = corpus.sentence_lens[a_idx], corpus.sentence_lens[b_idx]
    keep = len_a + len_b + 3 <= max_len
    a_idx, b_idx, len_a, len_b, is_next = (x[keep] for x in (a_idx, b_idx, len_a, len_b, is_next))
    n = len(a_idx)
    valid = len_a + len_b + 3

    tokens = np.full((n, max_len), pad_id, dtype=np.int32)
    cols = np.arange(max_len)
    in_a = (cols >= 1) & (cols <= len_a[:, None])
    in_b = (cols >= len_a[:, None] + 2) & (cols < valid[:, None] - 1)
    rows_a, cols_a = np.nonzero(in_a)
    tokens[rows_a, cols_a] = corpus.token_ids[corpus.sentence_starts[a_idx][rows_a] + cols_a - 1]
    rows_b, cols_b = np.nonzero(in_b)
    tokens[rows_b, cols_b] = corpus.token_ids[
        corpus.sentence_starts[b_idx][rows_b] + cols_b - len_a[rows_b] - 2]
    rows = np.arange(n)
    tokens[:, 0] = cls_id
    tokens[rows, len_a + 1] = sep_id
    tokens[rows, valid - 1] = sep_id
    segments = ((cols >= len_a[:, None] + 2) & (cols < valid[:, None])).astype(np.int32)
    return tokens, segments, valid.astype(np.float32), is_next.astype(np.int32)


def mlm_candidates(segments: np.ndarray, valid_lens: np.ndarray) -> np.ndarray:
    """Positions that may be predicted: every valid token but ``<cls>`` and the ``<sep>``s."""
    cols = np.arange(segments.shape[1])
    valid = valid_lens.astype(np.int64)[:, None]
    in_seq = cols < valid
    first_sep = ((segments == 0) & in_seq).sum(axis=1, keepdims=True) - 1
    return (cols > 0) & (cols < valid - 1) & (cols != first_sep)


def mask_tokens(tokens: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray, *,
                vocab_size: int, mask_id: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw MLM predictions: ``masked_tokens, pred_positions, mlm_weights, mlm_labels``.

    ``max(1, round(0.15 * valid_len))`` positions per example (at most the candidates, at most
    ``round(0.15 * max_len)``), sorted; 80% become ``<mask>``, 10% a random token of the
    vocabulary, 10% stay unchanged.
    """
    n, max_len = tokens.shape
    k = max_num_mlm_preds(max_len)
    candidates = mlm_candidates(segments, valid_lens)
    num_preds = np.maximum(1, np.round(0.15 * valid_lens.astype(np.float64))).astype(np.int64)
    num_preds = np.minimum(num_preds, candidates.sum(axis=1))
    keys = rng.random((n, max_len))
    keys[~candidates] = 2.0
    chosen = np.argsort(keys, axis=1)[:, :k]
    used = np.arange(k) < num_preds[:, None]
    positions = np.where(used, chosen, max_len)
    positions.sort(axis=1)
    used = positions < max_len
    positions[~used] = 0
    labels = np.take_along_axis(tokens, positions, axis=1)
    labels[~used] = 0

    draw, keep = rng.random((n, k)), rng.random((n, k))
    random_tokens = rng.integers(0, vocab_size, (n, k))
    replacement = np.where(draw < 0.8, mask_id, np.where(keep < 0.5, labels, random_tokens))
    masked = tokens.copy()
    rows = np.broadcast_to(np.arange(n)[:, None], (n, k))
    masked[rows[used], positions[used]] = replacement[used]
    return (masked, positions.astype(np.int32), used.astype(np.float32),
            labels.astype(np.int32))


def build_examples(corpus: EncodedCorpus, vocab: Vocab, max_len: int, seed: int
                   ) -> PretrainingExamples:
    """All pretraining examples of a corpus, with statically drawn masks."""
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
        rng=np.random.default_rng([seed, 1]))
    return PretrainingExamples(tokens, segments, valid_lens, nsp_labels,
                               masked, positions, weights, labels)
