"""Model configuration: the sizes of a BERT, with presets and validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The book's small BERT (d2l, "BERT pretraining").
    "tiny": dict(num_hiddens=128, ffn_num_hiddens=256, num_heads=2, num_layers=2, dropout=0.2),
    # Devlin et al. 2018.
    "base": dict(num_hiddens=768, ffn_num_hiddens=3072, num_heads=12, num_layers=12, dropout=0.1),
    "large": dict(num_hiddens=1024, ffn_num_hiddens=4096, num_heads=16, num_layers=24, dropout=0.1),
}


@dataclass(frozen=True)
class BERTConfig:
    """The sizes of a BERT model; both backends build the same network from it.

    ``max_len`` is the length of the learned positional-embedding table (the book uses 1000),
    so it bounds the ``max_len`` of the data.
    """

    vocab_size: int
    num_hiddens: int = 128
    ffn_num_hiddens: int = 256
    num_heads: int = 2
    num_layers: int = 2
    dropout: float = 0.2
    max_len: int = 1000

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

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides: Any) -> BERTConfig:
        """A preset (``tiny``, ``base``, ``large``) for a vocabulary, with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})

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
        embeddings = v * h + 2 * h + self.max_len * h
        block = 4 * (h * h + h) + 2 * (2 * h) + (h * f + f) + (f * h + h)
        heads = (h * h + h) + (h * h + h) + 2 * h + (h * v + v) + (h * 2 + 2)
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
