"""WordPiece tokenization (Hugging Face ``tokenizers``) on the real WikiText-2 validation split:
special tokens, round trip, determinism, masking rates with and without whole-word masking, the
cache key, checkpoints, and a short training run with it in every installed backend."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bertlite
from bertlite import checkpoint as ckpt
from bertlite.config import BERTConfig
from bertlite.data import (
    BatchIterator,
    WordPieceTokenizer,
    prepare_data,
    read_wiki,
    resolve_corpus_file,
)
from bertlite.data import loader as data_loader
from bertlite.data.examples import mlm_candidates, word_index
from bertlite.errors import CheckpointError, DataError
from bertlite.install import install_command
from bertlite.params import init_params

needs_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None,
    reason='the Hugging Face tokenizers library is not installed '
           '(pip install "bertlite[wordpiece]")')

MAX_LEN = 64
SPECIALS = ["<unk>", "<pad>", "<mask>", "<cls>", "<sep>"]
SMALL = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2, dropout=0.1,
             max_len=64)


@pytest.fixture(scope="module")
def valid_file(wikitext_dir) -> Path:
    return wikitext_dir / "wiki.valid.tokens"


@pytest.fixture(scope="module")
def wordpiece(valid_file):
    """Examples and vocabulary of the validation split with a trained WordPiece vocabulary."""
    if importlib.util.find_spec("tokenizers") is None:
        pytest.skip('the Hugging Face tokenizers library is not installed '
                    '(pip install "bertlite[wordpiece]")')
    return prepare_data(valid_file, MAX_LEN, seed=0, tokenizer="wordpiece",
                        wordpiece_vocab_size=6000, cache=False)


@pytest.fixture(scope="module")
def whole_words(valid_file, wordpiece):
    return prepare_data(valid_file, MAX_LEN, seed=0, tokenizer="wordpiece",
                        wordpiece_vocab_size=6000, whole_word_mask=True, cache=False)


@pytest.fixture(scope="module")
def tokenizer(wordpiece) -> WordPieceTokenizer:
    return wordpiece[1].tokenizer


def words_of(path: Path) -> list[str]:
    return [w for p in read_wiki(path) for s in p for w in s.split()]


# ----------------------------------------------------------------------------- the vocabulary


@needs_tokenizers
def test_special_tokens_have_the_word_vocabularys_ids(wordpiece, tokenizer, valid_file):
    _, vocab = wordpiece
    assert vocab.idx_to_token[:5] == SPECIALS
    assert vocab.special_ids == {t: i for i, t in enumerate(SPECIALS)}
    word_vocab = prepare_data(valid_file, MAX_LEN, cache=False)[1]
    assert word_vocab.tokenizer is None
    assert word_vocab.idx_to_token[:5] == SPECIALS  # the same ids as the book's vocabulary
    assert len(vocab) == len(tokenizer) <= 6000 and vocab.tokenizer is tokenizer
    assert tokenizer.to_vocab() == vocab
    # subword pieces exist, and "<mask>" inside a text is the mask token, not pieces
    assert sum(t.startswith("##") for t in vocab.idx_to_token) > 100
    assert tokenizer.encode("a <mask> is flying") == ["a", "<mask>", "is", "flying"]
    assert tokenizer.encode_ids(["<cls>", "<sep>", "<pad>", "<unk>"]) == [3, 4, 1, 0]


@needs_tokenizers
def test_round_trip_on_the_real_split(tokenizer, valid_file):
    words = words_of(valid_file)
    pieces = tokenizer.encode(words)
    assert len(pieces) > len(words)  # some words are cut into pieces
    # every character of the text is in the vocabulary: all of it is "in-vocabulary" text
    distinct = sorted(set(words))
    unknown = [w for w, ids in zip(distinct, tokenizer.encode_words(distinct))
               if 0 in ids and w != "<unk>"]
    assert unknown == []
    assert tokenizer.decode(pieces) == words
    assert tokenizer.decode(tokenizer.encode_ids(words)) == words
    rare = tokenizer.encode("unbelievably hydroelectric")
    assert any(p.startswith("##") for p in rare) and tokenizer.decode(rare) == \
        ["unbelievably", "hydroelectric"]
    # the examples hold the corpus's sentences, piece by piece: sentence A decodes to one
    examples, vocab = prepare_data(valid_file, MAX_LEN, tokenizer=tokenizer, cache=False)
    sentences = {" ".join(s.split()) for p in read_wiki(valid_file) for s in p}
    for row in examples.tokens[:200]:
        first_sep = int(np.argmax(row == vocab["<sep>"]))  # <cls> A <sep> B <sep>
        a = vocab.to_tokens(row[1:first_sep].tolist())
        assert " ".join(tokenizer.decode(a)) in sentences


@needs_tokenizers
def test_training_is_deterministic_across_processes(tokenizer, valid_file):
    """tokenizers' trainer alone gives other vocabularies in other processes
    (huggingface/tokenizers#1794); bertlite's training must not."""
    again = prepare_data(valid_file, MAX_LEN, tokenizer="wordpiece",
                         wordpiece_vocab_size=6000, cache=False)[1].tokenizer
    assert again == tokenizer
    code = ("import hashlib, sys; from bertlite.data import prepare_data; "
            "v = prepare_data(sys.argv[1], 64, tokenizer='wordpiece', "
            "wordpiece_vocab_size=6000, cache=False)[1]; "
            "print(hashlib.sha1('\\n'.join(v.idx_to_token).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code, str(valid_file)], check=True,
                              capture_output=True, text=True).stdout.strip() for _ in range(2)}
    import hashlib

    assert digests == {hashlib.sha1("\n".join(tokenizer.idx_to_token).encode()).hexdigest()}


