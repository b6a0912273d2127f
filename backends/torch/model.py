"""The book's BERT in PyTorch, with the canonical parameter names of :mod:`bertlite.params`:
one plain ``forward`` per class, to be read beside the chapter.

Same architecture as d2l's PyTorch tab (post-LN Transformer encoder blocks with biased
attention and dropout on the attention weights, a learned positional embedding, the MLM head at
the predicted positions only, the NSP head on ``<cls>``). Differences: the positional embedding
is trained (the book reads it through ``.data``); the config's flavour options add standard
BERT's differences (GELU, a LayerNorm after the embeddings, its epsilon, an MLM decoder tied
to the token embedding: :mod:`bertlite.config`); the initial weights are
:func:`bertlite.params.init_params` (Xavier, the same in every backend); attention is
:func:`torch.nn.functional.scaled_dot_product_attention` where no dropout applies.

The seam: training on the CPU in float32 takes the fast path of :mod:`.fast` (packed valid
tokens, a sparse last layer, the fused kernels of :mod:`.kernels`) with the same loss and
gradients. ``BERTModel.fast`` is the one switch; with ``fast=False`` (and on GPUs, under
autocast) every step runs the plain code below, which uses no fused kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             attn_mask: torch.Tensor | None,
                             dropout: nn.Module | None = None,
                             keep: torch.Tensor | None = None) -> torch.Tensor:
    """``dropout(softmax(q k^T / sqrt(d) + mask)) v`` of ``(batch, heads, len, d)`` tensors,
    written out as the book's ``DotProductAttention`` (``dropout``: a module, or None). One
    ``baddbmm`` adds the mask and scales the scores (under autocast too, in its dtype)."""
    batch_size, num_heads, length, head_size = q.shape
    q3, k3, v3 = (t.reshape(batch_size * num_heads, -1, head_size) for t in (q, k, v))
    if attn_mask is None:
        scores = torch.bmm(q3, k3.transpose(1, 2)) * (1.0 / math.sqrt(head_size))
    else:
        mask = attn_mask.expand(batch_size, num_heads, 1, -1).reshape(
            batch_size * num_heads, 1, -1)
        scores = torch.baddbmm(mask, q3, k3.transpose(1, 2), alpha=1.0 / math.sqrt(head_size))
    weights = torch.softmax(scores, dim=-1)
    if keep is not None:  # a scaled mask (batch, heads, len, keys) of bertlite.dropout
        weights = weights * keep.reshape(weights.shape).to(weights.dtype)
    elif dropout is not None:
        weights = dropout(weights)
    return torch.bmm(weights, v3).view(batch_size, num_heads, length, head_size)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with biased projections ``W_q, W_k, W_v, W_o``
    and dropout on the attention weights."""

    def __init__(self, num_hiddens: int, num_heads: int, dropout: float, bias: bool = True
                 ) -> None:
        super().__init__()
        if num_hiddens % num_heads:
            raise ValueError(f"num_hiddens ({num_hiddens}) must be divisible by num_heads "
                             f"({num_heads})")
        self.num_heads = num_heads
        self.dropout = nn.Dropout(dropout)
        self.W_q = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_k = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_v = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_o = nn.Linear(num_hiddens, num_hiddens, bias=bias)

    def _heads(self, X: torch.Tensor) -> torch.Tensor:
        # (batch, len, hidden) -> (batch, heads, len, hidden / heads)
        return X.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                attn_mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``attn_mask`` is what :func:`attention_mask` returns (or ``None``); ``keep``: the
        attention weights' scaled dropout mask ``(batch, heads, queries, keys)``
        (:mod:`bertlite.dropout`), else the dropout module draws one when training."""
        q, k, v = (self._heads(self.W_q(queries)), self._heads(self.W_k(keys)),
                   self._heads(self.W_v(values)))
        if keep is not None:
            out = masked_softmax_attention(q, k, v, attn_mask, keep=keep)
        elif self.training and self.dropout.p > 0:  # the book's attention, its dropout module
            out = masked_softmax_attention(q, k, v, attn_mask, self.dropout)
        else:  # the same without dropout, in one fused torch op
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.W_o(out.transpose(1, 2).flatten(2))


def activate(X: torch.Tensor, activation: str) -> torch.Tensor:
    """``relu(X)`` or the exact (erf) ``gelu(X)``."""
    return F.gelu(X) if activation == "gelu" else F.relu(X)


class PositionWiseFFN(nn.Module):
    """Two dense layers with a ReLU (or GELU) between them, applied at every position."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, activation: str = "relu"
                 ) -> None:
        super().__init__()
        self.activation = activation
        self.dense1 = nn.Linear(num_hiddens, ffn_num_hiddens)
        self.dense2 = nn.Linear(ffn_num_hiddens, num_hiddens)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.dense2(activate(self.dense1(X), self.activation))


