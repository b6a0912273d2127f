"""Export to and import from Hugging Face ``transformers`` BERT folders, in each backend: tiny
random ``BertForPreTraining`` models and tokenizers built here and saved with
``save_pretrained`` to temporary folders (no network)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import bertlite
from bertlite.config import BERTConfig
from bertlite.data.loader import Batch
from bertlite.data.tokenizer import WordPieceTokenizer
from bertlite.data.vocab import build_vocab
from bertlite.errors import CheckpointError
from bertlite.model import Pretrained
from bertlite.params import init_params

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   '(pip install "bertlite[hf]")')
torch = pytest.importorskip("torch")

TEXT = ("the crane is flying over the river . a driver came to the river bank . he just left "
        "the town and the crane stayed by the water")
PAIR = ("the crane driver came", "he just left the river")


def bert_config(vocab_size: int, **changes) -> BERTConfig:
    return BERTConfig.from_preset("bert-tiny", vocab_size, num_hiddens=32, ffn_num_hiddens=64,
                                  num_heads=2, num_layers=2, max_len=40, **changes)


def random_weights(config: BERTConfig, seed: int = 1) -> dict[str, np.ndarray]:
    """init_params with every array moved (LayerNorms and biases included)."""
    rng = np.random.default_rng(seed)
    return {n: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
            for n, v in init_params(config, seed).items()}


def word_vocab():
    return build_vocab(TEXT.split(), min_freq=1)


def wordpiece_vocab():
    return WordPieceTokenizer.train([TEXT] * 3, vocab_size=80, min_frequency=1).to_vocab()


def bertlite_model(backend, vocab, **changes) -> Pretrained:
    config = bert_config(len(vocab), **changes)
    devices = backend.parse_devices(None)
    net = backend.build_model(config, devices)
    backend.load_state_dict(net, random_weights(config))
    return Pretrained(net, backend, vocab, config, devices)


def all_position_outputs(model: Pretrained, ids: np.ndarray, segments: np.ndarray):
    """bertlite's encodings, MLM logits at every position and NSP logits of one input."""
    n = ids.shape[1]
    positions = np.arange(n, dtype=np.int32)[None]
    batch = Batch(ids.astype(np.int32), segments.astype(np.int32),
                  np.array([n], np.float32), positions, np.ones((1, n), np.float32),
                  np.zeros((1, n), np.int32), np.zeros(1, np.int32))
    return model.backend.forward(model.model, batch)


def hf_outputs(folder, ids, segments):
    net = transformers.BertForPreTraining.from_pretrained(folder).eval()
    with torch.no_grad():
        out = net(input_ids=torch.as_tensor(ids, dtype=torch.long),
                  token_type_ids=torch.as_tensor(segments, dtype=torch.long),
                  output_hidden_states=True)
    return (out.hidden_states[-1].numpy(), out.prediction_logits.numpy(),
            out.seq_relationship_logits.numpy())


