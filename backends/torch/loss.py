"""The core loss (:func:`bertlite.loss.bert_loss`) on torch tensors, and the book's helper."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bertlite.loss import bert_loss

from . import fast


class TorchLossOps:
    """The tensor operations :func:`bertlite.loss.bert_loss` needs, in torch; ``fast``: the
    cross-entropy of :func:`.fast.cross_entropy` (fused kernels where they run)."""

    def __init__(self, fast: bool = True) -> None:
        self.fast = fast

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-row cross-entropy; labels of any integer type (torch needs int64)."""
        if self.fast:
            return fast.cross_entropy(logits, labels)
        return F.cross_entropy(logits, labels.long(), reduction="none")

    @staticmethod
    def flatten(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)

    @staticmethod
    def sum(x: torch.Tensor) -> torch.Tensor:
        return x.sum()


OPS = TorchLossOps(fast=True)
PLAIN_OPS = TorchLossOps(fast=False)


def _get_batch_loss_bert(net: torch.nn.Module, loss: Any, vocab_size: int,
                         tokens_X: torch.Tensor, segments_X: torch.Tensor,
                         valid_lens_x: torch.Tensor, pred_positions_X: torch.Tensor,
                         mlm_weights_X: torch.Tensor, mlm_Y: torch.Tensor, nsp_y: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The book's helper: ``(mlm_l, nsp_l, l)`` of one batch, with the core loss.

    ``loss`` is accepted for the book's signature only: the per-example cross-entropy of
    :func:`bertlite.loss.bert_loss` is used whatever its reduction, so padded prediction slots
    (weight 0) never count (the book's mean-reduced ``nn.CrossEntropyLoss`` masks nothing).
    Under ``nn.DataParallel`` the wrapper is called on the whole batch.
    """
    ops = OPS if getattr(getattr(net, "module", net), "fast", False) else PLAIN_OPS
    _, mlm_Y_hat, nsp_Y_hat = net(tokens_X, segments_X, valid_lens_x.reshape(-1),
                                  pred_positions_X)
    return bert_loss(ops, mlm_Y_hat.reshape(-1, vocab_size), mlm_Y, mlm_weights_X, nsp_Y_hat,
                     nsp_y)
