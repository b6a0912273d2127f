"""Hugging Face ``transformers`` BERT folders: the weights and ``config.json`` of
``BertForPreTraining`` (export and import), framework-neutral.

A bertlite model of standard BERT's flavour (:data:`bertlite.config.FLAVORS` ``"bert"``, or any
model with ``embedding_norm``) is exactly a ``BertForPreTraining``: the canonical names map one
to one (:func:`hf_names`), the positional table loses its leading axis, and a tied decoder is
written as ``transformers`` writes it (no ``cls.predictions.decoder.weight``). The tokenizer
files are :mod:`bertlite.hf_tokenizer`'s. Nothing here imports ``transformers`` or a framework:
the folder is ``safetensors`` and JSON, so export and import run in either backend; only the
tests and the example load the result with ``transformers``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bertlite.config import BERTConfig
from bertlite.errors import CheckpointError
from bertlite.params import init_params, parameter_shapes

__all__ = ["HF_ARCHITECTURES", "export_checkpoint", "export_hf", "from_hf", "from_hf_arrays",
           "hf_config", "hf_names", "load_init", "read_hf_folder", "to_hf_arrays",
           "write_hf_folder"]

#: the architectures whose weights import (the heads a folder lacks are initialised)
HF_ARCHITECTURES = ("BertForPreTraining", "BertForMaskedLM", "BertModel")
WEIGHTS = "model.safetensors"
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
            "flax_model.msgpack")


def hf_names(config: BERTConfig) -> dict[str, str]:
    """``{canonical name: BertForPreTraining name}`` for every parameter of ``config``."""
    names = {
        "encoder.token_embedding.weight": "bert.embeddings.word_embeddings.weight",
        "encoder.segment_embedding.weight": "bert.embeddings.token_type_embeddings.weight",
        "encoder.pos_embedding": "bert.embeddings.position_embeddings.weight",
        "encoder.ln.weight": "bert.embeddings.LayerNorm.weight",
        "encoder.ln.bias": "bert.embeddings.LayerNorm.bias",
        "hidden.weight": "bert.pooler.dense.weight", "hidden.bias": "bert.pooler.dense.bias",
        "mlm.dense.weight": "cls.predictions.transform.dense.weight",
        "mlm.dense.bias": "cls.predictions.transform.dense.bias",
        "mlm.ln.weight": "cls.predictions.transform.LayerNorm.weight",
        "mlm.ln.bias": "cls.predictions.transform.LayerNorm.bias",
        "mlm.decoder.weight": "cls.predictions.decoder.weight",
        "mlm.decoder.bias": "cls.predictions.bias",
        "nsp.output.weight": "cls.seq_relationship.weight",
        "nsp.output.bias": "cls.seq_relationship.bias",
    }
    block = {"attention.W_q": "attention.self.query", "attention.W_k": "attention.self.key",
             "attention.W_v": "attention.self.value", "attention.W_o": "attention.output.dense",
             "addnorm1.ln": "attention.output.LayerNorm", "ffn.dense1": "intermediate.dense",
             "ffn.dense2": "output.dense", "addnorm2.ln": "output.LayerNorm"}
    for i in range(config.num_layers):
        for ours, theirs in block.items():
            for kind in ("weight", "bias"):
                names[f"encoder.blks.{i}.{ours}.{kind}"] = \
                    f"bert.encoder.layer.{i}.{theirs}.{kind}"
    return {n: names[n] for n in parameter_shapes(config)}


def check_exportable(config: BERTConfig) -> None:
    """A ValueError unless ``config`` is exactly representable as a ``BertForPreTraining``."""
    if not config.embedding_norm:
        raise ValueError(
            "this model has the book's flavour (no LayerNorm after the embeddings), which "
            "transformers' BertForPreTraining cannot represent exactly; bertlite does not export "
            "an approximation. Train with the BERT flavour instead: config='bert-tiny' (or "
            "'bert-mini' ... 'bert-large', or BERTConfig.from_preset(name, vocab_size, "
            "flavor='bert'))")


def hf_config(config: BERTConfig, *, pad_token_id: int = 0) -> dict[str, Any]:
    """The ``config.json`` of a ``BertForPreTraining`` of ``config``."""
    check_exportable(config)
    return {
        "architectures": ["BertForPreTraining"], "model_type": "bert",
        "vocab_size": config.vocab_size, "hidden_size": config.num_hiddens,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.ffn_num_hiddens, "hidden_act": config.activation,
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.max_len, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": config.layer_norm_eps,
        "position_embedding_type": "absolute", "pad_token_id": pad_token_id,
        "tie_word_embeddings": config.tie_decoder, "dtype": "float32",
    }


def to_hf_arrays(state: dict[str, np.ndarray], config: BERTConfig) -> dict[str, np.ndarray]:
    """Canonical arrays under ``BertForPreTraining`` names (float32, contiguous)."""
    out = {}
    for ours, theirs in hf_names(config).items():
        value = np.asarray(state[ours], dtype=np.float32)
        out[theirs] = np.ascontiguousarray(value[0] if ours == "encoder.pos_embedding" else value)
    if not config.tie_decoder:  # untied, transformers reads the decoder's bias under its name
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].copy()
    return out


def config_from_hf(meta: dict[str, Any], source: str) -> BERTConfig:
    """The BERTConfig of a ``transformers`` BERT ``config.json``, or a CheckpointError naming
    what does not fit."""
    arch = meta.get("architectures") or ["BertModel"]
    if meta.get("model_type") != "bert" or not set(arch) & set(HF_ARCHITECTURES):
        raise CheckpointError(
            f"{source} is not a BERT checkpoint: model_type {meta.get('model_type')!r}, "
            f"architectures {arch}; bertlite imports {list(HF_ARCHITECTURES)}")
    problems = []
    if meta.get("hidden_act", "gelu") not in ("gelu", "relu"):
        problems.append(f"hidden_act {meta.get('hidden_act')!r} (bertlite has 'gelu', 'relu')")
    if meta.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {meta['position_embedding_type']!r}")
    if meta.get("type_vocab_size", 2) != 2:
        problems.append(f"type_vocab_size {meta['type_vocab_size']} (bertlite has 2 segments)")
    if meta.get("is_decoder") or meta.get("add_cross_attention"):
        problems.append("a decoder (is_decoder / add_cross_attention)")
    if problems:
        raise CheckpointError(f"{source}: this BERT cannot be represented in bertlite: "
                              + "; ".join(problems))
    try:
        dropout = float(meta.get("hidden_dropout_prob", 0.1))
        return BERTConfig(
            vocab_size=int(meta["vocab_size"]), num_hiddens=int(meta["hidden_size"]),
            ffn_num_hiddens=int(meta["intermediate_size"]),
            num_heads=int(meta["num_attention_heads"]),
            num_layers=int(meta["num_hidden_layers"]), dropout=dropout,
            max_len=int(meta.get("max_position_embeddings", 512)),
            activation=meta.get("hidden_act", "gelu"), embedding_norm=True,
            layer_norm_eps=float(meta.get("layer_norm_eps", 1e-12)),
            tie_decoder=bool(meta.get("tie_word_embeddings", True)))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: the BERT config does not make a bertlite config: "
                              f"{err!r}") from None


def _normalized_names(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``BertModel`` names with the ``bert.`` prefix; old ``gamma``/``beta`` as weight/bias;
    buffers and the decoder's duplicate bias dropped."""
    prefixed = not any(k.startswith("bert.") for k in arrays)
    out = {}
    for name, value in arrays.items():
        if name.endswith("position_ids") or name == "cls.predictions.decoder.bias":
            continue
        if prefixed and not name.startswith("cls."):
            name = "bert." + name
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight")
        out[name.replace("LayerNorm.beta", "LayerNorm.bias")] = value
    return out