def assert_same_outputs(ours, theirs):
    for a, b, name in zip(ours, theirs, ("encodings", "MLM logits", "NSP logits")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


# -- export ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["wordpiece", "word"])
@pytest.mark.parametrize("changes", [{}, dict(activation="relu", tie_decoder=False)],
                         ids=["bert", "relu-untied"])
def test_export_loads_in_transformers_with_the_same_outputs(backend, tmp_path, kind, changes):
    vocab = wordpiece_vocab() if kind == "wordpiece" else word_vocab()
    model = bertlite_model(backend, vocab, **changes)
    folder = model.to_hf(str(tmp_path / "hf"))
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json"} | ({"vocab.txt"} if kind == "wordpiece" else set())
    assert {p.name for p in folder.iterdir()} == expected
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(*[s.upper() for s in PAIR], return_tensors="np")  # lowercased as bertlite does
    tokens = ["<cls>", *model.tokenize(PAIR[0]), "<sep>", *model.tokenize(PAIR[1]), "<sep>"]
    assert enc["input_ids"][0].tolist() == vocab[tokens]
    n_a = len(model.tokenize(PAIR[0])) + 2
    assert enc["token_type_ids"][0].tolist() == [0] * n_a + [1] * (len(tokens) - n_a)
    assert tok.mask_token == "<mask>" and tok.mask_token_id == vocab["<mask>"]
    # transformers' tooling takes bertlite's own special-token names from the folder
    fill = transformers.pipeline("fill-mask", model=str(folder), tokenizer=str(folder))
    assert len(fill(f"the crane {tok.mask_token} over", top_k=3)) == 3
    ours = all_position_outputs(model, enc["input_ids"], enc["token_type_ids"])
    assert_same_outputs(ours, hf_outputs(folder, enc["input_ids"], enc["token_type_ids"]))
    np.testing.assert_allclose(model.encode(*PAIR), ours[0], rtol=1e-5, atol=1e-5)
    # and back: bit-identical weights
    again = bertlite.from_hf(folder, backend=backend)
    assert again.config == model.config and again.vocab.idx_to_token == vocab.idx_to_token
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], value, err_msg=name)