@needs_tokenizers
def test_save_load_and_bad_files(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = WordPieceTokenizer.load(tmp_path / "tokenizer.json")
    assert loaded == tokenizer and loaded.encode("hydroelectric dam") == \
        tokenizer.encode("hydroelectric dam")
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["model"]["type"] == "WordPiece"
    assert data["model"]["continuing_subword_prefix"] == "##"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        WordPieceTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="does not exist"):
        WordPieceTokenizer.load(tmp_path / "nowhere.json")
    with pytest.raises(DataError, match="ids 0-4"):
        WordPieceTokenizer.from_vocab(["a", "<unk>", "<pad>", "<mask>", "<cls>", "<sep>"])
    with pytest.raises(DataError, match="vocab_size"):
        WordPieceTokenizer.train(["a b c"], vocab_size=3)


def test_missing_library_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers fails
    hint = re.escape(install_command("wordpiece"))  # fits how bertlite is installed
    with pytest.raises(ImportError, match=hint):
        WordPieceTokenizer.train(["a b c . d e f"])
    path = resolve_corpus_file("sample", "valid")
    with pytest.raises(ImportError, match=hint):
        prepare_data(path, 32, tokenizer="wordpiece", cache=False)
    with pytest.raises(DataError, match="tokenizer must be one of"):
        prepare_data(path, 32, tokenizer="bpe", cache=False)


# ----------------------------------------------------------------------------- masking


def assert_rates(examples, vocab_size: int, mask_id: int = 2, tolerance: float = 0.02):
    """15% of the tokens predicted; of those 80% <mask>, 10% random, 10% unchanged."""
    used = examples.mlm_weights == 1
    assert abs(used.sum() / examples.valid_lens.sum() - 0.15) < tolerance
    rows = np.broadcast_to(np.arange(len(examples))[:, None], used.shape)
    at = examples.tokens[rows[used], examples.pred_positions[used]]
    np.testing.assert_array_equal(examples.mlm_labels[used], at)
    masked_at = examples.masked_tokens[rows[used], examples.pred_positions[used]]
    is_mask = masked_at == mask_id
    unchanged = ~is_mask & (masked_at == at)
    chance = 0.1 / vocab_size
    assert abs(is_mask.mean() - 0.8) < tolerance
    assert abs(unchanged.mean() - (0.1 + chance)) < tolerance
    assert abs((~is_mask & ~unchanged).mean() - (0.1 - chance)) < tolerance
    assert not np.isin(at, [1, 3, 4]).any()  # never <pad>, <cls>, <sep>


@needs_tokenizers
def test_masking_rates_with_wordpiece(wordpiece):
    examples, vocab = wordpiece
    assert_rates(examples, len(vocab))
    # the book's count per example, as with words
    expected = np.maximum(1, np.round(0.15 * examples.valid_lens)).astype(int)
    np.testing.assert_array_equal(examples.mlm_weights.sum(axis=1), expected)


def chosen_words(examples, vocab):
    """Per example and word: its pieces, and how many of them are predicted."""
    n, max_len = examples.tokens.shape
    candidates = mlm_candidates(examples.segments, examples.valid_lens)
    word = word_index(examples.tokens, candidates, vocab.tokenizer.continuation_mask())
    flat = (np.arange(n)[:, None] * (max_len + 1) + word).ravel()
    pieces = np.bincount(flat, minlength=n * (max_len + 1)).reshape(n, -1)[:, :max_len]
    used = examples.mlm_weights == 1
    rows = np.broadcast_to(np.arange(n)[:, None], used.shape)
    hit = word[rows[used], examples.pred_positions[used]]
    predicted = np.zeros((n, max_len + 1), dtype=np.int64)
    np.add.at(predicted, (rows[used], hit), 1)
    return pieces, predicted[:, :max_len], word


