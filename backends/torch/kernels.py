"""The fused CPU kernels of the torch backend's fast path (:mod:`.fast`), each an autograd
Function with its plain reference beside it (``*_reference``: the same result in plain torch
ops, which ``tests/test_torch_kernels.py`` compares against, forward and backward).

Why they exist: on the CPU in float32 the plain ops write and re-read large temporaries (the
broadcast bias, the ReLU, the full log-probabilities) and torch's CPU ``bernoulli_`` is slow;
these kernels fuse the bias and ReLU into oneDNN's matmul epilogue, keep the cross-entropy's
chunks in cache, and draw dropout masks from 16-bit random numbers (timings:
``benchmarks/README.md``). Every kernel propagates NaN and Inf as the plain op does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bertlite.config import BERTConfig
from bertlite.dropout import (
    attention_rows,
    position_rows,
    scaled_mask,
    scaled_rows,
    site_id,
    site_shapes,
)

# -- dense layers with fused bias and ReLU ------------------------------------------------------


def mkldnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  relu: bool = False) -> torch.Tensor:
    """``relu?(x W^T + b)`` as one oneDNN matmul with the bias (and ReLU) in its epilogue.

    oneDNN's fused ReLU turns NaN into 0 where ``torch.relu`` keeps it: when an input is not
    finite the ReLU runs as a separate ``relu_`` instead (the check is a sum of the inputs,
    cheaper than the matmul). Other dtypes than float32 (float64 for ``gradcheck``) take
    ``F.linear``: the same math."""
    if x.dtype != torch.float32:
        y = F.linear(x, weight, bias)
        return y.relu_() if relu else y
    if relu and not _all_finite(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "").relu_()
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [],
                                              "")


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    # a NaN or Inf in any input makes its sum non-finite (a finite overflow only takes the
    # exact, slower route)
    return all(t is None or bool(torch.isfinite(t.sum())) for t in tensors)


def _probe_fused_linear() -> bool:
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        y = mkldnn_linear(x, w, torch.ones(4), relu=True)
        return bool(torch.backends.mkldnn.is_available() and torch.equal(y, torch.full((2, 4),
                                                                                      4.0)))
    except Exception:  # an op of oneDNN builds only; a build without it takes the plain path
        return False


#: whether this torch build has oneDNN's fused linear (the fast path needs it)
FUSED_LINEAR = _probe_fused_linear()


def _activation(relu: bool, activation: str | None) -> str | None:
    if activation not in (None, "relu", "gelu"):
        raise ValueError(f"activation must be None, 'relu' or 'gelu', got {activation!r}")
    return "relu" if relu and activation is None else activation


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(z), z)`` of ``z = x W^T + b`` (the exact, erf GELU): the matmul with the bias in
    its epilogue, then one GELU pass; ``z`` is what the GELU's backward needs (oneDNN's fused
    GELU would not keep it)."""
    z = mkldnn_linear(x, weight, bias)
    return F.gelu(z), z


class FusedLinear(torch.autograd.Function):
    """``act(x W^T + b)`` (``act``: none, ReLU or the exact GELU) by :func:`mkldnn_linear`
    (ReLU in the epilogue) or :func:`gelu_linear`: ``addmm`` first copies the broadcast bias
    into its output, one more pass over it."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        z = None
        if activation == "gelu":
            y, z = gelu_linear(x, weight, bias)
        else:
            y = mkldnn_linear(x, weight, bias, activation == "relu")
        ctx.save_for_backward(x, weight, y if activation == "relu" else None, z)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y, z = ctx.saved_tensors
        if y is not None:
            grad = torch.ops.aten.threshold_backward(grad, y, 0)
        elif z is not None:
            grad = torch.ops.aten.gelu_backward(grad, z)
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
           relu: bool = False, activation: str | None = None) -> torch.Tensor:
    """:class:`FusedLinear` (float32 CPU tensors); ``activation`` ``"relu"`` or ``"gelu"``
    (``relu=True`` is ``activation="relu"``)."""
    return FusedLinear.apply(x, weight, bias, _activation(relu, activation))


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The plain activations: ``F.relu``, the exact ``F.gelu``, or none."""
    if activation == "gelu":
        return F.gelu(y)
    return F.relu(y) if activation == "relu" else y


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     relu: bool = False, activation: str | None = None) -> torch.Tensor:
    return activate(F.linear(x, weight, bias), _activation(relu, activation))


