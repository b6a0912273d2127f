"""The book's BERT as Gluon ``HybridBlock``s of MXNet's numpy interface, readable beside the
chapter: post-LN Transformer encoder blocks ``ln(dropout(Y) + X)``, multi-head attention with
biases whose masked softmax gives keys beyond ``valid_lens`` no weight, ReLU feed-forward
networks, a learned positional embedding, an MLM head applied only at ``pred_positions`` and an
NSP head on the ``<cls>`` vector. The config's flavour options (:mod:`bertlite.config`) add
standard BERT's differences: GELU for ReLU, a LayerNorm after the embeddings, the LayerNorm
epsilon, and an MLM decoder tied to the token embedding.

One switch, ``fast`` (every block's constructor; :class:`BERTModel` passes it down), picks
the op set of :mod:`.kernels` for the six operations that have a faster formulation
(same-shape sums, LayerNorm, the masked softmax, row gathering, positional embeddings, the
activation): the kernels
(``fast=True``, the default and what ``MXNetBackend`` trains with) or MXNet's plain ops
(``fast=False``, the book's operations). The training loss of a fast, hybridized model runs in
a second compiled graph with a sparse last layer (:mod:`.fast`).

Written shape-agnostically, so that ``net.hybridize(static_alloc=True, static_shape=True)``
compiles it into one graph: positions come from ``npx.arange_like``, never from Python shapes.

Parameters are laid out as :mod:`bertlite.params` names them: the Gluon structured names of
:meth:`BERTModel.canonical_parameters` map one to one onto the canonical names (LayerNorm
``gamma``/``beta`` become ``weight``/``bias``); Dense weights are ``(out, in)`` in Gluon too.
Every layer is built with its input size, so parameters have their shapes right after
``initialize`` and weights can be loaded before the first forward pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import mxnet as mx
from mxnet import np
from mxnet.gluon import nn

from bertlite.config import BERTConfig
from bertlite.dropout import SITE_KINDS
from bertlite.params import parameter_shapes

from . import kernels

__all__ = [
    "AddNorm", "BERTEncoder", "BERTModel", "EncoderBlock", "LayerNorm", "MaskLM",
    "MultiHeadAttention", "NextSentencePred", "PositionWiseFFN", "canonical_name", "flat_masks",
]

#: LayerNorm's Gluon parameter names and their canonical (PyTorch) names
_RENAMES = {"gamma": "weight", "beta": "bias"}


def canonical_name(gluon_name: str) -> str:
    """The canonical name of a structured Gluon parameter name (``encoder.blks.0.addnorm1.ln.
    gamma`` -> ``encoder.blks.0.addnorm1.ln.weight``)."""
    head, _, last = gluon_name.rpartition(".")
    return f"{head}.{_RENAMES.get(last, last)}" if head else _RENAMES.get(last, last)


def _dense(units: int, in_units: int, **kwargs) -> nn.Dense:
    # flatten=False: only the last axis is transformed; in_units: shapes known at initialize
    return nn.Dense(units, flatten=False, in_units=in_units, **kwargs)


class LayerNorm(nn.LayerNorm):
    """Layer normalization over the last axis (parameters ``gamma``/``beta`` as in Gluon,
    epsilon 1e-5 as in PyTorch): :func:`.kernels.layer_norm` when ``fast``, else MXNet's fused
    operator."""

    def __init__(self, in_channels: int, epsilon: float = 1e-5, fast: bool = True,
                 **kwargs) -> None:
        super().__init__(axis=-1, epsilon=epsilon, in_channels=in_channels, **kwargs)
        self._units, self._ops = in_channels, kernels.ops(fast)

    def hybrid_forward(self, F, data, gamma, beta):
        return self._ops.layer_norm(F, data, gamma, beta, self._epsilon, self._units)


class MultiHeadAttention(nn.HybridBlock):
    """Multi-head scaled dot-product attention with biases; keys at positions
    ``>= valid_lens[b]`` get no weight (``valid_lens``: ``(batch,)``, or None for no mask).
    Queries and keys may differ in number. Hybridized, call it always with or always without
    ``valid_lens``: MXNet 1.9 keeps one graph per block."""

    def __init__(self, num_hiddens: int, num_heads: int, dropout: float, use_bias: bool = True,
                 fast: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_hiddens % num_heads:
            raise ValueError(f"num_hiddens ({num_hiddens}) must be divisible by num_heads "
                             f"({num_heads})")
        self.num_heads, self._ops = num_heads, kernels.ops(fast)
        self._scale = 1.0 / math.sqrt(num_hiddens // num_heads)
        with self.name_scope():
            self.W_q = _dense(num_hiddens, num_hiddens, use_bias=use_bias)
            self.W_k = _dense(num_hiddens, num_hiddens, use_bias=use_bias)
            self.W_v = _dense(num_hiddens, num_hiddens, use_bias=use_bias)
            self.W_o = _dense(num_hiddens, num_hiddens, use_bias=use_bias)
            self.dropout = nn.Dropout(dropout)

    def _split_heads(self, F, X):
        # (B, L, H) -> (B, L, heads, d) -> (B, heads, L, d) -> (B*heads, L, d); swapaxes
        # rather than transpose: faster in MXNet 1.9 on the CPU
        X = F.np.swapaxes(F.npx.reshape(X, (-2, -2, self.num_heads, -1)), 1, 2)
        return F.npx.reshape(X, (-5, -2, -2))

    def _merge_heads(self, F, X):
        # (B*heads, L, d) -> (B, heads, L, d) -> (B, L, heads, d) -> (B, L, H)
        X = F.np.swapaxes(F.npx.reshape(X, (-6, -1, self.num_heads, -2, -2)), 1, 2)
        return F.npx.reshape(X, (-2, -2, -5))

    def hybrid_forward(self, F, queries, keys, values, valid_lens, mask=None):
        """``mask``: dropout's scaled mask of the attention weights ``(B, heads, Lq, Lk)``
        (:mod:`bertlite.dropout`); None: ``nn.Dropout`` (MXNet's RNG, training mode only)."""
        q = self._split_heads(F, self.W_q(queries))
        k = self._split_heads(F, self.W_k(keys))
        v = self._split_heads(F, self.W_v(values))
        scores = F.npx.batch_dot(q, k, transpose_b=True) * self._scale  # (B*heads, Lq, Lk)
        if valid_lens is None:
            weights = F.npx.softmax(scores, axis=-1)
        else:
            weights = self._ops.masked_softmax(F, scores, valid_lens, self.num_heads)
        weights = (self.dropout(weights) if mask is None
                   else weights * F.npx.reshape(mask, (-5, -2, -2)))
        out = F.npx.batch_dot(weights, v)
        return self.W_o(self._merge_heads(F, out))


class PositionWiseFFN(nn.HybridBlock):
    """``dense2(act(dense1(X)))`` on the last axis (``activation``: ``"relu"``, ``"gelu"``)."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, activation: str = "relu",
                 fast: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self._activation, self._ops = activation, kernels.ops(fast)
        with self.name_scope():
            self.dense1 = _dense(ffn_num_hiddens, num_hiddens)
            self.dense2 = _dense(num_hiddens, ffn_num_hiddens)

    def hybrid_forward(self, F, X):
        return self.dense2(self._ops.activation(F, self.dense1(X), self._activation))


class AddNorm(nn.HybridBlock):
    """Residual connection then layer normalization: ``ln(dropout(Y) + X)``."""

    def __init__(self, num_hiddens: int, dropout: float, fast: bool = True, eps: float = 1e-5,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self._ops = kernels.ops(fast)
        with self.name_scope():
            self.dropout = nn.Dropout(dropout)
            self.ln = LayerNorm(num_hiddens, epsilon=eps, fast=fast)

    def hybrid_forward(self, F, X, Y, mask=None):
        """``mask``: dropout's scaled mask of ``Y``; None: ``nn.Dropout``."""
        return self.ln(self._ops.add(F, self.dropout(Y) if mask is None else Y * mask, X))


class EncoderBlock(nn.HybridBlock):
    """A post-LN Transformer encoder block."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, num_heads: int, dropout: float,
                 use_bias: bool = True, fast: bool = True, activation: str = "relu",
                 eps: float = 1e-5, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.attention = MultiHeadAttention(num_hiddens, num_heads, dropout, use_bias,
                                                fast=fast)
            self.addnorm1 = AddNorm(num_hiddens, dropout, fast=fast, eps=eps)
            self.ffn = PositionWiseFFN(num_hiddens, ffn_num_hiddens, activation, fast=fast)
            self.addnorm2 = AddNorm(num_hiddens, dropout, fast=fast, eps=eps)

    def hybrid_forward(self, F, X, valid_lens, attention_mask=None, addnorm1_mask=None,
                       addnorm2_mask=None):
        """The masks: this block's dropout masks (:data:`bertlite.dropout.SITE_KINDS`), all or
        none."""
        Y = self.addnorm1(X, self.attention(X, X, X, valid_lens, attention_mask), addnorm1_mask)
        return self.addnorm2(Y, self.ffn(Y), addnorm2_mask)


class BERTEncoder(nn.HybridBlock):
    """Token, segment and learned positional embeddings (with ``embedding_norm``: then
    LayerNorm and dropout, as standard BERT), then ``num_layers`` encoder blocks."""

    def __init__(self, vocab_size: int, num_hiddens: int, ffn_num_hiddens: int, num_heads: int,
                 num_layers: int, dropout: float, max_len: int = 1000, fast: bool = True,
                 activation: str = "relu", embedding_norm: bool = False, eps: float = 1e-5,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_hiddens, self.max_len, self._ops = num_hiddens, max_len, kernels.ops(fast)
        with self.name_scope():
            self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
            self.segment_embedding = nn.Embedding(2, num_hiddens)
            if embedding_norm:
                self.ln = LayerNorm(num_hiddens, epsilon=eps, fast=fast)
                self.dropout = nn.Dropout(dropout)
            self.embedding_norm = embedding_norm
            self.blks = nn.HybridSequential()
            for _ in range(num_layers):
                self.blks.add(EncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout,
                                           True, fast=fast, activation=activation, eps=eps))
            # BERT's positional embeddings are learned: a parameter long enough for max_len
            self.pos_embedding = self.params.get("pos_embedding",
                                                 shape=(1, max_len, num_hiddens))

    def embed(self, F: Any, tokens: Any, segments: Any, pos_embedding: Any) -> Any:
        """The input of the first block: token + segment + positional embeddings (normalized
        with ``embedding_norm``)."""
        X = self._ops.add(F, self.token_embedding(tokens), self.segment_embedding(segments))
        X = self._ops.add_positions(F, X, tokens, pos_embedding, self.max_len, self.num_hiddens)
        return self.dropout(self.ln(X)) if self.embedding_norm else X

    def hybrid_forward(self, F, tokens, segments, valid_lens, *masks, pos_embedding=None):
        """``masks``: none, or three per block (:func:`flat_masks`)."""
        X = self.embed(F, tokens, segments, pos_embedding)
        for i, blk in enumerate(self.blks):
            X = blk(X, valid_lens, *masks[3 * i:3 * i + 3])
        return X


class TiedDecoder(nn.HybridBlock):
    """The MLM decoder of a tied model: a bias of its own and the token embedding's weight
    (``(vocab, hidden)``, passed in), ``X W^T + b``."""

    def __init__(self, vocab_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        with self.name_scope():
            self.bias = self.params.get("bias", shape=(vocab_size,), init="zeros")

    def hybrid_forward(self, F, X, weight, bias):
        # named "fwd" as gluon.nn.Dense names its product: mixed precision casts it likewise
        return F.npx.fully_connected(X, weight, bias, num_hidden=self.vocab_size,
                                     flatten=False, name="fwd")


def _parameter(F: Any, param: Any, like: Any) -> Any:
    """Another block's parameter inside a computation: its symbol while a graph is traced,
    else its data on ``like``'s device."""
    return param.var() if F is mx.symbol else param.data(like.ctx)


class MaskLM(nn.HybridBlock):
    """The MLM head ``decoder(ln(act(dense(X))))`` at the gathered ``pred_positions``; with
    ``tied_embedding`` (the token embedding block) the decoder reads its weight."""

    def __init__(self, vocab_size: int, num_hiddens: int, fast: bool = True,
                 activation: str = "relu", eps: float = 1e-5,
                 tied_embedding: nn.Embedding | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._ops, self._activation = kernels.ops(fast), activation
        # not a child block (its weight belongs to the encoder), hence object.__setattr__
        object.__setattr__(self, "_tied", tied_embedding)
        with self.name_scope():
            self.dense = _dense(num_hiddens, num_hiddens)
            self.ln = LayerNorm(num_hiddens, epsilon=eps, fast=fast)
            self.decoder = (_dense(vocab_size, num_hiddens) if tied_embedding is None
                            else TiedDecoder(vocab_size))

    def hybrid_forward(self, F, X, pred_positions):
        return self.decode(F, self._ops.gather_rows(F, X, pred_positions))

    def decode(self, F: Any, masked_X: Any) -> Any:
        """Vocabulary logits of encodings ``(..., hidden)`` already at the predicted
        positions (``F``: ``mx.ndarray`` or, while a graph is traced, ``mx.symbol``)."""
        hidden = self.ln(self._ops.activation(F, self.dense(masked_X), self._activation))
        if self._tied is None:
            return self.decoder(hidden)
        return self.decoder(hidden, _parameter(F, self._tied.weight, masked_X))


class NextSentencePred(nn.HybridBlock):
    """The NSP output layer (two classes)."""

    def __init__(self, num_hiddens: int, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.output = nn.Dense(2, in_units=num_hiddens)

    def hybrid_forward(self, F, X):
        return self.output(X)


class BERTModel(nn.HybridBlock):
    """The BERT model: ``net(tokens, segments, valid_lens=None, pred_positions=None)`` returns
    ``(encoded_X, mlm_Y_hat, nsp_Y_hat)``, ``mlm_Y_hat`` None without ``pred_positions``.

    Takes the book's arguments (``BERTModel(len(vocab), num_hiddens=128, ffn_num_hiddens=256,
    num_heads=2, num_layers=2, dropout=0.2)``) or a config (:meth:`from_config`); ``net.config``
    is the :class:`~bertlite.config.BERTConfig` either way. ``fast`` (default True) picks the
    op set of :mod:`.kernels` for every block; ``net.fast`` tells which.

    Hybridized, the graph always receives all four arrays (MXNet 1.9 caches one graph per block,
    not one per input signature): a missing ``valid_lens`` is the full length (no masking) and a
    missing ``pred_positions`` one dummy position whose MLM output is dropped. (Symbolic calls,
    e.g. from an enclosing graph, must pass all four.)
    """

    def __init__(self, vocab_size: int, num_hiddens: int = 128, ffn_num_hiddens: int = 256,
                 num_heads: int = 2, num_layers: int = 2, dropout: float = 0.2,
                 max_len: int = 1000, fast: bool = True, activation: str = "relu",
                 embedding_norm: bool = False, layer_norm_eps: float = 1e-5,
                 tie_decoder: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config = c = BERTConfig(
            vocab_size=vocab_size, num_hiddens=num_hiddens, ffn_num_hiddens=ffn_num_hiddens,
            num_heads=num_heads, num_layers=num_layers, dropout=dropout, max_len=max_len,
            activation=activation, embedding_norm=embedding_norm, layer_norm_eps=layer_norm_eps,
            tie_decoder=tie_decoder)
        #: the one switch: the kernels (and, hybridized, the fast loss graph) or plain ops
        self.fast = bool(fast)
        #: the devices the backend initialized the model on (set by ``MXNetBackend``)
        self.devices: list = []
        with self.name_scope():
            self.encoder = BERTEncoder(vocab_size, num_hiddens, ffn_num_hiddens, num_heads,
                                       num_layers, dropout, max_len, fast=fast,
                                       activation=c.activation, embedding_norm=c.embedding_norm,
                                       eps=c.layer_norm_eps)
            self.hidden = nn.Dense(num_hiddens, activation="tanh", in_units=num_hiddens)
            self.mlm = MaskLM(vocab_size, num_hiddens, fast=fast, activation=c.activation,
                              eps=c.layer_norm_eps,
                              tied_embedding=self.encoder.token_embedding if tie_decoder
                              else None)
            self.nsp = NextSentencePred(num_hiddens)

    @classmethod
    def from_config(cls, config: BERTConfig, fast: bool = True) -> BERTModel:
        return cls(config.vocab_size, num_hiddens=config.num_hiddens,
                   ffn_num_hiddens=config.ffn_num_hiddens, num_heads=config.num_heads,
                   num_layers=config.num_layers, dropout=config.dropout, max_len=config.max_len,
                   fast=fast, activation=config.activation, embedding_norm=config.embedding_norm,
                   layer_norm_eps=config.layer_norm_eps, tie_decoder=config.tie_decoder)

    def canonical_parameters(self) -> OrderedDict:
        """``{canonical name: gluon.Parameter}`` in the order of
        :func:`bertlite.params.parameter_shapes`' layout."""
        by_name = {canonical_name(name): param
                   for name, param in self._collect_params_with_prefix().items()}
        order = parameter_shapes(self.config)
        if set(by_name) != set(order):  # pragma: no cover - a layout bug, not a user error
            raise RuntimeError(f"BERTModel parameters {sorted(set(by_name) ^ set(order))} do "
                               "not match bertlite.params")
        return OrderedDict((name, by_name[name]) for name in order)

    def forward(self, tokens, segments, valid_lens=None, pred_positions=None, masks=None):
        """``masks`` (positional: ``Block.__call__`` takes no keywords): the dropout masks of
        this batch (:func:`flat_masks` of
        :func:`bertlite.dropout.encoder_masks`, on the batch's device) applied in place of
        ``nn.Dropout``; a model that is not hybridized only (the graph has a fixed input list:
        the fast path's loss graph takes them instead)."""
        masks = list(masks or ())
        if masks and self._active:
            raise ValueError("dropout masks go to a BERTModel that is not hybridized (or to "
                             "its fast loss graph, bertlite.backends.mxnet.fast); call "
                             "net.hybridize(active=False) first")
        no_preds = pred_positions is None
        if valid_lens is None:
            valid_lens = np.full((tokens.shape[0],), tokens.shape[1], dtype="float32",
                                 ctx=tokens.ctx)
        if no_preds:
            pred_positions = np.zeros((tokens.shape[0], 1), dtype="int32", ctx=tokens.ctx)
        encoded_X, mlm_Y_hat, nsp_Y_hat = super().forward(
            tokens, segments, valid_lens.reshape(-1), pred_positions, *masks)
        return encoded_X, (None if no_preds else mlm_Y_hat), nsp_Y_hat

    def hybrid_forward(self, F, tokens, segments, valid_lens, pred_positions, *masks):
        encoded_X = self.encoder(tokens, segments, valid_lens, *masks)
        mlm_Y_hat = self.mlm(encoded_X, pred_positions)
        # the hidden layer of the NSP classifier reads the encoding of <cls> (position 0)
        nsp_Y_hat = self.nsp(self.hidden(row(F, encoded_X, 0)))
        return encoded_X, mlm_Y_hat, nsp_Y_hat


def flat_masks(masks: Sequence[dict[str, Any]]) -> list[Any]:
    """:func:`bertlite.dropout.encoder_masks`' per-layer dicts as the flat list the blocks
    take: per layer its :data:`bertlite.dropout.SITE_KINDS` in order (empty without dropout)."""
    return [layer[kind] for layer in masks for kind in SITE_KINDS]


def row(F: Any, X: Any, j: int) -> Any:
    """``X[:, j]`` of ``(batch, len, hidden)`` as ``(batch, hidden)``."""
    return F.npx.reshape(F.npx.slice(X, begin=(None, j, None), end=(None, j + 1, None)),
                         (-2, -1))
