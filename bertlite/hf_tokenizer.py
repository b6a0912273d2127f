"""The tokenizer files of a ``transformers`` BERT folder, written from a bertlite vocabulary and
read into one.

Export writes ``tokenizer.json`` (a Hugging Face fast tokenizer that tokenizes as bertlite does:
the WordPiece tokenizer's own normalisation and pre-tokenizer -- bertlite's lowercase and
whitespace split, or an imported BERT's, cased or not -- then WordPiece pieces; or, for the
book's word vocabulary, lowercase and a word-level model with ``<unk>``; and
``<cls> A <sep> [B <sep>]`` with segment ids),
``tokenizer_config.json``, ``special_tokens_map.json`` and, for WordPiece, ``vocab.txt``.

Import reads BERT's WordPiece vocabulary with its own ids: the special tokens (``[PAD]=0
[UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103`` in ``bert-base-uncased``) keep their ids and take
bertlite's names (``<pad>`` ... ``<mask>``), which every step of the pipeline looks up by name;
the tokenizer remembers their own names (``special_names``), and export writes them back, so
that HF -> bertlite -> HF gives the same ``vocab.txt`` and ``[MASK]`` stays the mask token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bertlite.data.tokenizer import (
    CONTINUATION,
    MAX_WORD_CHARS,
    WordPieceTokenizer,
    normalization_of,
)
from bertlite.data.vocab import Vocab
from bertlite.errors import CheckpointError

__all__ = ["ROLES", "read_tokenizer", "tokenizer_files"]

#: the special-token roles of transformers' tokenizer config and bertlite's name for each
ROLES = {"unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "<cls>",
         "sep_token": "<sep>", "mask_token": "<mask>"}
#: BERT's own names of the roles (the defaults of BertTokenizer)
BERT_NAMES = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
              "sep_token": "[SEP]", "mask_token": "[MASK]"}


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        from bertlite.install import install_command

        raise ImportError("reading and writing transformers tokenizers needs the Hugging Face "
                          f"tokenizers library: {install_command('hf')}") from None
    return tokenizers


def tokenizer_files(vocab: Vocab, max_len: int) -> dict[str, str]:
    """``{file name: text}`` of the tokenizer of ``vocab`` for a ``transformers`` folder."""
    hf = _tokenizers()
    # an imported BERT's special tokens under their own names again ([MASK] ...), bertlite's
    # own under bertlite's (<mask> ...)
    names = dict(vocab.tokenizer.special_names) if vocab.tokenizer is not None else {}
    tokens = [names.get(t, t) for t in vocab.idx_to_token]
    token_to_idx = {t: i for i, t in enumerate(tokens)}
    unk = names.get("<unk>", "<unk>")
    lowercase = True
    if vocab.tokenizer is not None:
        tok = hf.Tokenizer(hf.models.WordPiece(
            vocab=token_to_idx, unk_token=unk, continuing_subword_prefix=CONTINUATION,
            max_input_chars_per_word=MAX_WORD_CHARS))
        tok.decoder = hf.decoders.WordPiece(prefix=CONTINUATION, cleanup=False)
        # the tokenizer's own: bertlite's lowercasing, or an imported BERT's (cased, say)
        tok.normalizer = vocab.tokenizer.normalizer
        tok.pre_tokenizer = vocab.tokenizer.pre_tokenizer
        lowercase = vocab.tokenizer.lowercase
    else:
        tok = hf.Tokenizer(hf.models.WordLevel(vocab=token_to_idx, unk_token=unk))
        tok.normalizer = hf.normalizers.Lowercase()  # the book: text.lower().split()
        tok.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
    cls, sep = names.get("<cls>", "<cls>"), names.get("<sep>", "<sep>")
    tok.post_processor = hf.processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab["<cls>"]), (sep, vocab["<sep>"])])
    specials = {role: names.get(ours, ours) for role, ours in ROLES.items()}
    tok.add_special_tokens(list(specials.values()))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "model_max_length": max_len, "do_lower_case": lowercase,
              "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    files = {"tokenizer.json": tok.to_str(),
             "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
             "special_tokens_map.json": json.dumps(specials, indent=2) + "\n"}
    if vocab.tokenizer is not None:
        files["vocab.txt"] = "".join(t + "\n" for t in tokens)
    return files


def _special(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read as JSON: {err}") from None
    return data if isinstance(data, dict) else {}


def _normalizer_json(tok_json: dict[str, Any] | None, config: dict[str, Any]
                     ) -> dict[str, Any] | None:
    """The normalizer the folder's tokenizer applies, as ``transformers`` builds it: the
    ``tokenizer.json`` one, where it is a ``BertNormalizer`` (or there is no tokenizer.json)
    with ``tokenizer_config.json``'s ``do_lower_case``, ``strip_accents`` and
    ``tokenize_chinese_chars`` taking precedence (as ``BertTokenizer`` does)."""
    normalizer = (tok_json or {}).get("normalizer") if tok_json is not None else \
        {"type": "BertNormalizer"}
    if not isinstance(normalizer, dict) or normalizer.get("type") != "BertNormalizer":
        if "do_lower_case" in config and bool(config["do_lower_case"]) != \
                normalization_of(normalizer)["lowercase"]:
            raise CheckpointError(
                f"the tokenizer's do_lower_case {config['do_lower_case']} disagrees with its "
                f"tokenizer.json normalizer {normalizer}; fix one of them")
        return normalizer
    merged = {"type": "BertNormalizer", "clean_text": normalizer.get("clean_text", True),
              "handle_chinese_chars": normalizer.get("handle_chinese_chars", True),
              "strip_accents": normalizer.get("strip_accents"),
              "lowercase": normalizer.get("lowercase", True)}
    for key, ours in (("do_lower_case", "lowercase"), ("strip_accents", "strip_accents"),
                      ("tokenize_chinese_chars", "handle_chinese_chars")):
        if key in config and (config[key] is None or isinstance(config[key], bool)):
            merged[ours] = config[key]
    return merged


def read_tokenizer(path: str | Path, vocab_size: int) -> tuple[Vocab, dict[str, Any]]:
    """The vocabulary of a ``transformers`` BERT folder's tokenizer (``tokenizer.json``, else
    ``vocab.txt``), its special tokens renamed to bertlite's names at their own ids, and what was
    read (``{"special_tokens": {bertlite name: (token, id)}, "lowercase": bool,
    "strip_accents": bool, "kind": ...}``). A WordPiece tokenizer keeps the folder's
    normalisation (cased or uncased, accents stripped or kept, as ``transformers`` would apply
    it) and its pre-tokenizer (punctuation split off).
    A CheckpointError when the tokenizer is missing, not WordPiece or word-level, lacks a
    special token, or has another size than the model's embedding (``vocab_size``)."""
    path = Path(path)
    config = {**_read_json(path / "special_tokens_map.json"),
              **_read_json(path / "tokenizer_config.json")}
    tok_json = _read_json(path / "tokenizer.json") or None
    if tok_json is not None:
        model = tok_json.get("model") or {}
        kind = model.get("type")
        vocab_map = dict(model.get("vocab") or {})
        for added in tok_json.get("added_tokens") or []:
            vocab_map.setdefault(added.get("content"), added.get("id"))
        if kind == "WordPiece" and model.get("continuing_subword_prefix", "##") != CONTINUATION:
            raise CheckpointError(f"{path / 'tokenizer.json'}: WordPiece continuation prefix "
                                  f"{model.get('continuing_subword_prefix')!r}; bertlite uses "
                                  f"{CONTINUATION!r}")
        if kind not in ("WordPiece", "WordLevel") or not isinstance(vocab_map, dict):
            raise CheckpointError(f"{path / 'tokenizer.json'} is a {kind} tokenizer; bertlite "
                                  "imports WordPiece (BERT's) and word-level tokenizers")
        tokens = [""] * len(vocab_map)
        for token, idx in vocab_map.items():
            if not isinstance(idx, int) or not 0 <= idx < len(tokens) or tokens[idx]:
                raise CheckpointError(f"{path / 'tokenizer.json'}: token ids are not 0..N-1")
            tokens[idx] = token
    elif (path / "vocab.txt").is_file():
        kind = "WordPiece"
        tokens = (path / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
    else:
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.json or vocab.txt); save the "
                              "tokenizer beside the model (tokenizer.save_pretrained(DIR))")
    if len(tokens) != vocab_size:
        raise CheckpointError(f"the tokenizer of {path} has {len(tokens)} tokens but the "
                              f"model's embedding has {vocab_size} rows: not this model's "
                              "tokenizer")
    index = {t: i for i, t in enumerate(tokens)}
    renamed, specials = list(tokens), {}
    for role, ours in ROLES.items():
        theirs = _special(config.get(role)) or (ours if ours in index else BERT_NAMES[role])
        if theirs not in index:
            raise CheckpointError(f"the tokenizer of {path} has no {role} {theirs!r} in its "
                                  "vocabulary")
        if theirs != ours and ours in index:
            raise CheckpointError(f"the tokenizer of {path} has both {theirs!r} and {ours!r}; "
                                  f"bertlite names its {role} {ours!r}")
        renamed[index[theirs]] = ours
        specials[ours] = (theirs, index[theirs])
    normalizer = _normalizer_json(tok_json, config)
    normalization = normalization_of(normalizer)
    if kind == "WordPiece":
        hf = _tokenizers()
        pre = (tok_json or {}).get("pre_tokenizer", {"type": "BertPreTokenizer"})
        vocab = WordPieceTokenizer.from_vocab(
            renamed, normalizer=_component(hf, "normalizer", normalizer, path),
            pre_tokenizer=_component(hf, "pre_tokenizer", pre, path)).to_vocab()
        vocab.tokenizer.special_names = {ours: theirs for ours, (theirs, _) in specials.items()
                                         if theirs != ours}
    else:
        vocab = Vocab.from_tokens(renamed, unk_anywhere=True)
    return vocab, {"special_tokens": specials, **normalization, "kind": kind}


def _component(hf: Any, role: str, spec: dict[str, Any] | None, path: Path) -> Any:
    """A ``tokenizers`` normalizer or pre-tokenizer from its ``tokenizer.json`` form (None:
    none, which bertlite's pipeline keeps as its whitespace words)."""
    if spec is None:
        return hf.normalizers.Sequence([]) if role == "normalizer" else \
            hf.pre_tokenizers.WhitespaceSplit()
    vocab = {"<unk>": 0}
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}, role: spec}
    try:
        return getattr(hf.Tokenizer.from_str(json.dumps(doc)), role)
    except Exception as err:  # tokenizers raises its own exception types
        raise CheckpointError(f"the tokenizer of {path} has a {role} bertlite cannot rebuild "
                              f"({spec}): {err}") from None
