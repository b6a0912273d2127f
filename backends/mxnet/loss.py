"""The core loss (:func:`bertlite.loss.bert_loss`) on MXNet arrays, one loss per device shard.

The formula is the core's; this module only supplies its operations (:class:`MXNetLossOps`)
and the book's per-shard helper :func:`_get_batch_loss_bert`. Unlike the book, every shard's
loss is normalized by the WHOLE batch (its total MLM weight and its number of examples), so

* the shards' losses ADD UP (sum, not mean) to the loss of the batch on one device, and
* the shards' gradients, summed by ``trainer.step(1)``, are the one-device gradient:

the learning rate does not depend on how many devices share a batch.

For a hybridized :class:`~.model.BERTModel` the loss is computed inside a second compiled
graph (:class:`PretrainingLoss`, sharing the model's parameters): the model's sparse last layer
(:meth:`~.model.BERTModel.sparse_forward`, the last block only at ``<cls>`` and the predicted
positions) and ``bert_loss`` traced on symbols, so that reshaping the ``(batch * preds,
vocab)`` logits is free instead of two copies of the largest tensor of the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mxnet as mx
from mxnet.gluon import nn

from bertlite.loss import bert_loss

from .model import BERTModel

__all__ = ["MXNetLossOps", "PretrainingLoss", "_get_batch_loss_bert", "batch_totals",
           "pretraining_loss"]


class MXNetLossOps:
    """The operations :func:`bertlite.loss.bert_loss` needs, on ``mxnet.np`` arrays or, with
    ``F=mx.symbol``, on symbols inside a hybridized graph."""

    def __init__(self, F: Any = mx.ndarray) -> None:
        self.F = F

    def cross_entropy(self, logits: Any, labels: Any) -> Any:
        """Per-row softmax cross-entropy (the fused log-softmax, then the label's entry)."""
        return -self.F.npx.pick(self.F.npx.log_softmax(logits, axis=-1), labels, axis=-1)

    def flatten(self, x: Any) -> Any:
        return x.reshape(-1)

    def sum(self, x: Any) -> Any:
        return x.sum()


class _StaticLastAxis:
    """A symbol whose last dimension is known (``bert_loss`` reads ``logits.shape[-1]``)."""

    def __init__(self, symbol: Any, last: int) -> None:
        self.symbol, self.shape = symbol, (-1, last)

    def reshape(self, shape: tuple[int, ...]) -> Any:
        return self.symbol.reshape(shape)


class PretrainingLoss(nn.HybridBlock):
    """``(mlm_loss, nsp_loss, loss)`` of a shard from the model's inputs, the labels and the
    whole batch's ``mlm_weight_total`` and ``num_examples`` (0-d float32 arrays): the model's
    forward pass (its sparse last layer, :meth:`~.model.BERTModel.sparse_forward`) and
    ``bert_loss`` in one graph. Hybridize it; its parameters are the model's."""

    def __init__(self, net: nn.HybridBlock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = net
        self.vocab_size = net.config.vocab_size

    def hybrid_forward(self, F, tokens, segments, valid_lens, pred_positions, mlm_weights,
                       mlm_labels, nsp_labels, mlm_weight_total, num_examples):
        mlm_Y_hat, nsp_Y_hat = self.net.sparse_forward(F, tokens, segments, valid_lens,
                                                       pred_positions)
        if F is mx.symbol:
            mlm_Y_hat = _StaticLastAxis(mlm_Y_hat, self.vocab_size)
        return bert_loss(MXNetLossOps(F), mlm_Y_hat, mlm_labels, mlm_weights, nsp_Y_hat,
                         nsp_labels, mlm_weight_total=mlm_weight_total,
                         num_examples=num_examples)


def pretraining_loss(net) -> PretrainingLoss:
    """The net's compiled loss graph (built and hybridized on first use, then kept)."""
    graph = getattr(net, "_bertlite_loss_graph", None)
    if graph is None:
        graph = PretrainingLoss(net)
        graph.hybridize(static_alloc=True, static_shape=True)
        # kept outside Gluon's child registry: the graph is not part of the model's parameters
        object.__setattr__(net, "_bertlite_loss_graph", graph)
    return graph


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
               vocab_size: int) -> tuple[Any, Any, Any]:
    """``(mlm_l, nsp_l, l)`` of one device shard (its seven batch arrays in the book's order),
    normalized by the whole batch's ``total`` MLM weight (a 0-d array on the shard's device)
    and ``num_examples``: through ``graph`` (a compiled loss, :func:`pretraining_loss`) when
    given, else the net's forward pass and ``bert_loss`` imperatively."""
    tokens, segments, valid_lens, pred_positions, mlm_weights, mlm_labels, nsp_labels = shard
    if graph is not None:
        count = mx.np.array(num_examples, dtype="float32", ctx=tokens.ctx)
        return graph(tokens, segments, valid_lens.reshape(-1), pred_positions, mlm_weights,
                     mlm_labels, nsp_labels, total, count)
    _, mlm_Y_hat, nsp_Y_hat = net(tokens, segments, valid_lens.reshape(-1), pred_positions)
    return bert_loss(MXNetLossOps(), mlm_Y_hat.reshape((-1, vocab_size)), mlm_labels,
                     mlm_weights, nsp_Y_hat, nsp_labels, mlm_weight_total=total,
                     num_examples=num_examples)


def _get_batch_loss_bert(net, loss, vocab_size, tokens_X_shards, segments_X_shards,
                         valid_lens_x_shards, pred_positions_X_shards, mlm_weights_X_shards,
                         mlm_Y_shards, nsp_y_shards):
    """The book's helper: ``(mlm_ls, nsp_ls, ls)``, one 0-d loss per device shard.

    Each shard's losses are its SHARE of the batch loss (normalized by the whole batch's MLM
    weight sum and size), so ``sum(ls)`` -- not the mean -- is the batch loss, and backward on
    every shard followed by ``trainer.step(1)`` gives the one-device gradient. ``loss`` (the
    book passes ``gluon.loss.SoftmaxCELoss()``) is accepted for the book's signature; the
    cross-entropy is :class:`MXNetLossOps`' (the same per-example values). A hybridized
    bertlite ``BERTModel`` computes each shard's loss in one compiled graph
    (:func:`pretraining_loss`), any other net imperatively.
    """
    del loss  # the formula is bertlite.loss.bert_loss
    totals, num_examples = batch_totals(mlm_weights_X_shards)
    graph = pretraining_loss(net) if isinstance(net, BERTModel) and net._active else None
    mlm_ls, nsp_ls, ls = [], [], []
    for *shard, total in zip(tokens_X_shards, segments_X_shards, valid_lens_x_shards,
                             pred_positions_X_shards, mlm_weights_X_shards, mlm_Y_shards,
                             nsp_y_shards, totals):
        mlm_l, nsp_l, l = shard_loss(net, graph, shard, total, num_examples, vocab_size)
        mlm_ls.append(mlm_l)
        nsp_ls.append(nsp_l)
        ls.append(l)
    return mlm_ls, nsp_ls, ls
