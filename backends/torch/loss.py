"""The torch side of the loss seam: per-row cross-entropies, handed to the core's formula.

:func:`row_losses` computes what :func:`bertlite.loss.bert_loss` takes -- one cross-entropy
per MLM prediction slot with its weight, one per NSP example, in float32 -- with plain torch
ops (``BERTModel.fast`` off) or the fast path (:mod:`.fast`: the sparse last layer and the
MLM decoder fused with its cross-entropy, only at slots of non-zero weight); the core forms the
loss from them.
:func:`batch_loss` is the per-batch loss of training, :func:`_get_batch_loss_bert` the book's
helper.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertlite.loss import RowLosses, bert_loss

from . import fast

__all__ = ["_get_batch_loss_bert", "batch_loss", "plain_cross_entropy", "row_losses"]


def plain_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of ``(n, classes)`` logits, labels of any integer type."""
    return F.cross_entropy(logits, labels.long(), reduction="none")


def _cross_entropy(net: nn.Module):
    """The per-row cross-entropy of ``net``: the fast path's where ``net.fast`` is on."""
    return fast.cross_entropy if getattr(net, "fast", False) else plain_cross_entropy


def row_losses(model: nn.Module, batch: Any,
               masks: list[dict[str, torch.Tensor]] | None = None) -> RowLosses:
    """The per-row float32 cross-entropies of a batch (a ``step.TorchBatch``) for
    :func:`bertlite.loss.bert_loss` (logits are cast before the cross-entropy, so under
    autocast too).

    With the fast path on (``BERTModel.fast``, the one switch) on the CPU, only the prediction
    slots of non-zero weight are rows (a third of the slots are padding in WikiText-2): the
    sparse last layer runs only there and at ``<cls>`` (:func:`.fast.sparse_encodings`, the
    encodings that :func:`.fast.sparse_forward` decodes), and the decoder is fused with the
    cross-entropy (:func:`.fast.decoder_cross_entropy`). The loss is the same, since padded
    slots have weight 0 in the formula. Otherwise (``fast=False``, GPUs, DataParallel) the
    book's path: the model on all slots, then the cross-entropy.

    ``masks``: the batch's dropout masks (``step.dropout_masks``), passed to the model.
    """
    net = model.module if isinstance(model, (nn.DataParallel, DistributedDataParallel)) \
        else model
    if (not net.fast or isinstance(model, nn.DataParallel)
            or batch.pred_positions.device.type != "cpu"):
        extra = {"masks": masks} if masks else {}
        _, mlm_Y_hat, nsp_Y_hat = model(batch.tokens, batch.segments, batch.valid_lens,
                                        batch.pred_positions, **extra)
        cross_entropy = _cross_entropy(net)
        mlm_Y_hat = mlm_Y_hat.float()
        return RowLosses(cross_entropy(mlm_Y_hat.reshape(-1, mlm_Y_hat.shape[-1]),
                                       batch.mlm_labels.reshape(-1)),
                         batch.mlm_weights.reshape(-1),
                         cross_entropy(nsp_Y_hat.float(), batch.nsp_labels.reshape(-1)))
    weights = batch.mlm_weights.reshape(-1)
    used = torch.nonzero(weights).reshape(-1)  # a data-dependent size: fine on the CPU
    rows = net.mlm.rows(batch.tokens, batch.pred_positions).index_select(0, used)
    # the (DDP-wrapped) model's sparse last layer; the MLM head after it, fused with its loss
    encoded_rows, nsp_Y_hat = fast.sparse_encodings(model, batch.tokens, batch.segments,
                                                    batch.valid_lens, rows, masks or None)
    mlm_ce = fast.decoder_cross_entropy(net.mlm, encoded_rows,
                                        batch.mlm_labels.reshape(-1).index_select(0, used))
    return RowLosses(mlm_ce, weights.index_select(0, used),
                     fast.cross_entropy(nsp_Y_hat.float(), batch.nsp_labels.reshape(-1)))


def batch_loss(model: nn.Module, batch: Any, *, mlm_weight_total: Any = None,
               num_examples: Any = None, masks: list[dict[str, torch.Tensor]] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mlm_loss, nsp_loss, loss)`` of a batch: :func:`bertlite.loss.bert_loss` of its
    :func:`row_losses`. A part of a larger batch passes that batch's ``mlm_weight_total`` and
    ``num_examples`` (:func:`bertlite.sharding.normalizers`)."""
    return bert_loss(*row_losses(model, batch, masks), mlm_weight_total=mlm_weight_total,
                     num_examples=num_examples)


def _get_batch_loss_bert(net: torch.nn.Module, loss: Any, vocab_size: int,
                         tokens_X: torch.Tensor, segments_X: torch.Tensor,
                         valid_lens_x: torch.Tensor, pred_positions_X: torch.Tensor,
                         mlm_weights_X: torch.Tensor, mlm_Y: torch.Tensor, nsp_y: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The book's helper: ``(mlm_l, nsp_l, l)`` of one batch, with the core loss.

    ``loss`` is accepted for the book's signature only: the per-example cross-entropy is used
    whatever its reduction, so padded prediction slots (weight 0) never count (the book's
    mean-reduced ``nn.CrossEntropyLoss`` masks nothing). Under ``nn.DataParallel`` the wrapper
    is called on the whole batch.
    """
    cross_entropy = _cross_entropy(getattr(net, "module", net))
    _, mlm_Y_hat, nsp_Y_hat = net(tokens_X, segments_X, valid_lens_x.reshape(-1),
                                  pred_positions_X)
    return bert_loss(cross_entropy(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y.reshape(-1)),
                     mlm_weights_X.reshape(-1), cross_entropy(nsp_Y_hat, nsp_y.reshape(-1)))
