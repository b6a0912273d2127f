"""Memory planning: what a configuration needs per device before training starts.

An estimate, not a measurement. Parameters, gradients and optimizer state are exact. The
activations are the tensors a training step keeps for the backward pass, counted from the
shapes as the torch backend saves them with dropout on (per encoder block and token: the Q/K/V
copies, the attention output, two dropout masks, two residual sums and two LayerNorm outputs,
the FFN's hidden activation; per attention score: softmax output, dropout mask and dropped
weights; the embeddings' output; the MLM head at every prediction slot, with float32
log-probabilities), plus the peak of the backward pass on top of them: the gradient of the
log-probabilities at the MLM head or, in a block, two gradients of the attention scores and one
of the FFN's hidden activation, whichever is larger.

Calibration (``tests/test_scale.py``): on the CPU the estimate's total was within 5% of the
measured growth of peak RSS over two training steps (float32, dropout on) for ten small
configurations (hidden 32-256, 1-8 layers, length 32-256, vocabulary 1,000-50,000), and for
one in bf16. It follows the torch backend's implementation: when that changes, rerun those
tests. It describes the operations that GPUs run; the torch backend's float32 CPU path (no
padding, a sparse last layer, the MLM decoder fused with its loss) needs 10-40% less. What it
does not count: the allocator's overhead (glibc keeps freed blocks resident, which added
another 10-40% to peak RSS here; CUDA's caching allocator and context), the data
pipeline, and the framework itself. It is high for torch without dropout, whose fused attention
keeps no (length x length) matrices, and it counts every prediction slot as used (real batches
pad about a third of them). Other backends save other tensors: take it as an order of
magnitude there.
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
                    num_devices: int = 1, host: bool = False) -> MemoryEstimate:
    """Peak training memory of one device for a global ``batch_size`` split over
    ``num_devices`` (pass the micro-batch size when accumulating gradients). Mixed precision
    keeps float32 weights, optimizer state, LayerNorm outputs and loss, adds half-precision
    copies of the weights and halves the other activations. ``host``: the device is the host
    (CPU training), which also holds the dropout masks the core draws for every step."""
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
    tokens = b * max_len
    # per block and token: q, k, v (3h), attention output (h), two dropout masks and two
    # residual sums (4h), the FFN's hidden activation (f); two LayerNorm outputs (2h) and their
    # statistics (4 values) stay float32
    per_block = tokens * (act * (8 * h + f) + 4 * (2 * h + 4))
    # per attention score (b, heads, L, L): softmax output, dropout mask, dropped weights
    scores = b * heads * max_len * max_len
    per_block += scores * 3 * act
    embeddings = tokens * h * 4  # the encoder's float32 input
    preds = b * max_num_mlm_preds(max_len)
    # the MLM head: three (preds, h) tensors and the float32 (preds, vocab) log-probabilities
    mlm_head = preds * (3 * h * act + 4 * v)
    saved = config.num_layers * per_block + embeddings + mlm_head
    if host and config.dropout > 0:
        # dropout masks are drawn on the host at the full shape in float32 (bertlite.dropout):
        # the next step's, drawn ahead while this step computes (bertlite.dropout_ahead), and
        # in mixed precision this step's too (the activations count their half-precision copy)
        copies = 1 if precision == "float32" else 2
        saved += copies * config.num_layers * (scores + 2 * tokens * h) * 4
    # The peak comes in backward, on top of what is saved: either at the MLM head (one float32
    # (preds, vocab) gradient) or, once the head's tensors are freed, in a block (two
    # gradients of the attention scores, one of the FFN's hidden activation).
    backward = max(preds * v * 4, tokens * f * act + 2 * scores * act - mlm_head)
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