@needs_tokenizers
def test_whole_word_masking_rates(whole_words):
    examples, vocab = whole_words
    assert_rates(examples, len(vocab))
    pieces, predicted, _ = chosen_words(examples, vocab)
    words = predicted > 0
    # about 15% of the words too (whole words are drawn), and multi-piece words among them
    assert abs(words.sum() / (pieces > 0).sum() - 0.15) < 0.03
    assert (pieces[words] > 1).sum() > 100


@needs_tokenizers
def test_whole_word_masking_never_masks_part_of_a_word(whole_words, wordpiece):
    examples, vocab = whole_words
    pieces, predicted, word = chosen_words(examples, vocab)
    partial = (predicted > 0) & (predicted < pieces)
    assert not partial.any()
    # ...while token masking does cut words (so the check above has teeth)
    p2, predicted2, _ = chosen_words(wordpiece[0], vocab)
    assert ((predicted2 > 0) & (predicted2 < p2)).sum() > 100
    # 80/10/10 is chosen per word: a word's pieces are all <mask> or none is
    used = examples.mlm_weights == 1
    n = len(examples)
    rows = np.broadcast_to(np.arange(n)[:, None], used.shape)
    positions = examples.pred_positions[used]
    is_mask = examples.masked_tokens[rows[used], positions] == vocab["<mask>"]
    key = rows[used] * (MAX_LEN + 1) + word[rows[used], positions]
    masks_per_word = np.bincount(key, weights=is_mask, minlength=n * (MAX_LEN + 1))
    pieces_per_word = np.bincount(key, minlength=n * (MAX_LEN + 1))
    chosen = pieces_per_word > 0
    mixed = (masks_per_word[chosen] > 0) & (masks_per_word[chosen] < pieces_per_word[chosen])
    assert mixed.sum() <= 0.001 * chosen.sum()  # only a random piece that happens to be <mask>


@needs_tokenizers
def test_dynamic_whole_word_masking_redraws_whole_words(whole_words, valid_file):
    examples, vocab = whole_words
    batches, _ = bertlite.load_data_wiki(
        512, MAX_LEN, data_dir=valid_file.parent, split="valid", tokenizer=vocab.tokenizer,
        whole_word_mask=True, masking="dynamic", cache=False)
    assert batches.continuation is not None
    arrays = batches.pass_arrays(1)
    redrawn = type(examples)(examples.tokens, examples.segments, examples.valid_lens,
                             examples.nsp_labels, arrays[0], arrays[3], arrays[4], arrays[5])
    assert not np.array_equal(redrawn.pred_positions, examples.pred_positions)
    pieces, predicted, _ = chosen_words(redrawn, vocab)
    assert not ((predicted > 0) & (predicted < pieces)).any()
    assert_rates(redrawn, len(vocab))


def test_whole_word_masking_with_words_is_ordinary_masking():
    path = resolve_corpus_file("sample", "valid")
    plain = prepare_data(path, 32, cache=False)[0]
    whole = prepare_data(path, 32, whole_word_mask=True, cache=False)[0]
    for name, array in plain.arrays().items():
        np.testing.assert_array_equal(array, getattr(whole, name), err_msg=name)
    batches = BatchIterator(plain, 8, masking="dynamic", vocab_size=100, mask_id=2)
    assert batches.continuation is None


# ----------------------------------------------------------------------------- cache


