"""The book's BERT in PyTorch, with the canonical parameter names of :mod:`bertlite.params`.

Same architecture as d2l's PyTorch tab (post-LN Transformer encoder blocks with biased
attention and dropout on the attention weights, a learned positional embedding, the MLM head at
the predicted positions only, the NSP head on ``<cls>``). Differences: the positional embedding
is trained (the book reads it through ``.data``); the initial weights are
:func:`bertlite.params.init_params` (Xavier, the same in every backend); Q, K and V are one
GEMM; attention is :func:`torch.nn.functional.scaled_dot_product_attention` except when training
with dropout on the CPU, where it is written out with a dropout mask drawn 5x faster than
torch's CPU ``bernoulli_`` (see :func:`dropout`).

Training on the CPU in float32 takes a faster path with the same loss and gradients (to
float32 round-off; see :class:`BERTEncoder`), about 3x the book's step on 2 cores:

* packing: the position-wise layers (projections, FFN, add & norm, dropout) run on the valid
  tokens only (WikiText-2's examples are 28% padding); attention runs per group of examples of
  similar length, each padded to its longest (:func:`pack`);
* a sparse last layer: given ``output_rows`` (the positions the loss reads, which
  :func:`.step.batch_loss` passes), the last layer computes its queries, output projection
  and FFN only there and at ``<cls>`` (:func:`select`), every token still a key;
* hand-written backward passes (:class:`_Projections`, :class:`_Attention`, :class:`_Output`,
  :class:`_FFN`) that allocate and copy as little as they can; dense layers as oneDNN matmuls
  with the bias (and ReLU) in their epilogue (:func:`linear`);
* the MLM decoder fused with its cross-entropy, chunk by chunk (:class:`DecoderLogits`), and a
  chunked cross-entropy for other logits (:func:`cross_entropy`);
* dropout masks from 16-bit random numbers (:func:`_keep_scale`).

Nothing that the loss reads changes: padded positions never reach a valid one (their keys get
no attention weight). The encodings of padded positions, which no loss reads, are returned as
zeros on that path. Eval mode, autocast, GPUs and ``BERTEncoder.packed = False`` take the
plain path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bertlite.config import BERTConfig
from bertlite.params import init_params

#: Added to the attention scores of padded keys. Finite (unlike a boolean mask, which means
#: -inf) so that a row with no valid key gives no NaN; exp(-1e6) is 0 in float32 as in the book.
MASK_VALUE = -1e6


def attention_mask(valid_lens: torch.Tensor | None, num_keys: int, dtype: torch.dtype
                   ) -> torch.Tensor | None:
    """The additive mask ``(batch, 1, 1, num_keys)`` that gives keys at or beyond each
    example's valid length no attention weight; ``None`` when ``valid_lens`` is ``None``."""
    if valid_lens is None:
        return None
    valid_lens = valid_lens.reshape(-1, 1)
    keys = torch.arange(num_keys, device=valid_lens.device)
    padded = keys.unsqueeze(0) >= valid_lens
    mask = torch.zeros(padded.shape, dtype=dtype, device=valid_lens.device)
    return mask.masked_fill_(padded, MASK_VALUE).view(-1, 1, 1, num_keys)


def _uniform_int16(n: int) -> torch.Tensor:
    """``n`` uniform int16 values, reproducible from torch's CPU generator (one draw of it seeds
    numpy's SFC64, which makes random bits twice as fast as torch's CPU ``random_``)."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    raw = np.random.SFC64(seed).random_raw((n + 3) // 4)
    return torch.from_numpy(raw.view(np.int16)[:n])


def _keep_scale(shape: Sequence[int], p: float, dtype: torch.dtype) -> torch.Tensor:
    """A dropout mask already scaled by ``1 / (1 - p)``, seeded by torch's CPU generator.

    torch's CPU ``bernoulli_`` costs about 9 ns per element here (it is a fifth of a training
    step). Drawing 64 random bits at a time and comparing them 16 bits at a time is 15x faster;
    ``p`` is rounded to a multiple of 1/65536 and the scale uses the rounded value, so the
    expectation is kept exactly.
    """
    n = math.prod(shape)
    drop = round(p * 65536)  # drop when a uniform int16 is among its `drop` smallest values
    # compared in float32 (exact for int16) in place: 3x faster than a bool mask cast to float
    keep = _uniform_int16(n).to(torch.float32).ge_(drop - 32768).mul_(65536 / (65536 - drop))
    return keep.to(dtype).view(tuple(shape))


def dropout(X: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; on the CPU with the fast mask of :func:`_keep_scale`."""
    if not training or p <= 0.0:
        return X
    if (X.device.type != "cpu" or round(p * 65536) >= 65536
            or torch.compiler.is_compiling()):  # torch.compile: torch's own, traceable
        return F.dropout(X, p, True)
    if round(p * 65536) == 0:
        return X
    return X * _keep_scale(X.shape, p, X.dtype)


