"""The torch backend's fast path: training on the CPU in float32, with the same loss and
gradients as the plain model of :mod:`.model` (to float32 round-off), in a fraction of its
time. ``BERTModel.fast`` (default True; ``TorchBackend(fast=False)``) is the one switch;
:func:`supported` says where the kernels can run, and everything else takes the plain path.

* packing: the position-wise layers run on the valid tokens only; attention runs per group
  of examples of similar length, each padded to its longest (:mod:`.packing`);
* a sparse last layer (:func:`sparse_forward`, the same function as MXNet's): the last layer
  computes its queries, output projection and FFN only at ``<cls>`` and the positions the loss
  reads (:func:`.packing.select`), every token still a key. The loss (:func:`.loss.row_losses`)
  calls its lower level, :func:`sparse_encodings`, at the slots of non-zero weight only, to
  hand the encodings to the decoder fused with the cross-entropy;
* hand-written backward passes (:class:`Projections`, :class:`.kernels.Attention`,
  :class:`Output`, :class:`.kernels.FFN`) that allocate and copy as little as they can; dense
  layers as oneDNN matmuls with the bias (and ReLU) in their epilogue;
* the MLM decoder fused with its cross-entropy (:func:`decoder_cross_entropy`), a chunked
  cross-entropy for other logits (:func:`cross_entropy`: the per-row values the core's loss
  takes, :mod:`.loss`), dropout masks from 16-bit random numbers (:mod:`.kernels`).

Nothing that the loss reads changes: padded positions never reach a valid one (their keys get
no attention weight). The encodings of padded positions, which no loss reads, are returned as
zeros on this path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .kernels import (
    FFN,
    FUSED_LINEAR,
    Attention,
    CrossEntropy,
    DecoderCrossEntropy,
    DropoutAdd,
    LayerMasks,
    dropout,
    keep_mask,
    linear,
    mkldnn_linear,
    uses_keep_mask,
)
from .packing import (
    Packing,
    group_views,
    heads_to_rows,
    heads_to_slots,
    pack,
    rows_to_heads,
    select,
)

if TYPE_CHECKING:
    from .model import AddNorm, BERTModel, EncoderBlock, MaskLM, MultiHeadAttention


def supported(model: BERTModel, tensor: torch.Tensor) -> bool:
    """Whether the fast path runs for ``model`` on inputs like ``tensor``: the switch
    ``model.fast`` is on, torch has oneDNN's fused linear, and it is float32 on the CPU outside
    autocast and ``torch.compile`` (GPUs, autocast and compiled models take the plain path)."""
    return (model.fast and FUSED_LINEAR and tensor.device.type == "cpu"
            and model.encoder.pos_embedding.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def packs(model: BERTModel, tokens: torch.Tensor, valid_lens: torch.Tensor | None) -> bool:
    """Whether ``model.forward`` packs the valid tokens: :func:`supported`, training mode (in
    eval mode the encodings of padded positions are returned as computed), ``valid_lens``
    given and no empty example (an empty example attends to its padding)."""
    return (model.training and valid_lens is not None and tokens.numel() > 0
            and supported(model, tokens) and bool((valid_lens > 0).all()))


# -- the packed layers ------------------------------------------------------------------------

class Projections(torch.autograd.Function):
    """Projections (Q, K, V: weight and bias pairs) of the layer's input ``x``, as every
    group's heads of ``layout``: ``groups`` outputs per projection.

    ``x`` is gathered into the slots once and projected there. The padded slots (6% of them
    on WikiText-2) hold copies of some valid row instead of zeros, one gather instead of a fill
    and a scatter: harmless, since attention gives padded keys exactly zero weight and drops
    padded queries' outputs, so that their gradients are exactly zero too. The backward adds
    the input gradients of the projections in the GEMMs (``addmm_``)."""

    @staticmethod
    def forward(ctx, x, layout, num_heads, *params):
        ctx.layout, ctx.num_heads, ctx.num_rows = layout, num_heads, x.shape[0]
        slots = x.index_select(0, layout.gather)
        weights, biases = params[0::2], params[1::2]
        ctx.save_for_backward(slots, *weights)
        ctx.has_bias = biases[0] is not None
        outputs = []
        for w, b in zip(weights, biases):
            outputs += group_views(mkldnn_linear(slots, w, b), layout, num_heads)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        slots, *weights = ctx.saved_tensors
        layout, num_groups = ctx.layout, len(ctx.layout.groups)
        grad_slots, params = None, []
        for i, w in enumerate(weights):
            g = heads_to_slots(grads[i * num_groups:(i + 1) * num_groups], layout,
                                ctx.num_heads)
            params += [g.t().mm(slots), g.sum(0) if ctx.has_bias else None]
            grad_slots = g.mm(w) if grad_slots is None else grad_slots.addmm_(g, w)
        grad = grad_slots.index_select(0, layout.rows)
        if layout.inputs is not None:  # a subset of the input's rows
            grad = grad.new_zeros(ctx.num_rows, grad.shape[1]).index_copy_(0, layout.inputs,
                                                                             grad)
        return (grad, None, None, *params)



class Output(torch.autograd.Function):
    """Every group's attention heads back to packed rows, then ``W_o`` (input: the packed
    ``W_o``, its bias, then one tensor per group)."""

    @staticmethod
    def forward(ctx, packing, num_heads, weight, bias, *heads):
        ctx.packing, ctx.num_heads = packing, num_heads
        rows = heads_to_rows(heads, packing, num_heads)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return mkldnn_linear(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad_w, grad_b = grad.t().mm(rows), grad.sum(0) if ctx.has_bias else None
        grad_heads = rows_to_heads(grad.mm(weight), ctx.packing, ctx.num_heads)
        return (None, None, grad_w, grad_b, *grad_heads)



def unpack(X: torch.Tensor, packing: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed encodings as a padded ``(batch, length, hidden)`` batch (zeros at the padded
    positions) and the ``(batch, hidden)`` encodings of the ``<cls>`` tokens; their backward
    adds both gradients without full-size temporaries."""
    b, n = packing.batch_size, packing.length
    padded, cls = Unpack.apply(X, packing.padded_rows, b * n, packing.cls_rows)
    return padded.view(b, n, -1), cls


