"""Optimizer settings and the learning-rate schedule, computed in the core for every backend."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adam", "adamw")


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam(W) with an optional warmup and decay; the book's default is Adam at lr 0.01.

    Both backends implement exactly PyTorch's Adam/AdamW update (bias correction inside the
    denominator), so the same settings give the same steps in either framework.
    """

    lr: float = 0.01
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lr, (int, float)) or not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {self.clip_norm!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of the update that ends step ``step + 1`` (``step`` counts from 0)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant" or not self.total_steps:
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return asdict(self)