class Dropout(nn.Module):
    """:class:`torch.nn.Dropout` with the faster CPU mask of :func:`dropout`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return dropout(X, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             attn_mask: torch.Tensor | None, dropout_p: float = 0.0,
                             training: bool = False) -> torch.Tensor:
    """``dropout(softmax(q k^T / sqrt(d) + mask)) v`` of ``(batch, heads, len, d)`` tensors,
    written out: the training path on the CPU, where SDPA's dropout is torch's slow
    ``bernoulli_`` (one ``baddbmm`` adds the mask and scales the scores)."""
    batch_size, num_heads, length, head_size = q.shape
    q3, k3, v3 = (t.reshape(batch_size * num_heads, -1, head_size) for t in (q, k, v))
    if attn_mask is None:
        scores = torch.bmm(q3, k3.transpose(1, 2)) * (1.0 / math.sqrt(head_size))
    else:
        mask = attn_mask.expand(batch_size, num_heads, 1, -1).reshape(
            batch_size * num_heads, 1, -1)
        scores = torch.baddbmm(mask, q3, k3.transpose(1, 2), alpha=1.0 / math.sqrt(head_size))
    weights = dropout(torch.softmax(scores, dim=-1), dropout_p, training)
    return torch.bmm(weights, v3).view(batch_size, num_heads, length, head_size)


# -- dense layers with fused bias and ReLU ------------------------------------------------------


def _mkldnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   relu: bool = False) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [],
                                              "")


def _probe_fused_linear() -> bool:
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        y = _mkldnn_linear(x, w, torch.ones(4), relu=True)
        return bool(torch.backends.mkldnn.is_available() and torch.equal(y, torch.full((2, 4),
                                                                                      4.0)))
    except Exception:  # an op of oneDNN builds only; a build without it uses F.linear
        return False


_FUSED_LINEAR = _probe_fused_linear()


class _FusedLinear(torch.autograd.Function):
    """``relu?(x W^T + b)`` as one oneDNN matmul whose epilogue adds the bias (and applies the
    ReLU): ``addmm`` first copies the broadcast bias into its output, one more pass over it."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu):
        y = _mkldnn_linear(x, weight, bias, relu)
        ctx.save_for_backward(x, weight, y if relu else None)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        if y is not None:
            grad = torch.ops.aten.threshold_backward(grad, y, 0)
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad2.mm(weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad2.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           relu: bool = False) -> torch.Tensor:
    """``F.linear`` (then ReLU): fused on the CPU in float32 outside autocast, else torch's."""
    if (_FUSED_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        return _FusedLinear.apply(x, weight, bias, relu)
    y = F.linear(x, weight, bias)
    return F.relu(y, inplace=True) if relu else y


# -- softmax cross-entropy ------------------------------------------------------------------------

#: rows of logits per chunk of the cross-entropy (a vocabulary-sized row is about 17 kB at 4,271
#: words: 64 rows stay in the L2 cache between the passes over them)
_CE_CHUNK = 64


class _CrossEntropy(torch.autograd.Function):
    """Per-row softmax cross-entropy of float32 ``(n, classes)`` logits, chunk by chunk.

    ``F.cross_entropy`` writes the ``(n, classes)`` log-probabilities, and its backward a zero
    tensor and the gradient, each in full (for the MLM head's 3,500 x 4,271 logits these are
    60 MB, and fresh allocations that large are page-faulted in on every step). This keeps one
    log-sum-exp per row and computes the gradient ``softmax - onehot`` into one buffer, each
    chunk while it is in cache: half the time of the MLM loss.
    """

    @staticmethod
    def forward(ctx, logits, labels):
        lse = logits.new_empty(logits.shape[0])
        for i in range(0, logits.shape[0], _CE_CHUNK):
            torch.logsumexp(logits[i:i + _CE_CHUNK], 1, out=lse[i:i + _CE_CHUNK])
        ctx.save_for_backward(logits, labels, lse)
        return lse - logits.gather(1, labels.view(-1, 1)).view(-1)

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for i in range(0, logits.shape[0], _CE_CHUNK):
            j = i + _CE_CHUNK
            torch.sub(logits[i:j], lse[i:j, None], out=out[i:j]).exp_().mul_(grad[i:j, None])
        out.scatter_add_(1, labels.view(-1, 1), -grad.view(-1, 1))
        return out, None


#: rows per chunk of the MLM decoder fused with its cross-entropy (a chunk of logits: 9 MB at
#: 4,271 words; 256 to 512 rows are the fastest here)
_DECODER_CHUNK = 512


class _DecoderCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of the logits ``hidden W^T + b`` without ever holding them whole.

    Chunk by chunk of rows: the logits (oneDNN matmul, bias in its epilogue), their
    log-sum-exp and the cross-entropy. The backward turns each saved chunk into
    ``softmax - onehot`` in place and feeds it to the decoder's three gradients, the rows'
    loss gradients scaling the small operands. No
    ``(rows, vocabulary)`` tensor is allocated (60 MB for the MLM head of the book's batch;
    allocations that large are page-faulted in afresh on every step), and each chunk's passes
    run while it is in cache.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        chunks, lses = [], []
        losses = hidden.new_empty(hidden.shape[0])
        for i in range(0, hidden.shape[0], _DECODER_CHUNK):
            j = i + _DECODER_CHUNK
            logits = _mkldnn_linear(hidden[i:j], weight, bias)
            lse = torch.logsumexp(logits, 1)
            torch.sub(lse, logits.gather(1, labels[i:j, None]).view(-1), out=losses[i:j])
            chunks.append(logits)
            lses.append(lse)
        ctx.save_for_backward(hidden, weight, labels, *chunks, *lses)
        ctx.has_bias = bias is not None
        ctx.used = False
        return losses

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:  # the saved logits became gradients in place
            raise RuntimeError("the MLM loss's graph was freed: backward through it once")
        ctx.used = True
        hidden, weight, labels, *saved = ctx.saved_tensors
        chunks, lses = saved[:len(saved) // 2], saved[len(saved) // 2:]
        grad_hidden = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight)
        grad_b = weight.new_zeros(weight.shape[0]) if ctx.has_bias else None
        minus_one = hidden.new_full((_DECODER_CHUNK, 1), -1.0)
        for k, (p, lse) in enumerate(zip(chunks, lses)):
            i, j = k * _DECODER_CHUNK, (k + 1) * _DECODER_CHUNK
            g = grad[i:j]
            # softmax - onehot; the rows' loss gradients g scale the small operands instead
            p.sub_(lse[:, None]).exp_().scatter_add_(1, labels[i:j, None],
                                                     minus_one[:p.shape[0]])
            torch.mm(p, weight, out=grad_hidden[i:j]).mul_(g[:, None])
            grad_w.addmm_(p.t(), hidden[i:j] * g[:, None])
            if grad_b is not None:
                grad_b.addmv_(p.t(), g)
        return grad_hidden, grad_w, grad_b, None


class DecoderLogits:
    """The MLM decoder's logits, not computed yet (``MaskLM.decode(..., lazy=True)``): what
    :func:`bertlite.loss.bert_loss` does with them (``shape``, ``reshape`` to ``(-1, vocab)``,
    :func:`cross_entropy`) runs the decoder and the cross-entropy together
    (:class:`_DecoderCrossEntropy`); anything else computes them (:meth:`materialize`)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.hidden.shape[0], self.weight.shape[0]))

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def dim(self) -> int:
        return 2

    def float(self) -> DecoderLogits:
        return self

    def reshape(self, *shape: Any) -> DecoderLogits | torch.Tensor:
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        if shape in ((-1, self.shape[1]), tuple(self.shape)):
            return self
        return self.materialize().reshape(shape)

    def materialize(self) -> torch.Tensor:
        """The logits as a tensor."""
        return linear(self.hidden, self.weight, self.bias)


def cross_entropy(logits: torch.Tensor | DecoderLogits, labels: torch.Tensor) -> torch.Tensor:
    """Per-row softmax cross-entropy (``reduction="none"``) of ``(n, classes)`` logits and
    integer labels: fused with the decoder for :class:`DecoderLogits`; :class:`_CrossEntropy`
    for float32 on the CPU; else ``F.cross_entropy``."""
    labels = labels.long()
    if isinstance(logits, DecoderLogits):
        return _DecoderCrossEntropy.apply(logits.hidden, logits.weight, logits.bias,
                                          labels.reshape(-1))
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[1] > 2 and logits.requires_grad and torch.is_grad_enabled()):
        return _CrossEntropy.apply(logits, labels)
    return F.cross_entropy(logits, labels, reduction="none")


# -- the packed training path ---------------------------------------------------------------------
#
# Training on the CPU runs the position-wise layers (projections, feed-forward network, add &
# norm, dropout) on the valid tokens only, as rows of a ``(tokens, hidden)`` matrix. Attention
# runs per group of examples of similar length: the examples are sorted by length and split
# into groups, each padded to its longest example only (a third less attention work than
# padding all to ``length`` on WikiText-2). A group's Q, K and V are gathered into a
# position-major ``(group length * group size, hidden)`` buffer, where head ``h`` of example
# ``j`` is the ``(length, head_size)`` matrix at column offset ``(j * heads + h) * head_size``:
# all heads of the group are one ``(size * heads, length, head_size)`` strided view that the
# batched GEMMs read in place. The packed rows are in the buffers' slot order.

#: examples per attention group at least (fewer, larger groups cost less in per-op overhead)
MIN_GROUP_SIZE = 32
#: attention groups at most: 4 saves 30% of the attention's work on WikiText-2 (8: 36%), and
#: every group adds ~20 small operations per layer (on a loaded machine each parallel operation
#: can wait a scheduler time slice for a preempted thread)
MAX_GROUPS = 4


class Packing(NamedTuple):
    """Where the valid tokens of a padded ``(batch, length)`` batch are, for the packed path."""

    batch_size: int
    length: int
    #: per attention group: (number of examples, group length, first slot)
    groups: tuple[tuple[int, int, int], ...]
    #: per group, ``(examples, 1, 1, group length)``: 0 for valid keys, MASK_VALUE for padding
    key_masks: tuple[torch.Tensor, ...]
    #: the slot of every packed row (slots: the groups' position-major padded buffers, in turn)
    rows: torch.Tensor
    #: the packed row of every slot (a padded slot: row 0)
    sources: torch.Tensor
    #: ``example * length + position`` of every packed row (its place in the padded batch)
    padded_rows: torch.Tensor
    #: the position of every packed row
    positions: torch.Tensor
    #: the packed row of every example's first token
    cls_rows: torch.Tensor
    #: the examples, group by group (the first ``groups[0][0]`` form group 0, ...)
    order: torch.Tensor
    #: the row of the layer's input that every slot gathers (a padded slot: some valid row)
    gather: torch.Tensor
    #: the row of the layer's input of every packed row; None: row ``i`` is input row ``i``
    inputs: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        return self.sources.shape[0]

    def row_of(self) -> torch.Tensor:
        """The packed row of every position ``example * length + position``; -1 where no row
        holds it (padding; with :func:`select`, positions not asked for)."""
        row_of = torch.full((self.batch_size * self.length,), -1, dtype=torch.int64,
                            device=self.rows.device)
        row_of[self.padded_rows] = torch.arange(self.rows.shape[0], device=self.rows.device)
        return row_of


def pack(valid_lens: torch.Tensor, batch_size: int, length: int) -> Packing:
    """The :class:`Packing` of a batch whose example ``i`` has ``valid_lens[i]`` (at least one)
    valid tokens (the number of attention groups: :data:`MAX_GROUPS` at most, of
    :data:`MIN_GROUP_SIZE` examples at least)."""
    device = valid_lens.device
    lens = valid_lens.reshape(-1).to(torch.int64).clamp_(1, length)
    order = torch.argsort(lens, descending=True, stable=True)
    num_groups = max(1, min(MAX_GROUPS, batch_size // MIN_GROUP_SIZE))
    bounds = [batch_size * g // num_groups for g in range(num_groups + 1)]
    group_lens = lens[order[bounds[:-1]]].tolist()  # each group's longest example
    groups, key_masks, valid_slots, slot_examples, offset = [], [], [], [], 0
    for g in range(num_groups):
        members = order[bounds[g]:bounds[g + 1]]
        size, n = len(members), max(1, group_lens[g])
        valid = torch.arange(n, device=device).unsqueeze(0) < lens[members].unsqueeze(1)
        key_mask = torch.zeros(valid.shape, dtype=torch.float32, device=device)
        key_masks.append(key_mask.masked_fill_(~valid, MASK_VALUE).view(size, 1, 1, n))
        valid_slots.append(valid.t().reshape(-1))           # slot l * size + j
        slot_examples.append(members.repeat(n))
        groups.append((size, n, offset))
        offset += size * n
    valid_slots, slot_examples = torch.cat(valid_slots), torch.cat(slot_examples)
    rows = torch.nonzero(valid_slots).reshape(-1)
    sources = torch.zeros(offset, dtype=torch.int64, device=device)
    sources[rows] = torch.arange(rows.shape[0], device=device)
    examples = slot_examples[rows]
    slot_positions = torch.cat([torch.arange(n, device=device).repeat_interleave(size)
                                for size, n, _ in groups])
    positions = slot_positions[rows]
    first_slots = torch.empty(batch_size, dtype=torch.int64, device=device)
    for g, (size, _, start) in enumerate(groups):  # position 0: the group's first slots
        first_slots[order[bounds[g]:bounds[g + 1]]] = torch.arange(start, start + size,
                                                                    device=device)
    return Packing(batch_size, length, tuple(groups), tuple(key_masks), rows, sources,
                   examples * length + positions, positions, sources[first_slots], order,
                   sources)


def select(packing: Packing, valid_lens: torch.Tensor, output_rows: torch.Tensor) -> Packing:
    """The layout of the queries that a last layer computes when only the encodings at
    ``output_rows`` (indices ``example * length + position``) and the ``<cls>`` tokens are
    read: the same attention groups, each padded to its example with the most such queries;
    its packed rows are those tokens (``inputs``: their rows among all of ``packing``'s)."""
    b, n = packing.batch_size, packing.length
    device = packing.rows.device
    lens = valid_lens.reshape(-1).to(torch.int64).clamp(1, n)
    need = torch.zeros(b * n, dtype=torch.bool, device=device)
    need[output_rows.reshape(-1).to(torch.int64)] = True
    need = need.view(b, n)
    need[:, 0] = True
    need &= torch.arange(n, device=device).unsqueeze(0) < lens.unsqueeze(1)
    counts = need.sum(1)
    group_of = torch.empty(b, dtype=torch.int64, device=device)
    local = torch.empty(b, dtype=torch.int64, device=device)
    groups, first, start = [], 0, 0
    for g, (size, _, _) in enumerate(packing.groups):
        members = packing.order[first:first + size]
        group_of[members] = g
        local[members] = torch.arange(size, device=device)
        m = int(counts[members].max())
        groups.append((size, m, start))
        first, start = first + size, start + size * m
    flat = torch.nonzero(need.reshape(-1)).reshape(-1)  # example by example, by position
    example, pos = torch.div(flat, n, rounding_mode="floor"), flat % n
    rank = (need.cumsum(1) - 1).reshape(-1)[flat]
    starts = torch.tensor([g[2] for g in groups], device=device)
    sizes = torch.tensor([g[0] for g in groups], device=device)
    slots = starts[group_of[example]] + rank * sizes[group_of[example]] + local[example]
    sources = torch.zeros(start, dtype=torch.int64, device=device)
    sources[slots] = torch.arange(flat.shape[0], device=device)
    inputs = packing.row_of()[flat]
    return Packing(b, n, tuple(groups), packing.key_masks, slots, sources, flat, pos,
                   torch.cumsum(counts, 0) - counts, packing.order, inputs[sources], inputs)


def _group_views(buffer: torch.Tensor, packing: Packing, num_heads: int
                 ) -> list[torch.Tensor]:
    """Each group's ``(size * heads, length, head_size)`` view of a slots buffer."""
    return [buffer[start:start + size * n].view(n, size * num_heads, -1).transpose(0, 1)
            for size, n, start in packing.groups]


def _heads_to_slots(heads: Sequence[torch.Tensor], packing: Packing, num_heads: int
                    ) -> torch.Tensor:
    """Every group's ``(size * heads, length, head_size)`` heads as slot rows (zero gradients
    at the padded slots stay zero; other values there are whatever the heads hold)."""
    buffer = heads[0].new_empty(packing.num_slots, heads[0].shape[-1] * num_heads)
    for o, (size, n, start) in zip(heads, packing.groups):
        buffer[start:start + size * n].view(n, size, num_heads, -1).copy_(
            o.reshape(size, num_heads, n, -1).permute(2, 0, 1, 3))
    return buffer


def _heads_to_rows(heads: Sequence[torch.Tensor], packing: Packing, num_heads: int
                   ) -> torch.Tensor:
    """The packed rows ``(tokens, hidden)`` of every group's ``(size * heads, length, d)``."""
    return _heads_to_slots(heads, packing, num_heads).index_select(0, packing.rows)


def _rows_to_heads(x: torch.Tensor, packing: Packing, num_heads: int) -> list[torch.Tensor]:
    """Packed rows as every group's ``(size * heads, length, head_size)`` view of zero-padded
    slots."""
    buffer = x.new_zeros(packing.num_slots, x.shape[1]).index_copy_(0, packing.rows, x)
    return _group_views(buffer, packing, num_heads)


class _Projections(torch.autograd.Function):
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
            outputs += _group_views(_mkldnn_linear(slots, w, b), layout, num_heads)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        slots, *weights = ctx.saved_tensors
        layout, num_groups = ctx.layout, len(ctx.layout.groups)
        grad_slots, params = None, []
        for i, w in enumerate(weights):
            g = _heads_to_slots(grads[i * num_groups:(i + 1) * num_groups], layout,
                                ctx.num_heads)
            params += [g.t().mm(slots), g.sum(0) if ctx.has_bias else None]
            grad_slots = g.mm(w) if grad_slots is None else grad_slots.addmm_(g, w)
        grad = grad_slots.index_select(0, layout.rows)
        if layout.inputs is not None:  # a subset of the input's rows
            grad = grad.new_zeros(ctx.num_rows, grad.shape[1]).index_copy_(0, layout.inputs,
                                                                             grad)
        return (grad, None, None, *params)


class _Attention(torch.autograd.Function):
    """``dropout(softmax(q k^T + key_mask)) v`` of ``(examples * heads, length, head_size)``
    tensors (``q`` already scaled by ``1 / sqrt(head_size)``), ``keep`` the scaled dropout mask
    or None. The backward computes each gradient once, in place where it can, and returns
    contiguous gradients for Q, K and V (autograd's would return K's transposed)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, keep):
        scores = torch.bmm(q, k.transpose(1, 2))
        scores.view(key_mask.shape[0], -1, *scores.shape[1:]).add_(key_mask)
        weights = torch.softmax(scores, dim=-1)
        del scores
        dropped = weights if keep is None else weights * keep
        ctx.save_for_backward(q, k, v, weights, None if keep is None else dropped, keep)
        return torch.bmm(dropped, v)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, weights, dropped, keep = ctx.saved_tensors
        grad_v = torch.bmm((weights if dropped is None else dropped).transpose(1, 2), grad)
        grad_weights = torch.bmm(grad, v.transpose(1, 2))
        if keep is not None:
            grad_weights.mul_(keep)
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        del grad_weights
        grad_q = torch.bmm(grad_scores, k)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q)
        return grad_q, grad_k, grad_v, None, None


class _Output(torch.autograd.Function):
    """Every group's attention heads back to packed rows, then ``W_o`` (input: the packed
    ``W_o``, its bias, then one tensor per group)."""

    @staticmethod
    def forward(ctx, packing, num_heads, weight, bias, *heads):
        ctx.packing, ctx.num_heads = packing, num_heads
        rows = _heads_to_rows(heads, packing, num_heads)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return _mkldnn_linear(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad_w, grad_b = grad.t().mm(rows), grad.sum(0) if ctx.has_bias else None
        grad_heads = _rows_to_heads(grad.mm(weight), ctx.packing, ctx.num_heads)
        return (None, None, grad_w, grad_b, *grad_heads)


class _FFN(torch.autograd.Function):
    """``relu(x W1^T + b1) W2^T + b2`` with the bias and ReLU in the GEMMs' epilogues and the
    ReLU's backward in place on the hidden gradient."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        hidden = _mkldnn_linear(x, w1, b1, relu=True)
        ctx.save_for_backward(x, w1, w2, hidden)
        return _mkldnn_linear(hidden, w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, hidden = ctx.saved_tensors
        grad_w2, grad_b2 = grad.t().mm(hidden), grad.sum(0)
        grad_hidden = grad.mm(w2)
        torch.ops.aten.threshold_backward.grad_input(grad_hidden, hidden, 0,
                                                     grad_input=grad_hidden)
        return (grad_hidden.mm(w1), grad_hidden.t().mm(x), grad_hidden.sum(0), grad_w2,
                grad_b2)


class _DropoutAdd(torch.autograd.Function):
    """``x + y * keep`` in one pass (``keep`` a scaled dropout mask); the backward is one pass."""

    @staticmethod
    def forward(ctx, x, y, keep):
        ctx.save_for_backward(keep)
        return torch.addcmul(x, y, keep)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad, grad * keep, None


def unpack(X: torch.Tensor, packing: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed encodings as a padded ``(batch, length, hidden)`` batch (zeros at the padded
    positions) and the ``(batch, hidden)`` encodings of the ``<cls>`` tokens; their backward
    adds both gradients without full-size temporaries."""
    b, n = packing.batch_size, packing.length
    padded, cls = _Unpack.apply(X, packing.padded_rows, b * n, packing.cls_rows)
    return padded.view(b, n, -1), cls


class _Unpack(torch.autograd.Function):
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


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with biased projections ``W_q, W_k, W_v, W_o``
    and dropout on the attention weights."""

    def __init__(self, num_hiddens: int, num_heads: int, dropout: float, bias: bool = True
                 ) -> None:
        super().__init__()
        if num_hiddens % num_heads:
            raise ValueError(f"num_hiddens ({num_hiddens}) must be divisible by num_heads "
                             f"({num_heads})")
        self.num_heads, self.dropout = num_heads, dropout
        self.W_q = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_k = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_v = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_o = nn.Linear(num_hiddens, num_hiddens, bias=bias)

    def _heads(self, X: torch.Tensor) -> torch.Tensor:
        # (batch, len, hidden) -> (batch, heads, len, hidden / heads)
        return X.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask`` is what :func:`attention_mask` returns (or ``None``)."""
        if queries is keys and keys is values:  # self-attention: one GEMM for Q, K and V
            weight = torch.cat((self.W_q.weight, self.W_k.weight, self.W_v.weight))
            bias = (None if self.W_q.bias is None else
                    torch.cat((self.W_q.bias, self.W_k.bias, self.W_v.bias)))
            q, k, v = F.linear(queries, weight, bias).unflatten(
                -1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (self._heads(self.W_q(queries)), self._heads(self.W_k(keys)),
                       self._heads(self.W_v(values)))
        dropout_p = self.dropout if self.training else 0.0
        if dropout_p > 0.0 and q.device.type == "cpu":
            out = masked_softmax_attention(q, k, v, attn_mask, dropout_p, True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                 dropout_p=dropout_p)
        return self.W_o(out.transpose(1, 2).flatten(2))

    def forward_packed(self, X: torch.Tensor, packing: Packing,
                       queries: Packing | None = None) -> torch.Tensor:
        """Self-attention of packed rows ``(tokens, hidden)`` (see :class:`Packing`); with
        ``queries`` (:func:`select`) only for those rows, every row a key."""
        scale = 1.0 / math.sqrt(X.shape[-1] // self.num_heads)
        bias = self.W_q.bias
        # the 1/sqrt(head_size) of the scores folded into W_q (exact for power-of-2 sizes)
        wq, bq = self.W_q.weight * scale, None if bias is None else bias * scale
        kv = (self.W_k.weight, self.W_k.bias, self.W_v.weight, self.W_v.bias)
        num_groups = len(packing.groups)
        if queries is None:
            heads = _Projections.apply(X, packing, self.num_heads, wq, bq, *kv)
            qs, heads = heads[:num_groups], heads[num_groups:]
            queries = packing
        else:
            qs = _Projections.apply(X, queries, self.num_heads, wq, bq)
            heads = _Projections.apply(X, packing, self.num_heads, *kv)
        ks, vs = heads[:num_groups], heads[num_groups:]
        p = self.dropout if self.training else 0.0
        keeps: list[torch.Tensor | None] = [None] * num_groups
        if 0 < round(p * 65536) < 65536:  # all groups' dropout masks drawn at once
            shapes = [(size * self.num_heads, m, n) for (size, m, _), (_, n, _)
                      in zip(queries.groups, packing.groups)]
            keep = _keep_scale((sum(math.prod(s) for s in shapes),), p, X.dtype)
            keeps = [m.view(s) for m, s in zip(keep.split([math.prod(s) for s in shapes]),
                                               shapes)]
        outputs = [_Attention.apply(q, k, v, key_mask, keep)
                   for q, k, v, key_mask, keep in zip(qs, ks, vs, packing.key_masks, keeps)]
        return _Output.apply(queries, self.num_heads, self.W_o.weight, self.W_o.bias, *outputs)


class PositionWiseFFN(nn.Module):
    """Two dense layers with a ReLU between them, applied at every position."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int) -> None:
        super().__init__()
        self.dense1 = nn.Linear(num_hiddens, ffn_num_hiddens)
        self.dense2 = nn.Linear(ffn_num_hiddens, num_hiddens)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        hidden = linear(X, self.dense1.weight, self.dense1.bias, relu=True)
        return linear(hidden, self.dense2.weight, self.dense2.bias)


class AddNorm(nn.Module):
    """Residual connection, then layer normalization: ``ln(dropout(Y) + X)``."""

    def __init__(self, num_hiddens: int, dropout: float) -> None:
        super().__init__()
        self.dropout = Dropout(dropout)
        self.ln = nn.LayerNorm(num_hiddens)

    def forward(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return self.ln(self.dropout(Y) + X)

    def forward_packed(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """The same on rows, the dropout and the residual addition in one pass."""
        p = self.dropout.p
        if not (self.training and p > 0.0) or round(p * 65536) in (0, 65536):
            return self.ln(self.dropout(Y) + X)
        return self.ln(_DropoutAdd.apply(X, Y, _keep_scale(Y.shape, p, Y.dtype)))


class EncoderBlock(nn.Module):
    """A post-LN Transformer encoder block."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, num_heads: int, dropout: float
                 ) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(num_hiddens, num_heads, dropout, bias=True)
        self.addnorm1 = AddNorm(num_hiddens, dropout)
        self.ffn = PositionWiseFFN(num_hiddens, ffn_num_hiddens)
        self.addnorm2 = AddNorm(num_hiddens, dropout)

    def forward(self, X: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        Y = self.addnorm1(X, self.attention(X, X, X, attn_mask))
        return self.addnorm2(Y, self.ffn(Y))

    def forward_packed(self, X: torch.Tensor, packing: Packing,
                       queries: Packing | None = None) -> torch.Tensor:
        """The block on packed rows ``(tokens, hidden)`` (see :class:`Packing`); with
        ``queries`` (:func:`select`) it returns those rows only."""
        Y = self.attention.forward_packed(X, packing, queries)
        if queries is not None:
            X = X.index_select(0, queries.inputs)
        Y = self.addnorm1.forward_packed(X, Y)
        ffn = self.ffn
        return self.addnorm2.forward_packed(Y, _FFN.apply(Y, ffn.dense1.weight, ffn.dense1.bias,
                                                         ffn.dense2.weight, ffn.dense2.bias))


def _check_book_sizes(what: str, num_hiddens: int, **sizes: Any) -> None:
    """The book's extra size arguments must all be ``num_hiddens`` (or None)."""
    norm_shape = sizes.get("norm_shape")
    if isinstance(norm_shape, (list, tuple, torch.Size)) and len(norm_shape) == 1:
        sizes["norm_shape"] = int(norm_shape[0])
    wrong = {k: v for k, v in sizes.items() if v is not None and v != num_hiddens}
    if wrong:
        raise ValueError(
            f"{what}: {', '.join(f'{k}={v!r}' for k, v in wrong.items())} must equal "
            f"num_hiddens={num_hiddens} (every layer of this BERT has num_hiddens features; "
            "these arguments exist for the book's signature only)")


class BERTEncoder(nn.Module):
    """Token + segment + learned positional embeddings, then the encoder blocks; takes the
    book's arguments (``norm_shape``, ``ffn_num_input``, ``key_size``, ... equal to
    ``num_hiddens``).

    In training mode on the CPU, with ``valid_lens``, the encoder takes the packed path (see the
    module's docstring): the same loss and gradients, up to float32 rounding, in less time and
    memory, and zeros as the encodings of padded positions (nothing reads them). Set
    ``packed = False`` (the attribute) to compute every position as in eval mode.
    """

    #: train on the valid tokens only (CPU, training mode, ``valid_lens`` given)
    packed: bool = True

    def __init__(self, vocab_size: int, num_hiddens: int = 128,
                 norm_shape: int | Sequence[int] | None = None, ffn_num_input: int | None = None,
                 ffn_num_hiddens: int = 256, num_heads: int = 2, num_layers: int = 2,
                 dropout: float = 0.2, max_len: int = 1000, key_size: int | None = None,
                 query_size: int | None = None, value_size: int | None = None) -> None:
        super().__init__()
        _check_book_sizes("BERTEncoder", num_hiddens, norm_shape=norm_shape,
                          ffn_num_input=ffn_num_input, key_size=key_size,
                          query_size=query_size, value_size=value_size)
        self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
        self.segment_embedding = nn.Embedding(2, num_hiddens)
        self.blks = nn.ModuleList(EncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout)
                                  for _ in range(num_layers))
        # Learned, and used as a Parameter (not through ``.data``) so that it is trained.
        self.pos_embedding = nn.Parameter(torch.zeros(1, max_len, num_hiddens))

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor,
                valid_lens: torch.Tensor | None = None) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.pos_embedding.shape[1]:
            raise ValueError(f"the input has {length} positions, more than the positional "
                             f"embedding's max_len {self.pos_embedding.shape[1]}")
        if self.takes_packed_path(tokens, valid_lens):
            X, packing = self.forward_packed(tokens, segments, valid_lens)
            return unpack(X, packing)[0]
        X = self.token_embedding(tokens) + self.segment_embedding(segments)
        X = X + self.pos_embedding[:, :length]
        mask = attention_mask(valid_lens, length, X.dtype)
        for blk in self.blks:
            X = blk(X, mask)
        return X

    def takes_packed_path(self, tokens: torch.Tensor, valid_lens: torch.Tensor | None) -> bool:
        """Whether :meth:`forward` computes the valid tokens only (see the class docstring)."""
        return (self.packed and self.training and valid_lens is not None and _FUSED_LINEAR
                and tokens.device.type == "cpu" and tokens.numel() > 0
                and self.pos_embedding.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")
                and bool((valid_lens > 0).all()))  # an empty example attends to its padding

    def forward_packed(self, tokens: torch.Tensor, segments: torch.Tensor,
                       valid_lens: torch.Tensor, output_rows: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, Packing]:
        """The encodings of the valid tokens only, as packed rows ``(tokens, hidden)``, and
        where they are (:class:`Packing`; :func:`unpack` makes them a padded batch). With
        ``output_rows`` (indices ``example * length + position``) the last layer computes
        only the encodings at those positions and the ``<cls>`` tokens (:func:`select`)."""
        batch_size, length = tokens.shape
        packing = pack(valid_lens, batch_size, length)
        tokens = tokens.reshape(-1).index_select(0, packing.padded_rows)
        segments = segments.reshape(-1).index_select(0, packing.padded_rows)
        # segment and position embeddings as one lookup in their (2 * length, hidden) sums
        both = (self.segment_embedding.weight.unsqueeze(1)
                + self.pos_embedding[:, :length]).reshape(2 * length, -1)
        X = self.token_embedding(tokens) + F.embedding(segments.long() * length
                                                       + packing.positions, both)
        last = len(self.blks) - 1
        queries = None
        if output_rows is not None and last >= 0:
            queries = select(packing, valid_lens, output_rows)
        for i, blk in enumerate(self.blks):
            X = blk.forward_packed(X, packing, queries if i == last else None)
        return X, (packing if queries is None else queries)


class MaskLM(nn.Module):
    """The masked-language-model head: dense, ReLU, LayerNorm, vocabulary decoder, applied only
    at ``pred_positions``."""

    def __init__(self, vocab_size: int, num_hiddens: int, num_inputs: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(num_inputs or num_hiddens, num_hiddens)
        self.ln = nn.LayerNorm(num_hiddens)
        self.decoder = nn.Linear(num_hiddens, vocab_size)

    @staticmethod
    def rows(X: torch.Tensor, pred_positions: torch.Tensor) -> torch.Tensor:
        """Indices into the flattened ``(batch * len, hidden)`` encodings of ``X`` of every
        prediction slot, example by example (``X``: the encodings, or anything whose first
        two dimensions are ``(batch, len)``, such as the token ids)."""
        batch_size, length = X.shape[0], X.shape[1]
        offsets = torch.arange(0, batch_size * length, length, device=X.device)
        return (pred_positions + offsets.unsqueeze(1)).reshape(-1)

    def decode(self, masked_X: torch.Tensor, lazy: bool = False
               ) -> torch.Tensor | DecoderLogits:
        """Vocabulary logits of encodings ``(..., hidden)``. With ``lazy`` (for a loss, when
        training on the CPU in float32), :class:`DecoderLogits`: the decoder then runs fused
        with the cross-entropy, a quarter of the MLM head's time."""
        hidden = self.ln(linear(masked_X, self.dense.weight, self.dense.bias, relu=True))
        if (lazy and _FUSED_LINEAR and hidden.dim() == 2 and hidden.device.type == "cpu"
                and hidden.dtype == self.decoder.weight.dtype == torch.float32
                and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
            return DecoderLogits(hidden, self.decoder.weight, self.decoder.bias)
        return linear(hidden, self.decoder.weight, self.decoder.bias)

    def forward(self, X: torch.Tensor, pred_positions: torch.Tensor) -> torch.Tensor:
        # One index_select of the flattened encodings: its backward is an index_add, cheaper
        # than the book's advanced indexing with two index tensors.
        masked_X = X.reshape(-1, X.shape[-1]).index_select(0, self.rows(X, pred_positions))
        return self.decode(masked_X).reshape(X.shape[0], pred_positions.shape[1], -1)


class NextSentencePred(nn.Module):
    """The next-sentence-prediction output layer (two classes)."""

    def __init__(self, num_inputs: int) -> None:
        super().__init__()
        self.output = nn.Linear(num_inputs, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.output(X)


class BERTModel(nn.Module):
    """The BERT model; ``forward`` returns ``(encoded_X, mlm_Y_hat, nsp_Y_hat)`` like the book.

    Accepts the book's d2l 0.17 PyTorch arguments (``norm_shape``, ``ffn_num_input``,
    ``key_size``, ... must all equal ``num_hiddens``), or build it with :meth:`from_config`.
    The weights are :func:`bertlite.params.init_params` of ``seed``; without a seed, one is drawn
    from torch's generator, so ``torch.manual_seed`` makes it reproducible.
    """

    def __init__(self, vocab_size: int, num_hiddens: int = 128,
                 norm_shape: int | Sequence[int] | None = None, ffn_num_input: int | None = None,
                 ffn_num_hiddens: int = 256, num_heads: int = 2, num_layers: int = 2,
                 dropout: float = 0.2, max_len: int = 1000, key_size: int | None = None,
                 query_size: int | None = None, value_size: int | None = None,
                 hid_in_features: int | None = None, mlm_in_features: int | None = None,
                 nsp_in_features: int | None = None, *, seed: int | None = None) -> None:
        super().__init__()
        _check_book_sizes("BERTModel", num_hiddens, norm_shape=norm_shape,
                          ffn_num_input=ffn_num_input, key_size=key_size,
                          query_size=query_size, value_size=value_size,
                          hid_in_features=hid_in_features, mlm_in_features=mlm_in_features,
                          nsp_in_features=nsp_in_features)
        self.config = BERTConfig(vocab_size=vocab_size, num_hiddens=num_hiddens,
                                 ffn_num_hiddens=ffn_num_hiddens, num_heads=num_heads,
                                 num_layers=num_layers, dropout=dropout, max_len=max_len)
        self.encoder = BERTEncoder(vocab_size, num_hiddens, ffn_num_hiddens=ffn_num_hiddens,
                                   num_heads=num_heads, num_layers=num_layers, dropout=dropout,
                                   max_len=max_len)
        self.hidden = nn.Linear(num_hiddens, num_hiddens)
        self.mlm = MaskLM(vocab_size, num_hiddens)
        self.nsp = NextSentencePred(num_hiddens)
        self.reset_parameters(seed)

    @classmethod
    def from_config(cls, config: BERTConfig, *, seed: int | None = None) -> BERTModel:
        """The model of a :class:`bertlite.config.BERTConfig`."""
        return cls(config.vocab_size, num_hiddens=config.num_hiddens,
                   ffn_num_hiddens=config.ffn_num_hiddens, num_heads=config.num_heads,
                   num_layers=config.num_layers, dropout=config.dropout,
                   max_len=config.max_len, seed=seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Set every weight to :func:`bertlite.params.init_params` of ``seed``."""
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        arrays = init_params(self.config, seed)
        for name, param in self.named_parameters():
            param.copy_(torch.from_numpy(np.ascontiguousarray(arrays[name])))

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor,
                valid_lens: torch.Tensor | None = None,
                pred_positions: torch.Tensor | None = None, *,
                output_rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(encoded_X, mlm_Y_hat, nsp_Y_hat)`` as the book's ``BERTModel``.

        With ``output_rows`` (indices ``example * length + position``; no ``pred_positions``)
        ``encoded_X`` is the ``(rows, hidden)`` encodings at those positions only: it is how
        :func:`.step.batch_loss` asks for the predicted positions. When training on the CPU
        (the packed path, see :class:`BERTEncoder`) the last layer then computes only those
        and the ``<cls>`` ones, and no padded batch is made: the loss is the same, the last
        layer's work a fifth (padded positions, which no loss reads, get zeros there)."""
        if output_rows is not None and pred_positions is not None:
            raise ValueError("give output_rows or pred_positions, not both")
        if self.encoder.takes_packed_path(tokens, valid_lens):
            X, packing = self.encoder.forward_packed(tokens, segments, valid_lens, output_rows)
            if output_rows is None:
                encoded_X, cls = unpack(X, packing)
            else:  # the rows of X that hold the positions asked for (padding: none), <cls>
                index = packing.row_of()[output_rows.reshape(-1)]
                padding = index < 0
                encoded_X = X.index_select(0, index.clamp(min=0))
                if bool(padding.any()):  # a padded position: zeros, as in unpack
                    encoded_X = encoded_X.masked_fill(padding[:, None], 0.0)
                cls = X.index_select(0, packing.cls_rows)
        else:
            encoded_X = self.encoder(tokens, segments, valid_lens)
            cls = encoded_X[:, 0, :]
            if output_rows is not None:
                encoded_X = encoded_X.reshape(-1, encoded_X.shape[-1]).index_select(
                    0, output_rows.reshape(-1))
        mlm_Y_hat = None if pred_positions is None else self.mlm(encoded_X, pred_positions)
        # The hidden layer of the NSP classifier, on the '<cls>' token (index 0).
        nsp_Y_hat = self.nsp(torch.tanh(self.hidden(cls)))
        return encoded_X, mlm_Y_hat, nsp_Y_hat