class Unpack(torch.autograd.Function):
    """Packed rows as ``(padded rows, the rows at cls_rows)``: ``padded[index] = x`` in zero
    rows, and the ``<cls>`` encodings, whose gradients the backward adds in place (autograd
    would add a full-size zero tensor for them)."""

    @staticmethod
    def forward(ctx, x, index, num_rows, cls_rows):
        ctx.save_for_backward(index, cls_rows)
        padded = x.new_zeros(num_rows, x.shape[1]).index_copy_(0, index, x)
        return padded, x.index_select(0, cls_rows)

    @staticmethod
    def backward(ctx, grad_padded, grad_cls):
        index, cls_rows = ctx.saved_tensors
        if grad_padded is None:
            grad = grad_cls.new_zeros(index.shape[0], grad_cls.shape[1])
        else:
            grad = grad_padded.index_select(0, index)
        if grad_cls is not None:
            grad.index_add_(0, cls_rows, grad_cls)
        return grad, None, None, None



def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row softmax cross-entropy (``reduction="none"``) of ``(n, classes)`` logits and
    integer labels: the chunked :class:`.kernels.CrossEntropy` for float32 CPU logits that need
    a gradient; else ``F.cross_entropy``."""
    labels = labels.long()
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[1] > 2 and logits.requires_grad and torch.is_grad_enabled()):
        return CrossEntropy.apply(logits, labels)
    return F.cross_entropy(logits, labels, reduction="none")


def decoder_cross_entropy(mlm: MaskLM, rows: torch.Tensor, labels: torch.Tensor
                          ) -> torch.Tensor:
    """Per-row cross-entropy of the MLM head's float32 logits of encodings ``(rows, hidden)``
    and ``(rows,)`` labels: where the kernels run, the decoder fused with the cross-entropy
    (:class:`.kernels.DecoderCrossEntropy`, the logits never held whole); else the head's
    logits and :func:`cross_entropy`."""
    labels = labels.long().reshape(-1)
    if not (FUSED_LINEAR and rows.device.type == "cpu" and torch.is_grad_enabled()
            and rows.dtype == mlm.decoder.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")):
        return cross_entropy(mlm.decode(rows).float(), labels)
    hidden = mlm.ln(linear(rows, mlm.dense.weight, mlm.dense.bias,
                           activation=mlm.activation))
    return DecoderCrossEntropy.apply(hidden, mlm.decoder.weight, mlm.decoder.bias, labels)


# -- the packed forward -----------------------------------------------------------------------

def _groups(packing: Packing, queries: Packing | None
            ) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """Per attention group: its examples, their query positions ``(size, queries)`` (with
    ``queries``, :func:`select`'s; padded query slots read position 0, their outputs are
    dropped; None: the first ``keys``) and its number of keys."""
    groups, first = [], 0
    for g, (size, n, _) in enumerate(packing.groups):
        members = packing.order[first:first + size]
        positions = None
        if queries is not None:
            _, m, start = queries.groups[g]
            slots = torch.zeros(queries.num_slots, dtype=torch.int64, device=members.device)
            slots[queries.rows] = queries.positions
            positions = slots[start:start + size * m].view(m, size).t()  # (size, m)
        groups.append((members, positions, n))
        first += size
    return groups


def group_keeps(keep: torch.Tensor, packing: Packing, queries: Packing | None = None
                ) -> list[torch.Tensor]:
    """Every attention group's ``(size * heads, queries, keys)`` elements of a full-shape
    attention dropout mask ``keep`` ``(batch, heads, length, length)``: its examples, their
    query positions (:func:`_groups`) and the group's keys. The reference for
    :meth:`.kernels.LayerMasks.attention`, which draws only these elements."""
    keeps = []
    for members, positions, n in _groups(packing, queries):
        if positions is None:
            part = keep.index_select(0, members)[:, :, :n, :n]
        else:  # advanced indices around a slice: (size, m, heads, n)
            part = keep[members.unsqueeze(1), :, positions, :n].transpose(1, 2)
        keeps.append(part.reshape(-1, part.shape[2], part.shape[3]))
    return keeps


def _attention_keeps(masks: LayerMasks | dict[str, torch.Tensor], packing: Packing,
                     queries: Packing | None) -> list[torch.Tensor]:
    """The groups' scaled attention masks: drawn where read, or gathered from a full mask."""
    if isinstance(masks, LayerMasks):
        return [masks.attention(members, positions, n)
                for members, positions, n in _groups(packing, queries)]
    return group_keeps(masks["attention"], packing, queries)


