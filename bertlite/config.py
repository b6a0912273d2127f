"""Model configuration: the sizes and flavour of a BERT, with presets and validation.

Two flavours share one network: the book's (``flavor="book"``: ReLU, no LayerNorm after the
embeddings, LayerNorm epsilon 1e-5, an untied MLM decoder) and standard BERT's
(``flavor="bert"``: exact-erf GELU, embedding LayerNorm, epsilon 1e-12, the MLM decoder tied to
the token embedding, as ``transformers``' ``BertForPreTraining``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

#: the architecture options of each flavour (every other field is a size)
FLAVORS: dict[str, dict[str, Any]] = {
    "book": dict(activation="relu", embedding_norm=False, layer_norm_eps=1e-5,
                 tie_decoder=False),
    "bert": dict(activation="gelu", embedding_norm=True, layer_norm_eps=1e-12,
                 tie_decoder=True),
}

ACTIVATIONS = ("relu", "gelu")


def _bert(layers: int, hidden: int) -> dict[str, Any]:
    # Turc et al. 2019 (the "well-read students" sizes): FFN 4H, heads H/64, 512 positions
    return dict(num_hiddens=hidden, ffn_num_hiddens=4 * hidden, num_heads=max(hidden // 64, 2),
                num_layers=layers, dropout=0.1, max_len=512, **FLAVORS["bert"])


PRESETS: dict[str, dict[str, Any]] = {
    # The book's small BERT (d2l, "BERT pretraining").
    "tiny": dict(num_hiddens=128, ffn_num_hiddens=256, num_heads=2, num_layers=2, dropout=0.2),
    # Devlin et al. 2018.
    "base": dict(num_hiddens=768, ffn_num_hiddens=3072, num_heads=12, num_layers=12, dropout=0.1),
    "large": dict(num_hiddens=1024, ffn_num_hiddens=4096, num_heads=16, num_layers=24, dropout=0.1),
    # standard BERT's architecture (flavor "bert") at the published sizes
    "bert-tiny": _bert(2, 128),
    "bert-mini": _bert(4, 256),
    "bert-small": _bert(4, 512),
    "bert-base": _bert(12, 768),
    "bert-large": _bert(24, 1024),
}


@dataclass(frozen=True)
class BERTConfig:
    """The sizes and flavour of a BERT model; both backends build the same network from it.

    ``max_len`` is the length of the learned positional-embedding table (the book uses 1000),
    so it bounds the ``max_len`` of the data. ``activation`` (``"relu"`` or ``"gelu"``, exact
    erf form) is the feed-forward networks' and the MLM head's; ``embedding_norm`` adds a
    LayerNorm (then dropout) after the sum of the embeddings; ``layer_norm_eps`` is every
    LayerNorm's epsilon; ``tie_decoder`` shares the MLM decoder's weight with the token
    embedding. The defaults are the book's flavour, which checkpoints without these fields are.
    """

    vocab_size: int
    num_hiddens: int = 128
    ffn_num_hiddens: int = 256
    num_heads: int = 2
    num_layers: int = 2
    dropout: float = 0.2
    max_len: int = 1000
    activation: str = "relu"
    embedding_norm: bool = False
    layer_norm_eps: float = 1e-5
    tie_decoder: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_hiddens", "ffn_num_hiddens", "num_heads", "num_layers",
                     "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BERTConfig.{name} must be a positive integer, got {value!r}")
        if self.num_hiddens % self.num_heads:
            raise ValueError(
                f"BERTConfig.num_hiddens ({self.num_hiddens}) must be divisible by num_heads "
                f"({self.num_heads}): each head gets num_hiddens / num_heads features")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BERTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BERTConfig.activation must be one of {list(ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        for name in ("embedding_norm", "tie_decoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BERTConfig.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"BERTConfig.layer_norm_eps must be a number in (0, 1), got {eps!r}")

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, *, flavor: str | None = None,
                    **overrides: Any) -> BERTConfig:
        """A preset (``tiny``, ``base``, ``large``, ``bert-tiny`` ... ``bert-large``) for a
        vocabulary, in another ``flavor`` (``"book"``, ``"bert"``) if given, fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
        if flavor is not None and flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
        fields = {**PRESETS[name], **(FLAVORS[flavor] if flavor else {}), **overrides}
        return cls(vocab_size=vocab_size, **fields)

    @property
    def flavor(self) -> str | None:
        """``"book"`` or ``"bert"`` when the architecture options are exactly one flavour's."""
        for name, options in FLAVORS.items():
            if all(getattr(self, k) == v for k, v in options.items()):
                return name
        return None

    @property
    def head_size(self) -> int:
        return self.num_hiddens // self.num_heads

    def replace(self, **changes: Any) -> BERTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BERTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown BERTConfig fields {sorted(unknown)}")
        return cls(**data)

    def num_parameters(self) -> int:
        """Parameter count of the whole model (encoder, MLM head, NSP head)."""
        h, f, v, n = self.num_hiddens, self.ffn_num_hiddens, self.vocab_size, self.num_layers
        embeddings = v * h + 2 * h + self.max_len * h + (2 * h if self.embedding_norm else 0)
        block = 4 * (h * h + h) + 2 * (2 * h) + (h * f + f) + (f * h + h)
        decoder = v if self.tie_decoder else h * v + v
        heads = (h * h + h) + (h * h + h) + 2 * h + decoder + (h * 2 + 2)
        return embeddings + n * block + heads

    def chance_losses(self) -> tuple[float, float]:
        """The MLM and NSP losses of a model that guesses uniformly: ln|V| and ln 2."""
        return math.log(self.vocab_size), math.log(2)


def resolve_config(config: str | BERTConfig | dict, vocab_size: int, *,
                   max_len: int | None = None) -> BERTConfig:
    """A BERTConfig for ``vocab_size`` from a preset name, a dict or a config."""
    if isinstance(config, BERTConfig):
        if config.vocab_size != vocab_size:
            config = config.replace(vocab_size=vocab_size)
    elif isinstance(config, dict):
        config = BERTConfig.from_dict({**config, "vocab_size": vocab_size})
    elif isinstance(config, str):
        config = BERTConfig.from_preset(config, vocab_size)
    else:
        raise TypeError(f"config must be a preset name, a dict or a BERTConfig, got {config!r}")
    if max_len is not None and max_len > config.max_len:
        raise ValueError(
            f"max_len {max_len} exceeds the positional-embedding table of the config "
            f"({config.max_len}); lower max_len or raise BERTConfig.max_len")
    return config