@needs_tokenizers
def test_cache_key_differs_between_tokenizers(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    path = folder / "wiki.train.tokens"
    path.write_bytes(resolve_corpus_file("sample", "train").read_bytes())
    cache_dir = tmp_path / "cache"
    settings = [dict(tokenizer="word"), dict(tokenizer="wordpiece"),
                dict(tokenizer="wordpiece", wordpiece_vocab_size=1000),
                dict(tokenizer="wordpiece", whole_word_mask=True)]
    built = [prepare_data(path, 32, cache_dir=cache_dir, **s) for s in settings]
    assert len(list(cache_dir.glob("*.npz"))) == len(settings)
    assert built[0][1].tokenizer is None and len(built[2][1]) == 1000
    assert built[1][1].tokenizer is not None and len(built[1][1]) != len(built[0][1])

    def fail(p):
        raise AssertionError("read_wiki called: the cache was not used")

    monkeypatch.setattr(data_loader, "read_wiki", fail)
    for s, (examples, vocab) in zip(settings, built):
        again, vocab2 = prepare_data(path, 32, cache_dir=cache_dir, **s)
        assert vocab2 == vocab and (vocab2.tokenizer is None) == (vocab.tokenizer is None)
        if vocab.tokenizer is not None:
            assert vocab2.tokenizer == vocab.tokenizer  # the tokenizer comes back from the cache
        np.testing.assert_array_equal(again.masked_tokens, examples.masked_tokens)
    # the same file prepared with a given (trained) vocabulary has a key of its own, and that
    # vocabulary decides the tokenization
    monkeypatch.undo()
    held_out, vocab3 = prepare_data(path, 32, cache_dir=cache_dir, vocab=built[1][1])
    assert vocab3 is built[1][1]
    np.testing.assert_array_equal(held_out.tokens, built[1][0].tokens)
    assert len(list(cache_dir.glob("*.npz"))) == len(settings) + 1


# ----------------------------------------------------------------------------- checkpoints


@needs_tokenizers
def test_checkpoint_keeps_the_tokenizer(tokenizer, tmp_path):
    vocab = tokenizer.to_vocab()
    config = BERTConfig(vocab_size=len(vocab), num_hiddens=8, ffn_num_hiddens=16, num_heads=2,
                        num_layers=1, max_len=12)
    ckpt.write_checkpoint(tmp_path / "c", config=config, vocab=vocab,
                          weights=init_params(config, 0), backend_name="torch")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == \
        ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"]
    got = ckpt.read_checkpoint(tmp_path / "c")
    assert got["vocab"] == vocab and got["vocab"].tokenizer == tokenizer
    # a tokenizer.json that does not match vocab.txt is a damaged checkpoint
    other = WordPieceTokenizer.from_vocab(SPECIALS + ["a", "b"])
    other.save(tmp_path / "c" / "tokenizer.json")
    with pytest.raises(CheckpointError, match="does not match"):
        ckpt.read_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        ckpt.read_checkpoint(tmp_path / "c")


@needs_tokenizers
def test_train_save_load_encode_with_wordpiece(backend_name, tmp_path, capsys):
    result = bertlite.train(backend_name, corpus="sample", config=SMALL, batch_size=16,
                            max_len=64, num_steps=3, seed=1, plot=None, progress=False,
                            verbose=False, tokenizer="wordpiece", wordpiece_vocab_size=1500,
                            whole_word_mask=True)
    assert isinstance(result.tokenizer, WordPieceTokenizer) and len(result.vocab) == 1500
    assert result.config.vocab_size == 1500
    assert result.metadata["training"]["tokenizer"] == "wordpiece"
    assert result.metadata["training"]["whole_word_mask"] is True
    text = "a crane driver came unbelievably"
    pieces = result.tokenize(text)
    assert result.tokenizer.decode(pieces) == text.split() and len(pieces) > 5
    encoded = result.encode(text)
    assert encoded.shape == (1, len(pieces) + 2, 32)
    np.testing.assert_array_equal(encoded, result.encode(pieces))  # a list: tokens as given
    result.save(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    loaded = bertlite.load(tmp_path / "m")
    assert loaded.tokenizer == result.tokenizer and loaded.vocab == result.vocab
    np.testing.assert_allclose(loaded.encode(text), encoded, rtol=1e-5, atol=1e-6)
    # the CLI's encode shows the pieces
    from bertlite.cli import main

    capsys.readouterr()
    assert main(["encode", "--checkpoint", str(tmp_path / "m"), text]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["<cls>", *pieces, "<sep>"]


@needs_tokenizers
def test_cli_pretrain_with_wordpiece(backend_name, tmp_path, capsys):
    from bertlite.cli import main

    assert main(["pretrain", "--backend", backend_name, "--corpus", "sample", "--steps", "2",
                 "--batch-size", "16", "--max-len", "64", "--tokenizer", "wordpiece",
                 "--wordpiece-vocab-size", "1200", "--whole-word-mask", "--no-plot",
                 "--no-progress", "--save", str(tmp_path / "m")]) == 0
    assert "MLM loss" in capsys.readouterr().out
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model"]["vocab_size"] == 1200
    assert meta["training"]["tokenizer"] == "wordpiece"
    assert meta["training"]["whole_word_mask"] is True
    assert WordPieceTokenizer.load(tmp_path / "m" / "tokenizer.json").vocab_size == 1200
    with pytest.raises(SystemExit):  # argparse rejects other tokenizers
        main(["pretrain", "--tokenizer", "bpe"])