def test_book_flavour_export_is_refused(backend, tmp_path):
    vocab = word_vocab()
    config = BERTConfig.from_preset("tiny", len(vocab), num_hiddens=32, ffn_num_hiddens=64)
    devices = backend.parse_devices(None)
    net = backend.build_model(config, devices)
    model = Pretrained(net, backend, vocab, config, devices)
    with pytest.raises(ValueError, match="book's flavour.*cannot represent exactly.*bert-tiny"):
        model.to_hf(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_export_into_a_used_folder_is_refused(backend, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not an empty folder"):
        bertlite_model(backend, word_vocab()).to_hf(str(tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


# -- import ----------------------------------------------------------------------------------------

def bert_vocab_tokens() -> list[str]:
    """A vocabulary laid out as bert-base-uncased's: [PAD] 0, [unusedN], [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103, then words and ## pieces."""
    words = sorted(set(TEXT.split()))
    return (["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             *words, "##s", "##ing", "##er"])


def save_hf_bert(folder, architecture: str = "BertForPreTraining", seed: int = 0, **changes):
    tokens = bert_vocab_tokens()
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens))
    # a folder with only vocab.txt loads in transformers 4 and 5 alike
    tok = transformers.BertTokenizerFast.from_pretrained(folder, do_lower_case=True)
    settings = dict(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=48)
    settings.update(changes)
    torch.manual_seed(seed)
    net = getattr(transformers, architecture)(transformers.BertConfig(**settings))
    with torch.no_grad():  # move LayerNorms and biases off their initial values too
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


def test_import_keeps_berts_special_token_ids_and_outputs(backend, tmp_path):
    folder = tmp_path / "bert"
    tok = save_hf_bert(folder)
    model = bertlite.from_hf(folder, backend=backend)
    assert model.config.flavor == "bert" and model.metadata["initialised"] == []
    assert [model.vocab[t] for t in ("<pad>", "<unk>", "<cls>", "<sep>", "<mask>")] == \
        [0, 100, 101, 102, 103]
    assert model.vocab.unk == 100 and model.vocab["never-seen"] == 100
    enc = tok(*PAIR, return_tensors="np")
    assert enc["input_ids"][0].tolist() == model.vocab[
        ["<cls>", *model.tokenize(PAIR[0]), "<sep>", *model.tokenize(PAIR[1]), "<sep>"]]
    ours = all_position_outputs(model, enc["input_ids"], enc["token_type_ids"])
    assert_same_outputs(ours, hf_outputs(folder, enc["input_ids"], enc["token_type_ids"]))
    # HF -> bertlite -> HF: identical weights and the same outputs
    out = model.to_hf(str(tmp_path / "again"))
    from safetensors.numpy import load_file

    before, after = load_file(str(folder / "model.safetensors")), load_file(str(out /
                                                                               "model.safetensors"))
    assert set(after) == set(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert_same_outputs(hf_outputs(out, enc["input_ids"], enc["token_type_ids"]),
                        hf_outputs(folder, enc["input_ids"], enc["token_type_ids"]))
    # and the tokenizer: BERT's special-token names again, the same vocab.txt
    assert (out / "vocab.txt").read_text() == (folder / "vocab.txt").read_text()
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert (again.mask_token, again.mask_token_id, again.pad_token) == ("[MASK]", 103, "[PAD]")
    masked = "the crane [MASK] over the river"
    assert again(masked)["input_ids"] == tok(masked)["input_ids"]


@pytest.mark.parametrize("architecture, initialised", [
    ("BertForMaskedLM", ["hidden.weight", "hidden.bias", "nsp.output.weight", "nsp.output.bias"]),
    ("BertModel", ["mlm.dense.weight", "mlm.dense.bias", "mlm.ln.weight", "mlm.ln.bias",
                   "mlm.decoder.bias", "nsp.output.weight", "nsp.output.bias"]),
])
def test_import_initialises_and_reports_missing_heads(backend, tmp_path, architecture,
                                                      initialised):
    save_hf_bert(tmp_path / "m", architecture)
    model = bertlite.from_hf(tmp_path / "m", backend=backend)
    assert model.metadata["initialised"] == initialised
    assert np.isfinite(model.encode(*PAIR)).all()


def _edit_config(folder, **changes):
    meta = json.loads((folder / "config.json").read_text())
    meta.update(changes)
    (folder / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("breakage, message", [
    ("other architecture", "not a BERT checkpoint: model_type 'gpt2'"),
    ("pickle only", r"only as \['pytorch_model.bin'\].*never|only as \['pytorch_model.bin'\]"),
    ("shape mismatch", "shapes disagree with its config.json"),
    ("tokenizer size", "tokenizer .* has 127 tokens but the model's embedding has 150 rows"),
    ("no weights", "has no model.safetensors"),
    ("no config", "has no config.json"),
    ("cased word-level", "has a cased word-level tokenizer"),
    ("encoder weight missing", r"lacks the encoder weights \['bert.encoder.layer.1.output"),
    ("no tokenizer", "has no tokenizer"),
])
def test_bad_folders_are_refused(backend, tmp_path, breakage, message):
    folder = tmp_path / "bert"
    save_hf_bert(folder)
    if breakage == "other architecture":
        _edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    elif breakage == "pickle only":
        (folder / "model.safetensors").unlink()
        marker = tmp_path / "unpickled"
        # a pickle that would create a file if it were ever loaded
        payload = pickle.dumps(_Marker(str(marker)))
        (folder / "pytorch_model.bin").write_bytes(payload)
    elif breakage == "shape mismatch":
        _edit_config(folder, intermediate_size=48)
    elif breakage == "tokenizer size":
        save_hf_bert(folder, vocab_size=150)
    elif breakage == "no weights":
        (folder / "model.safetensors").unlink()
    elif breakage == "no config":
        (folder / "config.json").unlink()
    elif breakage == "encoder weight missing":
        from safetensors.numpy import load_file, save_file

        arrays = load_file(str(folder / "model.safetensors"))
        del arrays["bert.encoder.layer.1.output.dense.weight"]
        save_file(arrays, str(folder / "model.safetensors"))
    elif breakage == "no tokenizer":
        for name in ("tokenizer.json", "vocab.txt"):
            (folder / name).unlink()
    elif breakage == "cased word-level":  # the book's word vocabulary always lowercases
        tok_json = json.loads((folder / "tokenizer.json").read_text())
        tok_json.update(normalizer=None, model={"type": "WordLevel", "unk_token": "[UNK]",
                                                "vocab": tok_json["model"]["vocab"]})
        (folder / "tokenizer.json").write_text(json.dumps(tok_json))
        meta = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**meta,
                                                                  "do_lower_case": False}))
    with pytest.raises(CheckpointError, match=message):
        bertlite.from_hf(folder, backend=backend)
    if breakage == "pickle only":
        assert not (tmp_path / "unpickled").exists()


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_continue_pretraining_from_a_transformers_folder(backend, tmp_path):
    folder = tmp_path / "bert"
    save_hf_bert(folder)
    start = bertlite.from_hf(folder, backend=backend).state_dict()
    result = bertlite.train(backend, corpus="sample", init=folder, num_steps=2, batch_size=8,
                            max_len=32, lr=1e-3, plot=None, progress=False, verbose=False)
    assert result.config == bertlite.from_hf(folder, backend=backend).config
    assert result.vocab["<mask>"] == 103 and result.vocab["<pad>"] == 0
    assert np.isfinite(result.history.mlm_loss).all() and len(result.history.mlm_loss) == 2
    moved = result.state_dict()
    assert not np.array_equal(moved["encoder.token_embedding.weight"],
                              start["encoder.token_embedding.weight"])
    out = result.to_hf(str(tmp_path / "continued"))
    assert (out / "vocab.txt").read_text() == (folder / "vocab.txt").read_text()
    net = transformers.BertForPreTraining.from_pretrained(out)
    np.testing.assert_array_equal(net.bert.embeddings.word_embeddings.weight.detach().numpy(),
                                  moved["encoder.token_embedding.weight"])


def test_continue_pretraining_on_a_corpus_to_prepare(backend, tmp_path):
    """init= with data=: the corpus is prepared with the imported tokenizer, whose special
    tokens keep BERT's ids ([PAD]=0 pads every example, [CLS]=101 starts it)."""
    from bertlite.data.prepared import PreparedBatches, open_data

    save_hf_bert(tmp_path / "bert")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT.replace(" . ", ". ").capitalize()
                                   for _ in range(40)) + "\n")
    result = bertlite.train(backend, data=corpus, format="text", init=tmp_path / "bert",
                            num_steps=1, batch_size=4, max_len=24, plot=None, progress=False,
                            verbose=False)
    vocab = bertlite.from_hf(tmp_path / "bert", backend=backend).vocab
    assert result.vocab == vocab
    prepared = open_data(corpus, format="text", max_len=24, tokenizer="wordpiece", vocab=vocab)
    batch = next(iter(PreparedBatches(prepared, 4, seed=0)))
    assert (batch.tokens[:, 0] == 101).all()
    short = batch.valid_lens < 24
    assert short.any() and all((row[int(n):] == 0).all()
                               for row, n in zip(batch.tokens, batch.valid_lens))


@pytest.mark.parametrize("kwargs, message", [
    (dict(config="bert-mini"), "leave config= and tokenizer= at their defaults"),
    (dict(tokenizer="wordpiece"), "leave config= and tokenizer= at their defaults"),
])
def test_init_takes_config_and_tokenizer_from_the_folder(backend, tmp_path, kwargs, message):
    save_hf_bert(tmp_path / "bert")
    with pytest.raises(ValueError, match=message):
        bertlite.train(backend, corpus="sample", init=tmp_path / "bert", num_steps=1,
                       plot=None, progress=False, verbose=False, **kwargs)


def test_cli_import_export_and_pretrain_init(backend, tmp_path, capsys):
    from bertlite.cli import main

    save_hf_bert(tmp_path / "bert", "BertForMaskedLM")
    assert main(["import-hf", str(tmp_path / "bert"), "--out", str(tmp_path / "ck"),
                 "--backend", backend.name]) == 0
    out = capsys.readouterr().out
    assert "initialised (not in the folder): nsp.output.weight" in out
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ck"), "--out",
                 str(tmp_path / "hf")]) == 0
    again = bertlite.from_hf(tmp_path / "hf", backend=backend)
    # BERT's special-token names kept through the bertlite checkpoint
    assert (tmp_path / "hf" / "vocab.txt").read_text() == \
        (tmp_path / "bert" / "vocab.txt").read_text()
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["tokenizer"][
        "special_names"]["<mask>"] == "[MASK]"
    loaded = bertlite.load(tmp_path / "ck", backend=backend.name)
    for name, value in loaded.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], value, err_msg=name)
    assert main(["pretrain", "--backend", backend.name, "--corpus", "sample", "--init",
                 str(tmp_path / "hf"), "--steps", "1", "--batch-size", "4", "--max-len", "24",
                 "--no-plot", "--no-progress", "--save", str(tmp_path / "more")]) == 0
    assert bertlite.load(tmp_path / "more", backend=backend.name).vocab["<mask>"] == 103
    # the book's flavour: one clear error, nothing written
    book = bertlite_model(backend, word_vocab(), embedding_norm=False)
    book.save(str(tmp_path / "book"))
    assert main(["export-hf", "--checkpoint", str(tmp_path / "book"), "--out",
                 str(tmp_path / "book-hf")]) == 2
    assert "cannot represent exactly" in capsys.readouterr().err
    assert not (tmp_path / "book-hf").exists()


