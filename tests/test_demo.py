"""The quick start teaches something: trained with the quick start's defaults on the shipped
sample corpus (the demo's lr 0.001 after a warmup), the README's own ``encode`` examples give
context-dependent vectors, with every demo word in the vocabulary; while WikiText-2 and any
other corpus keep the book's settings (lr 0.01, where the tiny encoder collapses).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

import bertlite
from bertlite.cli import build_parser
from bertlite.cli import main as cli_main
from bertlite.data.corpus import SAMPLE_DIR
from bertlite.options import BOOK_DEFAULTS, DEMO_DEFAULTS, run_defaults
from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
#: the README's encode examples: text A, text B (the book's two inputs)
DEMO_INPUTS = [("a crane is flying", None), ("a crane driver came", "he just left")]
DEMO_WORDS = sorted({w for a, b in DEMO_INPUTS for w in f"{a} {b or ''}".split()})


def test_the_demo_inputs_are_the_readmes():
    assert 'bertlite encode --checkpoint demo-bert "a crane is flying"' in README
    assert '"a crane driver came" "he just left"' in README
    assert 'get_bert_encoding(result, ["a", "crane", "is", "flying"])' in README


def test_demo_words_are_in_the_sample_vocabulary_in_several_contexts():
    """Every demo word is a word of the vocabulary (min_freq 5) and appears in several
    paragraphs of the sample; "crane" in articles on the bird and on the machine."""
    from bertlite.data.corpus import read_corpus
    from bertlite.data.vocab import build_corpus_vocab

    path = SAMPLE_DIR / "wiki.train.tokens"
    vocab, _ = build_corpus_vocab(read_corpus(path))
    missing = [w for w in DEMO_WORDS if w not in vocab]
    assert not missing, f"demo words that are <unk> in the sample's vocabulary: {missing}"
    paragraphs = [set(line.lower().split()) for line in path.read_text().splitlines()
                  if line.count(" . ") >= 1]
    for word in DEMO_WORDS:
        assert sum(word in p for p in paragraphs) >= 4, word
    articles = re.split(r"^ = [^=].* = $", path.read_text(), flags=re.M)
    crane = [a for a in articles if " crane " in a.lower()]
    assert any(" wings " in a for a in crane) and any(" hook " in a for a in crane)


def test_demo_defaults_only_for_the_sample_corpus(tmp_path):
    *demo, note = run_defaults({"corpus": "sample", "data": None, "lr": None})
    assert demo == list(DEMO_DEFAULTS.values()) and "the demo's settings" in note
    for corpus in ("wikitext-2", str(tmp_path)):  # WikiText-2 and any corpus of the user's
        *book, note = run_defaults({"corpus": corpus, "data": None})
        assert book == list(BOOK_DEFAULTS.values()) and note is None
    *prepared, note = run_defaults({"corpus": "sample", "data": str(tmp_path)})
    assert prepared == list(BOOK_DEFAULTS.values()) and note is None
    mine = {"batch_size": 8, "lr": 0.01, "warmup_steps": 0}  # given: always the user's
    *values, note = run_defaults({"corpus": "sample", **mine})
    assert dict(zip(DEMO_DEFAULTS, values)) == {**DEMO_DEFAULTS, **mine}
    assert "lr" not in note and "warmup" not in note and "batch_size" not in note
    assert run_defaults({"corpus": "sample", **DEMO_DEFAULTS})[-1] is None
    assert BOOK_DEFAULTS == {"batch_size": 512, "num_steps": 50, "lr": 0.01, "warmup_steps": 0,
                             "schedule": "constant"}  # the chapter's run, never the demo's


def test_pretrain_help_names_the_books_and_the_demos_defaults():
    text = " ".join(build_parser()._subparsers._group_actions[0]
                    .choices["pretrain"].format_help().split())
    book, demo = BOOK_DEFAULTS, DEMO_DEFAULTS
    assert (f"the book's run (tiny BERT, batch {book['batch_size']} x 64, {book['num_steps']} "
            f"Adam steps at lr {book['lr']}, no warmup)") in text
    assert (f"the demo's: batch {demo['batch_size']} x 64, {demo['num_steps']} Adam steps at "
            f"lr {demo['lr']} after {demo['warmup_steps']} warmup steps") in text
    for name, option in (("batch_size", "--batch-size"), ("num_steps", "--steps"), ("lr", "--lr"),
                         ("warmup_steps", "--warmup-steps")):
        assert f"{option} " in text
        assert f"the book's {book[name]}; the demo's {demo[name]} with --corpus sample" in text


TINY = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=1, max_len=32)


def test_train_applies_the_demo_settings_to_the_sample_only(backend_name, tmp_path, capsys):
    """Same text, two names: "sample" trains with the demo's schedule (and says so), a folder
    holding a copy of it with the book's."""
    copy = tmp_path / "copy"
    shutil.copytree(SAMPLE_DIR, copy)
    run = dict(config=TINY, batch_size=8, max_len=32, num_steps=3, plot=None, progress=False)
    demo = bertlite.train(backend_name, corpus="sample", **run)
    warm = DEMO_DEFAULTS["warmup_steps"]
    assert demo.history.lr == pytest.approx([DEMO_DEFAULTS["lr"] * s / warm for s in (1, 2, 3)])
    assert ("sample corpus, the demo's settings: lr 0.001, warmup_steps 10 (the book's: "
            "lr 0.01, warmup_steps 0; set them to choose)") in capsys.readouterr().out
    book = bertlite.train(backend_name, corpus=str(copy), **run)
    assert book.history.lr == [0.01] * 3
    assert "demo" not in capsys.readouterr().out
    mine = bertlite.train(backend_name, corpus="sample", lr=0.02, **run)  # the user's wins
    assert mine.history.lr == pytest.approx([0.02 * s / warm for s in (1, 2, 3)])
    assert "lr 0.001" not in capsys.readouterr().out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _encodings(model) -> list[tuple[list[str], np.ndarray]]:
    out = []
    for text_a, text_b in DEMO_INPUTS:
        tokens_a = model.tokenize(text_a)
        tokens_b = model.tokenize(text_b) if text_b else None
        tokens, _ = bertlite.get_tokens_and_segments(tokens_a, tokens_b)
        out.append((tokens, model.encode(tokens_a, tokens_b)[0]))
    return out