def _row_keep(masks: LayerMasks | dict[str, torch.Tensor] | None, kind: str, layout: Packing
              ) -> torch.Tensor | None:
    """An add & norm site's scaled mask at the layout's rows: drawn there, or gathered."""
    if masks is None:
        return None
    if isinstance(masks, LayerMasks):
        return masks.rows(kind, layout.padded_rows)
    keep = masks[kind]
    return keep.reshape(-1, keep.shape[-1]).index_select(0, layout.padded_rows)


def attention(mha: MultiHeadAttention, X: torch.Tensor, packing: Packing,
              queries: Packing | None = None,
              masks: LayerMasks | dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Self-attention of packed rows ``(tokens, hidden)``; with ``queries`` (:func:`select`)
    only for those rows, every row a key. ``masks``: the layer's dropout masks (a
    :class:`.kernels.LayerMasks`, or full-shape scaled masks by site), else one drawn here
    when training."""
    num_heads = mha.num_heads
    scale = 1.0 / math.sqrt(X.shape[-1] // num_heads)
    bias = mha.W_q.bias
    # the 1/sqrt(head_size) of the scores folded into W_q (exact for power-of-2 sizes)
    wq, bq = mha.W_q.weight * scale, None if bias is None else bias * scale
    kv = (mha.W_k.weight, mha.W_k.bias, mha.W_v.weight, mha.W_v.bias)
    num_groups = len(packing.groups)
    if queries is None:
        heads = Projections.apply(X, packing, num_heads, wq, bq, *kv)
        qs, heads = heads[:num_groups], heads[num_groups:]
    else:
        qs = Projections.apply(X, queries, num_heads, wq, bq)
        heads = Projections.apply(X, packing, num_heads, *kv)
    ks, vs = heads[:num_groups], heads[num_groups:]
    p = mha.dropout.p
    keeps: list[torch.Tensor | None] = [None] * num_groups
    if masks is not None:
        keeps = [k.to(X.dtype) for k in _attention_keeps(masks, packing, queries)]
    elif uses_keep_mask(p, mha.training):  # all groups' dropout masks drawn at once
        layout = packing if queries is None else queries
        shapes = [(size * num_heads, m, n) for (size, m, _), (_, n, _)
                  in zip(layout.groups, packing.groups)]
        keep = keep_mask((sum(math.prod(s) for s in shapes),), p, X.dtype)
        keeps = [m.view(s) for m, s in zip(keep.split([math.prod(s) for s in shapes]), shapes)]
    outputs = [Attention.apply(q, k, v, key_mask, keep)
               for q, k, v, key_mask, keep in zip(qs, ks, vs, packing.key_masks, keeps)]
    return Output.apply(packing if queries is None else queries, num_heads, mha.W_o.weight,
                        mha.W_o.bias, *outputs)


def add_norm(addnorm: AddNorm, X: torch.Tensor, Y: torch.Tensor,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    """``ln(dropout(Y) + X)`` on rows, the dropout and the residual addition in one pass.
    ``keep``: ``Y``'s scaled dropout mask (the layer's, at these rows), else one drawn here
    when training."""
    if keep is not None:
        return addnorm.ln(DropoutAdd.apply(X, Y, keep.to(Y.dtype)))
    p = addnorm.dropout.p
    if not uses_keep_mask(p, addnorm.training):
        return addnorm.ln(F.dropout(Y, p, addnorm.training) + X)
    return addnorm.ln(DropoutAdd.apply(X, Y, keep_mask(Y.shape, p, Y.dtype)))


def block(blk: EncoderBlock, X: torch.Tensor, packing: Packing,
          queries: Packing | None = None,
          masks: LayerMasks | dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The encoder block on packed rows ``(tokens, hidden)``; with ``queries``
    (:func:`select`) it returns those rows only. ``masks``: its dropout masks (a
    :class:`.kernels.LayerMasks`, which draws only the elements read, or one layer of
    :func:`bertlite.dropout.encoder_masks` as full-shape tensors)."""
    Y = attention(blk.attention, X, packing, queries, masks)
    if queries is not None:
        X = X.index_select(0, queries.inputs)
    layout = packing if queries is None else queries
    Y = add_norm(blk.addnorm1, X, Y, _row_keep(masks, "addnorm1", layout))
    ffn = blk.ffn
    return add_norm(blk.addnorm2, Y, FFN.apply(Y, ffn.dense1.weight, ffn.dense1.bias,
                                               ffn.dense2.weight, ffn.dense2.bias,
                                               ffn.activation),
                    _row_keep(masks, "addnorm2", layout))