def test_continue_pretraining_example(backend, tmp_path, capsys):
    """examples/continue_pretraining.py on a tiny random BERT: import, continue, export, and
    transformers' fill-mask pipeline on the result."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "continue_pretraining.py"
    spec = importlib.util.spec_from_file_location("bertlite_example_continue", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    predictions = example.main(["--tiny", str(tmp_path / "tiny"), "--backend", backend.name,
                                "--steps", "2", "--batch-size", "8", "--max-len", "32",
                                "--out", str(tmp_path / "out")])
    assert len(predictions) == 5 and all(0 <= score <= 1 for _, score in predictions)
    out = capsys.readouterr().out
    # the imported BERT's own mask token, written back by export
    assert f"exported: {tmp_path / 'out'}" in out and "the crane is [MASK] over" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_missing_tokenizers_names_the_hf_extra(backend, tmp_path, monkeypatch):
    import sys

    model = bertlite_model(backend, word_vocab())
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers fails
    with pytest.raises(ImportError, match=r"pip install .*\[hf\]"):
        model.to_hf(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_d2l_export_refuses_the_bert_flavour(backend):
    """d2l's BERTModel has the book's architecture only: to_d2l refuses another flavour."""
    import importlib

    interop = importlib.import_module(f"bertlite.backends.{backend.name}.interop")
    with pytest.raises(ValueError, match="only the book's architecture.*to_hf"):
        interop.to_d2l(bertlite_model(backend, word_vocab()))


# -- cased tokenizers ------------------------------------------------------------------------------

CASED_TEXT = ("Paris is the capital of France . the city of paris in Texas is small . a Café in "
              "Paris serves café and crème . Émile drank a cafe in Paris")
CASED_PROBES = ["Paris is not paris.", "Émile drank a Café, in Texas!", "crème and CAFÉ",
                "the cafe serves café"]


def save_cased_bert(folder, strip_accents=None):
    """A cased BERT (``do_lower_case=False``; accents kept unless ``strip_accents``), its
    vocabulary holding both cases and accented and plain forms."""
    words = sorted(set(CASED_TEXT.split()) | {"Cafe", "creme", "Emile", ".", ",", "!"})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s", "##é"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    tok = transformers.BertTokenizerFast.from_pretrained(folder, do_lower_case=False,
                                                         strip_accents=strip_accents)
    torch.manual_seed(3)
    net = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=48))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


def bertlite_ids(model: Pretrained, text: str) -> list[int]:
    return model.vocab[["<cls>", *model.tokenize(text), "<sep>"]]


@pytest.mark.parametrize("strip_accents", [None, True], ids=["accents-kept", "accents-stripped"])
def test_cased_import_keeps_case_and_round_trips(backend, tmp_path, strip_accents):
    from safetensors.numpy import load_file

    folder = tmp_path / "cased"
    tok = save_cased_bert(folder, strip_accents)
    model = bertlite.from_hf(folder, backend=backend)
    assert not model.tokenizer.lowercase
    assert model.metadata["tokenizer"]["lowercase"] is False
    assert model.metadata["tokenizer"]["strip_accents"] is bool(strip_accents)
    paris, lower = model.vocab[model.tokenize("Paris")], model.vocab[model.tokenize("paris")]
    assert paris != lower and model.vocab.unk not in paris + lower
    cafe, plain = model.tokenize("Café"), model.tokenize("Cafe")
    assert (cafe == plain) is bool(strip_accents)
    for text in CASED_PROBES:
        assert bertlite_ids(model, text) == tok(text)["input_ids"], text
    enc = tok(*CASED_PROBES[:2], return_tensors="np")
    ours = all_position_outputs(model, enc["input_ids"], enc["token_type_ids"])
    assert_same_outputs(ours, hf_outputs(folder, enc["input_ids"], enc["token_type_ids"]))
    # HF -> bertlite -> HF: the same weights, outputs and tokenization
    out = model.to_hf(str(tmp_path / "again"))
    before, after = load_file(str(folder / "model.safetensors")), \
        load_file(str(out / "model.safetensors"))
    assert set(after) == set(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert_same_outputs(hf_outputs(out, enc["input_ids"], enc["token_type_ids"]),
                        hf_outputs(folder, enc["input_ids"], enc["token_type_ids"]))
    again = transformers.AutoTokenizer.from_pretrained(out)
    for text in CASED_PROBES:
        assert again(text)["input_ids"] == tok(text)["input_ids"], text
    # a bertlite checkpoint records the normalisation and loads the same tokenizer
    model.save(str(tmp_path / "ck"))
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["tokenizer"] == {"kind": "wordpiece", "lowercase": False,
                                 "strip_accents": bool(strip_accents),
                                 "special_names": {"<pad>": "[PAD]", "<unk>": "[UNK]",
                                                   "<cls>": "[CLS]", "<sep>": "[SEP]",
                                                   "<mask>": "[MASK]"}}
    loaded = bertlite.load(tmp_path / "ck", backend=backend.name)
    assert loaded.tokenizer == model.tokenizer and not loaded.tokenizer.lowercase
    for text in CASED_PROBES:
        assert bertlite_ids(loaded, text) == tok(text)["input_ids"], text
    from bertlite.hf import export_checkpoint

    exported = transformers.AutoTokenizer.from_pretrained(
        export_checkpoint(tmp_path / "ck", tmp_path / "from-ck"))
    assert [exported(t)["input_ids"] for t in CASED_PROBES] == \
        [tok(t)["input_ids"] for t in CASED_PROBES]


def test_cased_data_pipeline_keeps_the_case(backend, tmp_path):
    """A cased tokenizer's corpus is read as it is (in memory and prepared), the word
    vocabulary's still lowercased; train(init=cased) continues pretraining on it."""
    from bertlite.data.loader import prepare_data
    from bertlite.data.prepared import PreparedBatches, open_data

    save_cased_bert(tmp_path / "cased")
    vocab = bertlite.from_hf(tmp_path / "cased", backend=backend).vocab
    corpus = tmp_path / "wiki.train.tokens"
    corpus.write_text(" \n" + "\n".join([CASED_TEXT] * 30) + "\n", encoding="utf-8")
    examples, _ = prepare_data(corpus, 32, vocab=vocab, cache=False)
    prepared = open_data(corpus, format="wikitext", max_len=32, vocab=vocab)
    _, words = prepare_data(corpus, 32, min_freq=1, cache=False)
    assert "Paris" not in words and "paris" in words  # the book's vocabulary lowercases
    for tokens in (examples.tokens, next(iter(PreparedBatches(prepared, 64, seed=0))).tokens):
        for word in ("Paris", "paris", "Café", "café", "Émile"):
            assert (tokens == vocab[word]).any(), word
    result = bertlite.train(backend, data=corpus, format="wikitext", init=tmp_path / "cased",
                            num_steps=2, batch_size=4, max_len=32, plot=None, progress=False,
                            verbose=False)
    assert len(result.history.mlm_loss) == 2 and np.isfinite(result.history.mlm_loss).all()
    assert not result.tokenizer.lowercase and result.vocab == vocab
    assert result.tokenize("Paris") != result.tokenize("paris")
    result.save(str(tmp_path / "ck"))
    loaded = bertlite.load(tmp_path / "ck", backend=backend.name)
    np.testing.assert_allclose(loaded.encode("Paris is small"), result.encode("Paris is small"),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(loaded.encode("Paris is small"), loaded.encode("paris is small"))


def test_tokenizer_record_is_checked(tmp_path):
    from bertlite.checkpoint_schema import check_config_json, check_tokenizer_agrees

    uncased = WordPieceTokenizer.from_vocab(["<unk>", "<pad>", "<mask>", "<cls>", "<sep>", "a"])
    meta = {"format": 2, "model": BERTConfig(vocab_size=10).to_dict()}
    check_config_json({**meta, "tokenizer": {"kind": "wordpiece", "lowercase": False,
                                             "strip_accents": False}}, tmp_path)
    with pytest.raises(CheckpointError, match="'lowercase' must be true or false"):
        check_config_json({**meta, "tokenizer": {"kind": "wordpiece", "lowercase": "no",
                                                 "strip_accents": False}}, tmp_path)
    with pytest.raises(CheckpointError, match="records the tokenizer normalisation"):
        check_tokenizer_agrees({"kind": "wordpiece", "lowercase": False, "strip_accents": False},
                               uncased, "ck")
    with pytest.raises(CheckpointError, match="'special_names' must be an object"):
        check_config_json({**meta, "tokenizer": {"kind": "wordpiece", "lowercase": True,
                                                 "strip_accents": False,
                                                 "special_names": {"<mask>": ""}}}, tmp_path)
    check_tokenizer_agrees({"kind": "wordpiece", "lowercase": True, "strip_accents": False,
                            "special_names": {"<mask>": "[MASK]"}}, uncased, "ck")
    assert uncased.special_names == {"<mask>": "[MASK]"}
    with pytest.raises(CheckpointError, match="there is no tokenizer.json"):
        check_tokenizer_agrees({"kind": "wordpiece", "lowercase": True, "strip_accents": False},
                               None, "ck")


def test_cased_and_uncased_tokenizers_never_share_cached_data(tmp_path):
    """The same pieces with another normalisation are another tokenizer: other digest, other
    cache entry, other examples."""
    import tokenizers

    from bertlite.data.loader import prepare_data

    tokens = ["<unk>", "<pad>", "<mask>", "<cls>", "<sep>",
              *sorted(set(CASED_TEXT.split()) | set(CASED_TEXT.lower().split()))]
    uncased = WordPieceTokenizer.from_vocab(tokens)
    cased = WordPieceTokenizer.from_vocab(tokens, normalizer=tokenizers.normalizers.BertNormalizer(
        lowercase=False, strip_accents=False))
    assert uncased.lowercase and not cased.lowercase and cased != uncased
    assert cased.digest() != uncased.digest()
    corpus = tmp_path / "wiki.train.tokens"
    corpus.write_text("\n".join([CASED_TEXT] * 20) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    low, _ = prepare_data(corpus, 32, vocab=uncased.to_vocab(), cache_dir=cache)
    kept, _ = prepare_data(corpus, 32, vocab=cased.to_vocab(), cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    assert not (low.tokens == uncased.to_vocab()["Paris"]).any()
    assert (kept.tokens == cased.to_vocab()["Paris"]).any()