class FFN(torch.autograd.Function):
    """``act(x W1^T + b1) W2^T + b2`` with the biases (and a ReLU) in the GEMMs' epilogues and
    the activation's backward in place on the hidden gradient (``activation``: ``"relu"``, or
    ``"gelu"`` through :func:`gelu_linear`)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation="relu"):
        if activation == "gelu":
            hidden, z = gelu_linear(x, w1, b1)
            ctx.save_for_backward(x, w1, w2, hidden, z)
        else:
            hidden = mkldnn_linear(x, w1, b1, relu=True)
            ctx.save_for_backward(x, w1, w2, hidden)
        return mkldnn_linear(hidden, w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, hidden, *z = ctx.saved_tensors
        grad_w2, grad_b2 = grad.t().mm(hidden), grad.sum(0)
        grad_hidden = grad.mm(w2)
        if z:
            grad_hidden = torch.ops.aten.gelu_backward(grad_hidden, z[0])
        else:
            torch.ops.aten.threshold_backward.grad_input(grad_hidden, hidden, 0,
                                                         grad_input=grad_hidden)
        return (grad_hidden.mm(w1), grad_hidden.t().mm(x), grad_hidden.sum(0), grad_w2,
                grad_b2, None)


def ffn_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    return F.linear(activate(F.linear(x, w1, b1), activation), w2, b2)


# -- softmax cross-entropy ------------------------------------------------------------------------

#: rows of logits per chunk of the cross-entropy (a vocabulary-sized row is about 17 kB at 4,271
#: words: 64 rows stay in the L2 cache between the passes over them)
CE_CHUNK = 64


class CrossEntropy(torch.autograd.Function):
    """Per-row softmax cross-entropy of ``(n, classes)`` logits, chunk by chunk.

    ``F.cross_entropy`` writes the ``(n, classes)`` log-probabilities, and its backward a zero
    tensor and the gradient, each in full (fresh allocations that large are page-faulted in on
    every step). This keeps one log-sum-exp per row and computes the gradient
    ``softmax - onehot`` into one buffer, each chunk while it is in cache.
    """

    @staticmethod
    def forward(ctx, logits, labels):
        lse = logits.new_empty(logits.shape[0])
        for i in range(0, logits.shape[0], CE_CHUNK):
            torch.logsumexp(logits[i:i + CE_CHUNK], 1, out=lse[i:i + CE_CHUNK])
        _infinite_to_nan(lse)
        ctx.save_for_backward(logits, labels, lse)
        return lse - logits.gather(1, labels.view(-1, 1)).view(-1)

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for i in range(0, logits.shape[0], CE_CHUNK):
            j = i + CE_CHUNK
            torch.sub(logits[i:j], lse[i:j, None], out=out[i:j]).exp_().mul_(grad[i:j, None])
        out.scatter_add_(1, labels.view(-1, 1), -grad.view(-1, 1))
        return out, None


def _infinite_to_nan(lse: torch.Tensor) -> None:
    """The log-sum-exp of finite logits is finite; an infinite one means an infinite logit,
    which makes ``F.cross_entropy``'s whole row NaN (``inf - inf`` in its log-softmax): the
    same here."""
    lse.masked_fill_(torch.isinf(lse), float("nan"))


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels.long(), reduction="none")


#: rows per chunk of the MLM decoder fused with its cross-entropy (a chunk of logits: 9 MB at
#: 4,271 words; chunk sizes measured: benchmarks/README.md)
DECODER_CHUNK = 512


class DecoderCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of the logits ``hidden W^T + b`` without ever holding them whole.

    Chunk by chunk of rows: the logits (oneDNN matmul, bias in its epilogue), their
    log-sum-exp and the cross-entropy. The backward turns each saved chunk into
    ``softmax - onehot`` in place and feeds it to the decoder's three gradients, the rows'
    loss gradients scaling the small operands. No ``(rows, vocabulary)`` tensor is allocated,
    and each chunk's passes run while it is in cache. The saved logits become gradients in
    place: a second backward through the same graph computes them again.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        chunks, lses = [], []
        losses = hidden.new_empty(hidden.shape[0])
        for i in range(0, hidden.shape[0], DECODER_CHUNK):
            j = i + DECODER_CHUNK
            logits = mkldnn_linear(hidden[i:j], weight, bias)
            lse = torch.logsumexp(logits, 1)
            _infinite_to_nan(lse)
            torch.sub(lse, logits.gather(1, labels[i:j, None]).view(-1), out=losses[i:j])
            chunks.append(logits)
            lses.append(lse)
        ctx.save_for_backward(hidden, weight, bias, labels)
        # intermediates, not inputs or outputs: the first backward uses them in place and drops
        # them (a second one computes them again)
        ctx.chunks, ctx.lses = chunks, lses
        return losses

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels = ctx.saved_tensors
        chunks, lses = ctx.chunks, ctx.lses
        ctx.chunks = ctx.lses = None
        if chunks is None:  # a second backward through the graph
            chunks = [mkldnn_linear(hidden[i:i + DECODER_CHUNK], weight, bias)
                      for i in range(0, hidden.shape[0], DECODER_CHUNK)]
            lses = [torch.logsumexp(c, 1) for c in chunks]
            for lse in lses:
                _infinite_to_nan(lse)
        grad_hidden = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight)
        grad_b = None if bias is None else torch.zeros_like(bias)
        minus_one = hidden.new_full((DECODER_CHUNK, 1), -1.0)
        for k, (p, lse) in enumerate(zip(chunks, lses)):
            i, j = k * DECODER_CHUNK, (k + 1) * DECODER_CHUNK
            g = grad[i:j]
            # softmax - onehot; the rows' loss gradients g scale the small operands instead
            p.sub_(lse[:, None]).exp_().scatter_add_(1, labels[i:j, None],
                                                     minus_one[:p.shape[0]])
            torch.mm(p, weight, out=grad_hidden[i:j]).mul_(g[:, None])
            grad_w.addmm_(p.t(), hidden[i:j] * g[:, None])
            if grad_b is not None:
                grad_b.addmv_(p.t(), g)
        return grad_hidden, grad_w, grad_b, None


def decoder_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                    bias: torch.Tensor | None, labels: torch.Tensor
                                    ) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias), labels.long(), reduction="none")


# -- dropout ---------------------------------------------------------------------------------------


def _uniform_int16(n: int) -> torch.Tensor:
    """``n`` uniform int16 values, reproducible from torch's CPU generator (one draw of it seeds
    numpy's SFC64, which makes random bits faster than torch's CPU ``random_``)."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    raw = np.random.SFC64(seed).random_raw((n + 3) // 4)
    return torch.from_numpy(raw.view(np.int16)[:n])