@pytest.fixture(scope="module")
def quickstart(request, tmp_path_factory):
    """``bertlite pretrain --backend B --corpus sample --save demo-bert``: the quick start's
    command with every default, through the CLI, per backend (trained once a module)."""
    trained = {}

    def get(backend_name: str):
        if backend_name not in trained:
            folder = tmp_path_factory.mktemp(f"quickstart-{backend_name}") / "demo-bert"
            assert cli_main(["pretrain", "--backend", backend_name, "--corpus", "sample",
                             "--no-progress", "--no-plot", "--save", str(folder)]) == 0
            trained[backend_name] = bertlite.load(folder)
        return trained[backend_name]

    return get


def test_the_quick_start_encodings_are_context_dependent(backend_name, quickstart):
    """(a) no demo word is <unk>; (b) no collapse: "crane" differs between the two inputs, and
    the tokens of one input differ from each other. Collapsed (the book's lr 0.01 on the
    sample) every cosine here is 1.0000 and the spread 0."""
    model = quickstart(backend_name)
    assert model.metadata["training"]["optimizer"]["lr"] == DEMO_DEFAULTS["lr"]
    (tokens1, enc1), (tokens2, enc2) = _encodings(model)
    unknown = [t for t in tokens1 + tokens2 if t not in model.vocab]
    assert not unknown, f"<unk> in the demo inputs: {unknown}"
    crane = _cosine(enc1[tokens1.index("crane")], enc2[tokens2.index("crane")])
    assert crane < 0.99, f"crane in the two inputs: cosine {crane:.4f}"
    for tokens, enc in ((tokens1, enc1), (tokens2, enc2)):
        words = [i for i, t in enumerate(tokens) if t not in ("<cls>", "<sep>")]
        worst = max(_cosine(enc[i], enc[j]) for i in words for j in words if i < j)
        assert worst < 0.9995, f"two tokens of {tokens} have cosine {worst:.5f}"
        spread = float(enc[words].std(axis=0).mean())  # about 0 when collapsed
        assert spread > 0.02, f"the tokens of {tokens} hardly differ: spread {spread:.4f}"
    if backend_name == "torch":  # the README's quick start runs on torch and quotes it
        quoted = " ".join(README.split())
        assert f"the two `crane` vectors have a cosine similarity of {crane:.2f}" in quoted
