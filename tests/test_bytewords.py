"""The numpy word coder behind read_corpus: the same words as bytes.split(), found by a hash
table that must never merge two words or split one, whatever the keys and table load."""

from __future__ import annotations

import numpy as np
import pytest

from bertlite.data import _bytewords
from bertlite.data._bytewords import _ODD_1, _ODD_2, code_lines, distinct_rows
from bertlite.data.corpus import read_corpus, read_wiki, tokenize_corpus
from bertlite.data.examples import encode_corpus
from bertlite.data.vocab import build_corpus_vocab, build_vocab


def _random_lines(rng: np.random.Generator, num_lines: int, vocabulary: list[bytes]) -> bytes:
    lines = []
    for _ in range(num_lines):
        picks = rng.integers(0, len(vocabulary), rng.integers(1, 30))
        lines.append(b" ".join(vocabulary[i] for i in picks))
    return b"\n".join(lines)


def _vocabulary(rng: np.random.Generator, size: int) -> list[bytes]:
    """Words of every length from 1 to 40 bytes, around the 8- and 16-byte key widths, with
    multi-byte UTF-8, case variants, prefixes of one another, and the boundary word NUL."""
    letters = "abcxyzABCé日ß.,@-"
    words = {"\x00", "a", "A", "é", "日本", "abcdefgh", "abcdefghi", "abcdefg", "Abcdefgh",
             "abcdefghijklmnop", "abcdefghijklmnopq", "abcdefghijklmno", "x" * 40, "x" * 39}
    while len(words) < size:
        length = int(rng.integers(1, 41))
        words.add("".join(rng.choice(list(letters), length)))
    return sorted(w.encode() for w in words)


@pytest.mark.parametrize("vocabulary_size", [20, 3000])
def test_code_lines_equals_bytes_split(vocabulary_size):
    rng = np.random.default_rng(vocabulary_size)
    text = _random_lines(rng, 400, _vocabulary(rng, vocabulary_size))
    coded = code_lines(text)
    assert coded is not None
    distinct, index, line_ends = coded
    expected = [line.split() for line in text.split(b"\n")]
    flat = [w for words in expected for w in words]
    assert [distinct[i] for i in index.tolist()] == flat
    assert len(set(distinct)) == len(distinct) == len(set(flat))  # each word once
    assert line_ends.tolist() == np.cumsum([len(words) for words in expected]).tolist()


@pytest.mark.parametrize("text", [b"a  b", b" a b", b"a b ", b"a\tb", b"a\rb", b"a\x0bb",
                                  b"a\x0cb", b"a\n\nb", b"a\n", b""])
def test_code_lines_leaves_other_spacing_to_bytes_split(text):
    assert code_lines(text) is None


def test_distinct_rows_under_heavy_load_and_growth():
    """Nearly all keys distinct (the table starts too small and grows), keys that differ in
    one bit, and two-column keys that agree in one column and differ in the other."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 30_000, dtype=np.uint64)
    one_bit = base[:500] ^ np.uint64(1)
    keys = np.concatenate([base, one_bit, base[::7]])  # repeats too
    rng.shuffle(keys)
    codes, (distinct,) = distinct_rows((keys,))
    assert np.array_equal(distinct[codes], keys)
    assert len(distinct) == len(np.unique(keys))

    second = rng.integers(0, 3, len(keys)).astype(np.uint64)
    first = keys % np.uint64(50)  # few values: many rows share the first column
    codes, (d1, d2) = distinct_rows((first, second))
    assert np.array_equal(d1[codes], first) and np.array_equal(d2[codes], second)
    assert len(d1) == len(np.unique(np.stack([first, second], axis=1), axis=0))


def _colliding(count: int, multiplier: np.uint64) -> np.ndarray:
    """Keys whose products with the hash multiplier differ only in the low bits: they all
    land in the same slot of any table."""
    step = pow(int(multiplier), -1, 2**64)
    return np.array([(12345 + j * step) % 2**64 for j in range(count)], dtype=np.uint64)


def test_distinct_rows_of_keys_in_one_slot():
    # rows that share the first column and collide in the second: a long probe chain
    second = np.repeat(_colliding(12, _ODD_2), 3)
    first = np.full(len(second), 7, dtype=np.uint64)
    codes, (d1, d2) = distinct_rows((first, second))
    assert len(d1) == 12 and np.array_equal(d2[codes], second) and np.all(d1 == 7)
    # thousands in one slot: no table helps; refused rather than probed for ever
    assert distinct_rows((_colliding(5000, _ODD_1),)) is None


def test_read_corpus_falls_back_where_the_table_refuses(tmp_path, monkeypatch):
    """Where the hash table gives up, read_corpus splits the words with bytes.split()."""
    path = tmp_path / "wiki.train.tokens"
    path.write_text(" A b . c D . e\n f . G h\n", encoding="utf-8")
    slow = tokenize_corpus(read_wiki(path))
    monkeypatch.setattr(_bytewords, "distinct_rows", lambda keys: None)
    fast = read_corpus(path)
    assert fast.words == slow.words
    assert fast.paragraph_sizes.tolist() == slow.paragraph_sizes.tolist()


@pytest.mark.parametrize("text", [
    "The Quick brown . fox jumps over . THE lazy dog .\n = Heading = \n"
    " Über straße . ÜBER Straße . 日本語のテキスト . \n"
    " antidisestablishmentarianism . Antidisestablishmentarianism . ab . cd\n",
    " a . . b . . . c . \n x . y\n",
], ids=["case-and-lengths", "dot-chains"])
def test_read_corpus_fast_path_equals_tokenizing_read_wiki(tmp_path, text):
    path = tmp_path / "wiki.train.tokens"
    path.write_text(text, encoding="utf-8", newline="")
    lines = [line.strip() for line in text.encode().split(b"\n") if b" . " in line]
    assert code_lines(b"\n".join(lines).replace(b" . ", b" \x00 ")) is not None  # the fast path
    fast, slow = read_corpus(path), tokenize_corpus(read_wiki(path))
    assert fast.words == slow.words
    assert fast.paragraph_sizes.tolist() == slow.paragraph_sizes.tolist()
    assert fast.word_counts() == slow.word_counts()


@pytest.mark.parametrize("min_freq", [1, 2, 5])
def test_corpus_vocab_equals_the_counted_one(tmp_path, min_freq):
    """Ties by text, reserved tokens written in the text (kept or rare), unknown words: the
    same vocabulary, counts and token ids as counting every word."""
    text = (" b a . c b a . <mask> <pad> <mask> d . a b c . \n"
            " <MASK> c . d e . b <unk> . a c . <mask> b . d d . e a\n")
    path = tmp_path / "wiki.train.tokens"
    path.write_text(text, encoding="utf-8")
    corpus = read_corpus(path)
    counted = build_vocab(corpus.word_counts(), min_freq=min_freq)
    vocab, type_ids = build_corpus_vocab(corpus, min_freq=min_freq)
    assert vocab.idx_to_token == counted.idx_to_token
    assert vocab.token_freqs == counted.token_freqs
    fast, slow = encode_corpus(corpus, vocab, type_ids), encode_corpus(corpus, counted)
    assert fast.token_ids.tolist() == slow.token_ids.tolist()
    assert vocab["<mask>"] in fast.token_ids.tolist()  # the text's <mask> is the token