class AddNorm(nn.Module):
    """Residual connection, then layer normalization: ``ln(dropout(Y) + X)``."""

    def __init__(self, num_hiddens: int, dropout: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(num_hiddens, eps=eps)

    def forward(self, X: torch.Tensor, Y: torch.Tensor, keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``keep``: ``Y``'s scaled dropout mask (:mod:`bertlite.dropout`), else the dropout
        module's."""
        return self.ln((self.dropout(Y) if keep is None else Y * keep.to(Y.dtype)) + X)


class EncoderBlock(nn.Module):
    """A post-LN Transformer encoder block."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, num_heads: int, dropout: float,
                 activation: str = "relu", eps: float = 1e-5) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(num_hiddens, num_heads, dropout, bias=True)
        self.addnorm1 = AddNorm(num_hiddens, dropout, eps)
        self.ffn = PositionWiseFFN(num_hiddens, ffn_num_hiddens, activation)
        self.addnorm2 = AddNorm(num_hiddens, dropout, eps)

    def forward(self, X: torch.Tensor, attn_mask: torch.Tensor | None,
                keeps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``keeps``: this block's dropout masks by site (one layer of
        :func:`bertlite.dropout.encoder_masks`), or None."""
        keeps = keeps or {}
        Y = self.addnorm1(X, self.attention(X, X, X, attn_mask, keeps.get("attention")),
                          keeps.get("addnorm1"))
        return self.addnorm2(Y, self.ffn(Y), keeps.get("addnorm2"))


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
    ``num_hiddens``)."""

    def __init__(self, vocab_size: int, num_hiddens: int = 128,
                 norm_shape: int | Sequence[int] | None = None, ffn_num_input: int | None = None,
                 ffn_num_hiddens: int = 256, num_heads: int = 2, num_layers: int = 2,
                 dropout: float = 0.2, max_len: int = 1000, key_size: int | None = None,
                 query_size: int | None = None, value_size: int | None = None, *,
                 activation: str = "relu", embedding_norm: bool = False,
                 eps: float = 1e-5) -> None:
        super().__init__()
        _check_book_sizes("BERTEncoder", num_hiddens, norm_shape=norm_shape,
                          ffn_num_input=ffn_num_input, key_size=key_size,
                          query_size=query_size, value_size=value_size)
        self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
        self.segment_embedding = nn.Embedding(2, num_hiddens)
        #: standard BERT's LayerNorm and dropout after the summed embeddings (or None)
        self.ln = nn.LayerNorm(num_hiddens, eps=eps) if embedding_norm else None
        self.dropout = nn.Dropout(dropout) if embedding_norm else None
        self.blks = nn.ModuleList(EncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout,
                                               activation, eps)
                                  for _ in range(num_layers))
        # Learned, and used as a Parameter (not through ``.data``) so that it is trained.
        self.pos_embedding = nn.Parameter(torch.zeros(1, max_len, num_hiddens))

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor,
                valid_lens: torch.Tensor | None = None,
                masks: Sequence[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """``masks``: the dropout masks of :func:`bertlite.dropout.encoder_masks` (per layer),
        or None (the dropout modules)."""
        length = tokens.shape[1]
        if length > self.pos_embedding.shape[1]:
            raise ValueError(f"the input has {length} positions, more than the positional "
                             f"embedding's max_len {self.pos_embedding.shape[1]}")
        X = self.token_embedding(tokens) + self.segment_embedding(segments)
        X = X + self.pos_embedding[:, :length]
        if self.ln is not None:
            X = self.dropout(self.ln(X))
        mask = attention_mask(valid_lens, length, X.dtype)
        for i, blk in enumerate(self.blks):
            X = blk(X, mask, masks[i] if masks else None)
        return X


class MaskLM(nn.Module):
    """The masked-language-model head: dense, ReLU, LayerNorm, vocabulary decoder, applied only
    at ``pred_positions``."""

    def __init__(self, vocab_size: int, num_hiddens: int, num_inputs: int | None = None, *,
                 activation: str = "relu", eps: float = 1e-5) -> None:
        super().__init__()
        self.activation = activation
        self.dense = nn.Linear(num_inputs or num_hiddens, num_hiddens)
        self.ln = nn.LayerNorm(num_hiddens, eps=eps)
        self.decoder = nn.Linear(num_hiddens, vocab_size)

    @staticmethod
    def rows(X: torch.Tensor, pred_positions: torch.Tensor) -> torch.Tensor:
        """Indices into the flattened ``(batch * len, hidden)`` encodings of ``X`` of every
        prediction slot, example by example (``X``: the encodings, or anything whose first
        two dimensions are ``(batch, len)``, such as the token ids)."""
        batch_size, length = X.shape[0], X.shape[1]
        offsets = torch.arange(0, batch_size * length, length, device=X.device)
        return (pred_positions + offsets.unsqueeze(1)).reshape(-1)

    def decode(self, masked_X: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of encodings ``(..., hidden)``: the book's MLP."""
        return self.decoder(self.ln(activate(self.dense(masked_X), self.activation)))

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
                 nsp_in_features: int | None = None, *, seed: int | None = None,
                 fast: bool = True, activation: str = "relu", embedding_norm: bool = False,
                 layer_norm_eps: float = 1e-5, tie_decoder: bool = False) -> None:
        super().__init__()
        _check_book_sizes("BERTModel", num_hiddens, norm_shape=norm_shape,
                          ffn_num_input=ffn_num_input, key_size=key_size,
                          query_size=query_size, value_size=value_size,
                          hid_in_features=hid_in_features, mlm_in_features=mlm_in_features,
                          nsp_in_features=nsp_in_features)
        self.config = c = BERTConfig(
            vocab_size=vocab_size, num_hiddens=num_hiddens, ffn_num_hiddens=ffn_num_hiddens,
            num_heads=num_heads, num_layers=num_layers, dropout=dropout, max_len=max_len,
            activation=activation, embedding_norm=embedding_norm, layer_norm_eps=layer_norm_eps,
            tie_decoder=tie_decoder)
        self.encoder = BERTEncoder(vocab_size, num_hiddens, ffn_num_hiddens=ffn_num_hiddens,
                                   num_heads=num_heads, num_layers=num_layers, dropout=dropout,
                                   max_len=max_len, activation=c.activation,
                                   embedding_norm=c.embedding_norm, eps=c.layer_norm_eps)
        self.hidden = nn.Linear(num_hiddens, num_hiddens)
        self.mlm = MaskLM(vocab_size, num_hiddens, activation=c.activation, eps=c.layer_norm_eps)
        if tie_decoder:  # one Parameter: named_parameters() lists it once, as the embedding
            self.mlm.decoder.weight = self.encoder.token_embedding.weight
        self.nsp = NextSentencePred(num_hiddens)
        #: the one switch of the fast path (:mod:`.fast`): where it can run (training on the
        #: CPU in float32) it computes the same loss and gradients in less time
        self.fast = fast
        self.reset_parameters(seed)

    @classmethod
    def from_config(cls, config: BERTConfig, *, seed: int | None = None, fast: bool = True
                    ) -> BERTModel:
        """The model of a :class:`bertlite.config.BERTConfig`."""
        return cls(config.vocab_size, num_hiddens=config.num_hiddens,
                   ffn_num_hiddens=config.ffn_num_hiddens, num_heads=config.num_heads,
                   num_layers=config.num_layers, dropout=config.dropout,
                   max_len=config.max_len, seed=seed, fast=fast, activation=config.activation,
                   embedding_norm=config.embedding_norm, layer_norm_eps=config.layer_norm_eps,
                   tie_decoder=config.tie_decoder)

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
                masks: Sequence[dict[str, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(encoded_X, mlm_Y_hat, nsp_Y_hat)`` as the book's ``BERTModel``.

        ``masks``: the dropout masks of this batch, per layer by site, full-shape
        (:func:`bertlite.dropout.encoder_masks` as tensors on the batch's device), applied
        instead of the dropout modules' draws (the fast path takes its elements from them);
        how training makes dropout independent of the batch's split. Training on the CPU
        packs the valid tokens (:func:`.fast.packs`): the same values, zeros at the padded
        positions. The training loss reads only ``<cls>`` and the predicted positions, through
        the sparse last layer of :func:`.fast.sparse_forward`."""
        from . import fast  # the fast path, which builds on this module

        if fast.packs(self, tokens, valid_lens):
            encoded_X, cls = fast.forward(self, tokens, segments, valid_lens, masks)
        else:
            encoded_X = self.encoder(tokens, segments, valid_lens, masks)
            cls = encoded_X[:, 0, :]
        mlm_Y_hat = None if pred_positions is None else self.mlm(encoded_X, pred_positions)
        # The hidden layer of the NSP classifier, on the '<cls>' token (index 0).
        nsp_Y_hat = self.nsp(torch.tanh(self.hidden(cls)))
        return encoded_X, mlm_Y_hat, nsp_Y_hat