def encode(model: BERTModel, tokens: torch.Tensor, segments: torch.Tensor,
           valid_lens: torch.Tensor, rows: torch.Tensor | None = None,
           masks: Sequence[dict[str, torch.Tensor]] | None = None
           ) -> tuple[torch.Tensor, Packing]:
    """The encodings of the valid tokens only, as packed rows ``(tokens, hidden)``, and where
    they are (:class:`Packing`; :func:`unpack` makes them a padded batch). With ``rows``
    (indices ``example * length + position``) the last layer computes only the encodings at
    those positions and the ``<cls>`` tokens (:func:`select`). ``masks``: the full-shape
    dropout masks per layer (:meth:`.model.BERTModel.forward`)."""
    encoder = model.encoder
    batch_size, length = tokens.shape
    packing = pack(valid_lens, batch_size, length)
    tokens = tokens.reshape(-1).index_select(0, packing.padded_rows)
    segments = segments.reshape(-1).index_select(0, packing.padded_rows)
    # segment and position embeddings as one lookup in their (2 * length, hidden) sums
    both = (encoder.segment_embedding.weight.unsqueeze(1)
            + encoder.pos_embedding[:, :length]).reshape(2 * length, -1)
    X = encoder.token_embedding(tokens) + F.embedding(segments.long() * length
                                                      + packing.positions, both)
    if encoder.ln is not None:  # standard BERT's embedding LayerNorm, row-wise: packed too
        X = dropout(encoder.ln(X), encoder.dropout.p, encoder.training)
    last = len(encoder.blks) - 1
    queries = None
    if rows is not None and last >= 0:
        queries = select(packing, valid_lens, rows)
    for i, blk in enumerate(encoder.blks):
        X = block(blk, X, packing, queries if i == last else None, masks[i] if masks else None)
    return X, (packing if queries is None else queries)


