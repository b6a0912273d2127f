"""The MXNet side of the loss seam: per-row cross-entropies handed to the core's formula
(:func:`bertlite.loss.bert_loss`), one loss per device shard.

This module computes the per-row values (:func:`output_row_losses`: one cross-entropy per MLM
prediction slot with its weight, one per NSP example), in the compiled graph of
:mod:`.fast` or imperatively (:func:`row_losses`); the core forms the loss. Here too the
per-shard loss (:func:`shard_loss`) and the book's helper :func:`_get_batch_loss_bert`.
Unlike the book, every shard's loss is normalized by the WHOLE batch (its total MLM weight and
its number of examples), so

* the shards' losses ADD UP (sum, not mean) to the loss of the batch on one device, and
* the shards' gradients, summed by ``trainer.step(1)``, are the one-device gradient:

the learning rate does not depend on how many devices share a batch.

A fast, hybridized :class:`~.model.BERTModel` computes each shard's loss in a second compiled
graph (:func:`.fast.loss_graph`); any other net runs its forward pass and the core loss here,
imperatively (:func:`shard_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mxnet as mx

from bertlite.loss import RowLosses, bert_loss

__all__ = ["_get_batch_loss_bert", "batch_totals", "cross_entropy", "output_row_losses",
           "row_losses", "shard_loss"]


def cross_entropy(F: Any, logits: Any, labels: Any) -> Any:
    """Per-row softmax cross-entropy of ``(n, classes)`` logits and ``(n,)`` labels (the fused
    log-softmax, then the label's entry); ``F``: ``mx.ndarray``, or ``mx.symbol`` inside a
    hybridized graph."""
    return -F.npx.pick(F.npx.log_softmax(logits, axis=-1), labels, axis=-1)


def output_row_losses(F: Any, mlm_Y_hat: Any, nsp_Y_hat: Any, mlm_weights: Any,
                      mlm_labels: Any, nsp_labels: Any, vocab_size: int) -> RowLosses:
    """The per-row values :func:`bertlite.loss.bert_loss` takes, from the model's outputs
    ``(batch, preds, vocab)`` and ``(batch, 2)`` and the batch's weights and labels: the one
    place both paths (the compiled graph, :class:`.fast.PretrainingLoss`, and the imperative
    :func:`row_losses`) compute them."""
    return RowLosses(cross_entropy(F, mlm_Y_hat.reshape((-1, vocab_size)), mlm_labels.reshape(-1)),
                     mlm_weights.reshape(-1), cross_entropy(F, nsp_Y_hat, nsp_labels.reshape(-1)))


def row_losses(net, shard: Sequence[Any], vocab_size: int, masks: Sequence[Any] = ()
               ) -> RowLosses:
    """The per-row values of one shard (its seven batch arrays in the book's order) through the
    net's forward pass, imperatively. ``masks``: the net's ``masks=`` (dropout masks)."""
    tokens, segments, valid_lens, pred_positions, mlm_weights, mlm_labels, nsp_labels = shard
    masks_arg = (list(masks),) if masks else ()  # the book's net takes four arrays
    _, mlm_Y_hat, nsp_Y_hat = net(tokens, segments, valid_lens.reshape(-1), pred_positions,
                                  *masks_arg)
    return output_row_losses(mx.ndarray, mlm_Y_hat, nsp_Y_hat, mlm_weights, mlm_labels,
                             nsp_labels, vocab_size)


def batch_totals(mlm_weights_X_shards: Sequence[Any]) -> tuple[list[Any], int]:
    """The whole batch's MLM weight sum, as a 0-d array on each shard's device (copies, no
    host synchronization), and the whole batch's number of examples."""
    partial = [w.sum() for w in mlm_weights_X_shards]
    totals = []
    for shard in mlm_weights_X_shards:
        total = None
        for p in partial:
            p = p.as_in_ctx(shard.ctx)
            total = p if total is None else total + p
        totals.append(total)
    return totals, sum(int(w.shape[0]) for w in mlm_weights_X_shards)


def shard_loss(net, graph: Any, shard: Sequence[Any], total: Any, num_examples: int,
               vocab_size: int, masks: Sequence[Any] = ()) -> tuple[Any, Any, Any]:
    """``(mlm_l, nsp_l, l)`` of one device shard (its seven batch arrays in the book's order),
    normalized by the whole batch's ``total`` MLM weight (a 0-d array on the shard's device)
    and ``num_examples``: through ``graph`` (a compiled loss, :func:`.fast.loss_graph`) when
    given, else the net's forward pass and ``bert_loss`` imperatively. ``masks``: the shard's
    dropout masks on its device (the graph's inputs, or the net's ``masks=``)."""
    if graph is not None:
        tokens, segments, valid_lens, pred_positions, mlm_weights, mlm_labels, nsp_labels = shard
        count = mx.np.array(num_examples, dtype="float32", ctx=tokens.ctx)
        return graph(tokens, segments, valid_lens.reshape(-1), pred_positions, mlm_weights,
                     mlm_labels, nsp_labels, total, count, *masks)
    return bert_loss(*row_losses(net, shard, vocab_size, masks), mlm_weight_total=total,
                     num_examples=num_examples)


def _get_batch_loss_bert(net, loss, vocab_size, tokens_X_shards, segments_X_shards,
                         valid_lens_x_shards, pred_positions_X_shards, mlm_weights_X_shards,
                         mlm_Y_shards, nsp_y_shards):
    """The book's helper: ``(mlm_ls, nsp_ls, ls)``, one 0-d loss per device shard.

    Each shard's losses are its SHARE of the batch loss (normalized by the whole batch's MLM
    weight sum and size), so ``sum(ls)`` -- not the mean -- is the batch loss, and backward on
    every shard followed by ``trainer.step(1)`` gives the one-device gradient. ``loss`` (the
    book passes ``gluon.loss.SoftmaxCELoss()``) is accepted for the book's signature; the
    cross-entropy is :func:`cross_entropy` (the same per-example values). A fast, hybridized
    bertlite ``BERTModel`` computes each shard's loss in one compiled graph
    (:func:`.fast.loss_graph`), any other net imperatively.
    """
    from .fast import loss_graph  # (fast builds on this module)

    del loss  # the formula is bertlite.loss.bert_loss
    totals, num_examples = batch_totals(mlm_weights_X_shards)
    graph = loss_graph(net)
    mlm_ls, nsp_ls, ls = [], [], []
    for *shard, total in zip(tokens_X_shards, segments_X_shards, valid_lens_x_shards,
                             pred_positions_X_shards, mlm_weights_X_shards, mlm_Y_shards,
                             nsp_y_shards, totals):
        mlm_l, nsp_l, l = shard_loss(net, graph, shard, total, num_examples, vocab_size)
        mlm_ls.append(mlm_l)
        nsp_ls.append(nsp_l)
        ls.append(l)
    return mlm_ls, nsp_ls, ls
