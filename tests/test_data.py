"""The data pipeline on the real WikiText-2 validation split: vocabulary, NSP pairs, MLM masks,
padding, batching, the cache, the vocabulary file and the errors for bad input.

The reference is the book's own code (d2l 0.17.6) where its behaviour is deterministic (the
vocabulary), and its documented statistics where it draws at random (example count, rates).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bertlite.data import (
    SPECIAL_TOKENS,
    Batch,
    BatchIterator,
    PretrainingExamples,
    Vocab,
    load_data_wiki,
    prepare_data,
    read_wiki,
    resolve_corpus_file,
)
from bertlite.data import cache as data_cache
from bertlite.data import loader as data_loader
from bertlite.data.corpus import read_corpus, tokenize_corpus
from bertlite.data.examples import mask_tokens
from bertlite.errors import DataError

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 64
MAX_PREDS = round(0.15 * MAX_LEN)  # the book's max_num_mlm_preds: 10
#: The book's _WikiTextDataset(paragraphs, 64) on the validation split (its random NSP draws).
BOOK_NUM_EXAMPLES = 4615
BOOK_VOCAB_SIZE = 4271
FIELDS = ("tokens", "segments", "valid_lens", "pred_positions", "mlm_weights", "mlm_labels",
          "nsp_labels")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def valid_file(wikitext_dir) -> Path:
    return wikitext_dir / "wiki.valid.tokens"


@pytest.fixture(scope="module")
def prepared(valid_file) -> tuple[PretrainingExamples, Vocab]:
    return prepare_data(valid_file, MAX_LEN, seed=0, cache=False)


@pytest.fixture(scope="module")
def examples(prepared) -> PretrainingExamples:
    return prepared[0]


@pytest.fixture(scope="module")
def vocab(prepared) -> Vocab:
    return prepared[1]


@pytest.fixture(scope="module")
def ids(vocab) -> dict[str, int]:
    return {t: vocab[t] for t in ("<unk>", *SPECIAL_TOKENS)}


@pytest.fixture(scope="module")
def d2l():
    """The book's code, d2l 0.17.6: its data pipeline is the same in both tabs, so whichever
    framework is installed will do."""
    from conftest import framework_installed, import_d2l

    for framework in ("torch", "mxnet"):
        if framework_installed(framework):
            return import_d2l(framework)
    pytest.skip("the book's code (d2l) needs torch or mxnet; neither is installed")


def book_read_wiki(d2l, folder: Path) -> list[list[str]]:
    state = random.getstate()
    try:
        random.seed(0)  # _read_wiki shuffles the paragraphs with the global generator
        return d2l._read_wiki(str(folder))
    finally:
        random.setstate(state)


@pytest.fixture(scope="module")
def book_vocab(d2l, wikitext_train_dir):
    """The book's vocabulary: d2l's _read_wiki on a folder whose wiki.train.tokens is the
    validation split, d2l.tokenize, d2l.Vocab(min_freq=5, the four reserved tokens)."""
    paragraphs = book_read_wiki(d2l, wikitext_train_dir)
    paragraphs = [d2l.tokenize(p, token="word") for p in paragraphs]
    sentences = [s for p in paragraphs for s in p]
    book = d2l.Vocab(sentences, min_freq=5, reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])
    return book, paragraphs


def tagged(examples: PretrainingExamples) -> PretrainingExamples:
    """The examples with ``nsp_labels`` replaced by the row index, so that batches tell which
    examples they hold (the iterator passes that field through unchanged)."""
    return dataclasses.replace(examples, nsp_labels=np.arange(len(examples), dtype=np.int32))


def assert_same_arrays(a: PretrainingExamples, b: PretrainingExamples) -> None:
    for name, array in a.arrays().items():
        other = getattr(b, name)
        assert array.dtype == other.dtype, name
        np.testing.assert_array_equal(array, other, err_msg=name)


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_matches_the_books(vocab, book_vocab, valid_file):
    book, book_paragraphs = book_vocab
    assert len(vocab) == len(book) == BOOK_VOCAB_SIZE
    assert set(vocab.idx_to_token) == set(book.idx_to_token)
    # same counts, and the same frequency at every index (orders may differ only among ties)
    assert dict(vocab.token_freqs) == dict(book.token_freqs)
    freq = dict(book.token_freqs)
    assert ([freq.get(t) for t in vocab.idx_to_token[5:]]
            == [freq.get(t) for t in book.idx_to_token[5:]])
    # the same paragraphs as the book's reader, before its shuffle
    ours = read_wiki(valid_file)
    assert sorted(map(tuple, (tuple(s.split()) for p in ours for s in p))) == sorted(
        map(tuple, (tuple(s) for p in book_paragraphs for s in p)))
    assert len(ours) == len(book_paragraphs)


def test_lines_and_sentences_split_as_in_the_book(d2l, tmp_path):
    """Lines end at \\n, \\r\\n, \\r only (the book's readlines), not at the other breaks
    str.splitlines() knows; sentences split at ' . ', lowercased, ends stripped."""
    text = ("A b . C d \x0c e . f \n g . h\u2028i . J\r\n k \x85 l . m . \n x .  . y \n"
            " = Heading = \n one sentence .\n \n a . \r two . Lines . \x1c\x1d\x1e\u2029 . z\n"
            "last . line without newline")
    (tmp_path / "wiki.train.tokens").write_text(text, encoding="utf-8", newline="")
    ours = read_wiki(tmp_path / "wiki.train.tokens")
    assert sorted(ours) == sorted(book_read_wiki(d2l, tmp_path))
    assert ["k \x85 l", "m ."] in ours


@pytest.mark.parametrize("text", [
    # ASCII whitespace only: the bytes path
    "A b . C d \x0c e . f \n g . h . I\r\n k\tl . m . \n x .  . y \n = Heading = \n"
    " one . \r two . Lines . \x0b . z\n . lead . . dots . \nlast . line . without newline",
    # non-ASCII letters whose lowercase differs, or depends on context (final sigma), or is
    # longer (dotted I); unknown-case symbols
    "\u039f\u0394\u039f\u03a3 . \u0130stanbul \u00c9T\u00c9 . \u00c5ngstr\u00f6m "
    "Stra\u00dfe \u2160 . \u03a3\u03a3 \u03c3\u03a3 .\nCaf\u00e9 . caf\u00e9 . CAF\u00c9 .",
    # whitespace that only str knows: the str path
    "a\u00a0b . c\u2003d . \u3000e .\n\x1cf . g\x85h . i\u2028j . k",
], ids=["ascii-spaces", "unicode-case", "unicode-spaces"])
def test_read_corpus_equals_tokenizing_read_wiki(tmp_path, text):
    path = tmp_path / "wiki.train.tokens"
    path.write_text(text, encoding="utf-8", newline="")
    fast, slow = read_corpus(path), tokenize_corpus(read_wiki(path))
    assert fast.words == slow.words
    assert fast.words.count("\x00") == sum(len(p) for p in read_wiki(path))
    assert fast.paragraph_sizes.tolist() == slow.paragraph_sizes.tolist()
    assert fast.word_counts() == slow.word_counts()
    assert sorted(fast.types) == sorted(slow.types)  # each distinct word once


def test_read_corpus_of_the_real_split(valid_file):
    fast, slow = read_corpus(valid_file), tokenize_corpus(read_wiki(valid_file))
    assert fast.words == slow.words and len(fast.codes) > 200_000
    assert fast.paragraph_sizes.tolist() == slow.paragraph_sizes.tolist()
    assert fast.word_counts() == Counter(
        w for p in read_wiki(valid_file) for s in p for w in s.split())


def test_vocabulary_layout(vocab):
    assert vocab.idx_to_token[:5] == ["<unk>", "<pad>", "<mask>", "<cls>", "<sep>"]
    assert vocab["<unk>"] == 0 and vocab.unk == 0
    assert [vocab[t] for t in SPECIAL_TOKENS] == [1, 2, 3, 4]
    freq = dict(vocab.token_freqs)
    counts = [freq[t] for t in vocab.idx_to_token[5:]]
    assert all(a >= b for a, b in itertools.pairwise(counts)), "not ordered by frequency"
    assert min(counts) >= 5
    # every token seen at least 5 times is in; none seen fewer
    # (WikiText has literal <unk> tokens: they count for <unk>, which stays at index 0)
    assert ({t for t, c in freq.items() if c >= 5} - {"<unk>", *SPECIAL_TOKENS}
            == set(vocab.idx_to_token[5:]))


def test_vocab_lookups_and_file_round_trip(vocab, tmp_path):
    the = vocab["the"]
    assert the > 4 and vocab.idx_to_token[the] == "the" and vocab.token_to_idx["the"] == the
    assert vocab[["the", "never-seen-token", "<mask>"]] == [the, 0, 2]
    assert vocab[("the",)] == [the]
    assert vocab["never-seen-token"] == 0 and "never-seen-token" not in vocab
    assert vocab.to_tokens(the) == "the"
    assert vocab.to_tokens(np.int64(the)) == "the"
    assert vocab.to_tokens([0, 1, the]) == ["<unk>", "<pad>", "the"]
    assert len(vocab) == len(vocab.idx_to_token) == len(vocab.token_to_idx)
    assert all(vocab.token_to_idx[t] == i for i, t in enumerate(vocab.idx_to_token))

    path = tmp_path / "vocab.txt"
    vocab.save(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[:5] == ["<unk>", "<pad>", "<mask>", "<cls>", "<sep>"] and lines[-1] == ""
    assert len(lines) == len(vocab) + 1
    loaded = Vocab.load(path)
    assert loaded == vocab
    assert loaded.idx_to_token == vocab.idx_to_token
    assert loaded.token_to_idx == vocab.token_to_idx
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.txt"]  # no temp file left
    with pytest.raises(DataError, match="does not exist"):
        Vocab.load(tmp_path / "missing.txt")


def test_small_vocab_semantics():
    v = Vocab([["b", "a", "b"], ["c", "b", "a"]], min_freq=2, reserved_tokens=["<pad>"])
    assert v.idx_to_token == ["<unk>", "<pad>", "b", "a"]  # c (once) is below min_freq
    assert v["c"] == 0 and len(v) == 4
    flat = Vocab(["x", "y", "x"])
    assert flat.idx_to_token == ["<unk>", "x", "y"]
    with pytest.raises(DataError):
        Vocab.from_tokens(["a", "<unk>"])
    with pytest.raises(DataError):
        Vocab.from_tokens(["<unk>", "a", "a"])


# ----------------------------------------------------------------------------- examples


def test_nsp_labels_are_balanced_and_positives_are_consecutive(examples, vocab, ids,
                                                               valid_file):
    assert abs(examples.nsp_labels.mean() - 0.5) <= 0.03
    assert set(np.unique(examples.nsp_labels)) == {0, 1}
    # every positive pair is (sentence, next sentence of the same paragraph) in the corpus
    consecutive = set()
    for paragraph in read_wiki(valid_file):
        sentences = [tuple(vocab[s.split()]) for s in paragraph]
        consecutive.update(zip(sentences, sentences[1:]))
    for row, valid, label in zip(examples.tokens, examples.valid_lens.astype(int),
                                 examples.nsp_labels):
        seps = np.flatnonzero(row[:valid] == ids["<sep>"])
        a, b = tuple(row[1:seps[0]]), tuple(row[seps[0] + 1:valid - 1])
        if label == 1:
            assert (a, b) in consecutive


def test_padding_segments_and_special_tokens(examples, ids):
    n, max_len = examples.tokens.shape
    assert max_len == MAX_LEN and examples.masked_tokens.shape == (n, max_len)
    valid = examples.valid_lens.astype(np.int64)
    assert np.array_equal(valid, examples.valid_lens)  # whole numbers
    assert valid.min() >= 5 and valid.max() <= MAX_LEN
    cols = np.arange(max_len)
    beyond = cols >= valid[:, None]
    tokens, segments = examples.tokens, examples.segments
    assert np.all(tokens[beyond] == ids["<pad>"])
    assert np.all(examples.masked_tokens[beyond] == ids["<pad>"])
    assert np.all(segments[beyond] == 0)
    assert not np.any(tokens[~beyond] == ids["<pad>"])
    assert np.all(tokens[:, 0] == ids["<cls>"])
    assert np.all((tokens == ids["<cls>"]).sum(axis=1) == 1)
    assert np.all((tokens == ids["<sep>"]).sum(axis=1) == 2)
    assert np.all(tokens[np.arange(n), valid - 1] == ids["<sep>"])
    assert not np.any(tokens == ids["<mask>"])  # the unmasked input has no <mask>
    first_sep = np.argmax(tokens == ids["<sep>"], axis=1)
    assert np.all(first_sep >= 2) and np.all(first_sep <= valid - 3)  # A and B not empty
    in_b = (cols > first_sep[:, None]) & (cols < valid[:, None])  # B and its <sep>
    assert np.array_equal(segments == 1, in_b)
    assert set(np.unique(segments)) == {0, 1}


def test_masking_rates_and_positions(examples, vocab, ids):
    n = len(examples)
    weights, positions = examples.mlm_weights, examples.pred_positions
    assert weights.shape == positions.shape == examples.mlm_labels.shape == (n, MAX_PREDS)
    used = weights == 1
    assert np.all((weights == 0) | used)
    # used slots first, then unused ones (position 0, label 0)
    assert np.all(used[:, :-1] >= used[:, 1:])
    assert np.all(positions[~used] == 0) and np.all(examples.mlm_labels[~used] == 0)
    # the book's count per example: max(1, round(0.15 * valid_len))
    valid = examples.valid_lens.astype(int)
    expected = [max(1, round(len_ * 0.15)) for len_ in valid]
    assert used.sum(axis=1).tolist() == expected
    assert abs(weights.sum() / examples.valid_lens.sum() - 0.15) < 0.005
    # sorted, distinct, inside the sequence, never <cls>, <sep> or padding
    for row_pos, row_used in zip(positions, used):
        p = row_pos[row_used]
        assert np.all(np.diff(p) > 0)
    rows = np.broadcast_to(np.arange(n)[:, None], positions.shape)
    at = examples.tokens[rows[used], positions[used]]
    assert np.all(positions[used] >= 1) and np.all(positions[used] < np.repeat(valid, MAX_PREDS)
                                                       .reshape(n, MAX_PREDS)[used] - 1)
    assert not np.isin(at, [ids["<cls>"], ids["<sep>"], ids["<pad>"]]).any()
    assert np.array_equal(examples.mlm_labels[used], at)

    # 80% <mask>, 10% a random token, 10% unchanged (within 2 points)
    masked_at = examples.masked_tokens[rows[used], positions[used]]
    is_mask = masked_at == ids["<mask>"]
    unchanged = ~is_mask & (masked_at == at)
    replaced = ~is_mask & ~unchanged
    total = used.sum()
    # a random token equals the original ~1/|V| of the time, and counts as unchanged then
    chance = 0.1 / len(vocab)
    assert abs(is_mask.sum() / total - 0.8) < 0.02
    assert abs(unchanged.sum() / total - (0.1 + chance)) < 0.02
    assert abs(replaced.sum() / total - (0.1 - chance)) < 0.02
    assert masked_at[replaced].max() < len(vocab) and masked_at[replaced].min() >= 0
    # random replacements spread over the vocabulary, not a few ids
    assert len(np.unique(masked_at[replaced])) > 0.5 * replaced.sum()

    # outside the prediction positions the masked input is the input
    outside = np.ones_like(examples.tokens, dtype=bool)
    outside[rows[used], positions[used]] = False
    assert np.array_equal(examples.masked_tokens[outside], examples.tokens[outside])


def test_mlm_positions_are_a_uniform_draw_among_the_candidates():
    """Every candidate position is predicted equally often, whatever its place in the row,
    and the draws of two rows are independent (a uniform subset of the candidates)."""
    rows, max_len, valid = 20_000, 64, 40
    tokens = np.full((rows, max_len), 7, dtype=np.int32)
    segments = np.zeros((rows, max_len), dtype=np.int32)
    segments[:, 21:valid] = 1  # A: 1-19, <sep> at 20, B: 21-38, <sep> at 39
    valid_lens = np.full(rows, valid, dtype=np.float32)
    _, positions, weights, _ = mask_tokens(tokens, segments, valid_lens, vocab_size=100,
                                           mask_id=2, rng=np.random.default_rng(5))
    assert np.all(weights.sum(axis=1) == 6)  # round(0.15 * 40)
    chosen = np.zeros((rows, max_len))
    np.put_along_axis(chosen, positions[:, :6].astype(np.int64), 1.0, axis=1)
    candidates = [c for c in range(1, valid - 1) if c != 20]
    rate = chosen[:, candidates].mean(axis=0)
    expected = 6 / len(candidates)
    assert np.abs(rate - expected).max() < 5 * np.sqrt(expected * (1 - expected) / rows)
    assert chosen[:, [0, 20, valid - 1, valid]].sum() == 0
    # pairs: two given candidates together as often as a uniform 6-subset would have them
    both = (chosen[:, 1] * chosen[:, 38]).mean()
    pair = 6 * 5 / (len(candidates) * (len(candidates) - 1))
    assert abs(both - pair) < 5 * np.sqrt(pair / rows)


def test_example_count_is_close_to_the_books(examples):
    assert abs(len(examples) - BOOK_NUM_EXAMPLES) <= 0.02 * BOOK_NUM_EXAMPLES


def test_dtypes_and_batch_fields(examples, vocab):
    assert Batch._fields == FIELDS
    for name in ("tokens", "segments", "masked_tokens", "pred_positions", "mlm_labels",
                 "nsp_labels"):
        assert getattr(examples, name).dtype == np.int32, name
    for name in ("valid_lens", "mlm_weights"):
        assert getattr(examples, name).dtype == np.float32, name
    batches = BatchIterator(examples, 8, seed=0)
    batch = next(iter(batches))
    assert isinstance(batch, Batch)
    expected = {"tokens": (np.int32, (8, MAX_LEN)), "segments": (np.int32, (8, MAX_LEN)),
                "valid_lens": (np.float32, (8,)), "pred_positions": (np.int32, (8, MAX_PREDS)),
                "mlm_weights": (np.float32, (8, MAX_PREDS)),
                "mlm_labels": (np.int32, (8, MAX_PREDS)), "nsp_labels": (np.int32, (8,))}
    for name, (dtype, shape) in expected.items():
        array = getattr(batch, name)
        assert array.dtype == dtype and array.shape == shape, name
    # the batch's tokens are the masked input
    assert np.any(batch.tokens == vocab["<mask>"])


def test_same_seed_same_output_other_seed_other_output(valid_file, prepared):
    again = prepare_data(valid_file, MAX_LEN, seed=0, cache=False)
    assert_same_arrays(prepared[0], again[0])
    assert again[1] == prepared[1]
    other, other_vocab = prepare_data(valid_file, MAX_LEN, seed=1, cache=False)
    assert other_vocab == prepared[1]  # the vocabulary does not depend on the seed
    differs = (len(other) != len(prepared[0])
               or not np.array_equal(other.tokens, prepared[0].tokens))
    assert differs
    assert not np.array_equal(other.nsp_labels[:1000], prepared[0].nsp_labels[:1000])


# ----------------------------------------------------------------------------- batches


def test_each_pass_is_a_permutation_and_passes_differ(examples):
    data = tagged(examples)
    n, batch_size = len(data), 512
    batches = BatchIterator(data, batch_size, seed=7)
    assert len(batches) == -(-n // batch_size) and batches.num_examples == n
    orders = []
    for _ in range(3):
        seen = []
        sizes = []
        for batch in batches:
            idx = batch.nsp_labels
            seen.append(idx)
            sizes.append(len(idx))
            # every field of the batch comes from the same examples
            np.testing.assert_array_equal(batch.tokens, data.masked_tokens[idx])
            np.testing.assert_array_equal(batch.segments, data.segments[idx])
            np.testing.assert_array_equal(batch.valid_lens, data.valid_lens[idx])
            np.testing.assert_array_equal(batch.pred_positions, data.pred_positions[idx])
            np.testing.assert_array_equal(batch.mlm_weights, data.mlm_weights[idx])
            np.testing.assert_array_equal(batch.mlm_labels, data.mlm_labels[idx])
        order = np.concatenate(seen)
        assert np.array_equal(np.sort(order), np.arange(n))  # each example exactly once
        assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size
                                                            else [])
        assert not np.array_equal(order, np.arange(n))  # shuffled
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    # the same seed gives the same passes; another seed others
    again = BatchIterator(data, batch_size, seed=7)
    assert np.array_equal(np.concatenate([b.nsp_labels for b in again]), orders[0])
    other = BatchIterator(data, batch_size, seed=8)
    assert not np.array_equal(np.concatenate([b.nsp_labels for b in other]), orders[0])


def test_len_partial_last_batch_and_drop_last(examples):
    n = len(examples)
    batch_size = 1000
    assert n % batch_size, "the test needs a partial last batch"
    keep = BatchIterator(examples, batch_size, seed=0)
    drop = BatchIterator(examples, batch_size, seed=0, drop_last=True)
    assert len(keep) == n // batch_size + 1 and len(drop) == n // batch_size
    sizes = [len(b.nsp_labels) for b in keep]
    assert sizes[-1] == n % batch_size and sum(sizes) == n and len(sizes) == len(keep)
    assert [len(b.nsp_labels) for b in drop] == [batch_size] * (n // batch_size)
    unshuffled = BatchIterator(tagged(examples), batch_size, shuffle=False)
    order = np.concatenate([b.nsp_labels for b in unshuffled])
    assert np.array_equal(order, np.arange(n))


def test_stream_resumes_at_an_exact_position(examples):
    data = tagged(examples)
    batches = BatchIterator(data, 512, seed=3)
    per_pass = len(batches)
    first, second = list(batches), list(batches)  # passes 0 and 1
    resumed = list(itertools.islice(batches.stream(1, 4), per_pass - 4 + 2))
    assert [(e, i) for e, i, _ in resumed] == (
        [(1, i) for i in range(4, per_pass)] + [(2, 0), (2, 1)])
    for (_, _, batch), expected in zip(resumed, second[4:]):
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(batch, name), getattr(expected, name))
    third = list(batches)  # pass 2
    np.testing.assert_array_equal(resumed[-2][2].nsp_labels, third[0].nsp_labels)
    np.testing.assert_array_equal(resumed[-1][2].nsp_labels, third[1].nsp_labels)
    # a fresh iterator (a resumed run) gives the same stream from the start
    start = list(itertools.islice(BatchIterator(data, 512, seed=3).stream(), per_pass))
    for (_, _, batch), expected in zip(start, first):
        np.testing.assert_array_equal(batch.nsp_labels, expected.nsp_labels)


def by_example(batches_of_a_pass) -> dict[str, np.ndarray]:
    """The MLM fields of a pass, ordered by the example index in nsp_labels."""
    batches = list(batches_of_a_pass)
    idx = np.concatenate([b.nsp_labels for b in batches])
    order = np.argsort(idx)
    return {name: np.concatenate([getattr(b, name) for b in batches])[order]
            for name in ("tokens", "pred_positions", "mlm_weights", "mlm_labels")}


def test_dynamic_masking_redraws_each_pass_static_keeps(examples, vocab, ids):
    data = tagged(examples)
    static = BatchIterator(data, 512, seed=0, masking="static")
    s0, s1 = by_example(static), by_example(static)
    for name in s0:
        np.testing.assert_array_equal(s0[name], s1[name])
    np.testing.assert_array_equal(s0["tokens"], data.masked_tokens)

    dynamic = BatchIterator(data, 512, seed=0, masking="dynamic", vocab_size=len(vocab),
                            mask_id=ids["<mask>"])
    d0, d1 = by_example(dynamic), by_example(dynamic)
    changed = np.any(d0["pred_positions"] != d1["pred_positions"], axis=1).mean()
    assert changed > 0.9
    assert not np.array_equal(d0["tokens"], d1["tokens"])
    # same pass, same masks: a resumed run sees what the first run saw
    again = BatchIterator(data, 512, seed=0, masking="dynamic", vocab_size=len(vocab),
                          mask_id=ids["<mask>"])
    np.testing.assert_array_equal(by_example(again)["pred_positions"], d0["pred_positions"])
    # the redrawn masks follow the same rules
    for drawn in (d0, d1):
        used = drawn["mlm_weights"] == 1
        np.testing.assert_array_equal(used, s0["mlm_weights"] == 1)  # same counts per example
        rows = np.broadcast_to(np.arange(len(data))[:, None], used.shape)
        at = data.tokens[rows[used], drawn["pred_positions"][used]]
        np.testing.assert_array_equal(drawn["mlm_labels"][used], at)
        assert not np.isin(at, [ids["<cls>"], ids["<sep>"], ids["<pad>"]]).any()
        masked_at = drawn["tokens"][rows[used], drawn["pred_positions"][used]]
        assert abs((masked_at == ids["<mask>"]).mean() - 0.8) < 0.02
    with pytest.raises(DataError, match="masking"):
        BatchIterator(data, 8, masking="sometimes")


# ----------------------------------------------------------------------------- the cache


def npz_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npz"))


def all_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def forbid_reading(monkeypatch) -> None:
    def fail(path, *args):
        raise AssertionError(f"read_corpus({path}) called: the cache was not used")

    monkeypatch.setattr(data_loader, "read_corpus", fail)


def test_cache_hit_returns_identical_data(valid_file, prepared, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    first, vocab = prepare_data(valid_file, MAX_LEN, seed=0, cache_dir=cache_dir)
    assert_same_arrays(first, prepared[0])
    files = npz_files(cache_dir)
    assert len(files) == 1 and all_files(cache_dir) == [files[0].name]  # no temp files
    forbid_reading(monkeypatch)
    second, vocab2 = prepare_data(valid_file, MAX_LEN, seed=0, cache_dir=cache_dir)
    assert_same_arrays(second, first)
    assert vocab2 == vocab and vocab2.token_to_idx == vocab.token_to_idx
    assert npz_files(cache_dir) == files


def test_cache_uses_the_env_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTLITE_CACHE", str(tmp_path / "envcache"))
    path = resolve_corpus_file("sample", "valid")
    prepare_data(path, 32)
    assert len(npz_files(tmp_path / "envcache")) == 1
    forbid_reading(monkeypatch)
    prepare_data(path, 32)


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """A copy of the sample corpus's held-out split (fast to prepare), in a folder of its own."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    path = folder / "wiki.train.tokens"
    path.write_bytes(resolve_corpus_file("sample", "valid").read_bytes())
    return path


@pytest.mark.parametrize("change", [{"max_len": 48}, {"seed": 1}, {"min_freq": 2}])
def test_a_changed_setting_is_a_new_key(small_corpus, tmp_path, monkeypatch, change):
    cache_dir = tmp_path / "cache"
    settings = {"max_len": 32, "seed": 0, "min_freq": 5}
    base, base_vocab = prepare_data(small_corpus, cache_dir=cache_dir, **settings)
    assert len(npz_files(cache_dir)) == 1
    calls = []
    monkeypatch.setattr(data_loader, "read_corpus", lambda p, *a: calls.append(p) or
                        read_corpus(p, *a))
    changed, changed_vocab = prepare_data(small_corpus, cache_dir=cache_dir,
                                          **{**settings, **change})
    assert calls == [small_corpus]  # built, not loaded
    assert len(npz_files(cache_dir)) == 2
    fresh = prepare_data(small_corpus, cache=False, **{**settings, **change})
    assert_same_arrays(changed, fresh[0])
    if "min_freq" in change:
        assert len(changed_vocab) > len(base_vocab)
    else:
        assert not (changed.tokens.shape == base.tokens.shape
                    and np.array_equal(changed.tokens, base.tokens))


def test_changed_file_content_is_a_new_key(small_corpus, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    before, _ = prepare_data(small_corpus, 32, cache_dir=cache_dir)
    text = small_corpus.read_text(encoding="utf-8")
    small_corpus.write_text(text + " a new paragraph . with two sentences . \n", encoding="utf-8")
    after, _ = prepare_data(small_corpus, 32, cache_dir=cache_dir)
    assert len(npz_files(cache_dir)) == 2
    assert len(after) != len(before) or not np.array_equal(after.tokens, before.tokens)
    # the key is the content, not the path or the mtime: a copy of the original text elsewhere
    # (same file name) is a hit on the first entry
    copy = tmp_path / "elsewhere" / "wiki.train.tokens"
    copy.parent.mkdir()
    copy.write_text(text, encoding="utf-8")
    forbid_reading(monkeypatch)
    again, _ = prepare_data(copy, 32, cache_dir=cache_dir)
    assert_same_arrays(again, before)


def test_cache_key_covers_every_setting():
    base = data_cache.cache_key("digest", max_len=64, seed=0, min_freq=5, vocab=None)
    assert base == data_cache.cache_key("digest", seed=0, max_len=64, vocab=None, min_freq=5)
    for other in (data_cache.cache_key("digest2", max_len=64, seed=0, min_freq=5, vocab=None),
                  data_cache.cache_key("digest", max_len=65, seed=0, min_freq=5, vocab=None),
                  data_cache.cache_key("digest", max_len=64, seed=1, min_freq=5, vocab=None),
                  data_cache.cache_key("digest", max_len=64, seed=0, min_freq=4, vocab=None),
                  data_cache.cache_key("digest", max_len=64, seed=0, min_freq=5, vocab="v")):
        assert other != base


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong-arrays"])
def test_a_damaged_cache_file_is_rebuilt(small_corpus, tmp_path, monkeypatch, damage):
    cache_dir = tmp_path / "cache"
    good, vocab = prepare_data(small_corpus, 32, cache_dir=cache_dir)
    (entry,) = npz_files(cache_dir)
    raw = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(raw[:len(raw) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00\xffnot a cache" * 100)
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a readable npz without the expected arrays
        with open(entry, "wb") as f:
            np.savez(f, vocab=np.asarray(["<unk>"]), tokens=np.zeros((2, 2), np.int32))
    calls = []
    monkeypatch.setattr(data_loader, "read_corpus", lambda p, *a: calls.append(p) or
                        read_corpus(p, *a))
    rebuilt, rebuilt_vocab = prepare_data(small_corpus, 32, cache_dir=cache_dir)
    assert calls == [small_corpus]
    assert_same_arrays(rebuilt, good)
    assert rebuilt_vocab == vocab
    # the entry was rewritten whole, and is trusted again
    assert data_cache.load_cached(entry) is not None
    assert all_files(cache_dir) == [entry.name]


def test_cache_write_is_atomic(small_corpus, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    real_savez = np.savez

    def failing_savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_cache.np, "savez", failing_savez)
    examples, vocab = prepare_data(small_corpus, 32, cache_dir=cache_dir)  # still prepared
    assert len(examples) > 0
    assert all_files(cache_dir) == []  # neither a partial entry nor a temp file
    monkeypatch.setattr(data_cache.np, "savez", real_savez)
    calls = []
    monkeypatch.setattr(data_loader, "read_corpus", lambda p, *a: calls.append(p) or
                        read_corpus(p, *a))
    again, _ = prepare_data(small_corpus, 32, cache_dir=cache_dir)
    assert calls == [small_corpus]  # nothing half-written was taken for a hit
    assert_same_arrays(again, examples)
    assert len(npz_files(cache_dir)) == 1 and len(all_files(cache_dir)) == 1


def test_interrupted_cache_write_leaves_nothing(small_corpus, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"

    def interrupted(file, *args, **kwargs):
        file.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cache.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(small_corpus, 32, cache_dir=cache_dir)
    assert all_files(cache_dir) == []


# ----------------------------------------------------------------------------- errors


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "not-utf8", "no-paragraph"])
def test_bad_corpus_files_raise_data_error_naming_the_file(tmp_path, case):
    path = {
        "missing": lambda: tmp_path / "wiki.train.tokens",
        "empty": lambda: write(tmp_path, "empty.tokens", b""),
        "binary": lambda: write(tmp_path, "binary.tokens",
                                b"\x7fELF\x02\x01\x01\x00\x00\x00 . garbage . \x00\x00\n" * 20),
        "not-utf8": lambda: write(tmp_path, "latin1.tokens",
                                  "caf\u00e9 au lait . cr\u00e8me br\u00fbl\u00e9e . \n"
                                  .encode("latin-1")),
        "no-paragraph": lambda: write(tmp_path, "flat.tokens",
                                      b" = Title = \n\n one sentence only .\n another line\n"),
    }[case]()
    with pytest.raises(DataError) as err:
        read_wiki(path)
    assert str(path) in str(err.value)
    with pytest.raises(DataError) as err:
        prepare_data(path, MAX_LEN, cache=False)
    assert str(path) in str(err.value)


def test_max_len_too_small_for_any_pair(valid_file):
    with pytest.raises(DataError, match=r"max_len=4"):
        prepare_data(valid_file, 4, cache=False)
    with pytest.raises(DataError, match="max_len"):
        prepare_data(valid_file, 3, cache=False)
    with pytest.raises(DataError, match="max_len"):
        load_data_wiki(8, 0, corpus="sample")


def test_batch_size_larger_than_the_data(examples, wikitext_train_dir):
    with pytest.raises(DataError, match=rf"{len(examples)} examples"):
        BatchIterator(examples, len(examples) + 1)
    for bad in (0, -1, 2.5):
        with pytest.raises(DataError, match="batch_size"):
            BatchIterator(examples, bad)
    with pytest.raises(DataError, match="batch_size"):
        load_data_wiki(100_000, MAX_LEN, data_dir=wikitext_train_dir)


# ----------------------------------------------------------------------------- corpora


def test_sample_corpus():
    path = resolve_corpus_file("sample")
    assert path.name == "wiki.train.tokens"
    words = path.read_text(encoding="utf-8").split()
    assert len(words) >= 25_000
    batches, vocab = load_data_wiki(32, MAX_LEN, corpus="sample", seed=0)
    assert 300 <= len(vocab) <= 3000
    assert vocab.idx_to_token[:5] == ["<unk>", *SPECIAL_TOKENS]
    assert batches.num_examples > 500
    batch = next(iter(batches))
    assert batch.tokens.shape == (32, MAX_LEN)
    held_out = resolve_corpus_file("sample", "valid")
    assert held_out.is_file() and held_out != path


def test_load_data_wiki_on_the_real_split(wikitext_train_dir, examples, vocab):
    batches, got_vocab = load_data_wiki(512, MAX_LEN, data_dir=wikitext_train_dir, seed=0)
    assert got_vocab == vocab
    assert batches.num_examples == len(examples)
    assert_same_arrays(batches.examples, examples)
    with pytest.raises(DataError, match="wiki.nope.tokens"):
        resolve_corpus_file("wikitext-2", "nope", data_dir=wikitext_train_dir)
    with pytest.raises(DataError, match="unknown corpus"):
        resolve_corpus_file("imagenet")


def test_counter_of_the_real_split_matches_the_vocab(valid_file, vocab):
    counts = Counter(w for p in read_wiki(valid_file) for s in p for w in s.split())
    assert dict(vocab.token_freqs) == dict(counts)