def from_hf_arrays(arrays: dict[str, np.ndarray], config: BERTConfig, source: str, *,
                   seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """Canonical arrays of a ``transformers`` BERT's weights, and the canonical names that
    were missing and are initialised (the NSP head of a ``BertForMaskedLM``; both heads of a
    ``BertModel``). A CheckpointError names encoder weights that are missing, weights that are
    not BERT's and shapes that disagree with ``config.json``."""
    arrays = _normalized_names(arrays)
    names = hf_names(config)
    if config.tie_decoder:
        arrays.pop("cls.predictions.decoder.weight", None)  # transformers ties it too
    expected = set(names.values())
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise CheckpointError(f"{source} has weights that are not BERT's: {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    fresh = init_params(config, seed)
    heads = ("hidden.", "mlm.", "nsp.")
    missing = [n for n, h in names.items() if h not in arrays]
    lost = [n for n in missing if not n.startswith(heads)]
    if lost:
        raise CheckpointError(f"{source} lacks the encoder weights "
                              f"{[names[n] for n in lost][:5]}: not a complete BERT checkpoint")
    shapes = parameter_shapes(config)
    out, wrong = {}, []
    for ours, theirs in names.items():
        if theirs not in arrays:
            out[ours] = fresh[ours]
            continue
        value = np.asarray(arrays[theirs], dtype=np.float32)
        if ours == "encoder.pos_embedding":
            value = value[None]
        if value.shape != shapes[ours]:
            wrong.append(f"{theirs}: {tuple(np.shape(arrays[theirs]))}")
        out[ours] = value
    if wrong:
        raise CheckpointError(f"{source}: weights whose shapes disagree with its config.json "
                              f"({config.num_layers} layers, hidden {config.num_hiddens}, "
                              f"vocab {config.vocab_size}): {wrong[:5]}")
    return out, missing


def read_hf_folder(path: str | os.PathLike
                   ) -> tuple[BERTConfig, dict[str, Any], dict[str, np.ndarray]]:
    """``(config, config.json, weights)`` of a local ``transformers`` BERT folder. Weights are
    read from ``model.safetensors`` only: a folder with only pickled weights
    (``pytorch_model.bin``) is refused, never unpickled."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; give the folder transformers' "
                              "save_pretrained wrote (config.json, model.safetensors)")
    config_file = path / "config.json"
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json: not a transformers model folder") \
            from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file} cannot be read as JSON: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    config = config_from_hf(meta, str(path))
    weights = path / WEIGHTS
    if not weights.is_file():
        pickles = [p for p in _PICKLES if (path / p).exists()]
        if pickles:
            raise CheckpointError(
                f"{path} has its weights only as {pickles}, which bertlite does not read "
                "(unpickling runs arbitrary code). Convert it once where you trust it: "
                "BertForPreTraining.from_pretrained(DIR).save_pretrained(DIR2) writes "
                "model.safetensors")
        raise CheckpointError(f"{path} has no {WEIGHTS}: not a transformers model folder")
    try:
        arrays = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} cannot be read as safetensors: {err}") from None
    return config, meta, arrays


def write_hf_folder(out: str | os.PathLike, config: BERTConfig, state: dict[str, np.ndarray],
                    tokenizer_files: dict[str, str], *, pad_token_id: int = 0) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files into a new folder
    ``out``, all or nothing (written beside it, then renamed)."""
    from safetensors.numpy import save_file

    out = Path(out)
    meta = hf_config(config, pad_token_id=pad_token_id)  # refuses the book's flavour first
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty folder; choose a new --out")
    arrays = to_hf_arrays(state, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(arrays, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for name, text in tokenizer_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- the model ------------------------------------------------------------------------------------

def export_hf(model: Any, out: str | os.PathLike) -> Path:
    """Write a bertlite model (a :class:`~bertlite.model.Pretrained`) as a ``transformers``
    folder: ``BertForPreTraining.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)``
    load it offline and compute the same outputs. The book's flavour is refused (see
    :func:`check_exportable`); nothing is written then."""
    from bertlite.hf_tokenizer import tokenizer_files

    check_exportable(model.config)
    if model.vocab is None:
        raise ValueError("this model has no vocabulary (imported without one): a transformers "
                         "folder needs its tokenizer; load it with its vocab")
    files = tokenizer_files(model.vocab, model.config.max_len)
    return write_hf_folder(out, model.config, model.state_dict(), files,
                           pad_token_id=model.vocab["<pad>"])


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``bertlite export-hf``: a bertlite checkpoint folder (or the latest of a directory) as
    a ``transformers`` folder, read and written without a framework."""
    from bertlite.checkpoint import read_checkpoint
    from bertlite.hf_tokenizer import tokenizer_files

    ckpt = read_checkpoint(checkpoint)
    config, vocab = ckpt["config"], ckpt["vocab"]
    check_exportable(config)
    return write_hf_folder(out, config, ckpt["weights"], tokenizer_files(vocab, config.max_len),
                           pad_token_id=vocab["<pad>"])


def load_init(path: str | os.PathLike, seed: int = 0
              ) -> tuple[BERTConfig, dict[str, np.ndarray], Any, dict[str, Any]]:
    """``(config, canonical weights, vocabulary, metadata)`` of a local ``transformers`` BERT
    folder: what :func:`from_hf` builds a model of and ``train(init=...)`` starts from."""
    from bertlite.hf_tokenizer import read_tokenizer

    config, meta, arrays = read_hf_folder(path)
    weights, initialised = from_hf_arrays(arrays, config, str(path), seed=seed)
    vocab, tokenizer = read_tokenizer(path, config.vocab_size)
    if not tokenizer["lowercase"] and vocab.tokenizer is None:
        raise CheckpointError(f"{path} has a cased word-level tokenizer; bertlite's word "
                              "vocabulary lowercases every text, so it would not match: import "
                              "an uncased one (a cased WordPiece tokenizer imports as it is)")
    metadata = {"imported_from": f"transformers {meta.get('architectures', ['BertModel'])[0]} "
                                 f"({Path(path).resolve()})",
                "initialised": initialised, "tokenizer": tokenizer}
    return config, weights, vocab, metadata


def from_hf(path: str | os.PathLike, backend: Any = None, *, devices: Any = None,
            seed: int = 0) -> Any:
    """A bertlite model (:class:`~bertlite.model.Pretrained`) of ``backend`` from a local
    ``transformers`` BERT folder (``BertForPreTraining``; ``BertForMaskedLM`` or ``BertModel``
    with the missing heads initialised from ``seed``, listed in ``metadata["initialised"]``)
    and its WordPiece tokenizer, special tokens at their own ids. Never reads the network."""
    from bertlite.model import Pretrained
    from bertlite.registry import get_backend

    config, weights, vocab, metadata = load_init(path, seed)
    be = get_backend(backend)
    devs = be.parse_devices(devices)
    net = be.build_model(config, devs)
    be.load_state_dict(net, weights)
    return Pretrained(net, be, vocab, config, devs, metadata=metadata)