def forward(model: BERTModel, tokens: torch.Tensor, segments: torch.Tensor,
            valid_lens: torch.Tensor, masks: Sequence[dict[str, torch.Tensor]] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encoded_X, cls)`` of :meth:`.model.BERTModel.forward` on the packed path: the padded
    ``(batch, length, hidden)`` encodings (zeros at padded positions) and the ``<cls>`` ones."""
    return unpack(*encode(model, tokens, segments, valid_lens, None, masks))


# -- the sparse last layer --------------------------------------------------------------------

def sparse_forward(model: nn.Module, tokens: torch.Tensor, segments: torch.Tensor,
                   valid_lens: torch.Tensor, pred_positions: torch.Tensor,
                   masks: Sequence[dict[str, torch.Tensor]] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mlm_Y_hat, nsp_Y_hat)`` -- what the pretraining loss reads -- with the last encoder
    block computed only at ``<cls>`` and the ``pred_positions`` (a sparse last layer: every
    token is still a key): the values of the model's full forward pass (to float32 round-off),
    as MXNet's ``fast.sparse_forward``.

    ``model``: a :class:`.model.BERTModel`, or one in DistributedDataParallel. ``masks``: the
    dropout masks of :meth:`.model.BERTModel.forward`. Where the model does not pack
    (:func:`packs`) the full forward pass computes the encodings. On the packed path a
    predicted position beyond its example's valid length (which no loss reads) has the
    encoding zero. The training loss calls :func:`sparse_encodings` instead: it decodes only
    the slots of non-zero weight, fused with the cross-entropy."""
    net = model.module if isinstance(model, DistributedDataParallel) else model
    rows = net.mlm.rows(tokens, pred_positions)
    encoded, nsp_Y_hat = sparse_encodings(model, tokens, segments, valid_lens, rows, masks)
    return (net.mlm.decode(encoded).reshape(tokens.shape[0], pred_positions.shape[1], -1),
            nsp_Y_hat)


def sparse_encodings(model: nn.Module, tokens: torch.Tensor, segments: torch.Tensor,
                     valid_lens: torch.Tensor, rows: torch.Tensor,
                     masks: Sequence[dict[str, torch.Tensor]] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower level of :func:`sparse_forward`: ``(encodings, nsp_Y_hat)``, the
    ``(rows, hidden)`` encodings at ``rows`` (indices ``example * length + position``, e.g.
    :meth:`.model.MaskLM.rows`) and the NSP logits, the last layer computed only at those rows
    and ``<cls>``. What :func:`.loss.row_losses` calls: the MLM head is left to it (the decoder
    fused with the cross-entropy, :func:`decoder_cross_entropy`).

    A model in DistributedDataParallel runs this as its wrapper's forward pass, so that DDP
    prepares its gradient all-reduce as for any forward pass."""
    if isinstance(model, DistributedDataParallel):
        return _as_forward(model, _sparse_encodings, tokens, segments, valid_lens, rows, masks)
    return _sparse_encodings(model, tokens, segments, valid_lens, rows, masks)


def _sparse_encodings(net: BERTModel, tokens: torch.Tensor, segments: torch.Tensor,
                      valid_lens: torch.Tensor, rows: torch.Tensor,
                      masks: Sequence[dict[str, torch.Tensor]] | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    if packs(net, tokens, valid_lens):
        X, packing = encode(net, tokens, segments, valid_lens, rows, masks)
        # the rows of X that hold the positions asked for (padding: none), <cls>
        index = packing.row_of()[rows.reshape(-1)]
        padding = index < 0
        encoded = X.index_select(0, index.clamp(min=0))
        if bool(padding.any()):  # a padded position: zeros, as in unpack
            encoded = encoded.masked_fill(padding[:, None], 0.0)
        cls = X.index_select(0, packing.cls_rows)
    else:
        encoded_X = net.encoder(tokens, segments, valid_lens, masks)
        cls = encoded_X[:, 0, :]
        encoded = encoded_X.reshape(-1, encoded_X.shape[-1]).index_select(0, rows.reshape(-1))
    # the NSP head of BERTModel.forward: its hidden layer on the <cls> encodings
    return encoded, net.nsp(torch.tanh(net.hidden(cls)))


def _as_forward(wrapper: DistributedDataParallel, function: Callable[..., Any], *args: Any
                ) -> Any:
    """``function(wrapper.module, *args)`` called as the wrapper's forward pass: DDP calls the
    module, whose ``forward`` is ``function`` for this call (an instance attribute shadows the
    class's method; removed after)."""
    net = wrapper.module
    net.forward = lambda *inputs: function(net, *inputs)
    try:
        return wrapper(*args)
    finally:
        del net.forward