def keep_mask(shape: Sequence[int], p: float, dtype: torch.dtype) -> torch.Tensor:
    """A dropout mask already scaled by ``1 / (1 - p)``, seeded by torch's CPU generator.

    Drawn 16 bits at a time instead of by torch's CPU ``bernoulli_`` (much slower: see
    ``benchmarks/README.md``). ``p`` is rounded to a multiple of 1/65536 and the scale uses
    the rounded value, so the expectation is kept exactly; :func:`uses_keep_mask` says when
    the rounding leaves something to draw.
    """
    n = math.prod(shape)
    drop = round(p * 65536)  # drop when a uniform int16 is among its `drop` smallest values
    # compared in float32 (exact for int16) in place: faster than a bool mask cast to float
    keep = _uniform_int16(n).to(torch.float32).ge_(drop - 32768).mul_(65536 / (65536 - drop))
    return keep.to(dtype).view(tuple(shape))


def uses_keep_mask(p: float, training: bool) -> bool:
    """Whether dropout of rate ``p`` draws a :func:`keep_mask` (training, and ``p`` neither
    rounds to 0, which keeps everything, nor to 1)."""
    return training and 0 < round(p * 65536) < 65536


def dropout(X: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with the mask of :func:`keep_mask` (``F.dropout`` where ``p`` rounds
    to 1; nothing where it rounds to 0)."""
    if not training or p <= 0.0:
        return X
    if round(p * 65536) >= 65536:
        return F.dropout(X, p, True)
    if round(p * 65536) == 0:
        return X
    return X * keep_mask(X.shape, p, X.dtype)


def scale_keep(keep: torch.Tensor, scale: float | None, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """A dropout mask as ``dtype``: a bool keep mask times ``scale`` (kept elements
    ``scale``, float32 like :func:`bertlite.dropout.scaled_mask`'s), or a mask already scaled
    (``scale`` None) as it is."""
    if scale is None:
        return keep.to(dtype)
    return keep.to(torch.float32).mul_(scale).to(dtype)


class LayerMasks:
    """One encoder layer's dropout masks for one piece of a batch (the global examples
    ``row_start .. row_start + rows - 1``, padded to ``length``), drawn from
    :mod:`bertlite.dropout` where and when they are read, as float32 scaled masks on
    ``device``: :meth:`get` the whole mask of a site (what the plain model multiplies by),
    :meth:`rows` the add & norm rows and :meth:`attention` the attention groups that the packed
    path computes (only those elements are drawn). The same values either way: every element
    is a function of its global place (``tests/test_dropout_where_read.py``)."""

    def __init__(self, config: BERTConfig, seed: int, step: int, layer: int, row_start: int,
                 rows: int, length: int, device: torch.device | str = "cpu") -> None:
        self.config, self.p = config, config.dropout
        self.seed, self.step, self.layer = seed, step, layer
        self.row_start, self.num_rows, self.length = row_start, rows, length
        self.device = device

    def _site(self, kind: str) -> int:
        return site_id(self.layer, kind)

    def _tensor(self, mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(mask).to(self.device)

    def get(self, kind: str, default: Any = None) -> torch.Tensor:
        """The whole scaled mask of site ``kind`` (:func:`bertlite.dropout.encoder_masks`'
        shape)."""
        shape = site_shapes(self.config, self.length)[kind]
        return self._tensor(scaled_mask(self.seed, self.step, self._site(kind), self.p,
                                        self.row_start, self.num_rows, shape))

    def rows(self, kind: str, padded_rows: torch.Tensor) -> torch.Tensor:
        """The scaled mask ``(len(padded_rows), num_hiddens)`` of an add & norm site at the
        positions ``padded_rows`` (``example * length + position`` within the piece)."""
        # (row_start + e) * length + p: the piece's rows at their global examples
        index = position_rows(self.row_start, padded_rows.cpu().numpy(), self.length)
        return self._tensor(scaled_rows(self.seed, self.step, self._site(kind), self.p, index,
                                        self.config.num_hiddens))

    def attention(self, members: torch.Tensor, positions: torch.Tensor | None, keys: int
                  ) -> torch.Tensor:
        """The scaled attention mask ``(len(members) * num_heads, queries, keys)`` of the
        examples ``members`` (within the piece): their first ``keys`` keys at the query
        positions ``positions`` ``(len(members), queries)``, or at the first ``keys`` (None)."""
        queries = (np.arange(keys)[None, :] if positions is None
                   else positions.cpu().numpy())
        index = attention_rows(members.cpu().numpy() + self.row_start, queries,
                               self.config.num_heads, self.length)
        mask = scaled_rows(self.seed, self.step, self._site("attention"), self.p, index,
                           self.length, take=keys)
        return self._tensor(mask.reshape(-1, mask.shape[2], keys))


class DropoutAdd(torch.autograd.Function):
    """``x + y * keep`` in one pass (``keep`` a scaled dropout mask); the backward is one
    pass."""

    @staticmethod
    def forward(ctx, x, y, keep):
        ctx.save_for_backward(keep)
        return torch.addcmul(x, y, keep)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad, grad * keep, None


def dropout_add_reference(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x + y * keep


# -- attention -------------------------------------------------------------------------------------


class Attention(torch.autograd.Function):
    """``dropout(softmax(q k^T + key_mask)) v`` of ``(examples * heads, length, head_size)``
    tensors (``q`` already scaled by ``1 / sqrt(head_size)``; ``key_mask`` of shape
    ``(examples, 1, 1, keys)``), ``keep`` the scaled dropout mask or None. The backward
    computes each gradient once, in place where it can, and returns contiguous gradients for
    Q, K and V (autograd's would return K's transposed)."""

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


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    scores = torch.bmm(q, k.transpose(1, 2))
    scores = (scores.view(key_mask.shape[0], -1, *scores.shape[1:]) + key_mask).view(
        scores.shape)
    weights = torch.softmax(scores, dim=-1)
    return torch.bmm(weights if keep is None else weights * keep, v)
