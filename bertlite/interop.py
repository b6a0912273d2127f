"""The framework-neutral half of importing the book's models (d2l 0.17.6 ``BERTModel``):
sizes from parameter shapes, names to canonical names, the vocabulary, and the bertlite model.
Each backend's ``interop.py`` reads the framework's parameters and names; see there."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bertlite.config import BERTConfig
from bertlite.data.vocab import Vocab
from bertlite.model import Pretrained
from bertlite.registry import get_backend


def check_d2l_layout(net: Any, framework: str) -> None:
    """A TypeError unless ``net`` has the attributes of d2l's ``BERTModel`` (``encoder.blks``,
    ``hidden``, ``mlm``, ``nsp``); a ValueError when it has no encoder block."""
    blks = getattr(getattr(net, "encoder", None), "blks", None)
    if blks is None or not all(hasattr(net, a) for a in ("hidden", "mlm", "nsp")):
        raise TypeError(f"{type(net).__name__} is not d2l's BERTModel: it needs encoder.blks, "
                        f"hidden, mlm and nsp (d2l.{framework}.BERTModel of d2l 0.17.6)")
    if len(blks) == 0:
        raise ValueError("the d2l BERTModel has no encoder blocks (num_layers=0)")


def check_book_flavour(config: BERTConfig) -> None:
    """A ValueError unless ``config`` is the book's flavour, the only one d2l's BERTModel has
    (ReLU, no embedding LayerNorm, epsilon 1e-5, an untied decoder)."""
    if config.flavor != "book":
        raise ValueError("d2l's BERTModel has only the book's architecture; this model's "
                         f"options (activation {config.activation!r}, embedding_norm "
                         f"{config.embedding_norm}, layer_norm_eps {config.layer_norm_eps}, "
                         f"tie_decoder {config.tie_decoder}) are not it: export it with "
                         "model.to_hf(DIR) instead")


def d2l_num_heads(net: Any) -> int:
    """The one ``attention.num_heads`` of every encoder block of d2l's ``BERTModel``."""
    heads = {getattr(getattr(blk, "attention", None), "num_heads", None)
             for blk in net.encoder.blks}
    if len(heads) != 1 or not isinstance(next(iter(heads)), int):
        raise ValueError(f"cannot read the number of heads of the d2l model: its blocks give "
                         f"{sorted(map(str, heads))} for attention.num_heads (expected one int)")
    return heads.pop()


def infer_config(arrays: dict[str, np.ndarray], num_heads: int, dropout: float) -> BERTConfig:
    """The BERTConfig of canonical arrays: sizes from the shapes, or a ValueError."""
    needed = ("encoder.token_embedding.weight", "encoder.pos_embedding",
              "encoder.blks.0.ffn.dense1.weight")
    missing = [n for n in needed if n not in arrays]
    if missing:
        raise ValueError(f"the d2l model has no parameters {missing}; not a d2l BERTModel "
                         f"(its parameters: {sorted(arrays)[:8]} ...)")
    vocab_size, num_hiddens = arrays["encoder.token_embedding.weight"].shape
    pos = arrays["encoder.pos_embedding"].shape
    if len(pos) != 3 or pos[0] != 1 or pos[2] != num_hiddens:
        raise ValueError(f"encoder.pos_embedding has shape {tuple(pos)}, expected "
                         f"(1, max_len, {num_hiddens})")
    layers = {int(n.split(".")[2]) for n in arrays
              if n.startswith("encoder.blks.") and n.split(".")[2].isdigit()}
    try:
        return BERTConfig(vocab_size=int(vocab_size), num_hiddens=int(num_hiddens),
                          ffn_num_hiddens=int(arrays["encoder.blks.0.ffn.dense1.weight"].shape[0]),
                          num_heads=num_heads, num_layers=max(layers) + 1, dropout=dropout,
                          max_len=int(pos[1]))
    except ValueError as err:
        raise ValueError(f"the d2l model's sizes make no BERTConfig: {err}") from None


def canonical_arrays(named: dict[str, np.ndarray], canonical_name: Callable[[str], str],
                     d2l_name: Callable[[str], str]) -> dict[str, np.ndarray]:
    """d2l's named arrays under canonical names; two d2l names for one canonical name fail."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in named.items():
        canonical = canonical_name(name)
        if canonical in arrays:
            raise ValueError(f"the d2l parameters {d2l_name(canonical)!r} and {name!r} both map "
                             f"to {canonical!r}")
        arrays[canonical] = value
    return arrays


def as_vocab(vocab: Any, vocab_size: int) -> Vocab | None:
    """A bertlite Vocab of d2l's Vocab, a bertlite Vocab or a token list; None stays None."""
    if vocab is None:
        return None
    if isinstance(vocab, Vocab):
        result = vocab
    elif hasattr(vocab, "idx_to_token"):  # d2l.Vocab
        result = Vocab.from_tokens([str(t) for t in vocab.idx_to_token])
    elif isinstance(vocab, Sequence) and not isinstance(vocab, str) \
            and all(isinstance(t, str) for t in vocab):
        result = Vocab.from_tokens(list(vocab))
    else:
        raise TypeError(f"vocab must be d2l's Vocab, a bertlite.Vocab or a list of tokens, got "
                        f"{type(vocab).__name__}")
    if len(result) != vocab_size:
        raise ValueError(f"the vocabulary has {len(result)} tokens but the d2l model's token "
                         f"embedding has {vocab_size} rows: pass the vocab it was trained with")
    return result


def build_pretrained(framework: str, config: BERTConfig, arrays: dict[str, np.ndarray],
                     vocab: Any, devices: Any) -> Pretrained:
    """A bertlite model of ``framework`` with the imported (already checked) weights."""
    vocab = as_vocab(vocab, config.vocab_size)
    backend = get_backend(framework)
    devs = backend.parse_devices(devices)
    model = backend.build_model(config, devs)
    backend.load_state_dict(model, arrays)
    return Pretrained(model, backend, vocab, config, devs,
                      metadata={"imported_from": f"d2l BERTModel ({framework})"})

