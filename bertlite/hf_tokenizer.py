"""The tokenizer files of a ``transformers`` BERT folder, written from a bertlite vocabulary and
read into one.

Export writes ``tokenizer.json`` (a Hugging Face fast tokenizer that tokenizes as bertlite does:
lowercase, split on whitespace, then WordPiece pieces -- or, for the book's word vocabulary, a
word-level model with ``<unk>`` -- and ``<cls> A <sep> [B <sep>]`` with segment ids),
``tokenizer_config.json``, ``special_tokens_map.json`` and, for WordPiece, ``vocab.txt``.

Import reads BERT's WordPiece vocabulary with its own ids: the special tokens (``[PAD]=0
[UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103`` in ``bert-base-uncased``) keep their ids and take
bertlite's names (``<pad>`` ... ``<mask>``), which every step of the pipeline looks up by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bertlite.data.tokenizer import CONTINUATION, MAX_WORD_CHARS, WordPieceTokenizer
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
    token_to_idx = {t: i for i, t in enumerate(vocab.idx_to_token)}
    if vocab.tokenizer is not None:
        tok = hf.Tokenizer(hf.models.WordPiece(
            vocab=token_to_idx, unk_token="<unk>", continuing_subword_prefix=CONTINUATION,
            max_input_chars_per_word=MAX_WORD_CHARS))
        tok.decoder = hf.decoders.WordPiece(prefix=CONTINUATION, cleanup=False)
    else:
        tok = hf.Tokenizer(hf.models.WordLevel(vocab=token_to_idx, unk_token="<unk>"))
    tok.normalizer = hf.normalizers.Lowercase()  # bertlite: text.lower().split()
    tok.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
    cls, sep = vocab["<cls>"], vocab["<sep>"]
    tok.post_processor = hf.processors.TemplateProcessing(
        single="<cls> $A <sep>", pair="<cls> $A <sep> $B:1 <sep>:1",
        special_tokens=[("<cls>", cls), ("<sep>", sep)])
    tok.add_special_tokens(list(ROLES.values()))
    specials = dict(ROLES)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "model_max_length": max_len, "do_lower_case": True,
              "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    files = {"tokenizer.json": tok.to_str(),
             "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
             "special_tokens_map.json": json.dumps(specials, indent=2) + "\n"}
    if vocab.tokenizer is not None:
        files["vocab.txt"] = "".join(t + "\n" for t in vocab.idx_to_token)
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


def _lowercases(tok_json: dict[str, Any] | None, config: dict[str, Any]) -> bool:
    if "do_lower_case" in config:
        return bool(config["do_lower_case"])
    normalizer = (tok_json or {}).get("normalizer") or {}
    parts = normalizer.get("normalizers", [normalizer])
    return any(p.get("type") == "Lowercase" or p.get("lowercase") for p in parts
               if isinstance(p, dict))


def read_tokenizer(path: str | Path, vocab_size: int) -> tuple[Vocab, dict[str, Any]]:
    """The vocabulary of a ``transformers`` BERT folder's tokenizer (``tokenizer.json``, else
    ``vocab.txt``), its special tokens renamed to bertlite's names at their own ids, and what was
    read (``{"special_tokens": {bertlite name: (token, id)}, "lowercase": bool, "kind": ...}``).
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
    lowercase = _lowercases(tok_json, config)
    if kind == "WordPiece":
        vocab = WordPieceTokenizer.from_vocab(renamed).to_vocab()
    else:
        vocab = Vocab.from_tokens(renamed, unk_anywhere=True)
    return vocab, {"special_tokens": specials, "lowercase": lowercase, "kind": kind}
