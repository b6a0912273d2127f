"""The one BERT pretraining loss, formed from per-row cross-entropies a backend hands over.

    MLM loss = sum(mlm_ce * mlm_weights) / (mlm_weight_total + 1e-8)
    NSP loss = sum(nsp_ce) / num_examples
    loss     = MLM loss + NSP loss

The seam (:func:`bert_loss`): a backend computes the per-row softmax cross-entropies -- one per
MLM prediction slot, beside that slot's weight, and one per NSP example -- however it likes
(plain framework ops, or fused kernels that never hold the logits), and the core forms the loss
from them. The core uses only ``*``, ``/`` and ``.sum()`` on the backend's arrays (and
``.shape`` where it exists, to check), so any array type works: numpy, torch tensors, MXNet
arrays and MXNet symbols inside a hybridized graph. Padded prediction slots have weight 0 and
never count; the book's PyTorch tab takes the mean CE first and so masks nothing.

The normalizers are the WHOLE batch's (:func:`bertlite.sharding.normalizers`): a backend that
splits a batch into pieces (micro-batches, devices, processes) passes them for every piece, so
each piece's loss is its share of the batch loss, the shares add up to the one-piece loss, and
so do their gradients. Left out, they are those of the rows given.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["EPSILON", "RowLosses", "bert_loss", "bert_loss_numpy", "cross_entropy_numpy"]

#: added to the MLM normalizer: a batch without predicted positions has MLM loss 0, not NaN
EPSILON = 1e-8


class RowLosses(NamedTuple):
    """What a backend hands the core: per-row values as 1-d arrays of its own type."""

    mlm: Any  # (n,) cross-entropy of each MLM prediction slot
    mlm_weights: Any  # (n,) that slot's weight (0 for padding)
    nsp: Any  # (m,) cross-entropy of each NSP example


def _shape(x: Any) -> tuple[int, ...] | None:
    shape = getattr(x, "shape", None)  # an MXNet symbol has none
    return tuple(shape) if isinstance(shape, tuple) else None


def _check_rows(mlm_ce: Any, mlm_weights: Any, nsp_ce: Any) -> None:
    """A clear error for what would otherwise broadcast silently (the book's ``(n,) * (n, 1)``
    made an ``n x n`` matrix)."""
    shapes = {"mlm_ce": _shape(mlm_ce), "mlm_weights": _shape(mlm_weights),
              "nsp_ce": _shape(nsp_ce)}
    wrong = {k: s for k, s in shapes.items() if s is not None and len(s) != 1}
    if wrong:
        raise ValueError(f"bert_loss takes per-row values as 1-d arrays, got shapes {wrong}: "
                         "flatten them (reshape(-1)) first")
    if None not in (shapes["mlm_ce"], shapes["mlm_weights"]) \
            and shapes["mlm_ce"] != shapes["mlm_weights"]:
        raise ValueError(f"mlm_ce {shapes['mlm_ce']} and mlm_weights {shapes['mlm_weights']} "
                         "must have one value per prediction slot each")


def bert_loss(mlm_ce: Any, mlm_weights: Any, nsp_ce: Any, *, mlm_weight_total: Any = None,
              num_examples: Any = None) -> tuple[Any, Any, Any]:
    """``(mlm_loss, nsp_loss, mlm_loss + nsp_loss)`` as 0-d arrays of the backend's type.

    ``mlm_ce``, ``mlm_weights``: ``(n,)`` per-slot cross-entropies and weights; ``nsp_ce``:
    ``(m,)`` per-example cross-entropies (:class:`RowLosses`). ``mlm_weight_total`` and
    ``num_examples``: the whole batch's normalizers (numbers or 0-d arrays on the rows'
    device); by default ``mlm_weights.sum()`` and ``nsp_ce.shape[0]``.
    """
    _check_rows(mlm_ce, mlm_weights, nsp_ce)
    if mlm_weight_total is None:
        mlm_weight_total = mlm_weights.sum()
    if num_examples is None:
        num_examples = nsp_ce.shape[0]
    mlm_loss = (mlm_ce * mlm_weights).sum() / (mlm_weight_total + EPSILON)
    nsp_loss = nsp_ce.sum() / num_examples
    return mlm_loss, nsp_loss, mlm_loss + nsp_loss


def cross_entropy_numpy(logits: Any, labels: Any) -> np.ndarray:
    """Per-row softmax cross-entropy of ``(n, classes)`` logits and ``(n,)`` integer labels, in
    float64 (the reference the backends' cross-entropies are tested against)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    return -log_probs[np.arange(len(labels)), labels]


def bert_loss_numpy(mlm_logits: Any, mlm_labels: Any, mlm_weights: Any, nsp_logits: Any,
                    nsp_labels: Any) -> tuple[float, float, float]:
    """The loss of a batch's logits in float64 numpy: the reference the backends are tested
    against (``mlm_logits`` ``(..., vocab)`` with labels and weights of the leading shape)."""
    mlm_logits = np.asarray(mlm_logits)
    mlm_ce = cross_entropy_numpy(mlm_logits.reshape(-1, mlm_logits.shape[-1]), mlm_labels)
    weights = np.asarray(mlm_weights, dtype=np.float64).reshape(-1)
    mlm, nsp, total = bert_loss(mlm_ce, weights, cross_entropy_numpy(nsp_logits, nsp_labels))
    return float(mlm), float(nsp), float(total)
