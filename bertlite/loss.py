"""The one BERT pretraining loss, written once against a few tensor operations.

    MLM loss = sum(CE(mlm_logits, mlm_labels) * mlm_weights) / (sum(mlm_weights) + 1e-8)
    NSP loss = mean(CE(nsp_logits, nsp_labels))
    loss     = MLM loss + NSP loss

CE is per example, so padded prediction slots (weight 0) never count; the book's PyTorch tab
takes the mean CE first and so masks nothing. A backend supplies the operations (``LossOps``),
never the formula.

Backends that split a batch into shards (MXNet over several devices) pass the whole batch's
``mlm_weight_total`` and ``num_examples``: then each shard's loss is its share of the batch loss,
the shards' losses add up to the one-device loss, and so do their gradients.
"""

from __future__ import annotations

from typing import Any, Protocol

EPSILON = 1e-8


class LossOps(Protocol):
    """The tensor operations the loss needs from a framework."""

    def cross_entropy(self, logits: Any, labels: Any) -> Any:
        """Per-row softmax cross-entropy of ``(n, classes)`` logits and ``(n,)`` int labels."""

    def flatten(self, x: Any) -> Any:
        """``x`` as one dimension."""

    def sum(self, x: Any) -> Any:
        """The sum of all elements, as a scalar tensor."""


def bert_loss(ops: LossOps, mlm_logits: Any, mlm_labels: Any, mlm_weights: Any, nsp_logits: Any,
              nsp_labels: Any, *, mlm_weight_total: Any = None, num_examples: Any = None
              ) -> tuple[Any, Any, Any]:
    """``(mlm_loss, nsp_loss, mlm_loss + nsp_loss)`` as scalar tensors of the backend."""
    vocab_size = mlm_logits.shape[-1]
    mlm_ce = ops.cross_entropy(mlm_logits.reshape((-1, vocab_size)), ops.flatten(mlm_labels))
    weights = ops.flatten(mlm_weights)
    if mlm_weight_total is None:
        mlm_weight_total = ops.sum(weights)
    mlm_loss = ops.sum(mlm_ce * weights) / (mlm_weight_total + EPSILON)
    nsp_ce = ops.cross_entropy(nsp_logits, ops.flatten(nsp_labels))
    if num_examples is None:
        num_examples = nsp_ce.shape[0]
    nsp_loss = ops.sum(nsp_ce) / num_examples
    return mlm_loss, nsp_loss, mlm_loss + nsp_loss


def bert_loss_numpy(mlm_logits, mlm_labels, mlm_weights, nsp_logits, nsp_labels):
    """The same formula in float64 numpy: the reference the backends are tested against."""
    import numpy as np

    class _NumpyOps:
        @staticmethod
        def cross_entropy(logits, labels):
            logits = np.asarray(logits, dtype=np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            return -log_probs[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]

        flatten = staticmethod(lambda x: np.asarray(x).reshape(-1))
        sum = staticmethod(np.sum)

    mlm, nsp, total = bert_loss(_NumpyOps, np.asarray(mlm_logits), mlm_labels,
                                np.asarray(mlm_weights, dtype=np.float64), np.asarray(nsp_logits),
                                nsp_labels)
    return float(mlm), float(nsp), float(total)
