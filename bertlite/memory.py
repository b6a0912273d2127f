"""Memory planning: what a configuration needs per device before training starts.

An estimate, not a measurement. Parameters, gradients and optimizer state are exact. The
activations are the tensors a training step keeps for the backward pass plus the peak of the
backward pass on top of them; which tensors those are is the backend's: each supplies its
:class:`SavedTensors` (:meth:`bertlite.backend.Backend.saved_tensors`), counted here from the
shapes by one generic formula (:func:`estimate_memory`). The defaults are the book's model as
the torch backend runs it with dropout on (per encoder block and token: the Q/K/V copies, the
attention output, two dropout masks, two residual sums and two LayerNorm outputs, the FFN's
hidden activation; per attention score: softmax output, dropout mask and dropped weights; the
embeddings' output; the MLM head at every prediction slot, with float32 log-probabilities; at
the backward peak, the gradient of the log-probabilities at the MLM head or, in a block, two
gradients of the attention scores and one of the FFN's hidden activation, whichever is larger).
``bertlite plan`` uses them. Each backend's terms are calibrated against the peak memory of
real training steps (``tests/test_scale.py``); how closely, and what is not counted: see
:data:`bertlite.backends.torch.backend.SAVED_TENSORS` and
:data:`bertlite.backends.mxnet.backend.SAVED_TENSORS` (MXNet's compiled graph keeps about twice
the hidden-sized tensors per block and token, and the MLM head's logits beside their
log-probabilities).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from bertlite.config import BERTConfig
from bertlite.data.examples import max_num_mlm_preds

BYTES = {"float32": 4, "bf16": 2, "fp16": 2}
GIB = 1024 ** 3


@dataclass(frozen=True)
class SavedTensors:
    """A backend's activation-memory terms: how many values its training step keeps for the
    backward pass (in the activation dtype unless named float32), and what backward adds at its
    peak, as multiples of the shapes. :func:`estimate_memory` turns them into bytes."""

    #: per encoder block and token, x num_hiddens: q, k, v, attention output, two dropout
    #: masks, two residual sums
    block_hidden: int = 8
    #: per block and token, x ffn_num_hiddens: the FFN's hidden activation
    block_ffn: int = 1
    #: per block and token, float32 x num_hiddens: two LayerNorm outputs
    block_hidden_float32: int = 2
    #: per block and token, float32: the LayerNorms' statistics
    block_float32: int = 4
    #: per attention score (batch x heads x length x length): softmax output, dropout mask,
    #: dropped weights
    block_scores: int = 3
    #: per token, float32 x num_hiddens: the encoder's input
    embedding_hidden_float32: int = 1
    #: per MLM prediction slot, x num_hiddens: the head's three hidden tensors
    head_hidden: int = 3
    #: per prediction slot, float32 x vocab_size: the log-probabilities
    head_vocab_float32: int = 1
    #: backward's peak at the head: float32 (slots x vocab_size) gradients
    backward_head_vocab_float32: int = 1
    #: backward's peak in a block: gradients of the attention scores ...
    backward_scores: int = 2
    #: ... and of the FFN's hidden activation (per token, x ffn_num_hiddens)
    backward_ffn: int = 1
    #: bytes per element of the dropout masks drawn on the host (bertlite.dropout) as the
    #: backend holds them: 4 for float32 masks, 1 for bool keep masks, 0 for masks drawn where
    #: they are read (nothing held between steps)
    host_mask_bytes: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SavedTensors.{f.name} must be an integer >= 0, got {value!r}")


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
                    num_devices: int = 1, host: bool = False,
                    saved_tensors: SavedTensors | None = None) -> MemoryEstimate:
    """Peak training memory of one device for a global ``batch_size`` split over
    ``num_devices`` (pass the micro-batch size when accumulating gradients). Mixed precision
    keeps float32 weights, optimizer state, LayerNorm outputs and loss, adds half-precision
    copies of the weights and halves the other activations. ``host``: the device is the host
    (CPU training), which also holds the dropout masks the core draws for every step.
    ``saved_tensors``: the backend's activation terms (default: :class:`SavedTensors`'s)."""
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {sorted(BYTES)}, got {precision!r}")
    n_params = config.num_parameters()
    weights = 4 * n_params
    if precision != "float32":  # autocast's half-precision copies of the weights
        weights += BYTES[precision] * n_params
    moments = {"adam": 2, "adamw": 2, "sgd": 0}[optimizer] * 4 * n_params
    act = BYTES[precision]
    b = -(-batch_size // num_devices)
    h, f, heads, v = config.num_hiddens, config.ffn_num_hiddens, config.num_heads, \
        config.vocab_size
    terms = saved_tensors or SavedTensors()
    tokens = b * max_len
    per_block = tokens * (act * (terms.block_hidden * h + terms.block_ffn * f)
                          + 4 * (terms.block_hidden_float32 * h + terms.block_float32))
    scores = b * heads * max_len * max_len
    per_block += scores * terms.block_scores * act
    embeddings = tokens * h * 4 * terms.embedding_hidden_float32
    preds = b * max_num_mlm_preds(max_len)
    mlm_head = preds * (terms.head_hidden * h * act + 4 * v * terms.head_vocab_float32)
    saved = config.num_layers * per_block + embeddings + mlm_head
    if host and config.dropout > 0:
        # dropout masks drawn on the host at the full shape (bertlite.dropout), in the
        # backend's dtype (terms.host_mask_bytes), at the step: in float32 the model reads
        # them in place (the activations count them); in mixed precision the activations
        # count their half-precision copy, and the host keeps these
        copies = 0 if precision == "float32" else 1
        saved += (copies * config.num_layers * (scores + 2 * tokens * h)
                  * terms.host_mask_bytes)
    # The peak comes in backward, on top of what is saved: either at the MLM head or, once
    # the head's tensors are freed, in a block.
    backward = max(preds * v * 4 * terms.backward_head_vocab_float32,
                   (tokens * f * terms.backward_ffn + terms.backward_scores * scores) * act
                   - mlm_head)
    return MemoryEstimate(weights, 4 * n_params, moments, int(saved + backward))


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
