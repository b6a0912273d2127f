"""The fast path: the training loss of a fast, hybridized :class:`~.model.BERTModel` in one
compiled graph, with a sparse last layer, and its mixed-precision variants.

:func:`loss_graph` is the one place that decides which path a loss takes: a model built with
``fast=True`` (its blocks on :data:`.kernels.FAST`) and hybridized -- as
``MXNetBackend(fast=True)`` builds it -- gets a :class:`PretrainingLoss` graph; anything else
(a plain model, an imperative one, the book's own net) the model's forward pass and the core
loss imperatively (:func:`.loss.shard_loss`).

:func:`sparse_forward` (torch's function of the same name and meaning, with Gluon's ``F``)
computes the last encoder block only where the loss reads it: keys and values at every token,
but queries, attention output, add & norm and the feed-forward network at ``<cls>`` and the
``pred_positions`` only -- a fixed ``(batch, 1 + preds)`` set of rows, so the graph keeps
static shapes. Same loss and gradients as the full computation (to float32 round-off) at about
two thirds of the encoder's work. Tracing the per-row cross-entropies
(:func:`.loss.output_row_losses`) and the core's ``bert_loss`` in the same graph makes reshaping
the ``(batch * preds, vocab)`` logits free instead of two copies of the largest tensor of the
step.

Mixed precision (:func:`low_precision_dense`) runs the ``Dense`` layers' matrix products in
bfloat16 (CPU, oneDNN) or float16 (GPU), as MXNet AMP's lists do (``FullyConnected`` is the
only op of this model in them), with float32 weights, gradients, LayerNorm, softmax and loss.
``mxnet.contrib.amp.init()`` cannot do it here: it wraps the legacy ``mx.sym`` / ``mx.nd``
operators, while this model is written with the numpy interface (``npx``), so it leaves the
graph unchanged; :func:`low_precision_dense` inserts the same ``amp_cast`` nodes while the loss
graph is traced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import mxnet as mx
import numpy as onp
from mxnet.gluon import nn

from bertlite.dropout import (
    attention_rows,
    encoder_masks,
    position_rows,
    scaled_rows,
    site_id,
)
from bertlite.loss import bert_loss

from .loss import output_row_losses
from .model import BERTModel, _parameter, flat_masks, row

__all__ = ["PretrainingLoss", "loss_graph", "low_precision_dense", "pretraining_loss",
           "shard_masks", "sparse_forward", "sparse_masks"]


def sparse_forward(model: BERTModel, F: Any, tokens: Any, segments: Any, valid_lens: Any,
                   pred_positions: Any, masks: Sequence[Any] | None = None) -> tuple[Any, Any]:
    """``(mlm_Y_hat, nsp_Y_hat)`` -- what the pretraining loss reads -- with the last encoder
    block computed only at ``<cls>`` and the ``pred_positions`` (a sparse last layer: every
    token is still a key). The values of the model's full forward pass (to float32 round-off),
    as torch's ``fast.sparse_forward``.

    ``F`` (Gluon's, the one argument torch's lacks) is ``mx.symbol`` while an enclosing graph is
    traced (:class:`PretrainingLoss`), or ``mx.ndarray`` on a model that is not hybridized; all
    four arrays are required (``valid_lens`` ``(batch,)``). ``masks``: the dropout masks
    (:func:`.model.flat_masks`), the last block's at its rows only (:func:`sparse_masks`);
    none: ``nn.Dropout``."""
    # rows (B, 1 + P): <cls> (position 0), then the predicted positions
    cls_position = F.np.zeros_like(F.npx.slice(pred_positions, begin=(None, 0), end=(None, 1)))
    rows = F.np.concatenate([cls_position, pred_positions], axis=1)
    encoder, ops = model.encoder, model.encoder._ops
    X = encoder.embed(F, tokens, segments, _parameter(F, encoder.pos_embedding, tokens))
    blocks = list(encoder.blks)
    masks = list(masks or ()) or [None] * (3 * len(blocks))
    for i, blk in enumerate(blocks[:-1]):
        X = blk(X, valid_lens, *masks[3 * i:3 * i + 3])
    queries = ops.gather_rows(F, X, rows)
    if blocks:  # the last block with only ``rows`` as queries and position-wise rows
        last = blocks[-1]
        attention, addnorm1, addnorm2 = masks[-3:]
        Y = last.addnorm1(queries, last.attention(queries, X, X, valid_lens, attention),
                          addnorm1)
        queries = last.addnorm2(Y, last.ffn(Y), addnorm2)
    mlm_Y_hat = model.mlm.decode(
        F, F.npx.slice(queries, begin=(None, 1, None), end=(None, None, None)))
    nsp_Y_hat = model.nsp(model.hidden(row(F, queries, 0)))
    return mlm_Y_hat, nsp_Y_hat


class PretrainingLoss(nn.HybridBlock):
    """``(mlm_loss, nsp_loss, loss)`` of a shard from the model's inputs, the labels and the
    whole batch's ``mlm_weight_total`` and ``num_examples`` (0-d float32 arrays): the model's
    :func:`sparse_forward` and ``bert_loss`` in one graph. Hybridize it; its parameters are the
    model's. ``masked``: the graph takes the dropout masks as its last inputs (as
    :func:`sparse_masks` gives them), in place of ``nn.Dropout``."""

    def __init__(self, net: nn.HybridBlock, masked: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net, self.masked = net, masked
        self.vocab_size = net.config.vocab_size

    def hybrid_forward(self, F, tokens, segments, valid_lens, pred_positions, mlm_weights,
                       mlm_labels, nsp_labels, mlm_weight_total, num_examples, *masks):
        if self.masked != bool(masks):
            raise ValueError(f"this loss graph takes {'the' if self.masked else 'no'} dropout "
                             f"masks, got {len(masks)}")
        mlm_Y_hat, nsp_Y_hat = sparse_forward(self.net, F, tokens, segments, valid_lens,
                                              pred_positions, masks)
        return bert_loss(*output_row_losses(F, mlm_Y_hat, nsp_Y_hat, mlm_weights, mlm_labels,
                                            nsp_labels, self.vocab_size),
                         mlm_weight_total=mlm_weight_total, num_examples=num_examples)


def sparse_masks(masks: Sequence[onp.ndarray], pred_positions: onp.ndarray
                 ) -> list[onp.ndarray]:
    """The full-shape masks (:func:`.model.flat_masks` of host arrays) with the last block's
    three taken at the rows :func:`sparse_forward` computes: ``<cls>``, then ``pred_positions``
    ``(batch, P)`` (attention ``(B, heads, 1 + P, L)``, add & norm ``(B, 1 + P, H)``)."""
    if not masks:
        return []
    positions = onp.asarray(pred_positions, dtype=onp.int64).reshape(len(masks[-1]), -1)
    rows = onp.concatenate([onp.zeros((len(positions), 1), onp.int64), positions], axis=1)
    examples = onp.arange(len(rows))[:, None]
    attention, addnorm1, addnorm2 = masks[-3:]
    # advanced indices around a slice: the indexed axes come first, (B, 1 + P, heads, L)
    attention = onp.ascontiguousarray(attention[examples, :, rows].transpose(0, 2, 1, 3))
    return [*masks[:-3], attention, addnorm1[examples, rows], addnorm2[examples, rows]]


def shard_masks(net, seed: int, step: int, pieces: Sequence[slice], length: int,
                pred_positions: onp.ndarray | None = None, valid_lens: onp.ndarray | None = None
                ) -> list[list[onp.ndarray]]:
    """The dropout masks (host float32, :func:`.model.flat_masks` order) of every piece of a
    step, each the rows of the one-process batch's masks at the piece's global rows: the same
    whatever the split (:mod:`bertlite.dropout`). ``pred_positions`` (the global batch's): the
    last block's masks only at the rows of the fast path's sparse last block, drawn there
    (:func:`sparse_masks` is their reference). ``valid_lens`` (the global batch's): only the
    rows at valid positions drawn, the others 0, which no valid position reads (padded keys
    get no attention weight). Empty when the model has no dropout."""
    config = net.config
    if config.dropout == 0:
        return []
    masks = []
    for rows in pieces:
        start, count = rows.start, rows.stop - rows.start
        lens = None if valid_lens is None else onp.asarray(valid_lens)[rows]
        if pred_positions is None:
            masks.append(flat_masks(encoder_masks(config, seed, step, start, count, length,
                                                  valid_lens=lens)))
            continue
        last = config.num_layers - 1
        first = encoder_masks(config, seed, step, start, count, length, valid_lens=lens,
                              layers=range(last))
        masks.append(flat_masks(first) + _sparse_rows(config, seed, step, last, start, length,
                                                      onp.asarray(pred_positions)[rows]))
    return masks


def _sparse_rows(config, seed: int, step: int, layer: int, row_start: int, length: int,
                 pred_positions: onp.ndarray) -> list[onp.ndarray]:
    """Layer ``layer``'s masks at the rows :func:`sparse_forward` computes (``<cls>``, then
    ``pred_positions``), drawn only there: what :func:`sparse_masks` takes of whole masks."""
    positions = onp.asarray(pred_positions, dtype=onp.int64).reshape(len(pred_positions), -1)
    rows = onp.concatenate([onp.zeros((len(positions), 1), onp.int64), positions], axis=1)
    examples = onp.arange(row_start, row_start + len(rows), dtype=onp.int64)

    def scaled(kind: str, index: onp.ndarray, row_length: int) -> onp.ndarray:
        return scaled_rows(seed, step, site_id(layer, kind), config.dropout, index, row_length)

    tokens = position_rows(examples[:, None], rows, length)  # (B, 1 + P)
    return [scaled("attention", attention_rows(examples, rows, config.num_heads, length),
                   length),  # (B, heads, 1 + P, L)
            scaled("addnorm1", tokens, config.num_hiddens),
            scaled("addnorm2", tokens, config.num_hiddens)]


# -- mixed precision ----------------------------------------------------------------------------

_SYMBOL_NPX = mx.symbol.numpy_extension


def _cast(x: Any, dtype: Any) -> Any:
    return mx.sym.amp_cast(x.as_nd_ndarray(), dtype=dtype).as_np_ndarray()


def _cast_parameter(x: Any, dtype: Any) -> Any:
    """``amp_cast`` of a parameter, through an ``identity`` first: ``amp_cast``'s backward
    ignores ``grad_req="add"`` (it writes, or drops, the gradient instead of adding it), so
    gradient accumulation over micro-batches lost every Dense layer's gradient. The identity
    adds its gradient properly and gives ``amp_cast`` a fresh buffer to write."""
    return _cast(mx.sym.identity(x.as_nd_ndarray()).as_np_ndarray(), dtype)


@contextlib.contextmanager
def low_precision_dense(dtype: Any) -> Iterator[None]:
    """While a graph is traced, every ``gluon.nn.Dense`` product (Gluon names it ``fwd``) runs
    in ``dtype``: ``amp_cast`` of its input, weight and bias, and of its output back to float32
    (so the gradients that reach the float32 weights are float32). Other matrix products
    (the LayerNorm kernel's reductions) stay float32."""
    original = _SYMBOL_NPX.fully_connected

    def fully_connected(x, weight, bias=None, *args, **kwargs):
        if kwargs.get("name") != "fwd":
            return original(x, weight, bias, *args, **kwargs)
        out = original(_cast(x, dtype), _cast_parameter(weight, dtype),
                       None if bias is None else _cast_parameter(bias, dtype), *args, **kwargs)
        return _cast(out, "float32")

    _SYMBOL_NPX.fully_connected = fully_connected
    try:
        yield
    finally:
        _SYMBOL_NPX.fully_connected = original


class _LowPrecisionLoss:
    """:class:`PretrainingLoss` compiled with :func:`low_precision_dense` (the graph is traced on
    the first call), sharing the model's float32 parameters."""

    def __init__(self, net: BERTModel, dtype: str, masked: bool = False) -> None:
        self.graph = PretrainingLoss(net, masked)
        self.graph.hybridize(static_alloc=True, static_shape=True)
        if dtype == "bfloat16":
            from mxnet.contrib.amp.amp import bfloat16 as dtype
        self.dtype = onp.dtype(dtype)

    def __call__(self, *args: Any) -> Any:
        if self.graph._cached_graph:
            return self.graph(*args)
        with low_precision_dense(self.dtype):
            return self.graph(*args)


def pretraining_loss(net: BERTModel, masked: bool = False) -> PretrainingLoss:
    """The net's compiled float32 loss graph (built and hybridized on first use, then kept);
    ``masked``: the one that takes dropout masks."""
    attr = "_bertlite_loss_graph" + ("_masked" if masked else "")
    graph = net.__dict__.get(attr)
    if graph is None:
        graph = PretrainingLoss(net, masked)
        graph.hybridize(static_alloc=True, static_shape=True)
        # kept outside Gluon's child registry: the graph is not part of the model's parameters
        object.__setattr__(net, attr, graph)
    return graph


def loss_graph(net: Any, dtype: str | None = None, masked: bool = False) -> Any:
    """The compiled loss of ``net`` when it takes the fast path (a fast, hybridized
    :class:`~.model.BERTModel`), with its Dense products in ``dtype`` (``"bfloat16"``,
    ``"float16"``; None: float32), taking dropout masks when ``masked`` (one graph each: a
    graph has a fixed input list); None for any other net (its loss is computed imperatively).
    """
    if not (isinstance(net, BERTModel) and net.fast and net._active):
        return None
    if dtype is None:
        return pretraining_loss(net, masked)
    attr = f"_bertlite_loss_graph_{dtype}" + ("_masked" if masked else "")
    graph = net.__dict__.get(attr)
    if graph is None:
        graph = _LowPrecisionLoss(net, dtype, masked)
        object.__setattr__(net, attr, graph)  # not a child block: no parameters of its own
    return graph
