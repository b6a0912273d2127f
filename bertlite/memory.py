"""Memory planning: what a configuration needs per device before training starts.

An estimate, not a measurement: parameters, gradients and optimizer state are exact; the
activations kept for the backward pass are counted per layer from the shapes (the tensors a
post-LN encoder block saves, the attention matrices, the MLM head at the predicted positions).
The estimate is checked against measured peak memory in the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bertlite.config import BERTConfig
from bertlite.data.examples import max_num_mlm_preds

BYTES = {"float32": 4, "bf16": 2, "fp16": 2}
GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by kind."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        rows = [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state), ("activations", self.activations),
                ("total", self.total)]
        return "\n".join(f"{name:>16}  {value / GIB:8.2f} GiB" for name, value in rows)


def estimate_memory(config: BERTConfig, batch_size: int, max_len: int, *,
                    precision: str = "float32", optimizer: str = "adam",
                    num_devices: int = 1) -> MemoryEstimate:
    """Peak training memory of one device for a global ``batch_size`` split over
    ``num_devices`` (mixed precision keeps float32 weights and halves the activations)."""
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {sorted(BYTES)}, got {precision!r}")
    n_params = config.num_parameters()
    weights = 4 * n_params
    moments = {"adam": 2, "adamw": 2, "sgd": 0}[optimizer] * 4 * n_params
    act = BYTES[precision]
    b = -(-batch_size // num_devices)
    h, f, heads, v = config.num_hiddens, config.ffn_num_hiddens, config.num_heads, \
        config.vocab_size
    tokens = b * max_len
    # per block: inputs of the four projections, q/k/v, attention output, two add&norm
    # inputs and outputs, FFN input/hidden/activation, dropout masks (one byte each)
    per_block = tokens * (act * (11 * h + 2 * f) + (3 * h + f))
    # attention weights (and their dropout) per head: (b, heads, L, L)
    per_block += b * heads * max_len * max_len * (2 * act + 1)
    embeddings = tokens * h * (3 * act + 1)
    preds = b * max_num_mlm_preds(max_len)
    mlm_head = preds * (act * (4 * h + 2 * v))
    activations = config.num_layers * per_block + embeddings + mlm_head
    return MemoryEstimate(weights, weights, moments, int(activations))


def check_fits(estimate: MemoryEstimate, free_bytes: int | None, *, batch_size: int,
               max_len: int) -> None:
    """Fail fast, before any work, when the estimate exceeds the device's free memory."""
    if free_bytes is None or estimate.total <= free_bytes:
        return
    raise MemoryError(
        f"this configuration needs about {estimate.total / GIB:.1f} GiB per device "
        f"(activations {estimate.activations / GIB:.1f} GiB), but only "
        f"{free_bytes / GIB:.1f} GiB is free. Remedies: a smaller batch_size (with gradient "
        f"accumulation to keep the effective batch of {batch_size}), mixed precision "
        f"(precision='bf16'), a shorter max_len than {max_len}, or a smaller config")
